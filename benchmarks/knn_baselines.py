"""Why "random init" is not one number: weighted k-NN top-1 of randomly initialised trunks on the demo's data, for
the two networks a user meets (``dcv2 knn`` with no tokens: ResNet-50 at 224 px and ImageNet normalisation; with
the demo run's tokens: its ResNet-18 x0.5 at its 32 px crop size and its view) over several seeds, each draw once.

Every figure comes from ``dcv2 knn`` run as a subprocess, as printed; the spread over seeds is the draw's share of
the differences, the rest is architecture, resolution and view (each result names all four, see
docs/evaluation.md#baselines-what-a-random-init-score-measured).

    python benchmarks/knn_baselines.py [--seeds 0 1 2] [--work /tmp/dcv2-knn-baselines]
                                       [--out benchmarks/results/knn_baselines_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_results  # noqa: E402

NETWORKS = {"no tokens (dcv2 knn's default)": [],
            "the demo run's tokens": ["config=pretrain/deepcluster_v2/deepclusterv2_demo_cpu"]}


def knn(data: str, tokens: list[str]) -> dict:
    args = [sys.executable, "-m", "dcv2_k8s", "knn", "--train", f"{data}/train", "--val", f"{data}/val",
            "--workers", "0", *tokens]
    print("$ dcv2 " + " ".join(args[3:]), flush=True)
    p = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--work", default="/tmp/dcv2-knn-baselines")
    ap.add_argument("--out", default="benchmarks/results/knn_baselines_cpu")
    ap.add_argument("--small", action="store_true", help="a check that it runs: 5 images per class, 32 px everywhere")
    a = ap.parse_args()
    data = os.path.join(a.work, "data")
    if not os.path.isdir(os.path.join(data, "val")):  # the data `make demo` generates
        from dcv2_k8s.data.synth import generate

        train, val = (5, 2) if a.small else (100, 30)
        generate(data, classes=10, train_per_class=train, val_per_class=val, size=32 if a.small else 64,
                 progress=False)
    result = {"machine": machine(), "data": "dcv2 data synth: 10 classes x 100 train + 30 val, 64 px (make demo's)",
              "networks": []}
    rows = []
    for name, tokens in NETWORKS.items():
        runs = [knn(data, [*tokens, f"config.SEED_VALUE={s}", *(["--size", "32"] if a.small else [])])
                for s in a.seeds]
        top1 = [r["top1"] for r in runs]
        first = runs[0]
        result["networks"].append({"name": name, "tokens": tokens, "seeds": a.seeds, "top1": top1,
                                   "architecture": first["architecture"], "resolution": first["resolution"],
                                   "view": first["view"]})
        rows.append([name, first["architecture"], first["resolution"],
                     f"{first['view']['resize']} -> {first['view']['center_crop']}, mean {first['view']['mean']}",
                     f"{statistics.median(top1):.1f}", f"{min(top1):.1f} - {max(top1):.1f}",
                     " / ".join(f"{t:.1f}" for t in top1)])
    write_results(a.out, result, rows, ["tokens", "architecture", "resolution (px)", "view (resize -> crop)",
                                        "median top-1 %", "range over seeds", "per seed " + "/".join(map(str, a.seeds))],
                  "Random-init k-NN top-1 (k=20) on make demo's data: the network, its resolution, its view and "
                  "the draw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
