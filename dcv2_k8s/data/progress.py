"""Staging progress lines.

Staging progress: a bar on a terminal; elsewhere (``kubectl logs`` of a staging init container) one line every
few seconds with objects, files, bytes, rate and ETA."""

from __future__ import annotations

import sys
import threading
import time

from dcv2_k8s.plural import count


class Progress:
    """A progress bar on a terminal; elsewhere (``kubectl logs``) one line every ``every`` seconds."""

    def __init__(self, total_bytes: int, objects: int, tty: bool, every: float, out=None):
        self.total, self.objects, self.every = total_bytes, objects, every
        self.bytes = self.files = self.done_objects = 0
        self.t0 = self.last = time.time()
        self.lock = threading.Lock()
        self.out = out or sys.stderr
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1.0,
                            desc=f"stage {count(objects, 'object')}", dynamic_ncols=True, file=self.out)

    def add(self, nbytes: int = 0, files: int = 0, objects: int = 0) -> None:
        with self.lock:
            self.bytes += nbytes
            self.files += files
            self.done_objects += objects
            if self.bar is not None:
                self.bar.update(nbytes)
                self.bar.set_postfix(files=self.files, refresh=False)
            elif self.every > 0 and time.time() - self.last >= self.every:
                self.last = time.time()
                print(self.line(), file=self.out, flush=True)

    def line(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.bytes / dt
        eta = (self.total - self.bytes) / rate if rate > 0 else float("inf")
        eta_s = f"{eta / 60:.1f} min" if eta != float("inf") else "?"
        return (f"stage: {self.done_objects}/{count(self.objects, 'object')}, {count(self.files, 'file')}, "
                f"{self.bytes / 1e9:.2f}/{self.total / 1e9:.2f} GB, {rate / 1e6:.1f} MB/s, ETA {eta_s}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
