"""Indexed image datasets and the resumable distributed sampler.

The dataset's file list is sorted (class directories, then file names), so every rank and every restart gives
the same index to the same image: the memory bank and the k-means assignment table are keyed by it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import logging
import multiprocessing
import warnings

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from dcv2_k8s.data.layout import IMG_EXTENSIONS, MANIFEST, SPLIT_NAMES  # a staged directory's file kinds and file list
from dcv2_k8s.plural import count

log = logging.getLogger("dcv2")
MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused as decompression bombs (ImageNet's largest: ~20 MP)
MAX_REPLACEMENT_TRIES = 64


class ManifestMismatch(FileNotFoundError):
    """A staged directory whose manifest and files disagree (one line naming both)."""


class SplitMismatch(ValueError):
    """Train and validation splits whose class names differ (labels would be compared by index)."""


class DatasetRoot(FileNotFoundError):
    """A dataset's root (its split directories, e.g. ``train/`` and ``val/``) where one split's class folders were
    expected: its splits would become classes."""


def check_split_dir(root: str | os.PathLike, split: str = "train") -> None:
    """Raise :class:`DatasetRoot` (one line, naming the directory to give instead: ``root/SPLIT`` when it is there,
    ``split`` being what the caller reads) when ``root`` holds split directories rather than classes. The rule is
    staging's (``layout.SPLIT_NAMES``); every command that reads a split goes through
    :func:`scan_image_folder`, which applies it."""
    root = Path(root)
    splits = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES) \
        if root.is_dir() else []
    if splits:
        wanted = ("train",) if split == "train" else ("val", "valid", "validation", "test")
        first = next((s for w in wanted for s in splits if s.lower() == w), splits[0])
        raise DatasetRoot(f"{root} holds the dataset's splits ({', '.join(splits)}), not class folders: give one "
                          f"split, e.g. {root / first}")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted classes and ``(relative path, class index)`` samples of an ImageFolder tree.

    A directory holding split directories (``train/``, ``val/``) is refused (:func:`check_split_dir`). A staged
    directory's manifest (``layout.MANIFEST``, written by ``dcv2 stage``) is the file list when
    present, so indices are fixed by what was staged. When the directory no longer matches it (a file moved,
    deleted or added in a class folder), that is an error naming both, not a silent change of indices.
    """
    root = Path(root)
    check_split_dir(root)
    manifest = root / MANIFEST
    if manifest.is_file():
        files = sorted(entry[0] for entry in json.loads(manifest.read_text())["files"])
        missing = [rel for rel in files if not (root / rel).is_file()]
        listed = set(files)
        extra = [str(Path(d).relative_to(root) / f) for d, _, fs in os.walk(root) for f in fs
                 if Path(d) != root and not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)
                 and not any(part.startswith(".") for part in Path(d).relative_to(root).parts)
                 and str(Path(d).relative_to(root) / f) not in listed]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{count(len(missing), 'listed file')} missing (e.g. {missing[0]})")
            if extra:
                parts.append(f"{count(len(extra), 'image file')} not listed (e.g. {sorted(extra)[0]})")
            raise ManifestMismatch(f"{manifest} (the file list of this staged dataset) disagrees with {root}: "
                                   f"{' and '.join(parts)}; stage it again (dcv2 stage SRC {root}) to repair it, or "
                                   "delete the manifest to use the directory as it is")
        classes = sorted({Path(rel).parts[0] for rel in files})
        index = {c: i for i, c in enumerate(classes)}
        return classes, [(rel, index[Path(rel).parts[0]]) for rel in files]
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist; set config.DATA.TRAIN.DATA_PATHS=[DIR] "
                                "(or stage it with `dcv2 stage`)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = []
    for ci, cname in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cname):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root)
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    samples.append((str(rel / f), ci))
    if not samples:
        raise FileNotFoundError(f"dataset directory {root} has no images in class sub-directories "
                                "(expected ROOT/CLASS/IMAGE.jpg)")
    return classes, samples


def check_splits(train_root: str | os.PathLike, val_root: str | os.PathLike) -> list[str]:
    """The class names, when train and val hold the same ones; otherwise SplitMismatch (one line). An empty split
    raises FileNotFoundError from scan_image_folder, a dataset root DatasetRoot."""
    check_split_dir(train_root, "train")
    check_split_dir(val_root, "val")
    train, _ = scan_image_folder(train_root)
    val, _ = scan_image_folder(val_root)
    if train != val:
        only_t, only_v = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        what = []
        if only_t:
            what.append(f"only in train: {', '.join(only_t[:3])}{' ...' if len(only_t) > 3 else ''}")
        if only_v:
            what.append(f"only in val: {', '.join(only_v[:3])}{' ...' if len(only_v) > 3 else ''}")
        raise SplitMismatch(f"{train_root} ({len(train)} classes) and {val_root} ({len(val)} classes) do not hold the "
                            f"same classes ({'; '.join(what)}); a flat validation set needs `dcv2 stage --labels`")
    return train


class BadImage(Exception):
    """An image that cannot be used: unreadable, truncated, not an image, or too large."""


def to_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    """RGB version of ``img`` and what was converted ('' when it was RGB). Alpha is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} with alpha"
    return img.convert("RGB"), mode


def open_rgb(path: str | os.PathLike) -> tuple[Image.Image, str]:
    """Decode ``path`` fully as RGB; raise :class:`BadImage` with the reason when it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise BadImage(f"{img.width}x{img.height} pixels is above the {MAX_IMAGE_PIXELS} limit")
                img.load()  # decode now: a truncated file fails here, not later in a transform
                rgb, converted = to_rgb(img)
                return rgb.copy() if rgb is img else rgb, converted
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression-bomb limit: {e}") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from None


def sample_seed(seed: int, tag: int, index: int) -> int:
    """A per-sample augmentation seed: the same (seed, epoch tag, index) always gives the same crops."""
    return (seed * 1_000_003 + (tag + 2) * 2_147_483_659 + index * 6_364_136_223_846_793) % (2 ** 63)


class IndexedImageFolder(Dataset):
    """ImageFolder returning ``(index, transform(image))``; indexed by ``(aug_tag, index)`` pairs.

    ``aug_tag`` (the epoch, or -1 for the memory-bank fill pass) and the index seed the augmentation, so crops
    do not depend on worker count, worker scheduling or where a resumed run restarts.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, limit: int = -1,
                 seed: int = 0):
        self.root = Path(root)
        self.classes, samples = scan_image_folder(root)
        self.samples = samples[:limit] if limit and limit > 0 else samples
        self.targets = [c for _, c in self.samples]
        self.transform = transform
        self.seed = seed
        # images replaced so far, shared by every DataLoader worker (forked after this is created)
        self.bad_count = multiprocessing.get_context("fork").Value("i", 0)
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        return open_rgb(self.root / self.samples[index][0])[0]

    def load_or_replace(self, index: int) -> Image.Image:
        """The image at ``index``; a bad one is replaced by the next good image (deterministic), counted in
        ``bad_count`` and logged once per file in each process. The sample keeps its own index."""
        for k in range(MAX_REPLACEMENT_TRIES):
            j = (index + k) % len(self.samples)
            try:
                return self.load(j)
            except BadImage as e:
                if j not in self._reported:
                    self._reported.add(j)
                    with self.bad_count.get_lock():
                        self.bad_count.value += 1
                    log.warning("bad image %s (%s): using the next image in its place; run `dcv2 data check` "
                                "to list all", self.samples[j][0], e)
        raise RuntimeError(f"{MAX_REPLACEMENT_TRIES} consecutive unusable images from index {index} in {self.root}; "
                           "run `dcv2 data check` on the dataset")

    def __getstate__(self):  # a spawned worker gets a copy; the shared counter only works with fork
        state = dict(self.__dict__)
        state["bad_count"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.bad_count is None:
            self.bad_count = multiprocessing.get_context("fork").Value("i", 0)

    def __getitem__(self, key):
        tag, index = key if isinstance(key, tuple) else (0, key)
        img = self.load_or_replace(index)
        if self.transform is None:
            return index, img
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed(self.seed, tag, index))
            out = self.transform(img)
        return index, out


class ResumableDistributedSampler(Sampler):
    """DistributedSampler semantics (seeded shuffle per epoch, padded to a multiple of the world size) that
    yields ``(aug_tag, index)`` and can start part-way through an epoch (exact mid-epoch resume)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        self.n, self.num_replicas, self.rank, self.shuffle, self.seed = n, num_replicas, rank, shuffle, seed
        self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch, self.aug_tag, self.start = 0, 0, 0

    def set_epoch(self, epoch: int, start: int = 0, aug_tag: int | None = None) -> None:
        self.epoch, self.start = epoch, start
        self.aug_tag = epoch if aug_tag is None else aug_tag

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        pad = self.total_size - len(idx)
        if pad > 0:
            idx += (idx * math.ceil(pad / len(idx)))[:pad]
        return idx[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.indices()[self.start:]:
            yield self.aug_tag, i

    def __len__(self) -> int:
        return self.num_samples - self.start
