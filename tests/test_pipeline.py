"""The Kubeflow pipeline and its PyTorchJob launcher, held to the rules of the real KFP backend and the real
training operator (each test quotes the rule and its source). The launcher runs against an in-memory stand-in
of the Kubernetes API calls it makes (the shapes are kubernetes.client's)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dcv2_k8s import pipeline_steps
from dcv2_k8s.k8s import launcher as L
from dcv2_k8s.k8s.kinds import PYTORCHJOB, TRAINJOB
from dcv2_k8s.k8s.launcher import JobFailed, JobLauncher, StepTerminated, job_name
from dcv2_k8s.k8s.manifests import IMAGE, JobSpec, pytorchjob
from dcv2_k8s.k8s.validate import validate_pytorchjob
from tests.conftest import ROOT

COMPILED = ROOT / "pipelines" / "dcv2_pipeline.yaml"
COMPAT = ROOT / ".venv" / "compat"  # kfp-kubernetes releases installed by `make` for the proto checks


def _compile(tmp_path, *args) -> tuple[dict, dict]:
    out = tmp_path / "p.yaml"
    p = subprocess.run([sys.executable, "pipelines/dcv2_pipeline.py", str(out), *args], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict:
    """Every task of the pipeline, inside the exit handler's DAG included."""
    out = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def test_compiled_pipeline_is_current(tmp_path):
    _compile(tmp_path)
    assert (tmp_path / "p.yaml").read_text() == COMPILED.read_text(), \
        "recompile: python pipelines/dcv2_pipeline.py pipelines/dcv2_pipeline.yaml"


def test_compiled_spec_carries_secret_volumes_selectors_retries():
    """Every step reads the S3 secret; the watcher steps (pretrain, eval) are retried, so an evicted watcher pod
    re-attaches to its job instead of failing the run; staging is never served from cache (its start time is the
    run's)."""
    docs = list(yaml.safe_load_all(COMPILED.read_text()))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("data_uri", "val_uri", "output_uri", "config", "overrides", "nodes", "gpus_per_node", "image",
                 "image_pull_secrets", "namespace", "eval_preset", "launcher", "pretrain_timeout_seconds",
                 "eval_timeout_seconds"):
        assert name in params, name
    assert params["namespace"]["defaultValue"] == ""  # the step pod's own namespace
    # the jobs' pods per GPU (dcv2_k8s.k8s.manifests.JobSpec), passed to pretraining and both linear evals
    sizing = ("cpu_per_gpu", "memory_gib_per_gpu", "scratch_gib")
    assert tuple(params[p]["defaultValue"] for p in sizing) == (10.0, 48.0, 200.0)
    assert all(params[p]["parameterType"] == "NUMBER_DOUBLE" for p in sizing)
    sized = {n for n, t in _tasks(spec).items() if set(sizing) <= set(t.get("inputs", {}).get("parameters", {}))}
    assert sized == {"pretrain", "linear-eval", "linear-eval-2"}, sized
    pretrain = next(v for k, v in platform.items() if "pretrain" in k)
    assert pretrain["secretAsEnv"][0]["secretName"] == "dcv2-s3"
    assert any(m["mountPath"] == "/dev/shm" and m["medium"] == "Memory" for m in pretrain["emptyDirMounts"])
    assert pretrain["tolerations"][0]["key"] == "nvidia.com/gpu" and "nodeSelector" in pretrain
    assert all("secretAsEnv" in v for v in platform.values())  # every step can reach S3
    tasks = _tasks(spec)
    for name, task in tasks.items():
        if name.startswith(("pretrain", "linear-eval")):
            assert task["retryPolicy"]["maxRetryCount"] >= 3, name
        if name.startswith(("stage", "pretrain", "linear-eval", "report")):
            assert task.get("cachingOptions", {}).get("enableCache") is not True, name
    assert tasks["stage"]["retryPolicy"]["maxRetryCount"] == 3
    assert "exit-handler-1" in tasks and tasks["cleanup"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def _load_proto(version: str):
    path = COMPAT / f"kfp-kubernetes-{version}" / "kfp" / "kubernetes" / "kubernetes_executor_config_pb2.py"
    assert path.exists(), f"{path} is missing: run `make test` (it installs the compat protos)"
    return path


def _unparsable(compiled: Path, version: str) -> list[str]:
    """The executors of ``compiled`` that kfp-kubernetes ``version``'s platform proto rejects (strict parsing), in a
    process of its own (the proto registers the same file name as the installed kfp-kubernetes)."""
    script = f"""
import importlib.util, json, sys, yaml
from google.protobuf import json_format
spec = importlib.util.spec_from_file_location("k8s_pb2_{version.replace('.', '_')}", {str(_load_proto(version))!r})
pb2 = importlib.util.module_from_spec(spec); spec.loader.exec_module(pb2)
execs = list(yaml.safe_load_all(open({str(compiled)!r})))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
bad = []
for name, cfg in execs.items():
    try:
        json_format.ParseDict(cfg, pb2.KubernetesExecutorConfig(), ignore_unknown_fields=False)
    except json_format.ParseError as e:
        bad.append(name + ": " + str(e))
print(json.dumps(bad))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.parametrize("version,accepted", [("2.15.0", True), ("2.14.6", False)])
def test_executors_parse_with_the_oldest_supported_backend(tmp_path, version, accepted):
    """The KFP backend parses each executor's Kubernetes config strictly with its own platform proto when a run is
    created (protojson without DiscardUnknown), so a field newer than the backend fails the run at creation.
    ``secretAsEnv.optional`` first exists in kubernetes_platform/proto/kubernetes_executor_config.proto of
    kubeflow/pipelines 2.15.0 (``optional bool optional = 3;`` in ``SecretAsEnv``): backend 2.15 is the oldest we
    support. The same check with 2.14's proto must reject it, or this test could not fail."""
    bad = _unparsable(COMPILED, version)
    if accepted:
        assert bad == []
    else:
        assert bad and all("optional" in b for b in bad), bad


def test_pyproject_lower_bounds_match_the_supported_backend():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"kfp-kubernetes>=2\.15(\.\d+)?,<3"', text) and re.search(r'"kfp>=2\.15(\.\d+)?,<3"', text)
    docs = (ROOT / "docs" / "pipelines.md").read_text()
    assert "Kubeflow Pipelines backend 2.15" in docs


def test_pipeline_for_another_image(tmp_path):
    """A component's ``base_image`` is fixed at compile time (the run parameter ``image`` cannot change the step
    pods), so the pipeline is compiled for the user's image: every step runs it, the PyTorchJobs default to it,
    and every step pod pulls it with the given secrets."""
    img = "harbor.internal.example/ml/dcv2-k8s:1.2.3"
    spec, platform = _compile(tmp_path, "--image", img, "--image-pull-secret", "regcred")
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {img}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["image"]["defaultValue"] == img and params["image_pull_secrets"]["defaultValue"] == ["regcred"]
    assert all([s["secretName"] for s in v["imagePullSecret"]] == ["regcred"] for v in platform.values())
    assert _unparsable(tmp_path / "p.yaml", "2.15.0") == []  # the oldest supported backend accepts it too
    default = {e["container"]["image"] for e in next(yaml.safe_load_all(COMPILED.read_text()))["deploymentSpec"][
        "executors"].values()}
    assert default == {IMAGE}


# ----------------------------------------------------------------------------------------- the launcher
class FakeApi:
    """The CustomObjectsApi and CoreV1Api calls the launcher makes, over an in-memory job store. Log lines carry
    the fake clock's time, and ``since_seconds`` / ``tail_lines`` / ``timestamps`` behave as the kubelet's."""

    class ApiException(Exception):
        def __init__(self, status):
            super().__init__(f"HTTP {status}")
            self.status = status

    def __init__(self, clock):
        self.down = 0  # polls of the job that find the API server gone (a connection refused each)
        self.jobs, self.logs, self.script, self.clock = {}, {}, [], clock
        self.pod_uid, self.restarts, self.own_pod_conditions, self.log_calls = "uid-1", 0, [], []
        self.lead_gone, self.other_pods, self.pod_logs = False, [], {}  # pods beyond rank 0's, their logs

    COORDS = {"PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
              "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs")}

    @staticmethod
    def bounded(timeout) -> None:
        """Every call the launcher makes carries a finite timeout: a half-open connection cannot hang a step."""
        assert timeout is not None and 0 < timeout <= 60, timeout

    def create_namespaced_custom_object(self, group, version, ns, plural, body, _request_timeout=None):
        self.bounded(_request_timeout)
        assert (group, version, plural) == self.COORDS[body["kind"]]
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise self.ApiException(409)
        self.jobs[name] = {**body, "status": {"conditions": []}}

    def get_namespaced_custom_object(self, group, version, ns, plural, name, _request_timeout=None):
        self.bounded(_request_timeout)
        if self.down:
            import urllib3

            self.down -= 1
            raise urllib3.exceptions.MaxRetryError(None, "/apis", "Connection refused")
        if name not in self.jobs:
            raise self.ApiException(404)
        if self.script:  # advance the job one state per poll
            step = self.script.pop(0)
            if callable(step):
                step = step()
            cond, line = step
            self.jobs[name]["status"]["conditions"].append({"type": cond, "status": "True", "message": f"{cond}!"})
            if line:
                self.logs.setdefault(name, []).append((self.clock.now, line))
        return self.jobs[name]

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, _request_timeout=None):
        self.bounded(_request_timeout)
        if self.jobs.pop(name, None) is None:
            raise self.ApiException(404)

    def list_namespaced_pod(self, ns, label_selector, _request_timeout=None):
        self.bounded(_request_timeout)
        sel = dict(kv.split("=") for kv in label_selector.split(","))
        if "jobset.sigs.k8s.io/jobset-name" in sel:  # a TrainJob's JobSet: node 1 listed before node 0
            name = sel["jobset.sigs.k8s.io/jobset-name"]
            if name not in self.logs:
                return SimpleNamespace(items=[])
            node = [SimpleNamespace(name="node")]
            return SimpleNamespace(items=[SimpleNamespace(
                metadata=SimpleNamespace(name=f"{name}-node-0-{i}-x7k2q", uid="uid-1",
                                         annotations={"batch.kubernetes.io/job-completion-index": str(i)}),
                spec=SimpleNamespace(containers=node),
                status=SimpleNamespace(container_statuses=[SimpleNamespace(name="node", restart_count=0,
                                                                           state=SimpleNamespace(terminated=None))]))
                for i in (1, 0)])
        elif "training.kubeflow.org/replica-type" not in sel:  # all the job's pods
            return SimpleNamespace(items=list(self.other_pods))
        else:
            assert sel["training.kubeflow.org/replica-type"] == "worker"
            assert sel["training.kubeflow.org/replica-index"] == "0"
            name = sel["training.kubeflow.org/job-name"]
        if name not in self.logs or self.lead_gone:
            return SimpleNamespace(items=[])
        status = SimpleNamespace(container_statuses=[SimpleNamespace(name="pytorch", restart_count=self.restarts,
                                                                     state=SimpleNamespace(terminated=None))])
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name=f"{name}-worker-0",
                                                                               uid=self.pod_uid), status=status)])

    def read_namespaced_pod_log(self, pod, ns, container, tail_lines=None, since_seconds=None, timestamps=False,
                                _request_timeout=None):
        self.bounded(_request_timeout)
        assert container in ("pytorch", "node")
        self.log_calls.append({"tail_lines": tail_lines, "since_seconds": since_seconds})
        if pod in self.pod_logs:
            return "\n".join(self.pod_logs[pod][-tail_lines:] if tail_lines else self.pod_logs[pod])
        lines = self.logs[re.sub(r"-(worker-0|node-0-0-x7k2q)$", "", pod)]
        if since_seconds is not None:
            lines = [(t, l) for t, l in lines if t >= self.clock.now - since_seconds]
        if tail_lines:
            lines = lines[-tail_lines:]
        fmt = (lambda t, l: f"2026-12-03T00:{int(t) // 60:02d}:{t % 60:012.9f}Z {l}") if timestamps else (
            lambda t, l: l)
        return "\n".join(fmt(t, l) for t, l in lines)

    def read_namespaced_pod(self, name, ns, _request_timeout=None):
        self.bounded(_request_timeout)
        assert name == "step-pod"
        return SimpleNamespace(status=SimpleNamespace(conditions=[SimpleNamespace(type=t, status="True")
                                                                  for t in self.own_pod_conditions]))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def tick(self):
        self.now += 10
        return self.now


def _launcher(printed, clock=None, kind=PYTORCHJOB):
    clock = clock or Clock()
    api = FakeApi(clock)
    return api, JobLauncher(api, api, "ml", poll_seconds=0, log=printed.append, clock=clock.tick,
                            sleep=lambda s: None, own_pod="step-pod", kind=kind)


def _job(name="dcv2-pretrain-x", **kw):
    return pytorchjob(JobSpec(name, nodes=2, **kw))


def test_job_names_are_deterministic_dns_labels():
    a, b = job_name("run-123", "pretrain"), job_name("run-123", "pretrain")
    assert a == b != job_name("run-124", "pretrain") and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 63
    assert validate_pytorchjob(_job(a)) == []
    with pytest.raises(ValueError, match="at most 63 characters"):  # the pods' Service names are DNS labels
        JobSpec("x" * 60, nodes=2)


def test_launch_waits_streams_logs_and_reattaches():
    printed = []
    api, lx = _launcher(printed)
    api.script = [("Created", ""), ("Running", "epoch 0 step 5/15 loss 8.0"), ("Running", "epoch 0 step 10/15"),
                  ("Succeeded", "training finished")]
    name = lx.launch(_job())
    assert lx.wait(name, timeout_seconds=3600) == "Succeeded"
    pod = "[dcv2-pretrain-x-worker-0]"
    assert printed.count(f"{pod} epoch 0 step 5/15 loss 8.0") == 1 and f"{pod} training finished" in printed
    # a retried step creates the same name again: it attaches instead of starting a second job
    assert lx.launch(_job()) == name and len(api.jobs) == 1 and any("attaching" in p for p in printed)


def test_wait_rides_out_an_api_server_outage_and_gives_up_after_its_budget():
    """An API server that restarts (or is unreachable) while a step watches its job: the watcher polls again with
    backoff (1, 2, 4 ... 30 s), says so, creates nothing, and carries on when the server answers; past
    ``api_outage_seconds`` it gives up with one line saying a retry of the step re-attaches. A refusal (403) is not
    an outage: it fails at once. (The real API server's restart: tests/test_kube_e2e.py.)"""
    printed = []
    api, lx = _launcher(printed)
    api.script = [("Created", ""), ("Running", "step 1"), ("Succeeded", "done")]
    name = lx.launch(_job())
    api.down = 4  # four polls refused: 1 + 2 + 4 + 8 s of backoff
    assert lx.wait(name, timeout_seconds=3600) == "Succeeded"
    retries = [p for p in printed if "the API server did not answer" in p]
    assert len(retries) == 4 and "watching again in 1 s" in retries[0] and "in 8 s" in retries[3], retries
    assert any("answers again after" in p for p in printed) and len(api.jobs) == 1

    printed.clear()
    api, lx = _launcher(printed)
    lx.api_outage_seconds = 100
    api.script = [("Created", "")] * 1000
    name = lx.launch(_job())
    api.down = 10 ** 6
    with pytest.raises(L.JobFailed) as err:
        lx.wait(name, timeout_seconds=3600)
    assert "has not answered for" in str(err.value) and "re-attaches" in str(err.value), str(err.value)
    assert len(api.jobs) == 1

    api, lx = _launcher([])
    name = lx.launch(_job())
    api.get_namespaced_custom_object = lambda *a, **k: (_ for _ in ()).throw(api.ApiException(403))
    with pytest.raises(api.ApiException):
        lx.wait(name, timeout_seconds=3600)


def test_logs_are_read_incrementally_each_line_once():
    """The watcher must not fetch a week-long log every poll: the first read is a tail, later ones ask only for the
    seconds since the previous read (with overlap, de-duplicated by the kubelet's timestamps), and a new pod or a
    restarted container starts its log anew."""
    printed = []
    api, lx = _launcher(printed)
    name = lx.launch(_job())
    api.logs[name] = [(float(i), f"old line {i}") for i in range(500)]
    api.script = [("Running", "a"), ("Running", "b"), ("Running", "c")]
    for _ in range(3):
        lx.state(name)
        lx.stream_logs(name)
    assert api.log_calls[0] == {"tail_lines": L.FIRST_READ_TAIL, "since_seconds": None}
    assert all(c["since_seconds"] is not None and c["since_seconds"] < 60 and not c["tail_lines"]
               for c in api.log_calls[1:])
    body = [p.split("] ", 1)[1] for p in printed if p.startswith("[")]
    assert body.count("a") == body.count("b") == body.count("c") == 1 and len(body) == L.FIRST_READ_TAIL + 2
    api.restarts = 1  # the container restarted: its new log is read from its start
    api.logs[name] = [(api.clock.now, "after restart")]
    lx.stream_logs(name)
    assert api.log_calls[-1]["since_seconds"] is None and printed[-1].endswith("after restart")


def test_failure_raises_with_the_last_log_lines():
    printed = []
    api, lx = _launcher(printed)
    api.script = [("Running", "loading data"), ("Failed", "dcv2: error: the loss is nan at step 12")]
    name = lx.launch(_job())
    with pytest.raises(JobFailed) as e:
        lx.wait(name, 3600)
    assert "failed: Failed!" in str(e.value) and "the loss is nan at step 12" in str(e.value)


def test_failure_shows_the_log_of_the_pod_that_failed_first():
    """cleanPodPolicy Running (our manifests' setting): once a worker has failed the job, the operator deletes its
    Running and Pending pods and keeps the finished ones (training operator v1.9 pkg/controller.v1/common/job.go,
    DeletePodsAndServices: with CleanPodPolicyRunning it skips pods whose phase is neither Running nor Pending), so
    rank 0's pod is often gone. The error quotes the log of the pod that exited on its own first, not a pod ended
    by that clean-up's signal, a running one or an empty one; a failed pod with no finish time comes last."""
    printed = []
    api, lx = _launcher(printed)
    api.script = [("Running", "loading data"), ("Failed", "")]
    name = lx.launch(_job())

    def pod(i, code, finished):
        term = None if code is None else SimpleNamespace(exit_code=code, finished_at=finished)
        return SimpleNamespace(metadata=SimpleNamespace(name=f"{name}-worker-{i}"),
                               status=SimpleNamespace(container_statuses=[
                                   SimpleNamespace(name="pytorch", state=SimpleNamespace(terminated=term))]))

    api.other_pods = [pod(0, 143, "2026-12-03T00:00:02Z"), pod(3, None, None), pod(5, 1, None),
                      pod(2, 200, "2026-12-03T00:00:09Z"), pod(1, 2, "2026-12-03T00:00:05Z"),
                      pod(4, 0, "2026-12-03T00:00:01Z")]
    api.pod_logs = {f"{name}-worker-1": ["reading config", "dcv2: error: config.OPTIMIZER.num_epochs: not an int"],
                    f"{name}-worker-0": ["starting"], f"{name}-worker-2": ["peer gone"],
                    f"{name}-worker-3": ["still running"], f"{name}-worker-4": [],
                    f"{name}-worker-5": ["no finish time"]}
    # rank 0's pod, deleted by the clean-up (143) before it read its config, does not hide the pod that says why
    with pytest.raises(JobFailed) as e:
        lx.wait(name, 3600)
    text = str(e.value)
    assert f"the log of {name}-worker-1 (exit 2), the first pod that failed" in text, text
    others = {"peer gone", "still running", "starting", "no finish time"}
    assert "num_epochs: not an int" in text and not others & set(text.split("\n"))
    api.lead_gone = True  # gone for good
    with pytest.raises(JobFailed) as e:
        lx.wait(name, 3600)
    assert "num_epochs: not an int" in str(e.value)
    for i in (0, 1, 2, 5):  # the failed pods wrote nothing either: the condition alone
        api.pod_logs[f"{name}-worker-{i}"] = []
    api.jobs[name]["status"]["conditions"] = [{"type": "Failed", "status": "True", "message": "replica failed"}]
    with pytest.raises(JobFailed) as e:
        lx.wait(name, 3600)
    assert str(e.value).endswith("failed: replica failed"), str(e.value)


def test_wall_clock_limit_and_deleted_job():
    printed = []
    api, lx = _launcher(printed)
    api.script = [("Running", "step")] * 50
    name = lx.launch(_job())
    with pytest.raises(JobFailed, match="did not finish within 100 s"):
        lx.wait(name, 100)
    assert lx.delete(name) and not lx.delete(name)  # deleted, then 404 is not an error
    with pytest.raises(JobFailed, match="was deleted"):
        lx.wait(name, 100)


@pytest.mark.parametrize("evicted", [False, True])
def test_sigterm_deletes_the_job_unless_the_step_pod_is_evicted(evicted):
    """A terminated KFP run may never run its exit handler (Argo runs exit hooks after the workflow's
    activeDeadlineSeconds is set to 0), so the watcher deletes its job when it gets SIGTERM. An evicted watcher
    pod gets SIGTERM too, but its pod carries the ``DisruptionTarget`` condition (set by the eviction API, the
    scheduler's preemption, the taint manager and the kubelet's node shutdown): then the job is kept and the
    step's retry re-attaches to it. A real signal is delivered to this process while it waits."""
    printed = []
    api, lx = _launcher(printed)
    if evicted:
        api.own_pod_conditions = ["DisruptionTarget"]

    def signal_self():
        os.kill(os.getpid(), signal.SIGTERM)
        return ("Running", "still training")

    api.script = [("Running", "x"), signal_self] + [("Running", "y")] * 50
    name = lx.launch(_job())
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StepTerminated) as e:
        lx.wait(name, 10_000)
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) == previous
    assert (name in api.jobs) == evicted
    assert any(("re-attaches" if evicted else "deleting PyTorchJob") in p for p in printed)


def test_namespace_defaults_to_the_step_pods_own(tmp_path, monkeypatch):
    """Multi-user Kubeflow runs the steps as ``default-editor`` in the user's profile namespace, which may create
    jobs there and nowhere else (a fixed ``kubeflow`` namespace gets 403). The pod's namespace is in its service
    account's namespace file."""
    f = tmp_path / "namespace"
    f.write_text("team-vision\n")
    assert L.current_namespace(str(f)) == "team-vision"
    monkeypatch.setattr(L, "SA_NAMESPACE_FILE", str(f))
    api = FakeApi(Clock())
    assert JobLauncher(api, api, "").namespace == "team-vision"
    assert JobLauncher(api, api, "other").namespace == "other"


def test_pretrain_step_job_carries_the_step_timeout_as_its_deadline(monkeypatch):
    """``runPolicy.activeDeadlineSeconds``: the operator fails the job when it has been active that long
    (pkg/core/job.go ``PastActiveDeadline``), so a job whose watcher is gone cannot hold GPUs past the step's
    timeout."""
    printed = []
    api, lx = _launcher(printed)
    monkeypatch.setattr(pipeline_steps, "_launcher", lambda ns, launcher="pytorchjob": lx)
    api.script = [("Succeeded", "done")]
    data = {"train": {"uri": "s3://d/train"}, "val": {"uri": "s3://d/val"}}
    ckpt = pipeline_steps.pretrain_step("pytorchjob", "run-1", "pretrain/x", [], "s3://out", data, 2, 8, "img:1",
                                        "", 3600.0, ["regcred"])
    job = api.jobs[job_name("run-1", "pretrain")]
    assert ckpt == "s3://out/pretrain" and job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 3600
    tpl = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert tpl["imagePullSecrets"] == [{"name": "regcred"}] and tpl["containers"][0]["image"] == "img:1"


def test_steps_size_their_jobs_pods(monkeypatch):
    """``cpu_per_gpu`` / ``memory_gib_per_gpu`` / ``scratch_gib`` reach the JobSpec of pretraining and of linear
    eval; left out, the jobs keep the default sizing (10 cores, 48 GiB per GPU, 200 GiB of node-local disk)."""
    specs = []
    monkeypatch.setattr(pipeline_steps, "_run_job", lambda launcher, ns, spec, timeout: specs.append(spec))
    monkeypatch.setattr("dcv2_k8s.storage.read_bytes", lambda uri: b'{"top1": 1.0}')
    data = {"train": {"uri": "s3://d/train"}, "val": {"uri": "s3://d/val"}}
    sizing = {"cpu_per_gpu": 0.5, "memory_gib_per_gpu": 1.5, "scratch_gib": 3}
    pipeline_steps.pretrain_step("pytorchjob", "run-1", "pretrain/x", [], "s3://out", data, 1, 2, "img:1", "", 60.0,
                                 **sizing)
    assert pipeline_steps.linear_eval_step("pytorchjob", "run-1", "s3://w", "eval/x", [], "s3://out", data, 2,
                                           "img:1", "", 60.0, "trained", **sizing) == {"top1": 1.0}
    pipeline_steps.pretrain_step("pytorchjob", "run-1", "pretrain/x", [], "s3://out", data, 1, 2, "img:1", "", 60.0)
    pipeline_steps.linear_eval_step("pytorchjob", "run-1", "", "eval/x", [], "s3://out", data, 2, "img:1", "", 60.0,
                                    "baseline")
    assert [(s.cpu_per_gpu, s.memory_gib_per_gpu, s.scratch_gib) for s in specs] == \
        [(0.5, 1.5, 3)] * 2 + [(10, 48, 200)] * 2
    res = pytorchjob(specs[1])["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert res["resources"]["requests"]["cpu"] == "1" and res["resources"]["limits"]["memory"] == "4Gi"
    assert res["resources"]["requests"]["ephemeral-storage"] == "3Gi"


@pytest.mark.parametrize("state,deleted", [
    # kubeflow/pipelines backend/src/v2/driver/resolve.go: State = producer.GetExecution().GetLastKnownState()
    # .String(), an MLMD execution state (kubeflow/pipelines#11826: "COMPLETE", not "SUCCEEDED")
    ("COMPLETE", False), ("CACHED", False), ("FAILED", True), ("CANCELED", True), ("RUNNING", False),
    ("UNKNOWN", False), ("NEW", False),
    # kfp.local (kfp/local/orchestrator): SUCCEEDED or FAILED
    ("SUCCEEDED", False), ("failed", True),
    # a word no system uses today: keep the job and its logs
    ("DONE", False), ("", False)])
def test_exit_handler_cleans_up_only_failed_or_cancelled_runs(monkeypatch, state, deleted):
    printed = []
    api, lx = _launcher(printed)
    monkeypatch.setattr(pipeline_steps, "_launcher", lambda ns, launcher="pytorchjob": lx)
    for step in ("pretrain", "eval-trained"):
        api.jobs[job_name("run-9", step)] = {"status": {}}
    out = pipeline_steps.cleanup_step("pytorchjob", "run-9", "ml", state)
    assert bool(out) == deleted and (not api.jobs) == deleted
    assert pipeline_steps.cleanup_step("local", "run-9", "ml", "FAILED") == []


def test_trainjob_launcher_creates_waits_on_complete_streams_node_0_and_cleans_up(monkeypatch):
    """launcher=trainjob: the TrainJob of the same JobSpec on our runtime, attached to by name on a retry, done when
    its condition is ``Complete`` (Trainer v2.3 pkg/apis/trainer/v1alpha1/trainjob_types.go: Complete, Failed), with
    the log of the JobSet's node 0 (label batch.kubernetes.io/job-completion-index=0), deleted by the exit handler
    on failure."""
    printed = []
    api, lx = _launcher(printed, kind=TRAINJOB)
    monkeypatch.setattr(pipeline_steps, "_launcher", lambda ns, launcher: lx)
    api.script = [("Created", ""), ("Running", "epoch 0 step 5/15 loss 8.0"), ("Complete", "training finished")]
    data = {"train": {"uri": "s3://d/train"}, "val": {"uri": "s3://d/val"}}
    ckpt = pipeline_steps.pretrain_step("trainjob", "run-7", "pretrain/x", [], "s3://out", data, 2, 8, "img:2",
                                        "", 7200.0)
    name = job_name("run-7", "pretrain")
    job = api.jobs[name]
    assert ckpt == "s3://out/pretrain" and job["kind"] == "TrainJob" and job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["trainer"]["image"] == "img:2"
    assert f"[{name}-node-0-0-x7k2q] epoch 0 step 5/15 loss 8.0" in printed
    assert lx.launch(job) == name and any("attaching" in p for p in printed)
    assert pipeline_steps.cleanup_step("trainjob", "run-7", "ml", "COMPLETE") == []
    assert pipeline_steps.cleanup_step("trainjob", "run-7", "ml", "FAILED") == [name] and not api.jobs
    api.jobs[name] = {"kind": "TrainJob", "status": {"conditions": [{"type": "Failed", "status": "True",
                                                                     "message": "pod node-0 exited 2"}]}}
    with pytest.raises(JobFailed, match="TrainJob ml/.* failed: pod node-0 exited 2"):
        lx.wait(name, 100)


def test_unknown_launcher_is_refused_at_the_first_step():
    with pytest.raises(pipeline_steps.StepFailed, match="use pytorchjob .* trainjob .* or local"):
        pipeline_steps.stage_step("pytorchJob", "s3://d/train", "s3://d/val", "/tmp/x")
