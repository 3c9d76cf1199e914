"""The run's event log, ``metrics.jsonl``.

The run's event log: one JSON line per event in ``CHECKPOINT.DIR/metrics.jsonl`` (rank 0), read by
``dcv2 report``, the pipeline's report step and the tests. Every event from the ``run_start`` of an attempt on
carries the run's ``run_id`` and the ``attempt`` (1 for a new run, one more for each resume): the runs and attempts
that one directory saw never read as one.

A local ``CHECKPOINT.DIR`` holds the file directly. For object storage it is written to a local file (continuing
what earlier attempts of the run published) and published next to the checkpoints with every checkpoint and at
the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import time

from dcv2_k8s.storage import StorageError, is_disk_full

log = logging.getLogger("dcv2")


class EventLog:
    """``emit(kind, **values)`` appends a line; ``publish()`` copies the file next to remote checkpoints.

    Args:
        root: ``CHECKPOINT.DIR`` (a local path or ``s3://...``).
        store: the checkpoint store of ``root`` (used for remote roots).
        enabled: False on every rank but rank 0 (then every call does nothing).
    """

    def __init__(self, root: str, store, enabled: bool):
        self.root, self.store = root, store
        self.remote = "://" in root
        self.path = self._local_path() if enabled else None
        self.tags: dict = {}  # run_id and attempt, from start_run on
        self._full = False    # the last emit met a full disk (warned once)

    def _local_path(self) -> str:
        if not self.remote:
            return os.path.join(self.root, "metrics.jsonl")
        local = os.path.join(tempfile.gettempdir(), "dcv2-metrics", hashlib.sha1(self.root.encode()).hexdigest()[:12],
                             "metrics.jsonl")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        remote = self.store.join("metrics.jsonl")
        with open(local, "wb") as f:  # a resumed run appends to what the earlier attempts wrote
            f.write(self.store.get_bytes(remote) if self.store.exists(remote) else b"")
        return local

    def start_run(self, run_id: str | None, **values) -> dict:
        """The ``run_start`` event of an attempt (``values``), and its tags on every later event: ``run_id`` (None:
        a new run, with a new id) and this attempt's number (one more than the attempts of that run already in the
        log). Returns the tags."""
        if run_id is None:
            run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        self.tags = {"run_id": run_id, "attempt": 1 + sum(e.get("run_id") == run_id for e in self._starts())}
        self.emit("run_start", **values)
        return dict(self.tags)

    def _starts(self) -> list[dict]:
        if self.path is None or not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                if '"run_start"' in line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:  # a line cut by a kill
                        pass
        return [e for e in out if e.get("kind") == "run_start"]

    def emit(self, kind: str, **values) -> None:
        """Append one line. On a full disk the line is dropped whole (never half a line), with one warning until
        space is back: the run goes on, and its next checkpoint says what the disk needs (DiskFull)."""
        if self.path is None:
            return
        data = (json.dumps({"kind": kind, "time": time.time(), **self.tags, **values}) + "\n").encode()
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        except OSError as e:
            if not is_disk_full(e):
                raise
            if not self._full:
                log.warning("%s: no space left on the device; events are not recorded until space is freed", self.path)
            self._full = True
            return
        self._full = False

    def publish(self, final: bool = False) -> None:
        """Copy the file next to remote checkpoints. Best effort while training (an unreachable store must not stop
        the run: the next checkpoint publishes it again); the final copy must succeed."""
        if self.path is None or not self.remote:
            return
        with open(self.path, "rb") as f:
            data = f.read()
        try:
            self.store.put_bytes(self.store.join("metrics.jsonl"), data)
        except StorageError as e:
            if final or not e.transient:
                raise
            log.warning("metrics.jsonl not published this time: %s", e)
