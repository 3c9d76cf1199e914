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

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted classes and ``(relative path, class index)`` samples of an ImageFolder tree.

    A staged directory's manifest (``.dcv2_manifest.json``, written by ``dcv2 stage``) is the file list when
    present, so indices do not depend on what else appears in the directory later.
    """
    root = Path(root)
    manifest = root / ".dcv2_manifest.json"
    if manifest.is_file():
        files = sorted(rel for rel, _ in json.loads(manifest.read_text())["files"])
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

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.root / self.samples[index][0]) as img:
            return img.convert("RGB")

    def __getitem__(self, key):
        tag, index = key if isinstance(key, tuple) else (0, key)
        img = self.load(index)
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
