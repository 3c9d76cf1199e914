"""Launch a PyTorchJob and see it through, for the pipeline (and anyone scripting against a cluster).

- The job name is derived from the pipeline run (``job_name(run_id, step)``), so a retried step re-attaches to
  the job it created instead of starting a second one (a 409 on create means "attach").
- ``wait`` polls the job's conditions until ``Succeeded`` with a wall-clock limit; on ``Failed`` (or the limit)
  it raises with the master's last log lines, which it streams while waiting.
- ``delete`` removes the job (the pipeline's exit handler calls it when the run fails or is cancelled).

The Kubernetes API objects are injected (``kubernetes.client.CustomObjectsApi`` and ``CoreV1Api``); only the
calls used here are needed, which is what the tests exercise.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


class JobFailed(RuntimeError):
    pass


def job_name(run_id: str, step: str, prefix: str = "dcv2") -> str:
    """A DNS-1035 name that is the same every time for the same run and step."""
    digest = hashlib.sha1(f"{run_id}/{step}".encode()).hexdigest()[:10]
    return f"{prefix}-{step}-{digest}"[:63].rstrip("-")


def _status_code(err: Exception) -> int | None:
    return getattr(err, "status", None)


class PyTorchJobLauncher:
    def __init__(self, custom_api, core_api, namespace: str, poll_seconds: float = 15.0,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.custom, self.core, self.namespace = custom_api, core_api, namespace
        self.poll, self.log, self.clock, self.sleep = poll_seconds, log, clock, sleep
        self._log_lines_seen: dict[str, int] = {}

    @classmethod
    def in_cluster(cls, namespace: str, **kw) -> "PyTorchJobLauncher":
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.CustomObjectsApi(), client.CoreV1Api(), namespace, **kw)

    def launch(self, job: dict) -> str:
        """Create ``job`` or attach to the job of the same name created by an earlier try."""
        name = job["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)
            self.log(f"created PyTorchJob {self.namespace}/{name}")
        except Exception as e:  # kubernetes.client.ApiException
            if _status_code(e) != 409:
                raise
            self.log(f"PyTorchJob {self.namespace}/{name} exists already (a retried step): attaching to it")
        return name

    def conditions(self, name: str) -> list[dict]:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return obj.get("status", {}).get("conditions", []) or []

    def state(self, name: str) -> str:
        """The last true condition type (Created, Running, Restarting, Succeeded, Failed, Suspended)."""
        true = [c["type"] for c in self.conditions(name) if str(c.get("status")) == "True"]
        return true[-1] if true else "Pending"

    def master_pod(self, name: str) -> str | None:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=(
            f"training.kubeflow.org/job-name={name},training.kubeflow.org/job-role=master"))
        items = pods.items if hasattr(pods, "items") else pods.get("items", [])
        if not items:
            return None
        first = items[0]
        return first.metadata.name if hasattr(first, "metadata") else first["metadata"]["name"]

    def master_log(self, name: str, tail: int | None = None) -> list[str]:
        pod = self.master_pod(name)
        if pod is None:
            return []
        try:
            text = self.core.read_namespaced_pod_log(pod, self.namespace, container="pytorch",
                                                     tail_lines=tail) or ""
        except Exception as e:
            if _status_code(e) in (400, 404):  # container not started yet
                return []
            raise
        return text.splitlines()

    def stream_logs(self, name: str) -> None:
        lines = self.master_log(name)
        seen = self._log_lines_seen.get(name, 0)
        if len(lines) < seen:  # the container restarted: its log starts again
            seen = 0
        for line in lines[seen:]:
            self.log(f"[{name}-master-0] {line}")
        self._log_lines_seen[name] = len(lines)

    def wait(self, name: str, timeout_seconds: float) -> str:
        """Block until the job succeeds; raise JobFailed (failure, deletion or time limit) with the last logs."""
        deadline = self.clock() + timeout_seconds
        last = None
        while True:
            try:
                state = self.state(name)
            except Exception as e:
                if _status_code(e) == 404:
                    raise JobFailed(f"PyTorchJob {name} was deleted while waiting for it") from None
                raise
            if state != last:
                self.log(f"PyTorchJob {name}: {state}")
                last = state
            self.stream_logs(name)
            if state == "Succeeded":
                return state
            if state == "Failed":
                raise JobFailed(self._failure_text(name, "failed"))
            if self.clock() > deadline:
                raise JobFailed(self._failure_text(name, f"did not finish within {timeout_seconds:.0f} s"))
            self.sleep(self.poll)

    def _failure_text(self, name: str, what: str) -> str:
        msg = next((c.get("message", "") for c in reversed(self.conditions(name)) if c.get("type") == "Failed"), "")
        tail = self.master_log(name, tail=30)
        return (f"PyTorchJob {self.namespace}/{name} {what}" + (f": {msg}" if msg else "") +
                ("\nlast lines of the master's log:\n" + "\n".join(tail) if tail else ""))

    def delete(self, name: str) -> bool:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
            self.log(f"deleted PyTorchJob {self.namespace}/{name}")
            return True
        except Exception as e:
            if _status_code(e) == 404:
                return False
            raise
