"""User mistakes before any process group forms, secrets kept out of every output, the metrics endpoint."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from dcv2_k8s.distributed import free_port
from dcv2_k8s.s3server import EmbeddedS3
from tests.conftest import ROOT, child_env, tiny_train_tokens

pytestmark = pytest.mark.slow

NO_S3 = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "DCV2_S3_MAX_ATTEMPTS": "1", "DCV2_S3_CONNECT_TIMEOUT": "1",
         "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
NO_CREDS = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": None,
            "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_EC2_METADATA_DISABLED": "true"}
UNDER_TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
MC = "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 5, size_crops: [32, 16], " \
     "num_crops: [2, 2], crop_scales: [[0.3, 1], [0.1, 0.3]]}, {name: ToTensor}]"

# (what the user got wrong, extra tokens, environment, what the one line must name)
MISTAKES = [
    ("unknown key", ["config.OPTIMIZER.num_epoch=3"], {}, "config.OPTIMIZER.num_epoch"),
    ("wrong type", ["config.OPTIMIZER.num_epochs=many"], {}, "config.OPTIMIZER.num_epochs"),
    ("crops do not add up", [MC], {}, "total_num_crops"),
    ("more clusters than a rank's bank holds", ["config.LOSS.deepclusterv2_loss.num_clusters=[500, 500, 500]"], {},
     "num_clusters"),
    ("SyncBN group does not divide the world",
     ["config.DISTRIBUTED.NUM_PROC_PER_NODE=4", "config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE=3"], {}, "GROUP_SIZE=3"),
    ("batch larger than a rank's share", ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4096"], {}, "BATCHSIZE_PER_REPLICA"),
    ("NUM_NODES x NUM_PROC_PER_NODE != WORLD_SIZE under torchrun",
     ["config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"], UNDER_TORCHRUN, "NUM_NODES"),
    ("missing data path", ["config.DATA.TRAIN.DATA_PATHS=[/nonexistent/imagenet/train]"], {}, "/nonexistent/imagenet"),
    ("unreachable S3", ["config.CHECKPOINT.DIR=s3://ckpt/run"], NO_S3, "cannot reach the S3 endpoint"),
    ("missing S3 credentials", ["config.CHECKPOINT.DIR=s3://ckpt/run"], NO_CREDS, "no S3 credentials"),
    ("nccl asked for on the CPU", ["config.DISTRIBUTED.BACKEND=nccl"], {}, "BACKEND=nccl"),
    ("AMP opt level O3", ["config.MODEL.AMP_PARAMS.USE_AMP=true", 'config.MODEL.AMP_PARAMS.AMP_ARGS={"opt_level": "O3"}'],
     {}, "O3"),
    ("unknown augmentation backend", ["config.DATA.TRAIN.AUG_BACKEND=dali"], {}, "AUG_BACKEND"),
    ("metrics port out of range", ["config.METRICS.PORT=70000"], {}, "config.METRICS.PORT"),
]


@pytest.mark.parametrize("what,tokens,env,names", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_user_mistake_is_one_line_and_exit_2(what, tokens, env, names, synth_data, tmp_path):
    t0 = time.time()
    guard = ["config.TRAINER.MAX_STEPS=1"]  # if a mistake were missed, the run would stop after one step
    p = subprocess.run([sys.executable, "-m", "dcv2_k8s", "train", *tiny_train_tokens(synth_data, tmp_path / "c"),
                        *guard, *tokens], capture_output=True, text=True, env=child_env(env), cwd=str(ROOT), timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, f"{what}: exit {p.returncode}\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("dcv2: error: ") and names in lines[0], (what, lines)
    # nothing started: no process group, no training log, no checkpoint directory
    assert "training" not in p.stdout and "process group" not in p.stdout + p.stderr
    assert not (tmp_path / "c").exists()
    assert time.time() - t0 < 60


SECRET_KEY_ID, SECRET = "AKIADCV2REDACTTEST01", "dcv2-s3cr3t-MUST-NOT-LEAK-7f3a"


def test_secrets_never_reach_logs_configs_metrics_or_checkpoints(synth_data, tmp_path):
    """A run with S3 checkpoints and credentials in the environment: the secret and the key id appear in no log
    line, config dump, metrics.jsonl, checkpoint object or /metrics scrape; an endpoint URL with a password in
    an error line is redacted."""
    server = EmbeddedS3().start(["ckpt"])
    try:
        env = dict(server.env(), AWS_ACCESS_KEY_ID=SECRET_KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
        port = free_port()
        tokens = tiny_train_tokens(synth_data, tmp_path / "x", "config.OPTIMIZER.num_epochs=2",
                                   "config.CHECKPOINT.DIR=s3://ckpt/secret-run", "config.METRICS.ENABLED=true",
                                   f"config.METRICS.PORT={port}", "config.METRICS.ADDR=127.0.0.1",
                                   "config.DISTRIBUTED.NUM_PROC_PER_NODE=1")
        proc = subprocess.Popen([sys.executable, "-m", "dcv2_k8s", "train", *tokens], env=child_env(env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
        scrapes = []
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                scrapes.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode())
            except OSError:
                pass
            time.sleep(0.3)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        assert scrapes and any("dcv2_train_steps_total" in s for s in scrapes)
        shown = subprocess.run([sys.executable, "-m", "dcv2_k8s", "config", "show", *tokens], env=child_env(env),
                               capture_output=True, text=True, cwd=str(ROOT), timeout=120)
        import boto3

        s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        objects = [s3.get_object(Bucket="ckpt", Key=o["Key"])["Body"].read()
                   for o in s3.list_objects_v2(Bucket="ckpt", Prefix="secret-run/")["Contents"]]
        assert any(o for o in objects) and len(objects) >= 4
        texts = [out, shown.stdout, shown.stderr, *scrapes]
        for needle in (SECRET, SECRET_KEY_ID):
            assert not any(needle in t for t in texts), needle
            assert not any(needle.encode() in o for o in objects), needle
        # an endpoint written with a password: the error line shows the user, never the password
        password = "dcv2-url-password-9c1e"  # not the secret key: the URL redaction itself is what is tested
        bad = dict(env, AWS_ENDPOINT_URL_S3=f"http://user:{password}@127.0.0.1:9", DCV2_S3_MAX_ATTEMPTS="1",
                   DCV2_S3_CONNECT_TIMEOUT="1")
        p = subprocess.run([sys.executable, "-m", "dcv2_k8s", "train", *tokens], env=child_env(bad), capture_output=True,
                           text=True, cwd=str(ROOT), timeout=120)
        assert p.returncode == 2 and "http://user:***@127.0.0.1:9" in p.stderr, p.stderr
        assert SECRET not in p.stdout + p.stderr and password not in p.stdout + p.stderr
    finally:
        server.stop()


def test_metrics_endpoint_binds_where_configured_and_serves_metrics_only():
    from dcv2_k8s.metrics import PrometheusMetrics

    port = free_port()
    m = PrometheusMetrics("r", 0, True, port, "127.0.0.1")
    try:
        assert m.server.server_address == ("127.0.0.1", port)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "dcv2_train_steps_total" in body
        for path in ("/", "/debug", "/metrics/../etc/passwd", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            assert e.value.code == 404, path
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x",
                                                          method="POST"), timeout=5)
        assert e.value.code == 405
        # bound to loopback only: another local address of this machine is refused
        import socket

        others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for addr in others:
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
    finally:
        m.close()
