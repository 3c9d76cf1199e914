"""The run's one reporter: the loop's records to the log, Prometheus, events and TrainJob status.

The five sinks: log lines (every rank); Prometheus (``metrics.py``, local rank 0 of each node); the event log
``CHECKPOINT.DIR/metrics.jsonl`` (``events.py``, rank 0); Kubeflow Trainer v2's TrainJob status
(``trainer_status.py``, rank 0, when its variables are set); TensorBoard event files (``tensorboard.py``, rank 0,
with ``HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD``). Every record holds host values: the loop makes its
one host synchronisation per log window before it hands the window over, and nothing here waits on the device.
"""

from __future__ import annotations

import logging
import math

from dcv2_k8s import distributed as D
from dcv2_k8s.config import Resolved
from dcv2_k8s.events import EventLog
from dcv2_k8s.metrics import PrometheusMetrics
from dcv2_k8s.monitor import Diagnosis, KnnCheck
from dcv2_k8s.tensorboard import TensorBoardLog
from dcv2_k8s.trainer_status import TrainerStatusReporter

log = logging.getLogger("dcv2")
# k-NN top-1 points a run must gain over its starting network, from half its epochs on, not to be warned
KNN_GAIN_FLOOR = 2.0


class RunReporter:
    """The sinks of one training run on this process; ``close()`` stops the exporter and flushes the status."""

    def __init__(self, resolved: Resolved, info: D.DistInfo, store, total_steps: int, steps_per_epoch: int):
        cfg = resolved.cfg
        self.ckpt_dir = cfg.CHECKPOINT.DIR
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.events = EventLog(cfg.CHECKPOINT.DIR, store, info.is_main)
        self.prometheus = PrometheusMetrics.of_run(resolved, info)
        self.tensorboard = TensorBoardLog(cfg, store, info.is_main)  # HOOKS.TENSORBOARD_SETUP (rank 0)
        # Kubeflow Trainer v2: progress, ETA and metrics in the TrainJob's status (when its variables are set)
        self.status = TrainerStatusReporter.from_env() if info.is_main else None
        self._bad_reported = 0
        self._warned_no_gain = False
        self._ckpt_reported = None

    # ------------------------------------------------------------------------------------------- start
    def run_start(self, resumed_from: dict | None, auto_resume: bool, global_step: int, epoch: int) -> dict:
        """A new run, or the next attempt of the run that wrote ``resumed_from`` (the manifest of the checkpoint it
        resumed): its line, its tags (``run_id``, ``attempt``) on every later event and its ``run_start`` event.
        Returns the tags, which every checkpoint's manifest records."""
        tags = self.events.start_run(resumed_from.get("run_id") if resumed_from else None,
                                     resumed=resumed_from is not None,
                                     checkpoint=resumed_from["name"] if resumed_from else None,
                                     from_step=global_step, from_epoch=epoch, steps_per_epoch=self.steps_per_epoch)
        self.tensorboard.start(global_step, self.steps_per_epoch)
        if resumed_from is None:
            log.info("%s: starting a new run (%s)", "no checkpoint in " + self.ckpt_dir if auto_resume else
                     "config.CHECKPOINT.AUTO_RESUME=false", tags["run_id"])
        return tags

    # ------------------------------------------------------------------------------------------- steps
    def step(self, images: int, seconds: float, data_wait: float) -> None:
        """Every step: this node's images, the step's wall time and its wait for data (Prometheus only)."""
        self.prometheus.step(images, seconds, data_wait)

    def window(self, rec: dict, seconds_per_step: float) -> None:
        """One log window. ``rec`` is its ``step`` event: epoch, step (in the epoch), global_step, the window's mean
        loss and ignored_ratio, lr, images_per_s, data_wait_ratio and bad_images (the count so far). A window whose
        loss is not finite goes to Prometheus only (``dcv2_train_loss_nonfinite``): the loop stops on it."""
        loss, global_step = rec["loss"], rec["global_step"]
        self.prometheus.window(loss, rec["lr"], rec["epoch"], global_step, self.total_steps, rec["ignored_ratio"])
        self.prometheus.bad_images_seen(rec["bad_images"] - self._bad_reported)
        self._bad_reported = rec["bad_images"]
        if not math.isfinite(loss):
            return
        log.info("epoch %d step %d/%d loss %.4f lr %.4g %.1f img/s data-wait %.0f%% ignored %.1f%%", rec["epoch"],
                 rec["step"], self.steps_per_epoch, loss, rec["lr"], rec["images_per_s"],
                 100 * rec["data_wait_ratio"], 100 * rec["ignored_ratio"])
        self.events.emit("step", **rec)
        self.tensorboard.window(rec)
        if self.status is not None:
            self.status.update(100.0 * global_step / max(1, self.total_steps),
                               (self.total_steps - global_step) * seconds_per_step, loss=loss, epoch=rec["epoch"],
                               global_step=global_step, images_per_s=rec["images_per_s"])

    def nonfinite_skipped(self, global_step: int, skipped: int, limit: int) -> None:
        """A step skipped for a non-finite loss or gradient (TRAINER.NONFINITE_POLICY=skip), the ``skipped``-th."""
        self.prometheus.nonfinite(skipped=True)
        self.events.emit("nonfinite_skip", global_step=global_step, skipped=skipped)
        log.warning("non-finite loss or gradient at step %d: step skipped (%d of at most %d)", global_step, skipped,
                    limit)

    def nonfinite_stop(self) -> None:
        """The run stops on a non-finite loss, gradient or parameter (the alert's gauge)."""
        self.prometheus.nonfinite(skipped=False)

    # ------------------------------------------------------------------------------------------ epochs
    def kmeans(self, epoch: int, seconds: float, heads: list[dict], num_clusters: list[int]) -> None:
        """One k-means pass; ``heads``: its cluster statistics (``DeepClusterV2.stats``, rank 0; empty elsewhere)."""
        for st in heads:
            log.info("epoch %d k-means head %d: %d empty clusters, size entropy %.3f, ignored %.1f%%%s", epoch,
                     st["head"], st["empty_clusters"], st["size_entropy"], 100 * st["ignored_ratio"],
                     f", NMI vs previous {st['nmi_prev']:.3f}" if "nmi_prev" in st else "")
        log.info("epoch %d k-means: %.2f s for %d heads", epoch, seconds, len(num_clusters))
        self.prometheus.kmeans(seconds, heads, num_clusters)
        self.events.emit("kmeans", epoch=epoch, seconds=seconds, heads=heads)
        self.tensorboard.kmeans(epoch, seconds, heads)

    def knn(self, check: KnnCheck, initial: bool = False, top1_init: float = -1.0, late: bool = False) -> None:
        """A k-NN check: of the network at initialisation (``initial``, the floor), or after an epoch, with its gain
        over that floor when it was measured (``top1_init`` >= 0). A ``late`` check (from half the epochs on) whose
        gain is under ``KNN_GAIN_FLOOR`` points warns, once: the training is not beating the network it started
        from, so the input view alone does what the run is credited with, or the data defeats the method."""
        res = check.scores
        extra, gain = {}, None
        if initial:
            extra["initial"] = True
            log.info("k-NN of the network at initialisation (the floor training must beat): top-1 %.2f%% top-5 "
                     "%.2f%% (%.1f s)", res["top1"], res["top5"], check.seconds)
            self.prometheus.knn_at_init(res["top1"])
        elif top1_init >= 0:
            gain = res["top1"] - top1_init
            extra = {"top1_init": top1_init, "gain": gain}
            log.info("epoch %d k-NN: top-1 %.2f%% top-5 %.2f%%, %+.1f points over initialisation (%.1f s)",
                     check.epoch, res["top1"], res["top5"], gain, check.seconds)
            self.prometheus.knn_over_init(gain)
        else:
            log.info("epoch %d k-NN: top-1 %.2f%% top-5 %.2f%% (%.1f s)", check.epoch, res["top1"], res["top5"],
                     check.seconds)
        if gain is not None and late and gain < KNN_GAIN_FLOOR and not self._warned_no_gain:
            self._warned_no_gain = True
            extra["not_beating_init"] = True
            log.warning("epoch %d: training is not beating the network it started from: k-NN top-1 %.1f%% against "
                        "%.1f%% at initialisation (%+.1f points); on this data the input view alone does that much "
                        "(see 'What training adds' in docs/evaluation.md)", check.epoch, res["top1"], top1_init, gain)
        self.events.emit("knn", epoch=check.epoch, **res, **extra)
        self.tensorboard.knn(check.epoch, res, gain)
        self.prometheus.knn(res["top1"], res["top5"])
        if self.status is not None:
            self.status.update(knn_top1=res["top1"])

    def diagnosis(self, found: Diagnosis) -> None:
        """A collapse check: a summary line, a warning when a condition appears (not at every check while it
        holds), a line when one ends; the gauges and the event at every check."""
        diag = found.record
        tr, em = diag["trunk"], diag["embedding"]
        trunk_change = max((v["per_epoch"] for k, v in diag["weight_change"].items() if k.startswith("trunk")),
                           default=0.0)
        log.info("epoch %d diagnostics: trunk features mean cosine %.3f effective rank %.1f; embeddings mean "
                 "cosine %.3f effective rank %.1f; largest trunk layer change %.2f%% (%.1f s)", diag["epoch"],
                 tr["mean_cosine"], tr["effective_rank"], em["mean_cosine"], em["effective_rank"],
                 100 * trunk_change, diag["seconds"])
        for message in found.appeared:
            log.warning("collapse check (epoch %d): %s", diag["epoch"], message)
        for kind in found.ended:
            log.info("collapse check (epoch %d): %s no longer holds", diag["epoch"], kind)
        self.prometheus.diagnostics(diag)
        self.events.emit("diagnostics", **diag)
        self.tensorboard.diagnostics(diag)

    # ------------------------------------------------------------------------------------- checkpoints
    def checkpoint_saved(self, global_step: int, snapshot_seconds: float) -> None:
        """A checkpoint handed to the (background) upload; the event log is published with it."""
        self.events.emit("checkpoint", global_step=global_step, snapshot_seconds=snapshot_seconds)
        self.events.publish()
        self.tensorboard.checkpoint_saved(global_step, snapshot_seconds)
        self.tensorboard.publish()

    def checkpoint_done(self, result: dict | None) -> None:
        """The last committed checkpoint's figures (``CheckpointManager.last_result``), once per checkpoint."""
        if result and result is not self._ckpt_reported:
            self._ckpt_reported = result
            self.prometheus.checkpoint(result["seconds"], result["bytes"], result["time"])
            self.events.emit("checkpoint_done", **result)
            self.tensorboard.checkpoint_done(result)

    def checkpoint_failed(self) -> None:
        self.prometheus.checkpoint_failed()

    # ----------------------------------------------------------------------------------------- the end
    def finished(self, epochs: int, global_step: int, warnings: list[dict]) -> None:
        """The run trained to its end; ``warnings``: every collapse warning it raised. The event log's final copy
        must be published."""
        log.info("training finished: %d epochs, %d steps", epochs, global_step)
        if warnings:
            kinds = sorted({w["kind"] for w in warnings})
            log.warning("this run raised %d collapse warnings (%s); the last: %s. See `dcv2 report %s` and "
                        "docs/troubleshooting.md", len(warnings), ", ".join(kinds), warnings[-1]["message"],
                        self.ckpt_dir)
        if self.status is not None:
            self.status.update(100.0, 0.0, epoch=epochs, global_step=global_step)
        self.events.publish(final=True)
        self.tensorboard.publish(final=True)

    def close(self) -> None:
        self.prometheus.close()
        self.tensorboard.close()
        if self.status is not None:
            self.status.close(flush=True)
