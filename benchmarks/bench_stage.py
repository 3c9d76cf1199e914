"""Staging throughput of ``dcv2 stage`` against a floor measured in the same run, on generated objects of
ImageNet's sizes (JPEG-sized random payloads: staging never decodes them).

1. ImageFolder objects (``CLASS/IMAGE.JPEG``, sizes log-normal around ImageNet's mean of ~110 KB): ours (MD5 of
   every file, manifest, atomic writes) vs the floor, ``boto3 download_file`` of every object from a thread pool of
   the same size. Files/s, MB/s, ratio ours / floor, for each worker count.
2. The original ILSVRC train release (one tar of per-class tars): ours (streamed with parallel ranged reads,
   nested tars extracted on the fly, no copy of the archive on disk) vs the two-step floor (``download_file`` of
   the archive, then ``tarfile`` extraction of the nested tars, which needs the archive's size again on disk).

The S3 server (moto) runs in its own process at nice 19, standing in for a store on other machines; on one host
with two cores it shares the CPU with the client, so the absolute rates are this machine's, the ratios are what
carries over. Unless AWS_ENDPOINT_URL_S3 points elsewhere (then BUCKET must exist).
    python benchmarks/bench_stage.py [--files 2000] [--tar-mb 200] [--workers 8 32] [--repeats 3]
                                     [--out benchmarks/results/stage_cpu]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import machine, write_results

IMAGENET_TRAIN_FILES, IMAGENET_VAL_FILES = 1_281_167, 50_000
IMAGENET_TRAIN_TAR_GB = 147.9


def payloads(n: int, rng: np.random.Generator) -> list[bytes]:
    sizes = np.clip(rng.lognormal(np.log(110_000), 0.45, n), 8_000, 2_000_000).astype(int)
    return [rng.integers(0, 256, s, dtype=np.uint8).tobytes() for s in sizes]


def upload_folder(client, bucket: str, prefix: str, data: list[bytes], classes: int) -> list[str]:
    keys = [f"{prefix}/c{i % classes:04d}/img_{i:07d}.JPEG" for i in range(len(data))]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), zip(keys, data)))
    return keys


def nested_tar(data: list[bytes], classes: int) -> bytes:
    inner: dict[str, io.BytesIO] = {}
    tars: dict[str, tarfile.TarFile] = {}
    for i, d in enumerate(data):
        c = f"n{i % classes:08d}"
        if c not in tars:
            inner[c] = io.BytesIO()
            tars[c] = tarfile.open(fileobj=inner[c], mode="w")
        info = tarfile.TarInfo(f"{c}_{i}.JPEG")
        info.size = len(d)
        tars[c].addfile(info, io.BytesIO(d))
    outer = io.BytesIO()
    with tarfile.open(fileobj=outer, mode="w") as tar:
        for c, t in tars.items():
            t.close()
            raw = inner[c].getvalue()
            info = tarfile.TarInfo(f"{c}.tar")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return outer.getvalue()


def floor_folder(client, bucket: str, keys: list[str], prefix: str, dest: str, workers: int) -> None:
    def get(key):
        out = os.path.join(dest, key[len(prefix) + 1:])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        client.download_file(bucket, key, out)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(get, keys))


def floor_tar(client, bucket: str, key: str, dest: str) -> int:
    """Download, then extract the nested tars; returns the peak extra disk (the archive's copy)."""
    os.makedirs(dest, exist_ok=True)
    local = os.path.join(dest, "archive.tar")
    client.download_file(bucket, key, local)
    peak = os.path.getsize(local)
    with tarfile.open(local) as tar:
        for m in tar:
            inner = tar.extractfile(m)
            with tarfile.open(fileobj=inner, mode="r|") as itar:
                cdir = os.path.join(dest, m.name[:-4])
                os.makedirs(cdir, exist_ok=True)
                for im in itar:
                    with open(os.path.join(cdir, im.name), "wb") as f:
                        f.write(itar.extractfile(im).read())
    os.unlink(local)
    return peak


def timed(fn, repeats: int, clean) -> list[float]:
    out = []
    for _ in range(repeats):
        clean()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--tar-mb", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket", default="bench")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import boto3

    from dcv2_k8s.data.stage import stage

    server = None
    if not os.environ.get("AWS_ENDPOINT_URL_S3"):
        from dcv2_k8s.distributed import free_port

        port = free_port()
        exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
        server = subprocess.Popen(["nice", "-n", "19", exe, "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for _ in range(100):
        try:
            client.create_bucket(Bucket=args.bucket)
            break
        except client.exceptions.BucketAlreadyOwnedByYou:
            break
        except Exception:
            time.sleep(0.2)
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="bench-stage-")
    rows, res = [], {"machine": machine(), "files": args.files, "repeats": args.repeats, "folder": [], "tar": {}}
    try:
        data = payloads(args.files, rng)
        keys = upload_folder(client, args.bucket, "folder", data, args.classes)
        total_mb = sum(map(len, data)) / 1e6
        dest = os.path.join(work, "dest")

        def clean():
            shutil.rmtree(dest, ignore_errors=True)

        for w in args.workers:
            ours = statistics.median(timed(lambda: stage(f"s3://{args.bucket}/folder", dest, workers=w,
                                                         progress=False, log_every=0), args.repeats, clean))
            floor = statistics.median(timed(lambda: floor_folder(client, args.bucket, keys, "folder", dest, w),
                                            args.repeats, clean))
            r = {"workers": w, "ours_s": ours, "floor_s": floor, "ours_files_per_s": args.files / ours,
                 "floor_files_per_s": args.files / floor, "ours_MBps": total_mb / ours, "ratio": floor / ours,
                 "projected_imagenet_train_min": IMAGENET_TRAIN_FILES / (args.files / ours) / 60}
            res["folder"].append(r)
            rows.append([f"ImageFolder objects, {args.files} x ~110 KB, {w} workers", f"{r['floor_files_per_s']:.0f} files/s",
                         f"{r['ours_files_per_s']:.0f} files/s ({r['ours_MBps']:.0f} MB/s)", f"{r['ratio']:.2f}",
                         f"{r['projected_imagenet_train_min']:.0f} min for 1.28 M files"])
            print(rows[-1], flush=True)
        n_tar = max(args.classes, int(args.tar_mb * 1e6 / 110_000))
        tar_data = payloads(n_tar, rng)
        blob = nested_tar(tar_data, args.classes)
        client.upload_fileobj(io.BytesIO(blob), args.bucket, "ilsvrc/ILSVRC2012_img_train.tar")
        mb = len(blob) / 1e6
        peak = [0]

        def run_floor():
            peak[0] = floor_tar(client, args.bucket, "ilsvrc/ILSVRC2012_img_train.tar", dest)

        ours = statistics.median(timed(lambda: stage(f"s3://{args.bucket}/ilsvrc/ILSVRC2012_img_train.tar", dest,
                                                     workers=8, progress=False, log_every=0), args.repeats, clean))
        floor = statistics.median(timed(run_floor, args.repeats, clean))
        res["tar"] = {"bytes": len(blob), "files": n_tar, "ours_s": ours, "floor_s": floor, "ours_MBps": mb / ours,
                      "floor_MBps": mb / floor, "ratio": floor / ours, "floor_extra_disk_bytes": peak[0],
                      "ours_extra_disk_bytes": 0,
                      "projected_imagenet_train_tar_min": IMAGENET_TRAIN_TAR_GB * 1e3 / (mb / ours) / 60}
        t = res["tar"]
        rows.append([f"ILSVRC train release, one {mb:.0f} MB tar of {args.classes} tars",
                     f"{t['floor_MBps']:.0f} MB/s (+{peak[0] / 1e6:.0f} MB disk)", f"{t['ours_MBps']:.0f} MB/s (+0 disk)",
                     f"{t['ratio']:.2f}", f"{t['projected_imagenet_train_tar_min']:.0f} min for 147.9 GB"])
        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server:
            server.terminate()
            server.wait(timeout=30)
    write_results(args.out, res, rows, ["layout", "floor (boto3)", "ours (dcv2 stage)", "ratio ours/floor",
                                        "ImageNet at this rate"],
                  "dcv2 stage throughput vs boto3 (median of repeats; ratio > 1: ours faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
