"""``dcv2 demo``: generated data -> DCv2 training on 2 CPU processes -> k-NN of trained vs random-init trunk."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

DEMO_PRESET = "pretrain/deepcluster_v2/deepclusterv2_demo_cpu"


def _run(cmd: list[str]) -> None:
    print("+ dcv2 " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


def _knn(data: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dcv2_k8s", "knn", "--train", str(data / "train"), "--val", str(data / "val"),
           "--workers", "0", *extra]
    print("+ dcv2 " + " ".join(cmd[3:]), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _linear(data: Path, run: Path, out: Path, weights: str) -> dict:
    tokens = ["config=benchmark/linear_image_classification/imagenet1k/eval_resnet_swav_in1k_linear",
              f"config.DATA.TRAIN.DATA_PATHS=[{data / 'train'}]", f"config.DATA.TEST.DATA_PATHS=[{data / 'val'}]",
              "config.MODEL.TRUNK.RESNETS.DEPTH=18", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.5",
              "config.LINEAR_EVAL.CROP_SIZE=32", "config.LINEAR_EVAL.FEATURE_CACHE=true", "config.OPTIMIZER.num_epochs=30",
              "config.DATA.NUM_DATALOADER_WORKERS=0", "config.MACHINE.DEVICE=cpu",
              "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}",
              f"config.LINEAR_EVAL.OUTPUT={out}"]
    _run([sys.executable, "-m", "dcv2_k8s", "linear-eval", *tokens])
    return json.loads(out.read_text())


def run_demo(out: str, epochs: int = 0, minutes: float = 0) -> int:
    out_dir = Path(out).resolve()
    data, run = out_dir / "data", out_dir / "run"
    t0 = time.time()
    dcv2 = [sys.executable, "-m", "dcv2_k8s"]
    _run(dcv2 + ["data", "synth", str(data), "--classes", "10", "--train-per-class", "100", "--val-per-class", "30",
                 "--size", "64"])
    tokens = [f"config={DEMO_PRESET}", f"config.DATA.TRAIN.DATA_PATHS=[{data / 'train'}]",
              f"config.DATA.TEST.DATA_PATHS=[{data / 'val'}]", f"config.CHECKPOINT.DIR={run}"]
    if epochs:
        tokens.append(f"config.OPTIMIZER.num_epochs={epochs}")
    _run(dcv2 + ["train", *tokens])
    trained = _knn(data, ["--checkpoint", str(run)])
    random_init = _knn(data, [f"config={DEMO_PRESET}"])
    lin = {w or "random": _linear(data, run, out_dir / f"linear_{'trained' if w else 'random'}.json", w)
           for w in (str(run), "")}
    lin_trained, lin_random = lin[str(run)], lin["random"]
    result = {"knn_top1_trained": trained["top1"], "knn_top1_random_init": random_init["top1"],
              "knn_top5_trained": trained["top5"], "knn_top5_random_init": random_init["top5"],
              "margin_top1": trained["top1"] - random_init["top1"],
              "linear_top1_trained": lin_trained["top1"], "linear_top1_random_init": lin_random["top1"],
              "seconds": time.time() - t0, "checkpoints": str(run), "data": str(data)}
    (out_dir / "demo_result.json").write_text(json.dumps(result, indent=1))
    print()
    print("DeepClusterV2 demo: weighted k-NN (k=20) on held-out images, frozen trunk features")
    print(f"  random init : top-1 {random_init['top1']:5.1f} %   top-5 {random_init['top5']:5.1f} %")
    print(f"  DCv2 trained: top-1 {trained['top1']:5.1f} %   top-5 {trained['top5']:5.1f} %")
    print(f"  margin      : {result['margin_top1']:+.1f} points top-1 (chance is 10 %)")
    print(f"  linear eval (fast mode, 30 epochs): DCv2 {lin_trained['top1']:.1f} % vs random init "
          f"{lin_random['top1']:.1f} % top-1")
    curve = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"knn"' in l]
    if curve:
        print("  k-NN top-1 during training: " + ", ".join(f"ep {c['epoch']}: {c['top1']:.0f}%" for c in curve))
    print(f"  checkpoints : {run}")
    print(f"  result      : {out_dir / 'demo_result.json'} ({result['seconds']:.0f} s in all)")
    return 0
