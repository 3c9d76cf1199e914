"""Object storage against a real HTTP S3 endpoint on 127.0.0.1 (moto's server): round trips, ranged reads, user
errors, S3 checkpoints with exact resume, SIGTERM (outages: tests/test_faults.py; staging: tests/test_stage_*.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

from dcv2_k8s.checkpoint import CheckpointManager, from_bytes
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


def test_ranged_and_whole_reads_on_both_backends(s3, tmp_path):
    """``get_range``: bytes [lo, hi) in one request, to the end with hi=None, the whole object by default; the
    same on a local file; ``head`` and ``list_objects`` answer alike for a local file and directory."""
    data = os.urandom(100_000)
    s3_store = open_storage("s3://data/ranged")
    s3_store.put_bytes("s3://data/ranged/obj.bin", data)
    local = tmp_path / "ranged" / "obj.bin"
    local.parent.mkdir()
    local.write_bytes(data)
    local_store = open_storage(str(local.parent))
    for store, path in ((s3_store, "s3://data/ranged/obj.bin"), (local_store, str(local))):
        assert store.get_range(path, 10, 20) == data[10:20]
        assert store.get_range(path, 99_990) == data[99_990:] and store.get_range(path) == data
        assert store.get_range(path, 5, 5) == b"" and store.get_range(path, 99_000, 200_000) == data[99_000:]
        assert int(store.head(path)["ContentLength"]) == len(data)
    assert s3_store.head("s3://data/ranged/nope") is None and local_store.head(str(tmp_path / "nope")) is None
    assert local_store.list_objects(str(local.parent)) == [{"Key": "obj.bin", "Size": len(data), "ETag": ""}]
    assert local_store.list_objects(str(local)) == [] and [o["Key"] for o in
                                                            s3_store.list_objects("s3://data/ranged")] == ["obj.bin"]


def test_user_errors_are_one_line(s3, tmp_path):
    def stage_cli(src, env):
        return run_cli("stage", src, str(tmp_path / "x"), env=env, timeout=120)

    p = stage_cli("s3://no-such-bucket/x", {})
    assert p.returncode == 2 and "bucket does not exist" in p.stderr and p.stderr.count("\n") == 1
    t0 = time.time()
    p = stage_cli("s3://data/x", {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "DCV2_S3_MAX_ATTEMPTS": "2",
                                  "DCV2_S3_CONNECT_TIMEOUT": "2"})
    # an unreachable store is an infrastructure fault: retryable (200), as for training (tests/test_throttling.py)
    assert p.returncode == 200 and "cannot reach the S3 endpoint" in p.stderr and time.time() - t0 < 60
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
