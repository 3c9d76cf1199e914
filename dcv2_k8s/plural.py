"""Counts in the lines dcv2 prints: "1 image", "2 images", "1 process", "3 processes"."""

from __future__ import annotations


def count(n: int, noun: str, plural: str = "") -> str:
    """``n`` and the noun, singular for exactly 1; the plural adds "es" after s, x, z, ch and sh, else "s"
    (``plural`` for any other)."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {plural or noun + ('es' if noun.endswith(('s', 'x', 'z', 'ch', 'sh')) else 's')}"
