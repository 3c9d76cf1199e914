"""Held-out real data for the small-scale benchmark: handwritten digits nobody here generated or tuned on.

The images are scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits" set (1,797 digits written
by 43 people, 8 x 8 grey levels 0-16; ``sklearn.datasets.load_digits``, shipped inside the package, so nothing is
downloaded). Benchmarks only: ``pip install scikit-learn``. Three variants, written as ImageFolder splits
``train/0..9`` and ``val/0..9`` (the first ``train_per_class`` digits of each class train, the rest validate):

- ``digits``: each digit scaled to 5/6 of the image and centred, dark ink on light paper;
- ``digits_placed``: each digit at a random scale (35-65 % of the image) and place, ink and paper tones random;
- ``digits_cluttered``: as placed, plus 3-6 random pen strokes and a half-size fragment of another digit
  anywhere in the image (the clutter defeats any crop to "what differs from the background").

    python benchmarks/heldout_digits.py OUT --kind digits_placed --size 64
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("digits", "digits_placed", "digits_cluttered")


def _load():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the held-out digits need scikit-learn (benchmarks only): pip install scikit-learn") from None
    d = load_digits()
    return d.images / 16.0, d.target  # ink in [0, 1]


def _ink(digit: np.ndarray, side: int) -> np.ndarray:
    """An 8 x 8 ink map scaled to ``side`` px (bicubic, clipped to [0, 1])."""
    img = Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32) / 255.0, 0, 1)


def render(kind: str, digit: np.ndarray, other: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of ``kind``: the ink map ``digit`` on paper (``other``: the digit whose fragment is clutter)."""
    ink = np.zeros((size, size), np.float32)
    if kind == "digits":
        side = size * 5 // 6
        paper, pen = np.array([235.0, 235, 230]), np.array([25.0, 25, 35])
        x = y = (size - side) // 2
    else:
        side = int(size * rng.uniform(0.35, 0.65))
        paper = rng.uniform(170, 250, 3)
        pen = rng.uniform(0, 90, 3)
        x, y = rng.integers(0, size - side + 1, 2)
    ink[y:y + side, x:x + side] = _ink(digit, side)
    if kind == "digits_cluttered":
        strokes = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(strokes)
        for _ in range(rng.integers(3, 7)):
            pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(rng.integers(2, 4))]
            draw.line(pts, fill=int(rng.uniform(120, 255)), width=int(rng.integers(1, 3)))
        ink = np.maximum(ink, np.asarray(strokes, np.float32) / 255.0)
        fside = max(4, side // 2)
        fx, fy = rng.integers(0, size - fside + 1, 2)
        frag = _ink(other, fside)
        ink[fy:fy + fside, fx:fx + fside] = np.maximum(ink[fy:fy + fside, fx:fx + fside], frag)
    rgb = paper[None, None, :] * (1 - ink[..., None]) + pen[None, None, :] * ink[..., None]
    rgb += rng.normal(0, 4, rgb.shape)  # scanner noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def write(out: str, kind: str, size: int, train_per_class: int = 140, seed: int = 0) -> dict:
    """Write ``out/train`` and ``out/val`` of ``kind``; return the counts per split."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
    images, targets = _load()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    seen = {c: 0 for c in range(10)}
    for i, (digit, c) in enumerate(zip(images, targets)):
        split = "train" if seen[c] < train_per_class else "val"
        seen[c] += 1
        folder = os.path.join(out, split, str(c))
        os.makedirs(folder, exist_ok=True)
        other = images[int(rng.integers(len(images)))]
        render(kind, digit, other, size, rng).save(os.path.join(folder, f"{i:04d}.png"))
        counts[split] += 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--kind", choices=KINDS, default="digits")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--train-per-class", type=int, default=140)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write(a.out, a.kind, a.size, a.train_per_class, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
