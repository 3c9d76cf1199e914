"""The DeepClusterV2 network: trunk per resolution group, head once, L2-normalised embeddings."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from dcv2_k8s.model.head import build_head
from dcv2_k8s.model.resnet import build_trunk


class DCv2Model(nn.Module):
    """``forward(crops)`` takes the list of crop batches (crop-major) and returns ``[n_crops * B, D]``.

    Consecutive crops of the same size go through the trunk as one batch (so trunk BN statistics are per
    resolution group, as the reference); the head runs once over all pooled features.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, channels_last: bool = False):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.channels_last = channels_last

    def trunk_features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats = []
        for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            x = torch.cat(list(group))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(self.trunk(x))
        return torch.cat(feats)

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        z = self.head(self.trunk_features(crops))
        return F.normalize(z.float(), dim=1)


def build_model(model_cfg) -> DCv2Model:
    model = DCv2Model(build_trunk(model_cfg.TRUNK), build_head(model_cfg.HEAD), bool(model_cfg.CHANNELS_LAST))
    if model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
