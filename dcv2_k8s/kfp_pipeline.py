"""The DeepClusterV2 Kubeflow Pipeline: stage -> pretrain -> linear eval (+ random-init baseline) -> report.

Build it for your image (every step pod runs that image; the PyTorchJobs default to it too):
    python pipelines/dcv2_pipeline.py my-pipeline.yaml --image REGISTRY/dcv2-k8s:TAG [--image-pull-secret NAME]
The committed ``pipelines/dcv2_pipeline.yaml`` is the same with the placeholder image (a test checks it is current).
Upload the YAML in the Kubeflow Pipelines UI (backend 2.15 or newer). ``launcher=pytorchjob`` runs pretraining and
linear evaluation as PyTorchJobs (the step pods only launch and watch them; GPUs are requested by the PyTorchJob
template), ``launcher=trainjob`` as Kubeflow Trainer v2 TrainJobs on our ``dcv2-torch`` TrainingRuntime (apply
``manifests/trainjob/runtime-dcv2-torch.yaml`` in the namespace first); ``launcher=local`` runs them inside the step pods instead, which is what ``make demo`` runs through
``kfp.local`` (on a cluster that mode needs GPU nodes: set ``gpu_node_selector``; the steps tolerate the GPU taint).
"""


import argparse

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Dataset, Metrics, Model, Output

from dcv2_k8s.k8s.manifests import IMAGE, SECRET

S3_KEYS = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3",
           "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"]
# the watcher steps (pretrain, eval) are retried when their pod is lost (eviction, node drain): the job name is
# derived from the run, so a retry re-attaches to the running PyTorchJob instead of starting another
WATCHER_RETRIES, WATCHER_BACKOFF = 4, "30s"


def stage(launcher: str, data_uri: str, val_uri: str, val_labels: str, dataset: Output[Dataset]) -> str:
    """Stage (local) or verify (pytorchjob) the train and val splits."""
    import json
    import os
    import time

    from dcv2_k8s.pipeline_steps import stage_step

    started = time.time()
    info = stage_step(launcher, data_uri, val_uri, os.path.join(os.path.dirname(dataset.path), "staged"),
                      val_labels)
    info["started"] = started
    with open(dataset.path, "w") as f:
        json.dump(info, f)
    dataset.metadata.update({"train": data_uri, "val": val_uri})
    return json.dumps(info)


def pretrain(launcher: str, run_id: str, config: str, overrides: list, output_uri: str, data: str, nodes: int,
             gpus_per_node: int, image: str, image_pull_secrets: list, namespace: str,
             timeout_seconds: float, cpu_per_gpu: float, memory_gib_per_gpu: float, scratch_gib: float) -> str:
    """DCv2 pretraining; returns the checkpoint URI."""
    import json

    from dcv2_k8s.pipeline_steps import pretrain_step

    return pretrain_step(launcher, run_id, config, overrides, output_uri, json.loads(data), nodes, gpus_per_node,
                         image, namespace, timeout_seconds, image_pull_secrets, cpu_per_gpu=cpu_per_gpu,
                         memory_gib_per_gpu=memory_gib_per_gpu, scratch_gib=scratch_gib)


def linear_eval(launcher: str, run_id: str, weights: str, enabled: bool, preset: str, overrides: list,
                output_uri: str, data: str, gpus: int, image: str, image_pull_secrets: list, namespace: str,
                timeout_seconds: float, tag: str, cpu_per_gpu: float, memory_gib_per_gpu: float,
                scratch_gib: float) -> str:
    """Linear evaluation of the weights ("" = random-init baseline); returns the result JSON ("{}" if disabled)."""
    import json

    from dcv2_k8s.pipeline_steps import linear_eval_step

    if not enabled:
        return "{}"
    res = linear_eval_step(launcher, run_id, weights, preset, overrides, output_uri, json.loads(data), gpus, image,
                           namespace, timeout_seconds, tag, image_pull_secrets, cpu_per_gpu=cpu_per_gpu,
                           memory_gib_per_gpu=memory_gib_per_gpu, scratch_gib=scratch_gib)
    return json.dumps({k: v for k, v in res.items() if k != "history"})


def report(checkpoint: str, result: str, baseline: str, data: str, metrics: Output[Metrics], html: Output[HTML],
           model: Output[Model]):
    """Metrics (top-1, top-5, epochs, wall time), the HTML report of the run, and the Model: the exported weights
    and a model card written under the artifact's own path (the backend uploads it under the pipeline root and
    refuses any other URI); the checkpoint's s3:// URI is in the card and in the metadata."""
    import json

    from dcv2_k8s.pipeline_steps import export_model, report_step

    base = json.loads(baseline) or None
    figures = report_step(checkpoint, json.loads(result), base, html.path, json.loads(data)["started"])
    for k, v in figures.items():
        metrics.log_metric(k, float(v))
    card = export_model(checkpoint, model.path)
    model.metadata.update({"checkpoint": checkpoint, "format": card["format"], "top1": figures["top1"],
                           "top5": figures["top5"]})


def cleanup(launcher: str, run_id: str, namespace: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: delete the run's PyTorchJobs when the run failed or was cancelled (a successful run keeps
    them, and their logs, until the jobs' ttlSecondsAfterFinished)."""
    from dcv2_k8s.pipeline_steps import cleanup_step

    deleted = cleanup_step(launcher, run_id, namespace, status.state)
    print(f"run {status.state}: deleted {deleted or 'nothing'}")
    return ",".join(deleted)


def _pod_settings(task, gpu_node_selector: dict, shm: bool) -> None:
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    kubernetes.add_node_selector_json(task, node_selector_json=gpu_node_selector)
    if shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="16Gi")


def build_pipeline(image: str = IMAGE, image_pull_secrets: tuple = ()):
    """The pipeline with every step running ``image`` (pulled with ``image_pull_secrets``). A component's image is
    fixed when the pipeline is compiled, so this is how a pipeline for another image is made."""
    def component(fn):
        return dsl.component(fn, base_image=image, install_kfp_package=False)

    c_stage, c_pretrain, c_eval, c_report, c_cleanup = map(component, (stage, pretrain, linear_eval, report, cleanup))
    pull = list(image_pull_secrets)

    def settings(task):
        kubernetes.use_secret_as_env(task, secret_name=SECRET, secret_key_to_env={k: k for k in S3_KEYS},
                                     optional=True)
        if pull:
            kubernetes.set_image_pull_secrets(task, pull)
        return task

    @dsl.pipeline(name="dcv2-pretrain-eval",
                  description="DeepClusterV2: stage ImageNet from S3, pretrain (PyTorchJob), checkpoint to S3, "
                              "linear eval, report")
    def dcv2_pipeline(
        data_uri: str = "s3://datasets/imagenet/train",
        val_uri: str = "s3://datasets/imagenet/val",
        val_labels: str = "",
        output_uri: str = "s3://dcv2-runs/r50",
        config: str = "pretrain/deepcluster_v2/deepclusterv2_2crops_resnet",
        overrides: list = [],
        nodes: int = 2,
        gpus_per_node: int = 8,
        image: str = image,
        image_pull_secrets: list = pull,
        namespace: str = "",
        eval_preset: str = "benchmark/linear_image_classification/imagenet1k/eval_resnet_swav_in1k_linear",
        eval_overrides: list = [],
        eval_gpus: int = 8,
        baseline: bool = False,
        launcher: str = "pytorchjob",
        gpu_node_selector: dict = {},
        pretrain_timeout_seconds: float = 7 * 24 * 3600,
        eval_timeout_seconds: float = 2 * 24 * 3600,
        cpu_per_gpu: float = 10.0,
        memory_gib_per_gpu: float = 48.0,
        scratch_gib: float = 200.0,
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        done = settings(c_cleanup(launcher=launcher, run_id=run_id, namespace=namespace))
        with dsl.ExitHandler(done):
            st = settings(c_stage(launcher=launcher, data_uri=data_uri, val_uri=val_uri, val_labels=val_labels))
            st.set_display_name("stage / verify data").set_caching_options(False)  # its start time is the run's
            st.set_retry(num_retries=3, backoff_duration="30s")
            pt = settings(c_pretrain(launcher=launcher, run_id=run_id, config=config, overrides=overrides,
                                     output_uri=output_uri, data=st.outputs["Output"], nodes=nodes,
                                     gpus_per_node=gpus_per_node, image=image, image_pull_secrets=image_pull_secrets,
                                     namespace=namespace, timeout_seconds=pretrain_timeout_seconds,
                                     cpu_per_gpu=cpu_per_gpu, memory_gib_per_gpu=memory_gib_per_gpu,
                                     scratch_gib=scratch_gib))
            pt.set_display_name("pretrain").set_caching_options(False)
            pt.set_retry(num_retries=WATCHER_RETRIES, backoff_duration=WATCHER_BACKOFF, backoff_factor=2)
            _pod_settings(pt, gpu_node_selector, shm=True)
            evals = {}
            for tag, weights, enabled in (("trained", pt.output, True), ("baseline", "", baseline)):
                ev = settings(c_eval(launcher=launcher, run_id=run_id, weights=weights, enabled=enabled,
                                     preset=eval_preset, overrides=eval_overrides, output_uri=output_uri,
                                     data=st.outputs["Output"], gpus=eval_gpus, image=image,
                                     image_pull_secrets=image_pull_secrets, namespace=namespace,
                                     timeout_seconds=eval_timeout_seconds, tag=tag, cpu_per_gpu=cpu_per_gpu,
                                     memory_gib_per_gpu=memory_gib_per_gpu, scratch_gib=scratch_gib))
                ev.set_display_name(f"linear eval ({tag})").set_caching_options(False)
                ev.set_retry(num_retries=WATCHER_RETRIES, backoff_duration=WATCHER_BACKOFF, backoff_factor=2)
                _pod_settings(ev, gpu_node_selector, shm=True)
                evals[tag] = ev
            rp = settings(c_report(checkpoint=pt.output, result=evals["trained"].output,
                                   baseline=evals["baseline"].output, data=st.outputs["Output"]))
            rp.set_display_name("report").set_caching_options(False).set_retry(num_retries=2)

    return dcv2_pipeline


dcv2_pipeline = build_pipeline()


def compile_to(path: str, image: str = IMAGE, image_pull_secrets: tuple = ()) -> None:
    compiler.Compiler().compile(build_pipeline(image, image_pull_secrets), package_path=path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compile the dcv2 pipeline for an image")
    ap.add_argument("out", nargs="?", default="pipelines/dcv2_pipeline.yaml")
    ap.add_argument("--image", default=IMAGE, help="the image every step (and, by default, every PyTorchJob) runs")
    ap.add_argument("--image-pull-secret", action="append", default=[], metavar="NAME",
                    help="a Secret to pull the image with (repeat for several)")
    args = ap.parse_args(argv)
    compile_to(args.out, args.image, tuple(args.image_pull_secret))
    print(f"{args.out}: pipeline for image {args.image}" +
          (f", pulled with {', '.join(args.image_pull_secret)}" if args.image_pull_secret else ""))
    return 0
