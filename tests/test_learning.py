"""It must learn: `dcv2 demo` (what `make demo` runs) trains DCv2 on 2 CPU processes and its frozen trunk
beats the same network at random initialisation in weighted k-NN on held-out images."""

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
    assert "random init : top-1" in p.stdout and "DCv2 trained: top-1" in p.stdout
    # linear evaluation (fast mode) of the same two trunks: the trained one must win clearly too
    assert result["linear_top1_trained"] >= result["linear_top1_random_init"] + 8, result
    assert "linear eval (fast mode" in p.stdout
