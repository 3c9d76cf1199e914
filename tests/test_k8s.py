"""Manifests and image, validated offline against the real API types, and the PyTorchJob contract run locally."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest
import yaml

from dcv2_k8s.config import resolve
from dcv2_k8s.k8s import manifests as M
from dcv2_k8s.k8s.kinds import KINDS, PYTORCHJOB, TRAINJOB
from dcv2_k8s.k8s.local import replica_envs
from dcv2_k8s.k8s.validate import validate_builtin, validate_pytorchjob
from tests.conftest import ROOT, run_cli, run_local_args

MAN = ROOT / "manifests"


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(MAN.rglob("*.yaml")):
        out += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def _jobs() -> list[tuple[Path, dict]]:
    return [(f, d) for f, d in _docs() if d["kind"] == "PyTorchJob"]


def test_rendered_manifests_are_current():
    for rel, text in M.render().items():
        assert (MAN / rel).read_text() == text, f"manifests/{rel} is stale: run `dcv2 k8s render manifests`"


def test_every_pytorchjob_is_valid_against_the_sdk_types():
    jobs = _jobs()
    assert len(jobs) == 8 and (MAN / "pytorchjob-r50.yaml") in [f for f, _ in jobs]
    for f, d in jobs:
        assert validate_pytorchjob(d) == [], f


def test_validator_rejects_unknown_fields_and_wrong_types():
    job = yaml.safe_load((MAN / "pytorchjob-r50.yaml").read_text())
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    bad["spec"]["runPolicy"]["backoffLimit"] = "6"
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][0]["emptyDir"]["medium"] = 3
    errs = validate_pytorchjob(bad)
    assert any("imagePullPolicyy: unknown field of V1Container" in e for e in errs)
    assert any("backoffLimit: expected int" in e for e in errs)
    assert any("medium: expected str" in e for e in errs)
    renamed = copy.deepcopy(job)
    renamed["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert any("named 'pytorch'" in e for e in validate_pytorchjob(renamed))
    copied = copy.deepcopy(job)  # a copy under another name that keeps the old rendezvous endpoint
    copied["metadata"]["name"] = "my-dcv2"
    errs = validate_pytorchjob(copied)
    assert any("PET_RDZV_ENDPOINT 'dcv2-r50-worker-0:23456' names 'dcv2-r50-worker-0'" in e and "'my-dcv2-worker-0'"
               in e for e in errs), errs


def test_builtin_kinds_validate_strictly():
    builtins = [(f, d) for f, d in _docs() if d["kind"] not in ("PyTorchJob", "Kustomization", "PodMonitor",
                                                                 "PrometheusRule", "TrainJob", "TrainingRuntime")]
    assert {d["kind"] for _, d in builtins} == {"Secret", "ServiceAccount", "Role", "RoleBinding"}
    for f, d in builtins:
        assert validate_builtin(d) == [], f
    bad = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringDataa": {}}
    assert validate_builtin(bad)


def test_cross_checks_gpus_command_secrets_labels():
    secrets = {d["metadata"]["name"] for _, d in _docs() if d["kind"] == "Secret"}
    pm = yaml.safe_load((MAN / "monitoring" / "podmonitor.yaml").read_text())
    selector = pm["spec"]["selector"]["matchLabels"]
    for f, job in _jobs():
        nproc = int(job["spec"]["nprocPerNode"])
        nodes = sum(int(r["replicas"]) for r in job["spec"]["pytorchReplicaSpecs"].values())
        for rtype, rs in job["spec"]["pytorchReplicaSpecs"].items():
            pod = rs["template"]
            c = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == nproc, f
            assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in c["ports"]
            assert any(p["name"] == pm["spec"]["podMetricsEndpoints"][0]["port"] for p in c["ports"])
            # the operator adds operator-name; the rest of the PodMonitor selector must be on the pod
            for k, v in selector.items():
                assert k == "training.kubeflow.org/operator-name" or pod["metadata"]["labels"].get(k) == v
            for cont in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
                for ref in cont.get("envFrom", []):
                    assert ref["secretRef"]["name"] in secrets, (f, ref)
            assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["spec"]["volumes"])
            # dcv2 is the container's main process (the one the kubelet signals); torchrun, which it starts, reads
            # nnodes, nproc-per-node and the rendezvous from PET_* (nothing of that on the command line)
            assert c["command"] == ["dcv2"] and not any(a.startswith("--") for a in c["args"])
            tokens = c["args"]
            assert tokens[0] in ("train", "linear-eval")
            r = resolve(tokens[1:], world_size=nodes * nproc, local_world_size=nproc,
                        for_training=tokens[0] == "train")
            assert r.cfg.DISTRIBUTED.NUM_PROC_PER_NODE == nproc and r.cfg.METRICS.ENABLED
            assert str(r.cfg.CHECKPOINT.DIR).startswith("s3://")
            if tokens[0] == "linear-eval":
                assert str(r.cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE).startswith("s3://")
                staged = {ic["args"][2] for ic in pod["spec"]["initContainers"]}
                assert {r.cfg.DATA.TRAIN.DATA_PATHS[0], r.cfg.DATA.TEST.DATA_PATHS[0]} <= staged


def _pod_specs():
    for f, job in _jobs():
        for rs in job["spec"]["pytorchReplicaSpecs"].values():
            yield f, rs["template"]["spec"]


def test_pod_security_restricted_profile():
    """Pod Security 'restricted', minus nothing: GPUs need no privilege with the NVIDIA device plugin."""
    for f, spec in _pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        writable = {v["name"] for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], f
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True and not sc.get("privileged")
            assert {m["name"] for m in c["volumeMounts"]} <= writable
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # explicit writable mounts


def test_rbac_is_namespaced_and_least_privilege():
    docs = [d for f, d in _docs() if f.name == "rbac-launcher.yaml"]
    assert not any(d["kind"].startswith("Cluster") for d in docs)
    role = next(d for d in docs if d["kind"] == "Role")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    for plural in ("pytorchjobs", "trainjobs"):  # launcher=pytorchjob and launcher=trainjob
        jobs_rule = next(r for r in role["rules"] if plural in r["resources"])
        assert set(jobs_rule["verbs"]) == {"create", "get", "list", "watch", "delete", "patch"}
    pods_rule = next(r for r in role["rules"] if "pods" in r["resources"])
    assert set(pods_rule["resources"]) == {"pods", "pods/log", "events"} and set(pods_rule["verbs"]) == {
        "get", "list", "watch"}
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert {s["name"] for s in binding["subjects"]} >= {"pipeline-runner", "default-editor"}
    kust = yaml.safe_load((MAN / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {"rbac-launcher.yaml", "pytorchjob-r50.yaml"}


def test_dockerfile_statically():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M) and text.count("FROM ${BASE_IMAGE}") == 2
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    entry = re.search(r'^ENTRYPOINT \["(\w+)"\]', text, re.M).group(1)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry in scripts and scripts[entry] == "dcv2_k8s.cli:main"
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    assert user.split(":")[0] not in ("0", "root") and int(user.split(":")[0]) >= 1000
    assert "org.opencontainers.image.version" in text and (ROOT / ".dockerignore").exists()
    # the lock: every package pinned with a hash, installed with --require-hashes --no-deps, nothing the base image
    # provides (torch, torchvision, numpy) replaced, and every runtime dependency of the package covered
    assert "--require-hashes --no-deps -r /tmp/requirements.lock" in text and "pip check" in text
    lock = (ROOT / "docker" / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", lock, re.M))
    blocks = re.split(r"^(?=[A-Za-z0-9_.\-]+==)", lock, flags=re.M)[1:]
    assert pins and len(blocks) == len(pins) and all("--hash=sha256:" in b for b in blocks)
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    locked = {norm(n) for n in pins}
    assert not locked & {"numpy", "torch", "torchvision"}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = norm(re.match(r"[A-Za-z0-9_.\-]+", dep).group(0))
        assert name in locked or name in ("torch", "torchvision", "numpy"), f"{name} is not in the image's lock"
    for line in (ROOT / "docker" / "requirements.in").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)$", line)
        if m:
            assert pins.get(m.group(1)) == m.group(2), f"requirements.lock is stale for {line}: re-run uv pip compile"
    assert "useradd" not in text and "sh /tmp/add-user.sh" in text


@pytest.mark.parametrize("base_has_uid_1000", [False, True])
def test_image_user_script_on_bases_with_and_without_uid_1000(tmp_path, base_has_uid_1000):
    """``useradd --uid 1000`` fails on Ubuntu 24.04 based images, which ship user ``ubuntu`` with uid 1000 (and
    this machine has one too). docker/add-user.sh runs here for real, with shadow-utils' ``--prefix`` on a copy
    of an image's /etc: it creates dcv2:1000 when the id is free, keeps the base's user when not, and the
    directories the pods write to belong to 1000 either way; running it twice changes nothing."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and shadow-utils (the CI machine has both)")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n" +
                                ("ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n" if base_has_uid_1000 else ""))
    (etc / "group").write_text("root:x:0:\n" + ("ubuntu:x:1000:\n" if base_has_uid_1000 else ""))
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n" + ("ubuntu:!:19000:0:99999:7:::\n"
                                                                  if base_has_uid_1000 else ""))
    (etc / "gshadow").write_text("root:*::\n" + ("ubuntu:!::\n" if base_has_uid_1000 else ""))
    if Path("/etc/login.defs").exists():
        shutil.copy("/etc/login.defs", etc / "login.defs")
    for _ in range(2):
        p = subprocess.run(["sh", str(ROOT / "docker" / "add-user.sh"), str(tmp_path)], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
    users = [l.split(":") for l in (etc / "passwd").read_text().splitlines()]
    assert [u[0] for u in users if u[2] == "1000"] == (["ubuntu"] if base_has_uid_1000 else ["dcv2"])
    for d in ("home/dcv2", "data", "checkpoints"):
        st = (tmp_path / d).stat()
        assert (st.st_uid, st.st_gid) == (1000, 1000), d


def test_the_kinds_tables_are_what_the_manifests_render():
    """One table per kind of job: the rendered jobs carry its API version, kind and trainer container, the RBAC
    manifest grants exactly its resources, and the pipeline's launcher= values are its keys."""
    spec = M.JOBS[0]
    pj, tj, rt = M.pytorchjob(spec), M.trainjob(spec), M.training_runtime()
    assert (pj["apiVersion"], pj["kind"]) == (PYTORCHJOB.api_version, PYTORCHJOB.kind) == ("kubeflow.org/v1",
                                                                                          "PyTorchJob")
    assert (tj["apiVersion"], tj["kind"]) == (TRAINJOB.api_version, TRAINJOB.kind) == (
        "trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert [M.job_manifest(k, spec) for k in (PYTORCHJOB, TRAINJOB)] == [pj, tj]
    assert pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] == "pytorch"
    pod = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["spec"]["containers"][0]["name"] == TRAINJOB.container == "node"
    assert set(KINDS) == {"pytorchjob", "trainjob"}
    role = next(d for d in M.rbac() if d["kind"] == "Role")
    assert {(r["apiGroups"][0], r["resources"][0]) for r in role["rules"][:-1]} == {
        (k.group, p) for k in KINDS.values() for p in (k.plural, f"{k.plural}/status")}
    assert PYTORCHJOB.pod(spec.name, 1) == "dcv2-r50-worker-1" and PYTORCHJOB.pod("j", 0, "Master") == "j-master-0"
    assert PYTORCHJOB.lead_selector("j") == ("training.kubeflow.org/job-name=j,training.kubeflow.org/replica-type="
                                              "worker,training.kubeflow.org/replica-index=0")
    assert TRAINJOB.lead_selector("j") == TRAINJOB.job_selector("j") == "jobset.sigs.k8s.io/jobset-name=j"


def test_no_master_so_the_operator_injects_no_init_container():
    """training-operator v1.9 pkg/controller.v1/pytorch/initcontainer.go: "There is no need to set init container
    if no master is specified"; with a Master, every Worker gets ``init-pytorch`` (image ``alpine:3.10``, no
    securityContext), which Pod Security "restricted" rejects and an air-gapped cluster cannot pull. Our jobs have
    Worker replicas only, each with the rendezvous torchrun needs (the operator injects no MASTER_ADDR without a
    Master: pkg/controller.v1/pytorch/envvar.go), hosted on worker 0's Service."""
    for f, job in _jobs():
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert set(specs) == {"Worker"}, f
        c = next(c for c in specs["Worker"]["template"]["spec"]["containers"] if c["name"] == "pytorch")
        env = {e["name"]: e["value"] for e in c["env"]}
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "pytorchjob-port")
        assert env["PET_RDZV_BACKEND"] == "c10d" and env["PET_RDZV_ID"] == job["metadata"]["name"]
        assert env["PET_RDZV_ENDPOINT"] == f"{job['metadata']['name']}-worker-0:{port}", f
        assert not {"MASTER_ADDR", "RANK", "WORLD_SIZE"} & set(env)


def test_restart_policy_and_backoff_follow_the_operator_rules():
    """pkg/util/train/train_util.go: ``IsRetryableExitCode(exitCode) = exitCode >= 128``; with
    ``restartPolicy: ExitCode`` the operator recreates a pod that failed with such a code and fails the job on any
    other (pkg/controller.v1/common/pod.go). pkg/core/job.go ``PastBackoffLimit`` sums the container restart counts
    of all running pods, and one incident restarts every pod: backoffLimit = incidents x pods."""
    for f, job in _jobs():
        nodes = job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
        assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "ExitCode", f
        assert job["spec"]["runPolicy"]["backoffLimit"] == M.RESTART_INCIDENTS * nodes, f


# allocatable CPU / memory (GiB) of common 8-GPU nodes, less ~4 CPUs and ~24 GiB for the system, the GPU operator
# and monitoring daemons: GCP a2-highgpu-8g (96 vCPU, 680 GB), Azure ND96asr_v4 (96 vCPU, 900 GiB), AWS
# p4d.24xlarge (96 vCPU, 1,152 GiB), GCP a3-highgpu-8g (208 vCPU, 1,872 GB), AWS p5.48xlarge (192 vCPU, 2 TiB),
# DGX H100 (224 threads, 2 TiB)
NODES_8GPU = {"a2-highgpu-8g": (92, 609), "ND96asr_v4": (92, 876), "p4d.24xlarge": (92, 1128),
              "a3-highgpu-8g": (204, 1720), "p5.48xlarge": (188, 2024), "DGX H100": (220, 2024)}


def _gib(q: str) -> float:
    return float(q[:-2]) if q.endswith("Gi") else float(q) / 2 ** 30


def test_requests_fit_common_8_gpu_nodes_and_disk_is_requested():
    """A request larger than a node's allocatable keeps the pod Pending for ever. The staged dataset lives in an
    ``emptyDir`` on the node's disk: without an ``ephemeral-storage`` request the scheduler may place the pod on a
    node without the room, and the kubelet evicts a pod whose disk use passes its containers' limits."""
    for f, job in _jobs():
        gpus = int(job["spec"]["nprocPerNode"])
        spec = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        c = next(c for c in spec["containers"] if c["name"] == "pytorch")
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        if gpus == 8:
            for node, (cpu, mem) in NODES_8GPU.items():
                assert float(req["cpu"]) <= cpu and _gib(req["memory"]) <= mem, (f, node)
        disk = sum(_gib(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"] if v["emptyDir"].get("medium") != "Memory")
        assert _gib(req["ephemeral-storage"]) >= 155 and _gib(lim["ephemeral-storage"]) >= disk, f
        shm = sum(_gib(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"] if v["emptyDir"].get("medium") == "Memory")
        assert _gib(lim["memory"]) >= _gib(req["memory"]) + shm / 2, f  # the tmpfs counts against the memory limit


def _sized_pod(kind: str, gpus: int, **sizing) -> tuple[dict, dict]:
    """(trainer container resources, pod spec) of a job with ``gpus`` GPUs per node and ``sizing``."""
    spec = M.JobSpec("sized", nodes=1, gpus_per_node=gpus, **sizing)
    if kind == "trainjob":
        return M.trainjob(spec)["spec"]["trainer"]["resourcesPerNode"], {}
    pod = M.pytorchjob(spec)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return pod["containers"][0]["resources"], pod


@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("gpus,cpu_req,cpu_lim,mem_req,mem_lim,shm", [
    (1, "500m", "600m", "1536Mi", "2Gi", "1Gi"), (2, "1", "1200m", "3Gi", "4Gi", "2Gi")])
def test_pods_sized_per_gpu_for_small_nodes(kind, gpus, cpu_req, cpu_lim, mem_req, mem_lim, shm):
    """A node with fewer cores or less memory per GPU than the defaults (10 cores, 48 GiB) keeps the pods Pending
    for ever: ``cpu_per_gpu`` and ``memory_gib_per_gpu`` size them, limits at the default ratios (1.2 and 64/48) in
    Kubernetes quantities; /dev/shm (it counts against the memory limit) at most half the limit; the staging init
    container (its request counts on its own when the pod is scheduled) asks no more than the trainer."""
    res, pod = _sized_pod(kind, gpus, cpu_per_gpu=0.5, memory_gib_per_gpu=1.5)
    assert res["requests"] == {"cpu": cpu_req, "memory": mem_req, "ephemeral-storage": "200Gi",
                               "nvidia.com/gpu": str(gpus)}
    assert res["limits"] == {"cpu": cpu_lim, "memory": mem_lim, "ephemeral-storage": "430Gi",
                             "nvidia.com/gpu": str(gpus)}
    if pod:
        dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert dshm == {"medium": "Memory", "sizeLimit": shm}
        assert all(c["resources"]["requests"] == {"cpu": cpu_req, "memory": mem_req} for c in pod["initContainers"])
        job = M.pytorchjob(M.JobSpec("sized", nodes=1, gpus_per_node=gpus, cpu_per_gpu=0.5, memory_gib_per_gpu=1.5))
        assert validate_pytorchjob(job) == []


def test_default_pod_sizing_is_unchanged():
    for kind in ("pytorchjob", "trainjob"):
        for gpus in (1, 8):
            res, pod = _sized_pod(kind, gpus)
            assert res["requests"]["cpu"] == str(10 * gpus) and res["requests"]["memory"] == f"{48 * gpus}Gi"
            assert res["limits"]["cpu"] == str(12 * gpus) and res["limits"]["memory"] == f"{64 * gpus}Gi"
            if pod:
                assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == \
                    f"{8 * gpus}Gi"
                assert pod["initContainers"][0]["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"},
                                                                 "limits": {"cpu": "16", "memory": "16Gi"}}
    assert M.render(10, 48) == M.render()


@pytest.mark.parametrize("field,value", [("cpu_per_gpu", 0), ("cpu_per_gpu", -1.0), ("cpu_per_gpu", float("nan")),
                                         ("memory_gib_per_gpu", 0), ("memory_gib_per_gpu", float("inf")),
                                         ("memory_gib_per_gpu", "48")])
def test_bad_pod_sizing_is_refused(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number of \w+ per GPU greater than 0, got "):
        M.JobSpec("sized", **{field: value})


def test_render_cli_sizes_pods(tmp_path):
    p = run_cli("k8s", "render", str(tmp_path), "--cpu-per-gpu", "0.5", "--memory-gib-per-gpu", "1.5", timeout=120)
    assert p.returncode == 0, p.stderr
    job = yaml.safe_load((tmp_path / "variants" / "dcv2-r50-1gpu.yaml").read_text())
    res = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]
    assert (res["requests"]["cpu"], res["requests"]["memory"]) == ("500m", "1536Mi")
    bad = run_cli("k8s", "render", str(tmp_path / "bad"), "--memory-gib-per-gpu", "-2", timeout=120)
    assert bad.returncode == 2 and "memory_gib_per_gpu must be a finite number" in bad.stderr, bad.stderr


def test_run_local_env_contract():
    """The environment the operator gives a Worker-only job's pods (pkg/controller.v1/pytorch/envvar.go):
    PYTHONUNBUFFERED, PET_NPROC_PER_NODE, PET_NNODES; MASTER_ADDR/RANK/WORLD_SIZE only when there is a Master.
    Service names resolve to this machine."""
    job = yaml.safe_load((MAN / "variants" / "dcv2-r50-32gpu.yaml").read_text())
    envs = replica_envs(job)
    assert [n for n, _, _ in envs] == ["worker-0", "worker-1", "worker-2", "worker-3"]
    endpoints = {env["PET_RDZV_ENDPOINT"] for _, _, env in envs}
    assert len(endpoints) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", endpoints.pop())
    for _, _, env in envs:
        assert env["PET_NNODES"] == "4" and env["PET_NPROC_PER_NODE"] == "8" and env["PYTHONUNBUFFERED"] == "1"
        assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "PET_NODE_RANK"} & set(env)
    with_master = copy.deepcopy(job)
    specs = with_master["spec"]["pytorchReplicaSpecs"]
    specs["Master"] = copy.deepcopy(specs["Worker"])
    specs["Master"]["replicas"] = 1
    specs["Worker"]["replicas"] = 3
    envs = replica_envs(with_master)
    assert [n for n, _, _ in envs] == ["master-0", "worker-0", "worker-1", "worker-2"]
    for rank, (_, _, env) in enumerate(envs):
        assert env["RANK"] == env["PET_NODE_RANK"] == str(rank)  # the pod-level RANK is the node rank
        assert env["WORLD_SIZE"] == "32" and env["PET_NNODES"] == "4" and env["MASTER_PORT"] == env["PET_MASTER_PORT"]


@pytest.mark.slow
def test_run_local_pytorchjob_r50_two_replicas_on_cpu(synth_data, tmp_path):
    p = run_cli(*run_local_args(MAN / "pytorchjob-r50.yaml", synth_data, tmp_path / "ckpt",
                                "config.OPTIMIZER.num_epochs=1", "config.TRAINER.MAX_STEPS=4"), timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "[worker-0]" in out and "[worker-1]" in out
    assert "2 processes x batch 16" in out  # WORLD_SIZE from torchrun's c10d rendezvous across the two "pods"
    assert "stopped after 4 steps" in out and "[run-local] job succeeded" in out
