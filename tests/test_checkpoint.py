"""Checkpoint commit protocol and retention (local storage, one process)."""

from __future__ import annotations

import json

import torch

from dcv2_k8s.checkpoint import CheckpointManager, from_bytes
from dcv2_k8s.weights import read_file


def _save(m: CheckpointManager, step: int, epoch: int, epoch_end: bool = True) -> None:
    m.save(CheckpointManager.name_for(step), {"model": {"w": torch.tensor([float(step)])}},
           {"bank": {"ptr": step}}, {"epoch": epoch, "global_step": step, "epoch_end": epoch_end})
    m.wait()


def test_retention_keeps_last_n_and_every_mth_epoch(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=2, keep_every_epochs=2)
    for e in range(1, 7):
        _save(m, 10 * e, e)
    kept = [c["epoch"] for c in m.committed()]
    assert kept == [2, 4, 5, 6]
    assert json.loads((tmp_path / "latest.json").read_text())["name"] == "step_000000060"
    assert read_file(str(tmp_path))["model"]["w"].item() == 60


def test_uncommitted_checkpoint_is_never_loaded(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=0, background=True)
    _save(m, 10, 1)
    # a crash after writing the parts but before the manifest: a directory without manifest.json
    half = tmp_path / "step_000000020"
    half.mkdir()
    (half / "state.pt").write_bytes(b"partial")
    (tmp_path / "latest.json").write_text(json.dumps({"name": "step_000000020"}))  # even if latest points there
    assert m.latest()["name"] == "step_000000010"
    # a part whose size differs from the manifest does not count as committed either
    good = tmp_path / "step_000000010"
    (good / "bank_rank0000.pt").write_bytes(b"x")
    assert m.latest() is None
    assert from_bytes((good / "state.pt").read_bytes())["model"]["w"].item() == 10


def test_commit_waits_for_every_rank(tmp_path):
    r1 = CheckpointManager(str(tmp_path), rank=1, world_size=2, background=False)
    r0 = CheckpointManager(str(tmp_path), rank=0, world_size=2, background=True, commit_timeout=30)
    r0.save("step_000000005", {"model": {}}, {"bank": {"ptr": 0}}, {"epoch": 0, "global_step": 5})
    assert not (tmp_path / "step_000000005" / "manifest.json").exists()  # rank 1's part is missing
    r1.save("step_000000005", None, {"bank": {"ptr": 1}}, {"epoch": 0, "global_step": 5})
    r0.wait()
    manifest = json.loads((tmp_path / "step_000000005" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state.pt", "bank_rank0000.pt", "bank_rank0001.pt"}


def test_commit_times_out_when_a_rank_never_writes(tmp_path):
    r0 = CheckpointManager(str(tmp_path), rank=0, world_size=2, commit_timeout=1)
    r0.save("step_000000005", {"model": {}}, {"bank": {}}, {"epoch": 0, "global_step": 5})
    try:
        r0.wait()
        raise AssertionError("expected the commit to time out")
    except RuntimeError as e:
        assert "ranks [1] did not write their parts" in str(e)
    # latest.json names no checkpoint: it only records the run that owns the directory (its generation)
    assert "name" not in json.loads((tmp_path / "latest.json").read_text()) and r0.latest() is None
