"""The small-scale recipe learns on data it was not tuned on: `deepclusterv2_small_scale` on generated
natural-looking textures (a data kind the demo never saw), trained exactly as a user runs it, beats the same
network at random initialisation in weighted k-NN on held-out images.

The full 120-epoch schedule takes about 15 minutes on 2 cores; to keep the suite's time this test trains its
first quarter (`TRAINER.MAX_STEPS`, the preset otherwise untouched) and asks for the +10 points the recipe
promises (measured there: ~+28 at epoch 20); the full runs and their margins on four data kinds are measured by
`benchmarks/small_scale.py` (`benchmarks/results/small_scale_cpu.md`)."""

from __future__ import annotations

import json

import pytest

from dcv2_k8s.data.synth import generate
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

PRESET = "config=pretrain/deepcluster_v2/deepclusterv2_small_scale"


def _knn(data, *extra) -> float:
    p = run_cli("knn", "--train", str(data / "train"), "--val", str(data / "val"), "--workers", "0", *extra)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["top1"]


@pytest.mark.timeout(2400)
def test_small_scale_preset_beats_random_init_on_held_out_textures(tmp_path):
    data = tmp_path / "naturals"
    generate(data, classes=10, train_per_class=140, val_per_class=40, size=64, progress=False, kind="naturals")
    run = tmp_path / "run"
    steps = 30 * (1400 // 64)  # 30 of the preset's 120 epochs (21 steps each)
    p = run_cli("train", PRESET, f"config.DATA.TRAIN.DATA_PATHS=[{data / 'train'}]",
                f"config.DATA.TEST.DATA_PATHS=[{data / 'val'}]", f"config.CHECKPOINT.DIR={run}",
                f"config.TRAINER.MAX_STEPS={steps}", "config.METRICS.ENABLED=false", timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    random_init = _knn(data, PRESET)
    trained = _knn(data, "--checkpoint", str(run))
    print(f"naturals: random init {random_init:.2f} %, small-scale preset after 30 epochs {trained:.2f} %")
    assert trained >= random_init + 10, (random_init, trained)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    diags = [e for e in events if e["kind"] == "diagnostics"]
    # a check after each of epochs 1-29 (the MAX_STEPS stop at the end of epoch 30 returns before its checks)
    assert len(diags) == 29 and not any("collapsing" in w for d in diags for w in d["warnings"])
