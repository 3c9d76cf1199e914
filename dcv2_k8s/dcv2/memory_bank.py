"""The per-rank memory bank of DeepClusterV2 (owned by the training loop, saved by every rank)."""

from __future__ import annotations

import torch


class MemoryBank:
    """Embeddings of the ``crops_for_mb`` views of the last ``size`` samples this rank saw, with their dataset
    indices, written at a sequential pointer (one epoch of this rank's batches fills it exactly).

    Attributes:
        embeddings: ``[n_views, size, dim]`` float32, L2-normalised rows.
        indices: ``[size]`` int64 dataset indices (-1 where never written).
        ptr: next row to write.
    """

    def __init__(self, n_views: int, size: int, dim: int, device: torch.device | str = "cpu"):
        self.embeddings = torch.zeros(n_views, size, dim, device=device)
        self.indices = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0

    @property
    def size(self) -> int:
        return self.indices.shape[0]

    @property
    def full(self) -> bool:
        return self.ptr >= self.size

    @torch.no_grad()
    def write(self, index: torch.Tensor, views: list[torch.Tensor] | torch.Tensor) -> None:
        """Write one batch: ``index`` ``[B]`` and ``views`` (``n_views`` tensors ``[B, dim]``), detached."""
        b = index.shape[0]
        if self.ptr + b > self.size:
            raise RuntimeError(f"memory bank overflow: pointer {self.ptr} + batch {b} > size {self.size}")
        if isinstance(views, (list, tuple)):
            views = torch.stack(list(views))
        self.embeddings[:, self.ptr:self.ptr + b].copy_(views.detach().float())
        self.indices[self.ptr:self.ptr + b].copy_(index)
        self.ptr += b

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.cpu(), "indices": self.indices.cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["embeddings"].shape) != tuple(self.embeddings.shape):
            raise ValueError(f"memory bank shape {tuple(state['embeddings'].shape)} in the checkpoint != "
                             f"{tuple(self.embeddings.shape)} of this run")
        self.embeddings.copy_(state["embeddings"])
        self.indices.copy_(state["indices"])
        self.ptr = int(state["ptr"])
