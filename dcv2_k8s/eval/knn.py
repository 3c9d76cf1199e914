"""Weighted k-NN evaluation of frozen trunk features (the standard self-supervised monitor).

Features: the trunk in eval mode on a resized center crop, L2-normalised. Each query votes with its ``k``
nearest training features (cosine similarity), weighted by ``exp(similarity / T)`` (Wu et al. 2018, as in
DINO's ``eval_knn``). Distributed: every rank extracts a strided shard, shards are all-gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from dcv2_k8s.data.dataset import IndexedImageFolder
from dcv2_k8s.distributed import all_gather_rows
from dcv2_k8s.data.transforms import eval_transform


@torch.no_grad()
def extract_features(trunk: torch.nn.Module, root: str, size: int, device: torch.device, batch_size: int = 64,
                     num_workers: int = 2, rank: int = 0, world_size: int = 1, mean=None, std=None,
                     progress: bool = False, normalize: bool = True, indices: list[int] | None = None, pre=()
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, D], labels [N])`` of every image under ``root`` (ImageFolder), or of the images at
    ``indices`` only, L2-normalised unless ``normalize=False``; ``pre``: the training list's whole-image
    preprocessing entries (``DATA.TRAIN.preprocess``)."""
    from tqdm import tqdm

    kw = {} if mean is None else {"mean": mean, "std": std}
    ds = IndexedImageFolder(root, eval_transform(size, **kw, pre=pre))
    pool = list(range(len(ds))) if indices is None else list(indices)
    n = len(pool)
    per_rank = -(-n // world_size)
    mine = [pool[min(i, n - 1)] for i in range(rank, per_rank * world_size, world_size)]  # padded, strided
    loader = DataLoader(Subset(ds, mine), batch_size=batch_size, num_workers=num_workers)
    was_training = trunk.training
    trunk.eval()
    feats = []
    for _, x in tqdm(loader, desc=f"features {root}", disable=not progress, leave=False):
        f = trunk(x.to(device, non_blocking=True)).float()
        feats.append(F.normalize(f, dim=1) if normalize else f)
    trunk.train(was_training)
    local = torch.cat(feats)
    labels = torch.tensor([ds.targets[i] for i in mine], device=local.device)
    if world_size > 1:
        g_feats = torch.empty((world_size * local.shape[0], local.shape[1]), device=local.device)
        g_labels = torch.empty(world_size * labels.shape[0], dtype=labels.dtype, device=labels.device)
        all_gather_rows(g_feats, local)
        all_gather_rows(g_labels, labels)
        # undo the striding: row r*per_rank + j holds sample j*world + r
        order = torch.arange(per_rank * world_size).view(per_rank, world_size).t().reshape(-1)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        local, labels = g_feats[inv][:n], g_labels[inv][:n]
    return local, labels


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> dict[str, float]:
    """Weighted k-NN top-1 / top-5 accuracy (percent)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    top1 = top5 = 0
    for s in range(0, test_feats.shape[0], chunk):
        q, y = test_feats[s:s + chunk], test_labels[s:s + chunk]
        sim, idx = (q @ train_feats.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred == y.unsqueeze(1)).any(1).sum().item()
    n = test_feats.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "k": k, "temperature": temperature,
            "n_train": int(train_feats.shape[0]), "n_test": n}


def knn_eval(trunk: torch.nn.Module, train_root: str, val_root: str, size: int, device: torch.device,
             k: int = 20, temperature: float = 0.07, rank: int = 0, world_size: int = 1, num_workers: int = 2,
             mean=None, std=None, progress: bool = False, pre=()) -> dict[str, float]:
    tr = extract_features(trunk, train_root, size, device, rank=rank, world_size=world_size,
                          num_workers=num_workers, mean=mean, std=std, progress=progress, pre=pre)
    te = extract_features(trunk, val_root, size, device, rank=rank, world_size=world_size,
                          num_workers=num_workers, mean=mean, std=std, progress=progress, pre=pre)
    return knn_classify(*tr, *te, k=k, temperature=temperature)
