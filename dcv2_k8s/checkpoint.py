"""Checkpoints: every rank's memory bank, rank 0's model/optimizer/state, committed by a manifest written last.

Layout under ``CHECKPOINT.DIR``::

    step_000001250/state.pt          rank 0: model, optimizer, scaler, train state, assignments, RNG
    step_000001250/bank_rank0003.pt  every rank: its memory bank, write pointer and RNG states
    step_000001250/done_rank0003.json  every rank, after its part is uploaded: the part sizes
    step_000001250/manifest.json     rank 0, after every rank's part is in place: the commit marker
    latest.json                      points to the newest committed checkpoint (replaced atomically), and names
                                     the run that owns the directory: its generation (see "Fencing")
    step_000001300-g000002/...       a checkpoint written by generation 2 or later (generation 1 and older
                                     layouts keep the plain name)

Fencing: a partitioned pod keeps running while its replacement resumes from the same directory (and a job submitted
again with the same output URI does the same). ``latest.json`` is the run's single compare-and-swap register: at
start rank 0 of each run :meth:`CheckpointManager.take_over` replaces it conditionally with generation G+1 (S3:
``PutObject`` with ``If-Match`` on the ETag it read, or ``If-None-Match: *`` when absent; local: under an exclusive
``flock``), and every later commit replaces it only if it is still the version this run last wrote. Once a newer run
has taken over, the older one's commit fails atomically (no check-then-write window), it stops with one line
(:class:`~dcv2_k8s.storage.Fenced`, exit 3, not retried) and its checkpoint never becomes the latest. Each
generation writes its own directories, so a stale writer's parts can never land in (or overwrite) a newer run's
checkpoint. A checkpoint without a manifest (a crash mid-save) is never loaded. A local directory without room for a
checkpoint is refused before it is written, and one that fills up while it is written loses that checkpoint
(its files are removed): either way one line (:class:`~dcv2_k8s.storage.DiskFull`, exit 2) and ``latest.json``
unchanged. Files load with
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

from dcv2_k8s.storage import (DiskFull, Fenced, LocalStorage, StorageError, free_bytes, is_disk_full, on_disk,
                              open_storage, size_text)

log = logging.getLogger("dcv2")

LATEST = "latest.json"  # the pointer to the newest committed checkpoint and the owner record of the directory


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
        if hasattr(self.store, "lock_wait"):  # a stuck writer's lock: one clear error before the peers' collectives
            self.store.lock_wait = min(self.store.lock_wait, max(1.0, commit_timeout / 2))  # time out on it
        self.root = root
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_every_epochs = keep_last, keep_every_epochs
        self.background, self.commit_timeout = background, commit_timeout
        self.retry_seconds = retry_seconds
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_result: dict = {}
        self.generation: int | None = None  # this run's: take_over() on rank 0, handed to the other ranks
        self._pointer_tag: str | None = None  # the version of latest.json this run last wrote (rank 0)
        self._pointer: dict = {}              # and its content

    @staticmethod
    def name_for(global_step: int) -> str:
        return f"step_{global_step:09d}"

    def dir_name(self, name: str) -> str:
        """The directory of checkpoint ``name`` for this run: generation 2 and later add ``-gNNNNNN``, so two
        generations never write the same files (generation 1, the first run of a directory, keeps the plain name)."""
        return f"{name}-g{self.generation:06d}" if self.generation and self.generation > 1 else name

    # ------------------------------------------------------------------------------------------------ fencing
    def take_over(self) -> int:
        """Rank 0, at start and before resuming: become the newest owner of the directory. Replaces latest.json
        (same checkpoint, generation + 1, this host and pid) with a compare-and-swap on the version just read, so
        that from now on any older run's commit fails. Returns this run's generation."""
        import socket

        ptr = self.store.join(LATEST)
        while True:
            cur = self.store.read_versioned(ptr)
            try:
                old = json.loads(cur[0]) if cur else {}
                old = old if isinstance(old, dict) else {}
            except ValueError:
                old = {}
            seen = int(old.get("generation", 0) or 0)
            if cur is None:  # latest.json lost or never written: stay above every generation that committed
                seen = max([seen] + [int(m.get("generation", 0) or 0) for m in self.committed()])
            pointer = {k: old[k] for k in ("name",) if k in old}
            pointer.update(generation=seen + 1, owner={"host": socket.gethostname(), "pid": os.getpid(),
                                                       "time": time.time()})
            data = json.dumps(pointer).encode()
            tag = self.store.put_if(ptr, data, cur[1] if cur else None) or self._ours(ptr, data)
            if tag is not None:
                break
            time.sleep(random.uniform(0.05, 0.2))  # another run or a commit got there first: read again
        self.generation, self._pointer_tag, self._pointer = seen + 1, tag, pointer
        if self.store.put_if(ptr, data, cur[1] if cur else None) is not None:  # a stale version must be refused
            log.warning("%s ignores conditional writes (If-Match / If-None-Match): a second writer of this directory "
                        "(a zombie pod) is not fenced out", self.root)
        log.info("%s: this run owns the checkpoint directory (generation %d)", self.root, self.generation)
        return self.generation

    def _ours(self, ptr: str, data: bytes) -> str | None:
        """The version of ``ptr`` when it holds ``data`` (a conditional write whose first try succeeded and whose
        retry was refused), else None."""
        cur = self.store.read_versioned(ptr)
        return cur[1] if cur and cur[0] == data else None

    def _fenced(self, name: str) -> Fenced:
        """The one line of a writer that a newer run has fenced out."""
        cur = self.store.read_versioned(self.store.join(LATEST))
        try:
            now = json.loads(cur[0]) if cur else {}
        except ValueError:
            now = {}
        owner = now.get("owner") or {}
        who = (f"generation {now['generation']}, {owner.get('host', '?')} pid {owner.get('pid', '?')}"
               if "generation" in now else "latest.json was replaced or deleted")
        return Fenced(f"{self.root}: a newer run took over this checkpoint directory ({who}); this run (generation "
                      f"{self.generation}) stops without committing {name}, which never becomes the latest. Exit "
                      f"3, not retried: the newer run owns the directory (stop it first to continue this one)")

    def still_owner(self) -> bool:
        """Whether latest.json is still the version this run last wrote (rank 0, after take_over)."""
        cur = self.store.read_versioned(self.store.join(LATEST))
        return cur is not None and cur[1] == self._pointer_tag

    def save(self, name: str, main_state: dict | None, bank_state: dict, meta: dict) -> None:
        """Snapshot this rank's part now; upload and (rank 0) commit in the background."""
        self.wait()
        if self.generation is None and self.rank == 0:
            self.take_over()
        name = self.dir_name(name)
        t0 = time.time()
        files = {f"bank_rank{self.rank:04d}.pt": to_bytes(bank_state)}
        if self.rank == 0:
            files["state.pt"] = to_bytes(main_state)
        snapshot_s = time.time() - t0
        self._check_space(name, files)
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
        """Write this rank's files and done marker (and commit on rank 0); idempotent, so it can be retried.

        A local directory that fills up while writing (another writer; one without room from the start is refused
        by :meth:`save`) loses what this checkpoint wrote: :class:`DiskFull` says what it needs and what is
        available, and ``latest.json`` still names the previous checkpoint."""
        ckpt = self.store.join(name)
        try:
            for fname, data in files.items():
                self.store.put_bytes(f"{ckpt}/{fname}", data)
            sizes = {f: len(d) for f, d in files.items()}
            self.store.put_bytes(f"{ckpt}/done_rank{self.rank:04d}.json", json.dumps(sizes).encode())
            if self.rank == 0:
                self._commit(name, meta)
        except (DiskFull, OSError) as e:  # DiskFull from put_bytes; a bare ENOSPC from anything else
            if not isinstance(e, DiskFull) and not is_disk_full(e):
                raise
            self._drop_uncommitted(name, files)
            raise self._disk_full(name, self._space_needed(files), True) from None

    def _check_space(self, name: str, files: dict[str, bytes]) -> None:
        """Refuse a checkpoint that a local directory has no room for, before anything is written (in the
        training thread: the run stops at this checkpoint, not one interval later)."""
        needed = self._space_needed(files)
        if needed and free_bytes(self.root) < needed:
            raise self._disk_full(name, needed, False)

    def _space_needed(self, files: dict[str, bytes]) -> int:
        """Bytes this rank's part takes on a local filesystem, with its markers (0: object storage)."""
        if not isinstance(self.store, LocalStorage):
            return 0
        markers = 3 if self.rank == 0 else 1  # done marker; rank 0: the manifest and the new latest.json too
        return sum(on_disk(len(d), self.root) for d in files.values()) + markers * on_disk(1, self.root)

    def _latest_name(self) -> str | None:
        try:
            return json.loads(self.store.get_bytes(self.store.join("latest.json")))["name"]
        except (OSError, ValueError, KeyError, StorageError):
            return None

    def _disk_full(self, name: str, needed: int, wrote: bool) -> DiskFull:
        free = free_bytes(self.root)
        prev = self._latest_name()
        keep = f"{prev} stays the newest checkpoint" if prev else "no checkpoint was committed yet"
        done = "what it wrote was removed" if wrote else "it was not written"
        return DiskFull(f"checkpoint {self.store.join(name)}: no space left on the device: it needs "
                        f"{size_text(needed)}{' on this rank' if self.world_size > 1 else ''}, {size_text(free)} "
                        f"available in {self.root}; {done} and {keep}. Free space, lower config.CHECKPOINT.KEEP_LAST "
                        "or point config.CHECKPOINT.DIR at a bigger volume, then start the run again (it resumes from "
                        "the newest checkpoint)", self.store.join(name), needed, free)

    def _drop_uncommitted(self, name: str, files: dict[str, bytes]) -> None:
        """Remove what this rank wrote of a checkpoint that could not be completed (rank 0: the manifest too,
        which ``latest.json`` does not name yet), and its directory once empty; never the checkpoint that
        ``latest.json`` names."""
        if not isinstance(self.store, LocalStorage) or name == self._latest_name():
            return
        ckpt = self.store.join(name)
        mine = [*files, f"done_rank{self.rank:04d}.json"] + (["manifest.json"] if self.rank == 0 else [])
        for fname in mine:
            try:
                os.remove(os.path.join(ckpt, fname))
            except OSError:
                pass
        try:
            os.rmdir(ckpt)
        except OSError:  # other ranks' parts are still there: theirs to remove
            pass

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
        pointer = dict(self._pointer, name=name)
        data = json.dumps(pointer).encode()
        ptr = self.store.join(LATEST)
        if not (self.still_owner() or self._ours(ptr, data)):  # fenced out already: no manifest either
            raise self._fenced(name)
        manifest = dict(meta, name=name, world_size=self.world_size, files=parts, time=time.time(),
                        generation=self.generation)
        self.store.put_bytes(f"{ckpt}/manifest.json", json.dumps(manifest, indent=1).encode())
        # the commit: latest.json replaced only if it is still the version this run last wrote (compare-and-swap)
        tag = self.store.put_if(ptr, data, self._pointer_tag) or self._ours(ptr, data)
        if tag is None:
            raise self._fenced(name)
        self._pointer_tag, self._pointer = tag, pointer
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
        """Committed checkpoints, oldest first: by generation (older layouts: 0), then step. A fenced-out run's
        late checkpoints sort before every checkpoint of the run that took over."""
        out = []
        for d in self.store.list_dirs(self.root):
            if d.startswith("step_"):
                m = self._manifest(d)
                if m is not None:
                    out.append(m)
        return sorted(out, key=lambda m: (int(m.get("generation", 0) or 0), int(m.get("global_step", 0) or 0),
                                          m["name"]))

    def latest(self) -> dict | None:
        """The manifest of the newest committed checkpoint, or None."""
        ptr = self.store.join(LATEST)
        if self.store.exists(ptr):
            try:
                pointer = json.loads(self.store.get_bytes(ptr))
                if "name" not in pointer:  # a run took the directory over before any checkpoint was committed
                    found = self.committed()
                    return found[-1] if found else None
                m = self._manifest(pointer["name"])
                if m is not None:
                    return m
            except (ValueError, KeyError, OSError, TypeError):
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
        if self._pointer_tag is not None and not self.still_owner():  # a newer run owns the directory now
            return
        keep = {m["name"] for m in found[-self.keep_last:]}
        if self.keep_every_epochs > 0:
            keep |= {m["name"] for m in found if m.get("epoch_end") and m["epoch"] % self.keep_every_epochs == 0}
        for m in found:
            if m["name"] not in keep:
                self.store.delete_tree(self.store.join(m["name"]))
