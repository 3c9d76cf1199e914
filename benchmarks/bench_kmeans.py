"""k-means pass (10 iterations + final E-step), K=3000, D=128: ours vs the reference and the E-step floor.

- reference: the swav ``cluster_memory`` algorithm written plainly: E-step ``argmax(emb @ C.T)`` into a fresh
  N x K output, M-step a Python loop over the K clusters (gather the members, sum, divide).
- floor: the E-step alone (fresh N x K output every iteration, no M-step at all).
- ours: ``dcv2_k8s.dcv2.kmeans.spherical_kmeans`` (chunked E-step into a preallocated buffer of at most 256 MB,
  the M-step ``update_centroids``: one ``index_add_`` + ``bincount``).
Targets: ours <= 1.0x the floor; our M-step >= 10x faster than the loop; no N x K temporary above 256 MB.

    python benchmarks/bench_kmeans.py [--n 20000 160000] [--repeats 3] [--out benchmarks/results/kmeans_cpu]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from common import machine, times, write_results
from dcv2_k8s.dcv2.kmeans import CPU_CHUNK_BYTES, DEFAULT_CHUNK_BYTES, spherical_kmeans, update_centroids

ITERS = 10


def reference_mstep(emb, assignments, centroids):
    """The swav reference's M-step: a Python loop over the clusters (gather the members, sum, divide)."""
    for k in range(centroids.shape[0]):
        members = emb[assignments == k]
        if len(members) > 0:
            centroids[k] = members.sum(0) / len(members)
    return F.normalize(centroids, dim=1)


def reference_kmeans(emb: torch.Tensor, centroids: torch.Tensor, iters: int = ITERS):
    centroids = centroids.clone()
    for it in range(iters + 1):
        assignments = torch.mm(emb, centroids.t()).max(dim=1).indices
        if it == iters:
            break
        centroids = reference_mstep(emb, assignments, centroids)
    return centroids, assignments


def floor(emb: torch.Tensor, centroids: torch.Tensor, iters: int = ITERS):
    for _ in range(iters + 1):
        assignments = torch.mm(emb, centroids.t()).max(dim=1).indices
    return assignments


def data(n: int, k: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, d, generator=g), dim=1)
    emb = F.normalize(centers[torch.randint(0, k, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g), dim=1)
    return emb, emb[torch.randperm(n, generator=g)[:k]].clone()


def bench(n: int, k: int, d: int, repeats: int, skip_reference: bool) -> dict:
    emb, init = data(n, k, d)
    ours = times(lambda: spherical_kmeans(emb, init, ITERS), repeats, warmup=0)
    fl = times(lambda: floor(emb, init), repeats, warmup=0)
    out = {"n": n, "k": k, "d": d, "iters": ITERS, "ours_s": statistics.median(ours), "floor_s": statistics.median(fl),
           "ours_runs": ours, "floor_runs": fl,
           "naive_e_step_temporary_MB": n * k * 4 / 2 ** 20,
           "our_largest_temporary_MB": min(n, min(DEFAULT_CHUNK_BYTES, CPU_CHUNK_BYTES) // (4 * k)) * k * 4 / 2 ** 20}
    out["ours_vs_floor"] = out["ours_s"] / out["floor_s"]
    assignments = torch.mm(emb, init.t()).argmax(1)
    ref_m = times(lambda: reference_mstep(emb, assignments, init.clone()), repeats, warmup=0)
    our_m = times(lambda: update_centroids(emb, assignments, init), repeats, warmup=1)
    out.update(reference_mstep_s=statistics.median(ref_m), ours_mstep_s=statistics.median(our_m))
    out["mstep_speedup"] = out["reference_mstep_s"] / out["ours_mstep_s"]
    # the same result: identical centroids from the same assignments (up to summation order)
    same = torch.allclose(reference_mstep(emb, assignments, init.clone()), update_centroids(emb, assignments, init),
                          atol=1e-5)
    out["mstep_matches_reference"] = bool(same)
    if not skip_reference:
        ref = times(lambda: reference_kmeans(emb, init), max(1, repeats), warmup=0)
        out.update(reference_s=statistics.median(ref), reference_runs=ref)
        out["ours_speedup_vs_reference"] = out["reference_s"] / out["ours_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[20000, 160000])
    ap.add_argument("--k", type=int, default=3000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-reference-at", type=int, default=10 ** 9,
                    help="do not run the whole reference pass for N at or above this (it is the slowest)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    res = {"machine": machine(), "repeats": args.repeats, "runs": []}
    rows = []
    for n in args.n:
        r = bench(n, args.k, args.d, args.repeats, n >= args.skip_reference_at)
        res["runs"].append(r)
        ref = f"{r['reference_s']:.2f}" if "reference_s" in r else "-"
        print(f"N={n} K={args.k}: ours {r['ours_s']:.2f} s, E-step floor {r['floor_s']:.2f} s "
              f"(ours/floor {r['ours_vs_floor']:.2f}, target <= 1.0), reference {ref} s; M-step "
              f"{r['reference_mstep_s'] * 1e3:.0f} ms loop vs {r['ours_mstep_s'] * 1e3:.1f} ms ours "
              f"({r['mstep_speedup']:.0f}x, target >= 10x); largest temporary {r['our_largest_temporary_MB']:.0f} MB "
              f"(naive {r['naive_e_step_temporary_MB']:.0f} MB)")
        rows.append([n, args.k, ref, f"{r['floor_s']:.2f}", f"{r['ours_s']:.2f}", f"{r['ours_vs_floor']:.2f}",
                     f"{r['reference_mstep_s'] * 1e3:.0f}", f"{r['ours_mstep_s'] * 1e3:.1f}",
                     f"{r['mstep_speedup']:.0f}x", f"{r['our_largest_temporary_MB']:.0f} / "
                     f"{r['naive_e_step_temporary_MB']:.0f}"])
    write_results(args.out, res, rows, ["N", "K", "reference s", "E-step floor s", "ours s", "ours/floor",
                                        "loop M-step ms", "our M-step ms", "M-step speedup",
                                        "largest N x K temporary MB (ours / naive)"],
                  f"k-means, {ITERS} iterations + final E-step, D={args.d}, median of {args.repeats}")


if __name__ == "__main__":
    main()
