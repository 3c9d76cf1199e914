"""The DeepClusterV2 training loop.

Start-up: process group -> data -> model (SyncBN, DDP) -> optimizer -> resume -> fill the memory bank.
Every epoch: ``sampler.set_epoch`` -> k-means over the banks (centroids + assignment table) -> steps.
Every step: LR from the schedule, forward (AMP as configured), loss against the table, backward, LARC/SGD
step, bank write. The only host synchronisation in a step is every ``LOG_FREQUENCY`` steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from dcv2_k8s import distributed as D
from dcv2_k8s import exitcodes
from dcv2_k8s.checkpoint import CheckpointManager, rng_state, set_rng_state
from dcv2_k8s.config.loader import Resolved, to_yaml
from dcv2_k8s.data.dataset import IndexedImageFolder, ResumableDistributedSampler
from dcv2_k8s.data.stage import local_data_dir
from dcv2_k8s.data.cv_transforms import limit_threads
from dcv2_k8s.data.transforms import build_multicrop, normalize_params
from dcv2_k8s.dcv2.kmeans import cluster_memory
from dcv2_k8s.dcv2.loss import dcv2_loss
from dcv2_k8s.dcv2.memory_bank import MemoryBank
from dcv2_k8s.dcv2.stats import head_stats
from dcv2_k8s.eval.knn import knn_eval
from dcv2_k8s.metrics import Metrics
from dcv2_k8s.model import build_model
from dcv2_k8s.model.syncbn import convert_sync_bn
from dcv2_k8s.optim import LRSchedule, build_optimizer
from dcv2_k8s.storage import StorageError
from dcv2_k8s.trainer_status import TrainerStatusReporter

log = logging.getLogger("dcv2")


class TrainingError(RuntimeError):
    """A failure the user can act on (message says what to do)."""


class Preempted(Exception):
    """SIGTERM received: a checkpoint was committed and the process should exit with exitcodes.PREEMPTED."""


@dataclass
class TrainState:
    epoch: int = 0           # current epoch (0-based)
    step_in_epoch: int = 0   # steps of this epoch already done
    global_step: int = 0     # steps done in total


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [dcv2 r{rank}] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def amp_settings(amp_cfg, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(enabled, dtype, use GradScaler) from MODEL.AMP_PARAMS; AMP_TYPE apex O1/O2 maps to native autocast."""
    if not amp_cfg.USE_AMP:
        return False, torch.float32, False
    if str(dict(amp_cfg.AMP_ARGS).get("opt_level", "O1")) == "O0":  # O3 is refused by config validation
        return False, torch.float32, False
    dtype = torch.bfloat16 if amp_cfg.DTYPE == "bfloat16" else torch.float16
    if device.type != "cuda" and dtype == torch.float16:
        log.warning("mixed precision float16 needs CUDA; running float32 on %s (set "
                    "config.MODEL.AMP_PARAMS.DTYPE=bfloat16 for CPU autocast)", device)
        return False, torch.float32, False
    return True, dtype, dtype == torch.float16


def steps_per_epoch(num_samples: int, world_size: int, batch: int) -> int:
    return math.ceil(num_samples / world_size) // batch


def _loader_worker_init(worker_id: int) -> None:
    """Each DataLoader worker leaves its rank's process group: on preemption torchrun signals the rank's whole
    group, and the rank must keep its workers while it finishes the step and commits a checkpoint. The rank
    still shuts its workers down normally, and they exit by themselves if the rank dies."""
    os.setpgrp()
    limit_threads()


class Trainer:
    """Owns every piece of one training run; ``run()`` trains to the end (or MAX_STEPS)."""

    def __init__(self, resolved: Resolved, info: D.DistInfo):
        self.resolved, self.cfg, self.info = resolved, resolved.cfg, info
        cfg = self.cfg
        self.device = D.pick_device(cfg.MACHINE.DEVICE, info.local_rank)
        D.init_process_group(info, cfg.DISTRIBUTED.BACKEND, self.device, float(cfg.DISTRIBUTED.TIMEOUT_SECONDS))
        seed_everything(int(cfg.SEED_VALUE), info.rank, bool(cfg.TRAINER.DETERMINISTIC))
        self.loss_cfg = cfg.LOSS.deepclusterv2_loss
        self.batch = int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA)

        # data
        transforms = [dict(t) for t in cfg.DATA.TRAIN.TRANSFORMS]
        backend = str(cfg.DATA.TRAIN.AUG_BACKEND)
        if backend == "opencv":
            limit_threads()
        self.dataset = IndexedImageFolder(local_data_dir(cfg), build_multicrop(transforms, backend),
                                          int(cfg.DATA.TRAIN.DATA_LIMIT), int(cfg.SEED_VALUE))
        self.sampler = ResumableDistributedSampler(len(self.dataset), info.world_size, info.rank, True,
                                                   int(cfg.SEED_VALUE))
        workers = int(cfg.DATA.NUM_DATALOADER_WORKERS)
        self.loader = DataLoader(self.dataset, batch_size=self.batch, sampler=self.sampler, drop_last=True,
                                 num_workers=workers, pin_memory=bool(cfg.DATA.PIN_MEMORY) and self.device.type == "cuda",
                                 prefetch_factor=int(cfg.DATA.PREFETCH_FACTOR) if workers else None,
                                 persistent_workers=workers > 0, worker_init_fn=_loader_worker_init)
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), info.world_size, self.batch)
        self.epochs = int(cfg.OPTIMIZER.num_epochs)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.large_size = int(transforms[0]["size_crops"][0]) if transforms[0]["name"] == "ImgPilToMultiCrop" \
            else 224
        self.norm = normalize_params(transforms)

        # model
        model = build_model(cfg.MODEL)
        self.num_clusters = [int(k) for k in self.loss_cfg.num_clusters]
        dim = int(self.loss_cfg.memory_params.embedding_dim)
        for h, k in enumerate(self.num_clusters):  # non-trainable prototypes, overwritten by k-means each epoch
            model.register_buffer(f"prototypes{h}", torch.zeros(k, dim))
        model = model.to(self.device)
        sbn = cfg.MODEL.SYNC_BN_CONFIG
        if info.distributed and sbn.CONVERT_BN_TO_SYNC_BN:
            group = D.bn_group(int(sbn.GROUP_SIZE), info)
            model = convert_sync_bn(model, sbn.SYNC_BN_TYPE, group, self.device)
        if cfg.MODEL.COMPILE:
            model.trunk.compile()  # in place: state-dict keys stay torchvision's
        self.model = model
        self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       **D.ddp_options()) if info.distributed else model

        # optimisation
        self.optimizer = build_optimizer(model, cfg.OPTIMIZER)
        self.amp, self.amp_dtype, use_scaler = amp_settings(cfg.MODEL.AMP_PARAMS, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.schedule = LRSchedule(dict(cfg.OPTIMIZER.param_schedulers.lr), self.total_steps, self.steps_per_epoch)

        # method state, owned here
        self.crops_for_mb = [int(c) for c in self.loss_cfg.memory_params.crops_for_mb]
        self.bank = MemoryBank(len(self.crops_for_mb), self.steps_per_epoch * self.batch, dim, self.device)
        self.table: torch.Tensor | None = None
        self.prev_table: torch.Tensor | None = None
        self.state = TrainState()
        self.ckpt = CheckpointManager(str(cfg.CHECKPOINT.DIR), info.rank, info.world_size,
                                      int(cfg.CHECKPOINT.KEEP_LAST), int(cfg.CHECKPOINT.KEEP_EVERY_EPOCHS),
                                      commit_timeout=float(cfg.DISTRIBUTED.TIMEOUT_SECONDS),
                                      retry_seconds=float(cfg.CHECKPOINT.UPLOAD_RETRY_SECONDS))
        self.metrics_file = self._metrics_log_path() if info.is_main else None
        self.progress = info.is_main and sys.stderr.isatty()
        mc = cfg.METRICS
        self.metrics = Metrics(str(cfg.RUN_NAME) or resolved.name.replace("/", "_"), info.node_rank,
                               bool(mc.ENABLED) and info.local_rank == 0, int(mc.PORT), str(mc.ADDR), resolved.name)
        self._ckpt_reported = None
        self._bad_reported = 0
        self.skip_nonfinite = str(cfg.TRAINER.NONFINITE_POLICY) == "skip"
        self.skipped_steps = 0
        self.stop_reason = ""           # "", "max_steps" or "preempted"
        self.stop = D.StopAgreement(info, float(cfg.DISTRIBUTED.TIMEOUT_SECONDS))
        # Kubeflow Trainer v2: progress, ETA and metrics in the TrainJob's status (when its variables are set)
        self.status = TrainerStatusReporter.from_env() if info.is_main else None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if not self.stop.requested:
            log.warning("SIGTERM: finishing the current step, then committing a checkpoint and exiting")
        self.stop.request()

    # ------------------------------------------------------------------------------------------ helpers
    def _metrics_log_path(self) -> str:
        """metrics.jsonl of the run. A local CHECKPOINT.DIR holds it directly; for object storage it is written
        to a local file and published next to the checkpoints with every checkpoint and at the end."""
        root = str(self.cfg.CHECKPOINT.DIR)
        if "://" not in root:
            return os.path.join(root, "metrics.jsonl")
        import hashlib
        import tempfile

        local = os.path.join(tempfile.gettempdir(), "dcv2-metrics", hashlib.sha1(root.encode()).hexdigest()[:12],
                             "metrics.jsonl")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        store = self.ckpt.store
        remote = store.join("metrics.jsonl")
        # continue the run's log (a resumed run appends to what the earlier attempts wrote)
        with open(local, "wb") as f:
            f.write(store.get_bytes(remote) if store.exists(remote) else b"")
        return local

    def publish_metrics_log(self, final: bool = False) -> None:
        """Copy metrics.jsonl next to the checkpoints. Best effort while training (an unreachable store must not
        stop the run: the next checkpoint publishes it again); the final copy must succeed."""
        if self.metrics_file is None or "://" not in str(self.cfg.CHECKPOINT.DIR):
            return
        with open(self.metrics_file, "rb") as f:
            data = f.read()
        try:
            self.ckpt.store.put_bytes(self.ckpt.store.join("metrics.jsonl"), data)
        except StorageError as e:
            if final or not e.transient:
                raise
            log.warning("metrics.jsonl not published this time: %s", e)

    def emit(self, kind: str, **values) -> None:
        """One JSON line per event in CHECKPOINT.DIR/metrics.jsonl (rank 0), for reports and tests."""
        if self.metrics_file is None:
            return
        os.makedirs(os.path.dirname(self.metrics_file) or ".", exist_ok=True)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"kind": kind, "time": time.time(), **values}) + "\n")

    def autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c.to(self.device, non_blocking=True) for c in crops]

    def centroids(self) -> list[torch.Tensor]:
        return [getattr(self.model, f"prototypes{h}") for h in range(len(self.num_clusters))]

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, epoch_end: bool) -> None:
        self.assert_finite()
        s = self.state
        main = None
        if self.info.is_main:
            main = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(), "train_state": asdict(s), "table": self.table.cpu(),
                    "prev_table": None if self.prev_table is None else self.prev_table.cpu(),
                    "rng": rng_state(), "config_yaml": to_yaml(self.cfg), "world_size": self.info.world_size}
        bank = {"bank": self.bank.state_dict(), "rng": rng_state()}
        meta = {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
                "epoch_end": epoch_end}
        t0 = time.time()
        try:
            self.ckpt.save(CheckpointManager.name_for(s.global_step), main, bank, meta)
        except BaseException:  # the previous checkpoint's upload failed
            self.metrics.checkpoint_failed()
            raise
        self.emit("checkpoint", global_step=s.global_step, snapshot_seconds=time.time() - t0)
        self.publish_metrics_log()

    def wait_checkpoint(self) -> None:
        """Wait for the in-flight checkpoint; export its figures; count a failure before re-raising it."""
        try:
            self.ckpt.wait()
        except BaseException:
            self.metrics.checkpoint_failed()
            raise
        self.report_checkpoint()

    def report_checkpoint(self) -> None:
        res = self.ckpt.last_result
        if res and res is not self._ckpt_reported:
            self._ckpt_reported = res
            self.metrics.checkpoint(res["seconds"], res["bytes"], res["time"])
            self.emit("checkpoint_done", **res)

    def resume(self) -> bool:
        """Load the newest committed checkpoint of CHECKPOINT.DIR. Returns whether the bank was restored."""
        manifest = self.ckpt.latest()
        if manifest is None:
            return False
        st = self.ckpt.load_state(manifest)
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.state = TrainState(**st["train_state"])
        self.table = st["table"].to(self.device)
        self.prev_table = None if st["prev_table"] is None else st["prev_table"].to(self.device)
        bank = self.ckpt.load_bank(manifest)
        log.info("resumed from %s (epoch %d, step %d of %d)", manifest["name"], self.state.epoch,
                 self.state.step_in_epoch, self.steps_per_epoch)
        if bank is None:
            log.warning("the checkpoint was written by %d processes and this run has %d: the memory banks are "
                        "re-initialised by a fill pass", manifest["world_size"], self.info.world_size)
            set_rng_state(st["rng"])
            return False
        self.bank.load_state_dict(bank["bank"])
        set_rng_state(bank["rng"])
        return True

    # ----------------------------------------------------------------------------------- method pieces
    @torch.no_grad()
    def fill_memory_bank(self) -> None:
        """One no-grad pass in train mode over the epoch-0 sampler order (fresh augmentations)."""
        t0 = time.time()
        self.sampler.set_epoch(0, start=0, aug_tag=-1)
        self.bank.ptr = 0
        self.ddp.train()
        for index, crops in self._iter(self.loader, "fill memory bank"):
            crops = self.to_device(crops)
            with self.autocast():
                views = [self.ddp(crops[c]) for c in self.crops_for_mb]
            self.bank.write(index.to(self.device), views)
        log.info("memory bank filled: %d embeddings x %d views per rank (%.1f s)", self.bank.size,
                 len(self.crops_for_mb), time.time() - t0)

    def cluster(self, epoch: int) -> None:
        t0 = time.time()
        centroids, table = cluster_memory(self.bank, self.num_clusters, int(self.loss_cfg.kmeans_iters),
                                          len(self.dataset), int(self.cfg.SEED_VALUE) * 100003 + epoch)
        for c, buf in zip(centroids, self.centroids()):
            buf.copy_(c)
        self.prev_table, self.table = self.table, table
        seconds = time.time() - t0
        stats = head_stats(table, self.num_clusters, self.prev_table) if self.info.is_main else []
        for s in stats:
            log.info("epoch %d k-means head %d: %d empty clusters, size entropy %.3f, ignored %.1f%%%s", epoch,
                     s["head"], s["empty_clusters"], s["size_entropy"], 100 * s["ignored_ratio"],
                     f", NMI vs previous {s['nmi_prev']:.3f}" if "nmi_prev" in s else "")
        log.info("epoch %d k-means: %.2f s for %d heads", epoch, seconds, len(self.num_clusters))
        self.metrics.kmeans(seconds, stats, self.num_clusters)
        self.emit("kmeans", epoch=epoch, seconds=seconds, heads=stats)

    def knn_monitor(self) -> dict | None:
        """Weighted k-NN of the frozen trunk: DATA.TRAIN as memory, DATA.TEST as queries (all ranks)."""
        test = list(self.cfg.DATA.TEST.DATA_PATHS)
        if not test:
            return None
        t0 = time.time()
        res = knn_eval(self.model.trunk, self.dataset.root, test[0], self.large_size, self.device,
                       int(self.cfg.MONITOR.KNN_K), float(self.cfg.MONITOR.KNN_TEMPERATURE), self.info.rank,
                       self.info.world_size, num_workers=0, mean=self.norm[0], std=self.norm[1])
        log.info("epoch %d k-NN: top-1 %.2f%% top-5 %.2f%% (%.1f s)", self.state.epoch, res["top1"], res["top5"],
                 time.time() - t0)
        self.emit("knn", epoch=self.state.epoch, **res)
        self.metrics.knn(res["top1"], res["top5"])
        if self.status is not None:
            self.status.update(knn_top1=res["top1"])
        return res

    def _iter(self, loader, desc: str):
        if not self.progress:
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        cfg, s = self.cfg, self.state
        log.info("training %s: %d images, %d processes x batch %d, %d steps/epoch, %d epochs, device %s",
                 self.resolved.name, len(self.dataset), self.info.world_size, self.batch, self.steps_per_epoch,
                 self.epochs, self.device)
        bank_ok = bool(cfg.CHECKPOINT.AUTO_RESUME) and self.resume()
        s = self.state
        init = str(cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE)
        if init and s.global_step == 0:
            from dcv2_k8s.weights import load_weights

            log.info("initial weights from %s (%s layout)", init, load_weights(self.model, init))
        if not bank_ok:
            self.fill_memory_bank()
            self.bank.ptr = s.step_in_epoch * self.batch
        max_steps = int(cfg.TRAINER.MAX_STEPS)
        iter_freq = int(cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY)
        epoch_freq = int(cfg.CHECKPOINT.CHECKPOINT_FREQUENCY)
        last = {}
        while s.epoch < self.epochs:
            if s.step_in_epoch == 0:
                self.cluster(s.epoch)
                self.bank.ptr = 0
            last = self.train_one_epoch(max_steps, iter_freq)
            epoch_done = s.step_in_epoch == self.steps_per_epoch
            if epoch_done:
                s.epoch += 1
                s.step_in_epoch = 0
            if self.stop_reason:
                self.save_checkpoint(epoch_end=epoch_done)
                self.wait_checkpoint()
                if self.stop_reason == "preempted":
                    log.warning("checkpoint committed at step %d; exiting with code %d (restart to resume)",
                                s.global_step, exitcodes.PREEMPTED)
                    raise Preempted()
                log.info("stopped after %d steps (config.TRAINER.MAX_STEPS)", s.global_step)
                return last
            if s.epoch % max(1, epoch_freq) == 0 or s.epoch == self.epochs:
                self.save_checkpoint(epoch_end=True)
            knn_every = int(cfg.MONITOR.KNN_FREQUENCY)
            if knn_every > 0 and (s.epoch % knn_every == 0 or s.epoch == self.epochs):
                self.knn_monitor()
        self.wait_checkpoint()
        log.info("training finished: %d epochs, %d steps", self.epochs, s.global_step)
        if self.status is not None:
            self.status.update(100.0, 0.0, epoch=self.epochs, global_step=s.global_step)
        self.publish_metrics_log(final=True)
        return last

    def train_one_epoch(self, max_steps: int, iter_freq: int) -> dict:
        s, cfg = self.state, self.cfg
        self.sampler.set_epoch(s.epoch, start=s.step_in_epoch * self.batch)
        self.ddp.train()
        temperature = float(self.loss_cfg.temperature)
        log_every = max(1, int(cfg.LOG_FREQUENCY))
        loss_sum = torch.zeros((), device=self.device)
        ignored_sum = torch.zeros((), device=self.device)
        n_acc, data_wait, t_window, last = 0, 0.0, time.time(), {}
        t_end = time.time()
        node_images = self.batch * self.info.local_world_size
        for index, crops in self._iter(self.loader, f"epoch {s.epoch}"):
            t_start = time.time()
            wait = t_start - t_end
            data_wait += wait
            lr = self.schedule(s.global_step)
            loss, ignored = self.train_step(index, crops, lr, temperature)
            loss_sum += loss
            ignored_sum += ignored
            self.metrics.step(node_images, time.time() - t_end, wait)
            n_acc += 1
            s.global_step += 1
            s.step_in_epoch += 1
            if s.global_step % log_every == 0 or s.step_in_epoch == self.steps_per_epoch:
                last = self._log_window(loss_sum, ignored_sum, n_acc, lr, data_wait, time.time() - t_window)
                loss_sum.zero_()
                ignored_sum.zero_()
                n_acc, data_wait, t_window = 0, 0.0, time.time()
            if iter_freq > 0 and s.global_step % iter_freq == 0 and s.step_in_epoch < self.steps_per_epoch:
                self.save_checkpoint(epoch_end=False)
            if self.stop.poll():  # every step: a SIGTERM is acted on within two steps
                self.stop_reason = "preempted"
                break
            if 0 < max_steps <= s.global_step:
                self.stop_reason = "max_steps"
                break
            t_end = time.time()
        return last

    def train_step(self, index: torch.Tensor, crops: list[torch.Tensor], lr: float, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on one batch; returns the (device) loss and ignored ratio. No host sync."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        crops = self.to_device(crops)
        index = index.to(self.device, non_blocking=True)
        with self.autocast():
            z = self.ddp(crops)
        loss, ignored = dcv2_loss(z.float(), index, self.centroids(), self.table, temperature)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.skip_nonfinite and self._nonfinite_step(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return torch.zeros((), device=self.device), ignored.detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        b = index.shape[0]
        self.bank.write(index, [z[c * b:(c + 1) * b] for c in self.crops_for_mb])
        return loss.detach(), ignored.detach()

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
        self.metrics.nonfinite(skipped=True)
        self.emit("nonfinite_skip", global_step=self.state.global_step, skipped=self.skipped_steps)
        limit = int(self.cfg.TRAINER.MAX_NONFINITE_SKIPS)
        log.warning("non-finite loss or gradient at step %d: step skipped (%d of at most %d)",
                    self.state.global_step, self.skipped_steps, limit)
        if self.skipped_steps > limit:
            self.metrics.nonfinite(skipped=False)
            raise TrainingError(f"{self.skipped_steps} steps with a non-finite loss or gradient, more than "
                                f"config.TRAINER.MAX_NONFINITE_SKIPS={limit}; the last committed checkpoint in "
                                f"{self.cfg.CHECKPOINT.DIR} is intact. Lower the learning rate or check the data")
        return True

    def assert_finite(self) -> None:
        """Refuse to checkpoint a model with NaN/inf parameters (the last committed checkpoint stays the newest)."""
        params = [p.detach() for p in self.model.parameters()]
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(params)).sum())):
            return
        self.metrics.nonfinite(skipped=False)
        raise TrainingError(f"non-finite model parameters at step {self.state.global_step} (a NaN/inf loss or "
                            f"gradient); nothing was saved and the last committed checkpoint in "
                            f"{self.cfg.CHECKPOINT.DIR} is intact. Lower the learning rate, check the data, or set "
                            "config.TRAINER.NONFINITE_POLICY=skip")

    def _log_window(self, loss_sum, ignored_sum, n, lr, data_wait, seconds) -> dict:
        loss = float(loss_sum) / max(1, n)  # the host sync of this window
        self.metrics.window(loss, lr, self.state.epoch, self.state.global_step, self.total_steps,
                            float(ignored_sum) / max(1, n))
        bad = self.dataset.bad_count.value
        self.metrics.bad_images_seen(bad - self._bad_reported)
        self._bad_reported = bad
        self.report_checkpoint()
        if not math.isfinite(loss):
            raise TrainingError(f"the loss is {loss} at step {self.state.global_step}; the last committed "
                                f"checkpoint in {self.cfg.CHECKPOINT.DIR} is intact. Lower the learning rate "
                                "or check the data")
        images = n * self.batch * self.info.world_size
        rec = {"epoch": self.state.epoch, "step": self.state.step_in_epoch, "global_step": self.state.global_step,
               "loss": loss, "lr": lr, "images_per_s": images / max(seconds, 1e-9),
               "data_wait_ratio": data_wait / max(seconds, 1e-9), "ignored_ratio": float(ignored_sum) / max(1, n),
               "bad_images": bad}
        log.info("epoch %d step %d/%d loss %.4f lr %.4g %.1f img/s data-wait %.0f%% ignored %.1f%%", rec["epoch"],
                 rec["step"], self.steps_per_epoch, loss, lr, rec["images_per_s"], 100 * rec["data_wait_ratio"],
                 100 * rec["ignored_ratio"])
        self.emit("step", **rec)
        if self.status is not None:
            left = (self.total_steps - self.state.global_step) * seconds / max(1, n)
            self.status.update(100.0 * self.state.global_step / max(1, self.total_steps), left, loss=loss,
                               epoch=self.state.epoch, global_step=self.state.global_step,
                               images_per_s=rec["images_per_s"])
        return rec


def train(resolved: Resolved) -> dict:
    info = D.env_info()
    setup_logging(info.rank)
    for note in resolved.notes:
        if info.is_main:
            log.info("config: %s", note)
    trainer = None
    try:
        trainer = Trainer(resolved, info)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.metrics.close()
            if trainer.status is not None:
                trainer.status.close(flush=True)
            try:
                trainer.stop.finish()
            except Exception:  # a peer is gone: the process group is torn down anyway
                pass
        D.destroy()
