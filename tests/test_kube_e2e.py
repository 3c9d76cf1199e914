"""End to end against a real Kubernetes cluster on this machine: kube-apiserver v1.36 (RBAC, Pod Security
admission), kube-controller-manager, kube-scheduler, etcd, the Kubeflow training operator v1.9.4 with its
validating webhook, and Kubeflow Trainer v2.3.0 with JobSet v0.12.0, each with its webhooks
(tests/kube/controlplane.py), and a real node (tests/kube/node.py): kubelet, containerd + runc, the CNI bridge and
CoreDNS. Pods run our real image (``make image``: docker/Dockerfile on the test base image), so the image's user,
entrypoint and packages, securityContext enforcement, volumes, pod DNS and the kubelet's own signal handling are the
real ones. Jobs are driven with what users type: the real ``kubectl`` with the docs' own command lines, the Kubeflow
SDKs (``kubeflow`` TrainerClient, ``kubeflow-training`` TrainingClient) and the pipeline's step functions.

All on CPU with tiny settings: ResNet-18 at 1/4 width, 1 process per pod, the synthetic dataset staged from the
embedded S3 (listening on the pod bridge) by the pod's own init container (a PyTorchJob) or by dcv2 itself (a
TrainJob), checkpoints to that S3."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import pytest
import yaml

from dcv2_k8s.checkpoint import CheckpointManager
from dcv2_k8s.k8s.kinds import PYTORCHJOB, TRAINJOB, JobKind
from dcv2_k8s.k8s.launcher import JobLauncher
from dcv2_k8s.k8s.local import replica_envs
from dcv2_k8s.k8s.validate import validate_pytorchjob
from dcv2_k8s.weights import read_file
from tests.conftest import ROOT, environ, tiny_train_tokens
from tests.kube.controlplane import BIN, ControlPlane, missing_binaries
from tests.kube.node import GATEWAY, GPU, IMAGE, PodHistory, RealNode
from tests.kube.node import missing as node_missing

pytestmark = pytest.mark.slow

MAN = ROOT / "manifests"
LAUNCHER_SA = "dcv2-launcher"
TOTAL = 14  # 2 epochs x 7 steps (240 images, 2 pods x batch 16)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if missing_binaries():
        pytest.fail(f"control-plane binaries missing in {BIN / 'bin'}: {missing_binaries()}; "
                    "`make test` builds them (`make controlplane trainer`)")
    if node_missing():
        pytest.fail(f"the real node cannot run here: {node_missing()}; `make test` builds and installs them")
    d = tmp_path_factory.mktemp("kube")
    cp = ControlPlane(d)
    node = None
    try:
        cp.start()
        node = RealNode(cp, d / "node")
        cp.node = node
        node.start()
        cp.install_trainer(pod_address=GATEWAY)  # its status server is reached by the pods on the node's bridge
        yield cp
    finally:
        try:
            if node is not None:
                node.stop()
        finally:
            cp.stop()
        if node is not None:
            assert node.leftovers() == [], node.leftovers()


@pytest.fixture(scope="module")
def bucket(cluster, synth_data):
    """The embedded S3 on the pod bridge's address (pods reach it there; its variables are set in this process, to
    read checkpoints) with the synthetic training set under s3://data/train, what the init container stages."""
    import boto3

    from dcv2_k8s.s3server import EmbeddedS3

    s3 = EmbeddedS3(host=GATEWAY).start(["data", "ckpt"])
    c = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1")
    for p in sorted((synth_data / "train").rglob("*.jpg")):
        c.upload_file(str(p), "data", f"train/{p.relative_to(synth_data / 'train')}")
    with environ(s3.env()):
        yield s3
    s3.stop()


def _namespace(cluster, name: str, bucket) -> str:
    """A namespace under Pod Security "restricted" with the launcher's RBAC and the S3 Secret the jobs read."""
    cluster.create_namespace(name, {"pod-security.kubernetes.io/enforce": "restricted",
                                    "pod-security.kubernetes.io/enforce-version": "latest"})
    for doc in yaml.safe_load_all((MAN / "rbac-launcher.yaml").read_text()):
        cluster.apply(doc, name)
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dcv2-s3"},
                   "stringData": bucket.env()}, name)
    return name


# what a pod of the tiny jobs asks for: this node is 2 cores and 24 GiB, not 96 cores, 512 GiB and 8 GPUs
TINY_RESOURCES = {"stage-data": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                 "limits": {"cpu": "1", "memory": "2Gi"}},
                  "pytorch": {"requests": {"cpu": "100m", "memory": "512Mi", GPU: "1"},
                              "limits": {"cpu": "2", "memory": "6Gi", GPU: "1"}}}


def _tiny_tokens(name: str, ckpt: str, data: Path | str, *extra: str) -> list[str]:
    """The tokens appended to a manifest's own ``dcv2 train`` arguments for a tiny CPU run (later tokens win)."""
    tokens = tiny_train_tokens(Path("/data"), Path("unused"), "config.METRICS.ENABLED=false",
                               "config.MACHINE.DEVICE=cpu", "config.MODEL.TRUNK.RESNETS.DEPTH=18",
                               "config.OPTIMIZER.num_epochs=2", "config.TRAINER.DETERMINISTIC=true",
                               "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
                               "config.DISTRIBUTED.TIMEOUT_SECONDS=30", f"config.RUN_NAME={name}", *extra)[1:]
    swap = {"config.CHECKPOINT.DIR=": f"config.CHECKPOINT.DIR={ckpt}",
            "config.DATA.TRAIN.DATA_PATHS=": f"config.DATA.TRAIN.DATA_PATHS=[{data}/train]"}
    return [next((v for k, v in swap.items() if t.startswith(k)), t) for t in tokens]


def tiny_job(name: str, ckpt: str, *extra: str) -> dict:
    """manifests/pytorchjob-r50.yaml as users apply it, with tiny overrides appended to its own arguments (one CPU
    process per pod, ResNet-18 at 1/4 width), resources this node has, the image ``make image`` built and
    imported (``IfNotPresent``: no registry here), and its stage step pointed at the embedded S3's training set."""
    job = yaml.safe_load((MAN / "pytorchjob-r50.yaml").read_text())
    job["metadata"]["name"] = name
    job["spec"]["nprocPerNode"] = "1"
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    for c in pod["initContainers"] + pod["containers"]:
        c["image"], c["imagePullPolicy"] = IMAGE, "IfNotPresent"
        c["resources"] = copy.deepcopy(TINY_RESOURCES[c["name"]])
    stage = pod["initContainers"][0]
    assert stage["args"][:3] == ["stage", "s3://datasets/imagenet/train", "/data/train"]
    stage["args"] = ["stage", "s3://data/train", "/data/train", "--workers", "4"]
    c = pod["containers"][0]
    c["args"] = c["args"] + _tiny_tokens(name, ckpt, Path("/data"), *extra)
    for e in c["env"]:
        if e["name"] == "OMP_NUM_THREADS":
            e["value"] = "1"
        elif e["name"].startswith("PET_RDZV_"):  # the rendezvous names the job (its worker-0 Service)
            e["value"] = e["value"].replace("dcv2-r50", name)
    assert validate_pytorchjob(job) == [], validate_pytorchjob(job)
    return job


def _pods(cluster, ns: str, job: str, kind: JobKind = PYTORCHJOB):
    """The pods of ``job`` by the label its kind's controller puts on them."""
    from kubernetes import client

    return client.CoreV1Api(cluster.api_client()).list_namespaced_pod(ns, label_selector=kind.job_selector(job)).items


def _events(cluster, ns: str, name: str):
    from kubernetes import client

    return [e for e in client.CoreV1Api(cluster.api_client()).list_namespaced_event(ns).items
            if e.involved_object.name == name]


def _wait_for(what: str, check, timeout: float, cluster, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = check()
        if out:
            return out
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\nnode:\n" + "\n".join(cluster.node.lines[-40:])
                         + "\n" + cluster.dump())


def _assert_same_weights(got_uri: str, want_uri: str) -> None:
    """The last checkpoints of two runs hold bitwise equal weights."""
    import torch

    got, want = read_file(got_uri)["model"], read_file(want_uri)["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), (got_uri, want_uri)


def _launcher(cluster, ns: str, lines: list, kind: JobKind = PYTORCHJOB) -> JobLauncher:
    """The pipeline's launcher, authenticated as the dcv2-launcher service account (impersonation: the API server
    authorizes each call as that account, so manifests/rbac-launcher.yaml is what allows or denies it)."""
    from kubernetes import client

    api = cluster.api_client(impersonate=f"system:serviceaccount:{ns}:{LAUNCHER_SA}")
    return JobLauncher(client.CustomObjectsApi(api), client.CoreV1Api(api), ns, poll_seconds=1.0,
                       log=lines.append, own_pod="", kind=kind)


def _message(err: Exception) -> str:
    """The API server's message of a refused request."""
    import json

    body = getattr(err, "body", None)
    try:
        return json.loads(body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(body or err)


# ------------------------------------------------------------------------------------------------- manifests
def _documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(MAN.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                out.append((str(path.relative_to(ROOT)), doc))
    return out


def _pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] in ("ClusterTrainingRuntime", "TrainingRuntime"):
        return [j["template"]["spec"]["template"] for j in doc["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def test_every_manifest_applies_server_side(cluster, bucket):
    """Every object in manifests/ goes through a server-side apply (dry-run=server, so admission runs in full):
    the real CRD schemas (PyTorchJob from the operator's module, Trainer v2.3.0's), defaulting, the operator's
    validating webhook, Trainer's mutating and validating webhooks (the runtime applied first: Trainer refuses a
    TrainJob whose runtime does not exist yet), RBAC kinds. Every pod template is also admitted as a Pod under Pod
    Security "restricted". What is rejected fails the test with the API server's own message. The Prometheus
    Operator's kinds (PodMonitor, PrometheusRule) have no CRD here and are listed as not applied."""
    ns = _namespace(cluster, "manifests", bucket)
    # Trainer's TrainJob webhook looks the runtime up: a TrainJob is refused until its runtime exists
    tj = yaml.safe_load((MAN / "trainjob-r50.yaml").read_text())
    with pytest.raises(Exception) as err:
        cluster.apply(tj, ns, dry_run=True)
    assert 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied' in _message(err.value) and \
        "must be created before the TrainJob is created" in _message(err.value), _message(err.value)
    for where, doc in _documents():
        if doc["kind"] == "TrainingRuntime":  # once per namespace, before the TrainJobs (docs/trainer-v2.md)
            cluster.apply(doc, ns)
    applied, skipped, rejected = [], [], []
    for where, doc in _documents():
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if group == "monitoring.coreos.com":
            skipped.append(f"{where}: {doc['kind']}")
            continue
        try:
            cluster.apply(doc, ns, dry_run=True)
            applied.append(f"{where}: {doc['kind']}/{doc['metadata']['name']}")
        except Exception as e:
            rejected.append(f"{where}: {doc['kind']}/{doc['metadata'].get('name')}: {_message(e)}")
        for t in _pod_templates(doc):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template-check",
                                                                   "labels": t.get("metadata", {}).get("labels", {})},
                   "spec": copy.deepcopy(t["spec"])}
            try:
                cluster.apply(pod, ns, dry_run=True)
            except Exception as e:
                rejected.append(f"{where}: pod template of {doc['metadata']['name']}: {_message(e)}")
    assert not rejected, "\n".join(rejected)
    kinds = {a.split(": ")[1].split("/")[0] for a in applied}
    assert {"PyTorchJob", "TrainJob", "TrainingRuntime", "ServiceAccount", "Role", "RoleBinding",
            "Secret"} <= kinds, applied
    assert len(applied) >= 20 and {s.split(": ")[1] for s in skipped} <= {"PodMonitor", "PrometheusRule"}, skipped

    # the webhook is really called: a job whose container is not named "pytorch" is refused by the operator
    bad = tiny_job("bad-container", "s3://ckpt/none")
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(Exception) as err:
        cluster.apply(bad, ns, dry_run=True)
    assert "admission webhook" in _message(err.value) and "pytorch" in _message(err.value), _message(err.value)
    # Trainer's webhook too: the trainer env may not set what its torch plugin sets (TorchRunReservedEnvNames)
    bad = copy.deepcopy(tj)
    bad["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "4"})
    with pytest.raises(Exception) as err:
        cluster.apply(bad, ns, dry_run=True)
    assert 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied' in _message(err.value) and \
        "PET_NNODES" in _message(err.value), _message(err.value)
    # and a pod that breaks "restricted" is refused by Pod Security admission with its reasons
    t = copy.deepcopy(_pod_templates(yaml.safe_load((MAN / "pytorchjob-r50.yaml").read_text()))[0])
    t["spec"]["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")
    with pytest.raises(Exception) as err:
        cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "loose"}, "spec": t["spec"]}, ns,
                      dry_run=True)
    assert 'violates PodSecurity "restricted:latest"' in _message(err.value), _message(err.value)


# ------------------------------------------------------------------------------------------------- the node
PROBE = r"""
import json, os, pathlib
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}
for path in ("/probe", "/dev/shm/probe", "/tmp/probe", "/data/probe"):
    try:
        pathlib.Path(path).write_text("x")
        out[path] = "written"
    except OSError as e:
        out[path] = e.strerror
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
out.update({k: status[k].strip() for k in ("CapEff", "CapBnd", "NoNewPrivs", "Seccomp")})
st = os.statvfs("/dev/shm")
out["shm_bytes"] = st.f_blocks * st.f_frsize
out["data_gid"] = os.stat("/data").st_gid
import torch, dcv2_k8s
out["torch"] = torch.__version__
print("PROBE " + json.dumps(out), flush=True)
"""


def test_restricted_security_context_is_enforced_by_the_runtime(cluster, finished):
    """The pod template of pytorchjob-r50.yaml, as a Pod of our image under Pod Security "restricted", checked from
    inside by the runtime's own answers: uid/gid 1000 from the image and the securityContext, the root filesystem
    read-only, /dev/shm, /tmp and /data (emptyDirs) writable, /data group-owned by fsGroup 1000, no capabilities,
    no_new_privs and seccomp in filter mode (RuntimeDefault), /dev/shm a memory volume sized by its sizeLimit."""
    from kubernetes import client

    ns = finished["ns"]
    spec = copy.deepcopy(tiny_job("probe", "s3://ckpt/none")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"])
    spec["spec"]["restartPolicy"] = "Never"
    spec["spec"].pop("initContainers")
    c = spec["spec"]["containers"][0]
    c["command"], c["args"] = ["python", "-c", PROBE], []
    for v in spec["spec"]["volumes"]:
        if v["name"] == "dshm":
            v["emptyDir"]["sizeLimit"] = "96Mi"
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod(ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "security-probe"},
                                    "spec": spec["spec"]})
    phase = _wait_for("the probe pod to finish", lambda: core.read_namespaced_pod("security-probe", ns).status.phase
                      in ("Succeeded", "Failed") and core.read_namespaced_pod("security-probe", ns).status.phase,
                      180, cluster)
    log = core.read_namespaced_pod_log("security-probe", ns)
    assert phase == "Succeeded", log[-3000:]
    import json

    got = json.loads(next(ln for ln in log.splitlines() if ln.startswith("PROBE ")).split(" ", 1)[1])
    assert (got["uid"], got["gid"]) == (1000, 1000) and 1000 in got["groups"], got
    assert got["/probe"] == "Read-only file system", got
    assert got["/dev/shm/probe"] == got["/tmp/probe"] == got["/data/probe"] == "written", got
    assert got["data_gid"] == 1000, got  # fsGroup
    assert int(got["CapEff"], 16) == 0 and int(got["CapBnd"], 16) == 0, got  # capabilities: drop ALL
    assert got["NoNewPrivs"] == "1" and got["Seccomp"] == "2", got  # allowPrivilegeEscalation false, RuntimeDefault
    assert got["shm_bytes"] == 96 * 2**20, got  # medium: Memory, sized by its sizeLimit
    core.delete_namespaced_pod("security-probe", ns, grace_period_seconds=0)


# ------------------------------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def finished(cluster, bucket, tmp_path_factory):
    """pytorchjob-r50.yaml (a tiny copy at its path in a user's checkout) applied with the docs' own ``kubectl
    apply`` line by the real kubectl, then attached to by the pipeline's launcher as dcv2-launcher (a retried step)
    and waited for."""
    ns = _namespace(cluster, "train", bucket)
    history = PodHistory(cluster.api_client(), ns)  # every pod state of the namespace, deleted pods' included
    job = tiny_job("dcv2-r50", "s3://ckpt/dcv2-e2e")
    user = _user_checkout(cluster, tmp_path_factory.mktemp("user-pytorchjob"), ns,
                          {"manifests/pytorchjob-r50.yaml": job})
    docs = _doc_commands("kubernetes.md", "kubectl apply -f manifests/pytorchjob-r50.yaml")
    assert docs[0] == "kubectl apply -f manifests/pytorchjob-r50.yaml", docs
    t0 = time.time()
    applied = _sh(user, docs[0])
    lines: list[str] = []
    launcher = _launcher(cluster, ns, lines)
    name = launcher.launch(job)  # a retried step: 409 on create, attaches
    try:
        state = launcher.wait(name, timeout_seconds=480)
    except Exception as e:
        raise AssertionError(f"{e}\nnode:\n" + "\n".join(cluster.node.lines[-40:]) + cluster.dump()) from e
    yield {"ns": ns, "name": name, "job": job, "state": state, "lines": lines, "seconds": time.time() - t0,
           "launcher": launcher, "pods": _pods(cluster, ns, name), "history": history, "user": user, "docs": docs,
           "applied": applied}
    history.stop()


def test_pytorchjob_r50_runs_to_succeeded_through_the_operator(cluster, finished):
    """Two pods created by the operator (Worker-only: no operator init container), admitted under "restricted",
    each staging the data from S3 in its own init container, then torchrun's c10d rendezvous between the pods
    over gloo through the worker-0 Service's name (CoreDNS), rank 0 on worker 0; the job reaches Succeeded and the
    last checkpoint (step 14) is committed in the S3 bucket. The launcher streamed rank 0's log through the API
    server from the kubelet."""
    assert finished["state"] == "Succeeded"
    lines = "\n".join(finished["lines"])
    assert "exists already (a retried step): attaching to it" in lines
    assert "[dcv2-r50-worker-0]" in lines, lines[-3000:]
    pods = finished["pods"]
    # rank 0 (the one that says how many processes joined) is on worker 0: each pod has its own host name, and
    # the c10d rendezvous orders nodes by it
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    logs = {p.metadata.name: core.read_namespaced_pod_log(p.metadata.name, finished["ns"], container="pytorch")
            for p in pods}
    assert sorted(logs) == ["dcv2-r50-worker-0", "dcv2-r50-worker-1"]
    assert "2 processes x batch 16" in logs["dcv2-r50-worker-0"], logs["dcv2-r50-worker-0"][-2000:]
    assert "2 processes x batch 16" not in logs["dcv2-r50-worker-1"]
    for p in pods:
        assert p.status.phase == "Succeeded", p.status
        assert [c.name for c in p.spec.init_containers] == ["stage-data"]  # ours only: no init-pytorch
        assert p.spec.restart_policy == "Never"  # the operator turns ExitCode into Never and recreates pods itself
    latest = CheckpointManager("s3://ckpt/dcv2-e2e").latest()
    assert latest is not None and latest["global_step"] == TOTAL, latest
    # the job stays after success (the launcher deletes only on failure or termination): its status is readable
    assert finished["launcher"].state(finished["name"]) == "Succeeded"


def test_the_docs_kubectl_commands_and_the_training_sdk_on_the_pytorchjob(cluster, finished):
    """The docs' "Apply and watch" block typed as it is, with the real kubectl v1.36 in a user's checkout (the file a
    tiny copy): ``apply`` created the job (above), ``get pytorchjobs -w`` shows it Succeeded, ``logs -f`` of worker 0's
    ``pytorch`` container is rank 0's log and ``logs ... -c stage-data`` the staging init container's. Then the
    Kubeflow Training SDK (kubeflow-training 1.9.4, TrainingClient) gets the same job, waits for it and reads its
    logs by itself."""
    user, docs = finished["user"], finished["docs"]
    assert "pytorchjob.kubeflow.org/dcv2-r50 created" in finished["applied"], finished["applied"]
    assert docs[1] == "kubectl get pytorchjobs -w", docs
    seen = _watch(user, docs[1], ("Succeeded", "Failed"), 60, cluster)
    assert re.match(r"dcv2-r50\s+Succeeded\s", seen[-1]), seen
    assert docs[2].startswith("kubectl logs -f dcv2-r50-worker-0 -c pytorch"), docs
    rank0 = _sh(user, docs[2])
    assert "2 processes x batch 16" in rank0 and f"training finished: 2 epochs, {TOTAL} steps" in rank0, rank0[-2000:]
    assert docs[3] == "kubectl logs dcv2-r50-worker-0 -c stage-data", docs
    staged = _sh(user, docs[3])
    assert "240" in staged, staged[-2000:]

    from kubeflow.training import TrainingClient

    tc = TrainingClient(config_file=str(cluster.kubeconfig), namespace=finished["ns"], job_kind="PyTorchJob")
    job = tc.get_job(finished["name"])
    assert job.metadata.name == "dcv2-r50" and job.spec.pytorch_replica_specs["Worker"].replicas == 2
    assert tc.is_job_succeeded(finished["name"])
    done = tc.wait_for_job_conditions(finished["name"], wait_timeout=60, polling_interval=1)
    assert done.status.conditions[-1].type == "Succeeded"
    logs, _ = tc.get_job_logs(finished["name"])
    assert "2 processes x batch 16" in logs["dcv2-r50-worker-0"], logs.keys()


def test_run_local_environment_equals_the_operators(cluster, finished):
    """``dcv2 k8s run-local`` gives each replica the environment the real operator gave the pods: same variables,
    same values, the Service names in them resolved to this machine."""
    by_pod = {p.metadata.name: {e.name: e.value for e in p.spec.containers[0].env if e.value is not None}
              for p in finished["pods"]}
    local = {f"{finished['name']}-{n}": env for n, _, env in replica_envs(finished["job"], nproc_override=1)}
    assert by_pod.keys() == local.keys()
    for pod, env in by_pod.items():
        mine = local[pod]
        assert env.keys() == mine.keys(), (pod, sorted(env.keys() ^ mine.keys()))
        for k, v in env.items():
            expect = re.sub(rf"{finished['name']}-worker-0:\d+", "127.0.0.1:PORT", v)
            assert re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", mine[k]) == expect, (pod, k, v, mine[k])


def test_launcher_rights_are_exactly_the_rbac_manifest(cluster, finished):
    """As dcv2-launcher the launcher may read pods and logs but not Secrets, and may not create pods; deleting the
    job (the exit handler's clean-up) removes it, and the garbage collector removes its pods."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ns, name = finished["ns"], finished["name"]
    core = client.CoreV1Api(cluster.api_client(impersonate=f"system:serviceaccount:{ns}:{LAUNCHER_SA}"))
    with pytest.raises(ApiException) as err:
        core.read_namespaced_secret("dcv2-s3", ns)
    assert err.value.status == 403
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    assert err.value.status == 403
    assert finished["launcher"].delete(name) is True
    assert finished["launcher"].delete(name) is False  # already gone: the exit handler may run twice
    _wait_for("the garbage collector deletes the job's pods", lambda: not _pods(cluster, ns, name), 60, cluster)


def test_prometheus_scrapes_the_pods_through_the_podmonitor(cluster, bucket, finished, tmp_path):
    """The real Prometheus scrapes a running job's pods at their pod IPs on the port named "metrics", with the scrape
    configuration the Prometheus Operator generates from manifests/monitoring/podmonitor.yaml (tests/kube/
    podmonitor.py). Debian's Prometheus has no Kubernetes discovery, so the pods' discovery targets come from the
    API server through a file_sd file refreshed every second (tests/kube/podmonitor.py discovered_targets, after
    prometheus discovery/kubernetes/pod.go); the relabelling, selection and scraping are Prometheus's own."""
    import json
    import shutil
    import signal
    import subprocess
    import urllib.parse
    import urllib.request

    from kubernetes import client

    from dcv2_k8s.distributed import free_port
    from tests.kube.podmonitor import discovered_targets, scrape_config

    prom = shutil.which("prometheus")
    assert prom, "prometheus not found: install Debian's prometheus package (.ci/run does)"
    ns, name = finished["ns"], "dcv2-e2e-metrics"
    pm = yaml.safe_load((MAN / "monitoring" / "podmonitor.yaml").read_text())
    cfg = scrape_config(pm, cluster.server, "ca", "crt", "key", interval="1s")
    cfg.pop("kubernetes_sd_configs")
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    cfg["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"},
                                                             "scrape_configs": [cfg]}))
    port = free_port()
    proc = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"),
                            start_new_session=True)
    cluster.ledger.process("prometheus", proc.pid)   # stopped by the next start if this pytest is killed
    api = cluster.api_client()
    core = client.CoreV1Api(api)

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())["data"]["result"]

    def scraped():
        pods = core.list_namespaced_pod(ns, label_selector=f"training.kubeflow.org/job-name={name}").items
        groups = [g for p in pods for g in discovered_targets(api.sanitize_for_serialization(p))]
        tmp = targets.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(targets)
        try:
            got = query(f'dcv2_train_steps_total{{namespace="{ns}"}}')
        except OSError:
            return None
        return got if len(got) == 2 and all(float(r["value"][1]) > 0 for r in got) else None
    try:
        launcher = _launcher(cluster, ns, [])
        launcher.launch(tiny_job(name, f"s3://ckpt/{name}", "config.METRICS.ENABLED=true",
                                 "config.OPTIMIZER.num_epochs=4"))
        got = _wait_for("both pods' steps in Prometheus", scraped, 300, cluster, poll=1.0)
        by_pod = {r["metric"]["pod"]: r["metric"] for r in got}
        assert sorted(by_pod) == [f"{name}-worker-0", f"{name}-worker-1"], by_pod
        ips = {p.metadata.name: p.status.pod_ip for p in _pods(cluster, ns, name)}
        for pod, m in by_pod.items():
            assert m["instance"] == f"{ips[pod]}:8000", m  # the pod's own IP, on the pod network
            assert (m["job"], m["container"], m["endpoint"]) == (f"{pm['metadata'].get('namespace', 'default')}/"
                                                                 f"{pm['metadata']['name']}", "pytorch", "metrics"), m
            assert m["training_kubeflow_org_job_name"] == name and m["training_kubeflow_org_replica_type"] == \
                "worker", m  # podTargetLabels
        assert launcher.wait(name, timeout_seconds=300) == "Succeeded"
    finally:
        proc.send_signal(signal.SIGTERM)  # stopped by its PID, also when the test failed
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------------- failures
def test_deleted_pod_is_recreated_and_the_run_resumes_bitwise(cluster, bucket, finished):
    """A pod deleted mid-run (SIGTERM to its main process, terminationGracePeriodSeconds 120): dcv2 commits a
    checkpoint and exits 143, the operator recreates the pod (restartPolicy ExitCode), both pods resume from the
    checkpoint, and the job ends Succeeded with weights bitwise equal to the uninterrupted run's."""
    from kubernetes import client

    ns = finished["ns"]
    name = "dcv2-e2e-del"
    ckpt = f"s3://ckpt/{name}"
    lines: list[str] = []
    launcher = _launcher(cluster, ns, lines)
    launcher.launch(tiny_job(name, ckpt))
    mgr = CheckpointManager(ckpt)
    first = _wait_for("a first committed checkpoint", lambda: mgr.latest(), 300, cluster, poll=0.3)
    victim = next(p for p in _pods(cluster, ns, name) if p.metadata.name.endswith("worker-1"))
    client.CoreV1Api(cluster.api_client()).delete_namespaced_pod(victim.metadata.name, ns)
    _wait_for("the pod recreated by the operator", lambda: any(
        p.metadata.name == victim.metadata.name and p.metadata.uid != victim.metadata.uid
        for p in _pods(cluster, ns, name)), 180, cluster)
    assert launcher.wait(name, timeout_seconds=480) == "Succeeded", "\n".join(lines[-50:])
    # the kubelet sent SIGTERM (terminationGracePeriodSeconds 120) and dcv2 exited 143 well within it (a SIGKILL
    # after the grace period would read 137)
    codes = finished["history"].exit_codes(victim.metadata.uid, "pytorch")
    assert codes == [143], codes
    assert mgr.latest()["global_step"] == TOTAL and first["global_step"] < TOTAL
    _assert_same_weights(ckpt, "s3://ckpt/dcv2-e2e")


def test_control_plane_and_node_restarts_mid_run_lose_nothing(cluster, bucket, finished):
    """While a job runs: the training operator, the kubelet and containerd are restarted (SIGTERM by PID, started
    again), then the API server goes away for a minute (etcd kept) and comes back. The containers run on through all
    of it (no pod recreated, no container restarted, so nothing is counted against backoffLimit), the pipeline's
    watcher rides out the outage with backoff and creates no second job, and the run ends Succeeded with weights
    bitwise equal to the undisturbed run's."""
    import threading

    ns = finished["ns"]
    name = "dcv2-e2e-restarts"
    ckpt = f"s3://ckpt/{name}"
    lines: list[str] = []
    launcher = _launcher(cluster, ns, lines)
    launcher.api_outage_seconds = 300
    launcher.launch(tiny_job(name, ckpt))
    outcome: list = []
    watcher = threading.Thread(target=lambda: outcome.append(_outcome(launcher.wait, name, 600)), daemon=True)
    watcher.start()
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    _wait_for("both pods running", lambda: len([p for p in _pods(cluster, ns, name) if p.status.phase == "Running"
                                                and all(c.ready for c in p.status.container_statuses or [])]) == 2,
              300, cluster)
    before = {p.metadata.name: (p.metadata.uid, [c.container_id for c in p.status.container_statuses])
              for p in _pods(cluster, ns, name)}
    t0 = time.monotonic()
    cluster.restart("training-operator.v1")
    cluster.node.restart("kubelet")
    cluster.node.restart("containerd")
    t1 = time.monotonic()
    cluster.restart("kube-apiserver", down_seconds=60)
    t2 = time.monotonic()
    watcher.join(timeout=600)
    print(f"\nrestarts: operator + kubelet + containerd in {t1 - t0:.1f} s, API server away {t2 - t1:.1f} s; "
          f"job done {time.monotonic() - t2:.1f} s after the API server was back; kube-scheduler restarts so far: "
          f"{cluster.node.scheduler_restarts}; watcher: "
          + "; ".join(ln for ln in lines if "API server" in ln))
    assert outcome and outcome[0] == "Succeeded", (outcome, "\n".join(lines[-40:]))
    assert any("the API server did not answer" in ln for ln in lines), lines[-40:]
    assert any("the API server answers again" in ln for ln in lines), lines[-40:]
    after = {p.metadata.name: (p.metadata.uid, [c.container_id for c in p.status.container_statuses])
             for p in core.list_namespaced_pod(ns, label_selector=f"training.kubeflow.org/job-name={name}").items}
    assert after == before, (before, after)  # the same pods and the same containers: nothing recreated or restarted
    assert finished["history"].restarts(f"{name}-worker-", "pytorch") == 0
    assert len(finished["history"].uids(f"{name}-worker-")) == 2
    jobs = cluster.dynamic().resources.get(api_version="kubeflow.org/v1", kind="PyTorchJob").get(namespace=ns)
    assert [j.metadata.name for j in jobs.items].count(name) == 1
    _assert_same_weights(ckpt, "s3://ckpt/dcv2-e2e")
    launcher.delete(name)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # the watcher's failure, for the assertion's message
        return e


def test_bad_config_fails_the_job_at_once(cluster, finished):
    """A config mistake exits 2 in every pod: the operator fails the job (exit code < 128 is permanent under
    restartPolicy ExitCode, pkg/controller.v1/common/pod.go) and recreates no pod, so the restart budget
    (backoffLimit 6) is not spent."""
    ns = finished["ns"]
    name = "dcv2-e2e-bad"
    lines: list[str] = []
    launcher = _launcher(cluster, ns, lines)
    launcher.launch(tiny_job(name, "s3://ckpt/bad", "config.OPTIMIZER.num_epochs=banana"))
    with pytest.raises(Exception) as err:
        launcher.wait(name, timeout_seconds=300)
    assert "failed" in str(err.value) and "num_epochs" in str(err.value), str(err.value)[-2000:]
    pods = _pods(cluster, ns, name)
    codes = [c.state.terminated.exit_code for p in pods for c in p.status.container_statuses or []
             if c.state.terminated]
    assert codes and set(codes) <= {2}, codes
    # no pod was ever recreated: exactly two pods ever existed. (The operator still records a
    # "PyTorchJobRestarting" event and condition for any failed replica unless restartPolicy is Never,
    # pkg/controller.v1/pytorch/pytorchjob_controller.go UpdateJobStatus; the job fails all the same through
    # pkg/controller.v1/common/pod.go, non-retryable exit code.)
    made = finished["history"].uids(f"{name}-worker-")
    assert len(made) == 2 and 1 <= len(pods) <= 2, made  # cleanPodPolicy Running may delete the slower one
    assert launcher.state(name) == "Failed"


def test_master_layout_is_refused_under_restricted(cluster, finished):
    """Why our jobs have Worker replicas only: with a Master replica the operator adds its own init container
    (init-pytorch, which waits for the master's DNS name) without a securityContext, so under Pod Security
    "restricted" the API server refuses every pod the operator tries to create and the job never starts."""
    ns = finished["ns"]
    job = tiny_job("dcv2-master-layout", "s3://ckpt/master")
    specs = job["spec"]["pytorchReplicaSpecs"]
    specs["Master"] = copy.deepcopy(specs["Worker"])
    specs["Master"]["replicas"] = 1
    specs["Worker"]["replicas"] = 1
    cluster.apply(job, ns)

    def refused():
        return [e.message for e in _events(cluster, ns, "dcv2-master-layout")
                if "violates PodSecurity" in (e.message or "") and "init-pytorch" in e.message]
    assert _wait_for("the operator's pods refused by Pod Security", refused, 60, cluster)
    kinds = {p.metadata.labels["training.kubeflow.org/replica-type"] for p in _pods(cluster, ns, "dcv2-master-layout")}
    assert "worker" not in kinds, kinds  # only the Master pod (no init-pytorch) could be created
    cluster.dynamic().resources.get(api_version="kubeflow.org/v1", kind="PyTorchJob").delete(
        name="dcv2-master-layout", namespace=ns)


def test_before_the_fix_onfailure_restarts_a_config_mistake_until_the_backoff_limit(cluster, finished):
    """The layout before the exit-code contract (restartPolicy OnFailure, as this project's manifests had it): the
    same config mistake is restarted in place again and again, and the job fails only when the container restarts
    reach backoffLimit (pkg/controller.v1/common/job.go PastBackoffLimit), each restart a full start-up on every
    node. The fix (ExitCode + exit 2) fails it at once (the test above)."""
    ns = finished["ns"]
    name = "dcv2-e2e-onfailure"
    job = tiny_job(name, "s3://ckpt/onfailure", "config.OPTIMIZER.num_epochs=banana")
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "OnFailure"
    lines: list[str] = []
    launcher = _launcher(cluster, ns, lines)
    launcher.launch(job)
    with pytest.raises(Exception) as err:
        launcher.wait(name, timeout_seconds=300)
    assert "backoff limit" in str(err.value), str(err.value)[-2000:]
    restarts = finished["history"].restarts(f"{name}-worker-", "pytorch")
    assert restarts >= 6, restarts  # backoffLimit: 6 in pytorchjob-r50.yaml
    launcher.delete(name)


def _launcher_kubeconfig(cluster, ns: str, path: Path) -> Path:
    """A kubeconfig with a real token of the dcv2-launcher service account (TokenRequest), as a KFP step pod has."""
    from kubernetes import client

    token = client.CoreV1Api(cluster.api_client()).create_namespaced_service_account_token(
        LAUNCHER_SA, ns, {"spec": {"expirationSeconds": 3600}}).status.token
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "launcher",
        "clusters": [{"name": "test", "cluster": {"server": cluster.server,
                                                  "certificate-authority": str(cluster.dir / "ca.crt")}}],
        "users": [{"name": "launcher", "user": {"token": token}}],
        "contexts": [{"name": "launcher", "context": {"cluster": "test", "user": "launcher", "namespace": ns}}]}))
    return path


STEP_CODE = (
    "import json, sys\n"
    "from dcv2_k8s import pipeline_steps as s\n"
    "a = json.loads(sys.argv[1])\n"
    "if a['step'] == 'pretrain':\n"
    "    print('RESULT', s.pretrain_step(a['launcher'], a['run'], 'pretrain/deepcluster_v2/deepclusterv2_demo_cpu',"
    " a['overrides'], a['out'], {'train': {'uri': 's3://data/train'}}, 2, 1,"
    " a['image'], a['ns'], 420, cpu_per_gpu=0.25, memory_gib_per_gpu=3,"
    " scratch_gib=2))\n"
    "else:\n"
    "    print('RESULT', json.dumps(s.cleanup_step(a['launcher'], a['run'], a['ns'], a['state'])))\n")


def _pipeline_step(kubeconfig: Path, check: bool = True, **kw) -> tuple[int, str]:
    """One of the pipeline's step functions in a process of its own, as in a KFP step pod: (exit code, output)."""
    import json
    import subprocess
    import sys

    from tests.conftest import child_env

    p = subprocess.run([sys.executable, "-c", STEP_CODE, json.dumps({"image": IMAGE, **kw})], capture_output=True,
                       text=True, timeout=540, env=child_env({"KUBECONFIG": str(kubeconfig)}), cwd=str(ROOT))
    out = p.stdout + p.stderr
    if check:
        assert p.returncode == 0, out[-4000:]
        return p.returncode, next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1]
    return p.returncode, out


def _step_overrides(*extra: str) -> list[str]:
    return [t for t in tiny_train_tokens(Path("/unused"), Path("/unused"), "config.MACHINE.DEVICE=cpu",
                                         "config.MODEL.TRUNK.RESNETS.DEPTH=18", "config.OPTIMIZER.num_epochs=1",
                                         "config.DISTRIBUTED.TIMEOUT_SECONDS=30", *extra)[1:]
            if not t.startswith(("config.DATA.TRAIN.DATA_PATHS=", "config.CHECKPOINT.DIR="))]


def test_pipeline_steps_drive_a_real_job_as_the_launcher_account(cluster, finished, tmp_path):
    """The pipeline's own step functions, in a process of their own as in a KFP step pod, authenticated with a real
    token of the dcv2-launcher service account (TokenRequest): ``pretrain_step`` renders the job, creates it and
    waits for it to succeed; the exit handler's ``cleanup_step`` keeps the run's jobs on a successful run
    (COMPLETE) and deletes them on a failed one (FAILED), once."""
    from dcv2_k8s.k8s.launcher import job_name

    ns = finished["ns"]
    kubeconfig = _launcher_kubeconfig(cluster, ns, tmp_path / "launcher.kubeconfig")
    run = {"launcher": "pytorchjob", "run": "e2e-run-1", "ns": ns}
    _, got = _pipeline_step(kubeconfig, step="pretrain", overrides=_step_overrides(), out="s3://ckpt/pipeline", **run)
    assert got == "s3://ckpt/pipeline/pretrain"
    assert CheckpointManager("s3://ckpt/pipeline/pretrain").latest() is not None
    name = job_name(run["run"], "pretrain")
    assert _pipeline_step(kubeconfig, step="cleanup", state="COMPLETE", **run)[1] == "[]"
    assert finished["launcher"].state(name) == "Succeeded"  # kept, with its logs
    assert _pipeline_step(kubeconfig, step="cleanup", state="FAILED", **run)[1] == f'["{name}"]'
    assert _pipeline_step(kubeconfig, step="cleanup", state="FAILED", **run)[1] == "[]"
    _wait_for("the garbage collector deletes the job's pods", lambda: not _pods(cluster, ns, name), 60, cluster)


def test_before_the_fix_torchrun_as_main_process_turns_a_preemption_into_a_failed_job(cluster, finished):
    """The layout before the fix: ``torchrun --no-python dcv2 train`` as the container's command. A pod deletion
    (preemption, node drain) sends SIGTERM to torchrun, which stops its workers (SIGKILL after 30 s at most) and
    exits 1 (torch/distributed/elastic/agent/server/api.py, SignalException): a permanent code under
    restartPolicy ExitCode, so the operator fails the whole job instead of recreating the pod. With dcv2 as the
    main process the same deletion exits 143 and the run resumes (test_deleted_pod_...)."""
    from kubernetes import client

    ns = finished["ns"]
    name = "dcv2-e2e-torchrun"
    ckpt = f"s3://ckpt/{name}"
    job = tiny_job(name, ckpt)
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    c["command"], c["args"] = ["torchrun"], ["--no-python", "--max-restarts=0", "dcv2", *c["args"]]
    lines: list[str] = []
    launcher = _launcher(cluster, ns, lines)
    launcher.launch(job)
    mgr = CheckpointManager(ckpt)
    _wait_for("a first committed checkpoint", lambda: mgr.latest(), 300, cluster, poll=0.3)
    victim = next(p for p in _pods(cluster, ns, name) if p.metadata.name.endswith("worker-1"))
    client.CoreV1Api(cluster.api_client()).delete_namespaced_pod(victim.metadata.name, ns)
    with pytest.raises(Exception) as err:
        launcher.wait(name, timeout_seconds=240)
    assert "failed" in str(err.value), str(err.value)[-2000:]
    # the job can fail on worker 0's exit 1 before the deleted pod's own container has ended: wait for that too
    stopped = _wait_for("the deleted pod's exit code", lambda: finished["history"].exit_codes(
        victim.metadata.uid, "pytorch"), 60, cluster)
    assert stopped[-1] < 128, stopped
    launcher.delete(name)


# ------------------------------------------------------------------------------- what users type: kubectl
KUBECTL = BIN / "bin" / "kubectl"


def _user_checkout(cluster, where: Path, ns: str, files: dict[str, dict]) -> dict:
    """A user's working copy: the manifests at their paths in the repository (tiny copies), ``kubectl`` on PATH and
    a kubeconfig whose current namespace is ``ns``, set the way users set it (``kubectl config set-context``)."""
    import os
    import shutil

    for rel, doc in files.items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(cluster.kubeconfig, where / "kubeconfig")
    # kubectl's discovery and HTTP caches in the checkout too (by default under $HOME/.kube/cache)
    env = {**os.environ, "KUBECONFIG": str(where / "kubeconfig"), "KUBECACHEDIR": str(where / "kube-cache"),
           "PATH": f"{KUBECTL.parent}:{os.environ['PATH']}"}
    user = {"cwd": where, "env": env}
    _sh(user, f"kubectl config set-context --current --namespace={ns}")
    return user


def _sh(user: dict, line: str, timeout: float = 120) -> str:
    """One command line as a user types it (no shell: the words as the shell would split them)."""
    import shlex
    import subprocess

    p = subprocess.run(shlex.split(line), cwd=user["cwd"], env=user["env"], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"$ {line}\nexit {p.returncode}\n{p.stdout}{p.stderr}"
    return p.stdout


def _watch(user: dict, line: str, until: tuple[str, ...], timeout: float, cluster) -> list[str]:
    """A ``kubectl get ... -w`` left running as a user leaves it: its lines until one shows a state of ``until``."""
    import queue
    import shlex
    import subprocess
    import threading

    p = subprocess.Popen(shlex.split(line), cwd=user["cwd"], env=user["env"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln.rstrip("\n")) for ln in p.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert p.poll() is None, f"$ {line} ended with {p.returncode}: {seen}"
                continue
            if any(re.search(rf"\s{u}\s", seen[-1] + " ") for u in until):
                return seen
        raise AssertionError(f"$ {line}: none of {until} within {timeout:.0f} s: {seen}\n" + cluster.dump())
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def _doc_commands(doc: str, first: str) -> list[str]:
    """The commands of the ```bash block of docs/``doc`` that contains ``first``, as tests/test_doc_commands.py reads
    and parses every block (comments dropped)."""
    from tests.test_doc_commands import BLOCKS, _commands

    for where, block in BLOCKS:
        if where.startswith(f"docs/{doc}:") and first in block:
            return _commands(block)
    raise AssertionError(f"docs/{doc} has no bash block with {first!r}")


# ------------------------------------------------------------------ Kubeflow Trainer v2.3 and JobSet, for real
def tiny_trainjob(name: str, ckpt: str, *extra: str) -> tuple[dict, dict]:
    """manifests/trainjob/runtime-dcv2-torch.yaml and manifests/trainjob-r50.yaml as users get them, with the tiny
    overrides of ``tiny_job`` appended to the TrainJob's own arguments (the run stages s3://data/train itself), one
    CPU process per node, resources this node has and the image ``make image`` imported."""
    rt = yaml.safe_load((MAN / "trainjob" / "runtime-dcv2-torch.yaml").read_text())
    for j in rt["spec"]["template"]["spec"]["replicatedJobs"]:
        for c in j["template"]["spec"]["template"]["spec"]["containers"]:
            c["image"] = IMAGE
    tj = yaml.safe_load((MAN / "trainjob-r50.yaml").read_text())
    tj["metadata"]["name"] = name
    t = tj["spec"]["trainer"]
    t["image"], t["numProcPerNode"] = IMAGE, 1
    t["resourcesPerNode"] = copy.deepcopy(TINY_RESOURCES["pytorch"])
    assert "config.DATA.TRAIN.STAGE_DIR=/data/train" in t["args"], t["args"]
    t["args"] = t["args"] + _tiny_tokens(name, ckpt, "s3://data", *extra)
    for e in t["env"]:
        if e["name"] == "OMP_NUM_THREADS":
            e["value"] = "1"
    t["env"].append({"name": "DCV2_TRAINER_STATUS_INTERVAL", "value": "1"})  # the run lasts seconds
    return rt, tj


def _index(pod) -> str:
    return (pod.metadata.annotations or {}).get(TRAINJOB.index_annotation, "")


@pytest.fixture(scope="module")
def trained(cluster, bucket, finished, tmp_path_factory):
    """The docs' Trainer v2 block typed as it is with the real kubectl, in a user's checkout holding tiny copies of
    the runtime and trainjob-r50.yaml: the runtime and the TrainJob applied, then ``kubectl get trainjob dcv2-r50
    -w`` left running until the TrainJob is Complete (or Failed). Runs after the PyTorchJob of the same settings."""
    ns = _namespace(cluster, "trainer", bucket)
    history = PodHistory(cluster.api_client(), ns)
    rt, tj = tiny_trainjob("dcv2-r50", "s3://ckpt/dcv2-r50-trainjob")
    user = _user_checkout(cluster, tmp_path_factory.mktemp("user-trainjob"), ns,
                          {"manifests/trainjob/runtime-dcv2-torch.yaml": rt, "manifests/trainjob-r50.yaml": tj})
    docs = _doc_commands("trainer-v2.md", "kubectl apply -f manifests/trainjob/runtime-dcv2-torch.yaml")
    assert docs[:3] == ["kubectl apply -f manifests/trainjob/runtime-dcv2-torch.yaml",
                        "kubectl apply -f manifests/trainjob-r50.yaml", "kubectl get trainjob dcv2-r50 -w"], docs
    t0 = time.time()
    applied = [_sh(user, docs[0]), _sh(user, docs[1])]
    watched = _watch(user, docs[2], ("Complete", "Failed"), 480, cluster)
    yield {"ns": ns, "user": user, "docs": docs, "applied": applied, "watched": watched, "history": history,
           "seconds": time.time() - t0, "pods": _pods(cluster, ns, "dcv2-r50", TRAINJOB)}
    history.stop()


def test_trainjob_r50_runs_to_complete_on_trainer_and_jobset(cluster, trained):
    """TrainJob -> JobSet -> indexed Job -> pods, each step the real controller's: Trainer's torch plugin gives the
    two pods PET_NNODES / PET_NODE_RANK (the Job's completion index through the kubelet's downward API) /
    PET_MASTER_ADDR (``dcv2-r50-node-0-0.dcv2-r50``, the JobSet's headless Service, answered by CoreDNS), dcv2 stages
    the data in each pod and torchrun's static rendezvous joins them; the TrainJob ends Complete with the last
    checkpoint in S3 and weights bitwise equal to the PyTorchJob of the same settings. Then the rest of the docs'
    block as typed: the pods by their JobSet label, and ``kubectl logs -f`` of node 0's pod (rank 0)."""
    user, docs, watched = trained["user"], trained["docs"], trained["watched"]
    assert "trainingruntime.trainer.kubeflow.org/dcv2-torch created" in trained["applied"][0], trained["applied"]
    assert "trainjob.trainer.kubeflow.org/dcv2-r50 created" in trained["applied"][1], trained["applied"]
    assert re.match(r"dcv2-r50\s+Complete\s", watched[-1]), (watched, cluster.dump())
    pods = sorted(trained["pods"], key=_index)
    assert [_index(p) for p in pods] == ["0", "1"], [p.metadata.name for p in pods]
    for i, p in enumerate(pods):
        assert p.metadata.name.startswith(f"dcv2-r50-node-0-{i}-"), p.metadata.name
        assert (p.spec.hostname, p.spec.subdomain) == (f"dcv2-r50-node-0-{i}", "dcv2-r50")
        assert p.status.phase == "Succeeded" and [c.name for c in p.spec.containers] == ["node"]
        env = {e.name: e for e in p.spec.containers[0].env}
        assert env["PET_NNODES"].value == "2" and env["PET_NPROC_PER_NODE"].value == "1"
        assert env["PET_MASTER_ADDR"].value == "dcv2-r50-node-0-0.dcv2-r50"
        assert env["PET_NODE_RANK"].value_from.field_ref.field_path == \
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    latest = CheckpointManager("s3://ckpt/dcv2-r50-trainjob").latest()
    assert latest is not None and latest["global_step"] == TOTAL, latest
    _assert_same_weights("s3://ckpt/dcv2-r50-trainjob", "s3://ckpt/dcv2-e2e")
    # progress through Trainer's own status server (TrainJobStatus): rank 0 posted with the URL, CA and projected
    # token Trainer injected, the server checked the token against the cluster's issuer and wrote the status
    import json

    assert docs[3] == "kubectl get trainjob dcv2-r50 -o jsonpath='{.status.trainerStatus}'", docs
    status = json.loads(_sh(user, docs[3]) or "{}")
    assert status.get("progressPercentage") == 100, (status, cluster.log_tail("trainer-controller-manager"))
    got_metrics = {m["name"]: m["value"] for m in status["metrics"]}
    assert got_metrics["global_step"] == str(TOTAL) and "loss" in got_metrics, status
    env = {e.name: e.value for e in pods[0].spec.containers[0].env}
    assert env["KUBEFLOW_TRAINER_SERVER_URL"].startswith(
        "https://kubeflow-trainer-controller-manager.kubeflow-system.svc:"), env
    # the docs' next lines, as typed (the pod's hash filled in, as a user copies it from the listing)
    assert docs[4] == "kubectl get pods -l jobset.sigs.k8s.io/jobset-name=dcv2-r50", docs
    listing = _sh(user, docs[4])
    names = re.findall(r"^(dcv2-r50-node-0-\d-\w+)\s", listing, re.M)
    assert sorted(names) == sorted(p.metadata.name for p in pods), listing
    assert docs[5] == "kubectl logs -f dcv2-r50-node-0-0-<hash>", docs
    rank0 = _sh(user, docs[5].replace("dcv2-r50-node-0-0-<hash>", pods[0].metadata.name))
    other = _sh(user, docs[5].replace("dcv2-r50-node-0-0-<hash>", pods[1].metadata.name))
    assert "2 processes x batch 16" in rank0 and "2 processes x batch 16" not in other, rank0[-2000:]
    assert "data: staging s3://data/train to /data/train" in rank0, rank0[-2000:]
    for log in (rank0, other):  # each node stages its own copy before it starts its ranks: the last progress line
        assert "stage: 240/240 objects, 240 files" in log, log[-2000:]
    # the pipeline's launcher finds rank 0's pod the same way
    assert _launcher(cluster, trained["ns"], [], TRAINJOB).lead_pod("dcv2-r50").metadata.name == pods[0].metadata.name


def test_trainjob_deleted_pod_is_retried_and_the_run_resumes_bitwise(cluster, bucket, trained):
    """The pipeline's launcher (kind TrainJob, as dcv2-launcher) creates a TrainJob and re-attaches to it; a pod
    deleted mid-run gets SIGTERM, dcv2 commits a checkpoint and exits 143, which the runtime's podFailurePolicy
    neither fails nor ignores, so the Job controller counts it against backoffLimit (3) and recreates the pod of
    that index; node 0's pod ends too and is recreated the same way. Rank 0 resumes from the checkpoint and the
    TrainJob ends Complete with weights bitwise equal to the uninterrupted run's."""
    from kubernetes import client

    ns, name = trained["ns"], "dcv2-r50-del"
    ckpt = f"s3://ckpt/{name}"
    lines: list[str] = []
    launcher = _launcher(cluster, ns, lines, TRAINJOB)
    _, job = tiny_trainjob(name, ckpt)
    assert launcher.launch(job) == launcher.launch(job) == name
    assert any("exists already (a retried step): attaching to it" in ln for ln in lines), lines
    mgr = CheckpointManager(ckpt)
    first = _wait_for("a first committed checkpoint", lambda: mgr.latest(), 300, cluster, poll=0.3)
    victim = next(p for p in _pods(cluster, ns, name, TRAINJOB) if _index(p) == "1")
    client.CoreV1Api(cluster.api_client()).delete_namespaced_pod(victim.metadata.name, ns)
    _wait_for("a new pod of index 1 made by the Job controller", lambda: any(
        _index(p) == "1" and p.metadata.uid != victim.metadata.uid for p in _pods(cluster, ns, name, TRAINJOB)),
        180, cluster)
    assert launcher.wait(name, timeout_seconds=480) == "Complete", "\n".join(lines[-50:])
    codes = trained["history"].exit_codes(victim.metadata.uid, "node")
    assert codes == [143], codes
    # the failures were counted against the Job's backoffLimit, and the run went on from its checkpoint
    job = client.BatchV1Api(cluster.api_client()).read_namespaced_job(f"{name}-node-0", ns)
    assert 1 <= (job.status.failed or 0) <= 3, job.status
    core = client.CoreV1Api(cluster.api_client())
    assert len(trained["history"].uids(f"{name}-node-0-0-")) >= 2  # node 0's pod ended too and was recreated
    newest = max((p for p in _pods(cluster, ns, name, TRAINJOB) if _index(p) == "0"),
                 key=lambda p: p.metadata.creation_timestamp)
    rank0 = core.read_namespaced_pod_log(newest.metadata.name, ns)
    assert "resumed from" in rank0, rank0[-3000:]
    assert mgr.latest()["global_step"] == TOTAL and first["global_step"] < TOTAL
    _assert_same_weights(ckpt, "s3://ckpt/dcv2-r50-trainjob")
    assert any(f"[{name}-node-0-0-" in ln for ln in lines), lines[-20:]  # node 0's log streamed by the launcher
    assert launcher.delete(name) is True


def test_trainjob_pipeline_steps_config_mistake_fails_at_once_and_is_cleaned_up(cluster, trained, tmp_path):
    """The pipeline's steps with ``launcher=trainjob``, each in a process of its own with a real token of
    dcv2-launcher: ``pretrain_step`` creates the TrainJob on our runtime; a config mistake exits 2 (the Job controller
    may delete the slower pod first), the runtime's podFailurePolicy (FailJob on 1, 2, 3) fails the Job at once with
    no pod recreated, JobSet fails and Trainer marks the TrainJob Failed; the step fails with the failed pod's last
    log lines. The step's retry re-attaches to the same TrainJob (no second one) and fails the same way. The exit
    handler keeps the job on COMPLETE and deletes it on FAILED, once."""
    from kubernetes import client

    from dcv2_k8s.k8s.launcher import job_name

    ns = trained["ns"]
    kubeconfig = _launcher_kubeconfig(cluster, ns, tmp_path / "launcher.kubeconfig")
    run = {"launcher": "trainjob", "run": "e2e-trainjob-1", "ns": ns}
    name = job_name(run["run"], "pretrain")
    bad = _step_overrides("config.OPTIMIZER.num_epochs=banana")
    code, out = _pipeline_step(kubeconfig, check=False, step="pretrain", overrides=bad, out="s3://ckpt/tj-bad", **run)
    # the launcher's failure text: the TrainJob's Failed condition, then the failed pod's own last lines
    failure = out[out.index(f"TrainJob {ns}/{name} failed"):] if f"TrainJob {ns}/{name} failed" in out else ""
    assert code != 0 and f"last lines of the log of {name}-node-0-" in failure, out[-3000:]
    assert "num_epochs" in failure.split("last lines of the log of", 1)[1], failure[-3000:]
    pods = _pods(cluster, ns, name, TRAINJOB)
    codes = [c.state.terminated.exit_code for p in pods for c in p.status.container_statuses or []
             if c.state.terminated]
    assert codes and set(codes) <= {2}, codes  # the Job controller may delete the slower pod once the Job fails
    assert len(trained["history"].uids(f"{name}-node-0-")) == 2  # no pod was ever recreated
    batch = client.BatchV1Api(cluster.api_client())
    failed = [c for c in batch.read_namespaced_job(f"{name}-node-0", ns).status.conditions if c.type == "Failed"]
    assert failed and failed[0].reason == "PodFailurePolicy", failed
    code, again = _pipeline_step(kubeconfig, check=False, step="pretrain", overrides=bad, out="s3://ckpt/tj-bad",
                                 **run)
    assert code != 0 and "exists already (a retried step): attaching to it" in again, again[-3000:]
    assert f"TrainJob {ns}/{name} failed" in again and "num_epochs" in again, again[-3000:]
    tjs = client.CustomObjectsApi(cluster.api_client()).list_namespaced_custom_object(
        "trainer.kubeflow.org", "v1alpha1", ns, "trainjobs")["items"]
    assert [t["metadata"]["name"] for t in tjs].count(name) == 1
    assert _pipeline_step(kubeconfig, step="cleanup", state="COMPLETE", **run)[1] == "[]"
    assert _pipeline_step(kubeconfig, step="cleanup", state="FAILED", **run)[1] == f'["{name}"]'
    assert _pipeline_step(kubeconfig, step="cleanup", state="FAILED", **run)[1] == "[]"
    _wait_for("the garbage collector deletes the JobSet's pods", lambda: not _pods(cluster, ns, name, TRAINJOB), 60,
              cluster)


def test_kubeflow_sdk_trainer_client_runs_our_runtime(cluster, trained):
    """The Kubeflow SDK (``kubeflow`` 0.5.0, TrainerClient) as a notebook user drives it: finds our ``dcv2-torch``
    runtime (its framework label, the ``node`` step), starts a TrainJob on it with our image and ``dcv2 train``
    command, waits for Complete, reads node 0's log, lists and deletes it."""
    from kubeflow.trainer import CustomTrainerContainer, KubernetesBackendConfig, TrainerClient
    from kubeflow.trainer.options import Name, TrainerArgs, TrainerCommand

    ns = trained["ns"]
    tc = TrainerClient(KubernetesBackendConfig(namespace=ns, config_file=str(cluster.kubeconfig)))
    runtime = tc.get_runtime("dcv2-torch")
    assert runtime.trainer.framework == "torch" and runtime.trainer.num_nodes == 1
    args = ["train", "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet",
            "config.DATA.TRAIN.STAGE_DIR=/data/train",
            *_tiny_tokens("dcv2-sdk", "s3://ckpt/dcv2-sdk", "s3://data", "config.OPTIMIZER.num_epochs=1")]
    # CustomTrainerContainer has no processes-per-node field: Trainer's torch plugin then passes "auto" when the node
    # asks for GPUs (torchrun: one process per visible GPU) and the CPUs it asks for (at least 1) when it asks for
    # none (pkg/runtime/framework/plugins/torch/torch.go, EnforceMLPolicy); this CPU run asks for 1 CPU: 1 process
    name = tc.train(runtime=runtime, trainer=CustomTrainerContainer(
        image=IMAGE, num_nodes=1, resources_per_node={"cpu": 1, "memory": "4Gi"}, env={"OMP_NUM_THREADS": "1"}),
        options=[Name("dcv2-sdk"), TrainerCommand(["dcv2"]), TrainerArgs(args)])
    assert name == "dcv2-sdk"
    job = tc.wait_for_job_status(name, status={"Complete"}, timeout=300, polling_interval=2)
    assert job.status == "Complete" and [s.name for s in job.steps] == ["node-0"], job
    pod = _pods(cluster, ns, name, TRAINJOB)[0]
    assert {e.name: e.value for e in pod.spec.containers[0].env}["PET_NPROC_PER_NODE"] == "1"
    log = "\n".join(tc.get_job_logs(name))
    assert "1 process x batch 16" in log and "training finished: 1 epochs, 15 steps" in log, log[-2000:]
    assert name in [j.name for j in tc.list_jobs()]
    tc.delete_job(name)
    _wait_for("the TrainJob deleted", lambda: name not in [j.name for j in tc.list_jobs()], 60, cluster)
    assert CheckpointManager("s3://ckpt/dcv2-sdk").latest()["global_step"] == 15  # 240 images, 1 process x 16
