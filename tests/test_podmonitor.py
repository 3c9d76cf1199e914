"""Our PodMonitors as the Prometheus Operator would configure Prometheus (``tests/kube/podmonitor.py``): the rules
generated for them, ``promtool check config`` on the result, and the real ``prometheus`` server applying them to
the targets Kubernetes discovery would give it for our pods (a file of targets in place of the API server)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.kube.controlplane import free_port
from tests.kube.podmonitor import UnsupportedPodMonitor, discovered_targets, sanitize_label_name, scrape_config

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "manifests" / "monitoring"
API = "https://127.0.0.1:6443"
TLS = ("/etc/dcv2/ca.crt", "/etc/dcv2/client.crt", "/etc/dcv2/client.key")


def _pm(name: str) -> dict:
    return yaml.safe_load((MON / name).read_text())


def _rule(cfg: dict, **match) -> dict:
    found = [r for r in cfg["relabel_configs"] if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, cfg["relabel_configs"])
    return found[0]


def test_trainer_podmonitor_rules():
    pm = _pm("podmonitor.yaml")
    cfg = scrape_config(pm, API, *TLS)
    assert cfg["job_name"] == "podMonitor/default/dcv2-trainer/0" and cfg["honor_labels"] is False
    # namespaceSelector any: true -> no namespaces list (every namespace)
    assert cfg["kubernetes_sd_configs"] == [{"role": "pod", "api_server": API, "tls_config": {
        "ca_file": TLS[0], "cert_file": TLS[1], "key_file": TLS[2]}}]
    assert (cfg["scrape_interval"], cfg["scrape_timeout"], cfg["metrics_path"]) == ("15s", "10s", "/metrics")
    rules = cfg["relabel_configs"]
    assert rules[0] == {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}
    assert rules[1] == {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"],
                        "regex": "(Failed|Succeeded)"}
    # one keep per matchLabels key, in sorted key order, on value and presence
    keeps = [r for r in rules if r.get("action") == "keep" and "labelpresent" in " ".join(r["source_labels"])]
    assert keeps == [
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name",
                                             "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name"],
         "regex": "(dcv2-trainer);true"},
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_label_training_kubeflow_org_operator_name",
                                             "__meta_kubernetes_pod_labelpresent_training_kubeflow_org_operator_name"],
         "regex": "(pytorchjob-controller);true"}]
    _rule(cfg, action="keep", source_labels=["__meta_kubernetes_pod_container_port_name"], regex="metrics")
    for meta, target in (("namespace", "namespace"), ("pod_container_name", "container"), ("pod_name", "pod")):
        _rule(cfg, source_labels=[f"__meta_kubernetes_{meta}"], target_label=target)
    for key in pm["spec"]["podTargetLabels"]:
        assert _rule(cfg, target_label=sanitize_label_name(key)) == {
            "source_labels": [f"__meta_kubernetes_pod_label_{sanitize_label_name(key)}"],
            "target_label": sanitize_label_name(key), "regex": "(.+)", "replacement": "${1}"}
    assert _rule(cfg, target_label="job", replacement="default/dcv2-trainer")
    assert _rule(cfg, target_label="endpoint") == {"target_label": "endpoint", "replacement": "metrics"}
    assert not any("__meta_kubernetes_pod_container_init" in r.get("source_labels", []) for r in rules)
    assert _rule(cfg, action="hashmod")["modulus"] == 1


def test_selector_expressions_namespaces_and_interval():
    pm = _pm("podmonitor-trainjob.yaml")
    cfg = scrape_config(pm, API, *TLS, namespaces=["e2e"], interval="1s")
    assert cfg["kubernetes_sd_configs"][0]["namespaces"] == {"names": ["e2e"]}
    assert (cfg["scrape_interval"], cfg["scrape_timeout"]) == ("1s", "1s")   # 10s capped at the interval
    _rule(cfg, action="keep", source_labels=["__meta_kubernetes_pod_labelpresent_jobset_sigs_k8s_io_jobset_name"],
          regex="true")
    pm = copy.deepcopy(pm)
    pm["metadata"]["namespace"] = "ml"
    pm["spec"]["namespaceSelector"] = {"matchNames": ["a", "b"]}
    pm["spec"]["selector"]["matchExpressions"] += [
        {"key": "tier", "operator": "In", "values": ["x", "y"]},
        {"key": "tier", "operator": "NotIn", "values": ["z"]},
        {"key": "canary", "operator": "DoesNotExist"}]
    cfg = scrape_config(pm, API, *TLS)
    assert cfg["job_name"] == "podMonitor/ml/dcv2-trainjob/0"
    assert cfg["kubernetes_sd_configs"][0]["namespaces"] == {"names": ["a", "b"]}
    tier = ["__meta_kubernetes_pod_label_tier", "__meta_kubernetes_pod_labelpresent_tier"]
    _rule(cfg, action="keep", source_labels=tier, regex="(x|y);true")
    _rule(cfg, action="drop", source_labels=tier, regex="(z);true")
    _rule(cfg, action="drop", source_labels=["__meta_kubernetes_pod_labelpresent_canary"], regex="true")
    del pm["spec"]["namespaceSelector"]
    assert scrape_config(pm, API, *TLS)["kubernetes_sd_configs"][0]["namespaces"] == {"names": ["ml"]}
    pm["spec"]["podMetricsEndpoints"][0]["filterRunning"] = False
    assert not any(r.get("source_labels") == ["__meta_kubernetes_pod_phase"]
                   for r in scrape_config(pm, API, *TLS)["relabel_configs"])


@pytest.mark.parametrize("where, value, named", [
    ("ep", {"relabelings": []}, "relabelings"), ("ep", {"scheme": "https"}, "scheme"),
    ("spec", {"sampleLimit": 5}, "sampleLimit"), ("spec", {"selectorMechanism": "RoleSelector"}, "selectorMechanism"),
    ("expr", {"key": "a", "operator": "Gt", "values": ["1"]}, "Gt")])
def test_unsupported_features_are_named(where, value, named):
    pm = copy.deepcopy(_pm("podmonitor.yaml"))
    if where == "ep":
        pm["spec"]["podMetricsEndpoints"][0].update(value)
    elif where == "spec":
        pm["spec"].update(value)
    else:
        pm["spec"]["selector"]["matchExpressions"] = [value]
    with pytest.raises(UnsupportedPodMonitor, match=named):
        scrape_config(pm, API, *TLS)


def _promtool_check(tmp_path: Path, configs: list[dict]) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": configs}, sort_keys=False))
    return subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)


def _both(tmp_path: Path) -> list[dict]:
    """The entries for both PodMonitors as generated, plus the e2e variant (own namespace, 1 s), with TLS files
    that exist (promtool checks that they do)."""
    tls = [tmp_path / n for n in ("ca.crt", "client.crt", "client.key")]
    for f in tls:
        f.write_text("placeholder\n")
    configs = [scrape_config(_pm(n), API, *map(str, tls)) for n in ("podmonitor.yaml", "podmonitor-trainjob.yaml")]
    configs.append(scrape_config(_pm("podmonitor.yaml"), API, *map(str, tls), namespaces=["e2e"], interval="1s"))
    configs[-1]["job_name"] += "-e2e"
    return configs


def test_promtool_accepts_the_generated_scrape_settings_and_rules(tmp_path):
    """Everything but the discovery block: Debian builds Prometheus without Kubernetes discovery, so the
    generated entries are checked here with their kubernetes_sd_configs swapped for a file_sd_configs."""
    configs = _both(tmp_path)
    (tmp_path / "targets.json").write_text("[]")
    for c in configs:
        del c["kubernetes_sd_configs"]
        c["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
    p = _promtool_check(tmp_path, configs)
    assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr


def test_promtool_accepts_the_generated_config(tmp_path):
    p = _promtool_check(tmp_path, _both(tmp_path))
    if p.returncode != 0 and "field kubernetes_sd_configs not found" in p.stdout + p.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian has removed it from its "
                    "prometheus package since 1.5.0+ds-1, see its NEWS.Debian): kubernetes_sd_configs unchecked")
    assert p.returncode == 0, p.stdout + p.stderr


# --- the real Prometheus server on discovered targets --------------------------------------------------------

def _pods() -> dict[str, dict]:
    """Pods as the training operator and JobSet create them from our manifests, in namespace e2e."""
    job = yaml.safe_load((ROOT / "manifests" / "pytorchjob-r50.yaml").read_text())
    runtime = yaml.safe_load((ROOT / "manifests" / "trainjob" / "runtime-dcv2-torch.yaml").read_text())

    def pod(template, name, phase, ip, labels):
        owner = "JobSet" if "jobset.sigs.k8s.io/jobset-name" in labels else "PyTorchJob"
        return {"metadata": {"namespace": "e2e", "name": name, "uid": name + "-uid",
                             "labels": {**template["metadata"].get("labels", {}), **labels},
                             "annotations": template["metadata"].get("annotations", {}),
                             "ownerReferences": [{"kind": owner, "name": name.rsplit("-", 2)[0], "controller": True}]},
                "spec": {**template["spec"], "nodeName": "dcv2-gpu-node-0"},
                "status": {"phase": phase, "podIP": ip, "hostIP": "127.0.0.1" if ip else "",
                           "conditions": [{"type": "Ready", "status": "True" if phase == "Running" else "False"}]}}

    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    operator = {"training.kubeflow.org/operator-name": "pytorchjob-controller",
                "training.kubeflow.org/job-name": "dcv2-r50", "training.kubeflow.org/replica-type": "worker"}
    other = copy.deepcopy(worker)
    other["metadata"]["labels"]["app.kubernetes.io/name"] = "other-app"
    jobset = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    return {
        # Running: its pytorch container's metrics port is the one target to keep; its pytorchjob-port and its
        # init container stage-data (no ports: a target with no port name) are dropped
        "dcv2-r50-worker-0": pod(worker, "dcv2-r50-worker-0", "Running", "127.0.83.10",
                                 {**operator, "training.kubeflow.org/replica-index": "0"}),
        "dcv2-r50-worker-1": pod(worker, "dcv2-r50-worker-1", "Succeeded", "127.0.83.11",
                                 {**operator, "training.kubeflow.org/replica-index": "1"}),
        "other-worker-0": pod(other, "other-worker-0", "Running", "127.0.83.12",
                              {**operator, "training.kubeflow.org/replica-index": "0"}),
        "dcv2-tj-node-0-0": pod(jobset, "dcv2-tj-node-0-0", "Running", "127.0.83.13",
                                {"jobset.sigs.k8s.io/jobset-name": "dcv2-tj",
                                 "jobset.sigs.k8s.io/replicatedjob-name": "node"}),
        "dcv2-r50-worker-2": pod(worker, "dcv2-r50-worker-2", "Pending", "", {**operator}),   # no IP yet
    }


@pytest.fixture
def prometheus(tmp_path):
    """The real Prometheus server on 127.0.0.1 with our two PodMonitors' scrape configs, discovery from a file
    of the targets Kubernetes discovery would give for ``_pods()``; yields its URL, process and log file; stopped by PID at the end."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package prometheus)")
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([g for p in _pods().values() for g in discovered_targets(p)], indent=1))
    configs = []
    for name in ("podmonitor.yaml", "podmonitor-trainjob.yaml"):
        cfg = scrape_config(_pm(name), API, *TLS, namespaces=["e2e"], interval="1s")
        del cfg["kubernetes_sd_configs"]   # the API server's part, replaced by the same targets from a file
        configs.append({**cfg, "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]})
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": configs}, sort_keys=False))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", proc, tmp_path / "prometheus.log"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def test_prometheus_keeps_exactly_our_running_pods_metrics_port(prometheus):
    url, proc, log = prometheus
    expected = sum(len(discovered_targets(p)) for p in _pods().values())   # every target, in each of the two jobs
    deadline, data = time.monotonic() + 25, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=2) as r:
                data = json.load(r)["data"]
            if len(data["activeTargets"]) + len(data["droppedTargets"]) == 2 * expected:
                break
        except OSError:
            pass
        time.sleep(0.3)
    else:
        pytest.fail(f"targets not all discovered in 25 s: {data}\n{log.read_text()[-3000:]}")

    active = {(t["scrapePool"], t["discoveredLabels"]["__meta_kubernetes_pod_name"]): t for t in data["activeTargets"]}
    assert set(active) == {("podMonitor/default/dcv2-trainer/0", "dcv2-r50-worker-0"),
                           ("podMonitor/default/dcv2-trainjob/0", "dcv2-tj-node-0-0")}, active
    trainer = active["podMonitor/default/dcv2-trainer/0", "dcv2-r50-worker-0"]
    assert trainer["labels"] == {
        "instance": "127.0.83.10:8000", "job": "default/dcv2-trainer", "namespace": "e2e",
        "container": "pytorch", "pod": "dcv2-r50-worker-0", "endpoint": "metrics",
        "training_kubeflow_org_job_name": "dcv2-r50", "training_kubeflow_org_replica_type": "worker",
        "training_kubeflow_org_replica_index": "0"}
    assert trainer["scrapeUrl"] == "http://127.0.83.10:8000/metrics" and trainer["scrapeInterval"] == "1s"
    tj = active["podMonitor/default/dcv2-trainjob/0", "dcv2-tj-node-0-0"]
    assert tj["labels"] == {"instance": "127.0.83.13:8000", "job": "default/dcv2-trainjob", "namespace": "e2e",
                            "container": "node", "pod": "dcv2-tj-node-0-0", "endpoint": "metrics",
                            "jobset_sigs_k8s_io_jobset_name": "dcv2-tj"}
    # what each pool dropped, by pod and port name ("-": a container without ports). Prometheus 2.42 shows some
    # dropped targets' discoveredLabels with the first rule's __tmp_prometheus_job_name in place of `job` (its
    # label slices are reused in place), so the pool is read from whichever of the two is there.
    dropped: dict[str, list] = {}
    for t in data["droppedTargets"]:
        lab = t["discoveredLabels"]
        dropped.setdefault(lab.get("job", lab.get("__tmp_prometheus_job_name")), []).append(
            (lab["__meta_kubernetes_pod_name"], lab.get("__meta_kubernetes_pod_container_port_name", "-")))
    ours = [("dcv2-r50-worker-0", "-"), ("dcv2-r50-worker-0", "pytorchjob-port"), ("dcv2-r50-worker-1", "-"),
            ("dcv2-r50-worker-1", "metrics"), ("dcv2-r50-worker-1", "pytorchjob-port"), ("other-worker-0", "-"),
            ("other-worker-0", "metrics"), ("other-worker-0", "pytorchjob-port")]
    assert sorted(dropped["podMonitor/default/dcv2-trainer/0"]) == sorted(ours + [("dcv2-tj-node-0-0", "metrics")])
    assert sorted(dropped["podMonitor/default/dcv2-trainjob/0"]) == sorted(ours + [("dcv2-r50-worker-0", "metrics")])
    assert set(dropped) == {"podMonitor/default/dcv2-trainer/0", "podMonitor/default/dcv2-trainjob/0"}
