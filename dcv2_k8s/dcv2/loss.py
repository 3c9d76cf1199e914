"""DeepClusterV2 loss: cross-entropy of cosine scores / T against the previous epoch's k-means assignments."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcv2_k8s.dcv2.kmeans import IGNORE


def dcv2_loss(z: torch.Tensor, index: torch.Tensor, centroids: list[torch.Tensor], table: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one batch.

    Args:
        z: ``[n_crops * B, D]`` L2-normalised embeddings, crop-major (all images of crop 0, then crop 1, ...).
        index: ``[B]`` dataset indices of the images.
        centroids: per head ``[K_h, D]`` unit-norm centroids (non-trainable prototypes).
        table: ``[n_heads, N]`` assignments; -100 marks an image without a target (ignored).
        temperature: T in softmax(z . c / T).

    Returns:
        ``(loss, ignored_fraction)``: the mean over heads of the mean cross-entropy over non-ignored rows
        (0, not NaN, when every row is ignored), and the fraction of ignored rows (both 0-dim device tensors;
        no host synchronisation).
    """
    n_crops = z.shape[0] // index.shape[0]
    total = z.new_zeros(())
    ignored = z.new_zeros(())
    for h, c in enumerate(centroids):
        targets = table[h][index].repeat(n_crops)
        logits = z @ c.t() / temperature
        valid = (targets != IGNORE).sum()
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        total = total + ce / valid.clamp_min(1)
        ignored = ignored + 1 - valid.float() / targets.numel()
    return total / len(centroids), ignored / len(centroids)
