"""TensorBoard event files of a training run (rank 0), VISSL's ``HOOKS.TENSORBOARD_SETUP``.

The reporter (``reporter.py``) hands every figure it has to :class:`TensorBoardLog` as well: the log window's loss,
LR, images/s, data wait, ignored share (``train/...``), the k-means statistics (``kmeans/...``), the k-NN monitor
(``knn/...``), the collapse diagnostics (``diagnostics/...``), the checkpoint times and sizes (``checkpoint/...``)
and, with ``LOG_PARAMS``, histograms of the parameters (``params/...``) and gradients (``grads/...``).

The files go to ``LOG_DIR/EXPERIMENT_LOG_DIR`` (``LOG_DIR`` ``.`` or empty: ``CHECKPOINT.DIR``), written by
TensorBoard's own writer. An ``s3://`` directory is written to a local directory of this attempt
(``$TMPDIR/dcv2-tensorboard/<hash>/attempt-*``) and uploaded with every checkpoint and at the end (``close()``, also
after a ``MAX_STEPS`` stop); the local copy is removed once that last upload succeeded and kept, with a warning that
names it, only when it failed. TensorBoard never fails a run: a failed upload (unreachable store, a missing bucket,
no access, a local read error) warns once and is retried at the next checkpoint and at the end. Every attempt adds
a file of its own that starts with TensorBoard's restart marker (``SessionLog.START``) at the first step it trains:
TensorBoard's Python reader (``EventAccumulator``, ``tensorboard --load_fast=false``) drops every tag's steps that
an earlier attempt logged after the checkpoint this one resumed, never showing them twice. Its data server
(``--load_fast``, the default where it is installed) ignores the marker: it drops a series' later points only when
an earlier step of that same series arrives again, so a tag the new attempt logs at other steps (a checkpoint
figure of a lost checkpoint) keeps the earlier attempt's points. A failure to write (a full disk) stops the
TensorBoard log with one warning; the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile

from dcv2_k8s.storage import open_storage

log = logging.getLogger("dcv2")


def log_dir(cfg) -> str:
    """Where the run's event files go (local or ``s3://``)."""
    tb = cfg.HOOKS.TENSORBOARD_SETUP
    root = cfg.CHECKPOINT.DIR if tb.LOG_DIR in ("", ".") else tb.LOG_DIR
    sub = tb.EXPERIMENT_LOG_DIR.strip("/")
    return f"{root.rstrip('/')}/{sub}" if sub else root


def scalars(prefix: str, values, out: dict | None = None) -> dict:
    """``{tag: number}`` of the numbers in ``values`` (nested mappings and lists: one tag level each)."""
    out = {} if out is None else out
    items = values.items() if isinstance(values, dict) else enumerate(values) if isinstance(values, list) else ()
    for k, v in items:
        tag = f"{prefix}/{k}"
        if isinstance(v, (dict, list)):
            scalars(tag, v, out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[tag] = float(v)
    return out


class TensorBoardLog:
    """The event file of this attempt; every method does nothing when disabled (not rank 0, or not asked for).

    Args:
        cfg: the run's config (``HOOKS.TENSORBOARD_SETUP``, ``CHECKPOINT.DIR``).
        store: the checkpoint store (used when the event files go next to ``s3://`` checkpoints).
        enabled: False on every rank but rank 0.
    """

    def __init__(self, cfg, store, enabled: bool):
        tb = cfg.HOOKS.TENSORBOARD_SETUP
        self.enabled = enabled and tb.USE_TENSORBOARD
        self.dir = log_dir(cfg)
        self.remote = "://" in self.dir
        self.flush_secs = max(1, round(60 * tb.FLUSH_EVERY_N_MIN))
        self.params, self.grads = tb.LOG_PARAMS, tb.LOG_PARAMS and tb.LOG_PARAMS_GRADIENTS
        self.params_every = tb.LOG_PARAMS_EVERY_N_ITERS
        self.steps_per_epoch = 1
        self.model = None
        self.writer = None
        self.local = None
        self._store = store if self.remote and self.dir.startswith(cfg.CHECKPOINT.DIR.rstrip("/") + "/") else None
        self._params_logged = 0  # the last LOG_PARAMS_EVERY_N_ITERS period whose histograms were written
        self._pending = False         # written since the last successful upload (s3://)
        self._upload_warned = False   # a failed upload while training warned (once until one succeeds again)
        self._final_failed = False    # the end's upload failed and warned where the local files are

    # --------------------------------------------------------------------------------------- lifecycle
    def start(self, first_step: int, steps_per_epoch: int) -> None:
        """Open this attempt's event file; ``first_step``: the global step it starts from (0 for a new run)."""
        self.steps_per_epoch = max(1, steps_per_epoch)
        self._params_logged = first_step // self.params_every if self.params_every > 0 else 0
        if not self.enabled:
            return
        try:
            if self.remote:  # this attempt's own local directory, uploaded to self.dir
                self._store = self._store or open_storage(self.dir)  # an unsupported scheme fails here
                base = os.path.join(tempfile.gettempdir(), "dcv2-tensorboard",
                                    hashlib.sha1(self.dir.encode()).hexdigest()[:12])
                os.makedirs(base, exist_ok=True)
                self.local = tempfile.mkdtemp(prefix="attempt-", dir=base)
            else:
                self.local = self.dir
            from torch.utils.tensorboard import SummaryWriter

            # the restart marker at the first step this attempt trains: readers drop what an earlier attempt
            # logged from that step on (a new run: from step 0)
            self.writer = SummaryWriter(self.local, purge_step=first_step + 1 if first_step else 0,
                                        flush_secs=self.flush_secs, max_queue=100)
            self.writer.flush()
            self._pending = True
        except Exception as e:  # noqa: BLE001 -- TensorBoard is a view: the run goes on without it
            self._fail(e)
            return
        log.info("TensorBoard event files: %s", self.dir)

    def watch(self, model) -> None:
        """The model whose parameters (and gradients) ``LOG_PARAMS`` draws as histograms."""
        self.model = model

    def _close_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001  (a failing disk must not fail the run)
                pass

    def _fail(self, e: BaseException) -> None:
        log.warning("TensorBoard log stopped (%s: %s); the run goes on without it", type(e).__name__, e)
        self.enabled = False
        self._close_writer()

    def add(self, values: dict, step: int) -> None:
        """One scalar per ``{tag: number}`` at ``step``."""
        if self.writer is None:
            return
        self._pending = True
        try:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    # ------------------------------------------------------------------------------------- the figures
    def window(self, rec: dict) -> None:
        """A log window (its ``step`` event), and the parameter histograms when due."""
        if self.writer is None:
            return
        step = rec["global_step"]
        self.add(scalars("train", {k: rec[k] for k in ("loss", "lr", "images_per_s", "data_wait_ratio",
                                                           "ignored_ratio", "bad_images", "epoch") if k in rec}), step)
        if not self.params or self.model is None:
            return
        if self.params_every > 0:  # the first window at or after each multiple of LOG_PARAMS_EVERY_N_ITERS
            if step // self.params_every > self._params_logged:
                self._params_logged = step // self.params_every
                self.histograms(step)
        elif rec.get("step") == self.steps_per_epoch:  # -1: at the end of every epoch
            self.histograms(step)

    def histograms(self, step: int) -> None:
        self._pending = True
        try:
            for name, p in self.model.named_parameters():
                self.writer.add_histogram(f"params/{name}", p.detach().float().cpu(), step)
                if self.grads and p.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def kmeans(self, epoch: int, seconds: float, heads: list[dict]) -> None:
        """A k-means pass, drawn at the first step of the epoch it serves."""
        values = {"kmeans/seconds": seconds}
        for st in heads:
            scalars(f"kmeans/head{st['head']}", {k: v for k, v in st.items() if k != "head"}, values)
        self.add(values, epoch * self.steps_per_epoch + 1)

    def knn(self, epoch: int, scores: dict, gain: float | None = None) -> None:
        """The k-NN monitor after ``epoch`` epochs (0: the network at initialisation), with the top-1 gain over the
        network at initialisation when it is known."""
        values = {k: v for k, v in scores.items() if k in ("top1", "top5")}
        if gain is not None:
            values["top1_gain_over_init"] = gain
        self.add(scalars("knn", values), epoch * self.steps_per_epoch)

    def diagnostics(self, diag: dict) -> None:
        values = scalars("diagnostics", {k: diag[k] for k in ("trunk", "embedding", "weight_change", "knn_top1",
                                                               "seconds") if k in diag})
        values["diagnostics/warnings"] = float(len(diag.get("warnings", ())))
        self.add(values, diag["global_step"])

    def checkpoint_saved(self, global_step: int, snapshot_seconds: float) -> None:
        self.add({"checkpoint/snapshot_seconds": snapshot_seconds}, global_step)

    def checkpoint_done(self, result: dict) -> None:
        """A committed checkpoint's upload, drawn at the step it holds."""
        m = re.match(r"step_(\d+)", str(result.get("name", "")))
        if m:
            self.add({"checkpoint/seconds": result["seconds"], "checkpoint/megabytes": result["bytes"] / 2 ** 20},
                     int(m.group(1)))

    # ---------------------------------------------------------------------------------- flush, upload
    def publish(self, final: bool = False) -> None:
        """Flush the file; for ``s3://`` upload this attempt's files. Never raises: TensorBoard is a view, a failed
        upload never fails the run. While training a failure warns once and is retried at the next checkpoint;
        ``final`` (the run's end) warns naming the local directory that keeps the files."""
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except Exception as e:  # noqa: BLE001
            self._fail(e)
            return
        if self.remote:
            self._upload(final)

    def _upload(self, final: bool) -> bool:
        """Upload every file of the local directory; True when it succeeded."""
        self._pending = False  # what is written from here on needs the next upload
        try:
            for name in sorted(os.listdir(self.local)):
                with open(os.path.join(self.local, name), "rb") as f:
                    self._store.put_bytes(f"{self.dir}/{name}", f.read())
        except Exception as e:  # noqa: BLE001 -- StorageError (any), OSError of the local copy, ...
            self._pending = True
            if final:
                self._final_failed = True
                log.warning("TensorBoard event files NOT uploaded to %s (%s: %s); the run is not failed for it. They "
                            "are kept in %s: copy them there by hand (e.g. `aws s3 cp --recursive %s %s/`)", self.dir,
                            type(e).__name__, e, self.local, self.local, self.dir)
            elif not self._upload_warned:
                self._upload_warned = True
                log.warning("TensorBoard event files not uploaded to %s (%s: %s); training goes on, they are kept in "
                            "%s and the upload is retried at every checkpoint and at the end", self.dir,
                            type(e).__name__, e, self.local)
            return False
        if self._upload_warned:
            log.info("TensorBoard event files uploaded to %s again", self.dir)
        self._upload_warned = False
        return True

    def close(self) -> None:
        """Close the writer. For ``s3://``: upload what was written since the last upload (the steps after the last
        checkpoint, a ``MAX_STEPS`` stop), then remove this attempt's local copy; it is kept only when that upload
        failed (the warning names it)."""
        self._close_writer()
        if not self.remote or self.local is None:
            return
        local = self.local
        if self._pending and not self._final_failed:
            if not self._upload(final=True):
                return
        elif self._pending:  # the final upload failed already and said where the files are
            return
        self.local = None
        shutil.rmtree(local, ignore_errors=True)
        try:  # the run directory's folder too, unless another attempt's kept files are in it
            os.rmdir(os.path.dirname(local))
        except OSError:
            pass
