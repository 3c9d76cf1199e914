"""The DeepClusterV2 Kubeflow Pipeline: stage -> pretrain -> linear eval (+ random-init baseline) -> report.

Compile (the committed pipelines/dcv2_pipeline.yaml must equal this; a test checks it):
    python pipelines/dcv2_pipeline.py pipelines/dcv2_pipeline.yaml
Upload the YAML in the Kubeflow Pipelines UI. ``launcher=pytorchjob`` runs pretraining and linear evaluation as
PyTorchJobs (the step pods only launch and watch them; GPUs are requested by the PyTorchJob template);
``launcher=local`` runs them inside the step pods instead, which is what ``make demo`` runs through ``kfp.local``
(on a cluster that mode needs GPU nodes: set ``gpu_node_selector``; the steps tolerate the GPU taint).
"""


import sys

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Dataset, Metrics, Model, Output

from dcv2_k8s.k8s.manifests import IMAGE, SECRET

S3_KEYS = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3",
           "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def stage(launcher: str, data_uri: str, val_uri: str, dataset: Output[Dataset]) -> str:
    """Stage (local) or verify (pytorchjob) the train and val splits."""
    import json
    import os
    import time

    from dcv2_k8s.pipeline_steps import stage_step

    started = time.time()
    info = stage_step(launcher, data_uri, val_uri, os.path.join(os.path.dirname(dataset.path), "staged"))
    info["started"] = started
    with open(dataset.path, "w") as f:
        json.dump(info, f)
    dataset.metadata.update({"train": data_uri, "val": val_uri})
    return json.dumps(info)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(launcher: str, run_id: str, config: str, overrides: list, output_uri: str, data: str, nodes: int,
             gpus_per_node: int, image: str, namespace: str, timeout_seconds: float, model: Output[Model]) -> str:
    """DCv2 pretraining; returns the checkpoint URI."""
    import json

    from dcv2_k8s.pipeline_steps import pretrain_step

    ckpt = pretrain_step(launcher, run_id, config, overrides, output_uri, json.loads(data), nodes, gpus_per_node,
                         image, namespace, timeout_seconds)
    model.metadata.update({"checkpoint": ckpt, "config": config})
    with open(model.path, "w") as f:
        f.write(ckpt)
    return ckpt


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def linear_eval(launcher: str, run_id: str, weights: str, enabled: bool, preset: str, overrides: list,
                output_uri: str, data: str, gpus: int, image: str, namespace: str, timeout_seconds: float,
                tag: str) -> str:
    """Linear evaluation of the weights ("" = random-init baseline); returns the result JSON ("{}" if disabled)."""
    import json

    from dcv2_k8s.pipeline_steps import linear_eval_step

    if not enabled:
        return "{}"
    res = linear_eval_step(launcher, run_id, weights, preset, overrides, output_uri, json.loads(data), gpus, image,
                           namespace, timeout_seconds, tag)
    return json.dumps({k: v for k, v in res.items() if k != "history"})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(checkpoint: str, result: str, baseline: str, data: str, metrics: Output[Metrics], html: Output[HTML],
           model: Output[Model]):
    """Metrics (top-1, top-5, epochs, wall time), the HTML report of the run, and the Model (the checkpoint)."""
    import json

    from dcv2_k8s.pipeline_steps import report_step

    base = json.loads(baseline) or None
    figures = report_step(checkpoint, json.loads(result), base, html.path, json.loads(data)["started"])
    for k, v in figures.items():
        metrics.log_metric(k, float(v))
    model.uri = checkpoint
    model.metadata.update({"top1": figures["top1"], "top5": figures["top5"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cleanup(launcher: str, run_id: str, namespace: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: delete the run's PyTorchJobs when the run failed or was cancelled."""
    from dcv2_k8s.pipeline_steps import cleanup_step

    deleted = cleanup_step(launcher, run_id, namespace, status.state)
    print(f"run {status.state}: deleted {deleted or 'nothing'}")
    return ",".join(deleted)


def _pod_settings(task, gpu_node_selector: dict, shm: bool) -> None:
    kubernetes.use_secret_as_env(task, secret_name=SECRET, secret_key_to_env={k: k for k in S3_KEYS}, optional=True)
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    kubernetes.add_node_selector_json(task, node_selector_json=gpu_node_selector)
    if shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="16Gi")


@dsl.pipeline(name="dcv2-pretrain-eval",
              description="DeepClusterV2: stage ImageNet from S3, pretrain (PyTorchJob), checkpoint to S3, "
                          "linear eval, report")
def dcv2_pipeline(
    data_uri: str = "s3://datasets/imagenet/train",
    val_uri: str = "s3://datasets/imagenet/val",
    output_uri: str = "s3://dcv2-runs/r50",
    config: str = "pretrain/deepcluster_v2/deepclusterv2_2crops_resnet",
    overrides: list = [],
    nodes: int = 2,
    gpus_per_node: int = 8,
    image: str = IMAGE,
    namespace: str = "kubeflow",
    eval_preset: str = "benchmark/linear_image_classification/imagenet1k/eval_resnet_swav_in1k_linear",
    eval_overrides: list = [],
    eval_gpus: int = 8,
    baseline: bool = False,
    launcher: str = "pytorchjob",
    gpu_node_selector: dict = {},
    pretrain_timeout_seconds: float = 7 * 24 * 3600,
    eval_timeout_seconds: float = 2 * 24 * 3600,
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    done = cleanup(launcher=launcher, run_id=run_id, namespace=namespace)
    with dsl.ExitHandler(done):
        st = stage(launcher=launcher, data_uri=data_uri, val_uri=val_uri).set_display_name("stage / verify data")
        st.set_retry(num_retries=3, backoff_duration="30s")
        pt = pretrain(launcher=launcher, run_id=run_id, config=config, overrides=overrides, output_uri=output_uri,
                      data=st.outputs["Output"], nodes=nodes, gpus_per_node=gpus_per_node, image=image,
                      namespace=namespace, timeout_seconds=pretrain_timeout_seconds).set_display_name("pretrain")
        pt.set_caching_options(False)
        evals = {}
        for tag, weights, enabled in (("trained", pt.outputs["Output"], True), ("baseline", "", baseline)):
            ev = linear_eval(launcher=launcher, run_id=run_id, weights=weights, enabled=enabled, preset=eval_preset,
                             overrides=eval_overrides, output_uri=output_uri, data=st.outputs["Output"], gpus=eval_gpus,
                             image=image, namespace=namespace, timeout_seconds=eval_timeout_seconds, tag=tag)
            ev.set_display_name(f"linear eval ({tag})").set_caching_options(False)
            _pod_settings(ev, gpu_node_selector, shm=True)
            evals[tag] = ev
        rp = report(checkpoint=pt.outputs["Output"], result=evals["trained"].outputs["Output"],
                    baseline=evals["baseline"].outputs["Output"], data=st.outputs["Output"]).set_display_name("report")
        rp.set_retry(num_retries=2)
        for task in (st, rp):
            kubernetes.use_secret_as_env(task, secret_name=SECRET, secret_key_to_env={k: k for k in S3_KEYS},
                                         optional=True)
        _pod_settings(pt, gpu_node_selector, shm=True)
    kubernetes.use_secret_as_env(done, secret_name=SECRET, secret_key_to_env={k: k for k in S3_KEYS}, optional=True)


def compile_to(path: str) -> None:
    compiler.Compiler().compile(dcv2_pipeline, package_path=path)


if __name__ == "__main__":
    compile_to(sys.argv[1] if len(sys.argv) > 1 else "pipelines/dcv2_pipeline.yaml")
