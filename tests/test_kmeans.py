"""Spherical k-means against a plain loop reference (swav's algorithm), chunking, and 2-process equality."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dcv2_k8s.dcv2.kmeans import IGNORE, assign, cluster_memory, spherical_kmeans
from dcv2_k8s.dcv2.memory_bank import MemoryBank
from dcv2_k8s.dcv2.stats import head_stats, nmi, size_entropy
from dcv2_k8s.distributed import free_port


def reference_kmeans(emb: torch.Tensor, centroids: torch.Tensor, iters: int):
    """The swav reference, plainly: per-cluster Python loop M-step; empty clusters keep their centroid."""
    centroids = centroids.clone()
    for it in range(iters + 1):
        assignments = (emb @ centroids.t()).max(dim=1).indices
        if it == iters:
            break
        for k in range(centroids.shape[0]):
            members = emb[assignments == k]
            if len(members) > 0:
                centroids[k] = members.sum(0) / len(members)
        centroids = F.normalize(centroids, dim=1)
    return centroids, assignments


def _data(n=600, d=16, k=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k // 2, d, generator=g), dim=1)
    emb = F.normalize(centers[torch.randint(0, k // 2, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g),
                      dim=1)
    init = emb[torch.randperm(n, generator=g)[:k]].clone()
    return emb, init


def test_matches_loop_reference():
    emb, init = _data()
    c, a = spherical_kmeans(emb, init, 10)
    rc, ra = reference_kmeans(emb, init, 10)
    assert torch.equal(a, ra)
    torch.testing.assert_close(c, rc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(len(c)))


def test_empty_cluster_keeps_its_centroid():
    emb, init = _data()
    emb, init = emb.abs(), init.abs()  # every similarity between data and data-drawn centroids is > 0
    far = F.normalize(-torch.ones(1, emb.shape[1]), dim=1)  # similarity < 0 with every row
    init = torch.cat([init, far])
    c, a = spherical_kmeans(emb, init, 5)
    assert not (a == init.shape[0] - 1).any()
    torch.testing.assert_close(c[-1], init[-1])


def test_chunked_assignment_equals_naive():
    emb, init = _data(n=1000)
    naive = (emb @ init.t()).argmax(1)
    assert torch.equal(assign(emb, init, max_chunk_bytes=4 * init.shape[0] * 7), naive)  # 7-row chunks


def test_cluster_memory_single_process_fills_table():
    emb, _ = _data(n=64)
    bank = MemoryBank(2, 64, 16)
    idx = torch.randperm(100)[:64]
    for s in range(0, 64, 16):
        bank.write(idx[s:s + 16], [emb[s:s + 16], emb[s:s + 16].flip(1)])
    cents, table = cluster_memory(bank, [5, 6, 7], 3, num_samples=100, seed=1)
    assert [c.shape[0] for c in cents] == [5, 6, 7] and table.shape == (3, 100)
    missing = torch.ones(100, dtype=torch.bool)
    missing[idx] = False
    assert (table[:, missing] == IGNORE).all() and (table[:, idx] >= 0).all()
    # head h uses view h mod 2: heads 0 and 2 cluster the same view
    assert torch.equal(table[0, idx], assign(emb, cents[0]))


def _worker(rank, port, emb, init, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = emb.shape[0] // 2
        c, a = spherical_kmeans(emb[rank * half:(rank + 1) * half], init, 10)
        q.put((rank, c.numpy(), a.numpy()))  # by value: the sender exits before the reader
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_on_concatenated_data():
    emb, init = _data(n=800)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, emb, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = {r: (torch.from_numpy(c), torch.from_numpy(a)) for r, c, a in (q.get(timeout=120) for _ in range(2))}
    for p in procs:
        p.join(timeout=60)
    c1, a1 = spherical_kmeans(emb, init, 10)
    torch.testing.assert_close(res[0][0], c1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res[1][0], c1, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([res[0][1], res[1][1]]), a1)


def test_stats():
    assert size_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert size_entropy(torch.tensor([20, 0, 0, 0])) == pytest.approx(0.0)
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert nmi(a, torch.tensor([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    assert nmi(a, torch.tensor([0, 1, 0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-9)
    table = torch.tensor([[0, 0, 1, IGNORE]])
    s = head_stats(table, [3], previous=table)[0]
    assert s["empty_clusters"] == 1 and s["ignored_ratio"] == 0.25 and s["nmi_prev"] == pytest.approx(1.0)
