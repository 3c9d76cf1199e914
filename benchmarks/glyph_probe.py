"""What a trunk's features encode on ``dcv2 data synth --kind glyphs``: weighted k-NN top-1 (k=20) of the frozen
features for the class and for each nuisance the generator drew (glyph left/right and top/bottom half, nearer an
edge than half the glyphs or not, size tercile, dark-on-light or light-on-dark, grey-level contrast at the
generator's minimum or above, stroke width), next to the majority-class rate of each.

The nuisances are re-drawn from each image's own generator (``synth.image_rng`` + ``synth.glyph_layout``, the
same draws that placed the glyph), so the labels are exact. A network that learned the glyphs predicts the class
well and the nuisances no better than random features do; one that learned where the glyph is predicts position.

    python benchmarks/glyph_probe.py --data /tmp/dcv2-small/glyphs [--checkpoint RUN_DIR ...] [--seed 0]
                                     [--out benchmarks/results/glyph_probe_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import machine, write_results  # noqa: E402

from dcv2_k8s.config import config_from_checkpoint, resolve  # noqa: E402
from dcv2_k8s.data import synth  # noqa: E402
from dcv2_k8s.data.dataset import scan_image_folder  # noqa: E402
from dcv2_k8s.eval.knn import extract_features, knn_classify  # noqa: E402
from dcv2_k8s.model.resnet import build_trunk  # noqa: E402
from dcv2_k8s.weights import load_into_trunk, read_file, split_weights  # noqa: E402

PRESET = "pretrain/deepcluster_v2/deepclusterv2_small_scale"
NAME = re.compile(r"(train|val)_(\d+)_(\d+)\.\w+$")
ATTRIBUTES = ("class", "x_half", "y_half", "border", "size", "polarity", "contrast", "stroke")


def labels(root: str, seed: int) -> dict[str, torch.Tensor]:
    """Per image under ``root`` (in ImageFolder order): the class and the generator's nuisances, as small ints."""
    rows = []
    for path, target in scan_image_folder(root)[1]:
        m = NAME.search(os.path.basename(path))
        if m is None:
            raise SystemExit(f"{path}: not a file name of dcv2 data synth; generate the data with --kind glyphs")
        split, cls, index = m.group(1), int(m.group(2)), int(m.group(3))
        with Image.open(os.path.join(root, path)) as img:
            width, height = img.size
        g = synth.glyph_layout(synth.image_rng(seed, cls, index, split), width, height)
        side = min(width, height)
        edge = min(g["cx"], g["cy"], width - g["cx"], height - g["cy"]) / side  # 0.22 (at an edge) .. 0.5 (centred)
        rows.append({"class": target, "x_half": int(g["cx"] > width / 2), "y_half": int(g["cy"] > height / 2),
                     "size": min(2, int((g["scale"] / side - 0.35) / 0.2 * 3)), "polarity": int(g["fg"] > g["bg"]),
                     "border": int(edge > 0.35), "contrast": int(abs(g["fg"] - g["bg"]) > 71),  # both about halves
                     "stroke": min(2, max(0, int((g["stroke"] / side - 0.06) / 0.05 * 3)))})
    return {k: torch.tensor([r[k] for r in rows]) for k in ATTRIBUTES}


def probe(trunk: torch.nn.Module, data: str, size: int, mean, std, lab: dict, pre=()) -> dict[str, float]:
    kw = {"num_workers": 0, "mean": mean, "std": std, "pre": pre}  # the run's own evaluation view
    tr, _ = extract_features(trunk, f"{data}/train", size, torch.device("cpu"), **kw)
    te, _ = extract_features(trunk, f"{data}/val", size, torch.device("cpu"), **kw)
    return {k: round(knn_classify(tr, lab["train"][k], te, lab["val"][k])["top1"], 2) for k in ATTRIBUTES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a dcv2 data synth --kind glyphs directory (train/ and val/)")
    ap.add_argument("--checkpoint", action="append", default=[], help="a run directory or checkpoint (repeatable)")
    ap.add_argument("--seed", type=int, default=None, help="the data's seed (default: from DATA/synth.json)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    meta_path = os.path.join(a.data, "synth.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    if meta.get("kind", "glyphs") != "glyphs":
        raise SystemExit(f"{a.data}: kind {meta['kind']!r}; this probe knows the nuisances of --kind glyphs only")
    seed = a.seed if a.seed is not None else meta.get("seed", 0)
    lab = {split: labels(f"{a.data}/{split}", seed) for split in ("train", "val")}
    chance = {k: round(100.0 * int(torch.bincount(lab["val"][k]).max()) / len(lab["val"][k]), 2) for k in ATTRIBUTES}
    result = {"machine": machine(), "data": a.data, "seed": seed, "majority": chance, "networks": []}
    for ck in [None, *a.checkpoint]:
        state = read_file(ck) if ck else None
        r = config_from_checkpoint(state, [], for_training=False) if state and "config_yaml" in state else \
            resolve([f"config={PRESET}"], for_training=False)
        torch.manual_seed(r.cfg.SEED_VALUE)
        trunk = build_trunk(r.cfg.MODEL.TRUNK)
        epoch = None
        if state is not None:
            load_into_trunk(trunk, split_weights(state)[1], ck)
            epoch = (state.get("train_state") or {}).get("epoch")
        mean, std = r.cfg.DATA.TRAIN.normalize
        acc = probe(trunk, a.data, r.cfg.DATA.TRAIN.multicrop.large_size, mean, std, lab, r.cfg.DATA.TRAIN.preprocess)
        result["networks"].append({"weights": ck or f"random-init ({PRESET})", "epoch": epoch, "top1": acc})
        print(json.dumps(result["networks"][-1]), flush=True)
    rows = [["majority class", *(chance[k] for k in ATTRIBUTES)]]
    rows += [[n["weights"] + (f" (epoch {n['epoch']})" if n["epoch"] is not None else ""),
              *(n["top1"][k] for k in ATTRIBUTES)] for n in result["networks"]]
    write_results(a.out, result, rows, ["features of", *(f"{k} k-NN top-1 %" for k in ATTRIBUTES)],
                  "What the trunk's features encode on grey glyphs: k-NN of the class and of each nuisance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
