"""The launcher contract (torchrun / Kubeflow PyTorchJob), process-group set-up and group helpers.

Process ranks come from the variables torchrun gives each child (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``). In a PyTorchJob pod the operator's pod-level ``RANK`` is the *node* rank; the trainer
only trusts ``RANK`` when ``LOCAL_RANK`` is also set, i.e. when torchrun started it.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True when a launcher (torchrun) set up per-process ranks for us."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launcher_world() -> tuple[int | None, int | None]:
    """(world size, processes per node) that a launcher set for this run: torchrun's variables in a rank, the
    ``PET_*`` variables in a pod before torchrun starts; (None, None) outside any launcher."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        return world, int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nnodes, nproc = os.environ.get("PET_NNODES", ""), os.environ.get("PET_NPROC_PER_NODE", "")
    if nnodes.isdigit() and nproc.isdigit():
        return int(nnodes) * int(nproc), int(nproc)
    return None, None


def env_info() -> DistInfo:
    if not launched():
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    return DistInfo(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ["LOCAL_RANK"]),
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def pick_device(machine_device: str, local_rank: int) -> torch.device:
    want = machine_device.lower()
    if want in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("config.MACHINE.DEVICE=gpu but no CUDA device is visible; set "
                               "config.MACHINE.DEVICE=cpu (or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if want == "auto" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


_groups_formed = 0  # group_store calls in this process: each process group gets keys of its own


def group_store(info: DistInfo, timeout_s: float):
    """The launcher's env:// store, with keys of its own per launcher attempt and per process group of this
    process. After torchrun restarts the workers (--max-restarts), a store that outlived the failed attempt would
    otherwise hand the new processes the dead ones' addresses (seen with gloo: "connectFullMesh failed ...
    Connection refused"); the same happens to a second group formed in one process after the first was destroyed
    (``dcv2 extract`` of two splits under one torchrun: torch numbers groups from 0 again), hence ``/group_K`` for
    every group after the first. Every rank must call this the same number of times."""
    global _groups_formed
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rank=info.rank, world_size=info.world_size, timeout=timeout))
    prefix = f"dcv2/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if _groups_formed:
        prefix += f"/group_{_groups_formed}"
    _groups_formed += 1
    return dist.PrefixStore(prefix, store)


def init_process_group(info: DistInfo, backend: str, device: torch.device, timeout_s: float, store=None) -> None:
    """Join the process group with a bounded timeout (init and every collective); ``store``: one from
    :func:`group_store` (default: a new one)."""
    if not info.distributed or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(device)
    if store is None:
        store = group_store(info, timeout_s)
    dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


class StopAgreement:
    """Every rank learns, at the same step, whether any rank was asked to stop (SIGTERM, SIGINT), one step after
    it was.

    Each ``poll()`` (every rank, once per training step) waits for the previous step's tiny all-reduce of the
    flag, then starts the next one asynchronously. The flag is a CPU tensor reduced over a gloo group of its own,
    so on the GPU path this adds no host synchronisation and no kernel to the step; a SIGTERM is acted on after at
    most two steps, whatever LOG_FREQUENCY is (torchrun gives the processes 30 s before SIGKILL)."""

    def __init__(self, info: DistInfo, timeout_s: float):
        self.requested = False
        self.group = None
        if info.distributed:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self._buf = torch.zeros(1)
        self._work = None

    def request(self) -> None:
        self.requested = True

    def poll(self) -> bool:
        if self.group is None:
            return self.requested
        decided = False
        if self._work is not None:
            self._work.wait()
            self._work = None
            decided = bool(self._buf.item() > 0)
        if not decided:
            self._buf.fill_(1.0 if self.requested else 0.0)
            self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return decided

    def finish(self) -> None:
        """Wait for the reduction in flight (before the process group goes away)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_rows(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    """Every rank's equal-sized ``inp`` concatenated along dim 0 into ``out`` (rank order)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp.contiguous(), group=group)


def ddp_options() -> dict:
    """DDP settings: big buckets, gradients as bucket views, no per-forward buffer broadcast (BN statistics are
    synchronised by SyncBN in its groups; the prototypes are identical on every rank by construction)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    opts = {"gradient_as_bucket_view": True, "bucket_cap_mb": 100}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        opts["forward_sync_buffers"] = False
    else:
        opts["broadcast_buffers"] = False
    return opts


def bn_group(group_size: int, info: DistInfo):
    """The process group a BN layer of this rank synchronises over.

    ``group_size``: -1 = the ranks of this node, 0 = every rank, >0 = consecutive blocks of that many ranks.
    Returns None for the global group. Every rank must call this with the same arguments (``new_group`` is
    collective), so it builds all blocks and keeps its own.
    """
    if group_size == 0 or not info.distributed:
        return None
    size = info.local_world_size if group_size < 0 else min(group_size, info.world_size)
    if size >= info.world_size:
        return None
    mine = None
    for start in range(0, info.world_size, size):
        ranks = list(range(start, start + size))
        g = dist.new_group(ranks)
        if info.rank in ranks:
            mine = g
    return mine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_env() -> bool:
    """True in a pod that a launcher (the training operator, Trainer, run-local) gave torchrun's settings through
    ``PET_*`` variables (torchrun reads ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_RDZV_*`` ... by itself)."""
    return not launched() and "PET_NNODES" in os.environ


def spawn_local(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Start ``nproc`` copies of ``dcv2 <argv>`` on this node through torch's own launcher (torchrun) and return
    this node's exit code (see ``dcv2_k8s.exitcodes``).

    Standalone on one machine, or, in a pod (``operator_env()``), with the rendezvous torchrun reads from the
    ``PET_*`` variables. ``max_restarts``: torchrun restarts every process this many times after one fails (they
    resume from the last committed checkpoint).

    This process stays the container's main process: it is the one the kubelet signals, and the one a terminal's
    Ctrl-C reaches (torchrun runs in a session of its own, so each signal reaches it once, from here; it ends with
    this process). SIGTERM/SIGINT are passed to torchrun, which passes them to the processes and gives them 30 s
    before SIGKILL (torch ``distributed/elastic/multiprocessing/api.py``, ``PContext.close``); they commit a
    checkpoint well within that and exit 143 (SIGTERM) or 130 (SIGINT), and so does this node. A second SIGINT goes
    straight to the processes, which then stop at once. Every process writes its own exit code to a file, and the
    node's code is ``exitcodes.combine`` of them: a config mistake on any rank stays permanent."""
    import shutil
    import tempfile

    from dcv2_k8s import exitcodes

    cmd = [sys.executable, "-c", "import sys, torch.distributed.run; from dcv2_k8s.distributed import run_torchrun; "
           "sys.exit(run_torchrun(sys.argv[1:]))"]
    if operator_env():
        if max_restarts:
            cmd.append(f"--max-restarts={max_restarts}")
    else:
        cmd += ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    cmd += ["-m", "dcv2_k8s", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    code_dir = tempfile.mkdtemp(prefix="dcv2-exit-")
    env[EXIT_DIR_ENV] = code_dir
    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_end_with_parent)
    forwarded = []

    def forward(signum, frame):  # SIGTERM/SIGINT go to torchrun, which passes them to the workers
        if signum == signal.SIGINT and signum in forwarded:  # a second Ctrl-C: straight to the processes
            print(f"dcv2: interrupted again: the processes stop at once (exit {exitcodes.INTERRUPTED})",
                  file=sys.stderr, flush=True)
            for pid in _rank_pids(code_dir):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        else:
            if signum == signal.SIGINT:
                print(f"dcv2: interrupted: the processes finish their step, commit a checkpoint and exit "
                      f"{exitcodes.INTERRUPTED} (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            child.send_signal(signum)
        forwarded.append(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    try:
        codes = [int(open(os.path.join(code_dir, f)).read()) for f in sorted(os.listdir(code_dir))
                 if f.endswith(".code")]
    finally:
        shutil.rmtree(code_dir, ignore_errors=True)
    node = exitcodes.combine(codes, code, signalled=signal.SIGTERM in forwarded,
                             interrupted=signal.SIGINT in forwarded)
    if node != code:
        print(f"dcv2: processes exited with {codes or 'no code'}, torchrun with {code}: this node exits with "
              f"{node} ({exitcodes.NAMES.get(node, '?')})", file=sys.stderr, flush=True)
    return node


def _end_with_parent() -> None:
    """In torchrun's process before it starts: SIGTERM when the ``dcv2`` process that started it dies (it is in a
    session of its own, so a signal to that process's group no longer reaches it)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def run_torchrun(argv: list[str]) -> int:
    """torchrun (``torch.distributed.run``) in this process. On a death signal (SIGTERM, SIGINT) it shuts the
    processes down as torchrun does, then exits 128 + the signal's number without its traceback and its shutdown
    warnings: ``spawn_local`` says what happened, once."""
    import logging

    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.run import main

    handler = getattr(api, "_terminate_process_handler", None)  # a private name of torch 2.x: quiet only if there

    def quiet(signum, frame):
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.ERROR)
        handler(signum, frame)

    if handler is not None:
        api._terminate_process_handler = quiet  # PContext.start installs it by this name
    try:
        main(argv)
    except api.SignalException as e:
        return 128 + int(e.sigval)
    except KeyboardInterrupt:  # before torchrun installed its handlers
        return 128 + signal.SIGINT
    return 0


EXIT_DIR_ENV = "DCV2_EXIT_DIR"


def record_pid() -> None:
    """Leave this process's id for the node's launcher (``spawn_local``), which sends a second Ctrl-C straight to
    it (torchrun passes on only the first)."""
    _leave("pid", os.getpid())


def _rank_pids(code_dir: str) -> list[int]:
    pids = []
    for f in os.listdir(code_dir):
        if f.endswith(".pid"):
            try:
                pids.append(int(open(os.path.join(code_dir, f)).read()))
            except (OSError, ValueError):
                pass
    return pids


def launcher_reports() -> bool:
    """True in a process whose node launcher (``spawn_local``) reports signals and exit codes for the node."""
    return launched() and bool(os.environ.get(EXIT_DIR_ENV))


def record_exit_code(code: int) -> None:
    """Leave this process's exit code for the node's launcher (``spawn_local``), when one asked for it."""
    _leave("code", int(code))


def _leave(suffix: str, value: int) -> None:
    if launcher_reports():
        try:
            with open(os.path.join(os.environ[EXIT_DIR_ENV], f"rank{os.environ.get('RANK', '0')}.{suffix}"),
                      "w") as f:
                f.write(str(value))
        except OSError:
            pass
