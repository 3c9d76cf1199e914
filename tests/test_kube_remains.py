"""A test cluster whose pytest is killed leaves nothing that breaks the next run: the next start takes it away.

Each scenario starts a separate Python process that makes, with the node's and the control plane's own code, the
real things a killed run leaves on this machine (the pod bridge and its iptables rule, a process recorded in the
ledger, a mount under the kubelet's root, a pod's network namespace on the bridge, a process in the kubelet's
cgroups; the control plane's files outside its work directory and a process it started), then SIGKILLs it, as an
out-of-memory kill or the end of a machine's session would. The next ``reclaim()`` must take all of it away and
leave a live run's ledger alone. Needs root (network links, iptables, mounts, cgroups), as the end-to-end tests do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.kube import remains
from tests.kube.controlplane import reclaim as reclaim_controlplane
from tests.kube.node import BRIDGE, CGROUP_ROOT, FORWARD_RULE, _mounts, _netns
from tests.kube.node import reclaim as reclaim_node

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (links, iptables, mounts, cgroups)")]


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


def _killed_after(script: str) -> dict:
    """Run ``script`` in a new Python process until it prints its facts (one JSON line), then SIGKILL it."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"the process to be killed failed before it was ready: {p.stderr.read()[-3000:]}")
        facts = json.loads(line)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    return facts


def _alive(pid: int) -> bool:
    return remains.started(pid) is not None


NODE = """
    import json, os, subprocess, sys, time
    from pathlib import Path
    from tests.kube import node as N
    from tests.kube import remains

    n = N.RealNode(None, Path({workdir!r}))
    n.ledger = remains.Ledger("node")
    n.ledger.made(dir=str(n.dir), run=str(n.run), kubelet_root=str(n.kubelet_root), pod_logs=str(n.pod_logs))
    n.run.mkdir(parents=True)
    n._network()                                        # the bridge, its address and the FORWARD rule
    n._spawn("kubelet", ["sleep", "600"])               # a recorded process in a session of its own
    n._cgroup_root()
    pods = (n.kubelet_root / "pods" / "p1" / "volumes")
    pods.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "dcv2-test", str(pods)], check=True)
    ns = {netns!r}
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", "dcv2t0", "type", "veth", "peer", "name", "eth0", "netns", ns], check=True)
    subprocess.run(["ip", "link", "set", "dcv2t0", "master", N.BRIDGE, "up"], check=True)
    # a container whose shim is gone: a process in a pod cgroup under the kubelet's root
    hier = next(h for h in (Path("/sys/fs/cgroup") / x for x in ("pids", "memory", "cpu", ""))
                if (h / N.CGROUP_ROOT).is_dir())
    pod_cg = hier / N.CGROUP_ROOT / "podtest"
    pod_cg.mkdir()
    c = subprocess.Popen(["sleep", "600"], start_new_session=True)
    (pod_cg / "cgroup.procs").write_text(str(c.pid))
    print(json.dumps({{"pid": os.getpid(), "kubelet": n.procs["kubelet"].pid, "container": c.pid,
                      "run": str(n.run), "mount": str(pods), "cgroup": str(pod_cg), "ledger": str(n.ledger.path)}}),
          flush=True)
    time.sleep(600)
"""


def test_a_killed_nodes_remains_are_taken_away_by_the_next_start(tmp_path):
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        pytest.fail(f"{BRIDGE} exists before the test: a test node is running or was left behind")
    netns = f"cni-{uuid.uuid4()}"
    facts = {}
    try:
        facts = _killed_after(NODE.format(workdir=str(tmp_path / "node"), netns=netns))
        # what the killed run left, as the next run finds it
        assert not _alive(facts["pid"])
        assert _alive(facts["kubelet"]) and _alive(facts["container"])
        assert _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0
        assert _sh("iptables", "-C", *FORWARD_RULE, check=False).returncode == 0
        assert facts["mount"] in _mounts() and netns in _netns() and Path(facts["run"]).is_dir()
        assert Path(facts["ledger"]).is_file()

        found = reclaim_node()

        text = "\n".join(found)
        for what in (f"link {BRIDGE}", f"iptables rule {' '.join(FORWARD_RULE)}", f"mount {facts['mount']}",
                     f"network namespace {netns}", f"process {facts['container']} in the pods' cgroups",
                     f"process kubelet ({facts['kubelet']})", f"directory {facts['run']}"):
            assert what in text, f"{what!r} not reported in {found}"
        assert all(line.endswith(f"of pytest PID {facts['pid']}") for line in found), found
        # and all of it is gone
        deadline = time.monotonic() + 30
        while (_alive(facts["kubelet"]) or _alive(facts["container"])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(facts["kubelet"]) and not _alive(facts["container"])
        assert _sh("ip", "link", "show", BRIDGE, check=False).returncode != 0
        assert _sh("iptables", "-C", *FORWARD_RULE, check=False).returncode != 0
        assert facts["mount"] not in _mounts() and netns not in _netns()
        assert not Path(facts["run"]).exists() and not Path(facts["cgroup"]).exists()
        assert not any(h.joinpath(CGROUP_ROOT).exists() for h in Path("/sys/fs/cgroup").iterdir())
        assert not Path(facts["ledger"]).exists()
        assert reclaim_node() == []   # nothing twice
    finally:   # whatever the assertions said, nothing of the scenario stays
        reclaim_node()
        for pid in (facts.get("kubelet"), facts.get("container")):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if netns in _netns():
            _sh("ip", "netns", "del", netns, check=False)
        if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            _sh("iptables", "-D", *FORWARD_RULE, check=False)
            _sh("ip", "link", "del", BRIDGE, check=False)


CONTROLPLANE = """
    import json, os, subprocess, time
    from pathlib import Path
    from tests.kube import remains
    from tests.kube.controlplane import ControlPlane

    cp = ControlPlane(Path({workdir!r}))
    cp.ledger = remains.Ledger("controlplane")
    outside = Path({outside!r})
    cp._make(outside, outside / "tls.crt")               # as the operator's certificate directory is made
    outside.mkdir()
    (outside / "tls.crt").write_text("x")
    p = subprocess.Popen(["sleep", "600"], start_new_session=True)   # as _spawn starts a component
    cp.ledger.process("etcd", p.pid)
    print(json.dumps({{"pid": os.getpid(), "etcd": p.pid, "ledger": str(cp.ledger.path)}}), flush=True)
    time.sleep(600)
"""


def test_a_killed_control_planes_processes_and_files_are_taken_away_and_a_live_ledger_is_not(tmp_path):
    outside = tmp_path / "outside" / "serving-certs"
    outside.parent.mkdir()
    facts = {}
    live = remains.Ledger("controlplane")   # this very process: alive, so never touched
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    live.process("etcd", sleeper.pid)
    try:
        facts = _killed_after(CONTROLPLANE.format(workdir=str(tmp_path / "cp"), outside=str(outside)))
        assert _alive(facts["etcd"]) and (outside / "tls.crt").is_file()

        found = reclaim_controlplane()

        assert f"{outside} of pytest PID {facts['pid']}" in found, found
        assert f"{outside / 'tls.crt'} of pytest PID {facts['pid']}" in found, found
        assert not outside.exists() and outside.parent.is_dir()   # only what it made
        assert not Path(facts["ledger"]).exists()
        assert not _wait_gone(facts["etcd"])
        assert sleeper.poll() is None and live.path.is_file()
        assert [led.path for led in remains.live("controlplane")] == [live.path]
    finally:
        live.drop()
        sleeper.kill()
        sleeper.wait(timeout=10)
        reclaim_controlplane()
        if facts.get("etcd") and _alive(facts["etcd"]):
            os.kill(facts["etcd"], signal.SIGKILL)


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    """True if ``pid`` is still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pid)


def test_a_reused_pid_is_not_taken_for_the_recorded_process(tmp_path):
    """A ledger's process is the PID *and* its start time: another process with that PID is left alone."""
    p = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        led = remains.Ledger("test", tmp_path / "l.json")
        led.data["procs"]["etcd"] = [p.pid, remains.started(p.pid) - 1]   # as if the PID had been reused since
        assert led.stop_processes(grace=1) == [] and p.poll() is None
        led.data["procs"]["etcd"] = [p.pid, remains.started(p.pid)]
        assert led.stop_processes(grace=5) == [f"process etcd ({p.pid})"]
        p.wait(timeout=10)
    finally:
        p.kill()
        p.wait(timeout=10)
