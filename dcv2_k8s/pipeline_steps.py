"""The work of each pipeline step, as plain functions (the KFP components in pipelines/ call these).

Launchers: ``trainjob`` (on a cluster with Kubeflow Trainer v2: TrainJobs on our ``dcv2-torch`` runtime, rendered
from the same JobSpecs), ``pytorchjob`` (on a cluster: pretraining and linear eval run as PyTorchJobs from the same
template as ``manifests/``) and ``local`` (the same commands as subprocesses on this machine, for ``make demo`` and tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from dcv2_k8s.k8s.kinds import KINDS

DEMO_EVAL = ["config.MODEL.TRUNK.RESNETS.DEPTH=18", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.5",
             "config.LINEAR_EVAL.CROP_SIZE=32", "config.LINEAR_EVAL.FEATURE_CACHE=true", "config.OPTIMIZER.num_epochs=30",
             "config.DATA.NUM_DATALOADER_WORKERS=0", "config.MACHINE.DEVICE=cpu", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]


class StepFailed(RuntimeError):
    pass


def _dcv2(args: list[str], what: str, tail: int = 40) -> None:
    """Run ``dcv2 ARGS`` streaming its output; raise with the last lines when it fails."""
    proc = subprocess.Popen([sys.executable, "-m", "dcv2_k8s", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        last = (last + [line.rstrip()])[-tail:]
    if proc.wait() != 0:
        raise StepFailed(f"{what} failed with exit code {proc.returncode}; last lines:\n" + "\n".join(last))


def stage_step(launcher: str, data_uri: str, val_uri: str, stage_root: str, val_labels: str = "") -> dict:
    """Local: stage (idempotent: a complete staged copy of the same source is reused). Cluster: verify the source
    (the PyTorchJob pods stage it to node-local disk themselves)."""
    from dcv2_k8s.data.dataset import check_splits, scan_image_folder
    from dcv2_k8s.data.stage import ensure_local, list_source

    if launcher not in ("local", *JOB_LAUNCHERS):
        raise StepFailed(f"launcher={launcher!r}: use pytorchjob (training operator), trainjob (Kubeflow Trainer v2) "
                         "or local")
    out = {"val_labels": val_labels}
    for split, uri in (("train", data_uri), ("val", val_uri)):
        if launcher == "local":
            # a step's log is not a terminal: progress comes as one line every 30 s
            path = ensure_local(uri, os.path.join(stage_root, split) if uri.startswith("s3://") else "",
                                progress=sys.stderr.isatty(), labels=val_labels if split == "val" else "")
            classes, samples = scan_image_folder(path)
            out[split] = {"uri": uri, "local": path, "classes": len(classes), "images": len(samples)}
        else:
            _, objects = list_source(uri)  # the stager's own listing: StageError (one line) when there is nothing
            out[split] = {"uri": uri, "objects": len(objects), "bytes": sum(o["Size"] for o in objects)}
    if launcher == "local":
        check_splits(out["train"]["local"], out["val"]["local"])  # the eval steps compare labels by class index
    return out


JOB_LAUNCHERS = tuple(KINDS)


def _launcher(namespace: str, launcher: str):
    from dcv2_k8s.k8s.launcher import JobLauncher

    return JobLauncher.in_cluster(namespace, kind=KINDS[launcher])


def _run_job(launcher: str, namespace: str, spec, timeout_seconds: float) -> None:
    """Render ``spec`` as the launcher's kind of job, create it (or attach to it after a retry) and wait for it."""
    from dcv2_k8s.k8s.manifests import job_manifest

    lx = _launcher(namespace, launcher)
    lx.wait(lx.launch(job_manifest(lx.kind, spec)), timeout_seconds)


def pretrain_step(launcher: str, run_id: str, config: str, overrides: list[str], output_uri: str, data: dict,
                  nodes: int, gpus_per_node: int, image: str, namespace: str, timeout_seconds: float,
                  image_pull_secrets: list[str] = (), cpu_per_gpu: float = 10.0,
                  memory_gib_per_gpu: float = 48.0, scratch_gib: float = 200.0) -> str:
    """Pretrain; return the checkpoint URI (the run's CHECKPOINT.DIR). A job's pods request ``cpu_per_gpu`` cores
    and ``memory_gib_per_gpu`` GiB per GPU and ``scratch_gib`` GiB of node-local disk (dcv2_k8s.k8s.manifests.JobSpec)."""
    from dcv2_k8s.k8s.launcher import job_name

    ckpt = f"{output_uri.rstrip('/')}/pretrain"
    if launcher == "local":
        _dcv2(["train", f"config={config}", *overrides, f"config.DATA.TRAIN.DATA_PATHS=[{data['train']['local']}]",
               f"config.DATA.TEST.DATA_PATHS=[{data['val']['local']}]", f"config.CHECKPOINT.DIR={ckpt}"],
              "pretraining")
        return ckpt
    from dcv2_k8s.k8s.manifests import JobSpec

    name = job_name(run_id, "pretrain")
    # the job's own deadline is the step's timeout: a watcher that is gone (a terminated run) cannot leave it running
    _run_job(launcher, namespace, JobSpec(name, nodes=nodes, gpus_per_node=gpus_per_node, config=config,
                                          overrides=list(overrides), data_uri=data["train"]["uri"],
                                          checkpoint_uri=ckpt, image=image,
                                          active_deadline_seconds=int(timeout_seconds),
                                          image_pull_secrets=list(image_pull_secrets), cpu_per_gpu=cpu_per_gpu,
                                          memory_gib_per_gpu=memory_gib_per_gpu, scratch_gib=scratch_gib),
             timeout_seconds)
    return ckpt


def linear_eval_step(launcher: str, run_id: str, weights: str, preset: str, overrides: list[str], output_uri: str,
                     data: dict, gpus: int, image: str, namespace: str, timeout_seconds: float, tag: str,
                     image_pull_secrets: list[str] = (), cpu_per_gpu: float = 10.0,
                     memory_gib_per_gpu: float = 48.0, scratch_gib: float = 200.0) -> dict:
    """Linear evaluation of ``weights`` ("" = random-init baseline); returns the result JSON. A job's pods request
    ``cpu_per_gpu`` cores and ``memory_gib_per_gpu`` GiB per GPU and ``scratch_gib`` GiB of node-local disk."""
    from dcv2_k8s.storage import read_bytes

    out = f"{output_uri.rstrip('/')}/linear_eval_{tag}.json"
    tokens = [f"config={preset}", *overrides, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}",
              f"config.LINEAR_EVAL.OUTPUT={out}"]
    if launcher == "local":
        _dcv2(["linear-eval", *tokens, f"config.DATA.TRAIN.DATA_PATHS=[{data['train']['local']}]",
               f"config.DATA.TEST.DATA_PATHS=[{data['val']['local']}]"], f"linear evaluation ({tag})")
    else:
        from dcv2_k8s.k8s.launcher import job_name
        from dcv2_k8s.k8s.manifests import JobSpec

        name = job_name(run_id, f"eval-{tag}")
        _run_job(launcher, namespace, JobSpec(name, nodes=1, gpus_per_node=gpus, command="linear-eval",
                                              config=preset, overrides=tokens[1:], data_uri=data["train"]["uri"],
                                              val_uri=data["val"]["uri"], val_labels=data.get("val_labels", ""),
                                              checkpoint_uri=f"{output_uri.rstrip('/')}/eval-{tag}", image=image,
                                              active_deadline_seconds=int(timeout_seconds),
                                              image_pull_secrets=list(image_pull_secrets),
                                              cpu_per_gpu=cpu_per_gpu, memory_gib_per_gpu=memory_gib_per_gpu,
                                              scratch_gib=scratch_gib),
                     timeout_seconds)
    return json.loads(read_bytes(out))


def export_model(ckpt_uri: str, model_dir: str) -> dict:
    """The pipeline's ``Model`` artifact: the trained weights and a model card, written under ``model_dir`` (the
    artifact's own local path, which the KFP launcher uploads under the pipeline root). The checkpoint itself stays
    where training wrote it; its URI is in the card and in the artifact's metadata.

    Weights: the torchvision layout (``torchvision.models.resnetN()`` loads them strictly) when the trunk has a
    torchvision twin, otherwise the swav / VISSL model-zoo layout (wide ResNets, ResNeXt)."""
    from dcv2_k8s.checkpoint import to_bytes
    from dcv2_k8s.config import config_from_checkpoint
    from dcv2_k8s.model.head import build_head
    from dcv2_k8s.weights import WeightsError, export_swav, export_torchvision, input_view, read_file

    obj = read_file(ckpt_uri)
    cfg = config_from_checkpoint(obj).cfg
    trunk = cfg.MODEL.TRUNK.RESNETS
    try:
        weights, fmt = export_torchvision(obj, trunk.DEPTH), "torchvision"
    except WeightsError:
        weights, fmt = export_swav(obj, build_head(cfg.MODEL.HEAD)), "swav"
    os.makedirs(model_dir, exist_ok=True)
    name = f"weights_{fmt}.pth"
    with open(os.path.join(model_dir, name), "wb") as f:
        f.write(to_bytes(weights))
    card = {"checkpoint": ckpt_uri, "format": fmt, "weights": name, "depth": trunk.DEPTH,
            "width_multiplier": trunk.WIDTH_MULTIPLIER, "epoch": obj.get("train_state", {}).get("epoch"),
            "global_step": obj.get("train_state", {}).get("global_step"),
            "load": (f"torchvision.models.resnet{trunk.DEPTH}().load_state_dict(torch.load('{name}'))"
                     if fmt == "torchvision" else f"dcv2 import / swav layout: {name}"),
            **input_view(cfg)}  # input_norm / preprocess, when the run used them
    with open(os.path.join(model_dir, "model_card.json"), "w") as f:
        json.dump(card, f, indent=2)
    return card


def report_step(ckpt_uri: str, result: dict, baseline: dict | None, html_path: str, started: float) -> dict:
    """Figures for the Metrics artifact; the HTML report of the run's logged metrics at ``html_path``."""
    import shutil
    import tempfile

    from dcv2_k8s.report import render

    with tempfile.TemporaryDirectory() as tmp:
        page = render(ckpt_uri, tmp)
        shutil.copyfile(page, html_path)
    figures = {"top1": result["top1"], "top5": result["top5"], "linear_eval_epochs": result["epochs"],
               "wall_time_seconds": time.time() - started}
    if baseline is not None:
        figures["baseline_random_init_top1"] = baseline["top1"]
        figures["margin_top1"] = result["top1"] - baseline["top1"]
    return figures


# PipelineTaskFinalStatus.state as the exit handler receives it. On a KFP backend it is the MLMD execution state
# of the ExitHandler's task group (backend/src/v2/driver/resolve.go: ``producer.GetExecution().GetLastKnownState()
# .String()``: UNKNOWN, NEW, RUNNING, COMPLETE, FAILED, CACHED, CANCELED); kfp.local passes SUCCEEDED or FAILED
# (kfp/local/orchestrator). Only states that mean "failed" or "cancelled" delete jobs: a state we do not know
# (a new backend's word for success) keeps the job and its logs.
CLEANUP_STATES = frozenset({"FAILED", "FAILURE", "CANCELED", "CANCELLED", "CANCELING", "CANCELLING", "ERROR",
                            "SYSTEM_ERROR"})


def should_clean_up(state: str) -> bool:
    return str(state).strip().upper() in CLEANUP_STATES


def cleanup_step(launcher: str, run_id: str, namespace: str, state: str) -> list[str]:
    """Delete the run's jobs (PyTorchJobs or TrainJobs) when the run failed or was cancelled (no GPUs left behind);
    a successful run (COMPLETE on a backend, SUCCEEDED in kfp.local) or an unknown state keeps them, with their
    logs."""
    if launcher not in JOB_LAUNCHERS or not should_clean_up(state):
        return []
    from dcv2_k8s.k8s.launcher import job_name

    lx = _launcher(namespace, launcher)
    return [n for n in (job_name(run_id, s) for s in ("pretrain", "eval-trained", "eval-baseline")) if lx.delete(n)]
