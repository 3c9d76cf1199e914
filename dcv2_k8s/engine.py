"""The DeepClusterV2 training loop, in the order of the swav reference's ``main_deepclusterv2.py``.

Start-up (``TrainingRun.__init__``): process group -> data (staged when ``s3://``, its size checked) -> model with
its prototypes (SyncBN, DDP) -> optimizer and LR schedule -> the method's state (:class:`DeepClusterV2`) ->
checkpoints, the run's monitor (``monitor.py``) and reporter (``reporter.py``). ``run()``: resume or fill the memory
bank, then every epoch: k-means (the centroids become the model's prototypes), the steps, the checkpoint and the
monitor's checks. ``train_step``: LR, forward, loss against the assignment table, backward, LARC/SGD, memory-bank
write. The guards (non-finite loss, gradient or parameters) stop the run or skip the step. Every figure goes to the
reporter; the only host synchronisation of a step is the log window every ``LOG_FREQUENCY`` steps.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from dcv2_k8s import distributed as D
from dcv2_k8s import exitcodes
from dcv2_k8s.checkpoint import CheckpointManager, rng_state, set_rng_state
from dcv2_k8s.config import ConfigError, Resolved
from dcv2_k8s.config.derive import check_dataset
from dcv2_k8s.data.cv_transforms import limit_threads
from dcv2_k8s.data.dataset import IndexedImageFolder, ResumableDistributedSampler
from dcv2_k8s.data.stage import ensure_local
from dcv2_k8s.data.transforms import build_multicrop
from dcv2_k8s.dcv2 import DeepClusterV2
from dcv2_k8s.model import build_model
from dcv2_k8s.model.syncbn import convert_sync_bn
from dcv2_k8s.monitor import RunMonitor
from dcv2_k8s.optim import LRSchedule, build_optimizer
from dcv2_k8s.plural import count
from dcv2_k8s.reporter import RunReporter
from dcv2_k8s.runtime import amp_settings, seed_everything, setup_logging

log = logging.getLogger("dcv2")


class TrainingError(RuntimeError):
    """A failure the user can act on (message says what to do)."""


class Preempted(Exception):
    """SIGTERM received: a checkpoint was committed and the process should exit with exitcodes.PREEMPTED."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) received: a checkpoint was committed and the process should exit with
    exitcodes.INTERRUPTED, without a traceback (``cli.main``)."""


@dataclass
class TrainState:
    epoch: int = 0           # current epoch (0-based)
    step_in_epoch: int = 0   # steps of this epoch already done
    global_step: int = 0     # steps done in total
    knn_top1_init: float = -1.0  # k-NN top-1 of the network at initialisation (-1: not measured)


def steps_per_epoch(num_samples: int, world_size: int, batch: int) -> int:
    return math.ceil(num_samples / world_size) // batch


def _loader_worker_init(worker_id: int) -> None:
    """Each DataLoader worker leaves its rank's process group: on preemption torchrun signals the rank's whole
    group, and the rank must keep its workers while it finishes the step and commits a checkpoint. The rank
    still shuts its workers down normally, and they exit by themselves if the rank dies."""
    os.setpgrp()
    limit_threads()


def build_data(cfg, info: D.DistInfo, device: torch.device):
    """(dataset, sampler, loader) of ``DATA.TRAIN``; ``s3://`` data is staged first (local rank 0 of each node)."""
    train = cfg.DATA.TRAIN
    root = ensure_local(train.DATA_PATHS[0], train.STAGE_DIR, info.local_rank, cfg.DISTRIBUTED.TIMEOUT_SECONDS * 6,
                        progress=sys.stderr.isatty())
    if train.AUG_BACKEND == "opencv":
        limit_threads()
    dataset = IndexedImageFolder(root, build_multicrop(train.TRANSFORMS, train.AUG_BACKEND), train.DATA_LIMIT,
                                 cfg.SEED_VALUE)
    problems = check_dataset(cfg, len(dataset))
    if problems:
        raise ConfigError(problems)
    sampler = ResumableDistributedSampler(len(dataset), info.world_size, info.rank, True, cfg.SEED_VALUE)
    workers = cfg.DATA.NUM_DATALOADER_WORKERS
    loader = DataLoader(dataset, batch_size=train.BATCHSIZE_PER_REPLICA, sampler=sampler, drop_last=True,
                        num_workers=workers, pin_memory=cfg.DATA.PIN_MEMORY and device.type == "cuda",
                        prefetch_factor=cfg.DATA.PREFETCH_FACTOR if workers else None,
                        persistent_workers=workers > 0, worker_init_fn=_loader_worker_init)
    return dataset, sampler, loader


def build_training_model(cfg, info: D.DistInfo, device: torch.device):
    """(model, wrapped): the network with its prototypes on ``device``, BN synchronised in its groups, the trunk
    compiled when asked, and the DDP wrapper (the model itself on one process)."""
    # drawn from SEED_VALUE alone, as `dcv2 knn` draws a random network of the same tokens: the k-NN floor this run
    # reports (its network at initialisation) is the score `dcv2 knn` gives the same tokens without weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.SEED_VALUE)
        model = build_model(cfg)
    model = model.to(device)
    sbn = cfg.MODEL.SYNC_BN_CONFIG
    if info.distributed and sbn.CONVERT_BN_TO_SYNC_BN:
        model = convert_sync_bn(model, sbn.SYNC_BN_TYPE, D.bn_group(sbn.GROUP_SIZE, info), device)
    if cfg.MODEL.COMPILE:
        model.trunk.compile()  # in place: state-dict keys stay torchvision's
    if not info.distributed:
        return model, model
    return model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **D.ddp_options())


class TrainingRun:
    """One training run on this process; ``run()`` trains to the end (or MAX_STEPS, or a SIGTERM)."""

    def __init__(self, resolved: Resolved, info: D.DistInfo):
        self.resolved, self.cfg, self.info = resolved, resolved.cfg, info
        cfg = self.cfg
        self.device = D.pick_device(cfg.MACHINE.DEVICE, info.local_rank)
        D.init_process_group(info, cfg.DISTRIBUTED.BACKEND, self.device, cfg.DISTRIBUTED.TIMEOUT_SECONDS)
        seed_everything(cfg.SEED_VALUE, info.rank, cfg.TRAINER.DETERMINISTIC)

        self.batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
        self.dataset, self.sampler, self.loader = build_data(cfg, info, self.device)
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), info.world_size, self.batch)
        self.epochs = cfg.OPTIMIZER.num_epochs
        self.total_steps = self.epochs * self.steps_per_epoch

        self.model, self.ddp = build_training_model(cfg, info, self.device)
        self.optimizer = build_optimizer(self.model, cfg.OPTIMIZER)
        self.amp, self.amp_dtype, use_scaler = amp_settings(cfg.MODEL.AMP_PARAMS, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.schedule = LRSchedule(cfg.OPTIMIZER.param_schedulers.lr, self.total_steps, self.steps_per_epoch)
        self.method = DeepClusterV2(cfg.LOSS.deepclusterv2_loss, self.steps_per_epoch * self.batch, len(self.dataset),
                                    cfg.SEED_VALUE, self.device)
        self.state = TrainState()

        ck = cfg.CHECKPOINT
        self.ckpt = CheckpointManager(ck.DIR, info.rank, info.world_size, ck.KEEP_LAST, ck.KEEP_EVERY_EPOCHS,
                                      commit_timeout=cfg.DISTRIBUTED.TIMEOUT_SECONDS,
                                      retry_seconds=ck.UPLOAD_RETRY_SECONDS)
        self.reporter = RunReporter(resolved, info, self.ckpt.store, self.total_steps, self.steps_per_epoch)
        self.reporter.tensorboard.watch(self.model)  # HOOKS.TENSORBOARD_SETUP.LOG_PARAMS histograms
        self.monitor = RunMonitor(cfg, info, self.device, self.model, self.dataset, self.schedule, self.total_steps)
        self.stop = D.StopAgreement(info, cfg.DISTRIBUTED.TIMEOUT_SECONDS)
        # fencing: rank 0 takes the checkpoint directory over (a newer generation) before anything is resumed, so
        # that a run still writing there (a partitioned pod, the same job submitted twice) can commit nothing more;
        # every rank writes its parts under this generation's names (checkpoint.py, "Fencing")
        generation = [self.ckpt.take_over() if info.is_main else None]
        if info.distributed:
            dist.broadcast_object_list(generation, src=0, group=self.stop.group)
        self.ckpt.generation = generation[0]
        self.stop_reason = ""           # "", "max_steps", "preempted" or "interrupted"
        self.stop_signal = None
        self.max_steps, self.iter_freq = cfg.TRAINER.MAX_STEPS, ck.CHECKPOINT_ITER_FREQUENCY
        self.progress = info.is_main and sys.stderr.isatty()
        self.skipped_steps = 0
        self.resumed_from = None        # the manifest of the checkpoint this attempt resumed
        self.run_tags = {}              # run_id and attempt (reporter.run_start), in every checkpoint's manifest
        self._handlers = {}  # the signal handlers before this run's, restored by close()
        if threading.current_thread() is threading.main_thread():
            self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            D.record_pid()

    def close(self) -> None:
        """Stop the reporter's sinks, wait for the stop agreement's reduction, give the signals back."""
        self.reporter.close()
        try:
            self.stop.finish()
        except Exception:  # a peer is gone: the process group is torn down anyway
            pass
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM (preemption) and SIGINT (Ctrl-C): finish the step, commit, exit 143 or 130. A second SIGINT
        stops at once (the last committed checkpoint stays the newest)."""
        if self.stop.requested:
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                raise KeyboardInterrupt
            return
        self.stop_signal = signum
        if signum == signal.SIGTERM:
            log.warning("SIGTERM: finishing the current step, then committing a checkpoint and exiting")
        elif self.info.local_rank == 0 and not D.launcher_reports():
            log.warning("interrupted: finishing the current step, committing a checkpoint, then exiting %d "
                        "(Ctrl-C again to stop at once)", exitcodes.INTERRUPTED)
        self.stop.request()

    # -------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        cfg, s = self.cfg, self.state
        log.info("training %s: %s, %s x batch %d, %d steps/epoch, %d epochs, device %s",
                 self.resolved.name, count(len(self.dataset), "image"), count(self.info.world_size, "process"),
                 self.batch, self.steps_per_epoch,
                 self.epochs, self.device)
        bank_restored = cfg.CHECKPOINT.AUTO_RESUME and self.resume()
        s = self.state
        self.run_tags = self.reporter.run_start(self.resumed_from, cfg.CHECKPOINT.AUTO_RESUME, s.global_step,
                                                s.epoch)
        if cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE and s.global_step == 0:
            from dcv2_k8s.weights import load_weights

            init = cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE
            log.info("initial weights from %s (%s layout)", init, load_weights(self.model, init))
        if s.global_step == 0 and self.monitor.knn_every > 0:
            # the network at initialisation, the floor the training must beat: scored before the memory bank's
            # pass in train mode moves its BN statistics, so it is the network `dcv2 knn` scores for these tokens
            check = self.monitor.knn(s.epoch)
            self.reporter.knn(check, initial=True)
            s.knn_top1_init = check.scores["top1"]
        if not bank_restored:
            self.fill_memory_bank()
            self.method.bank.ptr = s.step_in_epoch * self.batch
        self.monitor.start()
        last = {}
        while s.epoch < self.epochs:
            if s.step_in_epoch == 0:
                self.cluster(s.epoch)
            last = self.train_one_epoch()
            if s.step_in_epoch == self.steps_per_epoch:
                s.epoch, s.step_in_epoch = s.epoch + 1, 0
            if self.stop_reason:
                self.save_checkpoint(epoch_end=s.step_in_epoch == 0)
                self.wait_checkpoint()
                if self.stop_reason == "preempted":
                    log.warning("checkpoint committed at step %d; exiting with code %d (restart to resume)",
                                s.global_step, exitcodes.PREEMPTED)
                    raise Preempted()
                if self.stop_reason == "interrupted":
                    if self.info.local_rank == 0:
                        log.warning("interrupted: checkpoint committed at step %d in %s; exiting with code %d (the "
                                    "same command resumes from it)", s.global_step, cfg.CHECKPOINT.DIR,
                                    exitcodes.INTERRUPTED)
                    raise Interrupted()
                log.info("stopped after %d steps (config.TRAINER.MAX_STEPS)", s.global_step)
                return last
            if s.epoch % max(1, cfg.CHECKPOINT.CHECKPOINT_FREQUENCY) == 0 or s.epoch == self.epochs:
                self.save_checkpoint(epoch_end=True)
            self.check_epoch()
        self.wait_checkpoint()
        self.reporter.finished(self.epochs, s.global_step, self.monitor.warnings)
        return last

    def train_one_epoch(self) -> dict:
        s = self.state
        self.sampler.set_epoch(s.epoch, start=s.step_in_epoch * self.batch)
        self.ddp.train()
        log_every = max(1, self.cfg.LOG_FREQUENCY)
        loss_sum = torch.zeros((), device=self.device)
        ignored_sum = torch.zeros((), device=self.device)
        n_acc, data_wait, t_window, last = 0, 0.0, time.time(), {}
        t_end = time.time()
        node_images = self.batch * self.info.local_world_size
        for index, crops in self._iter(self.loader, f"epoch {s.epoch}"):
            t_start = time.time()
            data_wait += t_start - t_end
            lr = self.schedule(s.global_step)
            loss, ignored = self.train_step(index, crops, lr)
            loss_sum += loss
            ignored_sum += ignored
            self.reporter.step(node_images, time.time() - t_end, t_start - t_end)
            n_acc += 1
            s.global_step += 1
            s.step_in_epoch += 1
            if s.global_step % log_every == 0 or s.step_in_epoch == self.steps_per_epoch:
                last = self._log_window(loss_sum, ignored_sum, n_acc, lr, data_wait, time.time() - t_window)
                loss_sum.zero_()
                ignored_sum.zero_()
                n_acc, data_wait, t_window = 0, 0.0, time.time()
            if self.iter_freq > 0 and s.global_step % self.iter_freq == 0 and s.step_in_epoch < self.steps_per_epoch:
                self.save_checkpoint(epoch_end=False)
            if self.stop.poll():  # every step: a SIGTERM or SIGINT is acted on within two steps
                self.stop_reason = "interrupted" if self.stop_signal == signal.SIGINT else "preempted"
                break
            if 0 < self.max_steps <= s.global_step:
                self.stop_reason = "max_steps"
                break
            t_end = time.time()
        return last

    def train_step(self, index: torch.Tensor, crops: list[torch.Tensor], lr: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on one batch; returns the (device) loss and ignored ratio. No host sync."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        crops = self.to_device(crops)
        index = index.to(self.device, non_blocking=True)
        with self.autocast():
            z = self.ddp(crops)
        loss, ignored = self.method.loss(z, index, self.model.prototypes)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.TRAINER.NONFINITE_POLICY == "skip" and self._nonfinite_step(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return torch.zeros((), device=self.device), ignored.detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.write(index, z)
        return loss.detach(), ignored.detach()

    # ------------------------------------------------------------- method pieces, the monitor's checks
    @torch.no_grad()
    def fill_memory_bank(self) -> None:
        """One no-grad pass in train mode over the epoch-0 sampler order (fresh augmentations)."""
        t0 = time.time()
        self.sampler.set_epoch(0, start=0, aug_tag=-1)
        self.ddp.train()

        def embed(crop_batch: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.ddp(crop_batch.to(self.device, non_blocking=True))

        batches = ((index.to(self.device), crops) for index, crops in self._iter(self.loader, "fill memory bank"))
        self.method.fill(batches, embed)
        log.info("memory bank filled: %d embeddings x %d views per rank (%.1f s)", self.method.bank.size,
                 len(self.method.crops_for_mb), time.time() - t0)

    def cluster(self, epoch: int) -> None:
        """k-means over the banks; the centroids become the model's prototypes for this epoch."""
        t0 = time.time()
        self.model.set_prototypes(self.method.cluster(epoch))
        seconds = time.time() - t0
        stats = self.method.stats() if self.info.is_main else []
        self.reporter.kmeans(epoch, seconds, stats, self.method.num_clusters)
        self.monitor.clustered(stats)

    def check_epoch(self) -> None:
        """After an epoch's checkpoint: the monitor's checks that are due (all ranks), handed to the reporter."""
        s = self.state
        final = s.epoch == self.epochs
        if self.monitor.knn_due(s.epoch, final):
            # from half the epochs on, a run that does not beat its starting network says so
            self.reporter.knn(self.monitor.knn(s.epoch), top1_init=s.knn_top1_init, late=2 * s.epoch >= self.epochs)
        if self.monitor.diagnosis_due(s.epoch, final):
            found = self.monitor.diagnose(s.epoch, s.global_step, s.knn_top1_init, self.method.bank)
            if found is not None:
                self.reporter.diagnosis(found)

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, epoch_end: bool) -> None:
        self.assert_finite()
        s = self.state
        main = None
        if self.info.is_main:
            main = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(), "train_state": asdict(s), **self.method.state_dict(),
                    "rng": rng_state(), "config_yaml": self.resolved.yaml(), "world_size": self.info.world_size}
        bank = {"bank": self.method.bank.state_dict(), "rng": rng_state()}
        meta = {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
                "epoch_end": epoch_end, **self.run_tags}
        t0 = time.time()
        try:
            self.ckpt.save(CheckpointManager.name_for(s.global_step), main, bank, meta)
        except BaseException:  # the previous checkpoint's upload failed
            self.reporter.checkpoint_failed()
            raise
        self.reporter.checkpoint_saved(s.global_step, time.time() - t0)

    def wait_checkpoint(self) -> None:
        """Wait for the in-flight checkpoint; export its figures; count a failure before re-raising it."""
        try:
            self.ckpt.wait()
        except BaseException:
            self.reporter.checkpoint_failed()
            raise
        self.reporter.checkpoint_done(self.ckpt.last_result)

    def resume(self) -> bool:
        """Load the newest committed checkpoint of CHECKPOINT.DIR. Returns whether the bank was restored."""
        manifest = self.ckpt.latest()
        if manifest is None:
            return False
        st = self.ckpt.load_state(manifest)
        self.resumed_from = manifest
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.state = TrainState(**st["train_state"])
        self.method.load_state_dict(st)
        bank = self.ckpt.load_bank(manifest)
        log.info("resumed from %s (epoch %d, step %d of %d)", manifest["name"], self.state.epoch,
                 self.state.step_in_epoch, self.steps_per_epoch)
        if bank is None:
            log.warning("the checkpoint was written by %d processes and this run has %d: the memory banks are "
                        "re-initialised by a fill pass", manifest["world_size"], self.info.world_size)
            set_rng_state(st["rng"])
            return False
        self.method.bank.load_state_dict(bank["bank"])
        set_rng_state(bank["rng"])
        return True

    # ---------------------------------------------------------------------------- guards, the log window
    def _nonfinite_step(self, loss: torch.Tensor) -> bool:
        """Skip policy: whether any rank's loss, or the (all-reduced) gradient, is non-finite. All ranks agree
        (one small all-reduce and one host sync per step: the price of this policy). The skipped step changes
        nothing: no update, no memory-bank write."""
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        if not self.scaler.is_enabled():  # fp16's GradScaler already skips steps with inf/NaN gradients
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                norm = torch.stack(torch._foreach_norm(grads)).sum()
                flag = torch.maximum(flag, (~torch.isfinite(norm)).float().reshape(1))
        if self.info.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bool(flag.item()):
            return False
        self.skipped_steps += 1
        limit = self.cfg.TRAINER.MAX_NONFINITE_SKIPS
        self.reporter.nonfinite_skipped(self.state.global_step, self.skipped_steps, limit)
        if self.skipped_steps > limit:
            self.reporter.nonfinite_stop()
            raise TrainingError(f"{self.skipped_steps} steps with a non-finite loss or gradient, more than "
                                f"config.TRAINER.MAX_NONFINITE_SKIPS={limit}; the last committed checkpoint in "
                                f"{self.cfg.CHECKPOINT.DIR} is intact. Lower the learning rate or check the data")
        return True

    def assert_finite(self) -> None:
        """Refuse to checkpoint a model with NaN/inf parameters (the last committed checkpoint stays the newest)."""
        params = [p.detach() for p in self.model.parameters()]
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(params)).sum())):
            return
        self.reporter.nonfinite_stop()
        raise TrainingError(f"non-finite model parameters at step {self.state.global_step} (a NaN/inf loss or "
                            f"gradient); nothing was saved and the last committed checkpoint in "
                            f"{self.cfg.CHECKPOINT.DIR} is intact. Lower the learning rate, check the data, or set "
                            "config.TRAINER.NONFINITE_POLICY=skip")

    def _log_window(self, loss_sum, ignored_sum, n, lr, data_wait, seconds) -> dict:
        """The window's record (its ``step`` event), handed to the reporter; a non-finite loss stops the run."""
        loss_total, ignored_total = torch.stack([loss_sum, ignored_sum]).tolist()  # the host sync of this window
        s = self.state
        loss = loss_total / max(1, n)
        images = n * self.batch * self.info.world_size
        rec = {"epoch": s.epoch, "step": s.step_in_epoch, "global_step": s.global_step, "loss": loss, "lr": lr,
               "images_per_s": images / max(seconds, 1e-9), "data_wait_ratio": data_wait / max(seconds, 1e-9),
               "ignored_ratio": ignored_total / max(1, n), "bad_images": self.dataset.bad_count.value}
        self.reporter.checkpoint_done(self.ckpt.last_result)
        self.reporter.window(rec, seconds / max(1, n))
        if not math.isfinite(loss):
            raise TrainingError(f"the loss is {loss} at step {s.global_step}; the last committed checkpoint in "
                                f"{self.cfg.CHECKPOINT.DIR} is intact. Lower the learning rate or check the data")
        return rec

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else nullcontext()

    def to_device(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c.to(self.device, non_blocking=True) for c in crops]

    def _iter(self, loader, desc: str):
        if not self.progress:
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def train(resolved: Resolved) -> dict:
    info = D.env_info()
    setup_logging(info.rank)
    training = None
    try:
        training = TrainingRun(resolved, info)
        return training.run()
    finally:
        if training is not None:
            training.close()
        D.destroy()
