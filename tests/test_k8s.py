"""Manifests and image, validated offline against the real API types, and the PyTorchJob contract run locally."""

from __future__ import annotations

import copy
import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest
import yaml

from dcv2_k8s.config import resolve
from dcv2_k8s.k8s import manifests as M
from dcv2_k8s.k8s.local import replica_envs
from dcv2_k8s.k8s.validate import validate_builtin, validate_pytorchjob
from tests.conftest import ROOT, run_cli, tiny_train_tokens

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
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    bad["spec"]["runPolicy"]["backoffLimit"] = "6"
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][0]["emptyDir"]["medium"] = 3
    errs = validate_pytorchjob(bad)
    assert any("imagePullPolicyy: unknown field of V1Container" in e for e in errs)
    assert any("backoffLimit: expected int" in e for e in errs)
    assert any("medium: expected str" in e for e in errs)
    renamed = copy.deepcopy(job)
    renamed["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert any("named 'pytorch'" in e for e in validate_pytorchjob(renamed))


def test_builtin_kinds_validate_strictly():
    builtins = [(f, d) for f, d in _docs() if d["kind"] not in ("PyTorchJob", "Kustomization", "PodMonitor",
                                                                 "PrometheusRule")]
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
            # the command is torchrun relying on PET_* (no --nnodes/--node-rank given), then a real dcv2 call
            assert c["command"] == ["torchrun"] and not any(a.startswith(("--nnodes", "--node", "--master"))
                                                            for a in c["args"])
            tokens = c["args"][c["args"].index("dcv2") + 1:]
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
    jobs_rule = next(r for r in role["rules"] if "pytorchjobs" in r["resources"])
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
    pinned = [l for l in (ROOT / "docker" / "requirements.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert pinned and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][\w.]*", l) for l in pinned)


def test_run_local_env_contract():
    job = yaml.safe_load((MAN / "variants" / "dcv2-r50-32gpu.yaml").read_text())
    envs = replica_envs(job)
    assert [n for n, _, _ in envs] == ["master-0", "worker-0", "worker-1", "worker-2"]
    for rank, (_, _, env) in enumerate(envs):
        assert env["RANK"] == env["PET_NODE_RANK"] == str(rank)  # the pod-level RANK is the node rank
        assert env["WORLD_SIZE"] == "32" and env["PET_NNODES"] == "4" and env["PET_NPROC_PER_NODE"] == "8"
        assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] and env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.slow
def test_run_local_pytorchjob_r50_two_replicas_on_cpu(synth_data, tmp_path):
    sets = [t for t in tiny_train_tokens(synth_data, tmp_path / "ckpt", "config.OPTIMIZER.num_epochs=1",
                                         "config.TRAINER.MAX_STEPS=4", "config.METRICS.ENABLED=false",
                                         "config.MACHINE.DEVICE=cpu", "config.MODEL.TRUNK.RESNETS.DEPTH=18")[1:]]
    args = ["k8s", "run-local", str(MAN / "pytorchjob-r50.yaml"), "--nproc-per-node", "1", "--timeout", "500"]
    for s in sets:
        args += ["--set", s]
    p = run_cli(*args, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "[master-0]" in out and "[worker-0]" in out
    assert "2 processes x batch 16" in out  # WORLD_SIZE from torchrun across the two "pods"
    assert "stopped after 4 steps" in out and "[run-local] master exited with 0" in out
