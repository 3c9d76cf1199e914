"""The Grafana dashboard of a DCv2 training job, rendered from one spec.

``python -m dcv2_k8s.dashboard > manifests/monitoring/dashboards/dcv2-training.json`` writes the classic
dashboard JSON that Grafana's sidecar provisions from a ConfigMap labelled ``grafana_dashboard: "1"``
(``manifests/monitoring/kustomization.yaml`` generates it). A test checks the committed file is current and
runs every panel's PromQL against a real Prometheus.

Variables: ``datasource`` (Prometheus), ``namespace``, ``job`` (the PyTorchJob name, from the training
operator's pod label ``training.kubeflow.org/job-name``, attached by the PodMonitor's ``podTargetLabels``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from dcv2_k8s.k8s.kinds import PYTORCHJOB

# the PodMonitor attaches the job's pod label, which Prometheus spells with underscores
JOB_LABEL = re.sub(r"\W", "_", PYTORCHJOB.name_label)
SEL = f'namespace=~"$namespace", {JOB_LABEL}=~"$job"'
# dcgm-exporter's ServiceMonitor keeps its own pod/namespace labels as exported_* (honorLabels false)
GPU_SEL = 'exported_namespace=~"$namespace", exported_pod=~"$job-(master|worker)-.*"'


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]          # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    source: str = "trainer"               # trainer | eval (a linear-eval job) | gpu (DCGM) | cluster (kube-state-metrics)
    width: int = 8
    description: str = ""
    extra: dict = field(default_factory=dict)


RATE = "$__rate_interval"

PANELS: list[Panel] = [
    Panel("Throughput (images/s)", [(f"sum(rate(dcv2_train_samples_total{{{SEL}}}[{RATE}]))", "images/s")],
          "short", description="Sum over pods of images processed per second"),
    Panel("Step time p50 / p95", [
        (f"histogram_quantile(0.5, sum by (le) (rate(dcv2_train_step_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
         "p50"),
        (f"histogram_quantile(0.95, sum by (le) (rate(dcv2_train_step_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
         "p95")], "s"),
    Panel("Data-wait share", [(f"sum(rate(dcv2_data_wait_seconds_sum{{{SEL}}}[{RATE}])) / "
                               f"sum(rate(dcv2_train_step_duration_seconds_sum{{{SEL}}}[{RATE}]))", "waiting for data")],
          "percentunit", description="Share of step time spent waiting for the input pipeline"),
    Panel("Loss", [(f"max by (node_rank) (dcv2_train_loss{{{SEL}}})", "node {{node_rank}}")], "short",
          description="DCv2 cross-entropy; starts near ln K"),
    Panel("Learning rate", [(f"max(dcv2_learning_rate{{{SEL}}})", "lr")], "short"),
    Panel("Epoch", [(f"max(dcv2_epoch{{{SEL}}})", "epoch")], "short", kind="stat", width=4),
    Panel("ETA", [(f"(max(dcv2_total_steps{{{SEL}}}) - max(dcv2_iteration{{{SEL}}})) / "
                   f"max(rate(dcv2_train_steps_total{{{SEL}}}[5m]))", "remaining")], "s", kind="stat", width=4),
    Panel("Progress", [(f"max(dcv2_progress_ratio{{{SEL}}})", "done")], "percentunit", kind="gauge", width=4),
    Panel("Ignored targets", [(f"max(dcv2_ignored_targets_ratio{{{SEL}}})", "ignored")], "percentunit", width=4,
          description="Crops whose image had no k-means target (drop_last remainders); ~N mod (world x batch) / N"),
    Panel("k-means time per epoch", [(f"max(dcv2_kmeans_duration_seconds{{{SEL}}})", "k-means")], "s"),
    Panel("Empty clusters", [(f"max by (head) (dcv2_kmeans_empty_clusters{{{SEL}}})", "head {{head}}")], "short"),
    Panel("Cluster balance and stability", [
        (f"min by (head) (dcv2_kmeans_cluster_size_entropy_ratio{{{SEL}}})", "size entropy head {{head}}"),
        (f"min by (head) (dcv2_kmeans_nmi_previous_ratio{{{SEL}}})", "NMI vs previous head {{head}}")],
        "percentunit", description="Entropy of cluster sizes / log K, and NMI of assignments vs the previous epoch"),
    Panel("Representation health", [
        (f"max(dcv2_trunk_feature_mean_cosine{{{SEL}}})", "trunk mean cosine"),
        (f"max(dcv2_embedding_mean_cosine{{{SEL}}})", "embedding mean cosine"),
        (f"max(dcv2_collapse_warnings{{{SEL}}})", "collapse warnings")], "short",
          description="Collapse diagnostics (docs/training.md): mean pairwise cosine of the trunk's features "
                      "(1 = collapsed) and of the head's embeddings, and the warnings of the last check"),
    Panel("Weight change per epoch", [
        (f"max by (layer) (dcv2_layer_weight_change_ratio{{{SEL}, window=\"epoch\"}})", "{{layer}}")],
        "percentunit", description="||w - w_prev|| / ||w_prev|| of each layer over the last epoch; flat near 0 = "
                                   "not learning"),
    Panel("Checkpoint age", [(f"time() - max(dcv2_last_checkpoint_timestamp_seconds{{{SEL}}})", "age")], "s",
          kind="stat", width=4),
    Panel("Checkpoint duration and size", [
        (f"max(dcv2_checkpoint_save_duration_seconds{{{SEL}}})", "seconds"),
        (f"sum(dcv2_checkpoint_bytes{{{SEL}}})", "bytes")], "short", width=8),
    Panel("Checkpoint failures", [(f"sum(increase(dcv2_checkpoint_failures_total{{{SEL}}}[1h]))", "failures/h")],
          "short", kind="stat", width=4),
    Panel("k-NN accuracy (frozen trunk)", [(f"max(dcv2_knn_top1_ratio{{{SEL}}})", "top-1"),
                                           (f"max(dcv2_knn_top5_ratio{{{SEL}}})", "top-5")], "percentunit"),
    Panel("Linear evaluation", [(f"max(dcv2_linear_eval_top1_ratio{{{SEL}}})", "top-1"),
                                (f"max(dcv2_linear_eval_top5_ratio{{{SEL}}})", "top-5")], "percentunit",
          source="eval", description="From a dcv2 linear-eval job (select its PyTorchJob in the job variable)"),
    Panel("GPU utilisation", [(f"avg by (exported_pod) (DCGM_FI_DEV_GPU_UTIL{{{GPU_SEL}}})", "{{exported_pod}}")],
          "percent", source="gpu"),
    Panel("Tensor-core activity", [(f"avg by (exported_pod) (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{GPU_SEL}}})",
                                    "{{exported_pod}}")], "percentunit", source="gpu"),
    Panel("GPU framebuffer used", [(f"sum by (exported_pod) (DCGM_FI_DEV_FB_USED{{{GPU_SEL}}})",
                                    "{{exported_pod}}")], "decmbytes", source="gpu"),
    Panel("GPU power", [(f"sum by (exported_pod) (DCGM_FI_DEV_POWER_USAGE{{{GPU_SEL}}})", "{{exported_pod}}")],
          "watt", source="gpu"),
    Panel("Trainer GPU memory", [(f"max by (node_rank) (dcv2_gpu_memory_allocated_bytes{{{SEL}}})", "allocated"),
                                 (f"max by (node_rank) (dcv2_gpu_memory_reserved_bytes{{{SEL}}})", "reserved")],
          "bytes", source="gpu"),
    Panel("Pod restarts", [('sum by (pod) (kube_pod_container_status_restarts_total{namespace=~"$namespace", '
                            f'pod=~"$job-(master|worker)-.*", container="{PYTORCHJOB.container}"}})', "{{pod}}")],
          "short",
          source="cluster", description="From kube-state-metrics"),
]


def _templating() -> dict:
    return {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
         "hide": 0},
        {"name": "namespace", "type": "query", "label": "Namespace",
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(dcv2_train_steps_total, namespace)", "refId": "ns"},
         "refresh": 2, "includeAll": False, "hide": 0, "sort": 1},
        {"name": "job", "type": "query", "label": "PyTorchJob",
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": f'label_values(dcv2_train_steps_total{{namespace="$namespace"}}, {JOB_LABEL})',
                   "refId": "job"},
         "refresh": 2, "includeAll": False, "hide": 0, "sort": 1},
    ]}


def _options(kind: str) -> dict:
    """A panel's options: every key its type's schema requires (tests/test_dashboard_schema.py), less those the
    type's defaults fill in on load."""
    if kind == "timeseries":
        return {"legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "single", "sort": "none"}}
    # stat and gauge: the newest non-null value of each series
    return {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "orientation": "auto"}


def render() -> dict:
    panels, x, y, row_h = [], 0, 0, 8
    for i, p in enumerate(PANELS, start=1):
        if x + p.width > 24:
            x, y = 0, y + row_h
        panels.append({
            "id": i, "type": p.kind, "title": p.title, "description": p.description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": row_h, "w": p.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": _options(p.kind),
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(p.exprs)],
            **p.extra})
        x += p.width
    return {"uid": "dcv2-training", "title": "DeepClusterV2 training", "tags": ["dcv2", "kubeflow", "training"],
            "timezone": "browser", "schemaVersion": 39, "version": 1, "refresh": "30s", "editable": True,
            "time": {"from": "now-6h", "to": "now"}, "templating": _templating(),
            "annotations": {"list": []}, "panels": panels}


def main() -> None:
    print(json.dumps(render(), indent=1))


if __name__ == "__main__":
    main()
