"""Collapse diagnostics and the rules that turn them into warnings.

Collapse diagnostics: feature statistics (effective rank, mean pairwise cosine), per-layer weight change, and the
rules that turn one check's numbers into warnings."""

from __future__ import annotations

import torch


@torch.no_grad()
def feature_stats(feats: torch.Tensor) -> dict:
    """Collapse signals of a feature matrix ``[N, D]`` (rows need not be normalised).

    - ``mean_cosine``: mean cosine similarity of distinct rows (1.0 = every image maps to the same direction);
    - ``effective_rank``: exp of the entropy of the normalised singular values of the centred rows (Roy &
      Vetterli 2007); 1 = a single direction carries all variation, D = all directions equally;
    - ``rank_ratio``: ``effective_rank / min(N, D)``.
    """
    f = torch.nn.functional.normalize(feats.double(), dim=1)
    n, d = f.shape
    s = f.sum(0)
    mean_cos = float((s @ s - n) / max(1, n * (n - 1)))
    sv = torch.linalg.svdvals(f - f.mean(0, keepdim=True))
    p = sv / sv.sum().clamp_min(1e-12)
    p = p[p > 0]
    erank = float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0
    return {"mean_cosine": mean_cos, "effective_rank": erank, "rank_ratio": erank / max(1, min(n, d))}


def layer_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters grouped by layer: ``trunk.conv1``, ``trunk.layer1`` ... ``trunk.layer4``, ``head``
    (the first two levels of the parameter names; BN parameters go with their layer)."""
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "trunk" and len(parts) > 2 else parts[0]
        if parts[0] == "trunk" and parts[1].startswith("bn"):
            key = "trunk.conv1"  # the stem's BN goes with the stem
        groups.setdefault(key, []).append(p)
    return groups


class WeightChange:
    """Relative change of each layer's weights, ``||w - w_ref|| / ||w_ref||``, against the previous call
    (``per_epoch``) and against the first call of this process (``total``). Snapshots live on the CPU."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.first = self._snapshot()
        self.prev = self.first

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat([p.detach().float().reshape(-1).cpu() for p in ps])
                for k, ps in layer_groups(self.model).items()}

    def update(self) -> dict[str, dict[str, float]]:
        now = self._snapshot()
        out = {}
        for k, w in now.items():
            out[k] = {"per_epoch": float((w - self.prev[k]).norm() / self.prev[k].norm().clamp_min(1e-12)),
                      "total": float((w - self.first[k]).norm() / self.first[k].norm().clamp_min(1e-12))}
        self.prev = now
        return out


# thresholds of the collapse warning (measured: see docs/training.md, "Collapse diagnostics")
COLLAPSE_MEAN_COSINE = 0.95    # trunk features this aligned carry almost no image-specific information
COLLAPSE_RANK_RATIO = 0.02     # fewer effective dimensions than this share of min(N, D)
COLLAPSE_SIZE_ENTROPY = 0.5    # cluster sizes this unbalanced: a few clusters hold most images
STILL_WEIGHT_CHANGE = 1e-3     # the trunk moved less than 0.1 % in an epoch: the LR is too small to learn
KNN_BELOW_INIT_POINTS = 2.0    # k-NN top-1 this many points below the same network at initialisation


def collapse_warnings(diag: dict) -> list[tuple[str, str]]:
    """``(kind, message)`` warnings from one epoch's diagnostics (``RunMonitor.diagnose``); empty when healthy.
    Kinds: ``trunk_cosine``, ``trunk_rank``, ``cluster_sizes``, ``not_moving``, ``knn_below_init``.

    ``diag`` keys used: ``trunk`` (feature_stats), ``heads`` (head_stats), ``weight_change`` (WeightChange),
    ``lr`` and ``lr_peak`` (the schedule's largest value), ``knn_top1`` and ``knn_top1_init`` (both optional)."""
    out = []
    trunk = diag.get("trunk")
    if trunk and trunk["mean_cosine"] > COLLAPSE_MEAN_COSINE:
        out.append(("trunk_cosine", f"trunk features are collapsing: mean pairwise cosine {trunk['mean_cosine']:.3f} > "
                   f"{COLLAPSE_MEAN_COSINE} (images map to nearly the same feature)"))
    if trunk and trunk["rank_ratio"] < COLLAPSE_RANK_RATIO:
        out.append(("trunk_rank", f"trunk features are collapsing: effective rank {trunk['effective_rank']:.1f} "
                                  f"({100 * trunk['rank_ratio']:.1f}% of the dimensions)"))
    for h in diag.get("heads", []):
        if h["size_entropy"] < COLLAPSE_SIZE_ENTROPY:
            out.append(("cluster_sizes", f"head {h['head']}: cluster sizes collapsing (size entropy "
                                         f"{h['size_entropy']:.2f}, {h['empty_clusters']} empty clusters)"))
    wc = diag.get("weight_change") or {}
    trunk_layers = [v["per_epoch"] for k, v in wc.items() if k.startswith("trunk")]
    lr, peak = diag.get("lr", 1.0), diag.get("lr_peak", diag.get("lr", 1.0))
    # the tail of a decaying schedule moves little by design: only a run at >= 1/4 of its peak LR is "not moving"
    if trunk_layers and lr > 0 and lr >= 0.25 * peak and max(trunk_layers) < STILL_WEIGHT_CHANGE:
        out.append(("not_moving", f"the trunk is not moving: its layers changed by at most "
                                  f"{100 * max(trunk_layers):.3f}% in the last epoch; raise the learning rate (with "
                                  "LARC the relative step is about lr x trust_coefficient)"))
    top1, init = diag.get("knn_top1"), diag.get("knn_top1_init")
    if top1 is not None and init is not None and top1 < init - KNN_BELOW_INIT_POINTS:
        out.append(("knn_below_init", f"k-NN top-1 {top1:.1f}% is below the {init:.1f}% of this network at "
                                      "initialisation: the features are getting worse than none"))
    return out
