"""Fenced checkpoint commits against a zombie writer (checkpoint.py, "Fencing").

Real processes: each writer is this file run as a script, a small loop that drives two ``CheckpointManager`` ranks
(rank 1 writes its part, rank 0 commits) the way a 2-process run does, one commit per step. Writer A (the zombie: a
partitioned pod that keeps running) is taken over by writer B (its replacement, or the same job submitted again)
on the same local directory or ``s3://`` prefix. Checked: A stops at its next commit with exit 3 and one line,
nothing of A's is ever the latest once B owns the directory (a poller watches ``latest.json`` throughout), and B's
chain of checkpoints is intact and loadable (no part of A's mixed in). Then the same with B killed (kill -9) at a
random moment and a third writer C taking over from the wreckage.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

if __name__ != "__main__":
    from dcv2_k8s import exitcodes
    from tests.conftest import ROOT, child_env

WRITER = Path(__file__).resolve()


# ----------------------------------------------------------------------------------- the writer (a script)
def writer(root: str, tag: str, steps: int, interval: float) -> int:
    """Resume from the newest committed checkpoint of ``root`` and commit one checkpoint per step, ``steps`` more
    steps, as writer ``tag``; a fenced-out writer stops as ``dcv2 train`` does (one line, its exit code)."""
    from dcv2_k8s import exitcodes as X
    from dcv2_k8s.checkpoint import CheckpointManager
    from dcv2_k8s.storage import StorageError

    r0 = CheckpointManager(root, 0, 2, keep_last=3, commit_timeout=60)
    r1 = CheckpointManager(root, 1, 2, background=False)
    try:
        generation = r0.take_over() if hasattr(r0, "take_over") else 0  # the code before fencing had none
        r1.generation = generation
        print(f"owner {tag} generation {generation}\ntook {tag} {time.time():.3f}", flush=True)
        latest = r0.latest()
        step, trail = 0, []
        if latest is not None:
            state = r0.load_state(latest)
            step, trail = state["step"], list(state["trail"])
        print(f"resumed {tag} {latest['name'] if latest else '-'} {step}", flush=True)
        end = step + steps
        while step < end:
            step += 1
            trail.append(tag)
            meta = {"epoch": 0, "global_step": step, "epoch_end": False, "writer": tag}
            name = CheckpointManager.name_for(step)
            r0.save(name, {"writer": tag, "step": step, "trail": trail}, {"writer": tag, "step": step, "rank": 0},
                    meta)
            r1.save(name, None, {"writer": tag, "step": step, "rank": 1}, meta)
            r0.wait()
            print(f"committed {tag} {step}", flush=True)
            time.sleep(interval)
    except StorageError as e:
        print(f"stopped {tag} {time.time():.3f}", flush=True)
        print(f"dcv2: error: {e}", file=sys.stderr, flush=True)
        return X.classify(e)
    return 0


# ------------------------------------------------------------------------------------------------ helpers
class Writer:
    """A writer process; its stdout lines are collected as they come."""

    def __init__(self, root: str, tag: str, steps: int, interval: float, env: dict | None = None):
        self.tag, self.lines = tag, []
        self.proc = subprocess.Popen([sys.executable, str(WRITER), root, tag, str(steps), str(interval)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                                     env=child_env(dict(env or {}, PYTHONPATH=str(ROOT))))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def committed(self) -> int:
        return sum(line.startswith("committed ") for line in self.lines)

    def value(self, prefix: str, kind=int):
        found = [line for line in self.lines if line.startswith(prefix)]
        return (found[0] if kind is str else kind(found[0].split()[-1])) if found else None

    def wait_for(self, what, timeout: float = 60) -> None:
        end = time.time() + timeout
        while not what():
            if self.proc.poll() is not None and not what():
                time.sleep(0.2)  # the reader may still hold lines
                if what():
                    return
                raise AssertionError(f"writer {self.tag} exited {self.proc.returncode}: {self.proc.stderr.read()}")
            assert time.time() < end, f"writer {self.tag}: timed out; stdout {self.lines}"
            time.sleep(0.02)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode, self.proc.stderr.read()


class Poller:
    """Reads ``latest.json`` and the manifest it names, every few ms, from the moment the newer writer owns the
    directory: each observation is (pointer, manifest or None)."""

    def __init__(self, root: str):
        from dcv2_k8s.storage import open_storage

        self.store, self.seen, self.stop = open_storage(root), [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self, path: str) -> dict | None:
        try:
            return json.loads(self.store.get_bytes(path))
        except Exception:  # absent, or deleted by retention between the two reads
            return None

    def _run(self) -> None:
        while not self.stop.is_set():
            pointer = self._read(self.store.join("latest.json"))
            if pointer and pointer.get("name"):
                self.seen.append((pointer, self._read(self.store.join(pointer["name"], "manifest.json"))))
            time.sleep(0.01)

    def close(self) -> list:
        self.stop.set()
        self.thread.join(5)
        return self.seen


def check_chain(root: str, owner: str, generation: int, resumed: int, final: int) -> None:
    """The newest run's checkpoints: the latest is its last step; every checkpoint it committed loads, and all of
    its parts are its own (state, both ranks' banks) at the step its manifest names."""
    from dcv2_k8s.checkpoint import CheckpointManager

    m = CheckpointManager(root, 0, 2)
    latest = m.latest()
    assert latest is not None and latest["writer"] == owner and latest["global_step"] == final, latest
    assert latest.get("generation", generation) == generation
    mine = [c for c in m.committed() if c["writer"] == owner]
    assert mine and mine[-1]["name"] == latest["name"]
    for c in mine:
        state = m.load_state(c)
        banks = [CheckpointManager(root, r, 2).load_bank(c) for r in (0, 1)]
        assert (state["writer"], state["step"]) == (owner, c["global_step"]), (c["name"], state)
        assert [(b["writer"], b["step"], b["rank"]) for b in banks] == [(owner, c["global_step"], r) for r in (0, 1)]
        # the chain: the steps before the takeover were resumed, every later one is this writer's own
        assert len(state["trail"]) == c["global_step"] and set(state["trail"][resumed:]) == {owner}


def check_fenced(rc: int, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == exitcodes.FENCED and not exitcodes.retryable(rc), (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("dcv2: error: ") and "a newer run took over" in lines[0], err


def check_never_latest(seen: list, owner: str, resumed: str) -> None:
    """Once the newer writer owns the directory, the latest is the checkpoint it resumed or one of its own."""
    assert seen
    for pointer, manifest in seen:
        if manifest is None:  # the named checkpoint was rotated away between the two reads
            continue
        assert manifest["writer"] == owner or pointer["name"] == resumed, (pointer, manifest)


def stop_all(writers, poller) -> list:
    """Kill the writers still running (a failed test leaves none behind); what the poller saw."""
    for w in writers:
        if w is not None and w.proc.poll() is None:
            w.proc.kill()
    return poller.close() if poller else []


def zombie_run(root: str, order: str, env: dict | None = None) -> None:
    """A commits, B takes over; ``order``: the zombie A commits faster than B (it races ahead in steps) or
    slower."""
    fast, slow = 0.02, 0.25
    a = Writer(root, "A", 400, fast if order == "zombie-ahead" else slow, env)
    a.wait_for(lambda: a.committed() >= random.randint(1, 3))
    poller = None
    b = Writer(root, "B", 6, slow if order == "zombie-ahead" else fast, env)
    try:
        b.wait_for(lambda: b.value("resumed B") is not None)
        poller = Poller(root)
        rc_b, err_b = b.finish()
        assert rc_b == 0, err_b
        rc_a, err_a = a.finish(30)
    finally:
        seen = stop_all((a, b), poller)
    check_fenced(rc_a, err_a)
    resumed = b.value("resumed B")
    check_never_latest(seen, "B", b.value("resumed B", str).split()[-2])
    check_chain(root, "B", b.value("owner B generation"), resumed, resumed + 6)
    print(f"\nfencing {root.split(':')[0] if '://' in root else 'local'} {order}: A committed {a.committed()}, "
          f"B took over at step {resumed} (generation {b.value('owner B generation')}), A stopped "
          f"{a.value('stopped A', float) - b.value('took B', float):.2f} s later (exit {rc_a}); {len(seen)} reads of "
          "latest.json, none A's")


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("order", ["zombie-ahead", "zombie-behind"])
def test_zombie_writer_is_fenced_out_local(tmp_path, order):
    zombie_run(str(tmp_path / "run"), order)


@pytest.mark.parametrize("order", ["zombie-ahead", pytest.param("zombie-behind", marks=pytest.mark.slow)])
def test_zombie_writer_is_fenced_out_s3(s3, order):
    zombie_run(f"s3://ckpt/fencing-{order}-{random.randrange(10 ** 6)}", order, s3.env())


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_owner_then_a_third_writer(tmp_path, s3, where):
    """A commits; B takes over and is killed (kill -9) at a random moment, maybe mid-checkpoint; C takes over
    from whatever B left and finishes. A is fenced out, and C's chain is intact."""
    root = str(tmp_path / "run") if where == "local" else f"s3://ckpt/fencing-kill-{random.randrange(10 ** 6)}"
    env = s3.env() if where == "s3" else None
    a = Writer(root, "A", 400, 0.1, env)
    b = c = poller = None
    try:
        a.wait_for(lambda: a.committed() >= 2)
        b = Writer(root, "B", 400, 0.0, env)
        b.wait_for(lambda: b.value("resumed B") is not None)
        time.sleep(random.uniform(0.0, 1.0))
        os.kill(b.proc.pid, signal.SIGKILL)
        b.finish()
        c = Writer(root, "C", 5, 0.0, env)
        c.wait_for(lambda: c.value("resumed C") is not None)
        poller = Poller(root)
        rc_c, err_c = c.finish()
        assert rc_c == 0, err_c
        rc_a, err_a = a.finish(30)
    finally:
        seen = stop_all((a, b, c), poller)
    check_fenced(rc_a, err_a)
    resumed = c.value("resumed C")
    assert resumed >= 2  # C resumed from A's or B's newest commit, never from scratch
    check_never_latest(seen, "C", c.value("resumed C", str).split()[-2])
    check_chain(root, "C", c.value("owner C generation"), resumed, resumed + 5)
    print(f"\nfencing {where} kill: A committed {a.committed()}, B {b.committed()} before kill -9, C took over at "
          f"step {resumed} (generation {c.value('owner C generation')}), A stopped "
          f"{a.value('stopped A', float) - b.value('took B', float):.2f} s after B's takeover (exit {rc_a}); "
          f"{len(seen)} reads of latest.json, none A's or B's")


def lock_is_free(path: Path) -> bool:
    """Whether no process holds the ``flock`` of ``path`` (the lock ``LocalStorage.put_if`` takes)."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def freeze(pid: int, lock: Path) -> None:
    """SIGSTOP ``pid`` and everything below it at a moment when none of it holds ``lock``. A partitioned node's
    lock on a network filesystem lapses with its lease; a frozen local process keeps its ``flock`` for good, so a
    freeze inside the few milliseconds of a commit's compare-and-swap is retried."""
    from dcv2_k8s.k8s.local import kill_tree

    for _ in range(200):
        kill_tree(pid, signal.SIGSTOP)  # torchrun's workers have sessions of their own: the whole tree
        if lock_is_free(lock):
            return
        kill_tree(pid, signal.SIGCONT)
        time.sleep(random.uniform(0.0, 0.05))
    raise AssertionError(f"{lock} was held at each of 200 freezes")


def test_a_writer_stopped_holding_the_lock_is_named_not_waited_for(tmp_path):
    """A writer stopped inside ``put_if`` (SIGSTOP between its ``flock`` and the release) keeps the lock. The next
    writer waits ``lock_wait`` seconds, no longer, and fails with one transient error naming the holder's PID and
    that it is stopped; once the holder is gone, the same write succeeds."""
    from dcv2_k8s.storage import LocalStorage, StorageError

    store = LocalStorage(str(tmp_path), lock_wait=1.0)
    ptr = store.join("latest.json")
    lock = tmp_path / ".latest.json.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(StorageError) as e:
            store.put_if(ptr, b"{}", None)
        assert 1.0 <= time.monotonic() - t0 < 30
        assert e.value.transient and exitcodes.classify(e.value) == exitcodes.RETRYABLE
        text = str(e.value)
        assert f"process {holder.pid} (" in text and ", stopped)" in text and str(lock) in text, text
        assert "\n" not in text and not os.path.exists(ptr)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    assert store.put_if(ptr, b"{}", None) is not None and store.read_versioned(ptr)[0] == b"{}"


def test_the_lock_wait_stays_under_the_collective_timeout(tmp_path):
    """Rank 0 takes the directory over while its peers wait in a collective bounded by DISTRIBUTED.TIMEOUT_SECONDS
    (the checkpoint manager's ``commit_timeout``): a held lock must fail rank 0 with its own line first."""
    from dcv2_k8s.checkpoint import CheckpointManager

    assert CheckpointManager(str(tmp_path), commit_timeout=600).store.lock_wait == 60
    assert CheckpointManager(str(tmp_path), commit_timeout=30).store.lock_wait == 15


@pytest.mark.slow
def test_two_dcv2_train_runs_on_one_directory(synth_data, tmp_path):
    """The real thing: run A (2 processes) commits, then freezes (SIGSTOP of all its processes: a partitioned node)
    outside its compare-and-swap (``freeze``); run B starts on the same directory, takes it over and resumes; A wakes
    up (SIGCONT) and trains on. A's next commit is refused: its container's code is 3 with one line saying so, and
    B's checkpoints are the latest."""
    from dcv2_k8s.checkpoint import CheckpointManager
    from dcv2_k8s.k8s.local import kill_tree
    from dcv2_k8s.weights import read_file
    from tests.conftest import tiny_train_tokens

    ckpt = tmp_path / "run"
    tokens = tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=6",
                               "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2")
    logs = {k: tmp_path / f"{k}.log" for k in "AB"}
    a = subprocess.Popen([sys.executable, "-m", "dcv2_k8s", "train", *tokens], stdout=open(logs["A"], "w"),
                         stderr=subprocess.STDOUT, cwd=str(ROOT), env=child_env(), start_new_session=True)
    b = None
    try:
        end = time.time() + 300
        while CheckpointManager(str(ckpt)).latest() is None:
            assert a.poll() is None and time.time() < end, logs["A"].read_text()[-3000:]
            time.sleep(0.1)
        freeze(a.pid, ckpt / ".latest.json.lock")
        time.sleep(1.0)  # a commit in flight when the signal came lands (or not) before B reads the directory
        resumed = CheckpointManager(str(ckpt)).latest()["global_step"]
        b = subprocess.Popen([sys.executable, "-m", "dcv2_k8s", "train", *tokens,
                              f"config.TRAINER.MAX_STEPS={resumed + 4}"], stdout=open(logs["B"], "w"),
                             stderr=subprocess.STDOUT, cwd=str(ROOT), env=child_env(), start_new_session=True)
        while "resumed from" not in logs["B"].read_text():
            assert b.poll() is None and time.time() < end, logs["B"].read_text()[-3000:]
            time.sleep(0.1)
        kill_tree(a.pid, signal.SIGCONT)
        assert b.wait(300) == 0, logs["B"].read_text()[-3000:]
        rc_a = a.wait(300)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                kill_tree(p.pid, signal.SIGCONT)
                kill_tree(p.pid, signal.SIGKILL)
                p.wait(30)
    out_a, out_b = logs["A"].read_text(), logs["B"].read_text()
    assert f"resumed from {CheckpointManager.name_for(resumed)}" in out_b
    fenced = [line for line in out_a.splitlines() if "a newer run took over" in line]
    assert rc_a == exitcodes.FENCED and len(fenced) == 1 and fenced[0].startswith("dcv2: error: "), out_a[-3000:]
    latest = CheckpointManager(str(ckpt)).latest()
    assert latest["generation"] == 2 and latest["global_step"] == resumed + 4
    assert latest["name"] == f"{CheckpointManager.name_for(resumed + 4)}-g000002"
    assert read_file(str(ckpt))["train_state"]["global_step"] == resumed + 4


def test_fenced_is_permanent_and_named():
    from dcv2_k8s.storage import Fenced

    assert exitcodes.classify(Fenced("x")) == exitcodes.FENCED == 3
    assert not exitcodes.retryable(exitcodes.FENCED) and exitcodes.NAMES[exitcodes.FENCED] == "fenced"
    # one rank fenced out, its peer then losing it (200): the node's code stays permanent
    assert exitcodes.combine([exitcodes.FENCED, exitcodes.RETRYABLE], 1, False) == exitcodes.FENCED


if __name__ == "__main__":
    sys.exit(writer(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
