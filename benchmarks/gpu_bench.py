"""One-GPU throughput of DCv2 ResNet-50: model-bound variants, end-to-end with the input pipeline, k-means.

For each multi-crop layout (2x224+6x96, 2x160+4x96) and variant (fp32, bf16, bf16 + channels-last,
bf16 + channels-last + torch.compile) it times the real training step (``TrainingRun.train_one_epoch`` over batches
already on the device: model-bound) and reports images/s, 224-equivalent crops/s (sum of (size/224)^2 per
image) and peak memory. Then the end-to-end rate with the real DataLoader and augmentation on generated
ImageNet-like JPEGs, and k-means at ImageNet scale per GPU (N=160k, K=3000, D=128, 3 heads, 10 iterations).
Results go to ``--out``.json and .md after every measurement, so a time limit loses nothing measured.
Target on an H200: >= 5,000 crops-equivalent/s in bf16, model-bound.

    python benchmarks/gpu_bench.py                        # on a GPU (about 8 minutes)
    python benchmarks/gpu_bench.py --device cpu --tiny    # a small smoke run on CPU (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback

import torch

from bench_step import make_trainer
from common import machine, write_results

LAYOUTS = {"2x224+6x96": "multicrop_2x224_6x96", "2x160+4x96": "multicrop_2x160_4x96"}
VARIANTS = {"fp32": ["config.MODEL.AMP_PARAMS.USE_AMP=false"], "bf16": ["config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MODEL.AMP_PARAMS.DTYPE=bfloat16"]}
VARIANTS["bf16+channels_last"] = VARIANTS["bf16"] + ["config.MODEL.CHANNELS_LAST=true"]
VARIANTS["bf16+channels_last+compile"] = VARIANTS["bf16+channels_last"] + ["config.MODEL.COMPILE=true"]


def eq_crops(sizes: list[int]) -> float:
    return sum((s / 224) ** 2 for s in sizes)


def replicate(root: str, total: int) -> None:
    """Hard-link the images of ``root``'s class directories until it holds ``total`` files."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".jpg"))
    for i in range(len(files), total):
        src = files[i % len(files)]
        os.link(src, src[:-4] + f"_copy{i}.jpg")


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.res = {"machine": machine(), "args": vars(args), "model_bound": [], "end_to_end": [], "kmeans": None,
                    "errors": []}
        self.rows = []

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def save(self) -> None:
        write_results(self.args.out, self.res, self.rows, ["what", "layout", "variant", "batch", "images/s",
                                                           "224-eq crops/s", "peak GiB", "notes"],
                      f"DCv2 throughput, {self.res['machine'].get('gpu', 'cpu')}")

    def spec(self, layout: str, images: int) -> dict:
        model = ["config=pretrain/deepcluster_v2/deepclusterv2_demo_cpu"] if self.args.tiny else []
        return {"model": model + [f"+config/pretrain/deepcluster_v2/transforms={LAYOUTS[layout]}"],
                "batch": self.args.batch, "k": self.args.k, "images": images, "image_size": 16}

    def trainer(self, layout: str, variant: str, data_dir: str, ckpt: str, extra=()):
        spec = self.spec(layout, self.args.images)
        spec["model"] = spec["model"] + VARIANTS[variant] + list(extra)
        return make_trainer(spec, data_dir, ckpt, self.device, self.args.log_frequency)

    def model_bound(self, layout: str, variant: str, data_dir: str, ckpt: str) -> None:
        tr = self.trainer(layout, variant, data_dir, ckpt)
        try:
            sizes = tr.dataset.transform.sizes
            if self.args.tiny:
                sizes = [s // 4 for s in sizes]
            b = tr.batch
            g = torch.Generator(device=tr.device).manual_seed(0)
            batches = [(torch.randint(0, len(tr.dataset), (b,), device=tr.device, generator=g),
                        [torch.randn(b, 3, s, s, device=tr.device, generator=g) for s in sizes])
                       for _ in range(self.args.steps)]
            ks = tr.method.num_clusters
            tr.method.table = torch.randint(0, min(ks), (len(ks), len(tr.dataset)), device=tr.device)
            tr.loader = batches
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rates = []
            t_first = time.perf_counter()
            for r in range(self.args.repeats + 1):  # the first pass warms up (and compiles)
                seconds = self.timed_pass(tr)
                if r == 0:
                    warm = time.perf_counter() - t_first
                    continue
                rates.append(b * len(batches) / seconds)
            syncs = self.count_syncs(tr, batches) if self.device == "cuda" else None
            ips = statistics.median(rates)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if self.device == "cuda" else float("nan")
            rec = {"layout": layout, "variant": variant, "batch": b, "sizes": sizes, "images_per_s": ips,
                   "eq_crops_per_s": ips * eq_crops(sizes), "peak_GiB": peak, "warmup_s": warm, "runs": rates,
                   "host_syncs_per_step": syncs}
            self.res["model_bound"].append(rec)
            self.rows.append(["model-bound", layout, variant, b, f"{ips:.1f}", f"{rec['eq_crops_per_s']:.0f}",
                              f"{peak:.1f}" if peak == peak else "-",
                              f"warm-up {warm:.0f} s" + ("" if syncs is None else f", {syncs:g} host syncs/step")])
            print(f"model-bound {layout} {variant}: {ips:.1f} img/s, {rec['eq_crops_per_s']:.0f} eq crops/s, "
                  f"peak {peak:.1f} GiB", flush=True)
        finally:
            tr.reporter.close()

    def timed_pass(self, tr) -> float:
        """Seconds for one pass of ``tr.train_one_epoch`` over its loader, from the epoch's start."""
        tr.state.step_in_epoch = 0
        tr.method.bank.ptr = 0
        self.sync()
        t0 = time.perf_counter()
        tr.max_steps = tr.iter_freq = -1
        tr.train_one_epoch()
        self.sync()
        return time.perf_counter() - t0

    @staticmethod
    def count_syncs(tr, batches) -> float:
        """Host synchronisations inside ``TrainingRun.train_step`` (between log windows), per step, counted by CUDA's
        sync debug mode. fp16's GradScaler has one by design (its inf check); bf16 and fp32 should have none."""
        import warnings

        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for index, crops in batches[:3]:
                    tr.train_step(index, crops, 0.1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        tr.method.bank.ptr = 0
        return sum("synchroniz" in str(w.message) for w in caught) / min(3, len(batches))

    def end_to_end(self, layout: str, variant: str, photo_dir: str, ckpt: str) -> None:
        workers = self.args.workers if self.args.workers >= 0 else max(1, (os.cpu_count() or 2) - 1)
        tr = self.trainer(layout, variant, photo_dir, ckpt, [f"config.DATA.NUM_DATALOADER_WORKERS={workers}"])
        try:
            sizes = tr.dataset.transform.sizes
            ks = tr.method.num_clusters
            tr.method.table = torch.randint(0, min(ks), (len(ks), len(tr.dataset)), device=tr.device)
            self.timed_pass(tr)  # warm-up epoch: workers start, caches fill
            tr.state.epoch += 1
            ips = tr.steps_per_epoch * tr.batch / self.timed_pass(tr)
            rec = {"layout": layout, "variant": variant, "batch": tr.batch, "workers": workers, "images_per_s": ips,
                   "eq_crops_per_s": ips * eq_crops(sizes), "aug_backend": tr.cfg.DATA.TRAIN.AUG_BACKEND}
            self.res["end_to_end"].append(rec)
            self.rows.append(["end-to-end", layout, variant, tr.batch, f"{ips:.1f}", f"{rec['eq_crops_per_s']:.0f}",
                              "", f"{workers} workers, {rec['aug_backend']}, 500x375 JPEGs"])
            print(f"end-to-end {layout} {variant}: {ips:.1f} img/s with {workers} workers", flush=True)
        finally:
            tr.reporter.close()

    def kmeans(self) -> None:
        from dcv2_k8s.dcv2.kmeans import spherical_kmeans

        n, k = (2000, 30) if self.args.tiny else (160_000, 3000)
        g = torch.Generator(device=self.device).manual_seed(0)
        emb = torch.nn.functional.normalize(torch.randn(n, 128, device=self.device, generator=g), dim=1)
        init = emb[:k].clone()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        spherical_kmeans(emb, init, 10)  # warm-up
        ts = []
        for _ in range(3):
            self.sync()
            t0 = time.perf_counter()
            for _h in range(3):
                spherical_kmeans(emb, init, 10)
            self.sync()
            ts.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if self.device == "cuda" else float("nan")
        self.res["kmeans"] = {"n": n, "k": k, "heads": 3, "iters": 10, "seconds": statistics.median(ts), "runs": ts,
                              "peak_GiB": peak}
        self.rows.append(["k-means", f"N={n} K={k} x3 heads", "fp32", "", "", "", f"{peak:.1f}" if peak == peak else "-",
                          f"{statistics.median(ts):.2f} s per epoch"])
        print(f"k-means N={n} K={k} 3 heads: {statistics.median(ts):.2f} s", flush=True)

    def larc(self) -> None:
        from bench_larc import bench

        for tiny in (False, True):
            r = bench(tiny, 20, self.device)
            self.res.setdefault("larc", []).append(r)
            label = "tiny tensors" if tiny else "real sizes"
            self.rows.append(["LARC+SGD step", f"R50+head {label}", "fp32", "", "", "", "",
                              f"{r['reference_ms']:.2f} ms per-tensor reference vs {r['ours_ms']:.2f} ms ours "
                              f"({r['ratio_reference_over_ours']:.1f}x), bitwise equal {r['bitwise_equal']}"])
            print(f"LARC {label}: reference {r['reference_ms']:.2f} ms, ours {r['ours_ms']:.2f} ms", flush=True)

    def guarded(self, what: str, fn, *a) -> None:
        if time.time() > self.deadline:
            self.res["errors"].append(f"{what}: skipped, --budget-s reached")
            return
        try:
            fn(*a)
        except Exception as e:  # one failing variant must not lose the others
            traceback.print_exc()
            self.res["errors"].append(f"{what}: {type(e).__name__}: {e}")
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self.save()

    def run(self) -> None:
        a = self.args
        self.deadline = time.time() + a.budget_s
        variants = [v for v in VARIANTS if a.compile or "compile" not in v]
        if a.device == "cpu":
            variants = [v for v in variants if "bf16" not in v or a.tiny]
        from dcv2_k8s.data.synth import generate

        with tempfile.TemporaryDirectory() as tmp:
            small = os.path.join(tmp, "small")
            generate(small, classes=4, train_per_class=a.images // 4, val_per_class=0, size=16, progress=False)
            self.guarded("kmeans", self.kmeans)
            self.guarded("larc", self.larc)
            for layout in LAYOUTS:
                for v in variants:
                    self.guarded(f"model-bound {layout} {v}", self.model_bound, layout, v,
                                 os.path.join(small, "train"), os.path.join(tmp, "ckpt"))
            photos = os.path.join(tmp, "photos")
            unique = min(a.e2e_images, 512)  # generating is slow: larger sets repeat these files (hard links)
            generate(photos, classes=4, train_per_class=unique // 4, val_per_class=0, photo_like=True,
                     quality=95, progress=False, kind="shapes")
            replicate(os.path.join(photos, "train"), a.e2e_images)
            e2e_variant = "bf16+channels_last" if a.device == "cuda" else "fp32"
            for layout in LAYOUTS:
                self.guarded(f"end-to-end {layout}", self.end_to_end, layout, e2e_variant,
                             os.path.join(photos, "train"), os.path.join(tmp, "ckpt2"))
        if self.res["errors"]:
            print("errors:\n  " + "\n  ".join(self.res["errors"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="small model, crops and k-means (a smoke run)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 128 on cuda, 4 tiny)")
    ap.add_argument("--steps", type=int, default=None, help="batches per timed pass (default 10, 2 tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=None, help="clusters per head (default 3000, 8 tiny)")
    ap.add_argument("--images", type=int, default=None, help="dataset size behind the bank (>= k)")
    ap.add_argument("--e2e-images", type=int, default=None, help="generated JPEGs for the end-to-end pass")
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers end-to-end (-1: cores - 1)")
    ap.add_argument("--log-frequency", type=int, default=10)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="include the torch.compile variant (default: on cuda)")
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting new measurements after this")
    ap.add_argument("--out", default="", help="results path without extension (default benchmarks/results/"
                                              "gpu_<device>[_tiny])")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --tiny for a smoke run")
    tiny = args.tiny
    args.batch = args.batch or (4 if tiny else 128)
    args.steps = args.steps or (2 if tiny else 10)
    args.k = args.k or (8 if tiny else 3000)
    args.images = args.images or max(args.k, args.batch) * (2 if tiny else 1) + args.batch
    args.images = -(-args.images // 4) * 4
    args.e2e_images = args.e2e_images or (16 if tiny else 4096)
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"gpu_{args.device}{'_tiny' if tiny else ''}")
    torch.backends.cudnn.benchmark = True
    Bench(args).run()


if __name__ == "__main__":
    main()
