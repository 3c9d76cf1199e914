"""Multi-crop augmentation built from VISSL's ``DATA.TRAIN.TRANSFORMS`` list.

Supported entries (VISSL names and arguments): ``ImgPilToMultiCrop`` (total_num_crops, num_crops, size_crops,
crop_scales), ``RandomHorizontalFlip`` (p), ``ImgPilColorDistortion`` (strength: ColorJitter(0.8s, 0.8s, 0.8s,
0.2s) with p=0.8 then RandomGrayscale p=0.2), ``ImgPilGaussianBlur`` (p, radius_min, radius_max; PIL's
Gaussian blur as the reference), ``ImgPilRandomGrayscale`` (p), ``ColorJitter`` (PIL backend only) and ``RandomInvert`` (p;
torchvision's), ``ToTensor``, ``Normalize`` (mean, std). Every transform after
ImgPilToMultiCrop applies to each crop independently.

Whole-image preprocessing, listed *before* ImgPilToMultiCrop, applies to the image before its crops are cut and
to every evaluation view too (k-NN monitor, ``dcv2 knn``, linear evaluation, ``dcv2 clusters``), so that the
network is scored on the images it was trained on: ``ImgPilCropToContent`` (threshold, margin; our own, not a
VISSL name), for one object or figure on a flat background.
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


class CropToContent(torch.nn.Module):
    """Crop an image to its content: the background is the image's median grey level, content every pixel whose
    grey level (after a 3 x 3 mean filter, so that pixel noise does not count) differs from it by more than
    ``threshold``; the crop is the square around the content's bounding box, ``margin`` x its larger side wider,
    filled with the background grey where it leaves the image. An image without content, or whose content spans
    90 % or more of both its sides (a texture, a photo), is returned unchanged. Deterministic: the same image gives
    the same crop in training and in evaluation."""

    def __init__(self, threshold: float = 35.0, margin: float = 0.25):
        super().__init__()
        if not threshold > 0 or not margin >= 0:
            raise ValueError(f"ImgPilCropToContent: threshold {threshold} must be > 0 and margin {margin} >= 0")
        self.threshold, self.margin = float(threshold), float(margin)

    def forward(self, img: Image.Image) -> Image.Image:
        import numpy as np

        grey = np.asarray(img.convert("L").filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
        bg = float(np.median(grey))
        ys, xs = np.nonzero(np.abs(grey - bg) > self.threshold)
        if not len(xs) or (xs.max() - xs.min() + 1 >= 0.9 * grey.shape[1] and
                           ys.max() - ys.min() + 1 >= 0.9 * grey.shape[0]):
            return img
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        side = max(2, int(round(max(xs.max() - xs.min(), ys.max() - ys.min()) * (1 + self.margin) + 4)))
        left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
        fill = tuple(int(v) for v in np.median(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0))
        out = Image.new("RGB", (side, side), fill)
        out.paste(img.convert("RGB"), (-left, -top))
        return out


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
    pre: bool = False  # whole-image preprocessing: before ImgPilToMultiCrop, and in every evaluation view


MULTICROP = "ImgPilToMultiCrop"
# The one registry of transform names: config validation, the PIL backend and the OpenCV backend read it.
TRANSFORMS: dict[str, Op] = {
    MULTICROP: Op(None, None, multicrop=True),
    "ImgPilCropToContent": Op(lambda a: CropToContent(a.get("threshold", 35.0), a.get("margin", 0.25)), None,
                              pre=True),
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


def preprocess(transforms) -> list:
    """The whole-image preprocessing modules of a transform list (its ``pre`` entries, in order)."""
    return [_op(t["name"]).pil(_args(t)) for t in _entries(transforms) if _op(t["name"]).pre]


class MultiCrop:
    """PIL image -> list of ``total_num_crops`` tensors, large crops first (crop-major order)."""

    def __init__(self, transforms):
        entries = _entries(transforms)
        spec = multicrop_of(entries)
        self.crops = [v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BILINEAR,
                                           antialias=True) for size, scale in spec.crops]
        self.per_crop = v2.Compose([_op(t["name"]).pil(_args(t)) for t in entries
                                    if not (_op(t["name"]).multicrop or _op(t["name"]).pre)])
        self.sizes = spec.sizes

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.per_crop(crop(img)) for crop in self.crops]


class Preprocessed:
    """Whole-image preprocessing, then a multi-crop transform."""

    def __init__(self, pre: list, multicrop):
        self.pre, self.multicrop, self.sizes = pre, multicrop, multicrop.sizes

    def __call__(self, img):
        for op in self.pre:
            img = op(img)
        return self.multicrop(img)


def eval_transform(size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), pre=()) -> v2.Compose:
    """Resize the short side to size/0.875 and center-crop ``size`` (the standard evaluation view), after the
    training list's whole-image preprocessing ``pre`` (its entries before ImgPilToMultiCrop, see
    :func:`preprocess`)."""
    return v2.Compose([*preprocess(pre), v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size),
                       v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


AUG_BACKENDS = ("pil", "opencv")


def build_multicrop(transforms, backend: str = "pil"):
    """The multi-crop transform of a ``DATA.TRAIN.TRANSFORMS`` list (typed entries or dicts) for
    ``DATA.TRAIN.AUG_BACKEND``: ``pil`` (the reference's kernels) or ``opencv`` (the same distributions on SIMD
    kernels, see :mod:`dcv2_k8s.data.cv_transforms`). Whole-image preprocessing (PIL, both backends) comes first."""
    pre = preprocess(transforms)
    if backend == "pil":
        multicrop = MultiCrop(transforms)
        return Preprocessed(pre, multicrop) if pre else multicrop
    if backend != "opencv":
        raise ValueError(f"AUG_BACKEND {backend!r}: choose one of {', '.join(AUG_BACKENDS)}")
    entries = _entries(transforms)
    ops: list = []
    for t in entries:
        op = _op(t["name"])
        if op.multicrop or op.pre:
            continue
        if op.opencv is None:
            raise ValueError(f"transform {t['name']!r} has no opencv version; use config.DATA.TRAIN.AUG_BACKEND=pil")
        op.opencv(_args(t), ops)
    multicrop = cvt.CvMultiCrop(multicrop_of(entries).crops, ops)
    return Preprocessed(pre, multicrop) if pre else multicrop
