"""TensorBoard event files (``HOOKS.TENSORBOARD_SETUP``): real 2-process runs, read back with TensorBoard's reader."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from dcv2_k8s.config import ConfigError, resolve
from dcv2_k8s.tensorboard import log_dir, scalars
from tests.conftest import DEMO, run_cli, tiny_train_tokens

TB = "config.HOOKS.TENSORBOARD_SETUP"


def _read(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def _events(lines: str, kind: str) -> list[dict]:
    return [e for e in map(json.loads, lines.splitlines()) if e["kind"] == kind]


def test_log_dir_and_scalars():
    r = resolve([DEMO, "config.CHECKPOINT.DIR=s3://b/run/"])
    assert log_dir(r.cfg) == "s3://b/run/tb_logs"
    r = resolve([DEMO, "config.CHECKPOINT.DIR=/ck", f"{TB}.LOG_DIR=/logs", f"{TB}.EXPERIMENT_LOG_DIR=tb"])
    assert log_dir(r.cfg) == "/logs/tb"
    assert scalars("d", {"a": {"b": 1, "c": "x", "ok": True}, "l": [0.5, float("nan")]}) == \
        {"d/a/b": 1.0, "d/l/0": 0.5}


def test_vissl_hooks_section_reads_tensorboard_setup_and_drops_the_other_hooks(tmp_path):
    f = tmp_path / "vissl.yaml"
    f.write_text("config:\n  HOOKS:\n    PERF_STATS: {MONITOR_PERF_STATS: true}\n    LOG_GPU_STATS: true\n"
                 "    TENSORBOARD_SETUP: {USE_TENSORBOARD: true, EXPERIMENT_LOG_DIR: tb, FLUSH_EVERY_N_MIN: 1}\n")
    r = resolve([f"config={f}"])
    tb = r.cfg.HOOKS.TENSORBOARD_SETUP
    assert tb.USE_TENSORBOARD and tb.EXPERIMENT_LOG_DIR == "tb" and tb.FLUSH_EVERY_N_MIN == 1.0
    ignored = [n for n in r.notes if n.startswith("ignored")]
    assert any("config.HOOKS.PERF_STATS" in n for n in ignored) and any("HOOKS.LOG_GPU_STATS" in n for n in ignored)
    assert not any("TENSORBOARD_SETUP" in n for n in ignored)
    with pytest.raises(ConfigError, match="USE_TENSORBORD"):  # a misspelling inside the section we read
        resolve([DEMO, f"{TB}.USE_TENSORBORD=true"])
    with pytest.raises(ConfigError, match="FLUSH_EVERY_N_MIN"):
        resolve([DEMO, f"{TB}.FLUSH_EVERY_N_MIN=0"])


def test_other_ranks_write_nothing_and_a_failing_writer_stops_alone(tmp_path, caplog):
    """Not rank 0, or not asked for: no directory, no file. Histograms every epoch (-1) at the epoch's last window.
    A writer that fails (a full disk) is closed with one warning and every later call does nothing."""
    import torch

    from dcv2_k8s.tensorboard import TensorBoardLog

    tokens = [DEMO, f"config.CHECKPOINT.DIR={tmp_path / 'run'}", f"{TB}.USE_TENSORBOARD=true", f"{TB}.LOG_PARAMS=true",
              f"{TB}.LOG_PARAMS_EVERY_N_ITERS=-1"]
    for enabled, extra in ((False, []), (True, [f"{TB}.USE_TENSORBOARD=false"])):
        tb = TensorBoardLog(resolve(tokens + extra).cfg, None, enabled)
        tb.start(0, 4)
        tb.window({"global_step": 1, "step": 1, "loss": 1.0})
        tb.publish(final=True)
        tb.close()
    assert not (tmp_path / "run").exists()
    tb = TensorBoardLog(resolve(tokens).cfg, None, True)
    tb.watch(torch.nn.Linear(2, 2))
    tb.start(0, 4)
    for step in range(1, 9):
        tb.window({"global_step": step, "step": (step - 1) % 4 + 1, "loss": 1.0 / step})
    tb.publish(final=True)
    acc = _read(tmp_path / "run" / "tb_logs")
    assert _steps(acc, "train/loss") == list(range(1, 9))
    assert [e.step for e in acc.Histograms("params/weight")] == [4, 8]

    def full(*args):
        raise OSError(28, "No space left on device")

    tb.writer.add_scalar = full
    tb.window({"global_step": 9, "step": 1, "loss": 0.1})
    tb.knn(3, {"top1": 1.0})
    tb.publish(final=True)
    tb.close()
    assert tb.writer is None and sum("TensorBoard log stopped" in r.message for r in caplog.records) == 1


@pytest.mark.slow
def test_local_run_writes_one_event_file_from_rank_0(synth_data, tmp_path):
    """Two processes, two epochs of 7 steps, with the k-NN monitor, the collapse diagnostics and parameter
    histograms: every figure is in the one file rank 0 wrote, at the step it belongs to."""
    ckpt = tmp_path / "run"
    p = run_cli("train", *tiny_train_tokens(
        synth_data, ckpt, "config.OPTIMIZER.num_epochs=2", "config.MONITOR.DIAG_FREQUENCY=1",
        "config.MONITOR.DIAG_IMAGES=32", f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]",
        "config.MONITOR.KNN_FREQUENCY=1", f"{TB}.USE_TENSORBOARD=true", f"{TB}.LOG_PARAMS=true",
        f"{TB}.LOG_PARAMS_GRADIENTS=true", f"{TB}.LOG_PARAMS_EVERY_N_ITERS=5", f"{TB}.FLUSH_EVERY_N_MIN=0.05"),
        timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert [f.parent for f in files] == [ckpt / "tb_logs"], files  # one file: rank 0's
    acc = _read(ckpt / "tb_logs")
    every = list(range(1, 15))
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait_ratio", "train/ignored_ratio"):
        assert _steps(acc, tag) == every, tag
    losses = {e["global_step"]: e["loss"] for e in _events((ckpt / "metrics.jsonl").read_text(), "step")}
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([losses[s] for s in every], rel=1e-5)
    assert _steps(acc, "kmeans/seconds") == [1, 8]  # at the first step of the epoch each pass serves
    assert _steps(acc, "kmeans/head2/size_entropy") == [1, 8] and _steps(acc, "kmeans/head0/nmi_prev") == [8]
    assert _steps(acc, "knn/top1") == _steps(acc, "knn/top5") == [0, 7, 14]  # 0: the network at initialisation
    assert _steps(acc, "diagnostics/trunk/effective_rank") == [7, 14]
    assert _steps(acc, "diagnostics/weight_change/trunk.conv1/per_epoch") == [7, 14]
    assert _steps(acc, "checkpoint/snapshot_seconds") == _steps(acc, "checkpoint/seconds") == [7, 14]
    hist = acc.Tags()["histograms"]
    assert "params/trunk.conv1.weight" in hist and "grads/trunk.conv1.weight" in hist
    assert [e.step for e in acc.Histograms("params/trunk.conv1.weight")] == [5, 10]


@pytest.mark.slow
def test_s3_run_uploads_its_files_and_a_resume_replaces_the_redone_steps(synth_data, tmp_path, s3):
    """An ``s3://`` run: the files are uploaded with the checkpoints. The first attempt stops at step 10; its
    checkpoint of step 10 is then lost, so the second attempt resumes from step 7 and trains steps 8-14 again:
    TensorBoard's reader shows each step once, the second attempt's."""
    from dcv2_k8s.storage import open_storage

    root = f"s3://ckpt/tb-{random.randrange(10 ** 6)}"
    tokens = tiny_train_tokens(synth_data, Path("/unused"), "config.OPTIMIZER.num_epochs=2",
                               f"config.CHECKPOINT.DIR={root}", f"{TB}.USE_TENSORBOARD=true")
    p = run_cli("train", *tokens, "config.TRAINER.MAX_STEPS=10", env=s3.env(), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    store = open_storage(root)
    for d in store.list_dirs(root):
        if d.startswith("step_000000010"):
            store.delete_tree(store.join(d))
    p = run_cli("train", *tokens, env=s3.env(), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from step_000000007" in p.stdout + p.stderr

    objects = store.list_objects(f"{root}/tb_logs")
    assert len(objects) == 2 and all(o["Key"].startswith("events.out.tfevents.") for o in objects)  # 1 per attempt
    local = tmp_path / "tb"
    local.mkdir()
    for o in objects:
        (local / o["Key"]).write_bytes(store.get_bytes(f"{root}/tb_logs/{o['Key']}"))
    acc = _read(local)
    assert _steps(acc, "train/loss") == list(range(1, 15))
    assert _steps(acc, "kmeans/seconds") == [1, 8]
    assert _steps(acc, "checkpoint/snapshot_seconds") == [7, 14]  # attempt 1's step 10 is gone with its checkpoint
    events = _events(store.get_bytes(f"{root}/metrics.jsonl").decode(), "step")
    second = {e["global_step"]: e["loss"] for e in events if e["attempt"] == 2}
    first = {e["global_step"]: e["loss"] for e in events if e["attempt"] == 1}
    assert sorted(first) == list(range(1, 11)) and sorted(second) == list(range(8, 15))
    values = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert [values[s] for s in range(8, 15)] == pytest.approx([second[s] for s in range(8, 15)], rel=1e-5)


def _tb(tmp_path, root: str, *extra: str, store=None):
    from dcv2_k8s.tensorboard import TensorBoardLog

    cfg = resolve([DEMO, f"config.CHECKPOINT.DIR={root}", f"{TB}.USE_TENSORBOARD=true", *extra]).cfg
    return TensorBoardLog(cfg, store, True)


def test_a_failing_upload_never_fails_the_run_and_keeps_the_local_files(tmp_path, s3, caplog, monkeypatch):
    """LOG_DIR in a bucket that does not exist (a permanent StorageError): one warning while training, no exception,
    also at the end; the files stay in the local directory the warnings name. A local read error (OSError) while
    training: one warning, then the upload at the end succeeds and the local copy goes."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))  # the local copies, kept here, not in /tmp
    tb = _tb(tmp_path, f"s3://ckpt/tb-{random.randrange(10 ** 6)}", f"{TB}.LOG_DIR=s3://no-such-bucket/logs")
    tb.start(0, 4)
    local = Path(tb.local)
    for step in range(1, 5):
        tb.window({"global_step": step, "step": step, "loss": 1.0})
        tb.publish()  # a checkpoint
    tb.publish(final=True)  # finished()
    tb.close()
    warned = [r.getMessage() for r in caplog.records if "not uploaded" in r.getMessage().lower()]
    assert len(warned) == 2 and "does not exist" in warned[0] and str(local) in warned[0], warned
    assert "NOT uploaded" in warned[1] and str(local) in warned[1]
    assert _steps(_read(local), "train/loss") == [1, 2, 3, 4]  # kept, complete
    caplog.clear()

    tb = _tb(tmp_path, f"s3://ckpt/tb-{random.randrange(10 ** 6)}")
    tb.start(0, 4)

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", unreadable)
    tb.window({"global_step": 1, "step": 1, "loss": 1.0})
    tb.publish()
    tb.publish()
    local = Path(tb.local)
    monkeypatch.setattr(os, "listdir", listdir)
    tb.close()  # the end: uploaded after all, the local copy goes
    assert not local.exists() and sum("not uploaded" in r.getMessage() for r in caplog.records) == 1
    assert "PermissionError" in caplog.text and "NOT uploaded" not in caplog.text


def test_close_uploads_what_came_after_the_last_checkpoint_then_removes_the_local_copy(tmp_path, s3, monkeypatch):
    """The k-NN score and steps logged after the last checkpoint's upload (a MAX_STEPS stop: no finished()) are
    uploaded by close(); only then does the local copy go. An attempt that never reached a checkpoint: the same."""
    from dcv2_k8s.storage import open_storage

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    root = f"s3://ckpt/tb-{random.randrange(10 ** 6)}"
    store = open_storage(root)
    tb = _tb(tmp_path, root, store=store)
    tb.start(0, 4)
    local = Path(tb.local)
    for step in range(1, 5):
        tb.window({"global_step": step, "step": step, "loss": 1.0})
    tb.checkpoint_saved(4, 0.5)
    tb.publish()  # the checkpoint's upload
    tb.knn(1, {"top1": 0.5, "top5": 0.9})
    for step in (5, 6):
        tb.window({"global_step": step, "step": step - 4, "loss": 1.0})
    tb.close()
    assert not local.exists()
    tb = _tb(tmp_path, root, store=store)  # a second attempt that stops before its first checkpoint
    tb.start(4, 4)
    tb.window({"global_step": 5, "step": 1, "loss": 2.0})
    second = Path(tb.local)
    tb.close()
    assert not second.parent.exists()  # nothing left behind
    down = tmp_path / "down"
    down.mkdir()
    objects = store.list_objects(f"{root}/tb_logs")
    assert len(objects) == 2
    for o in objects:
        (down / o["Key"]).write_bytes(store.get_bytes(f"{root}/tb_logs/{o['Key']}"))
    acc = _read(down)
    assert _steps(acc, "knn/top1") == [4]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0)]


def test_a_resume_drops_every_tags_later_steps_in_the_python_reader(tmp_path):
    """What the docs promise for a resume (TensorBoard's EventAccumulator, ``--load_fast=false``): the second
    attempt's restart marker drops the first attempt's steps after the checkpoint it resumed, in every tag, also
    in one the second attempt does not log at those steps (the lost checkpoint of step 10). TensorBoard's data
    server (``--load_fast=true``) keeps that point: the documented limitation."""
    root = str(tmp_path / "run")
    tb = _tb(tmp_path, root)
    tb.start(0, 7)
    for step in range(1, 11):
        tb.window({"global_step": step, "step": (step - 1) % 7 + 1, "loss": 1.0})
        if step in (7, 10):
            tb.checkpoint_saved(step, 1.0)
    tb.close()
    tb = _tb(tmp_path, root)
    tb.start(7, 7)
    for step in range(8, 15):
        tb.window({"global_step": step, "step": step - 7, "loss": 2.0})
    tb.checkpoint_saved(14, 2.0)
    tb.close()
    acc = _read(tmp_path / "run" / "tb_logs")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(s, 1.0 if s <= 7 else 2.0) for s in range(1, 15)]
    assert _steps(acc, "checkpoint/snapshot_seconds") == [7, 14]
