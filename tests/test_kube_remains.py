"""A test cluster whose pytest is killed leaves nothing that breaks the next run: the next start takes it away, and a
live cluster's claim keeps every other start and reclaim off the machine-wide things it owns.

The killed-run scenarios start a separate Python process that makes, with the node's and the control plane's own
start-up code (``_claim``, ``_network``, ``_spawn``, ``_cgroup_root``, ``_operator_cert_files``), the real things a
killed run leaves on this machine, adds what only a running kubelet would make (a mount under its root, a pod's
network namespace on the bridge, a process in its cgroups) with ``mount`` and ``ip``, and is then SIGKILLed, as an
out-of-memory kill or the end of a machine's session would. ``reclaim()``, which ``start()`` runs under the claim,
must take all of it away. Needs root (network links, iptables, mounts, cgroups) and cgroup v1, as the end-to-end
tests do, and the control-plane and node binaries ``make test`` builds (their ``start()`` is called).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.kube import remains
from tests.kube.controlplane import CERT_DIR, ControlPlane
from tests.kube.controlplane import reclaim as reclaim_controlplane
from tests.kube.node import BRIDGE, CGROUP_ROOT, FORWARD_RULE, RealNode, _mounts, _netns
from tests.kube.node import reclaim as reclaim_node

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (links, iptables, mounts, cgroups)"),
              pytest.mark.skipif(Path("/sys/fs/cgroup/cgroup.controllers").exists(),
                                 reason="the test node is set up for cgroup v1 (failCgroupV1: false)")]


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


def _killed_after(script: str, timeout: float = 120) -> dict:
    """Run ``script`` in a new Python process until it prints its facts (one JSON line), then SIGKILL it."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if ready else ""
        if not line:
            p.kill()
            _, err = p.communicate(timeout=30)
            raise AssertionError(f"the process to be killed was not ready: {err[-3000:]}")
        return json.loads(line)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)


def _alive(pid: int, start: int) -> bool:
    return remains.same_process(pid, start)


def _still_there_after(pid: int, start: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pid, start)


def _kill(*procs) -> None:
    for pid, start in procs:
        if _alive(pid, start):
            os.kill(pid, signal.SIGKILL)


NODE = """
    import json, os, subprocess, sys, time
    from pathlib import Path
    from tests.kube import node as N
    from tests.kube import remains

    n = N.RealNode(None, Path({workdir!r}))
    n._claim()                                          # as start() does: the claim, the ledger
    n.run.mkdir(parents=True)
    n._network()                                        # the bridge, its address and the FORWARD rule
    n._spawn("kubelet", ["sleep", "600"])               # a recorded process in a session of its own
    n._cgroup_root()
    # what the kubelet and the runtime would make: a volume mount, a pod's netns on the bridge, a container
    pods = n.kubelet_root / "pods" / "p1" / "volumes"
    pods.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "dcv2-test", str(pods)], check=True)
    ns = {netns!r}
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", "dcv2t0", "type", "veth", "peer", "name", "eth0", "netns", ns], check=True)
    subprocess.run(["ip", "link", "set", "dcv2t0", "master", N.BRIDGE, "up"], check=True)
    hier = next(h for h in (Path("/sys/fs/cgroup") / x for x in ("pids", "memory", "cpu"))
                if (h / N.CGROUP_ROOT).is_dir())
    pod_cg = hier / N.CGROUP_ROOT / "podtest"
    pod_cg.mkdir()
    c = subprocess.Popen(["sleep", "600"], start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    (pod_cg / "cgroup.procs").write_text(str(c.pid))
    k = n.procs["kubelet"].pid
    print(json.dumps({{"pid": os.getpid(), "kubelet": [k, remains.started(k)],
                      "container": [c.pid, remains.started(c.pid)], "run": str(n.run), "mount": str(pods),
                      "cgroup": str(pod_cg), "ledger": str(n.ledger.path)}}), flush=True)
    time.sleep(600)
"""


def test_a_killed_nodes_remains_are_taken_away_by_the_next_start(tmp_path):
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        pytest.fail(f"{BRIDGE} exists before the test: a test node is running or was left behind")
    netns = f"cni-{uuid.uuid4()}"
    facts = {}
    try:
        facts = _killed_after(NODE.format(workdir=str(tmp_path / "node"), netns=netns))
        kubelet, container = facts["kubelet"], facts["container"]
        # what the killed run left, as the next run finds it
        assert _alive(*kubelet) and _alive(*container)
        assert _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0
        assert _sh("iptables", "-C", *FORWARD_RULE, check=False).returncode == 0
        assert facts["mount"] in _mounts() and netns in _netns() and Path(facts["run"]).is_dir()
        assert Path(facts["ledger"]).is_file()

        found = reclaim_node()

        ours = [line for line in found if line.endswith(f"of pytest PID {facts['pid']}")]
        for what in (f"link {BRIDGE}", f"iptables rule {' '.join(FORWARD_RULE)}", f"mount {facts['mount']}",
                     f"network namespace {netns}", f"process {container[0]} in the pods' cgroups",
                     f"process kubelet ({kubelet[0]})", f"directory {facts['run']}"):
            assert any(line.startswith(what + " ") for line in ours), f"{what!r} not reported in {found}"
        # and all of it is gone
        assert not _still_there_after(*kubelet) and not _still_there_after(*container)
        assert _sh("ip", "link", "show", BRIDGE, check=False).returncode != 0
        assert _sh("iptables", "-C", *FORWARD_RULE, check=False).returncode != 0
        assert facts["mount"] not in _mounts() and netns not in _netns()
        assert not Path(facts["run"]).exists() and not Path(facts["cgroup"]).exists()
        assert not any(h.joinpath(CGROUP_ROOT).exists() for h in Path("/sys/fs/cgroup").iterdir())
        assert not Path(facts["ledger"]).exists()
        assert reclaim_node() == []   # nothing twice
    finally:   # whatever the assertions said, nothing of the scenario stays (reclaim refuses if a node runs)
        reclaim_node()
        _kill(*(facts[k] for k in ("kubelet", "container") if k in facts))
        if netns in _netns():
            _sh("ip", "netns", "del", netns, check=False)


CONTROLPLANE = """
    import base64, json, os, time
    from pathlib import Path
    from tests.kube import remains
    from tests.kube.controlplane import ControlPlane

    cp = ControlPlane(Path({workdir!r}))
    cp._claim()                                          # as start() does
    cp._operator_cert_files({{k: base64.b64encode(b"x").decode() for k in ("tls.crt", "tls.key", "ca.crt")}})
    cp._spawn("etcd", [], wrap=("sh", "-c", "exec sleep 600", "sh"))   # a component, as start() starts each
    p = cp.procs["etcd"].pid
    print(json.dumps({{"pid": os.getpid(), "etcd": [p, remains.started(p)], "ledger": str(cp.ledger.path)}}),
          flush=True)
    time.sleep(600)
"""


def test_a_killed_control_planes_processes_and_files_are_taken_away(tmp_path):
    if CERT_DIR.parent.exists():
        pytest.fail(f"{CERT_DIR.parent} exists before the test: a test control plane is running or one left it "
                    f"(remove it with `rm -r {CERT_DIR.parent}`)")
    facts = {}
    try:
        facts = _killed_after(CONTROLPLANE.format(workdir=str(tmp_path / "cp")))
        assert _alive(*facts["etcd"]) and (CERT_DIR / "tls.crt").is_file()

        found = reclaim_controlplane()

        for p in (CERT_DIR.parent, CERT_DIR, CERT_DIR / "tls.crt", CERT_DIR / "ca.crt"):
            assert f"{p} of pytest PID {facts['pid']}" in found, found
        assert f"process etcd ({facts['etcd'][0]}) of pytest PID {facts['pid']}" in found, found
        assert not _still_there_after(*facts["etcd"])
        assert not CERT_DIR.parent.exists() and not Path(facts["ledger"]).exists()
    finally:
        reclaim_controlplane()
        _kill(*(facts[k] for k in ("etcd",) if k in facts))


def test_a_live_claim_keeps_other_starts_and_reclaims_off(tmp_path):
    """While a cluster holds its role's claim, a second ``start()`` refuses before it makes or touches anything and
    ``reclaim()`` refuses too: a dead run's ledger and processes wait until the claim is let go."""
    script = textwrap.dedent("""
        import json, os, subprocess
        from tests.kube import remains
        led = remains.Ledger.new("controlplane")    # a run that ends without its teardown
        p = subprocess.Popen(["sleep", "600"], start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        led.process("etcd", p.pid)
        node = remains.Ledger.new("node")           # a node killed before it made anything
        (node.path.parent / (node.path.name + ".1.tmp")).write_text("{")   # and a write the kill cut short
        print(json.dumps({"pid": os.getpid(), "etcd": [p.pid, remains.started(p.pid)], "ledger": str(led.path),
                          "node": str(node.path)}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    dead = json.loads(out.stdout)
    claims = []
    try:
        claims = [remains.Claim("controlplane").take(), remains.Claim("node").take()]   # a live cluster: this test
        with pytest.raises(remains.Busy, match=f"another test controlplane is running .pytest PID {os.getpid()}"):
            reclaim_controlplane()
        with pytest.raises(remains.Busy, match=f"another test node is running .pytest PID {os.getpid()}"):
            reclaim_node()
        cp, node = ControlPlane(tmp_path / "cp"), RealNode(None, tmp_path / "node")
        with pytest.raises(remains.Busy, match="another test controlplane is running"):
            cp.start()
        with pytest.raises(remains.Busy, match="another test node is running"):
            node.start()
        cp.stop()
        node.stop()   # neither got the claim: both touch nothing
        assert not cp.procs and not node.procs and not node.run.exists()
        assert _alive(*dead["etcd"]) and Path(dead["ledger"]).is_file() and Path(dead["node"]).is_file()
        for c in claims:
            c.release()
        found = reclaim_controlplane()   # the claim let go: the dead run's remains go now
        assert f"process etcd ({dead['etcd'][0]}) of pytest PID {dead['pid']}" in found, found
        assert not _still_there_after(*dead["etcd"]) and not Path(dead["ledger"]).exists()
        assert reclaim_node() == [] and not Path(dead["node"]).exists()
        assert not list(remains.DIR.glob(f"{dead['pid']}-*"))
    finally:
        for c in claims:
            c.release()
        _kill(dead["etcd"])
        for f in remains.DIR.glob(f"{dead['pid']}-*"):
            f.unlink()


def test_a_reused_pid_is_not_taken_for_the_recorded_process(tmp_path):
    """A ledger's process is the PID *and* its start time: another process with that PID is left alone."""
    p = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        led = remains.Ledger(tmp_path / "l.json", {"boot": remains.boot_id(), "procs": {}, "made": {}})
        led.data["procs"]["etcd"] = [p.pid, remains.started(p.pid) - 1]   # as if the PID had been reused since
        assert led.stop_processes(grace=1) == [] and p.poll() is None
        led.data["procs"]["etcd"] = [p.pid, remains.started(p.pid)]
        assert led.stop_processes(grace=5) == [f"process etcd ({p.pid})"]
        p.wait(timeout=10)
    finally:
        p.kill()
        p.wait(timeout=10)
