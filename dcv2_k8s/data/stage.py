"""Stage a dataset from object storage (or a local path) into a local ImageFolder: ``dcv2 stage SRC DEST``.

Layouts it reads (``SRC`` is a prefix, one object, a local directory or a local file):

| layout | example | classes from |
| --- | --- | --- |
| ImageFolder objects | ``SRC/n01440764/x.JPEG`` | the first directory |
| per-class tars | ``SRC/n01440764.tar`` holding flat images | the archive's name (when the source has several) |
| shards of ``CLASS/IMAGE`` | ``SRC/shard-0001.tar`` holding ``n01440764/x.JPEG`` | the member's directory |
| the ILSVRC train release | ``ILSVRC2012_img_train.tar`` holding ``n01440764.tar`` ... | the inner archive's name |
| flat validation sets | ``ILSVRC2012_img_val.tar``, Kaggle ``CLS-LOC/val/*.JPEG`` | a labels file (``--labels``) |
| WebDataset shards | ``SRC/shard-000.tar`` holding ``KEY.jpg`` + ``KEY.cls`` | the integer label (``--class-names``) |

Archives (``.tar``, ``.tar.gz``, ``.tgz``) are read as a stream, nested archives included, and written straight
to ``DEST/CLASS/IMAGE``: no second copy of an archive is kept on disk. Large objects are read with several ranged
requests at once, in order. Members are extracted safely (absolute paths, ``..``, links and devices refuse the
archive).

``DEST/.dcv2_manifest.json`` (written last) lists every file with its size and MD5, the source, the labels and
what each source object produced; ``DEST/.dcv2_staged`` marks a complete staging. Staging again verifies every
file against it (MD5, or size with ``checksum=False``), fetches again only what is missing or damaged (for a plain
tar, only the inner members concerned, by byte range), removes files the source does not have, and refuses a
``DEST`` that holds another source unless ``replace=True``. An interrupted staging resumes where it stopped
(``.dcv2_stage_state.json`` records finished objects, and finished members of a streamed archive with their byte
offsets).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path, PurePosixPath

from dcv2_k8s.data.dataset import IMG_EXTENSIONS
from dcv2_k8s.storage import S3Storage, StorageError, open_storage

MANIFEST = ".dcv2_manifest.json"
MARKER = ".dcv2_staged"
STATE = ".dcv2_stage_state.json"
ARCHIVES = (".tar", ".tar.gz", ".tgz")
LABEL_FILES = (".cls", ".txt", ".csv", ".json", ".mat", ".tsv")
SPLIT_NAMES = {"train", "val", "valid", "validation", "test"}
CHUNK = 8 << 20            # ranged GET size for large objects
BIG_OBJECT = 64 << 20      # objects from this size on are read with parallel ranged requests
READ_AHEAD = 8             # ranged requests in flight per large object


class StageError(StorageError):
    """A source, labels file or destination that cannot be staged as asked (one line: what and what to pass)."""


class UnsafeArchive(StageError):
    pass


class Interrupted(Exception):
    """SIGINT or SIGTERM: queued transfers were cancelled; staging again resumes."""

    def __init__(self, signum: int, done: int, total: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}: {done} of {total} source objects staged; "
                         "run the same command again to resume")
        self.signum = signum


def is_archive(key: str) -> bool:
    return key.lower().endswith(ARCHIVES)


def archive_stem(key: str) -> str:
    name = PurePosixPath(key).name
    for ext in ARCHIVES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_member(m: tarfile.TarInfo, archive: str) -> bool:
    """True for a regular file, False for a directory; anything that could escape or is not data is refused."""
    name = m.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UnsafeArchive(f"{archive}: member {name!r} escapes the target directory; refusing the archive")
    if m.issym() or m.islnk():
        raise UnsafeArchive(f"{archive}: member {name!r} is a link; refusing the archive")
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        raise UnsafeArchive(f"{archive}: member {name!r} is a device or fifo; refusing the archive")
    return m.isfile()


# ------------------------------------------------------------------------------------------- reading
class RangedReader(io.RawIOBase):
    """A sequential, file-like view of ``[start, end)`` of an object, read with up to READ_AHEAD ranged requests
    in flight (several connections, memory bounded by READ_AHEAD x CHUNK). Checks ``cancel`` between chunks."""

    def __init__(self, store, path: str, start: int, end: int, cancel: threading.Event, pool: ThreadPoolExecutor):
        self.store, self.path, self.end, self.cancel, self.pool = store, path, end, cancel, pool
        self.pos = start
        self._next = start
        self._pending: list = []
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while len(self._pending) < READ_AHEAD and self._next < self.end:
            lo, hi = self._next, min(self._next + CHUNK, self.end)
            self._pending.append(self.pool.submit(_get_range, self.store, self.path, lo, hi, self.cancel))
            self._next = hi

    def readinto(self, b) -> int:
        if not self._buf:
            if self.cancel.is_set():
                raise _Cancelled()
            self._fill()
            if not self._pending:
                return 0
            self._buf = memoryview(self._pending.pop(0).result())
            self._fill()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.pos += n
        return n

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        super().close()


class _Cancelled(Exception):
    pass


def _get_range(store, path: str, lo: int, hi: int, cancel: threading.Event) -> bytes:
    if cancel.is_set():
        raise _Cancelled()
    if isinstance(store, S3Storage):
        resp = store._call(path, store.client.get_object, Bucket=store.bucket, Key=store._key(path),
                           Range=f"bytes={lo}-{hi - 1}")
        return resp["Body"].read()
    with open(path, "rb") as f:
        f.seek(lo)
        return f.read(hi - lo)


def _get_whole(store, path: str, size: int, cancel: threading.Event) -> bytes:
    if cancel.is_set():
        raise _Cancelled()
    if isinstance(store, S3Storage):
        return store._call(path, store.client.get_object, Bucket=store.bucket, Key=store._key(path))["Body"].read()
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------- labels
def load_labels(spec: str) -> dict[str, str]:
    """Image name (without extension) -> class, from ``spec`` (local or s3://):

    - the ILSVRC 2012 devkit (``ILSVRC2012_devkit_t12.tar.gz`` or its directory): ``data/
      ILSVRC2012_validation_ground_truth.txt`` (the class ID of validation image i on line i) mapped to WordNet IDs
      with ``data/meta.mat``;
    - ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first word of the prediction is the class);
    - any CSV/TSV/text file of ``IMAGE,CLASS`` lines (header optional, image names with or without extension).
    """
    if os.path.isdir(spec):
        return _devkit_labels(_find_file(spec, "ILSVRC2012_validation_ground_truth.txt"), _find_file(spec, "meta.mat"))
    data = _read_spec(spec)
    if is_archive(spec):
        gt = meta = None
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith("ILSVRC2012_validation_ground_truth.txt"):
                    gt = tar.extractfile(m).read()
                elif m.isfile() and m.name.endswith("meta.mat"):
                    meta = tar.extractfile(m).read()
        if gt is None or meta is None:
            raise StageError(f"{spec}: not an ILSVRC 2012 devkit (no data/ILSVRC2012_validation_ground_truth.txt "
                             "and data/meta.mat); pass the devkit, LOC_val_solution.csv or an IMAGE,CLASS file")
        return _devkit_labels(gt, meta)
    text = data.decode("utf-8-sig", errors="replace")
    rows = [r for r in csv.reader(io.StringIO(text.replace("\t", ",")))]
    rows = [[c.strip() for c in r] for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise StageError(f"{spec}: the labels file is empty")
    out: dict[str, str] = {}
    if rows[0][:2] == ["ImageId", "PredictionString"]:
        for r in rows[1:]:
            out[r[0]] = r[1].split()[0]
        return out
    if all(len(r) == 1 and " " in r[0] for r in rows[:5]):
        rows = [r[0].split() for r in rows]
    if all(len(r) == 1 and r[0].isdigit() for r in rows[:5]):
        raise StageError(f"{spec}: class IDs without names (the devkit's ground truth alone); pass the whole devkit "
                         "(ILSVRC2012_devkit_t12.tar.gz), whose meta.mat maps the IDs to WordNet IDs")
    start = 1 if rows[0][0].lower() in ("image", "imageid", "image_id", "file", "filename", "path") else 0
    for r in rows[start:]:
        if len(r) < 2:
            raise StageError(f"{spec}: line {r!r} is not IMAGE,CLASS")
        out[_stem(r[0])] = r[1]
    return out


def _stem(name: str) -> str:
    base = PurePosixPath(name).name
    return base.rsplit(".", 1)[0] if is_image(base) else base


def _find_file(root: str, name: str) -> bytes:
    for p in Path(root).rglob(name):
        return p.read_bytes()
    raise StageError(f"{root}: no {name}; pass the ILSVRC 2012 devkit directory or archive")


def _read_spec(spec: str) -> bytes:
    if spec.startswith("s3://"):
        from dcv2_k8s.storage import read_bytes

        return read_bytes(spec)
    if not os.path.isfile(spec):
        raise StageError(f"{spec}: no such labels file")
    return Path(spec).read_bytes()


def _devkit_labels(gt: bytes, meta: bytes) -> dict[str, str]:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise StageError("reading the devkit's meta.mat needs scipy: pip install scipy") from None
    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    out = {}
    for i, line in enumerate(gt.decode().split(), start=1):
        out[f"ILSVRC2012_val_{i:08d}"] = wnid[int(line)]
    return out


def load_class_names(spec: str) -> list[str]:
    names = [l.strip() for l in _read_spec(spec).decode("utf-8-sig").splitlines() if l.strip()]
    if not names:
        raise StageError(f"{spec}: the class-name list is empty (one name per line, line i = label i)")
    return names


# ------------------------------------------------------------------------------------------- state
class _State:
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
            tmp.write_text(json.dumps(snap))
            os.replace(tmp, self.path)

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


# ------------------------------------------------------------------------------------------- progress
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
                            desc=f"stage {objects} objects", dynamic_ncols=True, file=self.out)

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
        return (f"stage: {self.done_objects}/{self.objects} objects, {self.files} files, "
                f"{self.bytes / 1e9:.2f}/{self.total / 1e9:.2f} GB, {rate / 1e6:.1f} MB/s, ETA {eta_s}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------- the plan
def list_source(src: str) -> tuple[str, list[dict]]:
    """``(root, objects)``: the source's objects with keys relative to ``root``; a single object or file is its own
    source. Raises StageError (before anything is written) when there is nothing."""
    store = open_storage(src)
    if isinstance(store, S3Storage):
        store.check()
        objects = store.list_objects(src)
        if objects:
            return src.rstrip("/"), objects
        head = store.head(src.rstrip("/"))
        if head is not None:
            root, name = src.rstrip("/").rsplit("/", 1)
            return root, [{"Key": name, "Size": int(head["ContentLength"]), "ETag": head.get("ETag", "").strip('"')}]
        raise StageError(f"{src}: no objects under this prefix and no object of this name; check the URI "
                         "(aws s3 ls) and upload the dataset first")
    p = Path(src)
    if p.is_file():
        return str(p.parent), [{"Key": p.name, "Size": p.stat().st_size, "ETag": ""}]
    if not p.is_dir():
        raise StageError(f"{src}: no such file or directory (give an s3://bucket/prefix, an s3:// object or a local "
                         "path)")
    out = [{"Key": str(f.relative_to(p)), "Size": f.stat().st_size, "ETag": ""}
           for f in sorted(p.rglob("*")) if f.is_file()]
    if not out:
        raise StageError(f"{src}: the directory is empty")
    return str(p), out


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


# ------------------------------------------------------------------------------------------- staging
class _Stager:
    def __init__(self, src_root: str, dest: Path, labels: dict | None, class_names: list[str] | None,
                 per_class_tars: bool, state: _State, progress: Progress, cancel: threading.Event,
                 pool: ThreadPoolExecutor, checksum: bool):
        self.src_root, self.dest, self.labels, self.class_names = src_root, dest, labels, class_names
        self.per_class_tars, self.state, self.progress, self.cancel = per_class_tars, state, progress, cancel
        self.store = open_storage(src_root if src_root.startswith("s3://") else src_root)
        self.io_pool, self.checksum = pool, checksum

    def path_of(self, key: str) -> str:
        return f"{self.src_root.rstrip('/')}/{key}"

    # one file, written atomically, hashed on the way
    def write(self, rel: str, data: bytes, files: dict) -> None:
        out = self.dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
        files[rel] = [len(data), md5_bytes(data)]
        self.progress.add(files=1)

    def label_of(self, name: str, archive: str) -> str:
        stem = _stem(name)
        if self.labels is not None:
            if stem not in self.labels:
                raise StageError(f"{archive or self.src_root}: image {name} has no entry in the labels file; pass the "
                                 "labels of this split")
            return self.labels[stem]
        if archive and self.per_class_tars:
            return archive_stem(archive)
        raise StageError(f"{archive or self.src_root}: image {name} has no class folder; pass --labels "
                         "(LOC_val_solution.csv, the ILSVRC 2012 devkit, or an IMAGE,CLASS file)")

    def image_object(self, o: dict) -> None:
        key = o["Key"]
        parts = PurePosixPath(key).parts
        rel = key if len(parts) >= 2 else f"{self.label_of(key, '')}/{key}"
        files: dict = {}
        local = self.dest / rel
        etag = o.get("ETag", "")
        if local.is_file() and local.stat().st_size == o["Size"] and len(etag) == 32 and "-" not in etag \
                and file_md5(str(local)) == etag:
            files[rel] = [o["Size"], etag]  # written before an interruption, not yet in the saved state
            self.progress.add(files=1)
        else:
            self.write(rel, _get_whole(self.store, self.path_of(key), o["Size"], self.cancel), files)
        self.state.add_files(key, files)
        self.progress.add(nbytes=o["Size"], objects=1)
        self.state.finish(key, o)

    def archive_object(self, o: dict, only: set[str] | None = None) -> None:
        """Stream one archive into DEST. ``only``: re-extract just these inner members (a repair)."""
        key, size = o["Key"], o["Size"]
        plain = key.lower().endswith(".tar")
        partial = self.state.data["partial"].get(key, {}) if only is None else {}
        start = max((v["end"] for v in partial.values()), default=0) if plain else 0
        spans = []
        if only is not None and plain:
            rec = self.state.data["objects"].get(key, {}).get("members", {})
            spans = sorted((rec[m]["start"], rec[m]["end"]) for m in only if m in rec)
            if not spans:  # nothing recorded per member: the whole archive again
                only = None
        if spans:
            for lo, hi in spans:
                self._stream(o, lo, hi, set(only))
        else:
            self._stream(o, start, size, only)
        if only is not None:
            with self.state.lock:
                self.state.data["partial"].pop(key, None)
            self.progress.add(objects=1)
        if only is None:
            members = dict(self.state.data["partial"].get(key, {}))
            self.state.finish(key, o, members)
            self.progress.add(objects=1)

    def _stream(self, o: dict, lo: int, hi: int, only: set[str] | None) -> None:
        key = o["Key"]
        reader = RangedReader(self.store, self.path_of(key), lo, hi, self.cancel, self.io_pool)
        buffered = io.BufferedReader(reader, buffer_size=1 << 20)
        mode = "r|" if key.lower().endswith(".tar") else "r|*"
        sample: dict | None = None                      # the flat sample being read (WebDataset groups by key)
        flat_files: dict = {}
        written = [flat_files]                          # every file this stream wrote, to undo a refused archive
        last = lo
        try:
            with tarfile.open(fileobj=buffered, mode=mode) as tar:
                for m in tar:
                    if self.cancel.is_set():
                        raise _Cancelled()
                    if not check_member(m, key):
                        continue
                    name = m.name.lstrip("./") if m.name.startswith("./") else m.name
                    data_end = lo + m.offset_data + ((m.size + 511) // 512) * 512
                    if is_archive(name):  # a nested archive: the ILSVRC train release
                        if only is not None and name not in only:
                            continue
                        inner = tar.extractfile(m).read()
                        files: dict = {}
                        written.append(files)
                        cls = archive_stem(name)
                        with tarfile.open(fileobj=io.BytesIO(inner)) as itar:
                            for im in itar:
                                if check_member(im, f"{key}:{name}") and is_image(im.name):
                                    self.write(f"{cls}/{PurePosixPath(im.name).name}", itar.extractfile(im).read(),
                                               files)
                        self.progress.add(nbytes=data_end - last)
                        last = data_end
                        self.state.member_done(key, name, lo + m.offset, data_end, files)
                        continue
                    parts = PurePosixPath(name).parts
                    if is_image(name) and len(parts) >= 2:  # a CLASS/IMAGE shard
                        self.write(name, tar.extractfile(m).read(), flat_files)
                    else:  # flat members: a WebDataset sample (KEY.jpg, KEY.cls, KEY.json ...) or a flat image
                        wkey = _sample_key(name)
                        if sample is not None and sample["key"] != wkey:
                            self._flush(sample, key, flat_files)
                            sample = None
                        if sample is None:
                            sample = {"key": wkey, "img": None, "cls": None}
                        if is_image(name):
                            if sample["img"] is not None:  # two images under one key: not WebDataset
                                self._flush(sample, key, flat_files)
                                sample = {"key": wkey, "img": None, "cls": None}
                            sample["img"] = (name, tar.extractfile(m).read())
                        elif name.lower().endswith(".cls"):
                            sample["cls"] = int(tar.extractfile(m).read().decode().strip())
                    self.progress.add(nbytes=data_end - last)
                    last = data_end
                if sample is not None:
                    self._flush(sample, key, flat_files)
        except _Cancelled:
            raise
        except UnsafeArchive:
            for files in written:
                for rel in files:
                    (self.dest / rel).unlink(missing_ok=True)
                    try:
                        (self.dest / rel).parent.rmdir()  # a class folder this archive created
                    except OSError:
                        pass
            raise
        except tarfile.TarError as e:
            raise StageError(f"{self.path_of(key)}: not a readable tar archive ({e}); check the object") from None
        finally:
            reader.close()
        self.progress.add(nbytes=max(0, hi - last))
        if flat_files:
            self.state.member_done(key, "", lo, hi, flat_files)

    def _flush(self, sample: dict, archive: str, files: dict) -> None:
        if sample["img"] is None:
            return  # metadata without an image
        name, data = sample["img"]
        cls = self._class_name(sample["cls"], archive) if sample["cls"] is not None else self.label_of(name, archive)
        self.write(f"{cls}/{PurePosixPath(name).name}", data, files)

    def _class_name(self, label: int, archive: str) -> str:
        if self.class_names is None:
            return f"{label:05d}"
        if not 0 <= label < len(self.class_names):
            raise StageError(f"{archive}: label {label} is outside the class-name list ({len(self.class_names)} "
                             "names)")
        return self.class_names[label]


def _check_dest(dest: Path, source: str, labels: str, replace: bool) -> None:
    """Refuse a DEST that holds another source (or other files), unless ``replace``."""
    if not dest.exists():
        return
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
        return
    if owner == (source, labels):
        return
    if not replace:
        what = f"a copy of {owner[0]}" + (f" (labels {owner[1]})" if owner[1] else "") if owner else \
            f"{len(entries)} entries not staged by dcv2"
        raise StageError(f"{dest} holds {what}; choose another DEST, or pass --replace to delete it and stage "
                         f"{source} there")
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _validate_result(dest: Path, files: dict, src: str) -> None:
    """Refuse what would train or evaluate silently wrong: no images, one class, leftovers."""
    if not files:
        raise StageError(f"{src}: staging produced no images in {dest}; check the source layout (dcv2 stage --help)")
    classes = {PurePosixPath(rel).parts[0] for rel in files}
    if len(classes) == 1:
        raise StageError(f"{src}: every image landed in one class ({next(iter(classes))}); a flat or single-archive "
                         "validation set needs --labels, a WebDataset needs .cls members")
    problems = []
    for p in dest.rglob("*"):
        rel = p.relative_to(dest)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if len(rel.parts) == 1:
            problems.append(f"a file outside class folders: {rel}")
        elif is_archive(p.name):
            problems.append(f"an archive left unextracted: {rel}")
        elif not is_image(p.name):
            problems.append(f"a stray non-image file: {rel}")
    if problems:
        raise StageError(f"{dest}: {problems[0]} ({len(problems)} such); remove it or stage into an empty DEST")


def stage(src: str, dest: str, workers: int = 16, progress: bool = True, checksum: bool = True,
          on_event=None, labels: str = "", class_names: str = "", replace: bool = False,
          log_every: float = 30.0) -> dict:
    """Stage ``src`` into ``dest`` (resumable, repairs, refuses what is wrong); return the manifest.

    ``on_event(kind, **values)`` (optional) is told ``start`` (bytes, objects), each finished ``object`` (bytes,
    files) and ``done``: the staging progress metrics use it. ``progress``: a bar (a terminal); otherwise one log
    line every ``log_every`` seconds. SIGINT/SIGTERM (main thread) cancel the queued transfers and raise
    :class:`Interrupted` within seconds.
    """
    notify = on_event or (lambda *a, **k: None)
    root, objects = list_source(src)                     # nothing is created before the source is known
    label_map = load_labels(labels) if labels else None
    names = load_class_names(class_names) if class_names else None
    images, archives, ignored = plan(src, objects, label_map)
    dest_p = Path(dest)
    _check_dest(dest_p, src, labels, replace)
    dest_p.mkdir(parents=True, exist_ok=True)
    (dest_p / MARKER).unlink(missing_ok=True)
    state = _State(dest_p, src, labels)
    previous = json.loads((dest_p / MANIFEST).read_text()) if (dest_p / MANIFEST).exists() else {}
    if previous.get("version") == 2 and previous.get("source") == src and previous.get("labels", "") == labels \
            and not state.data["objects"]:
        state.data["objects"] = previous["objects"]  # a complete earlier staging: verify it and repair it
        state.data["files"] = {rel: [size, md5, key] for rel, size, md5, key in previous["files"]}
    by_key = {o["Key"]: o for o in images + archives}
    state.data["objects"] = {k: v for k, v in state.data["objects"].items() if k in by_key}
    state.data["files"] = {rel: v for rel, v in state.data["files"].items() if v[2] in by_key}
    # what needs doing: new or changed objects, and finished ones whose files are missing or damaged
    changed = {k for k, o in by_key.items() if (rec := state.data["objects"].get(k)) is None
               or rec["size"] != o["Size"] or (o["ETag"] and rec["etag"] != o["ETag"])}
    replaced = {k for k in changed if k in state.data["objects"]}  # the source object changed: start it over
    state.data["files"] = {rel: v for rel, v in state.data["files"].items() if v[2] not in replaced}
    for k in replaced:
        state.data["objects"].pop(k)
        state.data["partial"].pop(k, None)
    checks = [(rel, v) for rel, v in state.data["files"].items() if v[2] not in changed]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, 32))) as pool:
        intact = list(pool.map(lambda rv: _intact(dest_p / rv[0], rv[1][0], rv[1][1], checksum), checks))
    bad_by_key: dict[str, list[str]] = {}
    for (rel, v), ok in zip(checks, intact):
        if not ok:
            bad_by_key.setdefault(v[2], []).append(rel)
    todo = [by_key[k] for k in sorted(changed)]
    repairs: dict[str, set[str]] = {}
    for key, bad in bad_by_key.items():
        members = state.data["objects"][key].get("members", {})
        if key.lower().endswith(".tar") and any(m for m in members):
            repairs[key] = {m for m in members if m and any(_member_of(rel, m) for rel in bad)}
        else:
            todo.append(by_key[key])
            state.data["objects"].pop(key, None)
    skipped = len(by_key) - len(todo) - len(repairs)
    per_class = len(archives) > 1 and label_map is None
    total = sum(o["Size"] for o in todo) + sum(by_key[k]["Size"] for k in repairs)
    notify("start", bytes=total, objects=len(todo) + len(repairs))
    prog = Progress(total, len(todo) + len(repairs), progress, log_every)
    if ignored:
        print(f"stage: ignoring {len(ignored)} objects that are neither images nor archives (e.g. {ignored[0]})",
              file=sys.stderr, flush=True)
    if bad_by_key:
        print(f"stage: {sum(map(len, bad_by_key.values()))} files missing or damaged; fetching them again",
              file=sys.stderr, flush=True)
    cancel = threading.Event()
    got: list[int] = []

    def on_signal(signum, frame):
        got.append(signum)
        cancel.set()

    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    io_pool = ThreadPoolExecutor(max_workers=max(2, min(READ_AHEAD * 2, workers)), thread_name_prefix="dcv2-range")
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="dcv2-stage")
    stager = _Stager(root, dest_p, label_map, names, per_class, state, prog, cancel, io_pool, checksum)
    done = 0
    try:
        futures = {}
        for key, members in repairs.items():
            futures[pool.submit(stager.archive_object, by_key[key], members)] = key
        for o in sorted(todo, key=lambda o: -o["Size"]):  # big archives first: they take longest
            fn = stager.archive_object if is_archive(o["Key"]) else stager.image_object
            futures[pool.submit(fn, o)] = o["Key"]
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    f.result()
                except _Cancelled:
                    continue
                done += 1
                notify("object", bytes=by_key[futures[f]]["Size"], files=1)
            if cancel.is_set():
                for f in pending:
                    f.cancel()
                wait(pending, timeout=30)
                raise Interrupted(got[0] if got else signal.SIGINT, skipped + done, len(by_key))
    except BaseException:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        io_pool.shutdown(wait=True, cancel_futures=True)
        prog.close()
        state.save()
        raise
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    pool.shutdown(wait=True)
    io_pool.shutdown(wait=True)
    prog.close()
    files = {rel: v for rel, v in state.data["files"].items() if v[2] in by_key}
    removed = _remove_strays(dest_p, files)
    _validate_result(dest_p, files, src)
    classes: dict[str, int] = {}
    for rel in files:
        c = PurePosixPath(rel).parts[0]
        classes[c] = classes.get(c, 0) + 1
    manifest = {"version": 2, "source": src, "labels": labels, "num_files": len(files), "classes": classes,
                "files": [[rel, *files[rel]] for rel in sorted(files)],
                "objects": {k: state.data["objects"][k] for k in by_key}, "time": time.time(),
                "skipped": skipped, "transferred": len(todo), "repaired": len(repairs), "removed": removed,
                "bytes": total}
    tmp = dest_p / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, dest_p / MANIFEST)
    (dest_p / STATE).unlink(missing_ok=True)
    (dest_p / MARKER).write_text(json.dumps({"time": time.time(), "num_files": len(files)}))
    if not progress:
        print(prog.line(), file=sys.stderr, flush=True)
    notify("done")
    return manifest


def _sample_key(name: str) -> str:
    """A WebDataset sample key: the member path up to the first dot of its file name."""
    p = PurePosixPath(name)
    return str(p.parent / p.name.split(".", 1)[0])


def _member_of(rel: str, member: str) -> bool:
    return PurePosixPath(rel).parts[0] == archive_stem(member)


def _intact(path: Path, size: int, md5: str, checksum: bool) -> bool:
    try:
        if path.stat().st_size != size:
            return False
    except OSError:
        return False
    return not checksum or file_md5(str(path)) == md5


def _remove_strays(dest: Path, files: dict) -> int:
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
        print(f"stage: removed {removed} files the source does not have", file=sys.stderr, flush=True)
    return removed


def verify(dest: str, checksum: bool = True) -> list[str]:
    """Differences between a staged directory and its manifest (empty when it is intact): missing files, other
    sizes, other contents (MD5), and image files the manifest does not list."""
    dest_p = Path(dest)
    mpath = dest_p / MANIFEST
    if not mpath.exists():
        return [f"{dest}: no {MANIFEST}; stage it first (dcv2 stage SRC {dest})"]
    manifest = json.loads(mpath.read_text())
    problems, listed = [], set()
    entries = manifest["files"]

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
    complete staged copy of the same source is reused (staging is idempotent and resumable anyway).
    """
    if not uri.startswith("s3://"):
        return uri
    dest = stage_dir or default_stage_dir(uri)
    marker, manifest = Path(dest) / MARKER, Path(dest) / MANIFEST
    if marker.exists() and manifest.exists() and json.loads(manifest.read_text()).get("source") == uri:
        return dest
    if local_rank == 0:
        stage(uri, dest, progress=progress, labels=labels)
    else:
        wait_for_marker(dest, timeout)
    return dest
