"""Every command of VISSL's DeepClusterV2 page, verbatim: it resolves (``dcv2 config show``) to what the page says it
does, and trains for two steps with tiny settings added after it (CPU, one process). Also VISSL's own entry point,
``python tools/run_distributed_engines.py``."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from dcv2_k8s.checkpoint import CheckpointManager
from tests.conftest import ROOT, child_env, run_cli

BASE = "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"
LOSS = "config.LOSS.deepclusterv2_loss"
PAGE_HEAD = 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 2048], "use_relu": True}], ["mlp", {"dims": [2048, 128]}]]'

# (name, the page's tokens, what the resolved config must show)
SEED = [
    ("base", [BASE], {"MODEL.TRUNK.RESNETS.DEPTH": 50, "MODEL.HEAD.PARAMS.0.1.dims": [2048, 2048]}),
    ("temperature", [BASE, f"{LOSS}.temperature=0.2"], {"LOSS.deepclusterv2_loss.temperature": 0.2}),
    ("projection_256", [BASE, f"{LOSS}.temperature=0.2", f"{LOSS}.memory_params.embedding_dim=256"],
     {"LOSS.deepclusterv2_loss.memory_params.embedding_dim": 256, "MODEL.HEAD.PARAMS.1.1.dims": [2048, 256]}),
    ("resnet101", [BASE, "config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101"],
     {"MODEL.TRUNK.RESNETS.DEPTH": 101}),
    ("resnet101_w2", [BASE, "config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101",
                      "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2"],
     {"MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER": 2, "MODEL.HEAD.PARAMS.0.1.dims": [4096, 2048]}),
    ("multicrop", [BASE, "+config/pretrain/deepcluster_v2/transforms=multicrop_2x160_4x96"],
     {"DATA.TRAIN.TRANSFORMS.0.num_crops": [2, 4], "DATA.TRAIN.TRANSFORMS.0.size_crops": [160, 96]}),
    ("epochs", [BASE, "config.OPTIMIZER.num_epochs=100"], {"OPTIMIZER.num_epochs": 100}),
    ("one_gpu", [BASE, "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.NUM_NODES=1"],
     {"DISTRIBUTED.NUM_PROC_PER_NODE": 1, "DISTRIBUTED.NUM_NODES": 1}),
    ("custom_head", [BASE, PAGE_HEAD], {"MODEL.HEAD.PARAMS.0.1.use_relu": True}),
]


def _at(d, dotted):
    for part in dotted.split("."):
        d = d[int(part)] if isinstance(d, list) else d[part]
    return d


def _tiny(cfg: dict, data, ckpt) -> list[str]:
    """Tiny settings added after a seed command: its own crop layout at 1/5 of the size, small K, two steps."""
    mc = cfg["DATA"]["TRAIN"]["TRANSFORMS"][0]
    sizes = [max(16, s // 5) for s in mc["size_crops"]]
    crops = (f"{{name: ImgPilToMultiCrop, total_num_crops: {sum(mc['num_crops'])}, num_crops: {mc['num_crops']}, "
             f"size_crops: {sizes}, crop_scales: {mc['crop_scales']}}}")
    return [f"config.DATA.TRAIN.DATA_PATHS=[{data / 'train'}]", f"config.CHECKPOINT.DIR={ckpt}",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.DATA.NUM_DATALOADER_WORKERS=0",
            f"{LOSS}.num_clusters=[4, 4, 4]", "config.TRAINER.MAX_STEPS=2", "config.MACHINE.DEVICE=cpu",
            "config.DATA.TRAIN.DATA_LIMIT=40", "config.LOG_FREQUENCY=1",
            f"config.DATA.TRAIN.TRANSFORMS=[{crops}, {{name: RandomHorizontalFlip, p: 0.5}}, {{name: ToTensor}}]"]


@pytest.mark.parametrize("name,tokens,expect", SEED, ids=[s[0] for s in SEED])
def test_seed_command_resolves_as_the_page_says(name, tokens, expect):
    p = run_cli("config", "show", *tokens, timeout=120)
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)["config"]
    for key, value in expect.items():
        assert _at(cfg, key) == value, (key, _at(cfg, key))


@pytest.mark.slow
@pytest.mark.parametrize("name,tokens,expect", SEED, ids=[s[0] for s in SEED])
def test_seed_command_trains_two_steps(name, tokens, expect, synth_data, tmp_path):
    shown = yaml.safe_load(run_cli("config", "show", *tokens, timeout=120).stdout)["config"]
    ckpt = tmp_path / "ckpt"
    p = run_cli("train", *tokens, *_tiny(shown, synth_data, ckpt), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    manager = CheckpointManager(str(ckpt), 0, 1)
    state = manager.load_state(manager.latest())
    assert state["train_state"]["global_step"] == 2
    trained = yaml.safe_load(state["config_yaml"])["config"]
    for key, value in expect.items():
        if not key.startswith(("DATA.TRAIN.TRANSFORMS.0.size_crops",)):
            assert _at(trained, key) == value, (key, _at(trained, key))
    # the network that trained is the one the page describes (trunk width and depth, head, embedding)
    emb = shown["LOSS"]["deepclusterv2_loss"]["memory_params"]["embedding_dim"]
    assert state["model"]["prototypes0"].shape == (4, emb)
    first = state["model"]["head.0.0.weight"]
    assert first.shape[1] == shown["MODEL"]["HEAD"]["PARAMS"][0][1]["dims"][0]
    assert torch.isfinite(first).all()


@pytest.mark.slow
def test_vissl_entry_point_runs_dcv2_train(synth_data, tmp_path):
    import subprocess

    shown = yaml.safe_load(run_cli("config", "show", BASE, timeout=120).stdout)["config"]
    cmd = [sys.executable, "tools/run_distributed_engines.py", BASE, *_tiny(shown, synth_data, tmp_path / "ckpt"),
           "config.MODEL.TRUNK.RESNETS.DEPTH=18"]
    p = subprocess.run(cmd, cwd=str(ROOT), env=child_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert CheckpointManager(str(tmp_path / "ckpt"), 0, 1).latest()["global_step"] == 2
    bad = subprocess.run([*cmd[:3], "config.OPTIMIZER.num_epoch=3"], cwd=str(ROOT), env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean config.OPTIMIZER.num_epochs" in bad.stderr
