"""Fault injection on real multi-process CPU runs, each scenario several times with the fault at a random step.

Scenarios: kill -9 of one rank under ``torchrun --max-restarts`` (the restart path), SIGTERM to every process
(preemption), the S3 endpoint going away mid-checkpoint and coming back (and going away for good), a frozen
peer (SIGSTOP), and a NaN loss (stop, skip-and-continue, skip limit). Each test adds a row (runs / survived /
steps recomputed / data lost) to the table printed at the end of the session (and written as Markdown to
``$DCV2_FAULT_REPORT`` when set). ``DCV2_FAULT_RUNS`` sets the runs per scenario (default 3).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dcv2_k8s.checkpoint import CheckpointManager, from_bytes
from dcv2_k8s.distributed import free_port
from dcv2_k8s.k8s.local import descendants, kill_tree
from dcv2_k8s.s3server import EmbeddedS3
from dcv2_k8s.storage import S3Storage
from dcv2_k8s.weights import read_file
from tests.conftest import ROOT, child_env, environ, run_cli, run_local_args, tiny_train_tokens

pytestmark = pytest.mark.slow

RUNS = int(os.environ.get("DCV2_FAULT_RUNS", "3"))
REPORT: list[dict] = []
ITER = 3  # checkpoint every 3 steps
TOTAL = 21  # 3 epochs x 7 steps (240 images, 2 ranks x batch 16)
COMMON = ("config.OPTIMIZER.num_epochs=3", "config.TRAINER.DETERMINISTIC=true",
          f"config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY={ITER}")


def record(scenario: str, runs: int, survived: int, recomputed: list[int] | str, lost: int, notes: str = "") -> None:
    if isinstance(recomputed, list):
        recomputed = f"max {max(recomputed)} (per run {', '.join(map(str, recomputed))})" if recomputed else "-"
    REPORT.append({"scenario": scenario, "runs": runs, "survived": survived, "steps recomputed": recomputed,
                   "data lost": lost, "notes": notes})


# ----------------------------------------------------------------------------------------------- helpers
def events(ckpt: Path, kind: str) -> list[dict]:
    path = ckpt / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            e = json.loads(line)
        except ValueError:  # a line cut by kill -9
            continue
        if e.get("kind") == kind:
            out.append(e)
    return out


def recomputed_steps(ckpt: Path) -> int:
    steps = [e["global_step"] for e in events(ckpt, "step")]
    return len(steps) - len(set(steps))


def launch(tokens: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """``dcv2 train`` in its own session (so every process of the run can be signalled at once)."""
    return subprocess.Popen([sys.executable, "-m", "dcv2_k8s", "train", *tokens], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=str(ROOT), env=child_env(env), start_new_session=True)


def wait_step(ckpt: Path, proc: subprocess.Popen, step: int, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not any(e["global_step"] >= step for e in events(ckpt, "step")):
        assert proc.poll() is None, f"exited {proc.returncode} before step {step}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"step {step} not reached: {log.read_text()[-3000:]}"
        time.sleep(0.05)


def rank_pids(root: int) -> dict[int, int]:
    """RANK -> pid of the training processes below ``root`` (torchrun's children)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for child, pp in parent.items():
            if pp == pid:
                todo.append(child)
                try:
                    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0")
                               if "=" in kv)
                    cmd = Path(f"/proc/{child}/cmdline").read_text()
                except OSError:
                    continue
                if "RANK" in env and "dcv2_k8s" in cmd and "torch.distributed.run" not in cmd:
                    found.setdefault(int(env["RANK"]), child)
    return found


def stop_all(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    """The uninterrupted run every recovered run must equal bitwise (deterministic CPU)."""
    ckpt = tmp_path_factory.mktemp("faults") / "reference"
    p = run_cli("train", *tiny_train_tokens(synth_data, ckpt, *COMMON))
    assert p.returncode == 0, p.stderr[-3000:]
    return read_file(str(ckpt))["model"]


def _resume_after_stop(synth_data, ckpt: Path, log: Path, reference: dict, **res) -> dict:
    """After a stopped run: where it stopped, then resume it to the end and compare with the uninterrupted run."""
    m = CheckpointManager(str(ckpt)).latest()
    res.update(stopped_at=m and m["global_step"], log=log.read_text()[-2000:])
    p = run_cli("train", *tiny_train_tokens(synth_data, ckpt, *COMMON))
    res.update(resumed=m is not None and f"resumed from {m['name']}" in p.stdout,
               equal=p.returncode == 0 and same_params(read_file(str(ckpt))["model"], reference))
    return res


# ------------------------------------------------------------------------------------------- scenarios
def test_kill9_one_rank_under_torchrun_restarts(reference, synth_data, tmp_path):
    """kill -9 of one rank at a random step; torchrun restarts both from the last committed checkpoint."""
    rng = random.Random(11)
    results = []
    for run in range(RUNS):
        ckpt, log = tmp_path / f"run{run}", tmp_path / f"run{run}.log"
        target, victim = rng.randint(2, TOTAL - 3), rng.randint(0, 1)
        proc = launch(tiny_train_tokens(synth_data, ckpt, *COMMON, "config.DISTRIBUTED.MAX_RESTARTS=1"), log)
        try:
            wait_step(ckpt, proc, target, log)
            os.kill(rank_pids(proc.pid)[victim], signal.SIGKILL)
            rc = proc.wait(timeout=300)
        finally:
            stop_all(proc)
        final = read_file(str(ckpt)) if rc == 0 else None
        ok = final is not None and final["train_state"]["global_step"] == TOTAL
        results.append({"rc": rc, "target": target, "victim": victim, "recomputed": recomputed_steps(ckpt),
                        "equal": ok and same_params(final["model"], reference), "log": log.read_text()[-2000:]})
    survived = sum(r["rc"] == 0 for r in results)
    record("kill -9 one rank (torchrun --max-restarts=1)", RUNS, survived, [r["recomputed"] for r in results],
           sum(not r["equal"] for r in results), f"killed at steps {[r['target'] for r in results]}; final trunk "
           "bitwise equal to an uninterrupted run in every survived run" if all(r["equal"] for r in results) else "")
    for r in results:
        assert r["rc"] == 0, r["log"]
        assert r["equal"], f"final parameters differ from the uninterrupted run (killed at {r['target']})"
        assert r["recomputed"] <= ITER, r


def test_sigterm_every_process_commits_and_resumes_exactly(reference, synth_data, tmp_path):
    """Preemption: SIGTERM to every process of the run; a committed checkpoint within the grace period, exit
    143 (retryable), and the resumed run ends bitwise equal to an uninterrupted one."""
    rng = random.Random(22)
    results = []
    for run in range(RUNS):
        ckpt, log = tmp_path / f"run{run}", tmp_path / f"run{run}.log"
        target = rng.randint(2, TOTAL - 3)
        proc = launch(tiny_train_tokens(synth_data, ckpt, *COMMON), log)
        try:
            wait_step(ckpt, proc, target, log)
            t0 = time.time()
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=90)
            seconds = time.time() - t0
        finally:
            stop_all(proc)
        res = _resume_after_stop(synth_data, ckpt, log, reference, rc=rc, seconds=seconds, target=target)
        res["recomputed"] = recomputed_steps(ckpt)
        results.append(res)
    ok = [r for r in results if r["rc"] == 143 and r["resumed"] and r["equal"]]
    record("SIGTERM to every process (preemption)", RUNS, len(ok), [r["recomputed"] for r in results],
           sum(not r["equal"] for r in results),
           f"exit 143 and a committed checkpoint in {max(r['seconds'] for r in results):.1f} s at most")
    for r in results:
        assert r["rc"] == 143 and r["seconds"] < 30, r
        assert r["stopped_at"] is not None and r["stopped_at"] >= r["target"], r
        assert r["resumed"] and r["equal"] and r["recomputed"] == 0, r


class Outage:
    """A TCP proxy in front of the S3 endpoint: ``down()`` refuses and cuts every connection (the endpoint is
    gone), ``up()`` serves again on the same port."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = None
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def ensure_up(self) -> None:
        if self.listener.fileno() == -1:
            self.up()

    def down(self) -> None:
        self.listener.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def s3_outage():
    server = EmbeddedS3().start(["ckpt"])
    proxy = Outage(server.port)
    env = dict(server.env(), AWS_ENDPOINT_URL_S3=proxy.endpoint, DCV2_S3_MAX_ATTEMPTS="2",
               DCV2_S3_CONNECT_TIMEOUT="2", DCV2_S3_READ_TIMEOUT="5")
    yield server, proxy, env
    server.stop()


def _committed_all_load(uri: str, env: dict) -> tuple[int, int]:
    """(committed checkpoints, how many of them fail to load completely)."""
    with environ(env):
        mgr, store = CheckpointManager(uri), S3Storage(uri)
        committed = mgr.committed()
        bad = 0
        for m in committed:
            try:
                st = from_bytes(store.get_bytes(f"{uri}/{m['name']}/state.pt"))
                assert st["train_state"]["global_step"] == m["global_step"]
                for f, size in m["files"].items():
                    assert store.size(f"{uri}/{m['name']}/{f}") == size
            except Exception:
                bad += 1
        return len(committed), bad


def s3_run_tokens(synth_data, uri: str, retry_seconds: int, *extra: str) -> list[str]:
    """One process checkpointing to ``uri``, retrying uploads for ``retry_seconds``."""
    return tiny_train_tokens(synth_data, Path("/unused"), *COMMON, f"config.CHECKPOINT.DIR={uri}",
                             f"config.CHECKPOINT.UPLOAD_RETRY_SECONDS={retry_seconds}",
                             "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", *extra)


def test_s3_outage_mid_checkpoint_then_back(s3_outage, synth_data, tmp_path):
    """The endpoint disappears for a few seconds at a random step: uploads retry with backoff, ``latest`` only
    ever names complete checkpoints, and training finishes."""
    _, proxy, env = s3_outage
    rng = random.Random(33)
    runs = max(2, RUNS - 1)
    results = []
    for run in range(runs):
        uri, log = f"s3://ckpt/back{run}", tmp_path / f"run{run}.log"
        tokens = s3_run_tokens(synth_data, uri, 60, "config.OPTIMIZER.num_epochs=2")
        target, outage = rng.randint(3, 25), rng.uniform(3, 8)
        proc = launch(tokens, log, env)
        try:
            metrics = S3Storage(uri)
            deadline = time.time() + 180
            while True:  # the run publishes metrics.jsonl with every checkpoint: follow its steps
                os.environ.update(env)
                try:
                    text = metrics.get_bytes(f"{uri}/metrics.jsonl").decode() if metrics.exists(
                        f"{uri}/metrics.jsonl") else ""
                finally:
                    for k in env:
                        os.environ.pop(k, None)
                steps = [json.loads(l)["global_step"] for l in text.splitlines() if '"kind": "step"' in l]
                if steps and max(steps) >= target:
                    break
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            proxy.down()
            time.sleep(outage)
            proxy.up()
            rc = proc.wait(timeout=240)
        finally:
            stop_all(proc)
            proxy.ensure_up()
        text = log.read_text()
        n, bad = _committed_all_load(uri, {k: v for k, v in env.items()})
        results.append({"rc": rc, "retries": text.count("retrying in"), "committed": n, "bad": bad,
                        "target": target, "outage": outage, "log": text[-2000:]})
    record("S3 endpoint down mid-run for 3-8 s, then back", runs, sum(r["rc"] == 0 for r in results), [0] * runs,
           sum(r["bad"] for r in results), f"{sum(r['retries'] for r in results)} upload retries in all; every "
           "committed checkpoint loads")
    for r in results:
        assert r["rc"] == 0, r["log"]
        assert r["bad"] == 0 and r["committed"] >= 1, r
    assert sum(r["retries"] for r in results) > 0, "no run hit the outage with an upload in flight"


def test_s3_gone_for_good_fails_cleanly_and_keeps_latest(s3_outage, synth_data, tmp_path):
    """The endpoint goes away for good at a random step: one error line and exit 200 (an infrastructure fault:
    ``restartPolicy: ExitCode`` recreates the pod, which resumes once the store is back) once the upload retry
    budget is spent, and every checkpoint committed before still loads."""
    _, proxy, env = s3_outage
    rng = random.Random(66)
    runs = max(2, RUNS - 1)
    results = []
    for run in range(runs):
        uri, log = f"s3://ckpt/gone{run}", tmp_path / f"run{run}.log"
        tokens = s3_run_tokens(synth_data, uri, 6, "config.OPTIMIZER.num_epochs=20",
                               "config.DISTRIBUTED.TIMEOUT_SECONDS=20")
        commits = rng.randint(1, 4)  # go away after this many committed checkpoints
        proc = launch(tokens, log, env)
        try:
            deadline = time.time() + 180
            while log.read_text().count(" committed (") < commits:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            proxy.down()
            rc = proc.wait(timeout=180)
        finally:
            stop_all(proc)
            proxy.ensure_up()
        out = log.read_text()
        errors = [l for l in out.splitlines() if l.startswith("dcv2: error:")]
        n, bad = _committed_all_load(uri, env)
        results.append({"rc": rc, "errors": errors, "committed": n, "bad": bad, "out": out[-3000:]})
    clean = sum(r["rc"] == 200 and len(r["errors"]) == 1 for r in results)
    record("S3 endpoint down for good", runs, f"n/a: failed cleanly {clean}/{runs}", "-",
           sum(r["bad"] for r in results), "exit 200 (retryable) and one error line after the upload retries; "
           "checkpoints "
           f"committed before ({', '.join(str(r['committed']) for r in results)}) all load")
    for r in results:
        assert r["rc"] == 200 and len(r["errors"]) == 1 and "cannot reach the S3 endpoint" in r["errors"][0], r["out"]
        assert r["committed"] >= 1 and r["bad"] == 0, r


def test_frozen_peer_ends_the_others_within_the_timeout(synth_data, tmp_path):
    """SIGSTOP one rank (PyTorchJob-style launch: one process per rank, env://): the other exits non-zero
    within the collective timeout instead of hanging."""
    rng = random.Random(44)
    timeout = 10
    runs = max(2, RUNS - 1)
    results = []
    for run in range(runs):
        ckpt = tmp_path / f"run{run}"
        tokens = tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=50",
                                   f"config.DISTRIBUTED.TIMEOUT_SECONDS={timeout}")
        port, target, procs = free_port(), rng.randint(2, 12), []
        for rank in range(2):
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
            procs.append(launch(tokens, tmp_path / f"run{run}_rank{rank}.log", env))
        try:
            wait_step(ckpt, procs[0], target, tmp_path / f"run{run}_rank0.log")
            os.kill(procs[1].pid, signal.SIGSTOP)
            t0 = time.time()
            try:
                rc = procs[0].wait(timeout=timeout + 60)
            except subprocess.TimeoutExpired:
                rc = None
            results.append({"rc": rc, "seconds": time.time() - t0, "target": target})
        finally:
            for p in procs:
                stop_all(p)
    record(f"one rank frozen (SIGSTOP), collective timeout {timeout} s", runs,
           sum(r["rc"] not in (None, 0) for r in results), "-", 0,
           f"the other rank exited {sorted({r['rc'] for r in results})} (retryable) after "
           f"{max(r['seconds'] for r in results):.1f} s at most")
    for r in results:
        assert r["rc"] is not None and r["rc"] >= 128, r  # a lost peer is an infrastructure fault: retried
        assert r["seconds"] < timeout + 20, r


NAN_WRAPPER = '''
import os, sys
import dcv2_k8s.dcv2.method as E
import dcv2_k8s.metrics as M
from dcv2_k8s import cli

bad = {int(s) for s in os.environ["INJECT_NAN_AT"].split(",")}
if os.environ.get("INJECT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    bad = set()  # only the chosen rank sees the NaN
calls = [0]
real_loss = E.dcv2_loss

def loss(*args, **kwargs):  # the loss of the listed global steps becomes NaN
    value, ignored = real_loss(*args, **kwargs)
    step = calls[0]
    calls[0] += 1
    return (value * float("nan"), ignored) if step in bad else (value, ignored)

real_close = M.PrometheusMetrics.close

def close(self):  # keep what the exporter showed last
    if self.enabled:
        from prometheus_client import generate_latest
        with open(os.environ["METRICS_DUMP"], "wb") as f:
            f.write(generate_latest(self.registry))
    real_close(self)

E.dcv2_loss, M.PrometheusMetrics.close = loss, close
sys.exit(cli.main(sys.argv[1:]))
'''


def _nan_run(synth_data, tmp_path: Path, name: str, steps: list[int], *extra: str, ranks: int = 1):
    """Train through a wrapper that turns the loss of ``steps`` into NaN (with 2 ranks: on rank 1 only)."""
    wrapper = tmp_path / "inject_nan.py"
    wrapper.write_text(NAN_WRAPPER)
    ckpt, dump = tmp_path / name, tmp_path / f"{name}.prom"
    tokens = tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=2", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=4",
                               f"config.DISTRIBUTED.NUM_PROC_PER_NODE={ranks}", "config.METRICS.ENABLED=true",
                               f"config.METRICS.PORT={free_port()}", "config.METRICS.ADDR=127.0.0.1", *extra)
    env = dict(os.environ, INJECT_NAN_AT=",".join(map(str, steps)), METRICS_DUMP=str(dump))
    if ranks > 1:
        env["INJECT_RANK"] = "1"
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    p = subprocess.run([sys.executable, *launcher, str(wrapper), "train", *tokens], capture_output=True, text=True,
                       cwd=str(ROOT), env=env, timeout=300)
    return p, ckpt, dump.read_text() if dump.exists() else ""


def _finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_loss_stops_cleanly_or_is_skipped(synth_data, tmp_path):
    rng = random.Random(55)
    rows = []
    # stop (default): one clear line, exit 1, the last committed checkpoint is from before the NaN and loads
    stop_runs = max(2, RUNS - 1)
    for run in range(stop_runs):
        at = rng.randint(5, 25)
        p, ckpt, prom = _nan_run(synth_data, tmp_path, f"stop{run}", [at])
        errors = [l for l in p.stderr.splitlines() if l.startswith("dcv2: error:")]
        last = read_file(str(ckpt))
        rows.append({"rc": p.returncode, "errors": errors, "at": at, "step": last["train_state"]["global_step"],
                     "finite": _finite(last), "alert_metric": 'dcv2_train_loss_nonfinite{' in prom and
                     any(l.startswith("dcv2_train_loss_nonfinite{") and l.endswith(" 1.0") for l in prom.splitlines()),
                     "out": p.stdout[-1500:] + p.stderr[-1500:]})
    record("NaN loss, NONFINITE_POLICY=stop", stop_runs,
           f"n/a: stopped cleanly {sum(r['rc'] == 1 and r['finite'] for r in rows)}/{stop_runs}", "-",
           sum(not r["finite"] for r in rows),
           "exit 1 with one line; last checkpoint from before the NaN, finite; dcv2_train_loss_nonfinite=1")
    for r in rows:
        assert r["rc"] == 1 and len(r["errors"]) == 1 and "nan" in r["errors"][0].lower(), r["out"]
        assert r["step"] <= r["at"] and r["finite"] and r["alert_metric"], r
    # skip-and-continue: the run finishes, every NaN step is skipped and counted
    skipped_at = []
    for run in range(2):
        at = sorted(rng.sample(range(3, 28), 2))
        skipped_at.append(at)
        p, ckpt, prom = _nan_run(synth_data, tmp_path, f"skip{run}", at, "config.TRAINER.NONFINITE_POLICY=skip")
        assert p.returncode == 0, p.stderr[-3000:]
        final = read_file(str(ckpt))
        assert final["train_state"]["global_step"] == 30 and _finite(final)
        assert any(l.startswith("dcv2_train_nonfinite_skipped_steps_total{") and l.endswith(" 2.0")
                   for l in prom.splitlines()), prom
        assert [e["global_step"] for e in events(ckpt, "nonfinite_skip")] == at
    # two ranks, the NaN on rank 1 only: both ranks skip the step together (the flag is all-reduced)
    at2 = sorted(rng.sample(range(3, 12), 1))
    p, ckpt, prom = _nan_run(synth_data, tmp_path, "skip2", at2, "config.TRAINER.NONFINITE_POLICY=skip", ranks=2)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    final = read_file(str(ckpt))
    assert final["train_state"]["global_step"] == 14 and _finite(final)
    assert [e["global_step"] for e in events(ckpt, "nonfinite_skip")] == at2  # logged by rank 0, which saw no NaN
    skipped_at.append(at2)
    # the limit: more skips than allowed ends the run like the stop policy
    p, ckpt, _ = _nan_run(synth_data, tmp_path, "limit", [4, 6, 8], "config.TRAINER.NONFINITE_POLICY=skip",
                          "config.TRAINER.MAX_NONFINITE_SKIPS=2")
    errors = [l for l in p.stderr.splitlines() if l.startswith("dcv2: error:")]
    assert p.returncode == 1 and len(errors) == 1 and "MAX_NONFINITE_SKIPS=2" in errors[0], p.stderr[-3000:]
    assert _finite(read_file(str(ckpt)))
    record("NaN loss, NONFINITE_POLICY=skip (limit 10; then limit 2 with 3 NaNs)", 4,
           "3 (the over-limit run stopped cleanly)", [0, 0, 0], 0,
           f"NaNs at steps {skipped_at} skipped and counted (the last run: 2 ranks, NaN on rank 1 only, both "
           "skipped), runs finished finite; 3 NaNs over a limit of 2: exit 1, one line")


# ------------------------------------------------------------------ the pod's view (PyTorchJob / run-local)
def _pod_env(nproc: int = 2) -> dict:
    """What a Worker-only PyTorchJob pod's container gets (operator + our template), on one machine."""
    return {"PET_NNODES": "1", "PET_NPROC_PER_NODE": str(nproc), "PET_RDZV_BACKEND": "c10d",
            "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "PET_RDZV_ID": "faults", "PYTHONUNBUFFERED": "1"}


class BusyCore:
    """Keeps the other core busy for the duration (the machine is as loaded as a CI neighbour makes it)."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def test_sigterm_to_the_container_main_process_within_torchruns_window(reference, synth_data, tmp_path):
    """The kubelet sends SIGTERM to the container's main process only; under torchrun the agent then gives its
    workers 30 s before SIGKILL and itself exits 1 (torch distributed/elastic/multiprocessing/api.py
    ``PContext.close``, agent/server/api.py ``SignalException``), whatever terminationGracePeriodSeconds says.
    So: the container's process is ``dcv2`` (it forwards the signal and turns torchrun's 1 into 143, which
    ``restartPolicy: ExitCode`` retries), the ranks agree to stop at the next step whatever LOG_FREQUENCY is, and
    a checkpoint is committed well inside 30 s, with the other core busy. The resumed run ends bitwise equal to an
    uninterrupted one."""
    rng = random.Random(66)
    results = []
    with BusyCore():
        for run in range(RUNS):
            ckpt, log = tmp_path / f"run{run}", tmp_path / f"run{run}.log"
            target = rng.choice([3, 6, 9, 12, 15])
            proc = launch(tiny_train_tokens(synth_data, ckpt, *COMMON, "config.LOG_FREQUENCY=1000"), log,
                          _pod_env())
            try:
                deadline = time.time() + 240
                while not any(e["global_step"] >= target for e in events(ckpt, "checkpoint")):
                    assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                    time.sleep(0.05)
                time.sleep(rng.uniform(0, 0.5))
                t0 = time.time()
                proc.send_signal(signal.SIGTERM)  # the main process only, as the kubelet does
                rc = proc.wait(timeout=90)
                seconds = time.time() - t0
            finally:
                stop_all(proc)
            results.append(_resume_after_stop(synth_data, ckpt, log, reference, rc=rc, seconds=seconds,
                                              target=target))
    ok = [r for r in results if r["rc"] == 143 and r["resumed"] and r["equal"]]
    record("SIGTERM to the container's main process only (LOG_FREQUENCY=1000, other core busy)", RUNS, len(ok),
           "-", sum(not r["equal"] for r in results),
           f"exit 143 and a committed checkpoint {max(r['seconds'] for r in results):.1f} s at most after the "
           f"signal (torchrun's window: 30 s); stopped at steps {[r['stopped_at'] for r in results]}")
    for r in results:
        assert r["rc"] == 143 and r["seconds"] < 20, r
        assert r["stopped_at"] is not None and r["stopped_at"] > r["target"], r
        assert r["resumed"] and r["equal"], r


def test_config_mistake_in_a_pod_is_permanent(synth_data, tmp_path):
    """A config mistake must fail the job at once: exit < 128, which ``restartPolicy: ExitCode`` does not retry
    (training-operator pkg/util/train/train_util.go ``IsRetryableExitCode``)."""
    p = run_cli("train", *tiny_train_tokens(synth_data, tmp_path / "c", "config.OPTIMIZER.num_epochs=banana"),
                env=_pod_env(), timeout=120)
    errors = [l for l in p.stderr.splitlines() if l.startswith("dcv2: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "num_epochs" in errors[0], p.stderr[-2000:]


def test_lost_peer_pod_is_retryable(synth_data, tmp_path):
    """One pod of a 2-pod job is lost (kill -9 of everything in it, as when its node dies): the other pod's
    container exits with a code >= 128, so the operator recreates it (``restartPolicy: ExitCode``) instead of
    failing the job, and both resume from the last committed checkpoint. Run through ``dcv2 k8s run-local`` with
    the real pytorchjob-r50.yaml (c10d rendezvous across the two replicas)."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "run-local.log"
    args = run_local_args(ROOT / "manifests" / "pytorchjob-r50.yaml", synth_data, ckpt,
                          "config.OPTIMIZER.num_epochs=50", "config.DISTRIBUTED.TIMEOUT_SECONDS=20")
    proc = subprocess.Popen([sys.executable, "-m", "dcv2_k8s", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=str(ROOT), env=child_env(), start_new_session=True)
    try:
        wait_step(ckpt, proc, 8, log)
        victim = next(pid for pid in descendants(proc.pid) if _is_replica(pid, proc.pid, "worker-1"))
        t0 = time.time()
        kill_tree(victim)  # everything in the pod, as when its node dies
        rc = proc.wait(timeout=120)
        seconds = time.time() - t0
    finally:
        stop_all(proc)
    out = log.read_text()
    codes = dict(re.findall(r"\[run-local\] (worker-\d) exited with (\d+)", out))
    record("one pod of two lost (kill -9 of the pod), restartPolicy ExitCode", 1, "n/a: retryable 1/1" if int(
        codes.get("worker-0", 0)) >= 128 else "0", "-", 0,
        f"the surviving pod exited {codes.get('worker-0')} ({seconds:.1f} s after the loss): the operator recreates "
        "it; the lost pod reads 137")
    assert codes.get("worker-1") == "137" and int(codes.get("worker-0", 0)) == 200, out[-3000:]
    assert rc == 137 and CheckpointManager(str(ckpt)).latest() is not None


def _is_replica(pid: int, run_local: int, replica: str) -> bool:
    """Whether ``pid`` is run-local's main process of ``replica`` (its child, HOSTNAME = the pod's name)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_text().split("\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return f"HOSTNAME=dcv2-r50-{replica}" in env and ppid == run_local
    except (OSError, ValueError, IndexError):
        return False
