"""The Kubernetes manifests of dcv2-k8s, rendered from one source.

``python -m dcv2_k8s.k8s.manifests manifests/`` rewrites every file; a test fails when a committed file differs
from what this module renders, so variants cannot drift apart. Each PyTorchJob is the same template with its
parameters applied (the pipeline's launcher uses this template too).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from dcv2_k8s.exitcodes import ERROR, FENCED, USAGE
from dcv2_k8s.k8s.kinds import KINDS, PYTORCHJOB, TRAINJOB, JobKind

IMAGE = "registry.example.com/dcv2/dcv2-k8s:0.1.0"  # replace with the image you pushed
SECRET = "dcv2-s3"
APP = "dcv2-trainer"
BASE_PRESET = "pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"
METRICS_PORT = 8000
RDZV_PORT = 23456                     # the operator's "pytorchjob-port"; torchrun's c10d rendezvous store on worker 0
UID = 1000
RESTART_INCIDENTS = 3                 # backoffLimit = incidents x pods (see pytorchjob())
# per GPU: the node shapes this fits are in docs/kubernetes.md ("Node sizing")
CPU_REQUEST_PER_GPU, CPU_LIMIT_PER_GPU = 10, 12
MEM_REQUEST_PER_GPU, MEM_LIMIT_PER_GPU = 48, 64      # GiB; the limit includes the /dev/shm tmpfs
SHM_PER_GPU = 8                                      # GiB
DATA_SIZE_LIMIT, TMP_SIZE_LIMIT = 400, 20            # GiB, the emptyDirs
STORAGE_REQUEST = 200                                # GiB of node-local disk: ImageNet train + val staged is ~155 GB
TRAIN_DIR, VAL_DIR = "/data/train", "/data/val"      # where the splits are staged, on the node-local /data


@dataclass
class JobSpec:
    """Parameters of one PyTorchJob."""

    name: str
    nodes: int = 2
    gpus_per_node: int = 8
    config: str = BASE_PRESET
    overrides: list[str] = field(default_factory=list)
    data_uri: str = "s3://datasets/imagenet/train"
    checkpoint_uri: str = ""
    image: str = IMAGE
    description: str = ""
    command: str = "train"
    val_uri: str = ""                     # linear eval: the validation split, staged to /data/val
    val_labels: str = ""                  # a flat validation set: its labels (dcv2 stage --labels)
    active_deadline_seconds: int = 0      # runPolicy.activeDeadlineSeconds (0: none); the pipeline sets its timeout
    image_pull_secrets: list[str] = field(default_factory=list)
    # what the trainer container requests per GPU (its limits keep CPU_LIMIT/CPU_REQUEST and MEM_LIMIT/MEM_REQUEST)
    cpu_per_gpu: float = CPU_REQUEST_PER_GPU          # cores
    memory_gib_per_gpu: float = MEM_REQUEST_PER_GPU   # GiB
    # node-local disk the pod requests (ephemeral-storage: the staged data in /data, /tmp, logs); the volumes' size
    # limits stay as they are, so a small request only changes where the scheduler may put the pod
    scratch_gib: float = STORAGE_REQUEST

    def __post_init__(self):
        for fld, what in (("cpu_per_gpu", "cores per GPU"), ("memory_gib_per_gpu", "GiB per GPU"),
                          ("scratch_gib", "GiB per node")):
            v = getattr(self, fld)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{fld} must be a finite number of {what} greater than 0, got {v!r}")
        longest = PYTORCHJOB.pod(self.name, max(0, self.nodes - 1))
        if len(longest) > 63:
            raise ValueError(f"PyTorchJob name {self.name!r} is too long: its pod and Service {longest!r} must be a "
                             "DNS label of at most 63 characters")


def _restricted_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": UID, "runAsGroup": UID, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _millicores(cores: float) -> int:
    return max(1, round(cores * 1000))


def _mebibytes(gib: float) -> int:
    return max(1, round(gib * 1024))


def _cpu_quantity(millicores: int) -> str:
    """Whole cores as "10", anything else in millicores ("500m")."""
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


def _memory_quantity(mebibytes: int) -> str:
    """Whole GiB as "48Gi", anything else in MiB ("1536Mi")."""
    return f"{mebibytes // 1024}Gi" if mebibytes % 1024 == 0 else f"{mebibytes}Mi"


def _sizing(gpus: int, cpu_per_gpu: float, memory_gib_per_gpu: float) -> tuple[int, int, int, int]:
    """The trainer container's CPU request and limit (millicores) and memory request and limit (MiB): the requests
    per GPU times ``gpus``, the limits today's ratios of them (12/10 of the CPU, 64/48 of the memory)."""
    cpu_req, mem_req = _millicores(cpu_per_gpu * gpus), _mebibytes(memory_gib_per_gpu * gpus)
    return (cpu_req, max(cpu_req, round(cpu_req * CPU_LIMIT_PER_GPU / CPU_REQUEST_PER_GPU)),
            mem_req, max(mem_req, round(mem_req * MEM_LIMIT_PER_GPU / MEM_REQUEST_PER_GPU)))


def _resources(gpus: int, cpu_per_gpu: float = CPU_REQUEST_PER_GPU,
               memory_gib_per_gpu: float = MEM_REQUEST_PER_GPU, scratch_gib: float = STORAGE_REQUEST) -> dict:
    cpu_req, cpu_lim, mem_req, mem_lim = _sizing(gpus, cpu_per_gpu, memory_gib_per_gpu)
    return {"requests": {"cpu": _cpu_quantity(cpu_req), "memory": _memory_quantity(mem_req),
                         "ephemeral-storage": _memory_quantity(_mebibytes(min(scratch_gib, DATA_SIZE_LIMIT
                                                                                 + TMP_SIZE_LIMIT + 10))),
                         "nvidia.com/gpu": str(gpus)},
            "limits": {"cpu": _cpu_quantity(cpu_lim), "memory": _memory_quantity(mem_lim),
                       "ephemeral-storage": f"{DATA_SIZE_LIMIT + TMP_SIZE_LIMIT + 10}Gi",
                       "nvidia.com/gpu": str(gpus)}}


def _shm_size(spec: JobSpec) -> str:
    """The /dev/shm tmpfs: SHM_PER_GPU per GPU. Its pages count against the container's memory limit (medium
    Memory): a tmpfs as large as the limit would let the kernel OOM-kill the trainer once /dev/shm fills. On a pod
    sized small (``memory_gib_per_gpu`` under 12 GiB: 8 GiB is more than half of its 64/48 limit) it is capped at
    half the memory limit, so a full tmpfs leaves the trainer the other half. The defaults (48 GiB per GPU, limit
    64) keep 8 GiB per GPU."""
    *_, mem_lim = _sizing(spec.gpus_per_node, spec.cpu_per_gpu, spec.memory_gib_per_gpu)
    return _memory_quantity(min(SHM_PER_GPU * spec.gpus_per_node * 1024, mem_lim // 2))


def dcv2_args(spec: JobSpec, stages_itself: bool = False) -> list[str]:
    """The ``dcv2`` call of ``spec``. A PyTorchJob's init containers have staged its splits to TRAIN_DIR and VAL_DIR;
    a TrainJob has no per-job init containers, so its run (``stages_itself``) reads the splits' URIs and stages the
    train split into TRAIN_DIR itself (local rank 0 of each node; the other ranks wait)."""
    ckpt = spec.checkpoint_uri or f"s3://dcv2-checkpoints/{spec.name}"
    train, val = (spec.data_uri, spec.val_uri) if stages_itself else (TRAIN_DIR, VAL_DIR)
    data = [f"config.DATA.TRAIN.DATA_PATHS=[{train}]"] + ([f"config.DATA.TRAIN.STAGE_DIR={TRAIN_DIR}"]
                                                          if stages_itself else [])
    if spec.val_uri:
        data.append(f"config.DATA.TEST.DATA_PATHS=[{val}]")
    return [spec.command, f"config={spec.config}", *spec.overrides, *data, f"config.CHECKPOINT.DIR={ckpt}",
            "config.METRICS.ENABLED=true", f"config.METRICS.PORT={METRICS_PORT}", f"config.RUN_NAME={spec.name}",
            "config.DATA.NUM_DATALOADER_WORKERS=10"]


def _stage_resources(spec: JobSpec) -> dict:
    """An init container's request counts on its own when the pod is scheduled (the pod asks for the larger of it
    and the sum of its containers'), so staging asks for 4 cores and 8 GiB, or the trainer's requests when those
    are smaller (a pod sized with small ``cpu_per_gpu`` / ``memory_gib_per_gpu`` fits where its trainer does)."""
    cpu_req, _, mem_req, _ = _sizing(spec.gpus_per_node, spec.cpu_per_gpu, spec.memory_gib_per_gpu)
    return {"requests": {"cpu": _cpu_quantity(min(4000, cpu_req)),
                         "memory": _memory_quantity(min(8 * 1024, mem_req))},
            "limits": {"cpu": "16", "memory": "16Gi"}}


def _stage_container(spec: JobSpec, name: str, uri: str, dest: str, labels: str = "") -> dict:
    # outside a terminal dcv2 stage logs one progress line every 30 s: kubectl logs -c stage-data shows it
    args = ["stage", uri, dest, "--workers", "32", "--log-every", "30"] + (["--labels", labels] if labels else [])
    return {"name": name, "image": spec.image, "command": ["dcv2"], "args": args,
            "envFrom": [{"secretRef": {"name": SECRET}}], "env": [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
            "resources": _stage_resources(spec),
            "securityContext": _restricted_security_context()}


def rendezvous_env(name: str) -> list[dict]:
    """torchrun's rendezvous, read by torchrun from PET_* variables: c10d, hosted by worker 0's torchrun on the
    operator's port, reached through the Service the operator creates for every replica (``<job>-worker-0``).
    The operator itself adds ``PET_NNODES`` (the number of replicas) and ``PET_NPROC_PER_NODE``
    (``spec.nprocPerNode``) and, because the job has no Master, no ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``
    (pkg/controller.v1/pytorch/envvar.go)."""
    return [{"name": "PET_RDZV_BACKEND", "value": "c10d"},
            {"name": "PET_RDZV_ENDPOINT", "value": f"{PYTORCHJOB.pod(name, 0)}:{RDZV_PORT}"},
            {"name": "PET_RDZV_ID", "value": name}]


def pod_template(spec: JobSpec) -> dict:
    env = [*rendezvous_env(spec.name),
           {"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
           {"name": "OMP_NUM_THREADS", "value": "8"}, {"name": "HOME", "value": "/tmp"}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "data", "mountPath": "/data"},
              {"name": "tmp", "mountPath": "/tmp"}]
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": APP, "app.kubernetes.io/part-of": "dcv2-k8s"},
                     "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 120,
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "initContainers": [_stage_container(spec, "stage-data", spec.data_uri, TRAIN_DIR)] +
                              ([_stage_container(spec, "stage-val", spec.val_uri, VAL_DIR, spec.val_labels)]
                               if spec.val_uri else []),
            "containers": [{
                "name": PYTORCHJOB.container, "image": spec.image, "imagePullPolicy": "IfNotPresent",
                # dcv2 stays the container's main process (the one the kubelet signals) and starts torchrun, which
                # reads nnodes, nproc-per-node and the rendezvous from the PET_* variables and gives each process
                # its RANK/LOCAL_RANK/WORLD_SIZE; dcv2 turns the processes' exit codes into the container's
                # (dcv2_k8s/exitcodes.py: < 128 fails the job, >= 128 restarts the pod)
                "command": ["dcv2"],
                "args": dcv2_args(spec),
                "ports": [{"name": "pytorchjob-port", "containerPort": RDZV_PORT, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                "envFrom": [{"secretRef": {"name": SECRET}}], "env": env,
                "resources": _resources(spec.gpus_per_node, spec.cpu_per_gpu, spec.memory_gib_per_gpu,
                                        spec.scratch_gib),
                "volumeMounts": mounts,
                "securityContext": _restricted_security_context()}],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(spec)}},
                        {"name": "data", "emptyDir": {"sizeLimit": f"{DATA_SIZE_LIMIT}Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": f"{TMP_SIZE_LIMIT}Gi"}}]}}


def pytorchjob(spec: JobSpec) -> dict:
    """The PyTorchJob of ``spec``: Worker replicas only.

    - No Master: with a Master the operator adds an ``init-pytorch`` container (image ``alpine:3.10``, no
      securityContext) to every Worker (pkg/controller.v1/pytorch/initcontainer.go, "There is no need to set init
      container if no master is specified"), which Pod Security "restricted" rejects and an air-gapped cluster
      cannot pull. Rank 0 runs on worker 0; the job succeeds when every worker has (pytorchjob_controller.go).
    - ``restartPolicy: ExitCode``: the operator recreates a pod that exited with a code >= 128 (preempted, lost
      peer) and fails the job at once on any other code (a config mistake): pkg/controller.v1/common/pod.go.
    - ``backoffLimit`` = RESTART_INCIDENTS x pods: the operator compares it with the sum of container restarts
      over all running pods (pkg/core/job.go ``PastBackoffLimit``), and one incident restarts every pod. With
      ExitCode the pods are recreated rather than restarted in place, so v1.9 does not count them there: the run's
      hard limit is ``activeDeadlineSeconds`` (docs/kubernetes.md, "Restarts and exit codes").
    """
    tpl = pod_template(spec)
    if spec.image_pull_secrets:
        tpl["spec"]["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    replicas = {"Worker": {"replicas": spec.nodes, "restartPolicy": "ExitCode", "template": tpl}}
    run_policy = {"cleanPodPolicy": "Running", "backoffLimit": RESTART_INCIDENTS * spec.nodes,
                  "ttlSecondsAfterFinished": 604800}
    if spec.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = int(spec.active_deadline_seconds)
    return {"apiVersion": PYTORCHJOB.api_version, "kind": PYTORCHJOB.kind,
            "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/name": APP,
                                                       "app.kubernetes.io/part-of": "dcv2-k8s"}},
            "spec": {"nprocPerNode": str(spec.gpus_per_node), "runPolicy": run_policy,
                     "pytorchReplicaSpecs": replicas}}


G = "+config/pretrain/deepcluster_v2"
JOBS = [
    JobSpec("dcv2-r50", description="ResNet-50, 2 x 224 crops, 2 nodes x 8 GPUs (global batch 1024)"),
    JobSpec("dcv2-r50-32gpu", nodes=4, description="ResNet-50, 2 x 224 crops, 4 nodes x 8 GPUs"),
    JobSpec("dcv2-r50-1gpu", nodes=1, gpus_per_node=1, description="ResNet-50 on one GPU (one worker)",
            overrides=["config.LOSS.deepclusterv2_loss.num_clusters=[3000]"]),
    JobSpec("dcv2-r101", overrides=[f"{G}/models=resnet101"], description="ResNet-101, 2 nodes x 8 GPUs"),
    JobSpec("dcv2-r50w2", overrides=[f"{G}/models=resnet50_w2"], description="ResNet-50-w2, 2 nodes x 8 GPUs"),
    JobSpec("dcv2-r50-mc-2x160-4x96", overrides=[f"{G}/transforms=multicrop_2x160_4x96"],
            description="ResNet-50, multi-crop 2 x 160 + 4 x 96"),
    JobSpec("dcv2-r50-mc-2x224-6x96", overrides=[f"{G}/transforms=multicrop_2x224_6x96"],
            description="ResNet-50, multi-crop 2 x 224 + 6 x 96"),
    JobSpec("dcv2-r50-linear-eval", nodes=1, command="linear-eval", val_uri="s3://datasets/imagenet/val",
            config="benchmark/linear_image_classification/imagenet1k/eval_resnet_swav_in1k_linear",
            overrides=["config.MODEL.WEIGHTS_INIT.PARAMS_FILE=s3://dcv2-checkpoints/dcv2-r50"],
            checkpoint_uri="s3://dcv2-checkpoints/dcv2-r50-linear-eval",
            description="Linear evaluation (swav reference protocol) of the dcv2-r50 run, 1 node x 8 GPUs"),
]


# ------------------------------------------------------------------------------------ Kubeflow Trainer v2
RUNTIME = "dcv2-torch"


def trainjob(spec: JobSpec) -> dict:
    """The TrainJob of ``spec`` (Trainer v2.3), on our TrainingRuntime ``dcv2-torch``: the same command, image,
    resources and environment as the PyTorchJob; Trainer's torch plugin injects PET_NNODES, PET_NPROC_PER_NODE,
    PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT (pkg/runtime/framework/plugins/torch/torch.go)."""
    env = [e for e in pod_template(spec)["spec"]["containers"][0]["env"] if not e["name"].startswith("PET_")]
    job = {"apiVersion": TRAINJOB.api_version, "kind": TRAINJOB.kind,
           "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/name": APP,
                                                      "app.kubernetes.io/part-of": "dcv2-k8s"}},
           "spec": {"runtimeRef": {"apiGroup": TRAINJOB.group, "kind": "TrainingRuntime", "name": RUNTIME},
                    "trainer": {"image": spec.image, "command": ["dcv2"], "args": dcv2_args(spec, stages_itself=True),
                                "numNodes": spec.nodes, "numProcPerNode": spec.gpus_per_node,
                                "resourcesPerNode": _resources(spec.gpus_per_node, spec.cpu_per_gpu,
                                                               spec.memory_gib_per_gpu, spec.scratch_gib),
                                "env": env}}}
    if spec.active_deadline_seconds:
        job["spec"]["activeDeadlineSeconds"] = int(spec.active_deadline_seconds)
    return job


def job_manifest(kind: JobKind, spec: JobSpec) -> dict:
    """The job of ``spec`` as ``kind``: a PyTorchJob, or a TrainJob on our dcv2-torch runtime."""
    return {PYTORCHJOB: pytorchjob, TRAINJOB: trainjob}[kind](spec)


def training_runtime(image: str = IMAGE, memory_gib_per_gpu: float = MEM_REQUEST_PER_GPU) -> dict:
    """Our TrainingRuntime for clusters without ``torch-distributed``, or where it does not fit: the S3 Secret,
    /dev/shm, node-local /data and /tmp, the restricted security context, the metrics port, GPU node selection, and
    the exit-code contract as a Job ``podFailurePolicy`` (dcv2_k8s/exitcodes.py: 1, 2 and 3 fail the job at once, a
    pod evicted or preempted is not counted; 143/200 are retried within ``backoffLimit``). Its /dev/shm is sized
    for one GPU at ``memory_gib_per_gpu`` (capped below half that pod's memory limit, see ``_shm_size``); the
    TrainJob's ``resourcesPerNode`` sizes the container."""
    spec = JobSpec(RUNTIME, nodes=1, gpus_per_node=1, image=image, memory_gib_per_gpu=memory_gib_per_gpu)
    pod = pod_template(spec)
    c = pod["spec"]["containers"][0]
    container = {"name": TRAINJOB.container, "image": image, "imagePullPolicy": "IfNotPresent",
                 "envFrom": c["envFrom"], "env": [{"name": "HOME", "value": "/tmp"}],
                 "ports": [p for p in c["ports"] if p["name"] == "metrics"], "volumeMounts": c["volumeMounts"],
                 "securityContext": c["securityContext"]}
    pod_spec = {k: v for k, v in pod["spec"].items() if k not in ("initContainers", "containers")}
    pod_spec.update(containers=[container], restartPolicy="Never")
    job_spec = {"backoffLimit": RESTART_INCIDENTS,
                "podFailurePolicy": {"rules": [
                    {"action": "FailJob", "onExitCodes": {"containerName": TRAINJOB.container, "operator": "In",
                                                          "values": [ERROR, USAGE, FENCED]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
                "template": {"metadata": pod["metadata"], "spec": pod_spec}}
    # a TrainingRuntime is in the TrainJob's API group and version
    return {"apiVersion": TRAINJOB.api_version, "kind": "TrainingRuntime",
            "metadata": {"name": RUNTIME, "labels": {"trainer.kubeflow.org/framework": "torch",
                                                     "app.kubernetes.io/part-of": "dcv2-k8s"}},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {}},
                     "template": {"spec": {"replicatedJobs": [
                         {"name": "node", "template": {
                             "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                             "spec": job_spec}}]}}}}


def secret_example() -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
            "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": "http://seaweedfs.kubeflow:8333",
                           "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                           "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}}


def rbac() -> list[dict]:
    """The launcher's rights: every kind of job it runs (create, watch, delete) and their pods' logs."""
    name = "dcv2-launcher"
    jobs = [rule for k in KINDS.values() for rule in (
        {"apiGroups": [k.group], "resources": [k.plural],
         "verbs": ["create", "get", "list", "watch", "delete", "patch"]},
        {"apiGroups": [k.group], "resources": [f"{k.plural}/status"], "verbs": ["get"]})]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
         "rules": jobs + [{"apiGroups": [""], "resources": ["pods", "pods/log", "events"],
                           "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name},
                      {"kind": "ServiceAccount", "name": "pipeline-runner"},
                      {"kind": "ServiceAccount", "name": "default-editor"}]},
    ]


HEADER = "# Rendered by `python -m dcv2_k8s.k8s.manifests manifests/` from dcv2_k8s/k8s/manifests.py; edit that.\n"


def _dump(docs: list[dict], note: str = "") -> str:
    body = "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)
    return HEADER + (f"# {note}\n" if note else "") + body


def render(cpu_per_gpu: float = CPU_REQUEST_PER_GPU, memory_gib_per_gpu: float = MEM_REQUEST_PER_GPU,
           scratch_gib: float = STORAGE_REQUEST) -> dict[str, str]:
    """File name (relative to manifests/) -> content; every job's pods sized at ``cpu_per_gpu`` cores and
    ``memory_gib_per_gpu`` GiB per GPU and ``scratch_gib`` GiB of node-local disk (the defaults render the committed
    manifests/)."""
    jobs = [replace(j, cpu_per_gpu=cpu_per_gpu, memory_gib_per_gpu=memory_gib_per_gpu, scratch_gib=scratch_gib)
            for j in JOBS]
    files = {f"{'pytorchjob-r50.yaml' if j.name == 'dcv2-r50' else 'variants/' + j.name + '.yaml'}":
             _dump([pytorchjob(j)], j.description) for j in jobs}
    for j in jobs:
        rel = "trainjob-r50.yaml" if j.name == "dcv2-r50" else f"trainjob/{j.name}.yaml"
        files[rel] = _dump([trainjob(j)], f"Kubeflow Trainer v2 (TrainJob): {j.description}; needs "
                           "trainjob/runtime-dcv2-torch.yaml")
    files["trainjob/runtime-dcv2-torch.yaml"] = _dump([training_runtime(memory_gib_per_gpu=memory_gib_per_gpu)],
                                                      "Kubeflow Trainer v2 TrainingRuntime "
                                                      "for the dcv2 TrainJobs (apply it in their namespace)")
    files["secret-s3.example.yaml"] = _dump([secret_example()], "Placeholders only: fill in, apply, never commit "
                                            "real keys. Keys are read as environment variables (envFrom).")
    files["rbac-launcher.yaml"] = _dump(rbac(), "Least rights for a launcher (the pipeline) that creates and "
                                        "watches PyTorchJobs or TrainJobs in this namespace and reads their pods' "
                                        "logs.")
    files["kustomization.yaml"] = HEADER + yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["rbac-launcher.yaml", "pytorchjob-r50.yaml"]}, sort_keys=False)
    return files


def write(out_dir: str, cpu_per_gpu: float = CPU_REQUEST_PER_GPU,
          memory_gib_per_gpu: float = MEM_REQUEST_PER_GPU, scratch_gib: float = STORAGE_REQUEST) -> list[str]:
    out = Path(out_dir)
    written = []
    for rel, text in render(cpu_per_gpu, memory_gib_per_gpu, scratch_gib).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(str(path))
    return written


if __name__ == "__main__":
    for p in write(sys.argv[1] if len(sys.argv) > 1 else "manifests"):
        print(p)
