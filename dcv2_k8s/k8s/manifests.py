"""The Kubernetes manifests of dcv2-k8s, rendered from one source.

``python -m dcv2_k8s.k8s.manifests manifests/`` rewrites every file; a test fails when a committed file differs
from what this module renders, so variants cannot drift apart. Each PyTorchJob is the same template with its
parameters applied (the pipeline's launcher uses this template too).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

IMAGE = "registry.example.com/dcv2/dcv2-k8s:0.1.0"  # replace with the image you pushed
SECRET = "dcv2-s3"
APP = "dcv2-trainer"
BASE_PRESET = "pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"
METRICS_PORT = 8000
UID = 1000


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


def _restricted_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": UID, "runAsGroup": UID, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _resources(gpus: int) -> dict:
    cpu, mem = 12 * gpus, 96 * gpus
    return {"requests": {"cpu": str(cpu - 2 * gpus), "memory": f"{mem - 16 * gpus}Gi", "nvidia.com/gpu": str(gpus)},
            "limits": {"cpu": str(cpu), "memory": f"{mem}Gi", "nvidia.com/gpu": str(gpus)}}


def dcv2_args(spec: JobSpec) -> list[str]:
    ckpt = spec.checkpoint_uri or f"s3://dcv2-checkpoints/{spec.name}"
    val = ["config.DATA.TEST.DATA_PATHS=[/data/val]"] if spec.val_uri else []
    return [spec.command, f"config={spec.config}", *spec.overrides, "config.DATA.TRAIN.DATA_PATHS=[/data/train]",
            *val, f"config.CHECKPOINT.DIR={ckpt}", "config.METRICS.ENABLED=true", f"config.METRICS.PORT={METRICS_PORT}",
            f"config.RUN_NAME={spec.name}", "config.DATA.NUM_DATALOADER_WORKERS=10"]


def _stage_container(spec: JobSpec, name: str, uri: str, dest: str) -> dict:
    return {"name": name, "image": spec.image, "command": ["dcv2"], "args": ["stage", uri, dest, "--workers", "32"],
            "envFrom": [{"secretRef": {"name": SECRET}}], "env": [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
            "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "16", "memory": "16Gi"}},
            "securityContext": _restricted_security_context()}


def pod_template(spec: JobSpec) -> dict:
    env = [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
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
            "initContainers": [_stage_container(spec, "stage-data", spec.data_uri, "/data/train")] +
                              ([_stage_container(spec, "stage-val", spec.val_uri, "/data/val")] if spec.val_uri else []),
            "containers": [{
                "name": "pytorch", "image": spec.image, "imagePullPolicy": "IfNotPresent",
                "command": ["torchrun"],
                # nnodes, node rank, nproc-per-node, master address and port come from the PET_* variables
                # the training operator injects; torchrun gives each process its RANK/LOCAL_RANK/WORLD_SIZE
                "args": ["--no-python", "--max-restarts=0", "dcv2", *dcv2_args(spec)],
                "ports": [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                "envFrom": [{"secretRef": {"name": SECRET}}], "env": env,
                "resources": _resources(spec.gpus_per_node), "volumeMounts": mounts,
                "securityContext": _restricted_security_context()}],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{8 * spec.gpus_per_node}Gi"}},
                        {"name": "data", "emptyDir": {"sizeLimit": "400Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}]}}


def pytorchjob(spec: JobSpec) -> dict:
    tpl = pod_template(spec)
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": tpl}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "OnFailure", "template": copy.deepcopy(tpl)}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/name": APP,
                                                       "app.kubernetes.io/part-of": "dcv2-k8s"}},
            "spec": {"nprocPerNode": str(spec.gpus_per_node),
                     "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 6, "ttlSecondsAfterFinished": 604800},
                     "pytorchReplicaSpecs": replicas}}


G = "+config/pretrain/deepcluster_v2"
JOBS = [
    JobSpec("dcv2-r50", description="ResNet-50, 2 x 224 crops, 2 nodes x 8 GPUs (global batch 1024)"),
    JobSpec("dcv2-r50-32gpu", nodes=4, description="ResNet-50, 2 x 224 crops, 4 nodes x 8 GPUs"),
    JobSpec("dcv2-r50-1gpu", nodes=1, gpus_per_node=1, description="ResNet-50 on one GPU (Master only)",
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


def secret_example() -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
            "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": "http://seaweedfs.kubeflow:8333",
                           "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                           "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}}


def rbac() -> list[dict]:
    name = "dcv2-launcher"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
         "rules": [{"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"],
                    "verbs": ["create", "get", "list", "watch", "delete", "patch"]},
                   {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs/status"], "verbs": ["get"]},
                   {"apiGroups": [""], "resources": ["pods", "pods/log", "events"], "verbs": ["get", "list", "watch"]}]},
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


def render() -> dict[str, str]:
    """File name (relative to manifests/) -> content."""
    files = {f"{'pytorchjob-r50.yaml' if j.name == 'dcv2-r50' else 'variants/' + j.name + '.yaml'}":
             _dump([pytorchjob(j)], j.description) for j in JOBS}
    files["secret-s3.example.yaml"] = _dump([secret_example()], "Placeholders only: fill in, apply, never commit "
                                            "real keys. Keys are read as environment variables (envFrom).")
    files["rbac-launcher.yaml"] = _dump(rbac(), "Least rights for a launcher (the pipeline) that creates and "
                                        "watches PyTorchJobs in this namespace and reads their pods' logs.")
    files["kustomization.yaml"] = HEADER + yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["rbac-launcher.yaml", "pytorchjob-r50.yaml"]}, sort_keys=False)
    return files


def write(out_dir: str) -> list[str]:
    out = Path(out_dir)
    written = []
    for rel, text in render().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(str(path))
    return written


if __name__ == "__main__":
    for p in write(sys.argv[1] if len(sys.argv) > 1 else "manifests"):
        print(p)
