"""Reading source objects for staging, whole or as a ranged stream.

Reading source objects for staging, through the storage interface (``get_range`` on every backend): a small
object in one request, a large one as a sequential stream over several ranged requests in flight. Both stop with
:class:`Cancelled` once the staging's cancel event is set (SIGINT/SIGTERM)."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

CHUNK = 8 << 20            # ranged GET size for large objects
READ_AHEAD = 8             # ranged requests in flight per large object


class Cancelled(Exception):
    """The staging was cancelled: this transfer stopped where it was."""


def read_whole(store, path: str, cancel: threading.Event) -> bytes:
    """One object (or file) in one request."""
    if cancel.is_set():
        raise Cancelled()
    return store.get_range(path)


def read_range(store, path: str, lo: int, hi: int, cancel: threading.Event) -> bytes:
    """Bytes ``[lo, hi)`` of one object in one request."""
    if cancel.is_set():
        raise Cancelled()
    return store.get_range(path, lo, hi)


class RangedReader(io.RawIOBase):
    """A sequential, file-like view of ``[start, end)`` of an object, read with up to READ_AHEAD ranged requests
    in flight (several connections, memory bounded by READ_AHEAD x CHUNK). Checks ``cancel`` between chunks."""

    def __init__(self, store, path: str, start: int, end: int, cancel: threading.Event, pool: ThreadPoolExecutor):
        self.store, self.path, self.end, self.cancel, self.pool = store, path, end, cancel, pool
        self._next = start
        self._pending: list = []
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while len(self._pending) < READ_AHEAD and self._next < self.end:
            lo, hi = self._next, min(self._next + CHUNK, self.end)
            self._pending.append(self.pool.submit(read_range, self.store, self.path, lo, hi, self.cancel))
            self._next = hi

    def readinto(self, b) -> int:
        if not self._buf:
            if self.cancel.is_set():
                raise Cancelled()
            self._fill()
            if not self._pending:
                return 0
            self._buf = memoryview(self._pending.pop(0).result())
            self._fill()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        super().close()
