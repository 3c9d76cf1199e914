"""What a staged directory is: its files, manifest, marker and resume state.

What a staged directory is: ``DEST/CLASS/IMAGE`` files, the manifest, the completion marker and the resume
state; checking a directory against its manifest (verify) and finding what to fetch again (repair).

- ``DEST/.dcv2_manifest.json`` (:data:`MANIFEST`, written last): every file with its size and MD5, the source, the
  labels and what each source object produced. The dataset reads its file list from it.
- ``DEST/.dcv2_staged`` (:data:`MARKER`): the staging is complete.
- ``DEST/.dcv2_stage_state.json`` (:data:`STATE`): an unfinished staging: finished objects, every file written, and
  finished members of a streamed archive with their byte spans.

Files are written atomically (``.NAME.part``, then renamed). Staging again verifies every file (MD5, or size only),
fetches again only what is missing or damaged (for a plain tar, only the inner members concerned, by byte range),
removes files the source does not have, and refuses a ``DEST`` that holds another source unless asked to replace it.
A staging refused once it has begun writing (:class:`Changes`) takes back what it added, so the command its message
suggests starts from the ``DEST`` the refused one found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dcv2_k8s.storage import DiskFull, StorageError
from dcv2_k8s.plural import count

MANIFEST = ".dcv2_manifest.json"
MARKER = ".dcv2_staged"
STATE = ".dcv2_stage_state.json"
SPLIT_NAMES = {"train", "val", "valid", "validation", "test"}  # directory names of a dataset's splits, not classes
REPLACED = ".dcv2_replaced"  # what --replace found in DEST, kept aside until the new copy is committed
MANIFEST_VERSION = 2
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ARCHIVES = (".tar", ".tar.gz", ".tgz")


class StageError(StorageError):
    """A source, labels file or destination that cannot be staged as asked (one line: what and what to pass)."""


class NoSpace(StageError, DiskFull):
    """DEST's filesystem has less space available than the staging needs: refused before anything is written."""


# ------------------------------------------------------------------------------------------- file kinds
def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def is_archive(key: str) -> bool:
    return key.lower().endswith(ARCHIVES)


def archive_stem(key: str) -> str:
    """The archive's file name without its extension (a per-class tar's class)."""
    name = PurePosixPath(key).name
    for ext in ARCHIVES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_file(dest: Path, rel: str, data: bytes) -> list:
    """Write ``DEST/rel`` atomically (``.NAME.part``, then renamed); its ``[size, md5]``."""
    out = dest / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:  # a full disk: no partial file is left behind (nor its space taken)
        tmp.unlink(missing_ok=True)
        raise
    return [len(data), md5_bytes(data)]


def matches_etag(path: Path, size: int, etag: str) -> bool:
    """A file written before an interruption (not yet in the saved state): its size and MD5 equal the object's
    single-part ETag."""
    return path.is_file() and path.stat().st_size == size and len(etag) == 32 and "-" not in etag \
        and file_md5(str(path)) == etag


def intact(path: Path, size: int, md5: str, checksum: bool) -> bool:
    try:
        if path.stat().st_size != size:
            return False
    except OSError:
        return False
    return not checksum or file_md5(str(path)) == md5


# ------------------------------------------------------------------------------------------- resume state
class StageState:
    """What has been staged so far (thread-safe): finished objects, every file written (size, MD5, the object it
    came from) and finished members of streamed archives with their byte spans. Saved at most every
    ``SAVE_EVERY`` seconds and when staging is interrupted (SIGINT/SIGTERM); what was not saved yet (after a kill)
    is found on disk again (size and MD5 against the object's ETag) or fetched again."""

    SAVE_EVERY = 20.0

    def __init__(self, dest: Path, source: str, labels: str):
        self.path = dest / STATE
        self.lock = threading.Lock()        # the data
        self.save_lock = threading.Lock()   # one writer of the file at a time
        self.data = {"source": source, "labels": labels, "objects": {}, "files": {}, "partial": {}}
        self.saved = 0.0
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("source") == source and old.get("labels") == labels and "files" in old:
                self.data = old

    def save(self, force: bool = True) -> None:
        """Write the state (at most every SAVE_EVERY seconds unless ``force``); the snapshot is taken under the
        lock, serialised outside it, so the transfers are not held up by a large state."""
        if not force and time.time() - self.saved < self.SAVE_EVERY:
            return
        with self.save_lock:
            with self.lock:
                if not force and time.time() - self.saved < self.SAVE_EVERY:
                    return
                self.saved = time.time()
                snap = {"source": self.data["source"], "labels": self.data["labels"],
                        "objects": dict(self.data["objects"]), "files": dict(self.data["files"]),
                        "partial": {k: dict(v) for k, v in self.data["partial"].items()}}
            tmp = self.path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(snap))
                os.replace(tmp, self.path)
            except BaseException:  # a full disk: the state saved before stays, whole
                tmp.unlink(missing_ok=True)
                raise

    def adopt(self, manifest: dict) -> None:
        """Start from a complete earlier staging of the same source (to verify it and repair it), unless this
        state already records objects."""
        if manifest.get("version") == MANIFEST_VERSION and manifest.get("source") == self.data["source"] \
                and manifest.get("labels", "") == self.data["labels"] and not self.data["objects"]:
            self.data["objects"] = manifest["objects"]
            self.data["files"] = {rel: [size, md5, key] for rel, size, md5, key in manifest["files"]}

    def keep_only(self, keys) -> None:
        """Forget objects (and their files) the source no longer has."""
        self.data["objects"] = {k: v for k, v in self.data["objects"].items() if k in keys}
        self.data["files"] = {rel: v for rel, v in self.data["files"].items() if v[2] in keys}

    def restart(self, keys: set[str]) -> None:
        """Forget what these objects produced: they changed in the source and are staged again from the start."""
        self.data["files"] = {rel: v for rel, v in self.data["files"].items() if v[2] not in keys}
        for k in keys:
            self.data["objects"].pop(k, None)
            self.data["partial"].pop(k, None)

    def partial_of(self, key: str) -> dict:
        """Finished members of an unfinished archive: member -> {start, end}."""
        with self.lock:
            return dict(self.data["partial"].get(key, {}))

    def drop_partial(self, key: str) -> None:
        with self.lock:
            self.data["partial"].pop(key, None)

    def add_files(self, key: str, files: dict) -> None:
        with self.lock:
            for rel, (size, md5) in files.items():
                self.data["files"][rel] = [size, md5, key]

    def finish(self, key: str, obj: dict, members: dict | None = None) -> None:
        with self.lock:
            rec = {"size": obj["Size"], "etag": obj["ETag"]}
            if members:
                rec["members"] = members
            self.data["objects"][key] = rec
            self.data["partial"].pop(key, None)
        self.save(force=False)

    def member_done(self, key: str, member: str, start: int, end: int, files: dict) -> None:
        self.add_files(key, files)
        with self.lock:
            self.data["partial"].setdefault(key, {})[member] = {"start": start, "end": end}
        self.save(force=False)


# ------------------------------------------------------------------------------------------- repair
@dataclass
class Work:
    """What one staging run does: objects to stage whole (new, changed, unfinished or damaged outside a plain
    tar), plain tars to repair (the inner members to extract again), and how many objects are complete already."""

    todo: list[dict]
    repairs: dict[str, set[str]]
    skipped: int
    damaged: int      # files missing or damaged

    @property
    def objects(self) -> int:
        return len(self.todo) + len(self.repairs)

    def bytes(self, by_key: dict[str, dict]) -> int:
        return sum(o["Size"] for o in self.todo) + sum(by_key[k]["Size"] for k in self.repairs)


def plan_work(state: StageState, by_key: dict[str, dict], dest: Path, checksum: bool, workers: int) -> Work:
    """Compare the state (or an adopted manifest) with the source and with DEST; ``state`` is left holding only
    what is still good."""
    state.keep_only(by_key)
    changed = _changed_objects(state, by_key)
    state.restart({k for k in changed if k in state.data["objects"]})  # the source object changed: start it over
    bad_by_key = damaged_files(dest, {rel: v for rel, v in state.data["files"].items() if v[2] not in changed},
                               checksum, workers)
    todo = [by_key[k] for k in sorted(changed)]
    repairs: dict[str, set[str]] = {}
    for key, bad in bad_by_key.items():
        members = state.data["objects"][key].get("members", {})
        if key.lower().endswith(".tar") and any(m for m in members):
            repairs[key] = {m for m in members if m and any(_member_of(rel, m) for rel in bad)}
        else:
            todo.append(by_key[key])
            state.data["objects"].pop(key, None)
    return Work(todo, repairs, len(by_key) - len(todo) - len(repairs), sum(map(len, bad_by_key.values())))


def _changed_objects(state: StageState, by_key: dict[str, dict]) -> set[str]:
    """New objects, and objects whose size or ETag differ from what was staged."""
    return {k for k, o in by_key.items() if (rec := state.data["objects"].get(k)) is None
            or rec["size"] != o["Size"] or (o["ETag"] and rec["etag"] != o["ETag"])}


def damaged_files(dest: Path, files: dict, checksum: bool, workers: int) -> dict[str, list[str]]:
    """Source object -> its files in DEST that are missing or damaged (size, or MD5 with ``checksum``)."""
    checks = list(files.items())
    with ThreadPoolExecutor(max_workers=max(1, min(workers, 32))) as pool:
        ok = list(pool.map(lambda rv: intact(dest / rv[0], rv[1][0], rv[1][1], checksum), checks))
    bad: dict[str, list[str]] = {}
    for (rel, v), good in zip(checks, ok):
        if not good:
            bad.setdefault(v[2], []).append(rel)
    return bad


def _member_of(rel: str, member: str) -> bool:
    return PurePosixPath(rel).parts[0] == archive_stem(member)


def remove_strays(dest: Path, files: dict) -> int:
    """Delete files under DEST's class folders that the source does not have (and leftover partial files)."""
    removed = 0
    for p in list(dest.rglob("*")):
        rel = p.relative_to(dest)
        if not p.is_file() or len(rel.parts) < 2:
            continue
        name = rel.parts[-1]
        if name.startswith(".") and name.endswith(".part"):
            p.unlink()
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        if str(rel) not in files:
            p.unlink()
            removed += 1
    if removed:
        print(f"stage: removed {count(removed, 'file')} the source does not have", file=sys.stderr, flush=True)
    return removed


def remove_written(dest: Path, files: dict) -> None:
    """Undo what a refused archive wrote: its files, and the folders it created for them (left when not empty)."""
    for rel in files:
        (dest / rel).unlink(missing_ok=True)
        d = (dest / rel).parent
        while d != dest:
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent


class Changes:
    """What one staging run adds to DEST, to take back when the run is refused (a StageError): the files it
    created and their class folders, DEST and the folders above it when it created them, and the resume state and
    completion marker as they were (the marker only while no file it vouches for was written over)."""

    def __init__(self, dest: Path, replaced: bool = False):
        self.dest = dest
        self.replaced = replaced     # check_dest moved DEST's entries aside for this run (--replace)
        self.made: list[Path] = []   # DEST and the missing folders above it, innermost first
        p = dest
        while not p.exists() and p != p.parent:
            self.made.append(p)
            p = p.parent
        self.kept = {name: (dest / name).read_bytes() for name in (STATE, MARKER) if (dest / name).is_file()}
        self.created: set[str] = set()
        self.overwrote = False
        self.lock = threading.Lock()

    def write(self, rel: str, data: bytes) -> list:
        """:func:`write_file`, remembering whether the file is new."""
        new = not (self.dest / rel).exists()
        out = write_file(self.dest, rel, data)
        with self.lock:
            if new:
                self.created.add(rel)
            else:
                self.overwrote = True
        return out

    def take_back(self) -> None:
        if self.made:
            shutil.rmtree(self.dest, ignore_errors=True)
            for p in self.made[1:]:
                try:
                    p.rmdir()
                except OSError:
                    break
            return
        remove_written(self.dest, self.created)
        (self.dest / STATE).with_suffix(".tmp").unlink(missing_ok=True)
        for name in (STATE, MARKER):
            if name in self.kept and not (name == MARKER and self.overwrote):
                (self.dest / name).write_bytes(self.kept[name])
            else:
                (self.dest / name).unlink(missing_ok=True)
        aside = self.dest / REPLACED
        if self.replaced and aside.is_dir():  # what this run's --replace moved aside: back where it was
            for p in aside.iterdir():
                os.replace(p, self.dest / p.name)
            aside.rmdir()


# ------------------------------------------------------------------------------------------- DEST
def check_dest(dest: Path, source: str, labels: str, replace: bool) -> bool:
    """Refuse a DEST that holds another source (or other files), unless ``replace``: then its entries are moved
    aside into ``DEST/.dcv2_replaced`` (True)."""
    if not dest.exists():
        return False
    owner = None
    for name in (STATE, MANIFEST):
        if (dest / name).exists():
            try:
                d = json.loads((dest / name).read_text())
                owner = (d.get("source"), d.get("labels", ""))
            except ValueError:
                owner = ("?", "")
            break
    entries = [p for p in dest.iterdir() if p.name != "lost+found"]  # a freshly formatted volume has one
    if owner is None and not entries:
        return False
    if owner == (source, labels):
        loose = sorted(p.name for p in entries if not p.name.startswith(".") and not p.is_dir())
        if loose:
            kind = "an archive left unextracted" if is_archive(loose[0]) else "a file outside class folders"
            raise StageError(f"{dest}: {kind}: {loose[0]} ({len(loose)} such); remove it or stage into an empty "
                             "DEST")
        return False
    if not replace:
        what = f"a copy of {owner[0]}" + (f" (labels {owner[1]})" if owner[1] else "") if owner else \
            f"{len(entries)} entries not staged by dcv2"
        raise StageError(f"{dest} holds {what}; choose another DEST, or pass --replace to delete it and stage "
                         f"{source} there")
    # replaced: moved aside, deleted once the new copy is committed (commit), moved back if this run is refused
    # (Changes.take_back); an aside left by an earlier --replace that never finished is what --replace deletes
    aside = dest / REPLACED
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for p in entries:
        if p.name != REPLACED:
            os.replace(p, aside / p.name)
    return True


def validate_result(dest: Path, files: dict, src: str) -> None:
    """Refuse what would train or evaluate silently wrong: no images, one class (before anything is removed;
    files outside class folders are refused by :func:`check_dest`, others :func:`remove_strays` removes)."""
    if not files:
        raise StageError(f"{src}: staging produced no images in {dest}; check the source layout (dcv2 stage --help)")
    classes = {PurePosixPath(rel).parts[0] for rel in files}
    if len(classes) == 1 and all(v[2] == rel for rel, v in files.items()):  # image objects of one source folder
        cls = next(iter(classes))
        raise StageError(f"{src}: every image is in one class folder ({cls}); a flat validation set gets its classes "
                         f"from its labels: dcv2 stage {src.rstrip('/')}/{cls} {dest} --labels FILE")
    if len(classes) == 1:
        raise StageError(f"{src}: every image landed in one class ({next(iter(classes))}); a flat or single-archive "
                         "validation set needs --labels, a WebDataset needs .cls members")


# ------------------------------------------------------------------------------------------- manifest
def read_manifest(dest: Path) -> dict:
    """DEST's manifest, or {} when there is none."""
    path = dest / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def build_manifest(src: str, labels: str, files: dict, objects: dict, **counts) -> dict:
    """The manifest of a finished staging: ``files`` rel -> [size, md5, object key]; ``counts``: skipped,
    transferred, repaired, removed, bytes."""
    classes: dict[str, int] = {}
    for rel in files:
        c = PurePosixPath(rel).parts[0]
        classes[c] = classes.get(c, 0) + 1
    return {"version": MANIFEST_VERSION, "source": src, "labels": labels, "num_files": len(files),
            "classes": classes, "files": [[rel, *files[rel]] for rel in sorted(files)], "objects": objects,
            "time": time.time(), **counts}


def commit(dest: Path, manifest: dict) -> None:
    """Write the manifest (atomically), drop the resume state, then mark the staging complete."""
    tmp = dest / f"{MANIFEST}.tmp"
    try:
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, dest / MANIFEST)
    except BaseException:  # a full disk: the resume state stays, staging again commits
        tmp.unlink(missing_ok=True)
        raise
    (dest / STATE).unlink(missing_ok=True)
    (dest / MARKER).write_text(json.dumps({"time": time.time(), "num_files": manifest["num_files"]}))
    shutil.rmtree(dest / REPLACED, ignore_errors=True)  # what --replace found there: the new copy is in place


def is_staged_copy(dest: Path, source: str) -> bool:
    """DEST holds a complete staging of ``source``."""
    return (dest / MARKER).exists() and read_manifest(dest).get("source") == source


# ------------------------------------------------------------------------------------------- verify
def verify(dest: str, checksum: bool = True) -> list[str]:
    """Differences between a staged directory and its manifest (empty when it is intact): missing files, other
    sizes, other contents (MD5), and image files the manifest does not list."""
    dest_p = Path(dest)
    if not (dest_p / MANIFEST).exists():
        return [f"{dest}: no {MANIFEST}; stage it first (dcv2 stage SRC {dest})"]
    entries = read_manifest(dest_p)["files"]

    def check(entry) -> str | None:
        rel, size = entry[0], entry[1]
        md5 = entry[2] if len(entry) > 2 else None
        p = dest_p / rel
        if not p.exists():
            return f"missing: {rel}"
        if p.stat().st_size != size:
            return f"size differs: {rel} ({p.stat().st_size} != {size})"
        if checksum and md5 and file_md5(str(p)) != md5:
            return f"content differs (MD5): {rel}"
        return None

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        problems = [r for r in pool.map(check, entries) if r]
    listed = {e[0] for e in entries}
    for p in sorted(dest_p.rglob("*")):
        rel = p.relative_to(dest_p)
        if p.is_file() and len(rel.parts) >= 2 and not any(x.startswith(".") for x in rel.parts) \
                and is_image(p.name) and str(rel) not in listed:
            problems.append(f"not in the manifest: {rel}")
    return problems
