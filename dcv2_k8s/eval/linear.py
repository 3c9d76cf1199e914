"""Linear evaluation of a frozen trunk: ``dcv2 linear-eval <tokens>``.

The trunk (weights from ``MODEL.WEIGHTS_INIT.PARAMS_FILE``: our checkpoint, a torchvision, swav or VISSL file)
runs in eval mode without gradients; only a classifier on its global-average-pooled features is trained:
``LINEAR_EVAL.HEAD: linear`` (the swav reference: one Linear, N(0, 0.01) init) or ``bn_linear`` (VISSL's
res5avg head: BatchNorm + Linear). Training crops: RandomResizedCrop + flip; validation: resize + center crop.
Top-1/top-5 on ``DATA.TEST`` after every epoch; the best and the last are reported, as JSON and metrics.

``LINEAR_EVAL.FEATURE_CACHE: true`` (fast mode) extracts the frozen features once (center crop, no
augmentation) and trains the classifier on them: much faster, but an approximation (no augmentation).
Distributed like training (same launcher and env contract): each rank takes a shard, the classifier is DDP.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from dcv2_k8s import distributed as D
from dcv2_k8s.data.dataset import IndexedImageFolder, ResumableDistributedSampler, check_splits
from dcv2_k8s.data.stage import ensure_local
from dcv2_k8s.data.transforms import eval_transform
from dcv2_k8s.eval.knn import extract_features
from dcv2_k8s.metrics import PrometheusMetrics
from dcv2_k8s.model.resnet import build_trunk
from dcv2_k8s.optim import LRSchedule, param_groups
from dcv2_k8s.storage import open_storage, write_bytes

log = logging.getLogger("dcv2")


class Labelled(Dataset):
    """(image tensor, class) pairs from an IndexedImageFolder, with per-(epoch, index) seeded augmentation."""

    def __init__(self, folder: IndexedImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        index, x = self.folder[key]
        return x, self.folder.targets[index]


def train_transform(size: int, mean, std, pre=()):
    from torchvision.transforms import v2

    from dcv2_k8s.data.transforms import preprocess

    return v2.Compose([*preprocess(pre), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def build_head(kind: str, dim: int, classes: int) -> nn.Module:
    linear = nn.Linear(dim, classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim), linear) if kind == "bn_linear" else nn.Sequential(linear)


@torch.no_grad()
def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(), torch.tensor(len(y))]).float()


def _reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class LinearEval:
    def __init__(self, resolved, info: D.DistInfo):
        cfg = self.cfg = resolved.cfg
        self.info = info
        self.device = D.pick_device(cfg.MACHINE.DEVICE, info.local_rank)
        D.init_process_group(info, cfg.DISTRIBUTED.BACKEND, self.device, cfg.DISTRIBUTED.TIMEOUT_SECONDS)
        torch.manual_seed(cfg.SEED_VALUE)
        le = cfg.LINEAR_EVAL
        self.size = le.CROP_SIZE
        self.mean, self.std = cfg.DATA.TRAIN.normalize
        self.pre = cfg.DATA.TRAIN.preprocess  # the pretraining's whole-image preprocessing, in every view
        timeout = cfg.DISTRIBUTED.TIMEOUT_SECONDS * 6
        self.train_dir = ensure_local(cfg.DATA.TRAIN.DATA_PATHS[0], cfg.DATA.TRAIN.STAGE_DIR,
                                      info.local_rank, timeout)
        self.val_dir = ensure_local(cfg.DATA.TEST.DATA_PATHS[0], "", info.local_rank, timeout)
        self.trunk = build_trunk(cfg.MODEL.TRUNK)
        weights = cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE
        if weights:
            from dcv2_k8s.config import config_from_checkpoint
            from dcv2_k8s.config.dicts import given_in
            from dcv2_k8s.weights import load_into_trunk, read_file, split_weights

            obj = read_file(weights)
            layout, trunk_sd = split_weights(obj)[:2]
            if "config_yaml" in obj:  # ours: evaluate on the inputs it was trained on, unless this config sets a view
                ours = config_from_checkpoint(obj, for_training=False).cfg  # `dcv2 linear-eval`: weights.trunk_tokens
                set_here = resolved.cli_keys | resolved.file_keys  # empty: a parent's resolved file, already decided
                if set_here and not given_in("MODEL.TRUNK.INPUT_NORM", resolved.cli_keys) and \
                        cfg.MODEL.TRUNK.INPUT_NORM == "none" and ours.MODEL.TRUNK.INPUT_NORM != "none":
                    self.trunk.input_norm = ours.MODEL.TRUNK.INPUT_NORM
                    log.info("MODEL.TRUNK.INPUT_NORM=%s, as the checkpoint was trained", self.trunk.input_norm)
                if not self.pre and ours.DATA.TRAIN.preprocess:
                    self.pre = ours.DATA.TRAIN.preprocess
                    log.info("whole-image preprocessing %s, as the checkpoint was trained",
                             [e["name"] for e in self.pre])
            load_into_trunk(self.trunk, trunk_sd, weights)
            log.info("trunk weights from %s (%s layout)", weights, layout)
        else:
            log.warning("config.MODEL.WEIGHTS_INIT.PARAMS_FILE is empty: evaluating a randomly initialised trunk "
                        "(a baseline)")
        self.trunk = self.trunk.to(self.device).eval().requires_grad_(False)
        self.weights = weights or "random-init"
        self.num_classes = len(check_splits(self.train_dir, self.val_dir))  # same class names, or one line
        self.head = build_head(le.HEAD, self.trunk.out_dim, self.num_classes).to(self.device)
        self.ddp = DDP(self.head, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if info.distributed else self.head
        oc = cfg.OPTIMIZER
        groups = param_groups(self.head, oc.weight_decay, oc.regularize_bn, oc.regularize_bias)
        self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=oc.momentum, nesterov=oc.nesterov)
        self.epochs = oc.num_epochs
        self.batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
        self.progress = info.is_main and sys.stderr.isatty()
        self.metrics = PrometheusMetrics.of_run(resolved, info)
        self.set_keys = resolved.cli_keys | resolved.file_keys

    # ---------------------------------------------------------------------------------------- data
    def _loaders(self):
        cfg, info = self.cfg, self.info
        workers = cfg.DATA.NUM_DATALOADER_WORKERS
        if cfg.LINEAR_EVAL.FEATURE_CACHE:
            feats = {}
            for split, root in (("train", self.train_dir), ("val", self.val_dir)):
                feats[split] = extract_features(self.trunk, root, self.size, self.device, self.batch, workers,
                                                info.rank, info.world_size, self.mean, self.std,
                                                progress=self.progress, normalize=False, pre=self.pre)
            return feats
        train = IndexedImageFolder(self.train_dir, train_transform(self.size, self.mean, self.std, self.pre),
                                   seed=cfg.SEED_VALUE)
        val = IndexedImageFolder(self.val_dir, eval_transform(self.size, self.mean, self.std, self.pre))
        self.sampler = ResumableDistributedSampler(len(train), info.world_size, info.rank, True, cfg.SEED_VALUE)
        tl = DataLoader(Labelled(train), batch_size=self.batch, sampler=self.sampler, drop_last=True,
                        num_workers=workers, pin_memory=self.device.type == "cuda")
        vs = ResumableDistributedSampler(len(val), info.world_size, info.rank, shuffle=False)
        vl = DataLoader(Labelled(val), batch_size=self.batch, sampler=vs, num_workers=workers)
        return {"train": tl, "val": vl}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.trunk(x.to(self.device, non_blocking=True))

    # ---------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        from tqdm import tqdm

        data = self._loaders()
        cached = isinstance(data["train"], tuple)
        if cached:
            ftr, ytr = data["train"]
            g = torch.Generator().manual_seed(self.cfg.SEED_VALUE)
            steps_per_epoch = max(1, ftr.shape[0] // (self.batch * self.info.world_size))
        else:
            steps_per_epoch = len(data["train"])
        schedule = LRSchedule(self.cfg.OPTIMIZER.param_schedulers.lr, self.epochs * steps_per_epoch,
                              steps_per_epoch)
        history, step, t0 = [], 0, time.time()
        for epoch in range(self.epochs):
            self.ddp.train()
            if cached:
                perm = torch.randperm(ftr.shape[0], generator=g)
                mine = perm[self.info.rank::self.info.world_size][:steps_per_epoch * self.batch]
                batches = [(ftr[mine[i:i + self.batch]], ytr[mine[i:i + self.batch]])
                           for i in range(0, len(mine), self.batch)]
            else:
                self.sampler.set_epoch(epoch)
                batches = data["train"]
            for x, y in tqdm(batches, desc=f"linear eval epoch {epoch}", disable=not self.progress, leave=False):
                for grp in self.optimizer.param_groups:
                    grp["lr"] = schedule(step)
                feats = x.to(self.device) if cached else self._features(x)
                loss = F.cross_entropy(self.ddp(feats), y.to(self.device))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                step += 1
            top1, top5 = self.evaluate(data["val"], cached)
            history.append({"epoch": epoch + 1, "top1": top1, "top5": top5, "loss": loss.item()})
            log.info("linear eval epoch %d/%d: top-1 %.2f%% top-5 %.2f%% (loss %.3f)", epoch + 1, self.epochs, top1,
                     top5, loss.item())
            self.metrics.linear_eval(top1, top5)
        best = max(history, key=lambda h: h["top1"])
        from dcv2_k8s.eval import what_was_scored

        result = {"protocol": self.cfg.LINEAR_EVAL.HEAD, "feature_cache": self.cfg.LINEAR_EVAL.FEATURE_CACHE,
                  **what_was_scored(self.cfg, self.size, self.cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE,
                                    getattr(self.trunk, "input_norm", None), self.pre),
                  "epochs": self.epochs, "num_classes": self.num_classes,
                  "top1": best["top1"], "top5": best["top5"], "best_epoch": best["epoch"],
                  "final_top1": history[-1]["top1"], "final_top5": history[-1]["top5"],
                  "seconds": time.time() - t0, "history": history}
        if self.info.is_main:
            self.write(result)
        self.metrics.linear_eval(result["top1"], result["top5"])
        self.metrics.close()
        return result

    @torch.no_grad()
    def evaluate(self, val, cached: bool) -> tuple[float, float]:
        self.ddp.eval()
        counts = torch.zeros(3, device=self.device)
        if cached:
            fv, yv = val
            n = fv.shape[0]
            mine = torch.arange(self.info.rank, n, self.info.world_size)
            for i in range(0, len(mine), 1024):
                idx = mine[i:i + 1024]
                counts += _accuracy(self.head(fv[idx].to(self.device)), yv[idx].to(self.device)).to(self.device)
        else:
            for x, y in val:
                counts += _accuracy(self.head(self._features(x)), y.to(self.device)).to(self.device)
        counts = _reduce(counts)
        return float(100 * counts[0] / counts[2]), float(100 * counts[1] / counts[2])

    def write(self, result: dict) -> None:
        out = result_path(self.cfg, self.set_keys)
        write_bytes(out, json.dumps(result, indent=1).encode())
        log.info("linear eval: best top-1 %.2f%% (epoch %d), top-5 %.2f%%; written to %s", result["top1"],
                 result["best_epoch"], result["top5"], out)


def result_path(cfg, set_keys: set[str]) -> str:
    """Where linear evaluation writes its result (docs/evaluation.md): ``LINEAR_EVAL.OUTPUT`` when set, else
    ``CHECKPOINT.DIR/linear_eval.json`` when the config sets ``CHECKPOINT.DIR`` (``set_keys``: the keys the
    command line and config files set), else ``linear_eval.json`` next to the weights it evaluates (inside a run or
    checkpoint directory, local or ``s3://``; beside a weights file), else (a random trunk) in the current
    directory."""
    from dcv2_k8s.config.dicts import given_in

    weights = cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE
    if cfg.LINEAR_EVAL.OUTPUT:
        return cfg.LINEAR_EVAL.OUTPUT
    if given_in("CHECKPOINT.DIR", set_keys):
        return open_storage(cfg.CHECKPOINT.DIR).join("linear_eval.json")
    if not weights:
        return "linear_eval.json"
    if weights.startswith("s3://") or os.path.isdir(weights):  # how weights.read_file takes it: a directory
        run = weights.rstrip("/")
        if re.fullmatch(r"step_\d+", run.rsplit("/", 1)[-1]):  # a checkpoint of a run: retention deletes it later
            run = run.rsplit("/", 1)[0]
        return open_storage(run).join("linear_eval.json")
    return os.path.join(os.path.dirname(weights), "linear_eval.json")


def linear_eval(resolved) -> dict:
    from dcv2_k8s.runtime import setup_logging

    from dcv2_k8s.trainer_status import TrainerStatusReporter

    info = D.env_info()
    setup_logging(info.rank)
    status = TrainerStatusReporter.from_env() if info.is_main else None  # a linear-eval TrainJob's status
    try:
        res = LinearEval(resolved, info).run()
        if status is not None:
            status.update(100.0, 0.0, linear_top1=res["top1"], linear_top5=res["top5"])
        return res
    finally:
        if status is not None:
            status.close(flush=True)
        D.destroy()
