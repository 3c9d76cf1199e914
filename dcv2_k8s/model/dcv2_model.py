"""The DeepClusterV2 network: trunk, head and prototypes.

The DeepClusterV2 network: trunk per resolution group, head once, L2-normalised embeddings, and the
prototypes (one ``[K_h, D]`` buffer per head, written by k-means each epoch, never trained)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from dcv2_k8s.model.head import build_head
from dcv2_k8s.model.resnet import build_trunk


class DCv2Model(nn.Module):
    """``embed(crops)`` (= ``forward``) takes the list of crop batches (crop-major) and returns ``[n_crops * B, D]``.

    Consecutive crops of the same size go through the trunk as one batch (so trunk BN statistics are per
    resolution group, as the reference); the head runs once over all pooled features. The prototypes are buffers
    named ``prototypes{h}`` (so they travel in the state dict and with DDP's buffer broadcast).
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, num_clusters: tuple[int, ...] = (), embedding_dim: int = 0,
                 channels_last: bool = False):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.channels_last = channels_last
        self.num_heads = len(num_clusters)
        for h, k in enumerate(num_clusters):
            self.register_buffer(f"prototypes{h}", torch.zeros(k, embedding_dim))

    @property
    def prototypes(self) -> list[torch.Tensor]:
        return [getattr(self, f"prototypes{h}") for h in range(self.num_heads)]

    @torch.no_grad()
    def set_prototypes(self, centroids: list[torch.Tensor]) -> None:
        for buf, c in zip(self.prototypes, centroids, strict=True):
            buf.copy_(c)

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

    embed = forward


def build_model(cfg) -> DCv2Model:
    """Trunk, head and prototypes of a typed config (``config.schema.Config``)."""
    m, loss = cfg.MODEL, cfg.LOSS.deepclusterv2_loss
    model = DCv2Model(build_trunk(m.TRUNK), build_head(m.HEAD), loss.num_clusters, loss.memory_params.embedding_dim,
                      m.CHANNELS_LAST)
    if model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
