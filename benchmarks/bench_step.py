"""DCv2 training step vs a plain forward + backward + SGD step of the same model on the same crops.

- ours: the real ``TrainingRun.train_one_epoch`` loop over in-memory batches: DCv2 loss over the heads'
  prototypes, LARC + SGD, memory-bank write, Prometheus counters, the LOG_FREQUENCY log window (the only host
  sync) and metrics.jsonl.
- plain: the same model (trunk + head), ``z.square().mean()`` as loss, ``torch.optim.SGD`` (momentum, foreach).
Target: ours / plain <= 1.10. ``--tiny`` runs a small ResNet-18 for a quick check (CI).

    python benchmarks/bench_step.py [--steps 6] [--repeats 3] [--out benchmarks/results/step_cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from common import machine, write_results

FULL = {"model": ["+config/pretrain/deepcluster_v2/transforms=multicrop_2x160_4x96"], "batch": 8, "k": 3000,
        "images": 3072, "image_size": 16}
TINY = {"model": ["config=pretrain/deepcluster_v2/deepclusterv2_demo_cpu"], "batch": 16, "k": 30, "images": 64,
        "image_size": 16}


def make_trainer(spec: dict, data_dir: str, ckpt_dir: str, device: str, log_every: int):
    from dcv2_k8s import distributed as D
    from dcv2_k8s.config import resolve
    from dcv2_k8s.engine import TrainingRun

    tokens = [t for t in spec["model"] if t.startswith("config=")] or \
        ["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"]
    tokens += [t for t in spec["model"] if not t.startswith("config=")]
    k = spec["k"]
    tokens += [f"config.DATA.TRAIN.DATA_PATHS=[{data_dir}]", f"config.CHECKPOINT.DIR={ckpt_dir}",
               f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={spec['batch']}", "config.DATA.NUM_DATALOADER_WORKERS=0",
               f"config.LOSS.deepclusterv2_loss.num_clusters=[{k},{k},{k}]", f"config.LOG_FREQUENCY={log_every}",
               f"config.MACHINE.DEVICE={'gpu' if device == 'cuda' else 'cpu'}", "config.CHECKPOINT.AUTO_RESUME=false",
               "config.DISTRIBUTED.NUM_NODES=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]
    resolved = resolve(tokens, world_size=1, local_world_size=1)
    return TrainingRun(resolved, D.env_info())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--log-frequency", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    spec = TINY if args.tiny else FULL
    from dcv2_k8s.data.synth import generate
    from dcv2_k8s.runtime import setup_logging

    setup_logging(1)  # quiet: warnings only
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, classes=4, train_per_class=spec["images"] // 4, val_per_class=0, size=spec["image_size"],
                 progress=False)
        tr = make_trainer(spec, os.path.join(tmp, "train"), os.path.join(tmp, "ckpt"), args.device,
                          args.log_frequency)
        g = torch.Generator().manual_seed(0)
        sizes = tr.dataset.transform.sizes
        b = tr.batch
        batches = [(torch.randint(0, len(tr.dataset), (b,), generator=g),
                    [torch.randn(b, 3, s, s, generator=g) for s in sizes]) for _ in range(args.steps)]
        ks = tr.method.num_clusters
        tr.model.set_prototypes([torch.nn.functional.normalize(torch.randn(p.shape, generator=g), dim=1)
                                 for p in tr.model.prototypes])
        tr.method.table = torch.randint(0, min(ks), (len(ks), len(tr.dataset)), generator=g).to(tr.device)
        tr.loader = batches
        tr.max_steps = tr.iter_freq = -1
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

        def ours() -> float:
            tr.state.step_in_epoch = 0
            tr.method.bank.ptr = 0
            sync()
            t0 = time.perf_counter()
            tr.train_one_epoch()
            sync()
            return (time.perf_counter() - t0) / len(batches)

        model = tr.model
        plain_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

        def plain() -> float:
            sync()
            t0 = time.perf_counter()
            for _, crops in batches:
                crops = [c.to(tr.device, non_blocking=True) for c in crops]
                loss = model(crops).square().mean()
                plain_opt.zero_grad(set_to_none=True)
                loss.backward()
                plain_opt.step()
            sync()
            return (time.perf_counter() - t0) / len(batches)

        ours(), plain()  # warm-up
        t_ours, t_plain = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            t_plain.append(plain())
            t_ours.append(ours())
        tr.reporter.close()
    res = {"machine": machine(), "tiny": args.tiny, "batch": b, "crops": sizes, "clusters": ks,
           "steps": args.steps, "repeats": args.repeats, "log_frequency": args.log_frequency,
           "ours_step_s": statistics.median(t_ours), "plain_step_s": statistics.median(t_plain),
           "ours_runs": t_ours, "plain_runs": t_plain}
    res["ratio"] = res["ours_step_s"] / res["plain_step_s"]
    print(f"{'tiny ' if args.tiny else ''}step, batch {b} x crops {sizes}: DCv2 {res['ours_step_s'] * 1e3:.0f} ms, "
          f"plain fwd+bwd+SGD {res['plain_step_s'] * 1e3:.0f} ms, ratio {res['ratio']:.3f} (target <= 1.10)")
    write_results(args.out, res, [[f"{b} x {sizes}", f"{res['plain_step_s'] * 1e3:.0f}",
                                   f"{res['ours_step_s'] * 1e3:.0f}", f"{res['ratio']:.3f}"]],
                  ["batch x crops", "plain ms", "DCv2 ms", "ratio"],
                  f"DCv2 step vs plain step, {args.device}, median of {args.repeats}")


if __name__ == "__main__":
    main()
