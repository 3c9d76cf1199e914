"""Ctrl-C is a preemption too: SIGINT to the process group, as a terminal sends it, on one and on two processes.

The run finishes its step, commits a checkpoint and exits 130 (retryable, like SIGTERM's 143) without a traceback;
the same command resumes from the checkpoint. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal

import pytest

from dcv2_k8s import distributed as D
from dcv2_k8s import exitcodes as X
from dcv2_k8s.checkpoint import CheckpointManager
from dcv2_k8s.engine import TrainingRun
from tests.conftest import run_cli, tiny_train_tokens
from tests.test_faults import launch, stop_all, wait_step


def test_interrupted_is_retryable_and_named():
    assert X.INTERRUPTED == 128 + signal.SIGINT and X.retryable(X.INTERRUPTED)
    assert X.NAMES[X.INTERRUPTED] == "interrupted"


@pytest.mark.parametrize("codes,launcher,node", [
    ([X.INTERRUPTED, X.INTERRUPTED], 130, X.INTERRUPTED),  # every process committed and exited 130
    ([X.INTERRUPTED, X.RETRYABLE], 130, X.INTERRUPTED),    # a second Ctrl-C: one rank lost its stopped peer
    ([], 130, X.INTERRUPTED),                              # before any process started
    ([X.USAGE], 1, X.INTERRUPTED),                         # as with SIGTERM: the next start re-reports the mistake
])
def test_node_code_after_ctrl_c(codes, launcher, node):
    assert X.combine(codes, launcher, False, interrupted=True) == node


def test_processes_exiting_130_make_the_node_exit_130():
    assert X.combine([X.INTERRUPTED, X.INTERRUPTED], 1, False) == X.INTERRUPTED  # not "retryable" (200)


class _Stop:
    requested = False

    def request(self):
        self.requested = True


def test_second_ctrl_c_stops_at_once():
    run = TrainingRun.__new__(TrainingRun)  # only what the handler reads
    run.stop, run.info, run.stop_signal = _Stop(), D.DistInfo(), None
    previous = signal.getsignal(signal.SIGINT)
    try:
        run._on_signal(signal.SIGINT, None)
        assert run.stop.requested and run.stop_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            run._on_signal(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_commits_exits_130_and_resumes(synth_data, tmp_path, nproc):
    ckpt, log = tmp_path / "ckpt", tmp_path / "train.log"
    tokens = tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=3",
                               f"config.DISTRIBUTED.NUM_PROC_PER_NODE={nproc}")
    proc = launch(tokens, log)  # a session of its own: its process group is the terminal's foreground job
    try:
        wait_step(ckpt, proc, 2, log)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        rc = proc.wait(timeout=120)
    finally:
        stop_all(proc)
    out = log.read_text()
    assert rc == X.INTERRUPTED, out[-3000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-5000:]
    assert sum("interrupted" in line for line in out.splitlines()) <= 2, out[-3000:]  # once per node, not per rank
    assert out.count("interrupted: checkpoint committed at step") == 1, out[-3000:]  # rank 0 says where, once
    latest = CheckpointManager(str(ckpt)).latest()
    assert latest is not None and latest["global_step"] >= 2, out[-3000:]
    p = run_cli("train", *tokens)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {latest['name']}" in p.stdout, p.stdout[-3000:]


def test_launcher_pid_files_name_the_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv(D.EXIT_DIR_ENV, str(tmp_path))
    for k, v in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(k, v)
    D.record_pid()
    D.record_exit_code(X.INTERRUPTED)
    assert D._rank_pids(str(tmp_path)) == [os.getpid()]
    assert (tmp_path / "rank1.code").read_text() == str(X.INTERRUPTED)

