"""Every benchmark runs in a small configuration, so none can rot (the numbers are not checked: no timed tests).

Correctness checks that the benchmarks themselves make are asserted: bitwise-equal LARC updates, the k-means
M-step equal to the loop reference, and a complete result file.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
BENCH = ROOT / "benchmarks"


def _run(script: str, out, *args: str) -> dict:
    p = subprocess.run([sys.executable, str(BENCH / script), "--out", str(out), *args], capture_output=True,
                       text=True, cwd=str(BENCH), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (out.parent / (out.name + ".md")).read_text().count("|") > 10
    return json.loads((out.parent / (out.name + ".json")).read_text())


def test_gpu_bench_runs_on_cpu_tiny(tmp_path):
    res = _run("gpu_bench.py", tmp_path / "gpu", "--device", "cpu", "--tiny")
    assert not res["errors"], res["errors"]
    assert len(res["model_bound"]) == 6 and len(res["end_to_end"]) == 2 and res["kmeans"]["heads"] == 3
    assert all(r["images_per_s"] > 0 and r["eq_crops_per_s"] > 0 for r in res["model_bound"] + res["end_to_end"])
    assert all(r["bitwise_equal"] for r in res["larc"])


def test_component_benchmarks_run_small(tmp_path):
    larc = _run("bench_larc.py", tmp_path / "larc", "--repeats", "2")
    assert all(r["bitwise_equal"] for r in larc["runs"])
    km = _run("bench_kmeans.py", tmp_path / "km", "--n", "3000", "--k", "100", "--repeats", "1")
    assert km["runs"][0]["mstep_matches_reference"] and km["runs"][0]["reference_s"] > 0
    inp = _run("bench_input.py", tmp_path / "inp", "--images", "4", "--repeats", "1")
    assert set(inp["layouts"]) == {"2x224+6x96", "2x160+4x96"}
    step = _run("bench_step.py", tmp_path / "step", "--tiny", "--steps", "2", "--repeats", "1")
    assert step["ratio"] > 0
    st = _run("bench_stage.py", tmp_path / "stage", "--files", "60", "--classes", "6", "--tar-mb", "3",
              "--workers", "4", "--repeats", "1")
    assert st["folder"][0]["ratio"] > 0 and st["tar"]["ours_extra_disk_bytes"] == 0 and st["tar"]["files"] >= 6


def test_small_scale_benchmark_runs_small(tmp_path):
    """The held-out-data benchmark end to end at toy size: data, random-init k-NN, both presets trained (2 at once),
    scored, the table written; and ``--score-only`` re-scores the same runs without training."""
    tiny = ["--kinds", "icons", "--train-per-class", "14", "--val-per-class", "3", "--jobs", "2",
            "--work", str(tmp_path / "work"), "--set", "config.OPTIMIZER.num_epochs=2",
            "--set", "config.LOSS.deepclusterv2_loss.num_clusters=[8,8,8]", "--set", "config.MONITOR.KNN_FREQUENCY=1"]
    res = _run("small_scale.py", tmp_path / "small", *tiny)
    (entry,) = res["runs"]
    assert entry["kind"] == "icons" and set(entry["random_init"]) == {"small_scale", "demo"}
    for name in ("small_scale", "demo"):
        r = entry[name]
        assert r["epoch"] == r["epochs"] == 2 and 0 <= r["knn_top1"] <= 100 and r["command"].startswith("dcv2 train")
        assert [e for e, _ in r["knn_curve"]] == [0, 1, 2]
    again = _run("small_scale.py", tmp_path / "again", *tiny, "--score-only")
    assert again["runs"][0]["small_scale"]["knn_top1"] == entry["small_scale"]["knn_top1"]
    # the training's command and wall time come back from the run's record, not from the re-scoring
    for key in ("minutes", "command", "jobs", "threads"):
        assert again["runs"][0]["demo"][key] == entry["demo"][key] is not None, key


def test_glyph_probe_labels_are_the_generators_and_the_preset_sees_the_glyph_not_its_polarity(tmp_path):
    """The probe's nuisance labels are the draws that made each image (regenerating an image from its generator
    gives the stored pixels). The small-scale preset's network at random initialisation (its view: crop to the
    glyph, ``INPUT_NORM: standardize_polarity``) tells glyphs apart far above the majority rate and dark-on-light
    from light-on-dark not at all; a plain trunk told polarity at 97 % (docs/training.md). Tiny data: 3
    classes, 60 val images (seeds 3-5 gave class 96.7-98.3 %, polarity 46.7-53.3 %)."""
    from PIL import Image

    from dcv2_k8s.data import synth

    data = tmp_path / "glyphs"
    synth.generate(data, classes=3, train_per_class=40, val_per_class=20, size=48, seed=3, progress=False,
                   kind="glyphs")
    path = data / "val" / synth.class_name(2, "glyphs") / "val_02_00007.jpg"
    redrawn = tmp_path / "redrawn.jpg"
    synth.make_glyph_image(2, synth.image_rng(3, 2, 7, "val"), 48, 48).save(redrawn, quality=90)
    assert Image.open(redrawn).tobytes() == Image.open(path).tobytes()
    res = _run("glyph_probe.py", tmp_path / "probe", "--data", str(data))
    assert res["seed"] == 3
    (net,) = res["networks"]
    assert set(net["top1"]) == {"class", "x_half", "y_half", "border", "size", "polarity", "contrast", "stroke"}
    assert net["top1"]["class"] > res["majority"]["class"] + 40, res
    assert net["top1"]["polarity"] < res["majority"]["polarity"] + 15, res


def test_random_init_baselines_benchmark_runs_small(tmp_path):
    res = _run("knn_baselines.py", tmp_path / "kb", "--small", "--seeds", "0", "--work", str(tmp_path / "w"))
    nets = {n["name"]: n for n in res["networks"]}
    assert nets["no tokens (dcv2 knn's default)"]["architecture"] == "ResNet-50 x1"
    assert nets["the demo run's tokens"]["architecture"] == "ResNet-18 x0.5"
    assert all(len(n["top1"]) == 1 and 0 <= n["top1"][0] <= 100 for n in nets.values())


def test_held_out_digits_are_real_handwriting_in_three_variants(tmp_path):
    """The held-out data of the small-scale benchmark: scikit-learn's UCI digits (not generated here), every image
    once, ten class folders per split, and the variants differ as documented (placement, clutter)."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(BENCH))
    import heldout_digits

    counts = {k: heldout_digits.write(str(tmp_path / k), k, 32, train_per_class=150) for k in heldout_digits.KINDS}
    assert all(c == {"train": 1500, "val": 297} for c in counts.values()), counts
    for kind in heldout_digits.KINDS:
        assert sorted(p.name for p in (tmp_path / kind / "val").iterdir()) == [str(c) for c in range(10)]
    first = {k: np.asarray(Image.open(sorted((tmp_path / k / "train" / "3").iterdir())[0]), np.float32)
             for k in heldout_digits.KINDS}
    # centred digits have paper along every border; cluttered pages have more ink than placed ones
    assert first["digits"][0].std() < 10 and first["digits"][:, 0].std() < 10
    ink = {k: (v.mean(axis=2) < v.mean() - 40).mean() for k, v in first.items()}
    assert ink["digits_cluttered"] > ink["digits_placed"], ink
