"""Multi-crop input pipeline on ImageNet-like JPEGs, images/s on one core: ours vs the reference chain.

Reference (written out below as the swav code does it): PIL decode, then per crop torchvision's
RandomResizedCrop, RandomHorizontalFlip, ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8, RandomGrayscale p=0.2,
PIL GaussianBlur p=0.5 with radius ~ U(0.1, 2), ToTensor, Normalize.
Ours: the dataset's decode (``open_rgb``) and the configured multi-crop for ``AUG_BACKEND`` pil and opencv.
The images are generated (500x375, ~110 KB JPEGs at quality 95). Target: opencv >= 2x the reference.

    python benchmarks/bench_input.py [--images 48] [--repeats 5] [--out benchmarks/results/input_cpu]
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import statistics
import tempfile
import time

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from common import machine, write_results

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LAYOUTS = {"2x224+6x96": ([2, 6], [224, 96], [[0.14, 1.0], [0.05, 0.14]]),
           "2x160+4x96": ([2, 4], [160, 96], [[0.14, 1.0], [0.05, 0.14]])}


class ReferenceBlur:
    """The reference's PILRandomGaussianBlur."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.p, self.lo, self.hi = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


def reference_pipeline(num, sizes, scales):
    color = T.Compose([T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)])
    per_size = [T.Compose([T.RandomResizedCrop(s, scale=tuple(sc)), T.RandomHorizontalFlip(p=0.5), color,
                           ReferenceBlur(), T.ToTensor(), T.Normalize(MEAN, STD)]) for s, sc in zip(sizes, scales)]

    def run(path):
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return [t(img) for t, n in zip(per_size, num) for _ in range(n)]
    return run


def transforms_for(num, sizes, scales) -> list[dict]:
    return [{"name": "ImgPilToMultiCrop", "total_num_crops": sum(num), "num_crops": num, "size_crops": sizes,
             "crop_scales": scales},
            {"name": "RandomHorizontalFlip", "p": 0.5}, {"name": "ImgPilColorDistortion", "strength": 1.0},
            {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0},
            {"name": "ToTensor"}, {"name": "Normalize", "mean": MEAN, "std": STD}]


def ours_pipeline(backend, num, sizes, scales):
    from dcv2_k8s.data.dataset import open_rgb
    from dcv2_k8s.data.transforms import build_multicrop

    mc = build_multicrop(transforms_for(num, sizes, scales), backend)
    return lambda path: mc(open_rgb(path)[0])


def images_per_s(fn, paths, repeats) -> tuple[float, list[float]]:
    fn(paths[0])  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        rates.append(len(paths) / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="", help="a directory of JPEGs to use instead of generated ones")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core: a DataLoader worker
    from dcv2_k8s.data.cv_transforms import limit_threads

    limit_threads()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            paths = sorted(glob.glob(os.path.join(args.data, "**", "*.*"), recursive=True))[: args.images]
        else:
            from dcv2_k8s.data.synth import generate

            per_class = max(1, (args.images + 3) // 4)
            generate(tmp, classes=4, train_per_class=per_class, val_per_class=0, photo_like=True, quality=95,
                     progress=False, kind="shapes")
            paths = sorted(glob.glob(os.path.join(tmp, "train", "*", "*.jpg")))[: args.images]
        kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024
        w, h = Image.open(paths[0]).size
        res = {"machine": machine(), "images": len(paths), "mean_kb": kb, "size": [w, h], "repeats": args.repeats,
               "layouts": {}}
        rows = []
        for name, (num, sizes, scales) in LAYOUTS.items():
            torch.manual_seed(0)
            random.seed(0)
            entry = {}
            for label, fn in (("reference", reference_pipeline(num, sizes, scales)),
                              ("ours_pil", ours_pipeline("pil", num, sizes, scales)),
                              ("ours_opencv", ours_pipeline("opencv", num, sizes, scales))):
                med, all_rates = images_per_s(fn, paths, args.repeats)
                entry[label] = {"img_per_s": med, "runs": all_rates}
            ref = entry["reference"]["img_per_s"]
            for label in ("ours_pil", "ours_opencv"):
                entry[label]["ratio_vs_reference"] = entry[label]["img_per_s"] / ref
            res["layouts"][name] = entry
            print(f"{name}: reference {ref:.1f} img/s, ours pil {entry['ours_pil']['img_per_s']:.1f} "
                  f"({entry['ours_pil']['ratio_vs_reference']:.2f}x), ours opencv "
                  f"{entry['ours_opencv']['img_per_s']:.1f} ({entry['ours_opencv']['ratio_vs_reference']:.2f}x, "
                  "target >= 2x) per core")
            rows.append([name, f"{ref:.1f}", f"{entry['ours_pil']['img_per_s']:.1f}",
                         f"{entry['ours_pil']['ratio_vs_reference']:.2f}x", f"{entry['ours_opencv']['img_per_s']:.1f}",
                         f"{entry['ours_opencv']['ratio_vs_reference']:.2f}x"])
    write_results(args.out, res, rows, ["layout", "reference img/s", "ours pil img/s", "ratio", "ours opencv img/s",
                                        "ratio"], f"Multi-crop input pipeline, one core, {len(paths)} JPEGs "
                                                  f"{w}x{h} ~{kb:.0f} KB, median of {args.repeats}")


if __name__ == "__main__":
    main()
