"""A VISSL user's own files and habits: a file as VISSL ships it runs (apex or not), preflight reports every
problem at once with its root cause, and every fix a message suggests is accepted when typed as written."""

from __future__ import annotations

import re

import pytest
import torch

from dcv2_k8s.cli import preflight
from dcv2_k8s.config import ConfigError, resolve
from dcv2_k8s.runtime import apex_available
from tests.conftest import DEMO, run_cli, tiny_train_tokens
from tests.test_config import VISSL_SHAPED

# the shape of VISSL's deepclusterv2_2crops_resnet.yaml as shipped: apex SyncBN in groups of 8, 8 nodes x 8 GPUs,
# nccl on gpu, 64 images per GPU and 3 x 3000 clusters
AS_SHIPPED = (VISSL_SHAPED.replace("SYNC_BN_TYPE: pytorch}", "SYNC_BN_TYPE: apex, GROUP_SIZE: 8}")
              .replace("NUM_NODES: 1, NUM_PROC_PER_NODE: 2", "NUM_NODES: 8, NUM_PROC_PER_NODE: 8")
              .replace("BATCHSIZE_PER_REPLICA: 16", "BATCHSIZE_PER_REPLICA: 64")
              .replace("num_clusters: [10, 10, 10]", "num_clusters: [3000, 3000, 3000]"))
assert AS_SHIPPED.count("apex") == 1 and "NUM_NODES: 8" in AS_SHIPPED and "[3000, 3000, 3000]" in AS_SHIPPED


def fixes_in(line: str) -> list[str]:
    """The tokens a message suggests (everything written ``config.KEY=VALUE`` after its first '; ')."""
    _, _, advice = line.partition("; ")
    return re.findall(r"\+?config\.[\w.]+=(?:\[[^\]]*\]|[^\s?]+)", advice)


def errors_of(tokens: list[str], data_size: int | None = None) -> list[str]:
    try:
        resolved = resolve(tokens)
        if data_size is not None:
            from dcv2_k8s.config.derive import check_dataset
            return check_dataset(resolved.cfg, data_size)
    except ConfigError as e:
        return e.lines
    return []


@pytest.mark.skipif(apex_available(), reason="apex is installed here: the file's apex SyncBN is used as asked")
def test_a_file_asking_for_apex_resolves_without_it_says_so_once_and_records_what_runs(tmp_path):
    f = tmp_path / "deepclusterv2_2crops_resnet.yaml"
    f.write_text(AS_SHIPPED)
    p = run_cli("config", "show", f"config={f}", timeout=120)
    assert p.returncode == 0, p.stderr
    notes = [line for line in p.stderr.splitlines() if "apex" in line]
    assert len(notes) == 1 and "torch's SyncBatchNorm" in notes[0], p.stderr
    silence = fixes_in(notes[0])
    assert silence == ["config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=pytorch"]
    assert "SYNC_BN_TYPE: pytorch, GROUP_SIZE: 8" in p.stdout  # the resolved config says what runs, same groups
    p = run_cli("config", "show", f"config={f}", *silence, timeout=120)
    assert p.returncode == 0 and "apex" not in p.stderr, p.stderr


def test_a_vissl_file_on_one_machine_gets_every_problem_at_once_and_the_fixes_work(synth_data, tmp_path):
    """The file's 8 x 8 GPUs on one CPU machine: the device, the node count, the batch for the data and the
    clusters for the bank, each named with its cause, in one go; typing every suggested token gives a config that
    passes preflight."""
    f = tmp_path / "deepclusterv2_2crops_resnet.yaml"
    f.write_text(AS_SHIPPED)
    tokens = [f"config={f}", f"config.DATA.TRAIN.DATA_PATHS=[{synth_data / 'train'}]",
              f"config.CHECKPOINT.DIR={tmp_path / 'ckpt'}"]
    p = run_cli("train", *tokens, timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("dcv2: error: ")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "ckpt").exists()
    expected = ["NUM_NODES=8 needs a launcher", "fewer than one batch of 64", "num_clusters=[3000, 3000, 3000]"]
    if not torch.cuda.is_available():
        expected.insert(0, "config.MACHINE.DEVICE=gpu but this machine has no CUDA device")
    assert len(errors) == len(expected), errors
    for line, what in zip(errors, expected):
        assert what in line, (what, line)
    # the batch is judged over the 8 ranks the node-count fix leaves, not the file's 64
    assert "over 8 ranks" in errors[-2] and "64 ranks" not in p.stderr
    fixes = [t for line in errors for t in fixes_in(line)]
    assert len(fixes) >= len(expected)
    preflight(resolve(tokens + fixes).cfg)  # accepted as typed: nothing raised


MISMATCHES = [
    ("nccl on cpu", ["config.MACHINE.DEVICE=cpu", "config.DISTRIBUTED.BACKEND=nccl",
                     "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"], "BACKEND=nccl"),
    ("nccl and no CUDA", ["config.MACHINE.DEVICE=auto", "config.DISTRIBUTED.BACKEND=nccl",
                          "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"], "BACKEND=nccl"),
    ("gpu and no CUDA", ["config.MACHINE.DEVICE=gpu"], "MACHINE.DEVICE=gpu"),
    ("gpu, nccl and no CUDA", ["config.MACHINE.DEVICE=gpu", "config.DISTRIBUTED.BACKEND=nccl",
                               "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"], "MACHINE.DEVICE=gpu"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="these mismatches are about a machine without CUDA")
@pytest.mark.parametrize("what,tokens,names", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_a_device_or_backend_mismatch_is_one_line_and_exit_2_before_any_process(what, tokens, names, synth_data,
                                                                                 tmp_path):
    base = tiny_train_tokens(synth_data, tmp_path / "c", "config.TRAINER.MAX_STEPS=1")
    p = run_cli("train", *base, *tokens, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip() and "note:" not in line]
    assert p.returncode == 2, (what, p.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("dcv2: error: ") and names in lines[0], (what, lines)
    assert "process group" not in p.stdout + p.stderr and not (tmp_path / "c").exists()
    fixes = fixes_in(lines[0])
    assert fixes, lines
    preflight(resolve(base + tokens + fixes).cfg)


def test_more_processes_than_gpus_is_refused_with_a_count_that_works(synth_data, tmp_path, monkeypatch):
    """nccl puts one process on each device: asking for more is caught before the launch (CUDA faked to one device:
    the rule is the machine's count, checked here without a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    tokens = tiny_train_tokens(synth_data, tmp_path / "c", "config.MACHINE.DEVICE=gpu", "config.DISTRIBUTED.BACKEND=auto",
                               "config.DISTRIBUTED.NUM_PROC_PER_NODE=2")
    with pytest.raises(ConfigError) as e:
        preflight(resolve(tokens).cfg)
    assert len(e.value.lines) == 1 and "has 1 CUDA device" in e.value.lines[0], e.value.lines
    preflight(resolve(tokens + fixes_in(e.value.lines[0])).cfg)


# (a mistake as users type it, the error's fragment); each suggested token, typed instead, is accepted
SUGGESTIONS = [
    ("config.MODEL.HEAD.PARAMS.0.use_bn=false", "is a list"),
    ("+config.MODEL.HEAD.PARAMS.0.dims=[256, 256]", "is a list"),
    ("config.OPTIMIZER.NUM_EPOCHS=2", "did you mean"),
    ("config.OPTIMIZER.num_epoch=2", "did you mean"),
    ("config.LOSS.deepclusterv2_loss.num_clusters=64", "must be a list"),
    ("config.DATA.TRAIN.DATA_PATHS=/data/train", "must be a list"),
    ("config.MODEL.HEAD.PARAMS.1.1.dims=[32, 64]", "starts at 32"),
    ("config.MODEL.HEAD.PARAMS.1.1.dims=[256, 32]", "embedding_dim=64"),
    ("config.DATA.TRAIN.BATCHSIZE_PER_REPLCA=8", "did you mean"),
]


@pytest.mark.parametrize("token,fragment", SUGGESTIONS, ids=[s[0] for s in SUGGESTIONS])
def test_every_suggestion_is_accepted_when_typed(token, fragment):
    errors = errors_of([DEMO, token])
    assert len(errors) == 1 and fragment in errors[0], errors
    fixes = fixes_in(errors[0])
    assert fixes, errors[0]
    assert errors_of([DEMO, *fixes]) == [], (errors[0], fixes)


@pytest.mark.parametrize("tokens,size", [
    ([], 40), (["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64"], 100),
    (["config.LOSS.deepclusterv2_loss.num_clusters=[120, 30]"], 200)])
def test_the_data_size_suggestions_are_accepted_when_typed(tokens, size):
    """Too few images for a batch, or for the clusters: the batch and cluster lists suggested fit the data."""
    errors = errors_of([DEMO, *tokens], data_size=size)
    assert errors, "expected the data to be too small"
    fixes = [t for line in errors for t in fixes_in(line)]
    assert len(fixes) == len(errors), errors
    assert errors_of([DEMO, *tokens, *fixes], data_size=size) == [], (errors, fixes)


@pytest.mark.slow
@pytest.mark.skipif(apex_available() or torch.cuda.is_available(), reason="the fallback is for a machine without apex")
def test_a_run_asking_for_apex_trains_with_torch_syncbn_and_native_amp_and_says_so_once(synth_data, tmp_path):
    from dcv2_k8s.weights import read_file
    from tests.test_engine import BF16_CROPS  # crops large enough for bfloat16 to stay finite

    ckpt = tmp_path / "run"
    p = run_cli("train", *tiny_train_tokens(synth_data, ckpt, "config.TRAINER.MAX_STEPS=2",
                                            "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=true",
                                            "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex",
                                            "config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MODEL.AMP_PARAMS.DTYPE=bfloat16",
                                            "config.MODEL.AMP_PARAMS.AMP_TYPE=apex", BF16_CROPS), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert log.count("apex is not installed here") == 1 and log.count("AMP_TYPE=apex runs as torch's native") == 1
    saved = read_file(str(ckpt))["config_yaml"]  # the newest checkpoint's own record of the config
    assert "SYNC_BN_TYPE: pytorch" in saved and "AMP_TYPE: pytorch" in saved
