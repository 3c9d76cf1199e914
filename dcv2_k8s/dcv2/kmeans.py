"""Distributed spherical k-means over the memory banks (DeepClusterV2's clustering step).

As the swav reference (``cluster_memory``): rank 0 draws the initial centroids from its bank and broadcasts
them; ``num_iters`` rounds of E-step (argmax of cosine similarity) and M-step (per-cluster mean of the
assigned embeddings, summed and counted across ranks by all-reduce; an empty cluster keeps its previous
centroid; all centroids re-normalised), then a final E-step. The M-step is one ``index_add_`` and one
``bincount`` on the device; the E-step is chunked into a preallocated buffer so no ``N x K`` temporary above
``max_chunk_bytes`` exists (the naive one is 1.9 GB per head at ImageNet scale per GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcv2_k8s.dcv2.memory_bank import MemoryBank
from dcv2_k8s.distributed import all_gather_rows

IGNORE = -100
DEFAULT_CHUNK_BYTES = 256 * 2 ** 20
CPU_CHUNK_BYTES = 64 * 2 ** 20  # on CPU, smaller blocks keep the scores in cache for the argmax (measured faster)


def _dist_active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def assign(embeddings: torch.Tensor, centroids: torch.Tensor, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """E-step: index of the most similar centroid for every row, in chunks of at most ``max_chunk_bytes``."""
    n, k = embeddings.shape[0], centroids.shape[0]
    if embeddings.device.type == "cpu":
        max_chunk_bytes = min(max_chunk_bytes, CPU_CHUNK_BYTES)
    rows = max(1, min(n, max_chunk_bytes // (4 * k)))
    buf = torch.empty(rows, k, device=embeddings.device, dtype=embeddings.dtype)
    out = torch.empty(n, dtype=torch.long, device=embeddings.device) if out is None else out
    ct = centroids.t()
    for s in range(0, n, rows):
        e = min(n, s + rows)
        scores = torch.mm(embeddings[s:e], ct, out=buf[: e - s])
        torch.argmax(scores, dim=1, out=out[s:e])
    return out


def spherical_kmeans(embeddings: torch.Tensor, centroids: torch.Tensor, num_iters: int, group=None,
                     max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of this rank's ``embeddings`` ``[N, D]`` from initial ``centroids`` ``[K, D]``.

    With a process group, sums and counts are all-reduced so every rank ends with the same centroids
    (callers pass the same initial centroids on every rank).

    Returns:
        ``(centroids [K, D] L2-normalised, assignments [N] int64)`` of this rank's rows.
    """
    centroids = centroids.clone().float()
    k, d = centroids.shape
    assignments = torch.empty(embeddings.shape[0], dtype=torch.long, device=embeddings.device)
    sums = torch.empty(k, d, device=embeddings.device)
    for it in range(num_iters + 1):
        assign(embeddings, centroids, max_chunk_bytes, out=assignments)
        if it == num_iters:
            break
        centroids = update_centroids(embeddings, assignments, centroids, sums, group)
    return centroids, assignments


def update_centroids(embeddings: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor,
                     sums: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """M-step: the normalised mean of each cluster's rows (summed and counted over ``group`` when a process
    group is active); an empty cluster keeps its centroid. One ``index_add_`` and one ``bincount``, no per-cluster loop."""
    k, d = centroids.shape
    sums = torch.empty(k, d, device=embeddings.device) if sums is None else sums
    sums.zero_().index_add_(0, assignments, embeddings)
    counts = torch.bincount(assignments, minlength=k).to(sums.dtype)
    if _dist_active(group):
        packed = torch.cat([sums, counts.unsqueeze(1)], dim=1)  # one collective for both
        dist.all_reduce(packed, group=group)
        sums, counts = packed[:, :d], packed[:, d]
    nonempty = (counts > 0).unsqueeze(1)
    centroids = torch.where(nonempty, sums / counts.clamp_min(1).unsqueeze(1), centroids)
    return F.normalize(centroids, dim=1, p=2)


def init_centroids(embeddings: torch.Tensor, k: int, generator: torch.Generator, group=None) -> torch.Tensor:
    """K random rows of rank 0's bank, broadcast to every rank."""
    n = embeddings.shape[0]
    if n < k:
        raise ValueError(f"{k} clusters but only {n} embeddings in this rank's memory bank; lower num_clusters")
    perm = torch.randperm(n, generator=generator)[:k].to(embeddings.device)
    centroids = embeddings[perm].clone()
    if _dist_active(group):
        dist.broadcast(centroids, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return centroids


def gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate equal-sized tensors of every rank along dim 0 (rank order)."""
    if not _dist_active(group):
        return t
    world = dist.get_world_size(group)
    out = torch.empty((world * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    all_gather_rows(out, t, group)
    return out


@torch.no_grad()
def cluster_memory(bank: MemoryBank, num_clusters: list[int], num_iters: int, num_samples: int, seed: int,
                   group=None, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run k-means for every head, the heads rotating over the bank's views (head h uses view h mod n_views).

    Returns:
        ``(centroids per head, assignment table [n_heads, num_samples] int64 pre-filled with -100)``.
    """
    device = bank.embeddings.device
    table = torch.full((len(num_clusters), num_samples), IGNORE, dtype=torch.long, device=device)
    all_indices = gather_rows(bank.indices, group)
    valid = all_indices >= 0
    centroids_out = []
    for h, k in enumerate(num_clusters):
        view = bank.embeddings[h % bank.embeddings.shape[0]]
        g = torch.Generator().manual_seed(seed * 1000 + h)
        init = init_centroids(view, k, g, group)
        centroids, local = spherical_kmeans(view, init, num_iters, group, max_chunk_bytes)
        labels = gather_rows(local, group)
        # padded duplicates of an image: the larger cluster id wins, the same on every device and run
        table[h].scatter_reduce_(0, all_indices[valid], labels[valid], reduce="amax", include_self=False)
        centroids_out.append(centroids)
    return centroids_out, table
