"""Synchronised batch norm: torch's SyncBatchNorm (CUDA), apex's, or our all-reduce BN (any device).

torch's ``SyncBatchNorm`` only runs on CUDA. :class:`AllReduceBatchNorm` computes the batch statistics
over a process group with one differentiable all-reduce of ``[sum, sum of squares, count]`` per layer, so
CPU runs use exactly the same grouping (and it equals plain BN over the concatenated group batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are reduced over ``process_group`` (None = all ranks)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training or not self.track_running_stats, self.momentum or 0.0, self.eps)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = _AllReduceSum.apply(stats, self.process_group)
        c = self.num_features
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_all_reduce_bn(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d in ``module`` by :class:`AllReduceBatchNorm` (state kept)."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, process_group)
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
    for name, child in module.named_children():
        out.add_module(name, convert_all_reduce_bn(child, process_group))
    return out


def convert_sync_bn(model: nn.Module, sync_type: str, process_group, device: torch.device) -> nn.Module:
    """Convert BN layers for synchronised statistics according to ``SYNC_BN_CONFIG.SYNC_BN_TYPE``."""
    if sync_type == "apex":
        try:
            from apex.parallel import convert_syncbn_model  # type: ignore
        except ImportError:
            raise RuntimeError("config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex but apex is not installed; set "
                               "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=pytorch") from None
        if device.type != "cuda":
            raise RuntimeError("apex SyncBN needs CUDA; set config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=pytorch")
        return convert_syncbn_model(model, process_group=process_group)
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return convert_all_reduce_bn(model, process_group)
