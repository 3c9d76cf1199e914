"""Stage a dataset from object storage (or a local path) into a local ImageFolder: ``dcv2 stage SRC DEST``.

Sources: ImageFolder objects, tar archives (per class, ``CLASS/IMAGE`` shards, nested, gzipped), flat validation
sets with a labels file, WebDataset shards; a prefix, one object or a local path (the table of source layouts: see
docs/staging.md).

This module is the orchestration: list the source and plan, run the transfers (SIGINT/SIGTERM cancel them; staging
again resumes), and coordinate the processes of a node (:func:`ensure_local`). The jobs it hands out:
``layout`` (the staged directory: manifest, resume state, verify and repair), ``labels`` (classes of images),
``archive`` (tar/WebDataset members to ``CLASS/IMAGE`` files), ``fetch`` (reading objects, ranged and in
parallel) and ``progress`` (progress lines).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import signal
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable

from dcv2_k8s.data.archive import NestedDone, UnsafeArchive, count_bytes, group_samples, members, to_files
from dcv2_k8s.data.fetch import READ_AHEAD, Cancelled, RangedReader, read_whole
from dcv2_k8s.data.labels import Classes, load_class_names, load_labels
from dcv2_k8s.data.layout import (MARKER, SPLIT_NAMES, Changes, NoSpace, StageError, StageState, Work,
                                  build_manifest, check_dest, commit, is_archive, is_image, is_staged_copy,
                                  matches_etag, plan_work, read_manifest, remove_strays, remove_written,
                                  validate_result)
from dcv2_k8s.data.progress import Progress
from dcv2_k8s.plural import count
from dcv2_k8s.storage import DiskFull, StorageError, free_bytes, is_disk_full, on_disk, open_storage, size_text



class Interrupted(Exception):
    """SIGINT or SIGTERM: queued transfers were cancelled; staging again resumes."""

    def __init__(self, signum: int, done: int, total: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}: {done} of {total} source objects staged; "
                         "run the same command again to resume")
        self.signum = signum


@dataclass(frozen=True)
class StageOptions:
    """How to stage. ``workers``: parallel transfers; ``progress``: a bar (a terminal), otherwise one log line every
    ``log_every`` seconds; ``checksum``: check staged files by MD5 (else by size) when resuming and repairing;
    ``labels``: the labels file of flat images; ``class_names``: a WebDataset's class-name list; ``replace``: DEST
    holds another source: delete it; ``on_event(kind, **values)``: told ``start`` (bytes, objects), each finished
    ``object`` (bytes, files) and ``done`` (the staging progress metrics use it)."""

    workers: int = 16
    progress: bool = True
    checksum: bool = True
    labels: str = ""
    class_names: str = ""
    replace: bool = False
    log_every: float = 30.0
    on_event: Callable[..., None] | None = None

    def notify(self, kind: str, **values) -> None:
        if self.on_event is not None:
            self.on_event(kind, **values)


@dataclass
class Source:
    """A listed and planned source: its root, its images and archives by key (relative to the root), the keys
    ignored (neither images nor archives), and how images get their classes."""

    uri: str
    root: str
    by_key: dict[str, dict]
    ignored: list[str]
    classes: Classes


# ------------------------------------------------------------------------------------------- list and plan
def list_source(src: str) -> tuple[str, list[dict]]:
    """``(root, objects)``: the source's objects with keys relative to ``root``; a single object or file is its own
    source. Raises StageError (before anything is written) when there is nothing."""
    store = open_storage(src)
    objects = store.list_objects(src)
    if objects:
        return src.rstrip("/") or "/", objects
    head = store.head(src.rstrip("/"))
    if head is None:
        raise _nothing_at(src)
    root, name = posixpath.split(src.rstrip("/"))
    return root or ".", [{"Key": name, "Size": int(head["ContentLength"]), "ETag": head.get("ETag", "").strip('"')}]


def _nothing_at(src: str) -> StageError:
    if src.startswith("s3://"):
        return StageError(f"{src}: no objects under this prefix and no object of this name; check the URI "
                          "(aws s3 ls) and upload the dataset first")
    if Path(src).is_dir():
        return StageError(f"{src}: the directory is empty")
    return StageError(f"{src}: no such file or directory (give an s3://bucket/prefix, an s3:// object or a local "
                      "path)")


def plan(src: str, objects: list[dict], labels: dict | None) -> tuple[list[dict], list[dict], list[str]]:
    """``(images, archives, ignored keys)``; refuses a dataset root (split directories) and flat images without
    labels."""
    visible = [o for o in objects if not any(part.startswith(".") for part in PurePosixPath(o["Key"]).parts)]
    images = [o for o in visible if is_image(o["Key"])]
    archives = [o for o in visible if is_archive(o["Key"])]
    ignored = [o["Key"] for o in visible if not is_image(o["Key"]) and not is_archive(o["Key"])]
    tops = {PurePosixPath(o["Key"]).parts[0].lower() for o in images if len(PurePosixPath(o["Key"]).parts) >= 2}
    tops |= {PurePosixPath(o["Key"]).parts[0].lower() for o in archives if len(PurePosixPath(o["Key"]).parts) >= 2}
    splits = sorted(tops & SPLIT_NAMES)
    if splits:
        raise StageError(f"{src} holds the dataset's splits ({', '.join(splits)}), not classes: stage each split "
                         f"on its own, e.g. dcv2 stage {src.rstrip('/')}/{splits[0]} DEST/{splits[0]}")
    flat = [o for o in images if len(PurePosixPath(o["Key"]).parts) == 1]
    if flat and labels is None:
        raise StageError(f"{src}: {len(flat)} images without class folders (e.g. {flat[0]['Key']}); pass --labels "
                         "(LOC_val_solution.csv, the ILSVRC 2012 devkit, or an IMAGE,CLASS file)")
    if not images and not archives:
        raise StageError(f"{src}: no images or archives among {len(visible)} objects (e.g. "
                         f"{visible[0]['Key'] if visible else '-'}); expected CLASS/IMAGE files or .tar archives")
    return images, archives, ignored


def open_source(src: str, opts: StageOptions) -> Source:
    """List ``src``, read its labels files and plan it; refuses (StageError) before anything is written."""
    root, objects = list_source(src)
    label_map = load_labels(opts.labels) if opts.labels else None
    names = load_class_names(opts.class_names) if opts.class_names else None
    images, archives, ignored = plan(src, objects, label_map)
    per_class = len(archives) > 1 and label_map is None
    classes = Classes(root, label_map, names, per_class)
    for o in images:  # a flat image object without its label is refused here, not halfway through the transfers
        if len(PurePosixPath(o["Key"]).parts) == 1:
            classes.of_image(o["Key"], "")
    return Source(src, root, {o["Key"]: o for o in images + archives}, ignored, classes)


# ------------------------------------------------------------------------------------------- stage
def stage(src: str, dest: str, options: StageOptions | None = None, **overrides) -> dict:
    """Stage ``src`` into ``dest`` (resumable, repairs, refuses what is wrong); return the manifest.

    ``options`` (or its fields as keywords, e.g. ``workers=8, progress=False``): see :class:`StageOptions`.
    SIGINT/SIGTERM (main thread) cancel the queued transfers and raise :class:`Interrupted` within seconds.
    A refusal (StageError) leaves DEST as it found it; an interruption or a storage failure keeps the resume state.
    A DEST without room for what is left to stage is refused up front (:class:`NoSpace`); one that fills up on the
    way (another writer) stops with :class:`DiskFull` and keeps what was staged, so staging again resumes.
    """
    opts = replace(options or StageOptions(), **overrides)
    source = open_source(src, opts)                      # nothing is created before the source is known
    dest_p = Path(dest)
    state, changes = _open_dest(dest_p, src, opts)
    work = prog = None
    try:
        work = plan_work(state, source.by_key, dest_p, opts.checksum, opts.workers)
        check_space(source, work, state, dest_p)
        prog = _announce(source, work, opts)
        _transfer(source, work, state, prog, dest_p, opts, changes)
        return _finish(source, work, state, prog, dest_p, opts)
    except StageError as e:
        try:
            changes.take_back()
        except OSError as err:  # no room to put the marker back: the copy reads as unfinished until staged again
            if not (isinstance(e, NoSpace) and is_disk_full(err)):
                raise
        raise
    except OSError as e:
        if not is_disk_full(e):
            raise
        _save_if_room(state)
        raise _disk_full(source, work, prog, dest_p) from None


def _objects_left(source: Source, work: Work, state: StageState, dest: Path) -> int:
    """Bytes the work still writes into DEST: image objects (not those whose file of that size is already there,
    written before a failure the resume state missed: rewriting one takes no more room), the rest of each archive
    past the resume state's offset (a compressed one counts by its compressed size), the repairs."""
    need = 0
    for o in work.todo:
        key = o["Key"]
        if is_archive(key):
            plain = key.lower().endswith(".tar")  # a compressed stream is read again from its start
            done = max((v["end"] for v in state.partial_of(key).values()), default=0) if plain else 0
            need += max(0, o["Size"] - done)
        else:
            out = dest / (key if len(PurePosixPath(key).parts) >= 2 else f"{source.classes.of_image(key, '')}/{key}")
            if not (out.is_file() and out.stat().st_size == o["Size"]):
                need += on_disk(o["Size"], str(dest))
    return need + sum(source.by_key[k]["Size"] for k in work.repairs)


def check_space(source: Source, work: Work, state: StageState, dest: Path) -> None:
    """Refuse (:class:`NoSpace`, before anything is written) a DEST whose filesystem has less room available than
    what is left to stage, and the manifest and resume state (about 200 bytes a file, twice)."""
    files = len(state.data["files"]) + len(work.todo)
    needed = _objects_left(source, work, state, dest) + 2 * on_disk(200 * files, str(dest))
    free = free_bytes(str(dest))
    if free < needed:
        raise NoSpace(f"{dest}: not enough space: staging {source.uri} needs {size_text(needed)} more "
                      f"({count(work.objects, 'object')} to fetch), {size_text(free)} available; free space or "
                      "choose a DEST on a bigger volume, then run the same command again", str(dest), needed, free)


def _save_if_room(state: StageState) -> None:
    """Save the resume state after a failure, unless the disk is too full for it (the last saved one stays)."""
    try:
        state.save()
    except OSError as e:
        if not is_disk_full(e):
            raise


def _disk_full(source: Source, work: Work | None, prog: Progress | None, dest: Path) -> DiskFull:
    """DEST filled up while staging (another writer, or a compressed archive larger than it looked)."""
    free = free_bytes(str(dest))
    total = len(source.by_key)
    done = (work.skipped if work else 0) + (prog.done_objects if prog else 0)
    left = max(0, prog.total - prog.bytes) if prog else 0
    rest = f"the rest needs about {size_text(left)}" if left else "the manifest still needs writing"
    return DiskFull(f"{dest}: no space left on the device after staging {done} of {count(total, 'object')}; {rest}, "
                    f"{size_text(free)} available. Free space (or choose a DEST on a bigger volume) and run the same "
                    "command again: it resumes", str(dest), left, free)


def _open_dest(dest: Path, src: str, opts: StageOptions) -> tuple[StageState, Changes]:
    """Refuse a DEST holding another source, create it and drop its completion marker; the resume state (a
    complete earlier staging is adopted, to be verified and repaired) and the record of what this run adds."""
    changes = Changes(dest, replaced=check_dest(dest, src, opts.labels, opts.replace))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MARKER).unlink(missing_ok=True)
    state = StageState(dest, src, opts.labels)
    state.adopt(read_manifest(dest))
    return state, changes


def _announce(source: Source, work: Work, opts: StageOptions) -> Progress:
    total = work.bytes(source.by_key)
    opts.notify("start", bytes=total, objects=work.objects)
    prog = Progress(total, work.objects, opts.progress, opts.log_every)
    if source.ignored:
        print(f"stage: ignoring {count(len(source.ignored), 'object')} that are neither images nor archives (e.g. "
              f"{source.ignored[0]})", file=sys.stderr, flush=True)
    if work.damaged:
        print(f"stage: {count(work.damaged, 'file')} missing or damaged; fetching again", file=sys.stderr, flush=True)
    return prog


def _transfer(source: Source, work: Work, state: StageState, prog: Progress, dest: Path, opts: StageOptions,
              changes: Changes) -> None:
    """Run the work, ``opts.workers`` objects at a time (big archives first). SIGINT/SIGTERM cancel the queued
    transfers and raise Interrupted; on any way out but success the state is saved, so staging again resumes."""
    cancel = threading.Event()
    io_pool = ThreadPoolExecutor(max_workers=max(2, min(READ_AHEAD * 2, opts.workers)), thread_name_prefix="dcv2-range")
    pool = ThreadPoolExecutor(max_workers=max(1, opts.workers), thread_name_prefix="dcv2-stage")
    stager = _Stager(source, dest, state, prog, cancel, io_pool, changes)
    with _cancel_on_signals(cancel) as got:
        try:
            _await(_submit(pool, stager, work, source.by_key), cancel, got, work, source.by_key, opts)
        except BaseException:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            io_pool.shutdown(wait=True, cancel_futures=True)
            prog.close()
            _save_if_room(state)
            raise
    pool.shutdown(wait=True)
    io_pool.shutdown(wait=True)
    prog.close()


@contextmanager
def _cancel_on_signals(cancel: threading.Event):
    """SIGINT and SIGTERM set ``cancel`` while in the block (the main thread only: no other can handle signals);
    yields the list of signals received."""
    got: list[int] = []

    def on_signal(signum, frame):
        got.append(signum)
        cancel.set()

    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield got
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _submit(pool: ThreadPoolExecutor, stager: _Stager, work: Work, by_key: dict[str, dict]) -> dict:
    """Future -> object key: the repairs, then the objects to stage, biggest first (they take longest)."""
    futures = {}
    for key, members_ in work.repairs.items():
        futures[pool.submit(stager.archive_object, by_key[key], members_)] = key
    for o in sorted(work.todo, key=lambda o: -o["Size"]):
        fn = stager.archive_object if is_archive(o["Key"]) else stager.image_object
        futures[pool.submit(fn, o)] = o["Key"]
    return futures


def _await(futures: dict, cancel: threading.Event, got: list[int], work: Work, by_key: dict[str, dict],
           opts: StageOptions) -> None:
    """Wait for the transfers, telling ``on_event`` of each finished object; once cancelled, drop the queued ones
    and raise Interrupted."""
    done = 0
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        for f in finished:
            try:
                f.result()
            except Cancelled:
                continue
            done += 1
            opts.notify("object", bytes=by_key[futures[f]]["Size"], files=1)
        if cancel.is_set():
            for f in pending:
                f.cancel()
            wait(pending, timeout=30)
            raise Interrupted(got[0] if got else signal.SIGINT, work.skipped + done, len(by_key))


def _finish(source: Source, work: Work, state: StageState, prog: Progress, dest: Path, opts: StageOptions) -> dict:
    """Refuse a result that would train wrong (before anything is removed), remove what the source does not have,
    write the manifest and the completion marker."""
    files = {rel: v for rel, v in state.data["files"].items() if v[2] in source.by_key}
    validate_result(dest, files, source.uri)
    removed = remove_strays(dest, files)
    manifest = build_manifest(source.uri, opts.labels, files, {k: state.data["objects"][k] for k in source.by_key},
                              skipped=work.skipped, transferred=len(work.todo), repaired=len(work.repairs),
                              removed=removed, bytes=work.bytes(source.by_key))
    commit(dest, manifest)
    if not opts.progress:
        print(prog.line(), file=sys.stderr, flush=True)
    opts.notify("done")
    return manifest


# ------------------------------------------------------------------------------------------- one object
class _Stager:
    """Stages one source object (called from the transfer pool): an image, or an archive streamed into DEST."""

    def __init__(self, source: Source, dest: Path, state: StageState, progress: Progress, cancel: threading.Event,
                 io_pool: ThreadPoolExecutor, changes: Changes):
        self.source, self.dest, self.state, self.progress = source, dest, state, progress
        self.cancel, self.io_pool, self.changes = cancel, io_pool, changes
        self.store = open_storage(source.root)

    def path_of(self, key: str) -> str:
        return f"{self.source.root.rstrip('/')}/{key}"

    def write(self, rel: str, data: bytes, files: dict) -> None:
        files[rel] = self.changes.write(rel, data)
        self.progress.add(files=1)

    def image_object(self, o: dict) -> None:
        key = o["Key"]
        rel = key if len(PurePosixPath(key).parts) >= 2 else f"{self.source.classes.of_image(key, '')}/{key}"
        files: dict = {}
        if matches_etag(self.dest / rel, o["Size"], o.get("ETag", "")):
            files[rel] = [o["Size"], o["ETag"]]  # written before an interruption, not yet in the saved state
            self.progress.add(files=1)
        else:
            self.write(rel, read_whole(self.store, self.path_of(key), self.cancel), files)
        self.state.add_files(key, files)
        self.progress.add(nbytes=o["Size"], objects=1)
        self.state.finish(key, o)

    def archive_object(self, o: dict, only: set[str] | None = None) -> None:
        """Stream one archive into DEST, from where an interrupted staging stopped. ``only``: re-extract just these
        inner members (a repair): of a plain tar by their recorded byte spans, else the whole archive again."""
        key = o["Key"]
        spans = self._recorded_spans(key, only)
        if spans:
            for lo, hi in spans:
                self._stream(key, lo, hi, only)
            self.state.drop_partial(key)
        else:
            self._stream(key, self._resume_offset(key) if only is None else 0, o["Size"], None)
            self.state.finish(key, o, self.state.partial_of(key))
        self.progress.add(objects=1)

    def _recorded_spans(self, key: str, only: set[str] | None) -> list[tuple[int, int]]:
        if only is None or not key.lower().endswith(".tar"):
            return []
        rec = self.state.data["objects"].get(key, {}).get("members", {})
        return sorted((rec[m]["start"], rec[m]["end"]) for m in only if m in rec)

    def _resume_offset(self, key: str) -> int:
        """The end of a plain tar's last finished member (a compressed stream is read from its start)."""
        if not key.lower().endswith(".tar"):
            return 0
        return max((v["end"] for v in self.state.partial_of(key).values()), default=0)

    def _stream(self, key: str, lo: int, hi: int, only: set[str] | None) -> None:
        """Extract bytes ``[lo, hi)`` of the archive ``key`` into DEST; what a refused (unsafe) archive wrote is
        removed again."""
        reader = RangedReader(self.store, self.path_of(key), lo, hi, self.cancel, self.io_pool)
        written: dict[str, dict] = {"": {}}  # nested archive ("": none) -> its files written
        try:
            self._extract(io.BufferedReader(reader, buffer_size=1 << 20), key, lo, hi, only, written)
        except UnsafeArchive:
            for files in written.values():
                remove_written(self.dest, files)
            raise
        except tarfile.TarError as e:
            raise StageError(f"{self.path_of(key)}: not a readable tar archive ({e}); check the object") from None
        finally:
            reader.close()
        if written[""]:
            self.state.member_done(key, "", lo, hi, written[""])

    def _extract(self, stream, key: str, lo: int, hi: int, only: set[str] | None, written: dict) -> None:
        """members -> bytes read (progress) -> WebDataset samples -> files written, nested archives recorded."""
        items = group_samples(count_bytes(members(stream, key, lo, self.cancel), lo, hi,
                                          lambda n: self.progress.add(nbytes=n)), key)
        for out in to_files(items, key, only, self.source.classes.of_sample):
            if isinstance(out, NestedDone):
                self.state.member_done(key, out.name, out.start, out.end, written.get(out.name, {}))
            else:
                self.write(out.rel, out.data, written.setdefault(out.nested, {}))


# ------------------------------------------------------------------------------------------- a node's processes
def wait_for_marker(dest: str, timeout: float) -> None:
    """Other local ranks wait for local rank 0's staging to finish (bounded)."""
    deadline = time.time() + timeout
    while not (Path(dest) / MARKER).exists():
        if time.time() > deadline:
            raise StorageError(f"{dest}: staging by local rank 0 did not finish within {timeout:.0f} s")
        time.sleep(1.0)


def default_stage_dir(uri: str) -> str:
    return os.path.join(tempfile.gettempdir(), "dcv2-data", hashlib.sha1(uri.encode()).hexdigest()[:12])


def ensure_local(uri: str, stage_dir: str = "", local_rank: int = 0, timeout: float = 3600.0,
                 progress: bool = True, labels: str = "") -> str:
    """A local directory holding ``uri``: the path itself, or a staged copy of an ``s3://`` source.

    Only local rank 0 stages; the other processes of the node wait for its completion marker (bounded). A
    complete staged copy of the same source is reused (staging is idempotent and resumable anyway); local rank 0
    logs where it is and how old, and, when the source cannot be reached (or the store is misconfigured), warns
    that it falls back to that copy, with the store's one-line error.
    """
    import logging

    if not uri.startswith("s3://"):
        return uri
    log = logging.getLogger("dcv2")
    dest = stage_dir or default_stage_dir(uri)
    if is_staged_copy(Path(dest), uri):
        if local_rank == 0:
            hours = (time.time() - (Path(dest) / MARKER).stat().st_mtime) / 3600
            age = f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours" if hours >= 1 else \
                f"{hours * 60:.0f} minutes"
            try:
                open_storage(uri).check()
            except StorageError as e:
                log.warning("%s; falling back to the copy of %s staged at %s %s ago (it may be out of date)", e, uri,
                            dest, age)
                return dest
            log.info("data: %s, staged at %s %s ago (reused; delete it to stage again)", uri, dest, age)
        return dest
    if local_rank == 0:
        log.info("data: staging %s to %s", uri, dest)
        stage(uri, dest, progress=progress, labels=labels)
    else:
        wait_for_marker(dest, timeout)
    return dest
