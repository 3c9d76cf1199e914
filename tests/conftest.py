"""Shared fixtures: a small synthetic dataset, CLI runners and a free port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = "config=pretrain/deepcluster_v2/deepclusterv2_demo_cpu"


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: str | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``python -m dcv2_k8s ARGS`` in a fresh process (the way users run ``dcv2``)."""
    return subprocess.run([sys.executable, "-m", "dcv2_k8s", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(env), cwd=cwd or str(ROOT))


def child_env(extra: dict | None = None) -> dict:
    """This environment without a launcher's variables (a child decides its own ranks), plus ``extra``; a
    value of None removes that variable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "DCV2_EXIT_DIR") and not k.startswith(("PET_", "TORCHELASTIC_"))}
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@contextlib.contextmanager
def environ(values: dict):
    """``values`` set in this process's environment for the block, and what was there before put back."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3():
    """A real HTTP S3 endpoint on 127.0.0.1 (moto's server) with buckets ``data`` and ``ckpt``, its variables set
    in this process for the module's tests."""
    from dcv2_k8s.s3server import EmbeddedS3

    server = EmbeddedS3().start(["data", "ckpt"])
    with environ(server.env()):
        yield server
    server.stop()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """10 classes x 24 train + 6 val images of 48 px."""
    from dcv2_k8s.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, classes=10, train_per_class=24, val_per_class=6, size=48, progress=False)
    return out


def tiny_train_tokens(data: Path, ckpt: Path, *extra: str) -> list[str]:
    """A seconds-long DCv2 run: resnet18 at 1/4 width, 2 x 32 px crops, batch 16, K = 3 x 12. No collapse
    diagnostics (a feature pass after every epoch would dominate these runs); the tests of the diagnostics turn them
    on with ``config.MONITOR.DIAG_FREQUENCY=1`` among ``extra`` (a later token wins)."""
    return [DEMO, f"config.DATA.TRAIN.DATA_PATHS=[{data / 'train'}]", f"config.CHECKPOINT.DIR={ckpt}",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16", "config.DATA.NUM_DATALOADER_WORKERS=0",
            "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.25",
            'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [128, 64], "use_relu": true, "use_bn": true, '
            '"skip_last_layer_relu_bn": false}], ["mlp", {"dims": [64, 32]}]]',
            "config.LOSS.deepclusterv2_loss.memory_params.embedding_dim=32",
            "config.LOSS.deepclusterv2_loss.num_clusters=[12, 12, 12]",
            "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 3, size_crops: [32, 16], "
            "num_crops: [2, 1], crop_scales: [[0.3, 1], [0.1, 0.3]]}, {name: RandomHorizontalFlip, p: 0.5}, "
            "{name: ImgPilColorDistortion, strength: 1.0}, {name: ToTensor}, "
            "{name: Normalize, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}]",
            "config.LOG_FREQUENCY=1", "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1", "config.MONITOR.DIAG_FREQUENCY=0",
            *extra]


def run_local_args(manifest: Path, data: Path, ckpt: Path, *extra: str) -> list[str]:
    """``dcv2 k8s run-local MANIFEST`` with tiny settings (one CPU process per pod, ResNet-18) as ``--set``s."""
    sets = tiny_train_tokens(data, ckpt, "config.METRICS.ENABLED=false", "config.MACHINE.DEVICE=cpu",
                             "config.MODEL.TRUNK.RESNETS.DEPTH=18", *extra)[1:]
    args = ["k8s", "run-local", str(manifest), "--nproc-per-node", "1", "--timeout", "500"]
    for s in sets:
        args += ["--set", s]
    return args


def pytest_terminal_summary(terminalreporter):
    """The fault-injection figures (tests/test_faults.py), as a Markdown table; also to $DCV2_FAULT_REPORT."""
    rows = getattr(sys.modules.get("tests.test_faults"), "REPORT", None)
    if not rows:
        return
    header = ["scenario", "runs", "survived", "steps recomputed", "data lost", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    terminalreporter.write_sep("=", "fault injection: runs / survived / steps recomputed / data lost")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get("DCV2_FAULT_REPORT")
    if path:
        Path(path).write_text("\n".join(lines) + "\n")
