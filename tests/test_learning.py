"""It must learn, and the pipeline must run: `dcv2 demo` (what `make demo` runs) runs the Kubeflow pipeline
locally (embedded S3, staging, 2-process DCv2 pretraining, linear eval vs random init, report); the frozen trunk
beats the same network at random initialisation in weighted k-NN and in linear evaluation on held-out images."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_trained_features_beat_random_init(tmp_path):
    p = run_cli("demo", "--out", str(tmp_path / "demo"), timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    print(p.stdout[-1200:])  # the printed comparison, shown with pytest -s / on failure
    assert result["knn_top1_random_init"] < 45
    assert result["margin_top1"] >= 10, result
    assert "random init : linear top-1" in p.stdout and "DCv2 trained: linear top-1" in p.stdout
    # linear evaluation (fast mode) of the same two trunks, run by the pipeline: the trained one wins clearly too
    assert result["linear_top1_trained"] >= result["linear_top1_random_init"] + 8, result
    assert result["report_html"] and result["pipeline_root"]
