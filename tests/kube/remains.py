"""What a test cluster leaves behind when the pytest process that started it dies without its teardown (SIGKILL, an
out-of-memory kill, a machine's session ended mid-run), and taking it away when the next test cluster starts.

Every component the control plane (``controlplane.py``) and the node (``node.py``) start runs in a session of its
own, so it outlives a killed pytest; the node's bridge, iptables rule, mounts, network namespaces and cgroups
outlive every process. So each role ("controlplane", "node") has:

- a claim: an exclusive ``flock`` on ``DIR/<role>.lock``, taken at the start of ``start()`` and let go at the end of
  ``stop()``. The kernel lets it go when the process dies, so while it is held a cluster of that role is alive,
  and a second one refuses to start (``Busy``) instead of sharing the machine-wide bridge, cgroups and files;
- ledgers: ``DIR/<pytest PID>-<role>.json``, what a cluster started (name -> PID and start time) and made. A clean
  ``stop()`` removes its ledger. Whoever holds the claim knows every other ledger of the role is a dead run's: it
  stops the processes they name that are still the same processes (same PID *and* start time, so a reused PID is
  never hit), takes away what they made, and drops them.

``DIR`` is ``/run/dcv2-kube`` for root (cleared on reboot, as the processes and links are), made mode 0700 and
refused when it belongs to someone else. Test infrastructure only.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path

DIR = Path("/run/dcv2-kube") if os.geteuid() == 0 else Path(tempfile.gettempdir()) / f"dcv2-kube-{os.geteuid()}"


class Busy(RuntimeError):
    """A live cluster of the role holds the claim."""


def _dir() -> Path:
    DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = DIR.lstat()
    if not DIR.is_dir() or DIR.is_symlink() or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{DIR} is not a directory of this user's that only it can write; remove it "
                           f"(`rm -rf {DIR}`) and start again")
    return DIR


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


class Claim:
    """The machine-wide claim of ``role``: ``take()`` or ``Busy``; ``release()``."""

    def __init__(self, role: str):
        self.role = role
        self.path = DIR / f"{role}.lock"
        self._fd: int | None = None

    def take(self) -> "Claim":
        for _ in range(10):
            fd = os.open(_dir() / self.path.name, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise Busy(f"another test {self.role} is running (pytest PID {holder}, holding {self.path}); wait "
                           f"for it to end, or stop that process") from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break   # the file that is there: not one its last holder removed meanwhile
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise RuntimeError(f"could not lock {self.path}: it was removed under us ten times")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the claim go; its file (and the directory, when nothing else is in it) is removed first, while it is
        still held, so nothing of it stays on the machine."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)   # lets the flock go
        self._fd = None
        try:
            DIR.rmdir()
        except OSError:
            pass   # a dead run's ledger, or another role's claim, is still in it


def under_claim(role: str, fn):
    """``fn(claim)`` with ``role``'s claim taken for it (``Busy`` while a live cluster holds it)."""
    claim = Claim(role).take()
    try:
        return fn(claim)
    finally:
        claim.release()


class Ledger:
    """A cluster's record of what it started and made; ``new(role)`` for this process, or read from ``path``."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self._lock = threading.Lock()   # the scheduler keeper thread records restarts too

    @classmethod
    def new(cls, role: str) -> "Ledger":
        led = cls(_dir() / f"{os.getpid()}-{role}.json",
                  {"role": role, "pid": os.getpid(), "start": started(os.getpid()), "boot": boot_id(),
                   "procs": {}, "made": {}})
        led._write()
        return led

    def _write(self) -> None:
        with self._lock:
            tmp = self.path.with_name(f"{self.path.name}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)

    def process(self, name: str, pid: int) -> None:
        """``name`` was started as ``pid``, a session leader: its process group is stopped with it."""
        with self._lock:
            self.data["procs"][name] = [pid, started(pid)]
        self._write()

    def made(self, **what) -> None:
        """What was made on the machine, for the reclaimer of the role to take away."""
        with self._lock:
            self.data["made"].update(what)
        self._write()

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)

    @property
    def owner(self) -> str:
        return f"pytest PID {self.data.get('pid')}"

    def stop_processes(self, grace: float = 10) -> list[str]:
        """Stop each recorded process that is still the one recorded, with its process group: SIGTERM, then SIGKILL
        after ``grace`` seconds. Returns what was stopped."""
        if self.data.get("boot") != boot_id():
            return []   # a reboot took them all
        out = []
        for name, (pid, start) in self.data.get("procs", {}).items():
            if not same_process(pid, start):
                continue
            out.append(f"process {name} ({pid})")
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
                _signal(pid, start, sig)
                deadline = time.monotonic() + wait
                while same_process(pid, start) and time.monotonic() < deadline:
                    time.sleep(0.2)
        return out


def _signal(pid: int, start: int, sig: int) -> None:
    """``sig`` to the process group ``pid`` leads (what is left of it), and to ``pid`` itself while it is the
    recorded process."""
    try:
        os.killpg(pid, sig)
    except OSError:
        pass   # no group left
    if same_process(pid, start):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def dead(claim: Claim) -> tuple[list[Ledger], list[str], list[str]]:
    """Every ledger of the claim's role (all dead runs': the claim is held), after stopping their processes.
    Returns the ledgers, what was stopped, and the files that could not be read as a ledger (left in place)."""
    assert claim.held, "reclaiming needs the role's claim"
    out, stopped, bad = [], [], []
    for t in DIR.glob(f"*-{claim.role}.json.*.tmp"):
        t.unlink(missing_ok=True)   # a write cut short by the kill; the ledger before it is whole
    for p in sorted(DIR.glob(f"*-{claim.role}.json")):
        try:
            data = json.loads(p.read_text())
            if not (isinstance(data, dict) and isinstance(data.get("procs"), dict)
                    and isinstance(data.get("made"), dict)):
                raise ValueError("not a ledger")
        except (OSError, ValueError) as e:
            bad.append(f"{p} ({e})")
            continue
        led = Ledger(p, data)
        try:
            stopped += [f"{s} of {led.owner}" for s in led.stop_processes()]
        except (TypeError, ValueError) as e:   # a malformed entry: the rest is still taken away
            bad.append(f"{p} ({e})")
        out.append(led)
    return out, stopped, bad


def report(role: str, lines: list[str]) -> None:
    """What was taken away, as a warning in the run's summary."""
    if lines:
        warnings.warn(f"took away what a test {role} left when its pytest died: " + "; ".join(lines))
