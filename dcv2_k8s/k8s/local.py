"""``dcv2 k8s run-local MANIFEST``: run a PyTorchJob's replicas as local processes, with the operator's env.

Each replica (Master, then Workers) is started like the training operator starts a pod: the container
``pytorch``'s own ``command`` + ``args`` (with ``--set`` overrides appended), and exactly the variables the
operator injects (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK`` = pod index, ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PYTHONUNBUFFERED``) plus
the container's literal ``env``. The master address is 127.0.0.1 instead of ``<job>-master-0``. Logs are
prefixed by replica; the exit status is the Master's. Init containers, volumes and secrets are not emulated:
point the data and checkpoint paths at local ones with ``--set``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from dcv2_k8s.distributed import free_port


def load_job(path: str) -> dict:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "PyTorchJob"]
    if len(jobs) != 1:
        raise ValueError(f"{path}: expected exactly one PyTorchJob, found {len(jobs)}")
    return jobs[0]


def trainer_container(replica: dict) -> dict:
    for c in replica["template"]["spec"]["containers"]:
        if c["name"] == "pytorch":
            return c
    raise ValueError("no container named 'pytorch' in the replica template")


def replica_envs(job: dict, nproc_override: int | None = None) -> list[tuple[str, str, dict]]:
    """``(replica name, replica type, injected env)`` for every pod of the job, master first."""
    spec = job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    pods = [("master-0", "Master")] if "Master" in specs else []
    pods += [(f"worker-{i}", "Worker") for i in range(int(specs.get("Worker", {}).get("replicas", 0)))]
    nproc = str(nproc_override) if nproc_override else str(spec.get("nprocPerNode", "auto"))
    nnodes = len(pods)
    world = nnodes * int(nproc) if nproc.isdigit() else nnodes
    port = str(free_port())
    out = []
    for rank, (name, rtype) in enumerate(pods):
        env = {"PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world),
               "RANK": str(rank), "PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": nproc,
               "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port}
        out.append((name, rtype, env))
    return out


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def run_local(manifest: str, overrides: list[str], nproc_override: int | None = None, timeout: float = 0) -> int:
    job = load_job(manifest)
    specs = job["spec"]["pytorchReplicaSpecs"]
    procs = []
    bin_dir = os.path.dirname(sys.executable)
    for name, rtype, injected in replica_envs(job, nproc_override):
        c = trainer_container(specs[rtype])
        cmd = list(c.get("command", [])) + list(c.get("args", [])) + list(overrides)
        env = dict(os.environ)
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
            env.pop(k, None)
        env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
        env["HOME"] = os.environ.get("HOME", "/tmp")  # the image's writable HOME is not this machine's
        env.update(injected)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # torchrun / dcv2 of this environment
        print(f"[run-local] {name}: RANK={injected['RANK']} WORLD_SIZE={injected['WORLD_SIZE']} "
              f"PET_NPROC_PER_NODE={injected['PET_NPROC_PER_NODE']}: {' '.join(cmd[:6])} ...", flush=True)
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        t = threading.Thread(target=_pump, args=(p.stdout, name), daemon=True)
        t.start()
        procs.append((name, p, t))

    def stop_all(sig=signal.SIGTERM) -> None:
        for _, p, _ in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, lambda *_: stop_all()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        master = procs[0][1]
        code = master.wait(timeout=timeout or None)
        if code != 0:
            stop_all()  # like cleanPodPolicy: Running after a failed master
        for name, p, t in procs[1:]:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                stop_all(signal.SIGKILL)
        for _, _, t in procs:
            t.join(timeout=5)
    except subprocess.TimeoutExpired:
        stop_all(signal.SIGKILL)
        print(f"[run-local] timed out after {timeout:.0f} s", flush=True)
        return 124
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    print(f"[run-local] master exited with {code}", flush=True)
    return code
