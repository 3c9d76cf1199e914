"""``dcv2 demo`` (``make demo``): the whole Kubeflow pipeline, locally.

Generated data is uploaded to an embedded S3 endpoint, then the pipeline (``dcv2_k8s/kfp_pipeline.py``) runs through
``kfp.local`` with ``launcher=local``: stage from S3, DCv2 pretraining on 2 CPU processes checkpointing to S3,
linear evaluation of the trained trunk and of the random-init baseline, report. The k-NN of both trunks is printed
too. Nothing here is a stand-in: the same components run on a cluster with ``launcher=pytorchjob``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEMO_PRESET = "pretrain/deepcluster_v2/deepclusterv2_demo_cpu"
EVAL_PRESET = "benchmark/linear_image_classification/imagenet1k/eval_resnet_swav_in1k_linear"


def _knn(train: str, val: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dcv2_k8s", "knn", "--train", train, "--val", val, "--workers", "0", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _upload(client, local: Path, bucket: str, prefix: str) -> int:
    n = 0
    for p in sorted(local.rglob("*.jpg")):
        client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}")
        n += 1
    return n


def run_demo(out: str, epochs: int = 0, minutes: float = 0) -> int:
    import boto3
    from kfp import local

    from dcv2_k8s.data.synth import generate
    from dcv2_k8s.pipeline_steps import DEMO_EVAL
    from dcv2_k8s.s3server import EmbeddedS3
    from dcv2_k8s.storage import read_bytes

    from dcv2_k8s.kfp_pipeline import dcv2_pipeline

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("1/4 generating 1,300 images (10 texture classes)", flush=True)
    generate(out_dir / "data", classes=10, train_per_class=100, val_per_class=30, size=64, progress=False)
    s3 = EmbeddedS3().start(["datasets", "runs"])
    os.environ.update(s3.env())
    try:
        client = boto3.client("s3", endpoint_url=s3.endpoint)
        n = _upload(client, out_dir / "data" / "train", "datasets", "synth/train")
        n += _upload(client, out_dir / "data" / "val", "datasets", "synth/val")
        print(f"2/4 uploaded {n} images to the embedded S3 endpoint {s3.endpoint}", flush=True)
        print("3/4 running the Kubeflow pipeline locally (kfp.local, launcher=local)", flush=True)
        overrides = [f"config.OPTIMIZER.num_epochs={epochs}"] if epochs else []
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out_dir / "kfp"))
        dcv2_pipeline(data_uri="s3://datasets/synth/train", val_uri="s3://datasets/synth/val",
                      output_uri="s3://runs/demo", config=DEMO_PRESET, overrides=overrides, eval_preset=EVAL_PRESET,
                      eval_overrides=DEMO_EVAL, baseline=True, launcher="local", namespace="")
        trained = json.loads(read_bytes("s3://runs/demo/linear_eval_trained.json"))
        base = json.loads(read_bytes("s3://runs/demo/linear_eval_baseline.json"))
        events = [json.loads(l) for l in read_bytes("s3://runs/demo/pretrain/metrics.jsonl").decode().splitlines()]
        print("4/4 k-NN of the trained and the random-init trunk", flush=True)
        staged = next((out_dir / "kfp").rglob("staged"))
        knn_t = _knn(str(staged / "train"), str(staged / "val"), ["--checkpoint", "s3://runs/demo/pretrain"])
        knn_r = _knn(str(staged / "train"), str(staged / "val"), [f"config={DEMO_PRESET}"])
        html = next((out_dir / "kfp").rglob("html"), None)
        card = next((out_dir / "kfp").rglob("model_card.json"), None)
    finally:
        s3.stop()
    result = {"linear_top1_trained": trained["top1"], "linear_top1_random_init": base["top1"],
              "linear_top5_trained": trained["top5"], "linear_top5_random_init": base["top5"],
              "knn_top1_trained": knn_t["top1"], "knn_top1_random_init": knn_r["top1"],
              "knn_top5_trained": knn_t["top5"], "knn_top5_random_init": knn_r["top5"],
              "margin_top1": knn_t["top1"] - knn_r["top1"], "seconds": time.time() - t0,
              "pipeline_root": str(out_dir / "kfp"), "report_html": str(html) if html else None,
              "model_card": str(card) if card else None}
    (out_dir / "demo_result.json").write_text(json.dumps(result, indent=1))
    curve = [e for e in events if e["kind"] == "knn"]
    print()
    print("DeepClusterV2 demo (the Kubeflow pipeline run locally): frozen trunk on held-out images")
    print(f"  random init : linear top-1 {base['top1']:5.1f} %   k-NN top-1 {knn_r['top1']:5.1f} %   "
          f"k-NN top-5 {knn_r['top5']:5.1f} %")
    print(f"  DCv2 trained: linear top-1 {trained['top1']:5.1f} %   k-NN top-1 {knn_t['top1']:5.1f} %   "
          f"k-NN top-5 {knn_t['top5']:5.1f} %")
    print(f"  margin      : {trained['top1'] - base['top1']:+.1f} points linear, {result['margin_top1']:+.1f} points "
          "k-NN top-1 (chance is 10 %)")
    if curve:
        print("  k-NN top-1 during training: " + ", ".join(f"ep {c['epoch']}: {c['top1']:.0f}%" for c in curve))
    print(f"  pipeline artifacts: {out_dir / 'kfp'} (report: {html}; model: {card.parent if card else None})")
    print(f"  result            : {out_dir / 'demo_result.json'} ({result['seconds']:.0f} s in all)")
    return 0
