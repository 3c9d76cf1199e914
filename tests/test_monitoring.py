"""Observability against a real Prometheus: the trainer's metrics, every dashboard query, the alert rules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from dcv2_k8s import dashboard
from dcv2_k8s.distributed import free_port
from tests.conftest import ROOT, tiny_train_tokens

pytestmark = pytest.mark.slow
MON = ROOT / "manifests" / "monitoring"


def _bin(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: install Debian's prometheus package (.ci/run does)"
    return path


@pytest.fixture()
def prometheus(tmp_path):
    """Start Prometheus on 127.0.0.1 with a temporary config; yields (url, set_targets)."""
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    proc = None

    def start(targets: list[str]) -> str:
        nonlocal proc
        cfg.write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "dcv2", "static_configs": [{"targets": targets}]}]}))
        proc = subprocess.Popen([_bin("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "prometheus.log", "w"))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2)
                return url
            except OSError:
                assert time.time() < deadline and proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                time.sleep(0.3)

    yield start
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # stopped by its PID, also when the test failed
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def query(url: str, expr: str) -> tuple[int, dict]:
    q = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


SCRAPE_S = 1.0  # the test Prometheus's scrape_interval, also its Grafana data source's "Scrape interval"
# Grafana's interval rounding (grafana-plugin-sdk-go backend/gtime RoundInterval): up to each bound -> that value
ROUNDING = [(0.015, 0.01), (0.035, 0.02), (0.075, 0.05), (0.15, 0.1), (0.35, 0.2), (0.75, 0.5), (1.5, 1), (3.5, 2),
            (7.5, 5), (12.5, 10), (17.5, 15), (25, 20), (45, 30), (90, 60)]


def grafana_query(url: str, expr: str, start: float, end: float, width: int) -> tuple[int, dict]:
    """One panel target as Grafana's Prometheus data source runs it: a range query over [start, end] whose step is
    the panel's interval (range / max data points, the panel's width in pixels on a 1920-px dashboard, rounded, at
    least the scrape interval and range / 11000), start and end rounded down to the step, and
    ``$__rate_interval = max($__interval + scrape interval, 4 x scrape interval)`` (grafana/grafana
    pkg/promlib/models/query.go: calculatePrometheusInterval, calculateRateInterval, AlignTimeRange)."""
    def rounded(s: float) -> float:
        return next(v for bound, v in ROUNDING if s <= bound)

    rng = end - start
    interval = max(rounded(rng / (width * 1920 / 24)), SCRAPE_S)
    step = max(interval, rounded(rng / 11000))
    rate = max(interval + SCRAPE_S, 4 * SCRAPE_S)
    expr = expr.replace("$namespace", ".*").replace("$job", ".*").replace("$__rate_interval", f"{rate:g}s")
    q = urllib.parse.urlencode({"query": expr, "start": start // step * step, "end": end // step * step,
                                "step": f"{step:g}"})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_grafana_query_follows_grafanas_interval_rules(monkeypatch):
    sent = []

    class Reply:
        status = 200

        def __init__(self, u, timeout):
            sent.append(urllib.parse.parse_qs(urllib.parse.urlsplit(u).query))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return b"{}"

    monkeypatch.setattr(urllib.request, "urlopen", Reply)
    grafana_query("http://x", "rate(m[$__rate_interval])", 1000.0, 1300.0, 8)  # 5 min on 640 px: 0.47 s -> 1 s
    grafana_query("http://x", "rate(m[$__rate_interval])", 0.0, 6 * 3600.0, 8)  # 6 h: 33.75 s -> 30 s
    assert [(s["query"][0], s["step"][0], s["start"][0]) for s in sent] == [
        ("rate(m[4s])", "1", "1000.0"), ("rate(m[31s])", "30", "0.0")]


def test_dashboard_file_is_current():
    committed = json.loads((MON / "dashboards" / "dcv2-training.json").read_text())
    assert committed == dashboard.render(), "re-render: python -m dcv2_k8s.dashboard > manifests/monitoring/..."
    kust = yaml.safe_load((MON / "kustomization.yaml").read_text())
    gen = kust["configMapGenerator"][0]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}
    assert {v["name"] for v in committed["templating"]["list"]} == {"datasource", "namespace", "job"}


def test_metrics_dashboard_queries_against_real_prometheus(prometheus, synth_data, tmp_path):
    mport = free_port()
    url = prometheus([f"127.0.0.1:{mport}"])
    ckpt = tmp_path / "run"
    cmd = [sys.executable, "-m", "dcv2_k8s", "train",
           *tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=200", "config.METRICS.ENABLED=true",
                              f"config.METRICS.PORT={mport}", "config.METRICS.ADDR=127.0.0.1",
                              f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]", "config.MONITOR.KNN_FREQUENCY=1",
                              "config.MONITOR.DIAG_FREQUENCY=1",
                              "config.RUN_NAME=promtest")]
    log = open(tmp_path / "train.log", "w")
    train = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                             env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    try:
        deadline = time.time() + 240
        needed = ["dcv2_checkpoint_bytes", "dcv2_knn_top1_ratio", "dcv2_kmeans_nmi_previous_ratio"]
        while True:
            have = [m for m in needed if query(url, m)[1].get("data", {}).get("result")]
            if len(have) == len(needed) and time.time() > deadline - 200:
                break
            assert time.time() < deadline and train.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(1)
        time.sleep(3)
        # the exporter: one endpoint, conventional names, bounded labels
        _, up = query(url, "up")
        assert [r["value"][1] for r in up["data"]["result"]] == ["1"]
        _, info = query(url, "dcv2_build_info")
        assert info["data"]["result"][0]["metric"]["config"] == "pretrain/deepcluster_v2/deepclusterv2_demo_cpu"
        _, series = query(url, '{__name__=~"dcv2_.*"}')
        for s in series["data"]["result"]:
            assert set(s["metric"]) <= {"__name__", "instance", "job", "run", "node_rank", "head", "le", "version",
                                        "torch", "cuda", "python", "config", "layer", "window"}, s["metric"]
        empty = []
        end = time.time()
        for panel, shown in zip(dashboard.PANELS, dashboard.render()["panels"]):  # the last 5 minutes, as Grafana
            for target in shown["targets"]:
                status, body = grafana_query(url, target["expr"], end - 300, end, shown["gridPos"]["w"])
                assert status == 200 and body["status"] == "success", (panel.title, target["expr"], body)
                values = [v for s in body["data"]["result"] for _, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if panel.source == "trainer" and not values:
                    empty.append(f"{panel.title}: {target['expr']}")
        assert not empty, f"panels without data: {empty}"
        status, _ = query(url, "sum(rate(dcv2_train_samples_total[1m])")  # the server rejects bad PromQL
        assert status == 400
    finally:
        train.send_signal(signal.SIGTERM)
        try:
            train.wait(timeout=60)
        except subprocess.TimeoutExpired:
            train.kill()
        log.close()
    assert train.returncode == 143  # preempted: committed a checkpoint and exited with the retryable code


def _rules_file(tmp_path: Path) -> Path:
    rule = yaml.safe_load((MON / "prometheusrule.yaml").read_text())
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def _expected(alert: str, labels: dict) -> str:
    """The alert's labels and its annotations rendered for ``labels`` (checks the templates too)."""
    rule = next(r for g in yaml.safe_load((MON / "prometheusrule.yaml").read_text())["spec"]["groups"]
                for r in g["rules"] if r["alert"] == alert)
    notes = {}
    for k, v in rule.get("annotations", {}).items():
        for name, value in labels.items():
            v = v.replace("{{ $labels.%s }}" % name, value)
        notes[k] = v
    return json.dumps({"exp_labels": dict(rule["labels"], **labels), "exp_annotations": notes})


def test_alert_rules_check_and_unit_tests(tmp_path):
    rules = _rules_file(tmp_path)
    p = subprocess.run([_bin("promtool"), "check", "rules", str(rules)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    lbl = 'namespace="ml", training_kubeflow_org_job_name="r50"'
    job = {"namespace": "ml", "training_kubeflow_org_job_name": "r50"}
    tests = tmp_path / "rules_test.yaml"
    tests.write_text(textwrap.dedent(f"""\
        rule_files: [rules.yaml]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'dcv2_train_loss_nonfinite{{{lbl}, node_rank="0"}}'
                values: '0 0 0 1 1'
            alert_rule_test:
              - {{eval_time: 2m, alertname: DCv2LossNotFinite, exp_alerts: []}}
              - eval_time: 4m
                alertname: DCv2LossNotFinite
                exp_alerts:
                  - {_expected("DCv2LossNotFinite", job)}
          - interval: 1m
            input_series:
              - series: 'dcv2_iteration{{{lbl}, node_rank="0"}}'
                values: '0+10x20 200x40'
            alert_rule_test:
              - {{eval_time: 20m, alertname: DCv2TrainingStalled, exp_alerts: []}}
              - eval_time: 45m
                alertname: DCv2TrainingStalled
                exp_alerts:
                  - {_expected("DCv2TrainingStalled", job)}
          - interval: 1m
            input_series:
              - series: 'dcv2_kmeans_empty_clusters{{{lbl}, node_rank="0", head="1"}}'
                values: '0 50 400'
              - series: 'dcv2_kmeans_clusters{{{lbl}, node_rank="0", head="1"}}'
                values: '3000 3000 3000'
            alert_rule_test:
              - {{eval_time: 1m, alertname: DCv2EmptyClusters, exp_alerts: []}}
              - eval_time: 2m
                alertname: DCv2EmptyClusters
                exp_alerts:
                  - {_expected("DCv2EmptyClusters", dict(job, head="1"))}
          - interval: 5m
            input_series:
              - series: 'dcv2_collapse_warnings{{{lbl}, node_rank="0"}}'
                values: '0 0 1 1 1 1 1 1 1 1'
            alert_rule_test:
              - {{eval_time: 20m, alertname: DCv2RepresentationCollapse, exp_alerts: []}}
              - eval_time: 45m
                alertname: DCv2RepresentationCollapse
                exp_alerts:
                  - {_expected("DCv2RepresentationCollapse", job)}
        """))
    p = subprocess.run([_bin("promtool"), "test", "rules", str(tests)], capture_output=True, text=True,
                       cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr


def test_report_renders_plots_and_html(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    events = [{"kind": "step", "epoch": e, "global_step": 10 * e + 10, "loss": 3.4 - 0.1 * e, "lr": 0.1,
               "images_per_s": 100.0, "data_wait_ratio": 0.05, "ignored_ratio": 0.0} for e in range(4)]
    events += [{"kind": "kmeans", "epoch": e, "seconds": 0.1,
                "heads": [{"head": 0, "empty_clusters": 0, "size_entropy": 0.9, "nmi_prev": 0.5}]} for e in range(4)]
    events += [{"kind": "knn", "epoch": 2, "top1": 40.0, "top5": 80.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events))
    from tests.conftest import run_cli

    p = run_cli("report", str(run), timeout=120)
    assert p.returncode == 0, p.stderr
    page = Path(p.stdout.strip())
    assert page.name == "report.html" and "data:image/png;base64," in page.read_text()
    assert len(list(page.parent.glob("*.png"))) >= 8
    p = run_cli("report", str(tmp_path / "nothing"), timeout=120)
    assert p.returncode == 2 and "no metrics log" in p.stderr
