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

from dcv2_k8s.schema import Schedule, build_section

# The scheduler names, the one list config validation reads: children of a composite, and top-level names.
CHILD_SCHEDULES = ("constant", "linear", "cosine", "multistep", "step")
SCHEDULES = CHILD_SCHEDULES + ("composite", "swav_warmup_cosine")


def _single(s: Schedule, where: float, epoch_frac: float) -> float:
    if s.name == "constant":
        return s.value
    if s.name == "linear":
        return s.start_value + (s.end_value - s.start_value) * where
    if s.name == "cosine":
        return s.end_value + 0.5 * (s.start_value - s.end_value) * (1 + math.cos(math.pi * where))
    if s.name in ("multistep", "step"):
        # values[i] until milestones[i] (in epochs); VISSL's multistep
        return s.values[bisect.bisect_right(list(s.milestones), epoch_frac)]
    raise ValueError(f"scheduler {s.name!r} cannot be a child of a composite schedule")


class LRSchedule:
    """``schedule(step)`` -> learning rate for the global step ``step`` (0-based), from a typed ``Schedule``
    (``cfg.OPTIMIZER.param_schedulers.lr``) or the same as a plain dict."""

    def __init__(self, lr: Schedule | dict, total_steps: int, steps_per_epoch: int):
        self.cfg = lr if isinstance(lr, Schedule) else build_section(Schedule, dict(lr), "OPTIMIZER.param_schedulers.lr")
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)

    def where(self, step: int) -> float:
        if self.cfg.update_interval == "epoch":
            step = (step // self.steps_per_epoch) * self.steps_per_epoch
        return min(step / self.total_steps, 1.0 - 1e-12)

    def __call__(self, step: int) -> float:
        s = self.cfg
        where = self.where(step)
        epoch_frac = step / self.steps_per_epoch
        if s.name == "swav_warmup_cosine":
            warm_steps = int(round((s.warmup_fraction or 0.0) * self.total_steps))
            base, final = s.base_lr, s.final_lr or 0.0
            if step < warm_steps:
                start = s.start_warmup or 0.0
                return start + (base - start) * step / max(1, warm_steps - 1)
            t = (step - warm_steps) / max(1, self.total_steps - warm_steps)
            return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))
        if s.name != "composite":
            return _single(s, where, epoch_frac)
        scaling = s.interval_scaling or ("rescaled",) * len(s.lengths)
        start = 0.0
        for i, (length, child) in enumerate(zip(s.lengths, s.schedulers)):
            if where < start + length or i == len(s.lengths) - 1:
                inner = where if scaling[i] == "fixed" else (where - start) / length
                return _single(child, min(inner, 1.0), epoch_frac)
            start += length
        raise AssertionError("unreachable")
