"""Checkpoints: every rank's memory bank, rank 0's model/optimizer/state, committed by a manifest written last.

Layout under ``CHECKPOINT.DIR``::

    step_000001250/state.pt          rank 0: model, optimizer, scaler, train state, assignments, RNG
    step_000001250/bank_rank0003.pt  every rank: its memory bank, write pointer and RNG states
    step_000001250/done_rank0003.json  every rank, after its part is uploaded: the part sizes
    step_000001250/manifest.json     rank 0, after every rank's part is in place: the commit marker
    latest.json                      points to the newest committed checkpoint (replaced atomically)

A checkpoint without a manifest (a crash mid-save) is never loaded. Files load with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import io
import json
import os
import logging
import random
import threading
import time
from typing import Any

import numpy as np
import torch

from dcv2_k8s.storage import StorageError, open_storage

log = logging.getLogger("dcv2")


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """RNG states of torch (CPU and CUDA), numpy and python as weights_only-safe values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
             "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lower_thread_priority(niceness: int = 10) -> None:
    """Background uploads yield the CPU to training: on Linux niceness is per thread and the upload's worker
    threads (s3transfer) inherit it. Best effort; a no-op where not permitted or not supported."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


class CheckpointManager:
    """Save and find checkpoints of one run (see the module docstring for the layout).

    ``save`` serialises this rank's part in memory (the snapshot: training may change the tensors right after)
    and uploads it in a background thread, then writes ``done_rankRRRR.json``. Rank 0 commits once every rank's
    marker is present (bounded by ``commit_timeout``): ``manifest.json``, then ``latest.json``. At most one
    checkpoint is in flight per rank: the next ``save`` (or ``wait``) waits for the previous one and re-raises
    its error.
    """

    def __init__(self, root: str, rank: int = 0, world_size: int = 1, keep_last: int = 3,
                 keep_every_epochs: int = 0, background: bool = True, commit_timeout: float = 600.0,
                 retry_seconds: float = 300.0):
        self.store = open_storage(root)
        self.root = root
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_every_epochs = keep_last, keep_every_epochs
        self.background, self.commit_timeout = background, commit_timeout
        self.retry_seconds = retry_seconds
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_result: dict = {}

    @staticmethod
    def name_for(global_step: int) -> str:
        return f"step_{global_step:09d}"

    def save(self, name: str, main_state: dict | None, bank_state: dict, meta: dict) -> None:
        """Snapshot this rank's part now; upload and (rank 0) commit in the background."""
        self.wait()
        t0 = time.time()
        files = {f"bank_rank{self.rank:04d}.pt": to_bytes(bank_state)}
        if self.rank == 0:
            files["state.pt"] = to_bytes(main_state)
        snapshot_s = time.time() - t0
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(name, files, meta, snapshot_s),
                                            name=f"checkpoint-{name}", daemon=True)
            self._thread.start()
        else:
            self._write(name, files, meta, snapshot_s)
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight checkpoint of this rank is written (and committed, on rank 0)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _write(self, name: str, files: dict[str, bytes], meta: dict, snapshot_s: float) -> None:
        if threading.current_thread() is not threading.main_thread():
            _lower_thread_priority()
        try:
            t0 = time.time()
            delay = 1.0
            while True:
                try:
                    self._write_once(name, files, meta)
                    break
                except StorageError as e:  # an unreachable store: retry with backoff, within the budget
                    left = t0 + self.retry_seconds - time.time()
                    if not e.transient or left <= 0:
                        raise
                    log.warning("checkpoint %s: %s; retrying in %.0f s (%.0f s of retries left)", name, e,
                                min(delay, left), left)
                    time.sleep(min(delay, left))
                    delay = min(delay * 2, 30.0)
            self.last_result = {"name": name, "bytes": sum(len(d) for d in files.values()),
                                "seconds": time.time() - t0 + snapshot_s, "time": time.time()}
        except BaseException as e:  # surfaced by the next wait()
            self._error = e

    def _write_once(self, name: str, files: dict[str, bytes], meta: dict) -> None:
        """Write this rank's files and done marker (and commit on rank 0); idempotent, so it can be retried."""
        ckpt = self.store.join(name)
        for fname, data in files.items():
            self.store.put_bytes(f"{ckpt}/{fname}", data)
        sizes = {f: len(d) for f, d in files.items()}
        self.store.put_bytes(f"{ckpt}/done_rank{self.rank:04d}.json", json.dumps(sizes).encode())
        if self.rank == 0:
            self._commit(name, meta)

    def _commit(self, name: str, meta: dict) -> None:
        ckpt = self.store.join(name)
        deadline = time.time() + self.commit_timeout
        parts: dict[str, int] = {}
        pending = set(range(self.world_size))
        while pending:
            for r in sorted(pending):
                marker = f"{ckpt}/done_rank{r:04d}.json"
                if self.store.exists(marker):
                    parts.update(json.loads(self.store.get_bytes(marker)))
                    pending.discard(r)
            if pending:
                if time.time() > deadline:
                    raise RuntimeError(f"checkpoint {ckpt}: ranks {sorted(pending)} did not write their parts within "
                                       f"{self.commit_timeout:.0f} s; not committing (the previous checkpoint stays latest)")
                time.sleep(0.2)
        for fname, size in parts.items():
            if self.store.size(f"{ckpt}/{fname}") != size:
                raise RuntimeError(f"checkpoint {ckpt}: {fname} has the wrong size; not committing")
        manifest = dict(meta, name=name, world_size=self.world_size, files=parts, time=time.time())
        self.store.put_bytes(f"{ckpt}/manifest.json", json.dumps(manifest, indent=1).encode())
        self.store.put_bytes(self.store.join("latest.json"), json.dumps({"name": name}).encode())
        self._retain()
        log.info("checkpoint %s committed (%.1f MB)", ckpt, sum(parts.values()) / 1e6)

    def _manifest(self, name: str) -> dict | None:
        path = self.store.join(name, "manifest.json")
        if not self.store.exists(path):
            return None
        try:
            manifest = json.loads(self.store.get_bytes(path))
        except (ValueError, OSError):
            return None
        for fname, size in manifest.get("files", {}).items():
            p = self.store.join(name, fname)
            if not self.store.exists(p) or self.store.size(p) != size:
                return None
        return manifest

    def committed(self) -> list[dict]:
        """Committed checkpoints, oldest first."""
        out = []
        for d in self.store.list_dirs(self.root):
            if d.startswith("step_"):
                m = self._manifest(d)
                if m is not None:
                    out.append(m)
        return out

    def latest(self) -> dict | None:
        """The manifest of the newest committed checkpoint, or None."""
        ptr = self.store.join("latest.json")
        if self.store.exists(ptr):
            try:
                m = self._manifest(json.loads(self.store.get_bytes(ptr))["name"])
                if m is not None:
                    return m
            except (ValueError, KeyError, OSError):
                pass
            log.warning("%s points to a missing or incomplete checkpoint; scanning for the newest committed one", ptr)
        found = self.committed()
        return found[-1] if found else None

    def load_state(self, manifest: dict) -> dict:
        return from_bytes(self.store.get_bytes(self.store.join(manifest["name"], "state.pt")))

    def load_bank(self, manifest: dict) -> dict | None:
        """This rank's bank, or None when the checkpoint was written by another world size."""
        if manifest["world_size"] != self.world_size:
            return None
        return from_bytes(self.store.get_bytes(self.store.join(manifest["name"], f"bank_rank{self.rank:04d}.pt")))

    def _retain(self) -> None:
        if self.keep_last <= 0:
            return
        found = self.committed()
        keep = {m["name"] for m in found[-self.keep_last:]}
        if self.keep_every_epochs > 0:
            keep |= {m["name"] for m in found if m.get("epoch_end") and m["epoch"] % self.keep_every_epochs == 0}
        for m in found:
            if m["name"] not in keep:
                self.store.delete_tree(self.store.join(m["name"]))
