"""SGD + LARC with VISSL's parameter-group options, and the LR schedules."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dcv2_k8s.optim.larc import LARC
from dcv2_k8s.optim.schedule import LRSchedule

__all__ = ["LARC", "LRSchedule", "build_optimizer", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float, regularize_bn: bool, regularize_bias: bool) -> list[dict]:
    """One group with weight decay, and one without for BN parameters / biases when they are not regularised."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_bn = isinstance(module, _BatchNorm)
            is_bias = name == "bias" and not is_bn
            if (is_bn and not regularize_bn) or (is_bias and not regularize_bias):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, opt_cfg) -> torch.optim.Optimizer | LARC:
    """SGD (+ LARC) of ``OPTIMIZER`` (a typed ``config.schema.Optimizer``)."""
    if opt_cfg.name != "sgd":
        raise ValueError(f"config.OPTIMIZER.name={opt_cfg.name!r}: only sgd is supported")
    groups = param_groups(model, opt_cfg.weight_decay, opt_cfg.regularize_bn, opt_cfg.regularize_bias)
    sgd = torch.optim.SGD(groups, lr=0.0, momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov,
                          weight_decay=opt_cfg.weight_decay, foreach=True)
    if not opt_cfg.use_larc:
        return sgd
    lc = opt_cfg.larc_config
    return LARC(sgd, trust_coefficient=lc.trust_coefficient, clip=lc.clip, eps=lc.eps)
