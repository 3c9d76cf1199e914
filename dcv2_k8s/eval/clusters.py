"""``dcv2 clusters CHECKPOINT DATA_DIR OUT/``: assign every image to its cluster per head with the trained centroids.

The model of the checkpoint (trunk + head, eval mode, ``DCv2Model.embed``) embeds a resized center crop of every image; the cluster
of head h is the centroid with the largest cosine similarity, as in the last E-step of k-means (and as swav
issue #51 describes for new images). Writes ``assignments.csv`` (index, path, head, cluster, score),
``cluster_sizes.json`` (sizes, empty clusters, size entropy per head, and, when the split has two or more class
folders, the NMI and ARI of the assignments against the folder labels) and ``contact_sheet_head{h}.png`` with the
most typical images of the largest clusters, for a person to look at.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dcv2_k8s.data.dataset import IndexedImageFolder
from dcv2_k8s.data.transforms import eval_transform
from dcv2_k8s.dcv2.stats import size_entropy
from dcv2_k8s.eval.partitions import ari, nmi


@torch.no_grad()
def assign_clusters(z: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cluster, cosine score) of each L2-normalised row of ``z`` against unit-norm ``centroids``."""
    scores = z @ centroids.t()
    best = scores.max(dim=1)
    return best.indices, best.values


@torch.no_grad()
def embed(model, root: str, size: int, mean, std, batch: int = 64, workers: int = 2, progress: bool = False,
          pre=()):
    from tqdm import tqdm

    ds = IndexedImageFolder(root, eval_transform(size, mean, std, pre))
    model.eval()
    out = []
    for _, x in tqdm(DataLoader(ds, batch_size=batch, num_workers=workers), desc="embed", disable=not progress):
        out.append(model.embed(x))
    return ds, torch.cat(out)


def contact_sheet(ds: IndexedImageFolder, clusters: torch.Tensor, scores: torch.Tensor, path: Path,
                  n_clusters: int = 12, per_cluster: int = 10, thumb: int = 64) -> None:
    from PIL import Image, ImageDraw

    sizes = torch.bincount(clusters)
    top = sizes.argsort(descending=True)[:n_clusters].tolist()
    sheet = Image.new("RGB", (120 + per_cluster * thumb, len(top) * thumb), "white")
    draw = ImageDraw.Draw(sheet)
    for row, c in enumerate(top):
        members = (clusters == c).nonzero().flatten()
        best = members[scores[members].argsort(descending=True)][:per_cluster].tolist()
        draw.text((4, row * thumb + thumb // 3), f"cluster {c}\n{int(sizes[c])} images", fill="black")
        for col, i in enumerate(best):
            img = ds.load(i)
            img.thumbnail((thumb, thumb))
            sheet.paste(img, (120 + col * thumb, row * thumb))
    sheet.save(path)


def extract_clusters(model, centroids: list[torch.Tensor], data_dir: str, out_dir: str, size: int, mean, std,
                     workers: int = 2, progress: bool = False, pre=()) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds, z = embed(model, data_dir, size, mean, std, workers=workers, progress=progress, pre=pre)
    stats = {"images": len(ds), "heads": []}
    with open(out / "assignments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "head", "cluster", "score"])
        for h, c in enumerate(centroids):
            clusters, scores = assign_clusters(z, c)
            for i in range(len(ds)):
                w.writerow([i, ds.samples[i][0], h, int(clusters[i]), f"{float(scores[i]):.5f}"])
            sizes = torch.bincount(clusters, minlength=c.shape[0])
            stats["heads"].append({"head": h, "clusters": c.shape[0], "empty": int((sizes == 0).sum()),
                                   "size_entropy": size_entropy(sizes), "largest": int(sizes.max()),
                                   "sizes": sizes.tolist()})
            if len(ds.classes) >= 2:  # agreement with the class folders (labels are not used anywhere else)
                assigned = clusters.cpu().numpy()
                stats["heads"][-1].update(nmi=nmi(ds.targets, assigned), ari=ari(ds.targets, assigned))
            contact_sheet(ds, clusters, scores, out / f"contact_sheet_head{h}.png")
    (out / "cluster_sizes.json").write_text(json.dumps(stats, indent=1))
    return stats


def run_from_checkpoint(checkpoint: str, data_dir: str, out_dir: str, workers: int = 2, progress: bool = False) -> dict:
    from dcv2_k8s.config import config_from_checkpoint
    from dcv2_k8s.model import build_model
    from dcv2_k8s.weights import WeightsError, load_weights, read_file

    obj = read_file(checkpoint)
    if "config_yaml" not in obj:
        raise WeightsError(f"{checkpoint}: cluster extraction needs one of our DCv2 checkpoints (with centroids)")
    cfg = config_from_checkpoint(obj).cfg
    model = build_model(cfg)
    load_weights(model, checkpoint)
    mean, std = cfg.DATA.TRAIN.normalize
    return extract_clusters(model, model.prototypes, data_dir, out_dir, cfg.DATA.TRAIN.multicrop.large_size, mean, std,
                            workers, progress, cfg.DATA.TRAIN.preprocess)
