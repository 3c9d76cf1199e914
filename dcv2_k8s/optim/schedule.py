"""Learning-rate schedules of ``OPTIMIZER.param_schedulers.lr``, evaluated per step.

Follows VISSL (fvcore) semantics: a scheduler maps training progress ``where`` in [0, 1) to a value. In a
``composite`` schedule each child covers ``lengths[i]`` of training; with ``interval_scaling: rescaled`` the
child sees its own progress (0..1 inside its segment), with ``fixed`` it sees the global progress (VISSL's
default ``[rescaled, fixed]`` therefore starts its cosine at 4.8 x 0.976 and ends at the cosine's end value).
``swav_warmup_cosine`` is the swav reference form: ``linspace(start_warmup, base_lr)`` over the warmup
steps, then cosine from ``base_lr`` to ``final_lr`` over the remaining steps.
"""

from __future__ import annotations

import bisect
import math


def _single(cfg: dict, where: float, epoch_frac: float) -> float:
    name = cfg["name"]
    if name == "constant":
        return float(cfg["value"])
    if name == "linear":
        return cfg["start_value"] + (cfg["end_value"] - cfg["start_value"]) * where
    if name == "cosine":
        return cfg["end_value"] + 0.5 * (cfg["start_value"] - cfg["end_value"]) * (1 + math.cos(math.pi * where))
    if name in ("multistep", "step"):
        # values[i] until milestones[i] (in epochs); VISSL's multistep
        milestones = list(cfg.get("milestones") or [])
        return float(cfg["values"][bisect.bisect_right(milestones, epoch_frac)])
    raise ValueError(f"unknown scheduler {name!r}")


class LRSchedule:
    """``schedule(step)`` -> learning rate for the global step ``step`` (0-based)."""

    def __init__(self, lr_cfg: dict, total_steps: int, steps_per_epoch: int):
        self.cfg = lr_cfg
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)

    def where(self, step: int) -> float:
        if self.cfg.get("update_interval", "step") == "epoch":
            step = (step // self.steps_per_epoch) * self.steps_per_epoch
        return min(step / self.total_steps, 1.0 - 1e-12)

    def __call__(self, step: int) -> float:
        cfg = self.cfg
        where = self.where(step)
        epoch_frac = step / self.steps_per_epoch
        name = cfg["name"]
        if name == "swav_warmup_cosine":
            warm = cfg.get("warmup_fraction", 0.0) * self.total_steps
            warm_steps = int(round(warm))
            base, final = float(cfg["base_lr"]), float(cfg.get("final_lr", 0.0))
            if step < warm_steps:
                start = float(cfg.get("start_warmup", 0.0))
                return start + (base - start) * step / max(1, warm_steps - 1)
            t = (step - warm_steps) / max(1, self.total_steps - warm_steps)
            return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))
        if name != "composite":
            return _single(cfg, where, epoch_frac)
        lengths = list(cfg["lengths"])
        scaling = list(cfg.get("interval_scaling") or ["rescaled"] * len(lengths))
        start = 0.0
        for i, (length, child) in enumerate(zip(lengths, cfg["schedulers"])):
            if where < start + length or i == len(lengths) - 1:
                inner = where if scaling[i] == "fixed" else (where - start) / length
                return _single(child, min(inner, 1.0), epoch_frac)
            start += length
        raise AssertionError("unreachable")
