"""Collapse diagnostics: the statistics on known matrices, the warning rules, and a real run that collapses
(learning rate 100: every image ends on the same trunk feature) warning in its log, its event log, its
Prometheus gauge and its report; a run whose learning rate is too small to move warns that it does not move."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dcv2_k8s.dcv2.collapse import COLLAPSE_MEAN_COSINE, WeightChange, collapse_warnings, feature_stats
from tests.conftest import run_cli, tiny_train_tokens


def test_feature_stats_on_known_matrices():
    g = torch.Generator().manual_seed(0)
    iso = feature_stats(torch.randn(512, 64, generator=g))
    assert abs(iso["mean_cosine"]) < 0.02 and iso["effective_rank"] > 55
    low = feature_stats(torch.randn(512, 3, generator=g) @ torch.randn(3, 64, generator=g))
    assert 2 < low["effective_rank"] < 3.5 and low["rank_ratio"] < 0.06
    same = feature_stats(torch.ones(100, 32) + 1e-3 * torch.randn(100, 32, generator=g))
    assert same["mean_cosine"] > 0.999


def test_weight_change_per_layer():
    model = torch.nn.Module()
    model.trunk = torch.nn.Module()
    model.trunk.layer1 = torch.nn.Linear(4, 4)
    model.trunk.layer2 = torch.nn.Linear(4, 4)
    model.head = torch.nn.Linear(4, 2)
    wc = WeightChange(model)
    with torch.no_grad():
        for p in model.trunk.layer2.parameters():
            p.mul_(1.1)
    first = wc.update()
    assert first["trunk.layer1"]["per_epoch"] == 0 and first["head"]["total"] == 0
    assert first["trunk.layer2"]["per_epoch"] == pytest.approx(0.1, rel=1e-5)
    second = wc.update()  # nothing changed since: per epoch 0, total still 10 %
    assert second["trunk.layer2"]["per_epoch"] == 0 and second["trunk.layer2"]["total"] == pytest.approx(0.1, rel=1e-5)


def _diag(**kw) -> dict:
    d = {"trunk": {"mean_cosine": 0.5, "effective_rank": 40.0, "rank_ratio": 0.3},
         "heads": [{"head": 0, "size_entropy": 0.97, "empty_clusters": 0}],
         "weight_change": {"trunk.layer1": {"per_epoch": 0.02, "total": 0.1}}, "lr": 1.0}
    d.update(kw)
    return d


def test_collapse_rules():
    assert collapse_warnings(_diag()) == []
    kinds = lambda d: [k for k, _ in collapse_warnings(d)]  # noqa: E731
    assert kinds(_diag(trunk={"mean_cosine": 0.99, "effective_rank": 40.0, "rank_ratio": 0.3})) == ["trunk_cosine"]
    assert kinds(_diag(trunk={"mean_cosine": 0.5, "effective_rank": 1.5, "rank_ratio": 0.01})) == ["trunk_rank"]
    assert kinds(_diag(heads=[{"head": 1, "size_entropy": 0.3, "empty_clusters": 20}])) == ["cluster_sizes"]
    assert kinds(_diag(weight_change={"trunk.layer1": {"per_epoch": 1e-5, "total": 1e-4}})) == ["not_moving"]
    assert kinds(_diag(weight_change={"trunk.layer1": {"per_epoch": 1e-5, "total": 1e-4}}, lr=0.0)) == []
    # the tail of a cosine schedule (LR at 1 % of its peak) is not "not moving"
    assert kinds(_diag(weight_change={"trunk.layer1": {"per_epoch": 1e-5, "total": 0.3}}, lr=0.012, lr_peak=1.2)) == []
    assert kinds(_diag(knn_top1=15.0, knn_top1_init=26.0)) == ["knn_below_init"]
    assert kinds(_diag(knn_top1=25.0, knn_top1_init=26.0)) == []  # within the 2-point tolerance


def _lr(value: float) -> str:
    return (f"config.OPTIMIZER.param_schedulers.lr.schedulers=[{{name: constant, value: {value}}}, "
            f"{{name: constant, value: {value}}}]")


@pytest.mark.slow
def test_a_collapsing_run_warns_in_log_events_metrics_and_report(synth_data, tmp_path):
    ckpt = tmp_path / "run"
    p = run_cli("train", *tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=4",
                                            "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", _lr(100.0),
                                            f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]",
                                            "config.MONITOR.KNN_FREQUENCY=2", "config.LOG_FREQUENCY=50",
                                            "config.MONITOR.DIAG_FREQUENCY=1"))
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "collapse check (epoch" in log and "trunk features are collapsing" in log, log[-3000:]
    assert "this run raised" in log and "collapse warnings" in log
    events = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    diags = [e for e in events if e["kind"] == "diagnostics"]
    # LR 100 collapses the trunk, but how far at each epoch varies with the machine's float summation order (one
    # CI run measured a last-epoch cosine of 0.92 where others gave > 0.95): assert the rules, not one trajectory
    held = [d["trunk"]["mean_cosine"] > COLLAPSE_MEAN_COSINE for d in diags]
    assert len(diags) == 4 and any(held), [d["trunk"] for d in diags]
    for d, h in zip(diags, held):  # each epoch's event carries the warnings its own numbers call for
        assert d["warnings"] == [m for _, m in collapse_warnings(d)]
        assert h == any("mean pairwise cosine" in m for m in d["warnings"])
    onsets = sum(h and not (i and held[i - 1]) for i, h in enumerate(held))
    # logged once when the condition appears, not at every epoch while it holds; "no longer holds" when it ends
    assert log.count("trunk features are collapsing: mean pairwise cosine") == onsets, log[-3000:]
    ends = sum(held[i - 1] and not h for i, h in enumerate(held) if i)
    assert log.count("trunk_cosine no longer holds") == ends
    knn = [e for e in events if e["kind"] == "knn"]
    assert diags[-1]["knn_top1_init"] == knn[0]["top1"]  # epoch-0 k-NN
    # each check names what it scored: the run's network, at its crop size and view, and which weights
    assert [e["weights"] for e in knn] == ["random-init (seed 0)", "this run after 2 epochs", "this run after 4 epochs"]
    assert {(e["architecture"], e["resolution"]) for e in knn} == {("ResNet-18 x0.25", 32)}
    assert knn[0]["initial"] and all(e["gain"] == pytest.approx(e["top1"] - knn[0]["top1"]) for e in knn[1:])
    # the run's floor is the network `dcv2 knn` scores for the same tokens without weights (the same draw)
    same = run_cli("knn", "--train", str(synth_data / "train"), "--val", str(synth_data / "val"), "--workers", "0",
                   *tiny_train_tokens(synth_data, ckpt, "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"), timeout=300)
    assert same.returncode == 0, same.stderr
    floor = json.loads(same.stdout.strip().splitlines()[-1])
    assert floor["weights"] == "random-init (seed 0)"
    assert abs(floor["top1"] - knn[0]["top1"]) <= 100 / floor["n_test"] + 1e-6, (floor, knn[0])  # one image at most
    html_path = run_cli("report", str(ckpt))
    assert html_path.returncode == 0, html_path.stderr
    page = (ckpt / "report" / "report.html").read_text()
    assert "raised collapse warnings" in page and "trunk features are collapsing" in page


@pytest.mark.slow
def test_a_run_that_does_not_move_warns(synth_data, tmp_path):
    p = run_cli("train", *tiny_train_tokens(synth_data, tmp_path / "run", "config.OPTIMIZER.num_epochs=2",
                                            "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", _lr(1e-4),
                                            "config.LOG_FREQUENCY=50", "config.MONITOR.DIAG_FREQUENCY=1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the trunk is not moving" in p.stdout + p.stderr


def test_diagnostics_gauges_exported():
    from prometheus_client import generate_latest

    from dcv2_k8s.metrics import PrometheusMetrics

    m = PrometheusMetrics("r", 0, enabled=True, port=0, addr="127.0.0.1")
    try:
        m.diagnostics({"trunk": {"mean_cosine": 0.97, "effective_rank": 3.0}, "embedding": {"mean_cosine": 0.5,
                       "effective_rank": 20.0}, "weight_change": {"trunk.layer4": {"per_epoch": 0.01, "total": 0.2}},
                       "warnings": ["x"], "knn_top1_init": 26.5})
        text = generate_latest(m.registry).decode()
    finally:
        m.close()
    assert 'dcv2_trunk_feature_mean_cosine{node_rank="0",run="r"} 0.97' in text
    assert 'dcv2_layer_weight_change_ratio{layer="trunk.layer4",node_rank="0",run="r",window="total"} 0.2' in text
    assert 'dcv2_collapse_warnings{node_rank="0",run="r"} 1.0' in text
    assert 'dcv2_knn_top1_init_ratio{node_rank="0",run="r"} 0.265' in text


class _Images(list):
    root = "unused: the features are given"


def test_monitor_warns_once_per_onset_and_the_reporter_writes_every_check(tmp_path, monkeypatch, caplog):
    """The monitor's warning state without a training run (the trunk's features are given): collapsed, collapsed,
    healthy. The warning is logged when the condition appears, not again while it holds, and a line says when it
    ends; every check is a ``diagnostics`` event carrying the warnings its own numbers call for."""
    from types import SimpleNamespace

    from dcv2_k8s import monitor as M
    from dcv2_k8s.config import resolve
    from dcv2_k8s.distributed import DistInfo
    from dcv2_k8s.reporter import RunReporter
    from dcv2_k8s.storage import open_storage

    caplog.set_level(logging.INFO, logger="dcv2")
    ckpt = tmp_path / "run"
    resolved = resolve(tiny_train_tokens(tmp_path, ckpt, "config.MONITOR.DIAG_FREQUENCY=1"))
    g = torch.Generator().manual_seed(0)
    collapsed = torch.ones(64, 32) + 1e-3 * torch.randn(64, 32, generator=g)
    feats = iter([collapsed, collapsed, torch.randn(64, 32, generator=g)])
    monkeypatch.setattr(M, "extract_features", lambda *a, **kw: (next(feats), None))
    model = torch.nn.Module()
    model.trunk, model.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    bank = SimpleNamespace(embeddings=[torch.randn(64, 32, generator=g)], indices=torch.arange(64))
    monitor = M.RunMonitor(resolved.cfg, DistInfo(), torch.device("cpu"), model, _Images(range(64)),
                           lambda step: 0.1, 30)
    reporter = RunReporter(resolved, DistInfo(), open_storage(str(ckpt)), 30, 10)
    assert monitor.diagnosis_due(1, final=False) and not monitor.knn_due(1, final=True)  # no DATA.TEST: no k-NN
    monitor.start()
    checks = []
    try:
        for epoch in (1, 2, 3):
            with torch.no_grad():  # the trunk moves: no "not moving" warning
                for p in model.parameters():
                    p.mul_(1.1)
            found = monitor.diagnose(epoch, 10 * epoch, -1.0, bank)
            reporter.diagnosis(found)
            checks.append(found)
    finally:
        reporter.close()
    kinds = [[w["kind"] for w in monitor.warnings if w["epoch"] == e] for e in (1, 2, 3)]
    assert "trunk_cosine" in kinds[0] and "trunk_cosine" in kinds[1] and kinds[2] == []
    assert any("mean pairwise cosine" in m for m in checks[0].appeared) and checks[1].appeared == []
    assert "trunk_cosine" in checks[2].ended and checks[0].ended == checks[1].ended == []
    log = caplog.text
    assert log.count("trunk features are collapsing: mean pairwise cosine") == 1
    assert log.count("trunk_cosine no longer holds") == 1
    events = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["kind"] == "diagnostics"] == [1, 2, 3]
    for e, found in zip(events, checks):
        assert e["warnings"] == found.record["warnings"] == [m for _, m in collapse_warnings(e)]


def test_a_run_not_beating_its_starting_network_says_so_in_log_events_metrics_and_report(tmp_path, caplog,
                                                                                          monkeypatch):
    """The k-NN floor (the network at initialisation) and each later check's gain over it: a late check under
    ``KNN_GAIN_FLOOR`` points warns once in the log, marks its event, sets the gain gauge and puts a paragraph in
    the report; an early check (first half of the epochs) does not warn."""
    from prometheus_client import generate_latest

    from dcv2_k8s.config import resolve
    from dcv2_k8s.distributed import DistInfo
    from dcv2_k8s.metrics import PrometheusMetrics
    from dcv2_k8s.monitor import KnnCheck
    from dcv2_k8s.report import render
    from dcv2_k8s.reporter import KNN_GAIN_FLOOR, RunReporter
    from dcv2_k8s.storage import open_storage

    caplog.set_level(logging.INFO, logger="dcv2")
    ckpt = tmp_path / "run"
    monkeypatch.setattr(PrometheusMetrics, "of_run",
                        classmethod(lambda cls, *a: PrometheusMetrics("r", 0, enabled=True, port=0, addr="127.0.0.1")))
    reporter = RunReporter(resolve(tiny_train_tokens(tmp_path, ckpt)), DistInfo(), open_storage(str(ckpt)), 40, 10)
    try:
        reporter.run_start(None, True, 0, 0)
        for epoch, top1, kw in ((0, 44.0, {"initial": True}), (1, 43.0, {"top1_init": 44.0, "late": False}),
                                (2, 44.0 + KNN_GAIN_FLOOR / 2, {"top1_init": 44.0, "late": True}),
                                (4, 44.5, {"top1_init": 44.0, "late": True})):
            reporter.knn(KnnCheck(epoch, {"top1": top1, "top5": 90.0}, 0.1), **kw)
        text = generate_latest(reporter.prometheus.registry).decode()
    finally:
        reporter.close()
    warned = [r.getMessage() for r in caplog.records if "not beating the network it started from" in r.getMessage()]
    assert len(warned) == 1 and "epoch 2" in warned[0] and "44.0% at initialisation" in warned[0], warned
    assert "+1.0 points over initialisation" in caplog.text  # every later check says its gain
    events = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    knn = [e for e in events if e["kind"] == "knn"]
    assert knn[0]["initial"] and [e.get("not_beating_init", False) for e in knn] == [False, False, True, False]
    assert knn[-1]["gain"] == pytest.approx(0.5)
    assert 'dcv2_knn_top1_init_ratio{node_rank="0",run="r"} 0.44' in text
    assert 'dcv2_knn_top1_gain_over_init_ratio{node_rank="0",run="r"} 0.005' in text
    with open(ckpt / "metrics.jsonl", "a") as f:  # the report wants a training step beside the checks
        f.write(json.dumps({"kind": "step", "run_id": knn[0]["run_id"], "attempt": knn[0]["attempt"], "epoch": 4, "global_step": 40, "loss": 3.0, "lr": 0.1,
                            "images_per_s": 10.0, "data_wait_ratio": 0.0, "ignored_ratio": 0.0}) + "\n")
    page = Path(render(str(ckpt), str(tmp_path / "report"))).read_text()
    assert "Training is not beating the network it started from" in page
    assert "k-NN top-1 at initialisation</th><td>44.00 %" in page and "+0.50 points" in page
