"""Checkpoint I/O benchmark, measured in one run against references on the same bytes.

1. Upload throughput of the same bytes: our storage layer (S3Storage.put_bytes: multipart, threads) vs a plain
   ``boto3 upload_file`` from a file. Target ratio >= 0.8. Serialisation (the in-memory snapshot) is timed apart.
2. Training-step time while a background checkpoint is in flight vs with none. Target ratio <= 1.05.

The S3 server (moto) runs in its own process at nice 19, standing in for a store on other machines; ``--train-threads`` (default:
all cores but one) leaves a core for the upload, as a GPU node has host cores to spare. Unless
AWS_ENDPOINT_URL_S3 points elsewhere (then BUCKET must exist).
    python benchmarks/bench_checkpoint.py [--size-mb 200] [--repeats 5] [--out benchmarks/results/checkpoint_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from common import median_time


def bench_upload(size_mb: int, repeats: int, bucket: str) -> dict:
    import boto3

    from dcv2_k8s.checkpoint import to_bytes
    from dcv2_k8s.storage import S3Storage, s3_client, transfer_config

    state = {"w": torch.randn(size_mb * 2 ** 20 // 4)}
    data = to_bytes(state)
    store = S3Storage(f"s3://{bucket}/bench")
    client = s3_client()
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
        path = f.name
    try:
        snapshot = median_time(lambda: to_bytes(state), repeats)
        ours = median_time(lambda: store.put_bytes(f"s3://{bucket}/bench/ours.pt", data), repeats)
        plain = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3"))
        ref = median_time(lambda: plain.upload_file(path, bucket, "bench/ref.pt"), repeats)
        tuned_ref = median_time(lambda: client.upload_file(path, bucket, "bench/ref2.pt",
                                                           Config=transfer_config(len(data))), repeats)
    finally:
        os.unlink(path)
    mb = len(data) / 2 ** 20
    return {"bytes": len(data), "snapshot_s": snapshot, "ours_s": ours, "boto3_upload_file_s": ref,
            "ours_MBps": mb / ours,
            "boto3_MBps": mb / ref, "ratio_ours_vs_boto3": (mb / ours) / (mb / ref),
            "boto3_same_transfer_config_s": tuned_ref}


def bench_step_overlap(repeats: int, bucket: str, steps: int = 12) -> dict:
    from dcv2_k8s.checkpoint import CheckpointManager
    from dcv2_k8s.model.resnet import ResNetTrunk

    torch.manual_seed(0)
    model = ResNetTrunk(18, width=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 64, 64)
    big = {"model": model.state_dict(), "pad": torch.randn(48 * 2 ** 20 // 4)}  # ~50 MB, a real upload

    def step() -> None:
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run(with_ckpt: bool) -> float:
        mgr = CheckpointManager(f"s3://{bucket}/bench-overlap", keep_last=1)
        times = []
        for i in range(steps):
            if with_ckpt and not mgr.in_flight:
                # the snapshot (serialisation) happens here, in the step; the upload in the background
                mgr.save(f"step_{i:09d}", big, {"bank": torch.zeros(1)}, {"epoch": 0, "global_step": i})
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        mgr.wait()
        return statistics.median(times[2:])

    step()  # warm-up
    without = statistics.median(run(False) for _ in range(repeats))
    with_bg = statistics.median(run(True) for _ in range(repeats))
    return {"step_s_without": without, "step_s_with_background_checkpoint": with_bg,
            "ratio_with_vs_without": with_bg / without, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket", default="bench")
    ap.add_argument("--out", default="")
    ap.add_argument("--train-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = ap.parse_args()
    torch.set_num_threads(args.train_threads)
    server = None
    if not os.environ.get("AWS_ENDPOINT_URL_S3"):
        import shutil
        import subprocess
        import sys

        import boto3

        from dcv2_k8s.distributed import free_port

        port = free_port()
        exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
        # nice 19: the local server stands in for a store on other machines, so it should not take the cores
        # the training step is measured on
        server = subprocess.Popen(["nice", "-n", "19", exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket=args.bucket)
                break
            except Exception:
                time.sleep(0.2)
    try:
        res = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
               "train_threads": args.train_threads,
               "endpoint": os.environ["AWS_ENDPOINT_URL_S3"], "repeats": args.repeats,
               "upload": bench_upload(args.size_mb, args.repeats, args.bucket),
               "step_overlap": bench_step_overlap(args.repeats, args.bucket)}
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
    u, o = res["upload"], res["step_overlap"]
    print(f"snapshot (serialise {u['bytes'] / 2**20:.0f} MiB in memory): {u['snapshot_s']:.3f} s")
    print(f"upload {u['bytes'] / 2**20:.0f} MiB: ours {u['ours_MBps']:.0f} MB/s, boto3 upload_file "
          f"{u['boto3_MBps']:.0f} MB/s, ratio {u['ratio_ours_vs_boto3']:.2f} (target >= 0.8)")
    print(f"step time: {o['step_s_without'] * 1e3:.1f} ms without, {o['step_s_with_background_checkpoint'] * 1e3:.1f} ms "
          f"with a background checkpoint in flight, ratio {o['ratio_with_vs_without']:.3f} (target <= 1.05)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
