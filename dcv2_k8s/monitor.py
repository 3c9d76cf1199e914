"""Watches what the run learns: the k-NN monitor of the frozen trunk and the collapse diagnostics with their warnings.

The monitor keeps what one check needs from the checks before it (the last k-NN result, the last k-means' cluster
statistics, the weights it started from, the warnings that hold) and returns its results; the training loop hands
them to the run's reporter (``reporter.py``). Monitoring leaves the run's random stream as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dcv2_k8s import distributed as D
from dcv2_k8s.dcv2.collapse import WeightChange, collapse_warnings, feature_stats
from dcv2_k8s.eval.knn import extract_features, knn_eval


@dataclass
class KnnCheck:
    """One k-NN check after ``epoch`` epochs; ``scores`` as :func:`knn_eval` returns them (``top1``, ``top5``, ...)."""
    epoch: int
    scores: dict
    seconds: float


@dataclass
class Diagnosis:
    """One collapse check (rank 0). ``record``: its ``diagnostics`` event (statistics, weight change, ``warnings``);
    ``appeared``: the warnings whose condition did not hold at the check before; ``ended``: the kinds of warning
    that held then and no longer do."""
    record: dict
    appeared: list[str]
    ended: list[str]


def _due(every: int, epoch: int, final: bool) -> bool:
    return every > 0 and (epoch % every == 0 or final)


class RunMonitor:
    """The checks of one run on this process. ``knn`` and ``diagnose`` run on all ranks (the features are
    extracted in parallel); only rank 0 gets a :class:`Diagnosis`."""

    def __init__(self, cfg, info: D.DistInfo, device: torch.device, model: torch.nn.Module, dataset, schedule,
                 total_steps: int):
        self.cfg, self.info, self.device = cfg, info, device
        self.model, self.dataset = model, dataset
        self.schedule, self.total_steps = schedule, total_steps
        self.knn_every = cfg.MONITOR.KNN_FREQUENCY if cfg.DATA.TEST.DATA_PATHS else 0
        self.diag_every = cfg.MONITOR.DIAG_FREQUENCY
        self.weight_change: WeightChange | None = None  # rank 0, from the weights this process starts training with
        self.warnings: list[dict] = []  # every collapse warning of this process (epoch, kind, message)
        self._holding: set[str] = set()  # the kinds of warning whose condition held at the last check
        self._knn_last: KnnCheck | None = None  # the k-NN check since the last diagnosis
        self._heads: list[dict] = []  # the last k-means' cluster statistics
        self._lr_peak: float | None = None

    def knn_due(self, epoch: int, final: bool) -> bool:
        return _due(self.knn_every, epoch, final)

    def diagnosis_due(self, epoch: int, final: bool) -> bool:
        return _due(self.diag_every, epoch, final)

    def start(self) -> None:
        """Before this process's first step: its weights become the reference of the weight change (rank 0)."""
        if self.diag_every > 0 and self.info.is_main:
            self.weight_change = WeightChange(self.model)

    def clustered(self, heads: list[dict]) -> None:
        """The cluster statistics of the epoch's k-means (``DeepClusterV2.stats``), for the next diagnosis."""
        self._heads = heads

    def knn(self, epoch: int) -> KnnCheck:
        """Weighted k-NN of the frozen trunk: DATA.TRAIN as memory, DATA.TEST as queries."""
        cfg = self.cfg
        t0 = time.time()
        mean, std = cfg.DATA.TRAIN.normalize
        with torch.random.fork_rng(devices=[]):
            scores = knn_eval(self.model.trunk, self.dataset.root, cfg.DATA.TEST.DATA_PATHS[0],
                              cfg.DATA.TRAIN.multicrop.large_size, self.device, cfg.MONITOR.KNN_K,
                              cfg.MONITOR.KNN_TEMPERATURE, self.info.rank, self.info.world_size, num_workers=0,
                              mean=mean, std=std, pre=cfg.DATA.TRAIN.preprocess)
        from dcv2_k8s.eval import what_was_scored

        scores.update(what_was_scored(cfg, cfg.DATA.TRAIN.multicrop.large_size,
                                      f"this run after {epoch} epochs" if epoch else
                                      cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE or None))
        self._knn_last = KnnCheck(epoch, scores, time.time() - t0)
        return self._knn_last

    def diagnose(self, epoch: int, global_step: int, knn_top1_init: float, bank) -> Diagnosis | None:
        """Collapse diagnostics after an epoch: the trunk's features of a fixed subset of the training images
        (effective rank, mean pairwise cosine), the memory bank's embeddings (the head's output), the last k-means
        (cluster-size entropy, NMI vs the epoch before) and each layer's weight change, with the warnings they call
        for (``collapse_warnings``). ``knn_top1_init``: the k-NN top-1 at initialisation (-1: not measured)."""
        cfg = self.cfg
        t0 = time.time()
        n = len(self.dataset)
        want = max(2, min(n, cfg.MONITOR.DIAG_IMAGES))
        picked = [i * n // want for i in range(want)]
        mean, std = cfg.DATA.TRAIN.normalize
        with torch.random.fork_rng(devices=[]):
            feats, _ = extract_features(self.model.trunk, self.dataset.root, cfg.DATA.TRAIN.multicrop.large_size,
                                        self.device, rank=self.info.rank, world_size=self.info.world_size,
                                        num_workers=0, mean=mean, std=std, indices=picked,
                                        pre=cfg.DATA.TRAIN.preprocess)
        if not self.info.is_main:
            return None
        if self._lr_peak is None:
            self._lr_peak = max(self.schedule(t) for t in range(0, self.total_steps, max(1, self.total_steps // 1000)))
        diag = {"epoch": epoch, "global_step": global_step, "lr": self.schedule(max(0, global_step - 1)),
                "lr_peak": self._lr_peak,
                "trunk": feature_stats(feats), "embedding": feature_stats(bank.embeddings[0][bank.indices >= 0]),
                "heads": self._heads, "weight_change": self.weight_change.update(),
                "seconds": 0.0}
        knn = self._knn_last
        if knn is not None and knn_top1_init >= 0:
            diag["knn_top1"], diag["knn_top1_init"] = knn.scores["top1"], knn_top1_init
        found = collapse_warnings(diag)
        diag["warnings"] = [m for _, m in found]
        diag["seconds"] = time.time() - t0
        kinds = {k for k, _ in found}
        if "knn_top1" not in diag:  # no k-NN this epoch: its condition stays as it was
            kinds |= self._holding & {"knn_below_init"}
        appeared = [m for k, m in found if k not in self._holding]
        self.warnings += [{"epoch": epoch, "kind": k, "message": m} for k, m in found]
        ended = sorted(self._holding - kinds)
        self._holding = kinds
        self._knn_last = None
        return Diagnosis(diag, appeared, ended)
