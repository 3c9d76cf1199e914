"""Multi-crop augmentation built from VISSL's ``DATA.TRAIN.TRANSFORMS`` list.

Supported entries (VISSL names and arguments): ``ImgPilToMultiCrop`` (total_num_crops, num_crops, size_crops,
crop_scales), ``RandomHorizontalFlip`` (p), ``ImgPilColorDistortion`` (strength: ColorJitter(0.8s, 0.8s, 0.8s,
0.2s) with p=0.8 then RandomGrayscale p=0.2), ``ImgPilGaussianBlur`` (p, radius_min, radius_max; PIL's
Gaussian blur as the reference), ``ImgPilRandomGrayscale`` (p), ``ColorJitter`` (PIL backend only) and ``RandomInvert`` (p;
torchvision's), ``ToTensor``, ``Normalize`` (mean, std). Every transform after
ImgPilToMultiCrop applies to each crop independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from dcv2_k8s.schema import Transform, multicrop_of
from dcv2_k8s.data import cv_transforms as cvt


class PilGaussianBlur(torch.nn.Module):
    """PIL Gaussian blur with probability ``p`` and radius ~ U(radius_min, radius_max) (torch RNG)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        super().__init__()
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def forward(self, img: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def color_distortion(strength: float = 1.0) -> v2.Compose:
    s = strength
    return v2.Compose([v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                       v2.RandomGrayscale(p=0.2)])


def _pil_to_tensor(args: dict) -> torch.nn.Module:
    return v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])


def _cv(build: Callable[[dict], Any]) -> Callable[[dict, list], None]:
    """An OpenCV op that appends itself to the list of per-crop ops."""
    return lambda args, ops: ops.append(build(args))


@dataclass(frozen=True)
class Op:
    """How one VISSL transform name is built by each backend: ``pil(args) -> module``; ``opencv(args, ops)`` adds
    to the OpenCV op list (None: no OpenCV version, config validation says so)."""

    pil: Callable[[dict], Any] | None
    opencv: Callable[[dict, list], None] | None
    multicrop: bool = False


MULTICROP = "ImgPilToMultiCrop"
# The one registry of transform names: config validation, the PIL backend and the OpenCV backend read it.
TRANSFORMS: dict[str, Op] = {
    MULTICROP: Op(None, None, multicrop=True),
    "RandomHorizontalFlip": Op(lambda a: v2.RandomHorizontalFlip(p=a.get("p", 0.5)),
                               _cv(lambda a: cvt.Flip(a.get("p", 0.5)))),
    "RandomVerticalFlip": Op(lambda a: v2.RandomVerticalFlip(p=a.get("p", 0.5)),
                             _cv(lambda a: cvt.Flip(a.get("p", 0.5), axis=0))),
    "ImgPilColorDistortion": Op(lambda a: color_distortion(a.get("strength", 1.0)),
                                _cv(lambda a: cvt.ColorDistortion(a.get("strength", 1.0)))),
    "ImgPilRandomGrayscale": Op(lambda a: v2.RandomGrayscale(p=a.get("p", 0.2)),
                                _cv(lambda a: cvt.ColorDistortion(p_jitter=0.0, p_gray=a.get("p", 0.2)))),
    "ImgPilGaussianBlur": Op(lambda a: PilGaussianBlur(a.get("p", 0.5), a.get("radius_min", 0.1),
                                                       a.get("radius_max", 2.0)),
                             _cv(lambda a: cvt.GaussianBlur(a.get("p", 0.5), a.get("radius_min", 0.1),
                                                            a.get("radius_max", 2.0)))),
    "ColorJitter": Op(lambda a: v2.ColorJitter(**a), None),
    # torchvision's name (VISSL takes torchvision transforms by name): flips dark and light, for data whose
    # polarity says nothing about the class (dark-on-light and light-on-dark glyphs)
    "RandomInvert": Op(lambda a: v2.RandomInvert(p=a.get("p", 0.5)), _cv(lambda a: cvt.Invert(a.get("p", 0.5)))),
    "ToTensor": Op(_pil_to_tensor, _cv(lambda a: cvt.ToTensorNormalize())),
    "Normalize": Op(lambda a: v2.Normalize(mean=list(a["mean"]), std=list(a["std"])),
                    lambda a, ops: cvt.normalize_into(ops, a["mean"], a["std"])),
}


def _entries(transforms) -> list[dict]:
    return [t.as_dict() if isinstance(t, Transform) else dict(t) for t in transforms]


def _args(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "name"}


def _op(name: str) -> Op:
    if name not in TRANSFORMS:
        raise ValueError(f"unsupported transform {name!r}; choose from {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]


class MultiCrop:
    """PIL image -> list of ``total_num_crops`` tensors, large crops first (crop-major order)."""

    def __init__(self, transforms):
        entries = _entries(transforms)
        spec = multicrop_of(entries)
        self.crops = [v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BILINEAR,
                                           antialias=True) for size, scale in spec.crops]
        self.per_crop = v2.Compose([_op(t["name"]).pil(_args(t)) for t in entries if not _op(t["name"]).multicrop])
        self.sizes = spec.sizes

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.per_crop(crop(img)) for crop in self.crops]


def eval_transform(size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> v2.Compose:
    """Resize the short side to size/0.875 and center-crop ``size`` (the standard evaluation view)."""
    return v2.Compose([v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size), v2.PILToTensor(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


AUG_BACKENDS = ("pil", "opencv")


def build_multicrop(transforms, backend: str = "pil"):
    """The multi-crop transform of a ``DATA.TRAIN.TRANSFORMS`` list (typed entries or dicts) for
    ``DATA.TRAIN.AUG_BACKEND``: ``pil`` (the reference's kernels) or ``opencv`` (the same distributions on SIMD
    kernels, see :mod:`dcv2_k8s.data.cv_transforms`)."""
    if backend == "pil":
        return MultiCrop(transforms)
    if backend != "opencv":
        raise ValueError(f"AUG_BACKEND {backend!r}: choose one of {', '.join(AUG_BACKENDS)}")
    entries = _entries(transforms)
    ops: list = []
    for t in entries:
        op = _op(t["name"])
        if op.multicrop:
            continue
        if op.opencv is None:
            raise ValueError(f"transform {t['name']!r} has no opencv version; use config.DATA.TRAIN.AUG_BACKEND=pil")
        op.opencv(_args(t), ops)
    return cvt.CvMultiCrop(multicrop_of(entries).crops, ops)
