"""Object storage against a real HTTP S3 endpoint on 127.0.0.1 (moto's server): round trips, staging,
unsafe archives, user errors, S3 checkpoints with exact resume, SIGTERM (outages: tests/test_faults.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import pytest
import torch

from dcv2_k8s.checkpoint import CheckpointManager, from_bytes
from dcv2_k8s.data.stage import UnsafeArchive, stage, verify
from dcv2_k8s.storage import S3Storage, open_storage
from tests.conftest import ROOT, run_cli, tiny_train_tokens

pytestmark = pytest.mark.slow


def _client(s3):
    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def test_round_trip_small_and_multipart(s3):
    store = open_storage("s3://data/rt")
    store.put_bytes("s3://data/rt/small.bin", b"hello")
    assert store.get_bytes("s3://data/rt/small.bin") == b"hello" and store.size("s3://data/rt/small.bin") == 5
    big = os.urandom(70 * 2 ** 20)  # above the 64 MiB multipart threshold
    store.put_bytes("s3://data/rt/a/big.bin", big)
    head = _client(s3).head_object(Bucket="data", Key="rt/a/big.bin")
    assert "-" in head["ETag"]  # uploaded in parts
    assert store.get_bytes("s3://data/rt/a/big.bin") == big
    assert store.list_dirs("s3://data/rt") == ["a"] and not store.exists("s3://data/rt/nope")
    store.delete_tree("s3://data/rt")
    assert store.list_objects("s3://data/rt") == []


def _upload_folder(s3, local: Path, prefix: str) -> int:
    c = _client(s3)
    n = 0
    for p in sorted(local.rglob("*.jpg")):
        c.upload_file(str(p), "data", f"{prefix}/{p.relative_to(local)}")
        n += 1
    return n


def test_stage_image_folder_then_resume(s3, synth_data, tmp_path):
    n = _upload_folder(s3, synth_data / "train", "folder")
    dest = tmp_path / "staged"
    m = stage("s3://data/folder", str(dest), workers=8, progress=False)
    assert m["num_files"] == n == 240 and len(m["classes"]) == 10 and m["transferred"] == n
    assert verify(str(dest)) == []
    # an interruption: some files missing, one truncated, one leftover partial download
    files = sorted(dest.rglob("*.jpg"))
    for p in files[:30]:
        p.unlink()
    files[40].write_bytes(files[40].read_bytes()[:100])
    (files[41].parent / ".x.jpg.part").write_bytes(b"junk")
    problems = verify(str(dest))
    assert len(problems) == 31 and any("size differs" in p for p in problems)
    m2 = stage("s3://data/folder", str(dest), workers=8, progress=False)
    assert m2["transferred"] == 31 and m2["skipped"] == n - 31 and verify(str(dest)) == []
    # the staged manifest fixes the dataset's file list; a directory that no longer matches it is an error naming
    # both (not a silent change of sample indices), and staging again brings them back in line
    from dcv2_k8s.data.dataset import IndexedImageFolder, ManifestMismatch

    assert len(IndexedImageFolder(dest)) == n
    (dest / "c00_stripes" / "late_arrival.jpg").write_bytes(files[0].read_bytes())
    with pytest.raises(ManifestMismatch, match="late_arrival.jpg"):
        IndexedImageFolder(dest)
    m3 = stage("s3://data/folder", str(dest), workers=8, progress=False)
    assert m3["removed"] == 1 and len(IndexedImageFolder(dest)) == n


def _tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def test_stage_progress_metrics(s3, synth_data, tmp_path):
    import urllib.request

    from dcv2_k8s.distributed import free_port
    from dcv2_k8s.metrics import StageMetrics

    _upload_folder(s3, synth_data / "val", "metrics-src")
    port = free_port()
    sm = StageMetrics("s3://data/metrics-src", port, "127.0.0.1")
    try:
        stage("s3://data/metrics-src", str(tmp_path / "m"), progress=False, on_event=sm)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        sm.close()
    values = {l.split("{")[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("dcv2_stage")}
    assert values["dcv2_stage_files_done"] == 60 and values["dcv2_stage_complete"] == 1
    assert values["dcv2_stage_bytes_done"] == values["dcv2_stage_bytes_total"] > 0


def test_stage_tar_archives(s3, synth_data, tmp_path):
    c = _client(s3)
    imgs = sorted((synth_data / "train").rglob("*.jpg"))
    # ImageNet style: one flat tar per class, named after the class
    c.put_object(Bucket="data", Key="tars/n0001.tar", Body=_tar_bytes({f"a{i}.JPEG": imgs[i].read_bytes()
                                                                       for i in range(5)}))
    # a shard with CLASS/IMAGE members
    c.put_object(Bucket="data", Key="tars/shard-000.tar", Body=_tar_bytes(
        {f"n0002/b{i}.JPEG": imgs[10 + i].read_bytes() for i in range(4)}))
    dest = tmp_path / "t"
    m = stage("s3://data/tars", str(dest), progress=False)
    assert m["classes"] == {"n0001": 5, "n0002": 4}
    m2 = stage("s3://data/tars", str(dest), progress=False)
    assert m2["transferred"] == 0 and m2["skipped"] == 2


@pytest.mark.parametrize("bad", ["../escape.JPEG", "/abs/path.JPEG", "link"])
def test_unsafe_archives_are_refused(s3, tmp_path, bad):
    members = {"ok/a.JPEG": b"x"}
    links = None
    if bad == "link":
        links = {"ok/link.JPEG": "/etc/passwd"}
    else:
        members[bad] = b"evil"
    key = f"evil-{abs(hash(bad))}/x.tar"  # one archive per case (moto's objects outlive a server in one process)
    _client(s3).put_object(Bucket="data", Key=key, Body=_tar_bytes(members, links))
    dest = tmp_path / "e"
    with pytest.raises(UnsafeArchive, match="refusing the archive"):
        stage(f"s3://data/{key}".rsplit("/", 1)[0], str(dest), progress=False)
    assert not (tmp_path / "escape.JPEG").exists() and not Path("/abs/path.JPEG").exists()
    assert not (dest / "ok").exists()  # nothing of the archive was extracted


def test_user_errors_are_one_line(s3, tmp_path):
    def stage_cli(src, env):
        return run_cli("stage", src, str(tmp_path / "x"), env=env, timeout=120)

    p = stage_cli("s3://no-such-bucket/x", {})
    assert p.returncode == 2 and "bucket does not exist" in p.stderr and p.stderr.count("\n") == 1
    t0 = time.time()
    p = stage_cli("s3://data/x", {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "DCV2_S3_MAX_ATTEMPTS": "2",
                                  "DCV2_S3_CONNECT_TIMEOUT": "2"})
    assert p.returncode == 2 and "cannot reach the S3 endpoint" in p.stderr and time.time() - t0 < 60
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
           "AWS_CONFIG_FILE": "/nonexistent"}
    full = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    p = subprocess.run([sys.executable, "-m", "dcv2_k8s", "stage", "s3://data/x", str(tmp_path / "y")],
                       capture_output=True, text=True, env={**full, **{k: v for k, v in env.items() if v}},
                       timeout=120, cwd=str(ROOT))
    assert p.returncode == 2 and "no S3 credentials" in p.stderr
    # before training starts: an unreachable checkpoint store
    p = run_cli("train", *tiny_train_tokens(Path("/nonexistent"), Path("s3://no-such-bucket/run")), timeout=120)
    assert p.returncode == 2


def test_checkpoint_to_s3_then_exact_resume(s3, synth_data, tmp_path):
    common = ["config.OPTIMIZER.num_epochs=2", "config.TRAINER.DETERMINISTIC=true"]
    local = tmp_path / "straight"
    p = run_cli("train", *tiny_train_tokens(synth_data, local, *common))
    assert p.returncode == 0, p.stderr[-3000:]
    uri = "s3://ckpt/resume-test"
    p = run_cli("train", *tiny_train_tokens(synth_data, Path("/x"), *common, f"config.CHECKPOINT.DIR={uri}",
                                            "config.TRAINER.MAX_STEPS=10"))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli("train", *tiny_train_tokens(synth_data, Path("/x"), *common, f"config.CHECKPOINT.DIR={uri}"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step_000000010" in p.stdout
    m = CheckpointManager(uri).latest()
    assert m["global_step"] == 14 and set(m["files"]) == {"state.pt", "bank_rank0000.pt", "bank_rank0001.pt"}
    # the metrics log lives next to the checkpoints in S3, continued across the restart; nothing local
    log = [json.loads(l) for l in S3Storage(uri).get_bytes(f"{uri}/metrics.jsonl").decode().splitlines()]
    assert [e["global_step"] for e in log if e["kind"] == "step"] == list(range(1, 15))
    assert not (ROOT / "s3:").exists()
    a = from_bytes(open_storage(uri).get_bytes(f"{uri}/{m['name']}/state.pt"))["model"]
    b = from_bytes((local / CheckpointManager(str(local)).latest()["name"] / "state.pt").read_bytes())["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_commits_a_checkpoint_and_resumes(synth_data, tmp_path):
    ckpt = tmp_path / "run"
    cmd = [sys.executable, "-m", "dcv2_k8s", "train",
           *tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=30",
                              "config.DISTRIBUTED.NUM_PROC_PER_NODE=1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    deadline = time.time() + 120
    while not (ckpt / "metrics.jsonl").exists() or '"step"' not in (ckpt / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]
    assert time.time() - t0 < 30  # inside Kubernetes' default grace period
    m = CheckpointManager(str(ckpt)).latest()
    assert m is not None
    p = run_cli("train", *tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=3",
                                            "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"))
    assert p.returncode == 0 and f"resumed from {m['name']}" in p.stdout
    assert json.loads((ckpt / "latest.json").read_text())["name"] != m["name"] or m["global_step"] >= 21
