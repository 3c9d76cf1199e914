"""``dcv2 extract DATA_DIR OUT``: frozen features of every image of a split, written as ``.npy`` files.

VISSL's ``extract_features`` engine (``python tools/run_distributed_engines.py ... engine_name=extract_features``
comes here too) and solo-learn's embedding export, for our checkpoints and every layout ``dcv2_k8s.weights`` reads
(torchvision, swav/VISSL releases, VISSL ``.torch``), or a random initialisation of the network of the tokens.

The view is the evaluation view of ``dcv2 knn`` / ``clusters`` / ``linear-eval``: the whole-image preprocessing the
weights were trained with, resize the short side to ``size / 0.875``, center-crop ``size``, normalise; the trunk in
eval mode. Written to ``OUT`` (local or ``s3://``), row ``i`` of every array being image ``i`` of the split's
sorted listing (``paths.txt`` line ``i``):

- ``features.npy``: ``[N, D]`` float32, the trunk's global-average-pooled last stage (VISSL's ``res5avg``), not
  normalised;
- ``head.npy`` (``--head``): ``[N, E]`` float32, the projection head's L2-normalised embedding (what training
  clusters);
- ``labels.npy``: ``[N]`` int64, the class folder's index (sorted class names, ``meta.json`` ``classes``), ``-1``
  for every image of a folder without class folders (images directly in ``DATA_DIR``);
- ``paths.txt``: the image paths relative to ``DATA_DIR``, one a line;
- ``meta.json`` (written last): architecture, weights, layout, input view, feature layer, counts, shapes, and
  ``bad``: the images that could not be decoded (their rows are zeros; nothing is put in their place).

Distributed: under a launcher (torchrun: ``RANK`` / ``WORLD_SIZE``) every rank extracts one contiguous shard and
rank 0 gathers the shards and writes, in the original order. A rank that finished its shard waits for the others
through the launcher's store (bounded: ``DISTRIBUTED.TIMEOUT_SECONDS`` plus ``WAIT_FACTOR`` times the time the
slowest finished rank's speed gives a full shard), then the ranks form a gloo group of CPU tensors and rank 0
gathers in chunks, every collective bounded by ``DISTRIBUTED.TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dcv2_k8s.data.dataset import BadImage, IndexedImageFolder, sample_seed, scan_image_folder
from dcv2_k8s.data.layout import IMG_EXTENSIONS
from dcv2_k8s.storage import StorageError

log = logging.getLogger("dcv2")
FEATURE_LAYER = "res5avg"  # VISSL's name for the trunk's global-average-pooled last stage
GATHER_CHUNK_BYTES = 64 * 2 ** 20
WAIT_FACTOR = 3  # a rank waits for a straggler up to this many times a full shard at the slowest finished speed
BAD_LINES = 20  # bad images named one a line on stderr (all of them in meta.json)


class OutputError(StorageError):
    """OUT could not be written (an OSError): ``code`` is the exit code, USAGE for what the user fixes
    (permissions, a read-only filesystem, a file in the way), ERROR otherwise."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class FlatImageFolder(IndexedImageFolder):
    """The images directly in ``root`` (no class folders), sorted, every label ``-1``."""

    def __init__(self, root: str | os.PathLike, transform=None):  # not super().__init__: it looks for classes
        import multiprocessing

        self.root = Path(root)
        self.classes = []
        self.samples = [(f, -1) for f in sorted(os.listdir(root))
                        if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".") and (self.root / f).is_file()]
        self.targets = [-1] * len(self.samples)
        self.transform = transform
        self.seed = 0
        self.bad_count = multiprocessing.get_context("fork").Value("i", 0)
        self._reported: set[int] = set()


def open_split(root: str, transform=None) -> IndexedImageFolder:
    """The split at ``root``: an ImageFolder (``root/CLASS/IMAGE``, labels = class indices) or, when ``root`` holds
    no class folders, its images (labels ``-1``). FileNotFoundError (one line) when it holds neither; a dataset
    root (``train/``, ``val/``) is refused by ``scan_image_folder`` with the split to give instead."""
    try:
        scan_image_folder(root)
    except FileNotFoundError as e:
        if type(e) is not FileNotFoundError or not os.path.isdir(root):  # ManifestMismatch, DatasetRoot: as they are
            raise
        flat = FlatImageFolder(root, transform)
        if not flat.samples:
            raise FileNotFoundError(f"{root}: no images, neither in class folders (ROOT/CLASS/IMAGE.jpg) nor "
                                    "directly in it") from None
        return flat
    return IndexedImageFolder(root, transform)


@dataclass
class Network:
    """What ``load_network`` built: the resolved config, the trunk, the head (``--head``) and where the weights came
    from."""

    resolved: object
    trunk: torch.nn.Module
    head: torch.nn.Module | None
    weights: str
    layout: str
    notes: list[str] = field(default_factory=list)
    head_dim: int = 0


def load_network(weights: str, tokens=(), with_head: bool = False) -> Network:
    """The network of ``weights`` (one of our checkpoints: its own config, ``tokens`` on top; any other layout, or
    none: the network of ``tokens``, randomly initialised with ``SEED_VALUE`` when ``weights`` is empty), as
    ``dcv2 knn`` builds it. Raises ConfigError, WeightsError, StorageError (one line each)."""
    from dcv2_k8s.config import config_from_checkpoint, resolve
    from dcv2_k8s.model import build_model, build_trunk
    from dcv2_k8s.weights import WeightsError, load_flat_head, load_into_trunk, read_file, split_weights

    state = read_file(weights) if weights else None
    ours = state is not None and "config_yaml" in state
    r = config_from_checkpoint(state, tokens, for_training=False) if ours else resolve(tokens, for_training=False)
    torch.manual_seed(r.cfg.SEED_VALUE)  # a random initialisation is the same in every rank
    if with_head:
        model = build_model(r.cfg)
        trunk, head = model.trunk, model.head
    else:
        trunk, head = build_trunk(r.cfg.MODEL.TRUNK), None
    layout = "random-init"
    if state is not None:
        layout, trunk_sd, head_sd, _ = split_weights(state)
        load_into_trunk(trunk, trunk_sd, weights)
        if head is not None:
            if not head_sd:
                raise WeightsError(f"{weights}: --head: these weights hold no projection head ({layout} layout); "
                                   "drop --head to extract the trunk's features")
            try:
                if layout == "dcv2":
                    head.load_state_dict(head_sd)
                else:
                    load_flat_head(head, head_sd)
            except (RuntimeError, KeyError) as e:
                raise WeightsError(f"{weights}: the head does not match config.MODEL.HEAD.PARAMS "
                                   f"({str(e).splitlines()[0][:120]})") from None
    trunk.eval().requires_grad_(False)
    head_dim = 0
    if head is not None:
        head.eval().requires_grad_(False)
        try:
            with torch.no_grad():
                head_dim = head(torch.zeros(2, trunk.out_dim)).shape[1]
        except RuntimeError:
            from dcv2_k8s.config import ConfigError

            raise ConfigError([f"config.MODEL.HEAD.PARAMS: the head does not take the trunk's {trunk.out_dim} "
                               "features; give the head (config.MODEL.HEAD.PARAMS=...) that matches "
                               "config.MODEL.TRUNK, or drop --head"]) from None
    return Network(r, trunk, head, weights or "random-init", layout, list(r.notes), head_dim)


class _Progress:
    """A bar on a terminal; elsewhere (``kubectl logs``) one line every ``every`` seconds: images, rate, ETA."""

    def __init__(self, total: int, tty: bool, enabled: bool, every: float = 30.0):
        self.total, self.done, self.every, self.enabled = total, 0, every, enabled
        self.t0 = self.last = time.time()
        self.bar = None
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="extract", dynamic_ncols=True, file=sys.stderr)

    def add(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.time() - self.last >= self.every:
            self.last = time.time()
            rate = self.done / max(self.last - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"extract: {self.done}/{self.total} images of this shard, {rate:.1f} images/s, ETA "
                  f"{eta / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def shard(n: int, rank: int, world: int) -> tuple[int, int, int]:
    """``(lo, hi, per_rank)``: rank ``rank``'s contiguous block ``[lo, hi)`` of ``n`` samples, blocks of
    ``per_rank`` (the last ones shorter or empty)."""
    per = -(-n // world)
    lo = min(n, rank * per)
    return lo, min(n, lo + per), per


class _Rows(Dataset):
    """Samples ``lo .. hi - 1`` of ``ds`` as ``(index, input, error)``. Not training's rule for a bad image (the
    next good one in its place): row ``i`` must be image ``i``, so a bad image gives a blank input and its error
    (``""`` for a good one), and its rows are zeroed."""

    def __init__(self, ds, lo: int, hi: int):
        self.ds, self.lo, self.hi = ds, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, k: int):
        from PIL import Image

        i = self.lo + k
        try:
            img, error = self.ds.load(i), ""
        except BadImage as e:
            img, error = Image.new("RGB", (8, 8)), str(e) or "unusable image"
        with torch.random.fork_rng(devices=[]):  # as IndexedImageFolder.__getitem__ does
            torch.random.default_generator.manual_seed(sample_seed(self.ds.seed, 0, i))
            return i, self.ds.transform(img), error


@torch.no_grad()
def extract_shard(net: Network, ds, lo: int, hi: int, device: torch.device, batch_size: int = 64,
                  num_workers: int = 2, progress: bool = False, tty: bool = False,
                  feats: torch.Tensor | None = None, embs: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, list[dict]]:
    """Trunk features ``[hi - lo, D]`` (and head embeddings ``[hi - lo, E]``) of samples ``lo .. hi - 1``, on the
    CPU, float32, written by slices into ``feats`` / ``embs`` (allocated when None: no second copy), and the bad
    images (``{"row", "path", "error"}``; their rows are zeros)."""
    trunk = net.trunk.to(device)
    head = net.head.to(device) if net.head is not None else None
    feats = torch.empty(hi - lo, trunk.out_dim) if feats is None else feats
    if head is not None:
        embs = torch.empty(hi - lo, net.head_dim) if embs is None else embs
    loader = DataLoader(_Rows(ds, lo, hi), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    bar = _Progress(hi - lo, tty, progress)
    bad: list[dict] = []
    at = 0
    try:
        for idx, x, errors in loader:
            m = x.shape[0]
            f = trunk(x.to(device, non_blocking=True)).float()
            feats[at:at + m] = f.cpu()
            if head is not None:
                embs[at:at + m] = F.normalize(head(f).float(), dim=1).cpu()
            for j, error in enumerate(errors):
                if error:
                    row = int(idx[j])
                    bad.append({"row": row, "path": ds.samples[row][0], "error": error})
                    feats[at + j] = 0
                    if head is not None:
                        embs[at + j] = 0
            at += m
            bar.add(m)
    finally:
        bar.close()
    return feats[:at], (embs[:at] if head is not None else None), bad


def wait_for_ranks(store, rank: int, world: int, per: int, mine: dict, timeout_s: float, started: float,
                   poll_s: float = 0.5, look_s: float = 10.0, say_every: float = 60.0) -> list[dict]:
    """Leave this rank's shard report (``mine``: ``rows``, ``seconds``, ``bad``) in the launcher's ``store`` and wait
    until every rank has left its own; the reports in rank order. No collective runs meanwhile (a group's timeout
    would count from its start), and the wait is bounded: it times out (TimeoutError: retryable) at ``started`` +
    ``timeout_s`` + ``WAIT_FACTOR`` x a full shard (``per`` images) at the slowest speed among the ranks done. One
    store request per ``poll_s`` (a counter); the reports themselves are read every ``look_s``."""
    store.set(f"extract_done/{rank}", json.dumps(mine))
    store.add("extract_done", 1)
    got: dict[int, dict] = {rank: mine}
    said = looked = 0.0
    while True:
        now = time.time()
        complete = store.add("extract_done", 0) >= world
        if complete or now - looked >= look_s:
            looked = now
            for r in range(world):
                if r not in got and (complete or store.check([f"extract_done/{r}"])):
                    got[r] = json.loads(store.get(f"extract_done/{r}"))
        if len(got) == world:
            return [got[r] for r in range(world)]
        per_image = max((g["seconds"] / g["rows"] for g in got.values() if g["rows"]), default=0.0)
        deadline = started + timeout_s + WAIT_FACTOR * per * per_image
        missing = [r for r in range(world) if r not in got]
        if now > deadline:
            raise TimeoutError(f"extract: timed out after {now - started:.0f} s waiting for ranks {missing} to "
                               f"finish their shards (DISTRIBUTED.TIMEOUT_SECONDS={timeout_s:g} + {WAIT_FACTOR} x "
                               f"a shard at the slowest finished rank's speed, {per * per_image:.0f} s)")
        if rank == 0 and now - said >= say_every:
            if said:
                print(f"extract: {len(got)}/{world} ranks done, waiting for ranks {missing} (at most "
                      f"{deadline - now:.0f} s more)", file=sys.stderr, flush=True)
            said = now
        time.sleep(poll_s)


def gather_to_rank0(local: torch.Tensor, n: int, per: int, rank: int, world: int, group=None,
                    out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every rank's block (``local``: its ``[<= per, D]`` rows of the contiguous sharding) concatenated in rank order
    on rank 0 (``[n, D]``), None on the other ranks. On rank 0, ``out`` (``[world * per, D]``) receives them; it may
    hold rank 0's block already (``local`` a view of its first rows): no other copy of the whole array is made.
    Chunked: at most ``GATHER_CHUNK_BYTES`` per rank per collective; every collective is bounded by the group's
    timeout."""
    import torch.distributed as dist

    d = local.shape[1]
    if rank == 0:
        if out is None:
            out = torch.empty(world * per, d, dtype=local.dtype)
        if local.shape[0] and local.data_ptr() != out.data_ptr():
            out[:local.shape[0]] = local
    rows = max(1, GATHER_CHUNK_BYTES // max(1, d * local.element_size()))
    for s in range(0, per, rows):
        m = min(rows, per - s)
        if s + m <= local.shape[0]:
            chunk = local[s:s + m].contiguous()
        else:  # the end of a short (last) block: padded
            chunk = torch.zeros(m, d, dtype=local.dtype)
            if s < local.shape[0]:
                chunk[:local.shape[0] - s] = local[s:]
        parts = [out[r * per + s:r * per + s + m] for r in range(world)] if rank == 0 else None
        if rank == 0:
            parts[0] = torch.empty_like(chunk)  # rank 0's rows are in place already
        dist.gather(chunk, parts, dst=0, group=group)
    return out[:n] if rank == 0 else None


def _put_npy(store, path: str, arr: np.ndarray) -> None:
    """``arr`` as a ``.npy`` file at ``path`` of ``store``, streamed through a temporary file (no second copy in
    memory): renamed into place locally (atomic), uploaded to an ``s3://`` store (a PUT is atomic)."""
    import tempfile

    from dcv2_k8s.storage import DiskFull, LocalStorage, free_bytes, is_disk_full, size_text

    local = isinstance(store, LocalStorage)
    if local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) if local else None, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
        else:
            store.upload_file(tmp, path)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(f"{path}: no space left on the device: writing it needs {size_text(arr.nbytes)}, "
                           f"{size_text(free_bytes(tmp))} available; free space or use a bigger volume", path,
                           arr.nbytes, free_bytes(tmp)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_outputs(out: str, arrays: dict[str, np.ndarray], paths: list[str], meta: dict) -> None:
    """Each array as ``NAME.npy``, ``paths.txt``, then ``meta.json`` (last: its presence means the rest is there),
    into ``out`` (local or ``s3://``), each written atomically. An earlier run's ``meta.json`` goes first, and its
    ``head.npy`` when this run has none. An OSError is an :class:`OutputError` (one line)."""
    import errno

    from dcv2_k8s import exitcodes
    from dcv2_k8s.storage import open_storage

    store = open_storage(out)
    try:
        store.delete(store.join("meta.json"))
        if "head" not in arrays:
            store.delete(store.join("head.npy"))
        for name, arr in arrays.items():
            _put_npy(store, store.join(f"{name}.npy"), arr)
        store.put_bytes(store.join("paths.txt"), "".join(p + "\n" for p in paths).encode())
        store.put_bytes(store.join("meta.json"), (json.dumps(meta, indent=1) + "\n").encode())
    except StorageError:
        raise
    except OSError as e:
        user = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                           errno.ENAMETOOLONG)
        raise OutputError(f"{e.filename or out}: cannot write it ({e.strerror or e})"
                          + ("; give a writable OUT" if user else ""),
                          exitcodes.USAGE if user else exitcodes.ERROR) from None


def run_extract(net: Network, data_dir: str, out: str, size: int = 0, batch_size: int = 64, num_workers: int = 2,
                device: str = "auto", split: str = "", progress: bool | None = None) -> dict | None:
    """Extract ``data_dir`` with ``net`` into ``out`` in this process, as one rank of a launch when a launcher
    started it (see the module docstring). Returns ``meta.json``'s content on rank 0, None on the other ranks."""
    from dcv2_k8s import distributed as D
    from dcv2_k8s.data.transforms import eval_transform

    cfg = net.resolved.cfg
    info = D.env_info()
    dev = D.pick_device(device, info.local_rank)
    size = size or cfg.DATA.TRAIN.multicrop.large_size
    mean, std = cfg.DATA.TRAIN.normalize
    pre = cfg.DATA.TRAIN.preprocess
    ds = open_split(data_dir, eval_transform(size, mean, std, pre))
    n = len(ds)
    t0 = time.time()
    tty = sys.stderr.isatty()
    show = info.is_main and (progress is None or progress)  # a bar on a terminal, else a line every 30 s
    timeout_s = cfg.DISTRIBUTED.TIMEOUT_SECONDS
    lo, hi, per = shard(n, info.rank, info.world_size)
    # rank 0 extracts straight into the array it gathers into: one [n, D] array in memory, not two
    rows = per * info.world_size if info.distributed and info.is_main else hi - lo
    feats = torch.empty(rows, net.trunk.out_dim)
    embs = torch.empty(rows, net.head_dim) if net.head is not None else None
    try:
        store = D.group_store(info, timeout_s) if info.distributed else None  # all ranks start together: bounded
        started = time.time()
        mine, mine_h, bad = extract_shard(net, ds, lo, hi, dev, batch_size, num_workers, show, tty,
                                          feats[:hi - lo], embs[:hi - lo] if embs is not None else None)
        if info.distributed:
            reports = wait_for_ranks(store, info.rank, info.world_size, per,
                                     {"rows": hi - lo, "seconds": time.time() - started, "bad": bad}, timeout_s,
                                     started)
            bad = [b for r in reports for b in r["bad"]]
            D.init_process_group(info, "gloo", torch.device("cpu"), timeout_s, store=store)  # every rank is done
            feats = gather_to_rank0(mine, n, per, info.rank, info.world_size, out=feats)
            if embs is not None:
                embs = gather_to_rank0(mine_h, n, per, info.rank, info.world_size, out=embs)
    finally:
        if info.distributed:
            D.destroy()
    if not info.is_main:
        return None
    if bad:
        for b in bad[:BAD_LINES]:
            print(f"dcv2: warning: {b['path']}: cannot be decoded ({b['error']}); row {b['row']} is zeros",
                  file=sys.stderr)
        print(f"dcv2: warning: {len(bad)} image(s) of {n} could not be decoded: their rows of features.npy"
              f"{' and head.npy' if embs is not None else ''} are zeros, listed in meta.json \"bad\"",
              file=sys.stderr)
    labels = np.asarray(ds.targets, dtype=np.int64)
    arrays = {"features": feats.numpy().astype(np.float32, copy=False), "labels": labels}
    if embs is not None:
        arrays["head"] = embs.numpy().astype(np.float32, copy=False)
    view = {"resize": int(round(size / 0.875)), "center_crop": size, "mean": list(mean), "std": list(std),
            "input_norm": cfg.MODEL.TRUNK.INPUT_NORM, "preprocess": [dict(e) for e in pre]}
    meta = {
        "split": split or Path(data_dir).name, "data_dir": os.path.abspath(data_dir),
        "weights": net.weights, "layout": net.layout,
        "architecture": json.loads(json.dumps(net.resolved.raw["MODEL"]["TRUNK"])),
        "resolution": size, "view": view,
        "feature_layer": FEATURE_LAYER, "normalized": False,
        "head": None if embs is None else {"file": "head.npy", "dim": int(arrays["head"].shape[1]),
                                            "normalized": True,
                                            "params": json.loads(json.dumps(net.resolved.raw["MODEL"]["HEAD"]["PARAMS"]))},
        "count": n, "feature_dim": int(arrays["features"].shape[1]), "bad": bad,
        "labelled": bool(ds.classes), "num_classes": len(ds.classes), "classes": list(ds.classes),
        "shapes": {k: list(v.shape) for k, v in arrays.items()}, "dtypes": {k: str(v.dtype) for k, v in arrays.items()},
        "world_size": info.world_size, "device": str(dev), "seconds": round(time.time() - t0, 3),
    }
    meta["files"] = [f"{k}.npy" for k in arrays] + ["paths.txt", "meta.json"]
    write_outputs(out, arrays, [p for p, _ in ds.samples], meta)
    return meta
