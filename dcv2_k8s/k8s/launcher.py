"""Launch a PyTorchJob or a TrainJob and see it through, for the pipeline.

Launch a PyTorchJob (training operator) or a TrainJob (Kubeflow Trainer v2) and see it through, for the
pipeline (and anyone scripting against a cluster).

- The job name is derived from the pipeline run (``job_name(run_id, step)``), so a retried step re-attaches to
  the job it created instead of starting a second one (a 409 on create means "attach").
- ``wait`` polls the job's conditions until ``Succeeded`` with a wall-clock limit; on ``Failed`` (or the limit)
  it raises with the lead pod's last log lines, which it streams while waiting (only the lines written since
  the previous poll are read: ``since_seconds`` with timestamps, not the whole log every time).
- SIGTERM while waiting (the KFP run was terminated, or the step pod is going away): when the step's own pod
  carries a ``DisruptionTarget`` condition (eviction, node drain or shutdown, preemption) the job is kept, because
  the step's retry re-attaches to it; otherwise the run was terminated and the job is deleted, so no GPUs stay
  busy when the exit handler does not run. Either way the step exits with 143. (The signal reaches this Python
  process: Argo's emissary starts the step's command in a process group of its own and forwards signals to the
  whole group, argo-workflows cmd/argoexec/commands/emissary.go and workflow/executor/osspecific; the KFP launcher
  runs the component as a plain child in that group, kubeflow/pipelines backend/src/v2/component/launcher_v2.go.)
- ``delete`` removes the job (the pipeline's exit handler calls it when the run fails or is cancelled).

The Kubernetes API objects are injected (``kubernetes.client.CustomObjectsApi`` and ``CoreV1Api``); only the
calls used here are needed, which is what the tests exercise.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import threading
import time
from typing import Callable

from dcv2_k8s.k8s.kinds import PYTORCHJOB, JobKind

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
FIRST_READ_TAIL = 200
REQUEST_TIMEOUT = 30.0      # seconds, every API call (connect and read): a half-open connection cannot hang a step
API_OUTAGE_SECONDS = 600.0  # how long ``wait`` rides out an API server that does not answer (a restart, an upgrade)


class JobFailed(RuntimeError):
    pass


class StepTerminated(SystemExit):
    """The watching step got SIGTERM; exits the step with 143 after deleting (or keeping) the job."""

    def __init__(self):
        super().__init__(143)


def current_namespace(sa_file: str | None = None) -> str:
    """The namespace this code runs in: the step pod's own (its service account's namespace file; in multi-user
    Kubeflow that is the user's profile namespace, where ``default-editor`` may create jobs), else the current
    kubeconfig context's, else ``default``."""
    try:
        with open(sa_file or SA_NAMESPACE_FILE) as f:
            ns = f.read().strip()
        if ns:
            return ns
    except OSError:
        pass
    try:
        from kubernetes import config

        _, ctx = config.list_kube_config_contexts()
        ns = (ctx or {}).get("context", {}).get("namespace")
        if ns:
            return ns
    except Exception:  # no kubeconfig
        pass
    return "default"


def _parse_ts(ts: str) -> tuple:
    """An RFC 3339 timestamp of the kubelet's log lines, comparable at nanosecond resolution."""
    ts = ts.rstrip("Z")
    whole, _, frac = ts.partition(".")
    return (whole, int((frac + "000000000")[:9]) if frac else 0)


def job_name(run_id: str, step: str, prefix: str = "dcv2") -> str:
    """A DNS-1035 name that is the same every time for the same run and step."""
    digest = hashlib.sha1(f"{run_id}/{step}".encode()).hexdigest()[:10]
    return f"{prefix}-{step}-{digest}"[:63].rstrip("-")


def _status_code(err: Exception) -> int | None:
    return getattr(err, "status", None)


def _transient(err: Exception) -> bool:
    """An API server that is restarting, overloaded or unreachable (worth watching again), not a refusal."""
    code = _status_code(err)
    if code is not None and code != 0:
        return code in (429, 500, 502, 503, 504)
    import urllib3

    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError))


def _short(err: Exception) -> str:
    """One line of an API error: its status, or its exception type and first line."""
    code = _status_code(err)
    if code:
        return f"HTTP {code}"
    text = str(getattr(err, "reason", None) or err)  # urllib3's MaxRetryError: the reason, not the whole URL
    text = text.rsplit("] ", 1)[-1] if "] " in text else (text.splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:120]}".rstrip(": ")


class JobLauncher:
    """Creates, re-attaches to, watches and deletes one kind of job (a ``dcv2_k8s.k8s.kinds`` table)."""

    def __init__(self, custom_api, core_api, namespace: str = "", poll_seconds: float = 15.0,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, own_pod: str | None = None,
                 kind: JobKind = PYTORCHJOB, api_outage_seconds: float = API_OUTAGE_SECONDS):
        self.kind = kind
        self.api_outage_seconds = api_outage_seconds
        self.custom, self.core, self.namespace = custom_api, core_api, namespace or current_namespace()
        self.poll, self.log, self.clock, self.sleep = poll_seconds, log, clock, sleep
        # the step's own pod (HOSTNAME is the pod name in a pod), to tell an eviction from a terminated run
        self.own_pod = own_pod if own_pod is not None else os.environ.get("HOSTNAME", "")
        self._log_pos: dict[str, tuple] = {}  # job -> (pod uid, restart count, last timestamp, wall time of read)

    @classmethod
    def in_cluster(cls, namespace: str = "", **kw) -> "JobLauncher":
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.CustomObjectsApi(), client.CoreV1Api(), namespace, **kw)

    def _coords(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def launch(self, job: dict) -> str:
        """Create ``job`` or attach to the job of the same name created by an earlier try."""
        name = job["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(*self._coords(), job, _request_timeout=REQUEST_TIMEOUT)
            self.log(f"created {self.kind.kind} {self.namespace}/{name}")
        except Exception as e:  # kubernetes.client.ApiException
            if _status_code(e) != 409:
                raise
            self.log(f"{self.kind.kind} {self.namespace}/{name} exists already (a retried step): attaching to it")
        return name

    def conditions(self, name: str) -> list[dict]:
        obj = self.custom.get_namespaced_custom_object(*self._coords(), name, _request_timeout=REQUEST_TIMEOUT)
        return obj.get("status", {}).get("conditions", []) or []

    def state(self, name: str) -> str:
        """The last true condition type (Created, Running, Restarting, Succeeded, Failed, Suspended)."""
        true = [c["type"] for c in self.conditions(name) if str(c.get("status")) == "True"]
        return true[-1] if true else "Pending"

    def lead_pod(self, name: str):
        """Rank 0's pod of the job, or None before it exists."""
        items = self._pods(self.kind.lead_selector(name))
        if self.kind.index_annotation:
            items = [p for p in items if (p.metadata.annotations or {}).get(self.kind.index_annotation) == "0"
                     and any(c.name == self.kind.container for c in p.spec.containers)]
        return items[0] if items else None

    def _pods(self, selector: str) -> list:
        """The pods in this namespace matching a label selector (a V1PodList or its dict form)."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT)
        return pods.items if hasattr(pods, "items") else pods.get("items", [])

    def _read_log(self, pod: str, **kw) -> str:
        try:
            return self.core.read_namespaced_pod_log(pod, self.namespace, container=self.kind.container,
                                                     _request_timeout=REQUEST_TIMEOUT, **kw) or ""
        except Exception as e:
            if _status_code(e) in (400, 404):  # container not started yet, or the pod is gone
                return ""
            raise

    def lead_log(self, name: str, tail: int | None = None) -> list[str]:
        pod = self.lead_pod(name)
        return [] if pod is None else self._read_log(pod.metadata.name, tail_lines=tail).splitlines()

    def first_failed_log(self, name: str, tail: int) -> tuple[str, list[str]]:
        """The pod whose trainer container failed first, and the last lines of its log; ("", []) when none did. A
        pod that exited on its own (a config error's 2, 200 for a lost peer) comes before one ended by a signal
        (137, 143: deleted or killed), then the earliest to finish. Once a job has failed, cleanPodPolicy Running
        deletes its Running and Pending pods and keeps the finished ones (training operator
        pkg/controller.v1/common/job.go, DeletePodsAndServices): often rank 0's goes, the pod that says why stays."""
        failed = []
        for pod in self._pods(self.kind.job_selector(name)):
            for c in (pod.status.container_statuses or []) if pod.status else []:
                done = c.state.terminated if c.name == self.kind.container and c.state else None
                if done is not None and done.exit_code:
                    finished = done.finished_at
                    failed.append((done.exit_code in (137, 143), finished is None, str(finished or ""),
                                   pod.metadata.name, done.exit_code))
        for *_, pod, code in sorted(failed):
            lines = self._read_log(pod, tail_lines=tail).splitlines()
            if lines:
                return f"{pod} (exit {code})", lines
        return "", []

    def stream_logs(self, name: str) -> None:
        """Print the lead pod's log lines written since the last call (each line once, across container restarts
        and re-created pods)."""
        pod = self.lead_pod(name)
        if pod is None:
            return
        statuses = [c for c in (pod.status.container_statuses or []) if c.name == self.kind.container] \
            if pod.status else []
        restarts = statuses[0].restart_count if statuses else 0
        uid, now = pod.metadata.uid, self.clock()
        prev = self._log_pos.get(name)
        if prev is None:  # first look (also after a re-attach): the recent past only, not a week of log
            kw = {"tail_lines": FIRST_READ_TAIL}
            last_ts = None
        elif prev[0] != uid or prev[1] != restarts:  # a new pod or a restarted container: its log starts anew
            kw, last_ts = {}, None
        else:
            kw, last_ts = {"since_seconds": max(1, math.ceil(now - prev[3]) + 5)}, prev[2]
        text = self._read_log(pod.metadata.name, timestamps=True, **kw)
        for raw in text.splitlines():
            ts, _, line = raw.partition(" ")
            try:
                key = _parse_ts(ts)
            except ValueError:  # not a timestamped line
                key, line = None, raw
            if key is not None and last_ts is not None and key <= last_ts:
                continue  # read again because of the overlap of since_seconds
            self.log(f"[{pod.metadata.name}] {line}")
            if key is not None:
                last_ts = key
        self._log_pos[name] = (uid, restarts, last_ts, now)

    def disrupted(self) -> bool:
        """Whether the step's own pod is being evicted or preempted (``DisruptionTarget`` condition, set by the
        API server's eviction, the scheduler's preemption, the taint manager and the kubelet's node shutdown)."""
        if not self.own_pod:
            return False
        try:
            pod = self.core.read_namespaced_pod(self.own_pod, self.namespace, _request_timeout=REQUEST_TIMEOUT)
        except Exception:
            return False
        conds = (pod.status.conditions or []) if pod.status else []
        return any(c.type == "DisruptionTarget" and str(c.status) == "True" for c in conds)

    def _on_terminated(self, name: str) -> None:
        if self.disrupted():
            self.log(f"SIGTERM: this step's pod is being evicted; {self.kind.kind} {self.namespace}/{name} keeps "
                     "running and the step's retry re-attaches to it")
        else:
            self.log(f"SIGTERM: the run was terminated; deleting {self.kind.kind} {self.namespace}/{name}")
            self.delete(name)

    def wait(self, name: str, timeout_seconds: float) -> str:
        """Block until the job succeeds; raise JobFailed (failure, deletion or time limit) with the last logs.
        SIGTERM (main thread only) ends the wait with StepTerminated after deleting or keeping the job."""
        terminated: list[int] = []

        def on_sigterm(signum, frame):
            terminated.append(signum)
            raise StepTerminated()

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
        try:
            return self._wait(name, timeout_seconds)
        except StepTerminated:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean-up, even if SIGTERM comes again
            self._on_terminated(name)
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

    def _wait(self, name: str, timeout_seconds: float) -> str:
        deadline = self.clock() + timeout_seconds
        last = None
        outage = None  # when the API server stopped answering (None: it answers)
        delay = 1.0
        while True:
            try:
                state = self.state(name)
                self.stream_logs(name)
            except Exception as e:
                if _status_code(e) == 404:
                    raise JobFailed(f"{self.kind.kind} {name} was deleted while waiting for it") from None
                if not _transient(e):
                    raise
                # the API server restarts or is unreachable: the job runs on without it; watch again with backoff,
                # never a second job (this loop only reads), and give up after api_outage_seconds
                now = self.clock()
                outage = now if outage is None else outage
                if now - outage > self.api_outage_seconds or now > deadline:
                    raise JobFailed(f"{self.kind.kind} {self.namespace}/{name}: the API server has not answered for "
                                    f"{now - outage:.0f} s ({_short(e)}); the job may still be running: a retry of "
                                    "this step re-attaches to it") from None
                self.log(f"{self.kind.kind} {name}: the API server did not answer ({_short(e)}); watching again in "
                         f"{delay:.0f} s ({self.api_outage_seconds - (now - outage):.0f} s of retries left)")
                self.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if outage is not None:
                self.log(f"{self.kind.kind} {name}: the API server answers again after {self.clock() - outage:.0f} s")
                outage, delay = None, 1.0
            if state != last:
                self.log(f"{self.kind.kind} {name}: {state}")
                last = state
            if state == self.kind.succeeded:
                return state
            if state == self.kind.failed:
                raise JobFailed(self._failure_text(name, "failed"))
            if self.clock() > deadline:
                raise JobFailed(self._failure_text(name, f"did not finish within {timeout_seconds:.0f} s"))
            self.sleep(self.poll)

    def _failure_text(self, name: str, what: str) -> str:
        msg = next((c.get("message", "") for c in reversed(self.conditions(name)) if c.get("type") == "Failed"), "")
        pod, tail = self.first_failed_log(name, tail=30)
        whose = f"the log of {pod}, the first pod that failed"
        if not tail:
            tail, whose = self.lead_log(name, tail=30), "rank 0's log"
        return (f"{self.kind.kind} {self.namespace}/{name} {what}" + (f": {msg}" if msg else "") +
                (f"\nlast lines of {whose}:\n" + "\n".join(tail) if tail else ""))

    def delete(self, name: str) -> bool:
        try:
            self.custom.delete_namespaced_custom_object(*self._coords(), name, _request_timeout=REQUEST_TIMEOUT)
            self.log(f"deleted {self.kind.kind} {self.namespace}/{name}")
            return True
        except Exception as e:
            if _status_code(e) == 404:
                return False
            raise
