"""DeepClusterV2's state on one rank and its four operations, in the order the training loop calls them.

- ``fill``: one no-grad pass writes the embeddings of the ``crops_for_mb`` views into the memory bank;
- ``cluster`` (every epoch): spherical k-means over every rank's bank -> centroids per head (the caller gives
  them to the model as its prototypes) and the assignment table ``[n_heads, N]``;
- ``loss`` (every step): cross-entropy of cosine / T against the prototypes, targets from the table;
- ``write`` (every step): the batch's fresh embeddings replace the bank's rows at the pointer.

As the swav reference's ``main_deepclusterv2.py`` (``init_memory``, ``cluster_memory``, the loss in ``train``).
"""

from __future__ import annotations

import torch

from dcv2_k8s.dcv2.kmeans import cluster_memory
from dcv2_k8s.dcv2.loss import dcv2_loss
from dcv2_k8s.dcv2.memory_bank import MemoryBank
from dcv2_k8s.dcv2.stats import head_stats


class DeepClusterV2:
    """Memory bank, assignment table (and the previous epoch's, for NMI) and the settings of
    ``LOSS.deepclusterv2_loss`` (a typed ``config.schema.DCv2Loss``).

    Args:
        loss_cfg: the loss section.
        bank_size: rows of this rank's bank (its images per epoch).
        num_samples: images in the dataset (columns of the table).
        seed: ``SEED_VALUE``; k-means of epoch e draws its initial centroids from ``seed * 100003 + e``.
    """

    def __init__(self, loss_cfg, bank_size: int, num_samples: int, seed: int, device: torch.device):
        self.num_clusters = list(loss_cfg.num_clusters)
        self.temperature = loss_cfg.temperature
        self.kmeans_iters = loss_cfg.kmeans_iters
        self.crops_for_mb = list(loss_cfg.memory_params.crops_for_mb)
        self.num_samples, self.seed = num_samples, seed
        self.bank = MemoryBank(len(self.crops_for_mb), bank_size, loss_cfg.memory_params.embedding_dim, device)
        self.table: torch.Tensor | None = None
        self.prev_table: torch.Tensor | None = None

    @torch.no_grad()
    def fill(self, batches, embed) -> None:
        """``batches`` yields ``(index, crops)``; ``embed(crop_batch) -> [B, D]`` runs the model (train mode)."""
        self.bank.ptr = 0
        for index, crops in batches:
            self.bank.write(index, [embed(crops[c]) for c in self.crops_for_mb])

    @torch.no_grad()
    def cluster(self, epoch: int) -> list[torch.Tensor]:
        """k-means over the banks of every rank; returns the centroids per head and keeps the new table."""
        centroids, table = cluster_memory(self.bank, self.num_clusters, self.kmeans_iters, self.num_samples,
                                          self.seed * 100003 + epoch)
        self.prev_table, self.table = self.table, table
        self.bank.ptr = 0
        return centroids

    def stats(self) -> list[dict]:
        """Per head: empty clusters, size entropy, ignored share, NMI against the previous epoch."""
        return head_stats(self.table, self.num_clusters, self.prev_table)

    def loss(self, z: torch.Tensor, index: torch.Tensor, prototypes: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, ignored fraction) of a batch; ``z`` ``[n_crops * B, D]`` crop-major; no host sync."""
        return dcv2_loss(z.float(), index, prototypes, self.table, self.temperature)

    @torch.no_grad()
    def write(self, index: torch.Tensor, z: torch.Tensor) -> None:
        """Write the batch's ``crops_for_mb`` views of ``z`` (crop-major) into the bank."""
        b = index.shape[0]
        self.bank.write(index, [z[c * b:(c + 1) * b] for c in self.crops_for_mb])

    def state_dict(self) -> dict:
        """The tables (rank 0 saves them); the bank is per rank (see ``bank.state_dict``)."""
        return {"table": self.table.cpu(), "prev_table": None if self.prev_table is None else self.prev_table.cpu()}

    def load_state_dict(self, state: dict) -> None:
        device = self.bank.embeddings.device
        self.table = state["table"].to(device)
        self.prev_table = None if state["prev_table"] is None else state["prev_table"].to(device)
