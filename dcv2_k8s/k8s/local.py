"""``dcv2 k8s run-local MANIFEST``: a job's pods as local processes.

``dcv2 k8s run-local MANIFEST``: run a PyTorchJob's (or a TrainJob's) pods as local processes, with the
environment the training operator (or Kubeflow Trainer v2's torch plugin, see ``trainjob_replicas``) gives them.

Each replica (Master, then Workers) is started like the training operator v1.9 starts a pod
(pkg/controller.v1/pytorch/envvar.go): the container ``pytorch``'s own ``command`` + ``args`` (with ``--set``
overrides appended), the container's literal ``env``, then exactly the variables the operator injects:
``PYTHONUNBUFFERED``, ``PET_NPROC_PER_NODE`` (``spec.nprocPerNode``), ``PET_NNODES`` (all replicas), and only when
the job has a Master: ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK`` = ``PET_NODE_RANK`` = pod index
(Workers count from 1). A replica's Service name (``<job>-worker-0:PORT``, ``<job>-master-0``) in any of those
values is resolved to 127.0.0.1 and a free local port, as cluster DNS resolves it to the pod. Logs are prefixed by
replica; the exit status is the Master's, or with Workers only the first non-zero one (the job succeeds only when
every worker does). A permanent exit code stops the other replicas (the operator fails the job); a retryable one
(>= 128 with ``restartPolicy: ExitCode``) does not, and the pod is not recreated here. SIGTERM (Ctrl-C) goes to
each replica's main process only, as the kubelet signals a container. Init containers, volumes and secrets are not
emulated: point the data and checkpoint paths at local ones with ``--set``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from dcv2_k8s.distributed import free_port
from dcv2_k8s.exitcodes import retryable
from dcv2_k8s.k8s.kinds import KINDS, PYTORCHJOB, TRAINJOB


def load_job(path: str) -> dict:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    kinds = [k.kind for k in KINDS.values()]
    jobs = [d for d in docs if d.get("kind") in kinds]
    if len(jobs) != 1:
        raise ValueError(f"{path}: expected exactly one {' or '.join(kinds)}, found {len(jobs)}")
    return jobs[0]


def trainjob_replicas(job: dict, nproc_override: int | None = None) -> list[tuple[str, list[str], dict]]:
    """``(pod, command, environment)`` of every node of a TrainJob as Kubeflow Trainer v2.3 starts it: the runtime
    container's literal ``env`` (our ``dcv2-torch`` runtime's), ``spec.trainer.env``, then what the torch plugin
    injects (pkg/runtime/framework/plugins/torch/torch.go): ``PET_NNODES`` = numNodes, ``PET_NPROC_PER_NODE`` =
    numProcPerNode (``auto`` when unset), ``PET_NODE_RANK`` = the Job completion index, ``PET_MASTER_ADDR`` =
    ``<job>-node-0-0.<job>`` and ``PET_MASTER_PORT`` = 29500, here 127.0.0.1 and a free port. The TrainJobStatus
    variables are not set (there is no status server here)."""
    from dcv2_k8s.k8s.manifests import RUNTIME, training_runtime

    trainer = job["spec"].get("trainer", {})
    nodes = int(trainer.get("numNodes", 1))
    nproc = str(nproc_override or trainer.get("numProcPerNode", "auto"))
    base = {}
    if job["spec"]["runtimeRef"]["name"] == RUNTIME:
        pod = training_runtime()["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        base = {e["name"]: e["value"] for e in pod["spec"]["containers"][0].get("env", []) if "value" in e}
    port = str(free_port())
    out = []
    for i in range(nodes):
        env = dict(base)
        env.update({e["name"]: e["value"] for e in trainer.get("env", []) if "value" in e})
        env.update({"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": nproc, "PET_NODE_RANK": str(i),
                    "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port})
        out.append((TRAINJOB.pod_suffix(i), list(trainer.get("command", [])) + list(trainer.get("args", [])), env))
    return out


def job_replicas(job: dict, nproc_override: int | None = None) -> list[tuple[str, list[str], dict]]:
    """``(pod, command, environment)`` of every pod of a PyTorchJob or a TrainJob, the lead pod first."""
    if job["kind"] == TRAINJOB.kind:
        return trainjob_replicas(job, nproc_override)
    specs = job["spec"]["pytorchReplicaSpecs"]
    out = []
    for name, rtype, env in replica_envs(job, nproc_override):
        c = trainer_container(specs[rtype])
        out.append((name, list(c.get("command", [])) + list(c.get("args", [])), env))
    return out


def trainer_container(replica: dict) -> dict:
    for c in replica["template"]["spec"]["containers"]:
        if c["name"] == PYTORCHJOB.container:
            return c
    raise ValueError(f"no container named {PYTORCHJOB.container!r} in the replica template")


def replica_envs(job: dict, nproc_override: int | None = None) -> list[tuple[str, str, dict]]:
    """``(replica name, replica type, environment)`` for every pod of the job, master first: the container's own
    literal ``env`` plus what the operator injects, Service names resolved to 127.0.0.1."""
    spec = job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    pods = [(PYTORCHJOB.pod_suffix(0, "Master"), "Master")] if "Master" in specs else []
    pods += [(PYTORCHJOB.pod_suffix(i, "Worker"), "Worker")
             for i in range(int(specs.get("Worker", {}).get("replicas", 0)))]
    nproc = str(nproc_override) if nproc_override else str(spec.get("nprocPerNode", "1"))
    nnodes = len(pods)
    world = nnodes * int(nproc) if nproc.isdigit() else nnodes
    name = job["metadata"]["name"]
    ports: dict[str, str] = {}  # "<service>:<port>" -> local port

    def resolve(value: str) -> str:
        def sub(m):
            key = m.group(0)
            if m.group(2):
                ports.setdefault(key, str(free_port()))
                return f"127.0.0.1:{ports[key]}"
            return "127.0.0.1"
        return re.sub(rf"{re.escape(name)}-(master|worker)-\d+(?::(\d+))?", sub, value)

    master_port = str(free_port())
    out = []
    for rank, (pod, rtype) in enumerate(pods):
        c = trainer_container(specs[rtype])
        env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
        env["PYTHONUNBUFFERED"] = "1"
        if "Master" in specs:
            env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master_port, "WORLD_SIZE": str(world),
                        "RANK": str(rank), "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
                        "PET_MASTER_PORT": master_port})
        env["PET_NPROC_PER_NODE"] = nproc
        env["PET_NNODES"] = str(nnodes)
        out.append((pod, rtype, {k: resolve(v) for k, v in env.items()}))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc). torchrun starts each worker in a session of its own, so a
    process group does not reach them; the container's cgroup would."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` and everything below it, as the kubelet's kill of a container's cgroup does."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def run_local(manifest: str, overrides: list[str], nproc_override: int | None = None, timeout: float = 0) -> int:
    job = load_job(manifest)
    procs = []
    bin_dir = os.path.dirname(sys.executable)
    for name, command, injected in job_replicas(job, nproc_override):
        cmd = command + list(overrides)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_")) and k not in (
            "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(injected)
        env["HOME"] = os.environ.get("HOME", "/tmp")  # the image's writable HOME is not this machine's
        env["HOSTNAME"] = f"{job['metadata']['name']}-{name}"  # a pod's hostname is its name
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # torchrun / dcv2 of this environment
        shown = " ".join(f"{k}={v}" for k, v in sorted(injected.items()) if k.startswith(("PET_", "RANK", "WORLD")))
        print(f"[run-local] {name}: {shown}: {' '.join(cmd[:6])} ...", flush=True)
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        t = threading.Thread(target=_pump, args=(p.stdout, name), daemon=True)
        t.start()
        procs.append((name, p, t))

    def stop_all(sig=signal.SIGTERM) -> None:
        """SIGTERM goes to each replica's main process only, as the kubelet signals a container's PID 1 (the
        replica passes it on); SIGKILL takes the replica's whole process tree."""
        for _, p, _ in procs:
            if p.poll() is None:
                if sig == signal.SIGKILL:
                    kill_tree(p.pid)
                else:
                    try:
                        p.send_signal(sig)
                    except ProcessLookupError:
                        pass

    previous = {s: signal.signal(s, lambda *_: stop_all()) for s in (signal.SIGTERM, signal.SIGINT)}
    specs = job["spec"].get("pytorchReplicaSpecs", {})
    has_master = "Master" in specs
    # a TrainJob on our runtime: its podFailurePolicy fails the job on 1, 2 and 3 and retries the rest, as ExitCode does
    policy = "ExitCode" if job["kind"] == TRAINJOB.kind else \
        specs["Master" if has_master else "Worker"].get("restartPolicy", "OnFailure")
    codes: dict[str, int] = {}
    try:
        deadline = time.time() + timeout if timeout else None
        while len(codes) < len(procs):  # the first replica to fail stops the rest (cleanPodPolicy: Running)
            for name, p, _ in procs:
                if name not in codes and p.poll() is not None:
                    # a container killed by a signal is reported by the kubelet as 128 + the signal
                    code = p.returncode if p.returncode >= 0 else 128 - p.returncode
                    codes[name] = code
                    print(f"[run-local] {name} exited with {code}", flush=True)
                    # the operator fails the job (and cleanPodPolicy: Running stops the other pods) on a
                    # permanent code; a retryable one (>= 128 under restartPolicy ExitCode) only recreates that
                    # pod, which run-local does not do: the others find out about their lost peer themselves
                    if code != 0 and not (policy == "ExitCode" and retryable(code)) and (
                            not has_master or name == procs[0][0]):
                        stop_all()
            if deadline and time.time() > deadline:
                raise subprocess.TimeoutExpired("run-local", timeout)
            time.sleep(0.2)
        for _, _, t in procs:
            t.join(timeout=5)
    except subprocess.TimeoutExpired:
        stop_all(signal.SIGKILL)
        print(f"[run-local] timed out after {timeout:.0f} s", flush=True)
        return 124
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    code = codes[procs[0][0]] if has_master else next((c for c in codes.values() if c != 0), 0)
    print(f"[run-local] job {'succeeded' if code == 0 else f'failed with exit code {code}'}", flush=True)
    return code
