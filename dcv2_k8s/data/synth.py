"""Generate an ImageFolder of JPEGs with real class structure, for demos, tests and benchmarks.

``textures`` (default): a class is a pattern family (stripes, checker, dots, rings, ...); colours, period,
phase, angle and a shape drawn on top are nuisances. ``shapes``: a class is a shape (circle, ring, square, ...;
above 10 classes the outlined variants are added); colours, position, scale and rotation are nuisances.
Colour dominates raw pixels in both, so features that ignore it (which multi-crop + colour distortion
teaches) are needed to tell the classes apart. Colour and position dominate raw pixels, so features that
ignore them (which multi-crop + colour distortion teaches) are needed to tell classes apart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ["circle", "ring", "square", "triangle", "star", "plus", "hexagon", "crescent", "lshape", "dumbbell"]


def _polygon(n: int, r: float, rot: float, cx: float, cy: float, inner: float | None = None) -> list:
    pts = []
    k = 2 * n if inner else n
    for i in range(k):
        rad = (inner if inner and i % 2 else r)
        a = rot + 2 * math.pi * i / k
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _rotated(points: list, rot: float, cx: float, cy: float) -> list:
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill, bg,
               outline_only: bool) -> None:
    w = max(2, int(r * 0.18))
    kw = {"outline": fill, "width": w} if outline_only else {"fill": fill}
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **kw)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(4, r * 1.2, rot, cx, cy), **kw)
    elif shape == "triangle":
        draw.polygon(_polygon(3, r * 1.25, rot, cx, cy), **kw)
    elif shape == "star":
        draw.polygon(_polygon(5, r * 1.25, rot, cx, cy, inner=r * 0.5), **kw)
    elif shape == "hexagon":
        draw.polygon(_polygon(6, r * 1.1, rot, cx, cy), **kw)
    elif shape == "plus":
        a, b = r * 1.1, r * 0.35
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]
        draw.polygon(_rotated(pts, rot, cx, cy), **kw)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ox, oy = cx + 0.55 * r * math.cos(rot), cy + 0.55 * r * math.sin(rot)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=bg)
    elif shape == "lshape":
        a, b = r * 1.1, r * 0.4
        pts = [(-a, -a), (-a + 2 * b, -a), (-a + 2 * b, a - 2 * b), (a, a - 2 * b), (a, a), (-a, a)]
        draw.polygon(_rotated(pts, rot, cx, cy), **kw)
    elif shape == "dumbbell":
        d, rr = r * 0.7, r * 0.45
        (x1, y1), (x2, y2) = _rotated([(-d, 0), (d, 0)], rot, cx, cy)
        draw.line([(x1, y1), (x2, y2)], fill=fill, width=max(2, int(r * 0.25)))
        for x, y in ((x1, y1), (x2, y2)):
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], **kw)


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _far_color(rng: np.random.Generator, other: tuple) -> tuple[int, int, int]:
    for _ in range(20):
        c = _random_color(rng)
        if sum(abs(a - b) for a, b in zip(c, other)) > 200:
            return c
    return tuple(255 - v for v in other)


TEXTURES = ["stripes", "checker", "dots", "rings", "zigzag", "grid", "waves", "blobs", "hatch", "bricks"]


def texture_mask(kind: str, rng: np.random.Generator, width: int, height: int, angle: float) -> np.ndarray:
    """A boolean pattern of family ``kind`` at ``angle`` with a random period and phase (and centre for rings)."""
    side = min(width, height)
    period = side / rng.uniform(3.0, 4.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = angle
    u = (xx * np.cos(a) + yy * np.sin(a)) / period * 2 * np.pi + rng.uniform(0, 2 * np.pi)
    v = (-xx * np.sin(a) + yy * np.cos(a)) / period * 2 * np.pi + rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        return np.sin(u) > 0
    if kind == "checker":
        return np.sin(u) * np.sin(v) > 0
    if kind == "dots":
        fu, fv = (u / (2 * np.pi)) % 1 - 0.5, (v / (2 * np.pi)) % 1 - 0.5
        return fu * fu + fv * fv < 0.07
    if kind == "rings":
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        return np.sin(np.hypot(xx - cx, yy - cy) / period * 2 * np.pi) > 0
    if kind == "zigzag":
        tri = np.abs((v / np.pi) % 2 - 1)
        return np.sin(u + 2.5 * tri) > 0
    if kind == "grid":
        return (np.cos(u) > 0.8) | (np.cos(v) > 0.8)
    if kind == "waves":
        return np.sin(u + 1.5 * np.sin(v * 0.5)) > 0
    if kind == "blobs":
        low = rng.normal(0, 1, (max(2, height // 10), max(2, width // 10)))
        img = Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-6) * 255).astype(np.uint8))
        return np.asarray(img.resize((width, height), Image.BICUBIC)) > 128
    if kind == "hatch":
        return (np.sin(u) > 0.6) | (np.sin((u + v) * 0.7071) > 0.6)
    if kind == "bricks":
        row = np.floor(v / (2 * np.pi))
        shifted = u + np.pi * (row % 2)
        return ((v / (2 * np.pi)) % 1 > 0.15) & ((shifted / (2 * np.pi)) % 1 > 0.12)
    raise ValueError(kind)


def make_texture_image(cls: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One image of texture class ``cls``: the class's pattern family at the class's angle, a random period
    and phase, in two random grey levels with noise, under a random coloured shape (a nuisance).

    Only the pattern is shared within a class. The grey levels are random per image (colour distortion
    scrambles them) and the angle is fixed per class: a per-image random angle would be an image property that
    survives cropping, which a clustering method could group on instead of the pattern."""
    lo, hi = sorted(rng.uniform(0, 255, 2))
    if hi - lo < 60:
        lo, hi = max(0.0, lo - 30), min(255.0, hi + 30)
    angle = np.pi * cls / len(TEXTURES)
    mask = texture_mask(TEXTURES[cls % len(TEXTURES)], rng, width, height, angle)
    arr = np.where(mask, hi, lo)[..., None].repeat(3, -1) + rng.normal(0, 8, (height, width, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    side = min(width, height)
    r = side * rng.uniform(0.1, 0.18)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    draw_shape(ImageDraw.Draw(img), SHAPES[int(rng.integers(0, len(SHAPES)))], cx, cy, r,
               rng.uniform(0, 2 * math.pi), _random_color(rng), (int(lo),) * 3, False)
    return img


def make_image(cls: int, rng: np.random.Generator, width: int, height: int, photo_like: bool = False) -> Image.Image:
    """One image of class ``cls``: the class's shape in a random colour, at a random place, size and angle, on a
    random flat background with noise. Only the shape is shared within a class: backgrounds carry no structure
    (a gradient or clutter would be a cue that survives cropping and colour distortion, easier than shape).
    ``photo_like`` adds gradients, clutter, blur and grain for ImageNet-like file sizes (benchmarks)."""
    shape = SHAPES[cls % len(SHAPES)]
    outline_only = cls >= len(SHAPES)
    bg = _random_color(rng)
    arr = np.broadcast_to(np.array(bg, dtype=np.float32), (height, width, 3)).copy()
    if photo_like:
        t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0)
        arr = arr * (1 - t) + np.array(_random_color(rng), dtype=np.float32) * t
    arr += rng.normal(0, 25 if photo_like else 8, (height, width, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    if photo_like:
        for _ in range(int(rng.integers(0, 4))):  # clutter
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            s = side * rng.uniform(0.03, 0.08)
            draw.rectangle([x - s, y - s, x + s, y + s], fill=_random_color(rng))
    r = side * rng.uniform(0.2, 0.34)
    cx, cy = rng.uniform(r * 1.2, width - r * 1.2), rng.uniform(r * 1.2, height - r * 1.2)
    draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), _far_color(rng, bg), tuple(bg), outline_only)
    if photo_like:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
        fine = rng.normal(0, 9, (height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + fine, 0, 255).astype(np.uint8))
    return img


def class_name(cls: int, kind: str = "shapes") -> str:
    if kind == "textures":
        return f"c{cls:02d}_{TEXTURES[cls]}"
    shape = SHAPES[cls % len(SHAPES)]
    return f"c{cls:02d}_{shape}{'_outline' if cls >= len(SHAPES) else ''}"


def generate(out_dir: str | Path, classes: int = 10, train_per_class: int = 100, val_per_class: int = 20,
             size: int = 64, photo_like: bool = False, seed: int = 0, quality: int = 90,
             progress: bool = True, kind: str = "textures") -> dict:
    """Write ``out_dir/train/CLASS/*.jpg`` and ``out_dir/val/CLASS/*.jpg``; return a summary dict.

    ``kind``: ``textures`` (a class is a pattern family: stripes, checks, dots, ...; the default) or ``shapes``
    (a class is a shape). ``photo_like`` makes 500x375 noisy photos (ImageNet-like sizes, ~100 KB JPEGs).
    """
    if kind not in ("textures", "shapes"):
        raise ValueError(f"--kind {kind}: choose textures or shapes")
    from tqdm import tqdm

    limit = len(TEXTURES) if kind == "textures" else 2 * len(SHAPES)
    if not 2 <= classes <= limit:
        raise ValueError(f"--classes must be between 2 and {limit} for --kind {kind}")
    out = Path(out_dir)
    width, height = (500, 375) if photo_like else (size, size)
    jobs = [(split, c, i) for split, n in (("train", train_per_class), ("val", val_per_class))
            for c in range(classes) for i in range(n)]
    for split, c, i in tqdm(jobs, desc="synth", unit="img", disable=not progress, mininterval=1.0):
        path = out / split / class_name(c, kind) / f"{split}_{c:02d}_{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, c, i, 0 if split == "train" else 1])
        img = make_texture_image(c, rng, width, height) if kind == "textures" and not photo_like \
            else make_image(c, rng, width, height, photo_like)
        img.save(path, quality=quality)
    summary = {"kind": kind, "classes": classes, "train": classes * train_per_class, "val": classes * val_per_class,
               "width": width, "height": height, "seed": seed}
    (out / "synth.json").write_text(json.dumps(summary, indent=1))
    return summary
