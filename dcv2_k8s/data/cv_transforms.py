"""The multi-crop augmentation on OpenCV kernels (``DATA.TRAIN.AUG_BACKEND: opencv``).

Same transform list, same parameter distributions as the PIL chain in :mod:`dcv2_k8s.data.transforms` (the
reference's): RandomResizedCrop's sampling (10 tries on scale and log-ratio, then a centre crop), flip with
``p``, colour distortion (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) in a random order with p=0.8, grayscale p=0.2),
Gaussian blur with sigma ~ U(radius_min, radius_max) and ``p``, ToTensor, Normalize. Every random draw uses the
torch RNG, so the dataset's per-sample seeding makes crops reproducible as with the PIL chain.

What differs is the pixel arithmetic, not the distribution: brightness and contrast are 256-entry lookup
tables, saturation is a saturating blend with the ITU-R 601 grey (PIL's weights), hue is a shift of the 8-bit
hue channel (PIL's HSV has the same 0-255 hue range), resizing is torch's antialiased bilinear (the same
filter as PIL's) on uint8, and the blur is a true Gaussian where PIL approximates one with box blurs. These kernels are SIMD-vectorised, which is where the per-core speed comes from.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:
    import cv2
except ImportError:  # reported by validation when the backend is requested
    cv2 = None

_LEVELS = np.arange(256, dtype=np.float32)


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi))


def crop_params(height: int, width: int, scale, ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)``: torchvision's sampling on the torch RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1])
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)))
            left = int(torch.randint(0, width - w + 1, size=(1,)))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: torch.Tensor, size: int, scale) -> np.ndarray:
    """A RandomResizedCrop of the HWC uint8 tensor ``img``: torch's antialiased bilinear resize, which matches
    PIL's (the reference's) filter, on its vectorised uint8 path. Returns HWC uint8."""
    top, left, h, w = crop_params(img.shape[0], img.shape[1], scale)
    crop = img[top:top + h, left:left + w].permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def _lut(table: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def adjust_brightness(img: np.ndarray, f: float) -> np.ndarray:
    return cv2.LUT(img, _lut(_LEVELS * f))


def adjust_contrast(img: np.ndarray, f: float) -> np.ndarray:
    mean = int(float(_gray(img).mean()) + 0.5)  # PIL: the mean of the L image, rounded
    return cv2.LUT(img, _lut(mean + f * (_LEVELS - mean)))


def adjust_saturation(img: np.ndarray, f: float) -> np.ndarray:
    grey = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, f, grey, 1.0 - f, 0.0)


def adjust_hue(img: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(int(shift * 255) % 256)  # wraps around like PIL's uint8 hue
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


class ColorDistortion:
    """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with probability 0.8, then grayscale with probability 0.2."""

    def __init__(self, strength: float = 1.0, p_jitter: float = 0.8, p_gray: float = 0.2):
        s = strength
        self.ranges = [(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)] * 3 + [(-0.2 * s, 0.2 * s)]
        self.ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
        self.p_jitter, self.p_gray = p_jitter, p_gray

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if float(torch.rand(())) < self.p_jitter:
            order = torch.randperm(4).tolist()
            factors = [_uniform(lo, hi) for lo, hi in self.ranges]
            for i in order:
                if factors[i] != (0.0 if i == 3 else 1.0):  # the identity is skipped
                    img = self.ops[i](img, factors[i])
        if float(torch.rand(())) < self.p_gray:
            img = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
        return img


class GaussianBlur:
    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.lo, self.hi = p, radius_min, radius_max

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if float(torch.rand(())) >= self.p:
            return img
        sigma = self.lo + (self.hi - self.lo) * float(torch.rand(()))
        return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


class Flip:
    """Mirror left-right (``axis`` 1) or top-bottom (``axis`` 0) with probability ``p``."""

    def __init__(self, p: float = 0.5, axis: int = 1):
        self.p, self.axis = p, axis

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return cv2.flip(img, self.axis) if float(torch.rand(())) < self.p else img


class Invert:
    """``255 - img`` with probability ``p`` (torchvision's RandomInvert on uint8)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return cv2.bitwise_not(img) if float(torch.rand(())) < self.p else img


class ToTensorNormalize:
    """HWC uint8 -> CHW float32: ``/255`` (ToTensor) and, when given, ``(x - mean) / std``, in one pass.

    The pass is a per-channel 256-entry float lookup table; the result is a CHW view of the HWC array (the
    collate's stack makes the batch contiguous in its single copy)."""

    def __init__(self, mean=None, std=None):
        self.mean, self.std = mean, std
        mean, std = (mean or [0.0] * 3), (std or [1.0] * 3)
        self.lut = np.stack([(_LEVELS / 255 - m) / s for m, s in zip(mean, std)], axis=-1).astype(np.float32)
        self.lut = self.lut.reshape(256, 1, 3)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(cv2.LUT(np.ascontiguousarray(img), self.lut)).permute(2, 0, 1)


def normalize_into(ops: list, mean, std) -> None:
    """``Normalize`` folds into the preceding ``ToTensor`` (one lookup-table pass)."""
    if not ops or not isinstance(ops[-1], ToTensorNormalize) or ops[-1].mean is not None:
        raise ValueError("AUG_BACKEND opencv: Normalize must follow ToTensor")
    ops[-1] = ToTensorNormalize(list(mean), list(std))


class CvMultiCrop:
    """PIL image (or HWC uint8 array) -> list of ``total_num_crops`` tensors, large crops first. ``crops`` is the
    (size, scale range) of every crop; ``ops`` the per-crop operations built from the transform registry
    (``data/transforms.py``)."""

    def __init__(self, crops: list[tuple[int, tuple[float, float]]], ops: list):
        if cv2 is None:
            raise ImportError("AUG_BACKEND opencv needs opencv-python-headless (pip install "
                              "opencv-python-headless), or set config.DATA.TRAIN.AUG_BACKEND=pil")
        if not ops or not isinstance(ops[-1], ToTensorNormalize):
            raise ValueError("AUG_BACKEND opencv: the transform list must end with ToTensor (and Normalize)")
        self.crops, self.ops = crops, ops
        self.sizes = [size for size, _ in crops]

    def __call__(self, img) -> list[torch.Tensor]:
        arr = torch.from_numpy(np.array(img) if isinstance(img, Image.Image) else np.ascontiguousarray(img))
        out = []
        for size, scale in self.crops:
            x = resized_crop(arr, size, scale)
            for op in self.ops:
                x = op(x)
            out.append(x)
        return out


def limit_threads() -> None:
    """One OpenCV thread per process: DataLoader workers are the parallelism."""
    if cv2 is not None:
        cv2.setNumThreads(1)
