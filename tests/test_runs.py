"""Runs never mix: every event carries its run's id and attempt, and ``dcv2 report`` draws one run.

Unit tests of the report's run selection on hand-written ``metrics.jsonl`` events, and one real run that is
interrupted and then started again from scratch (its checkpoints removed, its event log kept).
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from dcv2_k8s.checkpoint import CheckpointManager
from dcv2_k8s.events import EventLog
from dcv2_k8s.report import select_run
from tests.conftest import run_cli, tiny_train_tokens
from tests.test_faults import events, launch, stop_all, wait_step


def _start(run, attempt, from_step=0, resumed=False, spe=4):
    return {"kind": "run_start", "run_id": run, "attempt": attempt, "resumed": resumed, "from_step": from_step,
            "from_epoch": from_step // spe, "steps_per_epoch": spe}


def _steps(run, attempt, first, last, loss=1.0, spe=4):
    return [{"kind": "step", "run_id": run, "attempt": attempt, "global_step": g, "epoch": (g - 1) // spe,
             "loss": loss} for g in range(first, last + 1)]


def _km(run, attempt, epoch):
    return {"kind": "kmeans", "run_id": run, "attempt": attempt, "epoch": epoch, "seconds": 0.1}


def _knn(run, attempt, epoch):
    return {"kind": "knn", "run_id": run, "attempt": attempt, "epoch": epoch, "top1": 10.0}


def test_a_log_without_run_ids_reads_as_one_run():
    old = [{"kind": "step", "global_step": g, "epoch": 0, "loss": 1.0} for g in (1, 2, 3)]
    kept, resumes, others = select_run(old, {"name": "step_000000003", "global_step": 3})
    assert kept == old and resumes == [] and others == []
    assert select_run(old, None)[0] == old


def test_a_run_resumed_from_a_checkpoint_before_run_ids_keeps_its_history():
    """The log's events without an id (steps 1-6, the checkpoint at step 4) and then the first attempt with an id,
    which resumed at step 4: one run, steps 1-4 from the old log, 5-8 from the resumed attempt."""
    old = [{"kind": "kmeans", "epoch": 0, "seconds": 0.1},
           *[{"kind": "step", "global_step": g, "epoch": (g - 1) // 4, "loss": 3.0} for g in range(1, 7)]]
    log = old + [_start("B", 1, from_step=4, resumed=True), *_steps("B", 1, 5, 8, loss=2.0)]
    kept, resumes, others = select_run(log, {"name": "step_000000008", "run_id": "B", "attempt": 1})
    assert [(e["global_step"], e.get("run_id")) for e in kept if e["kind"] == "step"] == \
        [(1, None), (2, None), (3, None), (4, None), (5, "B"), (6, "B"), (7, "B"), (8, "B")]
    assert others == [] and [st["from_step"] for st in resumes] == [4]
    assert [e["epoch"] for e in kept if e["kind"] == "kmeans"] == [0]


def test_the_run_of_the_newest_checkpoint_is_drawn_alone():
    """Run A (interrupted at step 6, nothing kept), then run B from scratch: B owns the newest checkpoint."""
    log = [_start("A", 1), _km("A", 1, 0), *_steps("A", 1, 1, 6, loss=3.0),
           _start("B", 1), _km("B", 1, 0), *_steps("B", 1, 1, 8, loss=2.0), _km("B", 1, 1)]
    kept, resumes, others = select_run(log, {"name": "step_000000008", "run_id": "B", "attempt": 1})
    assert {e["run_id"] for e in kept} == {"B"} and others == ["A"] and resumes == []
    assert [e["global_step"] for e in kept if e["kind"] == "step"] == list(range(1, 9))
    # the newest checkpoint decides, not the order of the log: B started with AUTO_RESUME=false, no checkpoint yet
    kept, _, others = select_run(log, {"name": "step_000000004", "run_id": "A", "attempt": 1})
    assert {e["run_id"] for e in kept} == {"A"} and others == ["B"]
    # no checkpoint at all: the run that wrote last
    assert {e["run_id"] for e in select_run(log, None)[0]} == {"B"}


def test_attempts_are_drawn_once_up_to_the_resume():
    """Attempt 1 ran to step 7 (k-means of epoch 1, k-NN after epoch 1) and committed step 4 (an epoch end);
    attempt 2 resumed at step 4 and redid steps 5-7 and the k-means of epoch 1, but not the k-NN of epoch 1."""
    log = [_start("A", 1), _km("A", 1, 0), *_steps("A", 1, 1, 4, loss=3.0), _knn("A", 1, 1), _km("A", 1, 1),
           *_steps("A", 1, 5, 7, loss=9.0),
           _start("A", 2, from_step=4, resumed=True), _km("A", 2, 1), *_steps("A", 2, 5, 8, loss=2.0)]
    kept, resumes, _ = select_run(log, {"name": "step_000000008", "run_id": "A", "attempt": 2})
    steps = [(e["global_step"], e["attempt"]) for e in kept if e["kind"] == "step"]
    assert steps == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 2), (8, 2)]  # no step twice, in order
    assert [(e["epoch"], e["attempt"]) for e in kept if e["kind"] == "kmeans"] == [(0, 1), (1, 2)]
    assert [(e["epoch"], e["attempt"]) for e in kept if e["kind"] == "knn"] == [(1, 1)]
    assert [st["from_step"] for st in resumes] == [4]


def test_every_event_carries_the_run_and_attempt(tmp_path):
    log = EventLog(str(tmp_path), None, True)
    first = log.start_run(None)
    log.emit("step", global_step=1)
    again = EventLog(str(tmp_path), None, True)
    second = again.start_run(first["run_id"])  # a resume of the same run
    again.emit("step", global_step=2)
    assert second == {"run_id": first["run_id"], "attempt": 2}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["run_id"], e["attempt"]) for e in lines] == [
        ("run_start", first["run_id"], 1), ("step", first["run_id"], 1),
        ("run_start", first["run_id"], 2), ("step", first["run_id"], 2)]


@pytest.mark.slow
def test_a_new_run_after_an_interrupted_one_is_reported_alone(synth_data, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "train.log"
    tokens = tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=2",
                               "config.DISTRIBUTED.NUM_PROC_PER_NODE=1")
    proc = launch(tokens, log)
    try:
        wait_step(ckpt, proc, 3, log)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        stop_all(proc)
    first = events(ckpt, "run_start")[0]
    for d in ckpt.iterdir():  # the checkpoints go, the event log stays
        if d.name != "metrics.jsonl":
            shutil.rmtree(d) if d.is_dir() else d.unlink()
    p = run_cli("train", *tokens)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"no checkpoint in {ckpt}: starting a new run" in p.stdout, p.stdout[-3000:]
    starts = events(ckpt, "run_start")
    assert len(starts) == 2 and not starts[1]["resumed"] and starts[1]["run_id"] != first["run_id"]
    newest = CheckpointManager(str(ckpt)).latest()
    assert newest["run_id"] == starts[1]["run_id"] and newest["attempt"] == 1
    kept, resumes, others = select_run([e for k in ("run_start", "step") for e in events(ckpt, k)], newest)
    assert {e["run_id"] for e in kept} == {starts[1]["run_id"]} and others == [first["run_id"]]
    p = run_cli("report", str(ckpt), "--out", str(tmp_path / "report"), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    page = (tmp_path / "report" / "report.html").read_text()
    assert starts[1]["run_id"] in page and "other runs in this log (not drawn)" in page and first["run_id"] in page
