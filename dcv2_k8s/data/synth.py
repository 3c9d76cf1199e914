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


# ------------------------------------------------------------------ held-out kinds (not used to tune the demo)
# Each stroke of a glyph: a polyline in a unit box (x right, y down), 0..1.
GLYPHS = {
    "zero": [[(0.5, 0.0), (0.85, 0.2), (0.85, 0.8), (0.5, 1.0), (0.15, 0.8), (0.15, 0.2), (0.5, 0.0)]],
    "one": [[(0.3, 0.2), (0.55, 0.0), (0.55, 1.0)], [(0.3, 1.0), (0.8, 1.0)]],
    "two": [[(0.15, 0.2), (0.45, 0.0), (0.8, 0.15), (0.8, 0.4), (0.15, 1.0), (0.85, 1.0)]],
    "three": [[(0.15, 0.05), (0.8, 0.05), (0.45, 0.45), (0.8, 0.6), (0.8, 0.9), (0.5, 1.0), (0.15, 0.9)]],
    "four": [[(0.65, 1.0), (0.65, 0.0), (0.1, 0.65), (0.9, 0.65)]],
    "five": [[(0.85, 0.0), (0.2, 0.0), (0.15, 0.45), (0.6, 0.4), (0.85, 0.65), (0.6, 1.0), (0.15, 0.9)]],
    "six": [[(0.75, 0.0), (0.25, 0.45), (0.15, 0.8), (0.5, 1.0), (0.85, 0.8), (0.75, 0.5), (0.4, 0.45),
             (0.2, 0.6)]],
    "seven": [[(0.1, 0.0), (0.9, 0.0), (0.4, 1.0)], [(0.35, 0.5), (0.75, 0.5)]],
    "eight": [[(0.5, 0.45), (0.2, 0.25), (0.5, 0.0), (0.8, 0.25), (0.5, 0.45), (0.15, 0.72), (0.5, 1.0),
               (0.85, 0.72), (0.5, 0.45)]],
    "nine": [[(0.8, 0.5), (0.5, 0.55), (0.2, 0.35), (0.35, 0.05), (0.7, 0.05), (0.8, 0.5), (0.3, 1.0)]],
}
NATURALS = ["clouds", "marble", "wood", "cells", "grass", "gravel", "weave", "bark", "ripples", "foam"]
ICONS = ["target", "house", "arrow", "cross_circle", "bars", "key", "eye", "flag", "hourglass", "bell"]
KINDS = ("textures", "shapes", "glyphs", "naturals", "icons")


def glyph_layout(rng: np.random.Generator, width: int, height: int) -> dict:
    """The nuisances of one glyph image, the first draws of its generator: size (``scale``, pixels), ``slant``,
    ``rotation``, centre (``cx``, ``cy``), foreground and background grey (``fg``, ``bg``) and ``stroke`` width.
    None of them depends on the class; ``benchmarks/glyph_probe.py`` asks which of them a network's features encode."""
    side = min(width, height)
    scale = side * rng.uniform(0.35, 0.55)
    slant, rot = rng.uniform(-0.3, 0.3), rng.uniform(-0.25, 0.25)
    m = 0.62 * scale  # half the glyph's extent, slant and jitter included
    cx, cy = rng.uniform(m, width - m), rng.uniform(m, height - m)
    fg, bg = (float(v) for v in rng.uniform(0, 255, 2))
    if abs(fg - bg) < 70:
        fg = bg + 70 if bg < 128 else bg - 70
    stroke = max(2, int(side * rng.uniform(0.06, 0.11)))
    return {"scale": scale, "slant": slant, "rotation": rot, "cx": cx, "cy": cy, "fg": fg, "bg": bg, "stroke": stroke}


def image_rng(seed: int, cls: int, index: int, split: str) -> np.random.Generator:
    """The generator of image ``index`` of class ``cls`` in ``split``: every image is reproducible on its own."""
    return np.random.default_rng([seed, cls, index, 0 if split == "train" else 1])


def make_glyph_image(cls: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One grey image of glyph ``cls`` (a digit-like stroke figure): each control point jittered, the glyph
    slanted, scaled, rotated a little and placed anywhere in the image, drawn with a random stroke width in a random grey
    level on another, with noise and a slight blur. Grey only: nothing but the stroke layout tells classes apart."""
    strokes = list(GLYPHS.values())[cls]
    g = glyph_layout(rng, width, height)
    scale, slant, cx, cy, fg, bg, w = (g[k] for k in ("scale", "slant", "cx", "cy", "fg", "bg", "stroke"))
    c, s = math.cos(g["rotation"]), math.sin(g["rotation"])
    img = Image.new("L", (width, height), int(bg))
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        pts = []
        for x, y in stroke:
            x, y = x - 0.5 + rng.normal(0, 0.04), y - 0.5 + rng.normal(0, 0.04)
            x = x * 0.8 + slant * y
            px, py = (x * c - y * s) * scale, (x * s + y * c) * scale
            pts.append((cx + px, cy + py))
        draw.line(pts, fill=int(fg), width=w, joint="curve")
        for p in (pts[0], pts[-1]):
            draw.ellipse([p[0] - w / 2, p[1] - w / 2, p[0] + w / 2, p[1] + w / 2], fill=int(fg))
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 10, (height, width))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB")


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1] with about ``cells`` features across the image (bicubic-upsampled random grid)."""
    low = rng.uniform(0, 1, (max(2, cells), max(2, cells)))
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _fractal(rng: np.random.Generator, width: int, height: int, base: int = 3, octaves: int = 4) -> np.ndarray:
    out = sum(_smooth_noise(rng, width, height, base * 2 ** o) / 2 ** o for o in range(octaves))
    out = out - out.min()
    return out / (out.max() + 1e-6)


def natural_field(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A [0, 1] grey field of the natural-looking texture ``kind`` at a random orientation, scale and phase."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(width, height)
    a = rng.uniform(0, np.pi)
    u = (xx * np.cos(a) + yy * np.sin(a)) / side
    v = (-xx * np.sin(a) + yy * np.cos(a)) / side
    turb = _fractal(rng, width, height)
    if kind == "clouds":
        return _fractal(rng, width, height, base=2, octaves=5)
    if kind == "marble":
        return 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 3.5) * u + 5.0 * turb)
    if kind == "wood":
        cx, cy = rng.uniform(-0.5, 1.5) * width, rng.uniform(-0.5, 1.5) * height
        r = np.hypot(xx - cx, (yy - cy) * 0.35) / side
        return (r * rng.uniform(6, 9) + 1.5 * turb) % 1.0
    if kind == "cells":
        n = int(rng.integers(10, 18))
        pts = rng.uniform(0, 1, (n, 2)) * [width, height]
        d = np.sort(np.hypot(xx[..., None] - pts[:, 0], yy[..., None] - pts[:, 1]), axis=-1)
        return np.clip((d[..., 1] - d[..., 0]) / (side * 0.12), 0, 1)
    if kind == "grass":
        img = Image.new("L", (width, height), 40)
        draw = ImageDraw.Draw(img)
        for _ in range(int(side * 2.5)):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            ln = side * rng.uniform(0.15, 0.35)
            t = a + rng.normal(0, 0.25)
            draw.line([(x, y), (x + ln * math.cos(t), y + ln * math.sin(t))], fill=int(rng.uniform(90, 255)),
                      width=1)
        return np.asarray(img, dtype=np.float32) / 255.0
    if kind == "gravel":
        img = Image.new("L", (width, height), int(rng.uniform(20, 60)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(side * 1.2)):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            rx, ry = side * rng.uniform(0.03, 0.07), side * rng.uniform(0.03, 0.07)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(rng.uniform(80, 255)))
        return np.asarray(img, dtype=np.float32) / 255.0
    if kind == "weave":
        f = rng.uniform(5, 7)
        over = np.sin(2 * np.pi * f * u) * np.sin(2 * np.pi * f * v) > 0
        thread = np.where(over, 0.5 + 0.5 * np.cos(4 * np.pi * f * v), 0.5 + 0.5 * np.cos(4 * np.pi * f * u))
        return np.clip(thread * 0.8 + 0.2 * turb, 0, 1)
    if kind == "bark":
        stretched = np.asarray(Image.fromarray((_smooth_noise(rng, 4, 40, 40) * 255).astype(np.uint8)).resize(
            (side * 2, side * 2), Image.BICUBIC).rotate(math.degrees(a)), dtype=np.float32) / 255.0
        o = side // 2
        return np.clip(np.abs(stretched[o:o + height, o:o + width] - 0.5) * 3 + 0.2 * turb, 0, 1)
    if kind == "ripples":
        return 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4, 6) * u + 1.2 * np.sin(2 * np.pi * 1.5 * v + 3 * turb))
    if kind == "foam":
        img = Image.new("L", (width, height), int(rng.uniform(150, 230)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(side * 0.8)):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            r = side * rng.uniform(0.02, 0.09)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=int(rng.uniform(0, 80)), width=1)
        return np.asarray(img, dtype=np.float32) / 255.0
    raise ValueError(kind)


def make_natural_image(cls: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One image of natural-looking texture ``cls`` (clouds, marble, wood, cells, grass, ...): the class's
    field at a random orientation, scale and phase, mapped through a random two-colour palette, with lighting
    (a soft random shading) and grain. Only the field's structure is shared within a class."""
    field = natural_field(NATURALS[cls], rng, width, height)
    c0, c1 = np.array(_random_color(rng), np.float32), np.array(_random_color(rng), np.float32)
    if np.abs(c0 - c1).sum() < 150:
        c1 = 255 - c0
    arr = c0 + field[..., None] * (c1 - c0)
    arr = arr * (0.75 + 0.5 * _smooth_noise(rng, width, height, 2))[..., None]
    arr += rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _icon_parts(name: str, r: float) -> list[tuple]:
    """The parts of an icon as (primitive, points or box, filled) in coordinates around (0, 0), radius r."""
    q = r / 4
    if name == "target":
        return [("ellipse", (-r, -r, r, r), False), ("ellipse", (-2 * q, -2 * q, 2 * q, 2 * q), True)]
    if name == "house":
        return [("polygon", [(-r, 0), (0, -r), (r, 0)], True), ("rect", (-3 * q, 0, 3 * q, r), True)]
    if name == "arrow":
        return [("rect", (-r, -q, q, q), True), ("polygon", [(q, -2.5 * q), (r, 0), (q, 2.5 * q)], True)]
    if name == "cross_circle":
        return [("ellipse", (-r, -r, r, r), False), ("rect", (-r, -q / 2, r, q / 2), True),
                ("rect", (-q / 2, -r, q / 2, r), True)]
    if name == "bars":
        return [("rect", (-r, -r, -2 * q, r), True), ("rect", (-q, -r / 2, q, r), True), ("rect", (2 * q, 0, r, r), True)]
    if name == "key":
        return [("ellipse", (-r, -2 * q, -r + 4 * q, 2 * q), False), ("rect", (0, -q / 2, r, q / 2), True),
                ("rect", (3 * q, 0, 3.6 * q, 2 * q), True)]
    if name == "eye":
        return [("ellipse", (-r, -2 * q, r, 2 * q), False), ("ellipse", (-1.5 * q, -1.5 * q, 1.5 * q, 1.5 * q), True)]
    if name == "flag":
        return [("rect", (-r, -r, -r + q / 1.5, r), True), ("polygon", [(-r, -r), (r, -r / 2), (-r, 0)], True)]
    if name == "hourglass":
        return [("polygon", [(-r, -r), (r, -r), (-r, r), (r, r)], True)]
    if name == "bell":
        return [("polygon", [(-2 * q, -r), (2 * q, -r), (r, 2 * q), (-r, 2 * q)], True),
                ("ellipse", (-q, 2 * q, q, r), True)]
    raise ValueError(name)


def make_icon_image(cls: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One image of icon ``cls`` (target, house, arrow, ...: two or three parts in a fixed layout): every part
    in its own random colour, the background a random two-colour gradient, the icon at a random place, size and
    rotation. Colour is the largest pixel difference between images and says nothing about the class."""
    side = min(width, height)
    t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    b0, b1 = np.array(_random_color(rng), np.float32), np.array(_random_color(rng), np.float32)
    bg = np.broadcast_to(b0 * (1 - t) + b1 * t, (height, width, 3)) + rng.normal(0, 6, (height, width, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    r = side * rng.uniform(0.25, 0.38)
    big = int(math.ceil(r * 2.4))
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    mean_bg = tuple(int(v) for v in (b0 + b1) / 2)
    o = big / 2
    for prim, geom, filled in _icon_parts(ICONS[cls], r):
        col = _far_color(rng, mean_bg) + (255,)
        w = max(2, int(r * 0.2))
        if prim == "polygon":
            draw.polygon([(o + x, o + y) for x, y in geom], fill=col)
        else:
            box = [o + geom[0], o + geom[1], o + geom[2], o + geom[3]]
            kw = {"fill": col} if filled else {"outline": col, "width": w}
            (draw.ellipse if prim == "ellipse" else draw.rectangle)(box, **kw)
    layer = layer.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR)
    x, y = int(rng.uniform(0, width - big)) if width > big else 0, int(rng.uniform(0, height - big)) if height > big else 0
    img.paste(layer, (x, y), layer)
    return img


_MAKERS = {"textures": make_texture_image, "glyphs": make_glyph_image, "naturals": make_natural_image,
           "icons": make_icon_image}


def class_name(cls: int, kind: str = "shapes") -> str:
    named = {"textures": TEXTURES, "glyphs": list(GLYPHS), "naturals": NATURALS, "icons": ICONS}
    if kind in named:
        return f"c{cls:02d}_{named[kind][cls]}"
    shape = SHAPES[cls % len(SHAPES)]
    return f"c{cls:02d}_{shape}{'_outline' if cls >= len(SHAPES) else ''}"


def generate(out_dir: str | Path, classes: int = 10, train_per_class: int = 100, val_per_class: int = 20,
             size: int = 64, photo_like: bool = False, seed: int = 0, quality: int = 90,
             progress: bool = True, kind: str = "textures") -> dict:
    """Write ``out_dir/train/CLASS/*.jpg`` and ``out_dir/val/CLASS/*.jpg``; return a summary dict.

    ``kind``: ``textures`` (a class is a pattern family: stripes, checks, dots, ...; the default) or ``shapes``
    (a class is a shape). ``photo_like`` makes 500x375 noisy photos (ImageNet-like sizes, ~100 KB JPEGs).
    """
    if kind not in KINDS:
        raise ValueError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    from tqdm import tqdm

    limit = 2 * len(SHAPES) if kind == "shapes" else 10
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
        rng = image_rng(seed, c, i, split)
        if photo_like or kind == "shapes":
            img = make_image(c, rng, width, height, photo_like)
        else:
            img = _MAKERS[kind](c, rng, width, height)
        img.save(path, quality=quality)
    summary = {"kind": kind, "classes": classes, "train": classes * train_per_class, "val": classes * val_per_class,
               "width": width, "height": height, "seed": seed}
    (out / "synth.json").write_text(json.dumps(summary, indent=1))
    return summary
