"""A node agent for the end-to-end tests: it stands in for a kubelet and its container runtime, which cannot run
on this machine (no container engine, no images). Test infrastructure only; everything else in the tests is the
real control plane (see ``controlplane.py``).

What it does, as the kubelet does it:
- registers a Node (``nvidia.com/gpu`` capacity, the GPU label and taint our manifests select and tolerate) with a
  Ready condition and its log endpoint, and binds pending pods that fit it (node selector, tolerations) through the
  ``pods/binding`` subresource, as the scheduler would;
- runs each bound pod's init containers in order, then its containers, as local processes: ``command`` + ``args``
  with the pod's environment (literal values, ``fieldRef``, ``secretKeyRef`` / ``configMapKeyRef``, ``envFrom``),
  ``HOSTNAME`` = the pod's name;
- reports status back: phase, pod IP, conditions, each container's running / terminated state with its exit code
  (128 + signal for a killed process), restart counts, and restarts containers per ``restartPolicy``;
- on deletion: SIGTERM to each container's main process, SIGKILL to its process tree after the pod's
  ``terminationGracePeriodSeconds``, the terminal status, then the final delete (grace 0, UID precondition);
- serves ``/containerLogs/NS/POD/CONTAINER`` (``timestamps``, ``tailLines``, ``sinceSeconds``, ``previous``) over
  TLS, so ``kubectl logs`` / ``read_namespaced_pod_log`` go through the API server to it.

What it does not do: images (every container runs this checkout's environment: ``PATH`` starts with this Python's
bin directory), network and UTS namespaces (all pods share this machine's network and host name, which cluster
DNS would not resolve for torch's rendezvous either; so torch may put rank 0 on any pod here; a Service name of the pod's namespace in an
environment value or argument is replaced by 127.0.0.1, ports unchanged), volumes other than ``emptyDir`` (each
is a directory of the pod; its ``mountPath`` in arguments and environment values is replaced by that directory),
``securityContext`` (users, read-only root, capabilities are not enforced), resource limits, probes, lifecycle
hooks, sidecars, image pulls, node leases and heartbeats, eviction, ``follow`` on logs.
"""

from __future__ import annotations

import datetime
import http.server
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from dcv2_k8s.k8s.local import kill_tree

GPU = "nvidia.com/gpu"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _ts(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class Container:
    """One run of one container: the process, its log file (timestamped lines, as the runtime writes them)."""

    def __init__(self, name: str, argv: list[str], env: dict, cwd: str, log: Path):
        self.name, self.log_path = name, log
        self.started = _now()
        self.finished: datetime.datetime | None = None
        self.code: int | None = None
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._pump = threading.Thread(target=self._copy, daemon=True)
        self._pump.start()

    def _copy(self) -> None:
        with self.log_path.open("a", buffering=1) as f:
            for raw in iter(self.proc.stdout.readline, b""):
                f.write(f"{_ts(_now())} {raw.decode(errors='replace').rstrip()}\n")

    def poll(self) -> int | None:
        if self.code is None and self.proc.poll() is not None:
            self._pump.join(timeout=5)
            rc = self.proc.returncode
            self.code = rc if rc >= 0 else 128 - rc   # the runtime reports a signal as 128 + its number
            self.finished = _now()
            kill_tree(self.proc.pid)  # what is left of the container's processes goes with it (its cgroup)
        return self.code

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)  # the container's main process only, as the runtime does
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        kill_tree(self.proc.pid)

    def state(self) -> dict:
        if self.poll() is None:
            return {"running": {"startedAt": _ts(self.started)}}
        return {"terminated": {"exitCode": self.code, "reason": "Completed" if self.code == 0 else "Error",
                               "startedAt": _ts(self.started), "finishedAt": _ts(self.finished)}}


class PodRunner(threading.Thread):
    """Runs one pod to its end (or its deletion) and reports its status."""

    def __init__(self, agent: "NodeAgent", pod):
        super().__init__(daemon=True, name=f"pod-{pod.metadata.name}")
        self.agent, self.pod = agent, pod
        self.ns, self.name, self.uid = pod.metadata.namespace, pod.metadata.name, pod.metadata.uid
        self.dir = agent.workdir / "pods" / self.uid
        self.deleting = threading.Event()
        self.gone = threading.Event()
        self.grace = 30
        self.current: dict[str, Container] = {}
        self.previous: dict[str, Container] = {}
        self.restarts: dict[str, int] = {}
        self.init_done: dict[str, Container] = {}

    # -------------------------------------------------------------------------------- environment and paths
    def _mounts(self, c) -> list[tuple[str, str]]:
        local = {}
        for v in self.pod.spec.volumes or []:
            if v.empty_dir is not None:
                d = self.dir / "volumes" / v.name
                d.mkdir(parents=True, exist_ok=True)
                local[v.name] = str(d)
        return sorted(((m.mount_path.rstrip("/"), local[m.name]) for m in (c.volume_mounts or [])
                       if m.name in local), key=lambda x: -len(x[0]))

    def _rewrite(self, value: str, mounts, services) -> str:
        if mounts:  # one pass: a directory put in for one mount must not be rewritten by another
            local = dict(mounts)
            alt = "|".join(re.escape(p) for p, _ in mounts)
            value = re.sub(rf"(?<![\w./-])({alt})(?=/|$|[^\w.-])", lambda m: local[m.group(1)], value)
        for svc in services:
            value = re.sub(rf"(?<![\w.-]){re.escape(svc)}(?:\.{re.escape(self.ns)}(?:\.svc(?:\.cluster\.local)?)?)?"
                           r"(?![\w-])", "127.0.0.1", value)
        return value

    def _env(self, c) -> dict:
        core = self.agent.core
        env: dict[str, str] = {}

        def data_of(kind: str, name: str) -> dict:
            if kind == "secret":
                import base64

                obj = core.read_namespaced_secret(name, self.ns)
                return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
            return dict(core.read_namespaced_config_map(name, self.ns).data or {})

        for src in c.env_from or []:
            ref, kind = (src.secret_ref, "secret") if src.secret_ref else (src.config_map_ref, "configmap")
            for k, v in data_of(kind, ref.name).items():
                env[(src.prefix or "") + k] = v
        fields = {"metadata.name": self.name, "metadata.namespace": self.ns, "metadata.uid": self.uid,
                  "spec.nodeName": self.agent.node, "spec.serviceAccountName": self.pod.spec.service_account_name or "",
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        for e in c.env or []:
            if e.value_from is None:
                # $(VAR) references to earlier variables, as the kubelet expands them
                env[e.name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e.value or "")
            elif e.value_from.field_ref is not None:
                env[e.name] = fields.get(e.value_from.field_ref.field_path, "")
            elif e.value_from.secret_key_ref is not None:
                env[e.name] = data_of("secret", e.value_from.secret_key_ref.name)[e.value_from.secret_key_ref.key]
            elif e.value_from.config_map_key_ref is not None:
                r = e.value_from.config_map_key_ref
                env[e.name] = data_of("configmap", r.name)[r.key]
        return env

    def _start(self, c, kind: str) -> Container:
        services = [s.metadata.name for s in self.agent.core.list_namespaced_service(self.ns).items]
        mounts = self._mounts(c)
        env = {k: self._rewrite(v, mounts, services) for k, v in self._env(c).items()}
        base = {k: os.environ[k] for k in ("LANG", "LC_ALL", "TMPDIR") if k in os.environ}
        base["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
        base["HOSTNAME"] = self.name
        base.update(env)
        argv = [self._rewrite(a, mounts, services) for a in list(c.command or []) + list(c.args or [])]
        cwd = self._rewrite(c.working_dir, mounts, []) if c.working_dir else str(self.dir)
        n = self.restarts.get(c.name, 0)
        log = self.dir / "logs" / f"{c.name}.{n}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.agent.say(f"{self.ns}/{self.name}: {kind} {c.name}: {' '.join(argv)[:160]}")
        return Container(c.name, argv, base, cwd, log)

    # -------------------------------------------------------------------------------------- status
    def _status(self, phase: str, init_phase: bool = False) -> None:
        def cstat(c, run: Container | None, ready: bool):
            st = {"name": c.name, "image": c.image, "imageID": "", "ready": ready,
                  "restartCount": self.restarts.get(c.name, 0), "started": run is not None and run.code is None}
            st["state"] = run.state() if run else {"waiting": {"reason": "PodInitializing"}}
            prev = self.previous.get(c.name)
            if prev is not None:
                st["lastState"] = prev.state()
            return st

        spec = self.pod.spec
        inits = [cstat(c, self.current.get(c.name) or self.init_done.get(c.name), False)
                 for c in spec.init_containers or []]
        running = [cstat(c, None if init_phase else self.current.get(c.name),
                         not init_phase and self.current.get(c.name) is not None
                         and self.current[c.name].code is None) for c in spec.containers]
        ready = phase == "Running" and all(s["ready"] for s in running)
        now = _ts(_now())
        cond = lambda t, ok: {"type": t, "status": "True" if ok else "False", "lastTransitionTime": now}  # noqa
        body = {"status": {"phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
                           "podIPs": [{"ip": "127.0.0.1"}], "startTime": self.started,
                           "conditions": [cond("PodScheduled", True), cond("Initialized", not init_phase),
                                          cond("ContainersReady", ready), cond("Ready", ready)],
                           "initContainerStatuses": inits, "containerStatuses": running}}
        try:
            self.agent.core.patch_namespaced_pod_status(self.name, self.ns, body)
        except Exception as e:
            if getattr(e, "status", None) != 404:
                self.agent.say(f"{self.ns}/{self.name}: status update failed: {e}")

    # -------------------------------------------------------------------------------------- lifecycle
    def run(self) -> None:
        self.started = _ts(_now())
        try:
            self._run()
        except Exception as e:  # a missing Secret, say: a kubelet would keep the pod Pending and retry; here it fails
            import traceback

            self.agent.say(f"{self.ns}/{self.name}: cannot run: {e}\n{traceback.format_exc()}")
            self._status("Failed")
        finally:
            for c in self.current.values():
                c.kill()
            if self.deleting.is_set():
                self._final_delete()
            self.gone.set()

    def _wait_one(self, c: Container) -> int | None:
        while c.poll() is None:
            if self.deleting.is_set():
                return None
            time.sleep(0.1)
        return c.code

    def _run(self) -> None:
        spec = self.pod.spec
        policy = spec.restart_policy or "Always"
        for ic in spec.init_containers or []:
            while True:
                self.current = {ic.name: self._start(ic, "init container")}
                self._status("Pending", init_phase=True)
                code = self._wait_one(self.current[ic.name])
                if code is None:
                    return self._terminate("Failed")
                self.init_done[ic.name] = self.current.pop(ic.name)
                if code == 0:
                    break
                if policy == "Never":
                    return self._status("Failed", init_phase=True)
                self.restarts[ic.name] = self.restarts.get(ic.name, 0) + 1
                time.sleep(1)
        self.current = {c.name: self._start(c, "container") for c in spec.containers}
        self._status("Running")
        while True:
            if self.deleting.is_set():
                return self._terminate(None)
            changed = False
            for c in spec.containers:
                run = self.current[c.name]
                code = run.poll()
                if code is None or getattr(run, "reported", False):
                    continue
                run.reported = True
                changed = True
                self.agent.say(f"{self.ns}/{self.name}: {c.name} exited with {code}")
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    self._status("Running")
                    time.sleep(1)  # the kubelet's back-off, shortened
                    self.previous[c.name] = run
                    self.restarts[c.name] = self.restarts.get(c.name, 0) + 1
                    self.current[c.name] = self._start(c, "container (restart)")
            codes = [self.current[c.name].poll() for c in spec.containers]
            if all(x is not None for x in codes):
                return self._status("Succeeded" if all(x == 0 for x in codes) else "Failed")
            if changed:
                self._status("Running")
            time.sleep(0.2)

    def _terminate(self, phase: str | None) -> None:
        """Deletion: SIGTERM to every container's main process, SIGKILL after the grace period."""
        self.agent.say(f"{self.ns}/{self.name}: deleted, SIGTERM, grace {self.grace} s")
        for c in self.current.values():
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(c.poll() is None for c in self.current.values()):
            time.sleep(0.1)
        for c in self.current.values():
            if c.poll() is None:
                self.agent.say(f"{self.ns}/{self.name}: {c.name} still running after the grace period: SIGKILL")
                c.kill()
                c.proc.wait(timeout=30)
                c.poll()
        codes = [c.code for c in self.current.values()]
        self.agent.say(f"{self.ns}/{self.name}: stopped, exit codes {codes}")
        self._status(phase or ("Succeeded" if codes and all(x == 0 for x in codes) else "Failed"))

    def _final_delete(self) -> None:
        from kubernetes import client

        try:
            self.agent.core.delete_namespaced_pod(self.name, self.ns, body=client.V1DeleteOptions(
                grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)))
        except Exception as e:
            if getattr(e, "status", None) not in (404, 409):
                self.agent.say(f"{self.ns}/{self.name}: final delete failed: {e}")

    def log_file(self, container: str, previous: bool) -> Path | None:
        run = (self.previous if previous else {**self.init_done, **self.current}).get(container)
        return run.log_path if run else None


class _LogHandler(http.server.BaseHTTPRequestHandler):
    agent: "NodeAgent"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.send_error(404, "only /containerLogs/NS/POD/CONTAINER is served")
            return
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        runner = self.agent.runner_by_name(parts[1], parts[2])
        path = runner.log_file(parts[3], q.get("previous") == "true") if runner else None
        if path is None or not path.exists():
            self.send_error(400, f"container {parts[3]} in pod {parts[2]} has no log")
            return
        lines = path.read_text(errors="replace").splitlines()
        if "sinceSeconds" in q:
            since = _ts(_now() - datetime.timedelta(seconds=int(q["sinceSeconds"])))
            lines = [ln for ln in lines if ln[:30] >= since]
        if "tailLines" in q:
            lines = lines[-int(q["tailLines"]):] if int(q["tailLines"]) > 0 else []
        if q.get("timestamps") != "true":
            lines = [ln.partition(" ")[2] for ln in lines]
        data = "".join(ln + "\n" for ln in lines).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class NodeAgent:
    """``start()`` registers the node and runs its loop in a thread; ``stop()`` kills every pod's processes."""

    def __init__(self, api_client, workdir: Path, cert: Path, key: Path, node: str = "dcv2-gpu-node-0",
                 gpus: int = 16, log=None):
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.workdir, self.node, self.gpus = Path(workdir), node, gpus
        self.runners: dict[str, PodRunner] = {}
        self._stop = threading.Event()
        self.lines: list[str] = []
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "agent.log"
        self._log = log
        handler = type("H", (_LogHandler,), {"agent": self})
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.http.socket = ctx.wrap_socket(self.http.socket, server_side=True)
        self.thread = threading.Thread(target=self._loop, daemon=True, name="node-agent")

    def say(self, line: str) -> None:
        self.lines.append(f"{_ts(_now())} {line}")
        with self.log_path.open("a") as f:
            f.write(self.lines[-1] + "\n")
        if self._log:
            self._log(line)

    def start(self) -> "NodeAgent":
        from kubernetes import client

        res = {"cpu": "256", "memory": "2Ti", "ephemeral-storage": "4Ti", "pods": "110", GPU: str(self.gpus)}
        node = client.V1Node(metadata=client.V1ObjectMeta(name=self.node, labels={
            "kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", "nvidia.com/gpu.present": "true"}),
            spec=client.V1NodeSpec(taints=[client.V1Taint(key=GPU, value="present", effect="NoSchedule")]))
        self.core.create_node(node)
        self.core.patch_node_status(self.node, {"status": {
            "capacity": res, "allocatable": res,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.http.server_address[1]}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "dcv2 test node agent", "lastHeartbeatTime": _ts(_now()),
                            "lastTransitionTime": _ts(_now())}],
            "nodeInfo": {"kubeletVersion": "dcv2-node-agent", "containerRuntimeVersion": "local-processes",
                         "architecture": "amd64", "operatingSystem": "linux", "bootID": "", "kernelVersion": "",
                         "kubeProxyVersion": "", "machineID": "", "osImage": "", "systemUUID": ""}}})
        threading.Thread(target=self.http.serve_forever, daemon=True, name="node-agent-logs").start()
        self.thread.start()
        return self

    def runner_by_name(self, ns: str, name: str) -> PodRunner | None:
        for r in list(self.runners.values()):
            if r.ns == ns and r.name == name:
                return r
        return None

    def _fits(self, pod) -> bool:
        sel = pod.spec.node_selector or {}
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", "nvidia.com/gpu.present": "true"}
        if any(labels.get(k) != v for k, v in sel.items()):
            return False
        tol = pod.spec.tolerations or []
        return any(t.key == GPU and (t.operator == "Exists" or t.value == "present")
                   and t.effect in (None, "", "NoSchedule") for t in tol)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception:
                import traceback

                self.say(f"sync failed: {traceback.format_exc()}")
            time.sleep(0.3)

    def _sync(self) -> None:
        from kubernetes import client

        pods = self.core.list_pod_for_all_namespaces().items
        seen = set()
        for pod in pods:
            uid = pod.metadata.uid
            if pod.spec.node_name is None and pod.metadata.deletion_timestamp is None:
                if self._fits(pod):
                    try:
                        self.core.create_namespaced_pod_binding(pod.metadata.name, pod.metadata.namespace,
                                                                client.V1Binding(
                            metadata=client.V1ObjectMeta(name=pod.metadata.name),
                            target=client.V1ObjectReference(kind="Node", name=self.node)),
                            _preload_content=False)
                        self.say(f"bound {pod.metadata.namespace}/{pod.metadata.name}")
                    except Exception as e:
                        self.say(f"binding {pod.metadata.name} failed: {e}")
                continue
            if pod.spec.node_name != self.node:
                continue
            seen.add(uid)
            r = self.runners.get(uid)
            if r is None and pod.status.phase not in ("Succeeded", "Failed"):
                if pod.metadata.deletion_timestamp is not None:
                    self._delete_now(pod)
                    continue
                r = self.runners[uid] = PodRunner(self, pod)
                r.start()
            elif r is None and pod.metadata.deletion_timestamp is not None:
                self._delete_now(pod)
            if r is not None and pod.metadata.deletion_timestamp is not None and not r.deleting.is_set():
                r.grace = pod.metadata.deletion_grace_period_seconds
                if r.grace is None:
                    r.grace = pod.spec.termination_grace_period_seconds or 30
                r.deleting.set()
                if r.gone.is_set():  # already finished: only the final delete is left
                    r._final_delete()
        for uid in [u for u in self.runners if u not in seen]:
            r = self.runners[uid]
            try:  # a list can be older than a runner just started: ask for the pod itself
                if self.core.read_namespaced_pod(r.name, r.ns).metadata.uid == uid:
                    continue
            except Exception as e:
                if getattr(e, "status", None) != 404:
                    raise
            del self.runners[uid]  # force-deleted or garbage-collected: its processes go too
            r.deleting.set()
            r.grace = 0
            for c in r.current.values():
                c.kill()

    def _delete_now(self, pod) -> None:
        from kubernetes import client

        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, body=client.V1DeleteOptions(
                grace_period_seconds=0, preconditions=client.V1Preconditions(uid=pod.metadata.uid)))
        except Exception:
            pass

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)
        for r in list(self.runners.values()):
            for c in r.current.values():
                c.kill()
        self.http.shutdown()
