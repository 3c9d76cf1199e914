"""Multi-crop augmentation built from VISSL's ``DATA.TRAIN.TRANSFORMS`` list.

Supported entries (VISSL names and arguments): ``ImgPilToMultiCrop`` (total_num_crops, num_crops, size_crops,
crop_scales), ``RandomHorizontalFlip`` (p), ``ImgPilColorDistortion`` (strength: ColorJitter(0.8s, 0.8s, 0.8s,
0.2s) with p=0.8 then RandomGrayscale p=0.2), ``ImgPilGaussianBlur`` (p, radius_min, radius_max; PIL's
Gaussian blur as the reference), ``ToTensor``, ``Normalize`` (mean, std). Every transform after
ImgPilToMultiCrop applies to each crop independently.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2


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


def _per_crop(entry: dict) -> torch.nn.Module:
    name = entry["name"]
    args = {k: v for k, v in entry.items() if k != "name"}
    if name == "RandomHorizontalFlip":
        return v2.RandomHorizontalFlip(p=args.get("p", 0.5))
    if name == "ImgPilColorDistortion":
        return color_distortion(args.get("strength", 1.0))
    if name == "ColorJitter":
        return v2.ColorJitter(**args)
    if name == "ImgPilRandomGrayscale":
        return v2.RandomGrayscale(p=args.get("p", 0.2))
    if name == "ImgPilGaussianBlur":
        return PilGaussianBlur(args.get("p", 0.5), args.get("radius_min", 0.1), args.get("radius_max", 2.0))
    if name == "ToTensor":
        return v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    if name == "Normalize":
        return v2.Normalize(mean=list(args["mean"]), std=list(args["std"]))
    raise ValueError(f"unsupported transform {name!r}")


class MultiCrop:
    """PIL image -> list of ``total_num_crops`` tensors, large crops first (crop-major order)."""

    def __init__(self, transforms: list[dict]):
        entries = [dict(t) for t in transforms]
        mc = next(t for t in entries if t["name"] == "ImgPilToMultiCrop")
        self.crops = []
        for n, size, scale in zip(mc["num_crops"], mc["size_crops"], mc["crop_scales"]):
            rrc = v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BILINEAR,
                                       antialias=True)
            self.crops += [rrc] * n
        self.per_crop = v2.Compose([_per_crop(t) for t in entries if t["name"] != "ImgPilToMultiCrop"])
        self.sizes = [size for n, size in zip(mc["num_crops"], mc["size_crops"]) for _ in range(n)]

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.per_crop(crop(img)) for crop in self.crops]


def eval_transform(size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> v2.Compose:
    """Resize the short side to size/0.875 and center-crop ``size`` (the standard evaluation view)."""
    return v2.Compose([v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size), v2.PILToTensor(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def normalize_params(transforms: list[dict]) -> tuple[list[float], list[float]]:
    for t in transforms:
        if t["name"] == "Normalize":
            return list(t["mean"]), list(t["std"])
    return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


AUG_BACKENDS = ("pil", "opencv")


def build_multicrop(transforms: list[dict], backend: str = "pil"):
    """The multi-crop transform for ``DATA.TRAIN.AUG_BACKEND``: ``pil`` (the reference's kernels) or ``opencv``
    (the same distributions on SIMD kernels, see :mod:`dcv2_k8s.data.cv_transforms`)."""
    if backend == "opencv":
        from dcv2_k8s.data.cv_transforms import CvMultiCrop

        return CvMultiCrop(transforms)
    if backend != "pil":
        raise ValueError(f"AUG_BACKEND {backend!r}: choose one of {', '.join(AUG_BACKENDS)}")
    return MultiCrop(transforms)
