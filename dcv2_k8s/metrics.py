"""Prometheus metrics of the trainer (prometheus-client), one exporter per pod.

Only local rank 0 of each node serves ``/metrics`` (several ranks of a pod would collide on one port); it
reports its node's throughput (``local world size x batch`` per step) so that a sum over pods is the job's
rate. Labels are few and bounded: ``run`` (RUN_NAME) and ``node_rank`` (plus ``head`` for cluster metrics);
``job``, ``namespace``, ``pod`` and the training operator's labels come from Prometheus' target labels.
Updating a metric is a dictionary write; serving runs in a thread of its own, so exporting never blocks
training, and a failure to bind the port is logged once, never raised. The endpoint binds to ``METRICS.ADDR``
only and answers nothing but ``GET``/``HEAD /metrics`` (404 for other paths, 405 for other methods).
"""

from __future__ import annotations

import logging
import platform

import torch

log = logging.getLogger("dcv2")

STEP_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def serve_metrics(registry, port: int, addr: str):
    """An HTTP server on ``addr:port`` in a daemon thread that serves ``registry`` at ``/metrics`` and nothing
    else. Returns the server (``shutdown()`` stops it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        server_version = "dcv2-metrics"
        sys_version = ""

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if code == 405:
                self.send_header("Allow", "GET, HEAD")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if urlsplit(self.path).path != "/metrics":
                self._reply(404, b"not found: only /metrics is served\n")
                return
            self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)

        do_HEAD = do_GET

        def _refuse(self) -> None:
            self._reply(405, b"method not allowed\n")

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

        def log_message(self, *args) -> None:  # scrapes are not worth a log line each
            pass

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class PrometheusMetrics:
    """All trainer metrics in one registry. ``enabled=False`` gives a no-op object with the same methods."""

    def __init__(self, run: str, node_rank: int, enabled: bool = True, port: int = 8000, addr: str = "0.0.0.0",
                 config_name: str = ""):
        self.enabled = enabled
        self.server = None
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = r = CollectorRegistry()
        base = ["run", "node_rank"]
        self.labels = {"run": run, "node_rank": str(node_rank)}

        def g(name, doc, extra=()):
            return Gauge(name, doc, base + list(extra), registry=r)

        self.samples = Counter("dcv2_train_samples", "Images processed by this node's ranks", base, registry=r)
        self.steps = Counter("dcv2_train_steps", "Optimizer steps", base, registry=r)
        self.step_seconds = Histogram("dcv2_train_step_duration_seconds", "Wall time of one training step", base,
                                      buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram("dcv2_data_wait_seconds", "Time a step waited for its batch", base,
                                   buckets=WAIT_BUCKETS, registry=r)
        self.loss = g("dcv2_train_loss", "Mean loss over the last logging window")
        self.loss_nonfinite = g("dcv2_train_loss_nonfinite", "1 when the last loss was NaN or infinite")
        self.skipped = Counter("dcv2_train_nonfinite_skipped_steps", "Steps skipped for a non-finite loss or "
                               "gradient (TRAINER.NONFINITE_POLICY=skip)", base, registry=r)
        self.lr = g("dcv2_learning_rate", "Learning rate")
        self.epoch = g("dcv2_epoch", "Current epoch (0-based)")
        self.iteration = g("dcv2_iteration", "Global step")
        self.progress = g("dcv2_progress_ratio", "Share of all training steps done")
        self.total_steps = g("dcv2_total_steps", "Steps of the whole run")
        self.ignored = g("dcv2_ignored_targets_ratio", "Share of crops without a k-means target in the last window")
        self.kmeans_seconds = g("dcv2_kmeans_duration_seconds", "Duration of the last k-means pass (all heads)")
        self.clusters = g("dcv2_kmeans_clusters", "Clusters (K) of each head", ["head"])
        self.empty = g("dcv2_kmeans_empty_clusters", "Empty clusters after the last k-means", ["head"])
        self.entropy = g("dcv2_kmeans_cluster_size_entropy_ratio", "Cluster-size entropy / log K", ["head"])
        self.nmi = g("dcv2_kmeans_nmi_previous_ratio", "NMI of assignments vs the previous epoch", ["head"])
        self.ckpt_seconds = g("dcv2_checkpoint_save_duration_seconds", "Duration of the last checkpoint save")
        self.ckpt_bytes = g("dcv2_checkpoint_bytes", "Bytes of the last checkpoint part(s) written here")
        self.ckpt_time = g("dcv2_last_checkpoint_timestamp_seconds", "Unix time of the last committed checkpoint")
        self.ckpt_failures = Counter("dcv2_checkpoint_failures", "Checkpoint saves that failed", base, registry=r)
        self.bad_images = Counter("dcv2_data_bad_images", "Unusable images replaced (once per file and loader process)",
                                  base, registry=r)
        self.knn_top1 = g("dcv2_knn_top1_ratio", "k-NN top-1 accuracy of the frozen trunk")
        self.knn_top5 = g("dcv2_knn_top5_ratio", "k-NN top-5 accuracy of the frozen trunk")
        self.linear_top1 = g("dcv2_linear_eval_top1_ratio", "Linear-evaluation top-1 accuracy (last epoch evaluated)")
        self.linear_top5 = g("dcv2_linear_eval_top5_ratio", "Linear-evaluation top-5 accuracy (last epoch evaluated)")
        self.trunk_cos = g("dcv2_trunk_feature_mean_cosine", "Mean pairwise cosine of the trunk's features of a fixed "
                           "subset of training images (1 = collapsed)")
        self.trunk_rank = g("dcv2_trunk_feature_effective_rank", "Effective rank of the trunk's features (same subset)")
        self.emb_cos = g("dcv2_embedding_mean_cosine", "Mean pairwise cosine of the memory bank's embeddings")
        self.emb_rank = g("dcv2_embedding_effective_rank", "Effective rank of the memory bank's embeddings")
        self.weight_change = g("dcv2_layer_weight_change_ratio", "Relative weight change ||w - w_ref|| / ||w_ref|| of a "
                               "layer: window=epoch (since the last check) or total (since the process started)",
                               ["layer", "window"])
        self.collapse = g("dcv2_collapse_warnings", "Collapse warnings raised by the last diagnostics (0 = healthy)")
        self.knn_init = g("dcv2_knn_top1_init_ratio", "k-NN top-1 of the network at initialisation")
        self.knn_gain = g("dcv2_knn_top1_gain_over_init_ratio", "k-NN top-1 of the last check minus that of the network "
                          "at initialisation (<= 0: training adds nothing to the starting network)")
        self.gpu_alloc = g("dcv2_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated")
        self.gpu_reserved = g("dcv2_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved")
        for counter in (self.samples, self.steps, self.ckpt_failures, self.bad_images):
            counter.labels(**self.labels)  # exported as 0 from the start, so rate()/increase() see the series
        self.info = Info("dcv2_build", "Versions and configuration", base, registry=r)
        from dcv2_k8s import __version__

        self.info.labels(**self.labels).info({
            "version": __version__, "torch": torch.__version__, "cuda": str(torch.version.cuda or "none"),
            "python": platform.python_version(), "config": config_name})
        try:
            self.server = serve_metrics(r, port, addr)
            log.info("metrics on http://%s:%d/metrics", addr, port)
        except OSError as e:
            log.warning("metrics endpoint %s:%d not started (%s); training continues without it", addr, port, e)

    @classmethod
    def of_run(cls, resolved, info) -> "PrometheusMetrics":
        """The exporter of a run (training or linear evaluation) of ``resolved`` on the process ``info``: labelled
        with RUN_NAME (else the config's name), served by local rank 0 of each node when METRICS.ENABLED."""
        cfg, mc = resolved.cfg, resolved.cfg.METRICS
        return cls(cfg.RUN_NAME or resolved.name.replace("/", "_"), info.node_rank,
                   mc.ENABLED and info.local_rank == 0, mc.PORT, mc.ADDR, resolved.name)

    def _l(self, metric, **extra):
        return metric.labels(**self.labels, **extra)

    def step(self, images: int, seconds: float, data_wait: float) -> None:
        if not self.enabled:
            return
        self._l(self.samples).inc(images)
        self._l(self.steps).inc()
        self._l(self.step_seconds).observe(seconds)
        self._l(self.data_wait).observe(data_wait)

    def nonfinite(self, skipped: bool) -> None:
        """A non-finite loss or gradient: a skipped step, or (stop policy) the run ends."""
        if not self.enabled:
            return
        if skipped:
            self._l(self.skipped).inc()
        else:
            self._l(self.loss_nonfinite).set(1)

    def window(self, loss: float, lr: float, epoch: int, global_step: int, total_steps: int, ignored: float) -> None:
        if not self.enabled:
            return
        finite = loss == loss and abs(loss) != float("inf")
        self._l(self.loss_nonfinite).set(0 if finite else 1)
        if finite:
            self._l(self.loss).set(loss)
        self._l(self.lr).set(lr)
        self._l(self.epoch).set(epoch)
        self._l(self.iteration).set(global_step)
        self._l(self.total_steps).set(total_steps)
        self._l(self.progress).set(global_step / max(1, total_steps))
        self._l(self.ignored).set(ignored)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._l(self.gpu_alloc).set(torch.cuda.memory_allocated())
            self._l(self.gpu_reserved).set(torch.cuda.memory_reserved())

    def kmeans(self, seconds: float, heads: list[dict], num_clusters: list[int]) -> None:
        if not self.enabled:
            return
        self._l(self.kmeans_seconds).set(seconds)
        for h, k in enumerate(num_clusters):
            self._l(self.clusters, head=str(h)).set(k)
        for h in heads:
            self._l(self.empty, head=str(h["head"])).set(h["empty_clusters"])
            self._l(self.entropy, head=str(h["head"])).set(h["size_entropy"])
            if "nmi_prev" in h:
                self._l(self.nmi, head=str(h["head"])).set(h["nmi_prev"])

    def checkpoint(self, seconds: float, nbytes: int, when: float) -> None:
        if not self.enabled:
            return
        self._l(self.ckpt_seconds).set(seconds)
        self._l(self.ckpt_bytes).set(nbytes)
        self._l(self.ckpt_time).set(when)

    def checkpoint_failed(self) -> None:
        if self.enabled:
            self._l(self.ckpt_failures).inc()

    def bad_images_seen(self, n: int) -> None:
        if self.enabled and n > 0:
            self._l(self.bad_images).inc(n)

    def knn(self, top1: float, top5: float) -> None:
        if self.enabled:
            self._l(self.knn_top1).set(top1 / 100)
            self._l(self.knn_top5).set(top5 / 100)

    def knn_at_init(self, top1: float) -> None:
        if self.enabled:
            self._l(self.knn_init).set(top1 / 100)

    def knn_over_init(self, points: float) -> None:
        if self.enabled:
            self._l(self.knn_gain).set(points / 100)

    def diagnostics(self, diag: dict) -> None:
        """One epoch's collapse diagnostics (``RunMonitor.diagnose``)."""
        if not self.enabled:
            return
        self._l(self.trunk_cos).set(diag["trunk"]["mean_cosine"])
        self._l(self.trunk_rank).set(diag["trunk"]["effective_rank"])
        self._l(self.emb_cos).set(diag["embedding"]["mean_cosine"])
        self._l(self.emb_rank).set(diag["embedding"]["effective_rank"])
        for layer, v in diag["weight_change"].items():
            self._l(self.weight_change, layer=layer, window="epoch").set(v["per_epoch"])
            self._l(self.weight_change, layer=layer, window="total").set(v["total"])
        self._l(self.collapse).set(len(diag["warnings"]))
        if "knn_top1_init" in diag:
            self._l(self.knn_init).set(diag["knn_top1_init"] / 100)

    def linear_eval(self, top1: float, top5: float) -> None:
        if self.enabled:
            self._l(self.linear_top1).set(top1 / 100)
            self._l(self.linear_top5).set(top5 / 100)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class StageMetrics:
    """Progress of ``dcv2 stage --metrics-port N``: bytes and files done and to do (an exporter of its own)."""

    def __init__(self, source: str, port: int, addr: str = "0.0.0.0"):
        from prometheus_client import CollectorRegistry, Gauge

        r = CollectorRegistry()
        labels = {"source": source}
        self.bytes_done = Gauge("dcv2_stage_bytes_done", "Bytes staged so far", ["source"], registry=r).labels(**labels)
        self.bytes_total = Gauge("dcv2_stage_bytes_total", "Bytes to stage", ["source"], registry=r).labels(**labels)
        self.files_done = Gauge("dcv2_stage_files_done", "Files staged so far", ["source"], registry=r).labels(**labels)
        self.objects_total = Gauge("dcv2_stage_objects_total", "Objects to fetch", ["source"], registry=r).labels(**labels)
        self.complete = Gauge("dcv2_stage_complete", "1 when staging finished", ["source"], registry=r).labels(**labels)
        self.server = serve_metrics(r, port, addr)

    def __call__(self, event: str, **v) -> None:
        if event == "start":
            self.bytes_total.set(v["bytes"])
            self.objects_total.set(v["objects"])
        elif event == "object":
            self.bytes_done.inc(v["bytes"])
            self.files_done.inc(v["files"])
        elif event == "done":
            self.complete.set(1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
