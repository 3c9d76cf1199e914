"""What a test cluster leaves behind when the pytest process that started it dies without its teardown (SIGKILL, an
out-of-memory kill, a machine's session ended mid-run), and taking it away when the next test cluster starts.

Every component the control plane (``controlplane.py``) and the node (``node.py``) start runs in a session of its
own, so it outlives a killed pytest; the node's bridge, iptables rule, mounts, network namespaces and cgroups
outlive every process. Each of the two therefore keeps a ledger, a JSON file in ``LEDGERS`` named after its pytest's
PID: that process's identity (PID, start time, boot), what it started (name -> PID and start time) and what it made.
A clean ``stop()`` removes the ledger. ``dead()`` returns the ledgers whose pytest is gone, after stopping the
processes they name that are still the same processes (same PID *and* start time, so a reused PID is never hit);
the caller takes away the rest and then ``Ledger.drop()`` s it. A ledger whose pytest still runs is never touched:
that cluster is alive.

Test infrastructure only.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

LEDGERS = Path(tempfile.gettempdir()) / "dcv2-kube-ledgers"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def started(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot, /proc/PID/stat field 22), or None if it is gone
    or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] == "Z" else int(fields[19])


def same_process(pid: int, start: int | None) -> bool:
    return start is not None and started(pid) == start


class Ledger:
    """The ledger of ``role`` ("controlplane", "node") for this pytest process."""

    def __init__(self, role: str, path: Path | None = None, data: dict | None = None):
        self.path = path or LEDGERS / f"{os.getpid()}-{role}.json"
        self.data = data or {"role": role, "pid": os.getpid(), "start": started(os.getpid()), "boot": boot_id(),
                             "procs": {}, "made": {}}

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def process(self, name: str, pid: int) -> None:
        """``name`` was started as ``pid`` (a session leader: its process group is stopped with it)."""
        self.data["procs"][name] = [pid, started(pid)]
        self._write()

    def made(self, **what) -> None:
        """Paths and objects made on the machine, for the reclaimer of the role to take away."""
        self.data["made"].update(what)
        self._write()

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:
            pass   # other ledgers, or already gone

    @property
    def owner(self) -> str:
        return f"pytest PID {self.data.get('pid')}"

    def alive(self) -> bool:
        """True while the pytest process that wrote it still runs (on this boot)."""
        return self.data.get("boot") == boot_id() and same_process(self.data.get("pid", -1), self.data.get("start"))

    def stop_processes(self, grace: float = 10) -> list[str]:
        """Stop, by process group, each recorded process that is still the one recorded: SIGTERM, then SIGKILL after
        ``grace`` seconds. Returns what was stopped."""
        if self.data.get("boot") != boot_id():
            return []   # a reboot took them all
        out = []
        for name, (pid, start) in self.data.get("procs", {}).items():
            if not same_process(pid, start):
                continue
            out.append(f"process {name} ({pid})")
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                except PermissionError:
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while same_process(pid, start) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not same_process(pid, start):
                    break
        return out


def ledgers(role: str) -> list[Ledger]:
    out = []
    for p in sorted(LEDGERS.glob(f"*-{role}.json")):
        try:
            out.append(Ledger(role, p, json.loads(p.read_text())))
        except (OSError, ValueError):
            continue   # being written (tmp file renamed in place) or not ours
    return out


def dead(role: str) -> tuple[list[Ledger], list[str]]:
    """The ledgers of ``role`` whose pytest is gone, their processes already stopped, and what was stopped."""
    gone = [led for led in ledgers(role) if not led.alive()]
    stopped = [f"{s} of {led.owner}" for led in gone for s in led.stop_processes()]
    return gone, stopped


def live(role: str) -> list[Ledger]:
    return [led for led in ledgers(role) if led.alive()]
