"""Agreement of two partitions of the same items: normalized mutual information and the adjusted Rand index.

Both as scikit-learn defines them (``normalized_mutual_info_score`` with the arithmetic mean of the entropies,
``adjusted_rand_score``), in numpy over the non-empty cells of the contingency table only, so a partition into
many clusters costs no dense ``[classes, clusters]`` table. Invariant to renaming the labels of either side.
"""

from __future__ import annotations

import numpy as np


def _contingency(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The non-empty cells of the contingency table of ``a`` x ``b``: ``(counts, their row, their column, row sums,
    column sums, n)``."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"the partitions label different numbers of items ({a.size} and {b.size})")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    ia, ib = ia.ravel().astype(np.int64), ib.ravel().astype(np.int64)
    k = int(ib.max(initial=0)) + 1
    keys, counts = np.unique(ia * k + ib, return_counts=True)
    return (counts.astype(np.float64), keys // k, keys % k, np.bincount(ia).astype(np.float64),
            np.bincount(ib).astype(np.float64), a.size)


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def nmi(a, b) -> float:
    """Normalized mutual information, ``I(a; b) / mean(H(a), H(b))``: 1 for the same partition (labels renamed
    or not), about 0 for independent ones. Two one-block partitions (no information either side) agree: 1."""
    cells, i, j, rows, cols, n = _contingency(a, b)
    if n == 0 or rows.size == cols.size == 1:
        return 1.0
    ha, hb = _entropy(rows, n), _entropy(cols, n)
    if ha == 0 or hb == 0:  # one side is one block, the other not: no shared information
        return 0.0
    mi = float((cells / n * (np.log(cells * n) - np.log(rows[i] * cols[j]))).sum())
    return float(min(1.0, max(0.0, mi / ((ha + hb) / 2))))


def ari(a, b) -> float:
    """Adjusted Rand index: 1 for the same partition, about 0 (can be negative) for independent ones,
    chance-corrected (Hubert and Arabie 1985)."""
    cells, _, _, rows, cols, n = _contingency(a, b)
    if n < 2 or rows.size == cols.size == 1 or rows.size == cols.size == n:
        return 1.0  # one block each, or every item its own block on both sides: the same partition
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    index, sa, sb, total = pairs(cells), pairs(rows), pairs(cols), n * (n - 1) / 2
    expected = sa * sb / total
    best = (sa + sb) / 2
    if best == expected:
        return 1.0
    return float((index - expected) / (best - expected))
