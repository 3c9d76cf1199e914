"""The Kubeflow pipeline: compile drift, what the compiled spec carries, and the PyTorchJob launcher's logic
against the Kubernetes API calls it makes (no API server runs here; the shapes are those of kubernetes.client)."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from dcv2_k8s import pipeline_steps
from dcv2_k8s.k8s.launcher import JobFailed, PyTorchJobLauncher, job_name
from dcv2_k8s.k8s.manifests import JobSpec, pytorchjob
from dcv2_k8s.k8s.validate import validate_pytorchjob
from tests.conftest import ROOT


def test_compiled_pipeline_is_current(tmp_path):
    out = tmp_path / "p.yaml"
    p = subprocess.run([sys.executable, "pipelines/dcv2_pipeline.py", str(out)], cwd=str(ROOT), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.read_text() == (ROOT / "pipelines" / "dcv2_pipeline.yaml").read_text(), \
        "recompile: python pipelines/dcv2_pipeline.py pipelines/dcv2_pipeline.yaml"


def test_compiled_spec_carries_secret_volumes_selectors_retries():
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "dcv2_pipeline.yaml").read_text()))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("data_uri", "val_uri", "output_uri", "config", "overrides", "nodes", "gpus_per_node", "image",
                 "namespace", "eval_preset", "launcher", "pretrain_timeout_seconds", "eval_timeout_seconds"):
        assert name in params, name
    pretrain = next(v for k, v in platform.items() if "pretrain" in k)
    assert pretrain["secretAsEnv"][0]["secretName"] == "dcv2-s3"
    assert any(m["mountPath"] == "/dev/shm" and m["medium"] == "Memory" for m in pretrain["emptyDirMounts"])
    assert pretrain["tolerations"][0]["key"] == "nvidia.com/gpu" and "nodeSelector" in pretrain
    assert all("secretAsEnv" in v for v in platform.values())  # every step can reach S3
    text = (ROOT / "pipelines" / "dcv2_pipeline.yaml").read_text()
    assert re.search(r"maxRetryCount: 3", text) and "nvidia.com/gpu" in text  # retries on staging; GPU toleration
    assert "exitTask" in text or "exit-handler" in text.lower()


class FakeApi:
    """The CustomObjectsApi and CoreV1Api calls the launcher makes, over an in-memory job store."""

    class ApiException(Exception):
        def __init__(self, status):
            super().__init__(f"HTTP {status}")
            self.status = status

    def __init__(self):
        self.jobs, self.logs, self.script = {}, {}, []

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise self.ApiException(409)
        self.jobs[name] = {**body, "status": {"conditions": []}}

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        if name not in self.jobs:
            raise self.ApiException(404)
        if self.script:  # advance the job one state per poll
            cond, line = self.script.pop(0)
            self.jobs[name]["status"]["conditions"].append({"type": cond, "status": "True", "message": f"{cond}!"})
            if line:
                self.logs[name] = self.logs.get(name, "") + line + "\n"
        return self.jobs[name]

    def delete_namespaced_custom_object(self, group, version, ns, plural, name):
        if self.jobs.pop(name, None) is None:
            raise self.ApiException(404)

    # CoreV1Api
    def list_namespaced_pod(self, ns, label_selector):
        name = dict(kv.split("=") for kv in label_selector.split(","))["training.kubeflow.org/job-name"]
        assert "training.kubeflow.org/job-role=master" in label_selector
        items = [SimpleNamespace(metadata=SimpleNamespace(name=f"{name}-master-0"))] if name in self.logs else []
        return SimpleNamespace(items=items)

    def read_namespaced_pod_log(self, pod, ns, container, tail_lines=None):
        assert container == "pytorch"
        lines = self.logs[pod[: -len("-master-0")]].splitlines()
        return "\n".join(lines[-tail_lines:] if tail_lines else lines)


def _launcher(api, printed, clock=None):
    t = [0.0]

    def tick():
        t[0] += 10
        return t[0]

    return PyTorchJobLauncher(api, api, "ml", poll_seconds=0, log=printed.append, clock=clock or tick,
                              sleep=lambda s: None)


def _job(name="dcv2-pretrain-x"):
    return pytorchjob(JobSpec(name, nodes=2))


def test_job_names_are_deterministic_dns_labels():
    a, b = job_name("run-123", "pretrain"), job_name("run-123", "pretrain")
    assert a == b != job_name("run-124", "pretrain") and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 63
    assert validate_pytorchjob(_job(a)) == []


def test_launch_waits_streams_logs_and_reattaches():
    api, printed = FakeApi(), []
    lx = _launcher(api, printed)
    api.script = [("Created", ""), ("Running", "epoch 0 step 5/15 loss 8.0"), ("Running", "epoch 0 step 10/15"),
                  ("Succeeded", "training finished")]
    name = lx.launch(_job())
    assert lx.wait(name, timeout_seconds=3600) == "Succeeded"
    assert "[dcv2-pretrain-x-master-0] epoch 0 step 5/15 loss 8.0" in printed
    assert printed.count("[dcv2-pretrain-x-master-0] epoch 0 step 5/15 loss 8.0") == 1  # each line once
    # a retried step creates the same name again: it attaches instead of starting a second job
    assert lx.launch(_job()) == name and len(api.jobs) == 1 and any("attaching" in p for p in printed)


def test_failure_raises_with_the_last_log_lines():
    api, printed = FakeApi(), []
    lx = _launcher(api, printed)
    api.script = [("Running", "loading data"), ("Failed", "dcv2: error: the loss is nan at step 12")]
    name = lx.launch(_job())
    with pytest.raises(JobFailed) as e:
        lx.wait(name, 3600)
    assert "failed: Failed!" in str(e.value) and "the loss is nan at step 12" in str(e.value)


def test_wall_clock_limit_and_deleted_job():
    api, printed = FakeApi(), []
    lx = _launcher(api, printed)
    api.script = [("Running", "step")] * 50
    name = lx.launch(_job())
    with pytest.raises(JobFailed, match="did not finish within 100 s"):
        lx.wait(name, 100)
    assert lx.delete(name) and not lx.delete(name)  # deleted, then 404 is not an error
    with pytest.raises(JobFailed, match="was deleted"):
        lx.wait(name, 100)


def test_exit_handler_deletes_jobs_of_failed_runs(monkeypatch):
    api, printed = FakeApi(), []
    monkeypatch.setattr(pipeline_steps, "_launcher", lambda ns: _launcher(api, printed))
    for step in ("pretrain", "eval-trained"):
        api.jobs[job_name("run-9", step)] = {"status": {}}
    assert pipeline_steps.cleanup_step("pytorchjob", "run-9", "ml", "SUCCEEDED") == []
    deleted = pipeline_steps.cleanup_step("pytorchjob", "run-9", "ml", "FAILED")
    assert sorted(deleted) == sorted(job_name("run-9", s) for s in ("pretrain", "eval-trained")) and not api.jobs
    assert pipeline_steps.cleanup_step("local", "run-9", "ml", "FAILED") == []
