"""Stage a dataset from object storage into a local directory: ``dcv2 stage SRC DEST``.

The source is an ImageFolder tree of objects (``SRC/CLASS/IMAGE.JPEG``) or tar archives (ImageNet's per-class
``n01440764.tar`` files, or shards holding ``CLASS/IMAGE`` members), or a mix. Objects are copied in parallel;
a file already present with the source's size (and, for archives, a recorded ETag) is skipped, so an
interrupted staging resumes where it stopped. Archives are extracted safely: absolute paths, ``..``, links and
device files are refused. At the end ``DEST/.dcv2_manifest.json`` (sorted file list with sizes, counts per
class) fixes sample indices for every rank and restart, and ``DEST/.dcv2_staged`` marks completion.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath

from dcv2_k8s.data.dataset import IMG_EXTENSIONS
from dcv2_k8s.storage import S3Storage, StorageError, open_storage

MANIFEST = ".dcv2_manifest.json"
MARKER = ".dcv2_staged"
ARCHIVE_STATE = ".dcv2_archives.json"
ARCHIVES = (".tar", ".tar.gz", ".tgz")


class UnsafeArchive(StorageError):
    pass


def is_archive(key: str) -> bool:
    return key.lower().endswith(ARCHIVES)


def _archive_stem(key: str) -> str:
    name = PurePosixPath(key).name
    for ext in ARCHIVES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def safe_members(tar: tarfile.TarFile, archive: str) -> list[tarfile.TarInfo]:
    """Regular files and directories with relative, non-escaping names; anything else is refused."""
    members = []
    for m in tar.getmembers():
        name = m.name
        parts = PurePosixPath(name).parts
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise UnsafeArchive(f"{archive}: member {name!r} escapes the target directory; refusing the archive")
        if m.issym() or m.islnk():
            raise UnsafeArchive(f"{archive}: member {name!r} is a link; refusing the archive")
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise UnsafeArchive(f"{archive}: member {name!r} is a device or fifo; refusing the archive")
        if m.isfile() or m.isdir():
            members.append(m)
    return members


def extract_archive(path: str, dest: Path, archive_key: str) -> list[str]:
    """Extract ``path`` into ``dest``; flat member lists go into a class directory named after the archive."""
    with tarfile.open(path) as tar:
        members = safe_members(tar, archive_key)
        files = [m for m in members if m.isfile()]
        flat = all(len(PurePosixPath(m.name).parts) == 1 for m in files)
        target = dest / _archive_stem(archive_key) if flat else dest
        written = []
        for m in files:
            out = target / m.name
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            tmp = out.with_name(f".{out.name}.part")
            with open(tmp, "wb") as f:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
            os.replace(tmp, out)
            written.append(str(out.relative_to(dest)))
        return written


def _list_source(src: str) -> list[dict]:
    store = open_storage(src)
    if isinstance(store, S3Storage):
        return store.list_objects(src)
    root = Path(src)
    if not root.is_dir():
        raise StorageError(f"{src}: no such directory")
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out.append({"Key": str(p.relative_to(root)), "Size": p.stat().st_size, "ETag": ""})
    return out


def build_manifest(dest: Path, source: str) -> dict:
    files = []
    counts: dict[str, int] = {}
    for p in sorted(dest.rglob("*")):
        rel = p.relative_to(dest)
        if p.is_file() and len(rel.parts) >= 2 and not any(x.startswith(".") for x in rel.parts) \
                and p.suffix.lower() in IMG_EXTENSIONS:
            files.append([str(rel), p.stat().st_size])
            counts[rel.parts[0]] = counts.get(rel.parts[0], 0) + 1
    return {"source": source, "num_files": len(files), "classes": counts, "files": files, "time": time.time()}


def _complete(local: Path, obj: dict, checksum: bool) -> bool:
    """A local copy is complete when its size matches and, for single-part objects (ETag = MD5), its MD5."""
    if not local.exists() or local.stat().st_size != obj["Size"]:
        return False
    etag = obj.get("ETag", "")
    if checksum and len(etag) == 32 and "-" not in etag:
        return file_md5(str(local)) == etag
    return True


def stage(src: str, dest: str, workers: int = 16, progress: bool = True, checksum: bool = True,
          on_event=None) -> dict:
    """Copy/extract ``src`` into ``dest`` (resumable); return the manifest.

    ``on_event(kind, **values)`` (optional) is told ``start`` (bytes, objects), each finished ``object``
    (bytes, files) and ``done``: the staging progress metrics use it.
    """
    notify = on_event or (lambda *a, **k: None)
    from tqdm import tqdm

    dest_p = Path(dest)
    dest_p.mkdir(parents=True, exist_ok=True)
    (dest_p / MARKER).unlink(missing_ok=True)
    store = open_storage(src)
    if hasattr(store, "check"):
        store.check()
    objects = [o for o in _list_source(src) if not PurePosixPath(o["Key"]).name.startswith(".")]
    if not objects:
        raise StorageError(f"{src}: no objects found; expected CLASS/IMAGE files or .tar archives")
    state_path = dest_p / ARCHIVE_STATE
    done_archives = json.loads(state_path.read_text()) if state_path.exists() else {}
    todo, skipped = [], 0
    for o in objects:
        if is_archive(o["Key"]):
            if done_archives.get(o["Key"]) == [o["Size"], o["ETag"]]:
                skipped += 1
                continue
        elif _complete(dest_p / o["Key"], o, checksum):
            skipped += 1
            continue
        todo.append(o)
    total = sum(o["Size"] for o in todo)
    notify("start", bytes=total, objects=len(todo))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"stage {len(todo)} objects",
               disable=not progress, mininterval=1.0, dynamic_ncols=True)

    def fetch(o: dict) -> tuple[dict, list[str]]:
        key = o["Key"]
        src_path = f"{src.rstrip('/')}/{key}"
        if is_archive(key):
            with tempfile.TemporaryDirectory(dir=dest_p) as tmpd:
                local = os.path.join(tmpd, "archive")
                _copy(store, src_path, local)
                return o, extract_archive(local, dest_p, key)
        _copy(store, src_path, str(dest_p / key))
        return o, [key]

    files_done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fetch, o) for o in todo]
        for fut in as_completed(futures):
            o, written = fut.result()
            if is_archive(o["Key"]):
                done_archives[o["Key"]] = [o["Size"], o["ETag"]]
                tmp = state_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(done_archives))
                os.replace(tmp, state_path)
            files_done += len(written)
            notify("object", bytes=o["Size"], files=len(written))
            bar.update(o["Size"])
            bar.set_postfix(files=files_done, refresh=False)
    bar.close()
    manifest = build_manifest(dest_p, src)
    manifest.update(skipped=skipped, transferred=len(todo), bytes=total)
    tmp = dest_p / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, dest_p / MANIFEST)
    (dest_p / MARKER).write_text(json.dumps({"time": time.time(), "num_files": manifest["num_files"]}))
    notify("done")
    return manifest


def _copy(store, src_path: str, local: str) -> None:
    if isinstance(store, S3Storage):
        store.download_file(src_path, local)
    else:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{local}.part"
        with open(src_path, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(1 << 20):
                fo.write(chunk)
        os.replace(tmp, local)


def verify(dest: str) -> list[str]:
    """Differences between a staged directory and its manifest (empty when it is intact)."""
    dest_p = Path(dest)
    mpath = dest_p / MANIFEST
    if not mpath.exists():
        return [f"{dest}: no {MANIFEST}; stage it first (dcv2 stage SRC {dest})"]
    manifest = json.loads(mpath.read_text())
    problems = []
    listed = set()
    for rel, size in manifest["files"]:
        listed.add(rel)
        p = dest_p / rel
        if not p.exists():
            problems.append(f"missing: {rel}")
        elif p.stat().st_size != size:
            problems.append(f"size differs: {rel} ({p.stat().st_size} != {size})")
    current = build_manifest(dest_p, manifest.get("source", ""))
    problems += [f"not in the manifest: {rel}" for rel, _ in current["files"] if rel not in listed]
    return problems


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
                 progress: bool = True) -> str:
    """A local directory holding ``uri``: the path itself, or a staged copy of an ``s3://`` source.

    Only local rank 0 stages; the other processes of the node wait for its completion marker (bounded). A
    complete staged copy of the same source is reused (staging is idempotent and resumable anyway).
    """
    if not uri.startswith("s3://"):
        return uri
    dest = stage_dir or default_stage_dir(uri)
    marker, manifest = Path(dest) / MARKER, Path(dest) / MANIFEST
    if marker.exists() and manifest.exists() and json.loads(manifest.read_text()).get("source") == uri:
        return dest
    if local_rank == 0:
        stage(uri, dest, progress=progress)
    else:
        wait_for_marker(dest, timeout)
    return dest


def local_data_dir(cfg) -> str:
    """The training data of a resolved config as a local directory (s3:// is staged by local rank 0 first)."""
    return ensure_local(str(cfg.DATA.TRAIN.DATA_PATHS[0]), str(cfg.DATA.TRAIN.STAGE_DIR),
                        int(os.environ.get("LOCAL_RANK", "0")), float(cfg.DISTRIBUTED.TIMEOUT_SECONDS) * 6,
                        progress=sys.stderr.isatty())


def file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
