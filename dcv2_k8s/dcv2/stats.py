"""Cluster health: empty clusters, cluster-size entropy, NMI between consecutive epochs' assignments."""

from __future__ import annotations

import torch

from dcv2_k8s.dcv2.kmeans import IGNORE


def cluster_sizes(labels: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(labels[labels != IGNORE], minlength=k)


def size_entropy(sizes: torch.Tensor) -> float:
    """Entropy of the cluster-size distribution divided by log K (1.0 = perfectly balanced)."""
    k = sizes.numel()
    p = sizes.double() / sizes.sum().clamp_min(1)
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / torch.log(torch.tensor(float(k)))) if k > 1 else 0.0


def nmi(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised mutual information (arithmetic normalisation) of two labelings, ignoring -100 rows."""
    keep = (a != IGNORE) & (b != IGNORE)
    a, b = a[keep].long(), b[keep].long()
    if a.numel() == 0:
        return 0.0
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.bincount(a * kb + b, minlength=ka * kb).double().view(ka, kb) / a.numel()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (pa.unsqueeze(1) * pb.unsqueeze(0))[nz]).log()).sum()
    ha = -(pa[pa > 0] * pa[pa > 0].log()).sum()
    hb = -(pb[pb > 0] * pb[pb > 0].log()).sum()
    denom = (ha + hb) / 2
    return float(mi / denom) if denom > 0 else 1.0


def head_stats(table: torch.Tensor, num_clusters: list[int], previous: torch.Tensor | None) -> list[dict]:
    out = []
    for h, k in enumerate(num_clusters):
        sizes = cluster_sizes(table[h], k)
        entry = {"head": h, "empty_clusters": int((sizes == 0).sum()), "size_entropy": size_entropy(sizes),
                 "ignored_ratio": float((table[h] == IGNORE).double().mean())}
        if previous is not None:
            entry["nmi_prev"] = nmi(table[h].cpu(), previous[h].cpu())
        out.append(entry)
    return out

