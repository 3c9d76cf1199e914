"""Kubeflow Trainer v2 (TrainJob, trainer.kubeflow.org/v1alpha1, release v2.3.0): the TrainJob manifests and our
TrainingRuntime validated strictly against the CRDs of Trainer's own Go module (github.com/kubeflow/trainer/v2
@v2.3.0, fetched by `make` into .venv/compat), their agreement with the PyTorchJobs rendered from the same JobSpecs,
and the torch plugin's environment contract run locally."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dcv2_k8s.k8s import manifests as M
from dcv2_k8s.k8s.crdschema import validate_resource
from dcv2_k8s.k8s.local import trainjob_replicas
from tests.conftest import ROOT, run_cli, run_local_args

MAN = ROOT / "manifests"
CRDS = ROOT / ".venv" / "compat" / "trainer-v2.3.0"


def _crd(plural: str) -> dict:
    path = CRDS / f"trainer.kubeflow.org_{plural}.yaml"
    assert path.exists(), f"{path} is missing: run `make test` (it fetches Trainer's Go module)"
    return yaml.safe_load(path.read_text())


def _docs(kind: str) -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(MAN.rglob("*.yaml")):
        out += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") == kind]
    return out


def test_trainjobs_and_runtime_validate_strictly_against_the_v2_3_0_crds():
    jobs, runtimes = _docs("TrainJob"), _docs("TrainingRuntime")
    assert len(jobs) == len(M.JOBS) == 8 and (MAN / "trainjob-r50.yaml") in [f for f, _ in jobs]
    assert [d["metadata"]["name"] for _, d in runtimes] == [M.RUNTIME]
    for f, d in jobs:
        assert validate_resource(d, _crd("trainjobs")) == [], f
        assert d["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                           "name": M.RUNTIME}
    assert validate_resource(runtimes[0][1], _crd("trainingruntimes")) == []
    # the validator itself: Trainer's own torch-distributed runtime passes, typos and wrong types do not
    upstream = yaml.safe_load((CRDS / "torch_distributed.yaml").read_text())
    assert validate_resource(upstream, _crd("clustertrainingruntimes")) == []
    bad = copy.deepcopy(jobs[0][1])
    bad["spec"]["trainer"]["numNodess"] = 2
    bad["spec"]["trainer"]["numProcPerNode"] = "8"
    bad["spec"]["trainer"]["resourcesPerNode"]["limits"]["cpu"] = [96]
    errs = validate_resource(bad, _crd("trainjobs"))
    assert ".spec.trainer.numNodess: unknown field" in errs
    assert any("numProcPerNode: expected an integer" in e for e in errs)
    assert any("limits.cpu: expected an integer or a string" in e for e in errs)
    rt = copy.deepcopy(runtimes[0][1])
    rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "securityContex"] = {}
    assert any("securityContex: unknown field" in e for e in validate_resource(rt, _crd("trainingruntimes")))


def test_trainjobs_match_the_pytorchjobs_of_the_same_source():
    """One JobSpec renders both: same name, image, resources, GPU count per node, node count and dcv2 call; the
    trainer env holds none of the names the torch plugin reserves (pkg/constants TorchRunReservedEnvNames: its
    webhook rejects them)."""
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    for spec in M.JOBS:
        tj, pj = M.trainjob(spec), M.pytorchjob(spec)
        c = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
        t = tj["spec"]["trainer"]
        assert tj["metadata"]["name"] == pj["metadata"]["name"] and t["image"] == c["image"]
        assert t["resourcesPerNode"] == c["resources"] and t["numNodes"] == spec.nodes
        assert t["numProcPerNode"] == int(pj["spec"]["nprocPerNode"]) == int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert t["command"] == c["command"] == ["dcv2"] and t["args"][0] == c["args"][0]
        assert [a for a in t["args"] if "DATA_PATHS" not in a and "STAGE_DIR" not in a] == \
            [a for a in c["args"] if "DATA_PATHS" not in a]
        assert not reserved & {e["name"] for e in t["env"]}
        assert f"config.DATA.TRAIN.DATA_PATHS=[{spec.data_uri}]" in t["args"]  # the run stages its own data


def test_trainjob_args_come_from_the_jobspec():
    """A TrainJob's run reads the splits' URIs and stages the train split into the directory the PyTorchJob's init
    container would have staged it to; the splits' order and every other token are the PyTorchJob's."""
    spec = next(j for j in M.JOBS if j.val_uri)
    t, p = M.dcv2_args(spec, stages_itself=True), M.dcv2_args(spec)
    assert f"config.DATA.TRAIN.DATA_PATHS=[{M.TRAIN_DIR}]" in p and f"config.DATA.TEST.DATA_PATHS=[{M.VAL_DIR}]" in p
    i = p.index(f"config.DATA.TRAIN.DATA_PATHS=[{M.TRAIN_DIR}]")
    assert t[i:i + 3] == [f"config.DATA.TRAIN.DATA_PATHS=[{spec.data_uri}]",
                          f"config.DATA.TRAIN.STAGE_DIR={M.TRAIN_DIR}", f"config.DATA.TEST.DATA_PATHS=[{spec.val_uri}]"]
    assert t[:i] == p[:i] and t[i + 3:] == p[i + 2:]


def test_runtime_carries_the_exit_code_contract_and_restricted_pods():
    """dcv2's exit codes (1, 2, 3 permanent; 143, 200 retryable) as the Job's podFailurePolicy; evictions and
    preemptions (DisruptionTarget) do not count against backoffLimit; pods pass Pod Security "restricted"."""
    rt = M.training_runtime()
    job = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In",
                                                             "values": [1, 2, 3]}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": M.SECRET}}]
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])


def test_run_local_gives_the_torch_plugin_environment():
    job = yaml.safe_load((MAN / "trainjob" / "dcv2-r50-32gpu.yaml").read_text())
    reps = trainjob_replicas(job)
    assert [n for n, _, _ in reps] == [f"node-0-{i}" for i in range(4)]
    for i, (_, cmd, env) in enumerate(reps):
        assert env["PET_NNODES"] == "4" and env["PET_NPROC_PER_NODE"] == "8" and env["PET_NODE_RANK"] == str(i)
        assert env["PET_MASTER_ADDR"] == "127.0.0.1" and env["PET_MASTER_PORT"] == reps[0][2]["PET_MASTER_PORT"]
        assert env["HOME"] == "/tmp" and cmd[:2] == ["dcv2", "train"]


@pytest.mark.slow
def test_run_local_trainjob_r50_two_nodes_on_cpu(synth_data, tmp_path):
    p = run_cli(*run_local_args(MAN / "trainjob-r50.yaml", synth_data, tmp_path / "ckpt",
                                "config.OPTIMIZER.num_epochs=1", "config.TRAINER.MAX_STEPS=4"), timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "[node-0-0]" in out and "[node-0-1]" in out and "[node-0-0] " in out.split("2 processes x batch 16")[0][-200:]
    assert "stopped after 4 steps" in out and "[run-local] job succeeded" in out


def test_k8s_validate_cli_checks_trainjobs_with_the_crds(tmp_path):
    files = [str(MAN / "trainjob-r50.yaml"), str(MAN / "trainjob" / "runtime-dcv2-torch.yaml")]
    p = run_cli("k8s", "validate", *files, "--crds", str(CRDS), timeout=120)
    assert p.returncode == 0 and "0 problems" in p.stdout, p.stdout + p.stderr
    bad = yaml.safe_load((MAN / "trainjob-r50.yaml").read_text())
    bad["spec"]["trainer"]["imagee"] = "x"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    p = run_cli("k8s", "validate", str(tmp_path / "bad.yaml"), "--crds", str(CRDS), timeout=120)
    assert p.returncode == 1 and ".spec.trainer.imagee: unknown field" in p.stdout
    p = run_cli("k8s", "validate", str(tmp_path / "bad.yaml"), timeout=120)
    assert p.returncode == 1 and "pass --crds DIR" in p.stdout


def test_trainjob_pods_are_scraped():
    """The TrainJob PodMonitor selects the runtime's pods: our label from the pod template plus JobSet's
    ``jobset.sigs.k8s.io/jobset-name``, which JobSet puts on every pod it creates; the port it scrapes is on the
    container; a PyTorchJob's pod (no JobSet label) is not selected twice."""
    pm = yaml.safe_load((MAN / "monitoring" / "podmonitor-trainjob.yaml").read_text())
    assert "podmonitor-trainjob.yaml" in yaml.safe_load((MAN / "monitoring" / "kustomization.yaml").read_text())[
        "resources"]
    sel = pm["spec"]["selector"]

    def selected(labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in sel["matchLabels"].items()) and all(
            e["key"] in labels for e in sel["matchExpressions"] if e["operator"] == "Exists")

    pod = M.training_runtime()["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert selected({**pod["metadata"]["labels"], "jobset.sigs.k8s.io/jobset-name": "dcv2-r50"})
    pj = M.pytorchjob(M.JOBS[0])["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert not selected(pj["metadata"]["labels"])
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]
    assert any(p["name"] == port for p in pod["spec"]["containers"][0]["ports"])
