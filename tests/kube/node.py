"""A real Kubernetes node for the end-to-end tests: containerd (its own root, state, socket and CRI configuration),
runc, the CNI bridge plugin on a pod range used only between this machine's own pods, a kubelet registered to the
test API server (``controlplane.py``), the real kube-scheduler, and CoreDNS serving ``cluster.local`` from the API.

Images come from containerd's own store (``make image`` imports them: no registry is reachable), so pods say
``imagePullPolicy: IfNotPresent``. The node carries the GPU label and taint our manifests select and tolerate and
advertises ``nvidia.com/gpu`` as an extended resource (written into the Node's status, as a cluster operator does
for a resource without a device plugin: nothing on this machine is a GPU).

Test infrastructure only. It leaves the machine as it found it: every process it started is stopped by PID (and
the runtime's shims and containers with it), and the mounts, network namespaces, links, iptables rules, cgroups,
log links and state directories it made are removed in ``stop()``; if its pytest dies first, the next start takes
them away (``reclaim()``, from the ledger ``remains.py`` keeps). Nothing is routed off the machine: the bridge
is not a gateway (``ip_forward`` is left as it is), pods reach only each other and the bridge's own address, where
CoreDNS and the test's S3 endpoint listen.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import yaml

from tests.kube import remains
from tests.kube.controlplane import BIN, _cert, _key, _pem_cert, _pem_key, free_port, wait_until

GPU = "nvidia.com/gpu"
NODE_NAME = "dcv2-gpu-node-0"
BRIDGE = "dcv2br0"
POD_NET = ipaddress.ip_network("10.244.213.0/24")
GATEWAY = str(POD_NET.network_address + 1)   # the bridge's address: CoreDNS and the S3 endpoint listen here
CNI_NAME = "dcv2-pods"
CNI_BIN = Path("/usr/lib/cni")               # Debian's containernetworking-plugins
IMAGE = "dcv2-k8s:test"                      # `make image`: docker/Dockerfile on the test base image
PAUSE_IMAGE = "dcv2-k8s-test/pause:1"        # `make image`: our static pause binary (none can be pulled)
STORE = Path("/var/lib/dcv2-k8s-test/containerd")  # containerd's image store, kept between runs like a cache
OPT = Path("/opt/containerd")                # containerd's default directory for its "opt" plugin (not used here)
CGROUP_ROOT = "dcv2-node"                    # the kubelet's cgroup root: everything it makes lies under it
NODE_BINARIES = ("kubelet", "kube-scheduler", "coredns")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip")
# frames between pods on the bridge pass iptables' FORWARD chain when br_netfilter is loaded, and a Docker daemon
# sets that chain's policy to DROP: the pod bridge's own traffic is accepted, and nothing else
FORWARD_RULE = ["FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]


def _normalized(image: str) -> str:
    name, _, tag = image.partition(":")
    return f"docker.io/{name if '/' in name else 'library/' + name}:{tag or 'latest'}"


def missing() -> list[str]:
    """What the real node needs that this machine lacks, each with the command that provides it."""
    out = [f"{b} (make node)" for b in NODE_BINARIES if not (BIN / "bin" / b).is_file()]
    out += [f"{t} (apt-get install containerd runc iptables)" for t in HOST_TOOLS if shutil.which(t) is None]
    if not (CNI_BIN / "bridge").is_file():
        out.append(f"{CNI_BIN}/bridge (apt-get install containernetworking-plugins)")
    if os.geteuid() != 0:
        out.append("root (containerd, the kubelet and the pod network need it)")
    return out


def _run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


def _mounts() -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]


class RealNode:
    """``start()`` brings the node up against ``cp`` (a started ``ControlPlane``); ``stop()`` takes it all away."""

    def __init__(self, cp, workdir: Path, gpus: int = 4):
        self.cp = cp
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # unix socket paths must stay short (108 bytes): the runtime's state lives under /run
        self.run = Path(f"/run/dcv2-node-{os.getpid()}")
        self.sock = self.run / "containerd.sock"
        self.kubelet_root = self.dir / "kubelet"
        self.pod_logs = self.dir / "pod-logs"
        self.gpus = gpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._argv: dict[str, tuple] = {}
        self._iptables: list[list[str]] = []
        self._made_bridge = False
        self._netns_before: set[str] = set()
        self._chains_before: set[tuple[str, str, str]] = set()
        self._opt_before = True
        self._lines: list[str] = []
        self.scheduler_restarts = 0
        self.claim: remains.Claim | None = None
        self.ledger: remains.Ledger | None = None

    # ------------------------------------------------------------------------------------------------ helpers
    def say(self, line: str) -> None:
        self._lines.append(f"{time.strftime('%H:%M:%S')} {line}")

    @property
    def lines(self) -> list[str]:
        """Recent lines of the node's own logs (kubelet, containerd), for a failing test's message."""
        return self._lines + [f"[{n}] {ln}" for n in ("kubelet", "containerd") for ln in
                              self.log_tail(n, 20).splitlines()]

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])
        except (KeyError, OSError):
            return ""

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> None:
        log = self.dir / f"{name}.log"
        self.logs[name] = log
        self._argv[name] = (argv, env)
        self.procs[name] = subprocess.Popen(argv, stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=self.dir,
                                            env={**os.environ, **(env or {})}, start_new_session=True)
        if self.ledger is not None:
            self.ledger.process(name, self.procs[name].pid)

    def restart(self, name: str) -> None:
        """Stop ``kubelet`` or ``containerd`` by its PID (SIGTERM) and start it again with the same arguments, as a
        node's process manager does on an upgrade: running containers stay (their shims outlive containerd) and the
        kubelet takes its pods back."""
        self._stop_proc(name, 30)
        self._spawn(name, *self._argv[name])
        if name == "containerd":
            self._wait("containerd", lambda: self.ctr("version", timeout=10).returncode == 0, 60)
        else:
            import urllib.request

            self._wait("the kubelet's health", lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{self.healthz_port}/healthz", timeout=2).read() == b"ok", 120)

    def _wait(self, what: str, check, timeout: float = 120) -> None:
        watched = {n: p for n, p in self.procs.items() if n != "kube-scheduler"}  # restarted when it exits
        wait_until(what, check, timeout, watched, self.log_tail, "\n" + "\n".join(self.lines[-40:]))

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run("ctr", "--address", str(self.sock), "--namespace", "k8s.io", *args, check=check,
                    timeout=timeout)

    # ------------------------------------------------------------------------------------------------ start
    def start(self) -> "RealNode":
        gaps = missing()
        if gaps:
            raise RuntimeError("the real node cannot start; missing: " + "; ".join(gaps))
        self._claim()
        self._netns_before = _netns()
        self._chains_before = _kube_chains()
        self._opt_before = OPT.exists()
        self.run.mkdir(parents=True, exist_ok=True)
        self._network()
        self._containerd()
        self._check_images()
        self._coredns()
        self._scheduler()
        self._cgroup_root()
        self._kubelet()
        return self

    def _claim(self) -> None:
        """The node's claim on this machine (``remains.Busy`` while another test node runs), what dead runs left
        taken away, and this node's ledger begun."""
        self.claim = remains.Claim("node").take()
        remains.report("node", _reclaim_held(self.claim))
        self.ledger = remains.Ledger.new("node")
        self.ledger.made(dir=str(self.dir), run=str(self.run), kubelet_root=str(self.kubelet_root),
                         pod_logs=str(self.pod_logs))

    def _network(self) -> None:
        """The pod bridge with its address, made here so CoreDNS and S3 can listen on it before any pod exists."""
        if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            # no test node runs (this one holds the claim) and no dead one's ledger named it
            raise RuntimeError(f"network link {BRIDGE} already exists and no test node owns it; if nothing else "
                               f"uses it, remove it with `ip link del {BRIDGE}`")
        # the bridge is written down before it is made (a kill between the two leaves nothing unknown); the rule
        # after, as an identical rule made by someone else could be there before it
        self.ledger.made(bridge=True)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._made_bridge = True
        _run("ip", "addr", "add", f"{GATEWAY}/{POD_NET.prefixlen}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        _run("iptables", "-I", *FORWARD_RULE)
        self._iptables.append(FORWARD_RULE)
        self.ledger.made(iptables=[FORWARD_RULE])
        cni = self.run / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-dcv2.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": CNI_NAME,
            "plugins": [
                # not a gateway: the plugin would turn on ip_forward, and pods have no business off this machine
                {"type": "bridge", "bridge": BRIDGE, "isGateway": False, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(self.run / "ipam"),
                          "ranges": [[{"subnet": str(POD_NET), "rangeStart": str(POD_NET.network_address + 10),
                                       "gateway": GATEWAY}]]}},
                {"type": "loopback"}]}, indent=1))

    def _containerd(self) -> None:
        STORE.mkdir(parents=True, exist_ok=True)
        cfg = self.run / "containerd.toml"
        cfg.write_text(f"""version = 2
root = "{STORE}"
state = "{self.run / 'state'}"
[grpc]
  address = "{self.sock}"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  # its default, /opt/containerd, would be made on the machine and left there
  path = "{self.run / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{_normalized(PAUSE_IMAGE)}"
  # the machine forbids a negative oom_score_adj (no CAP_SYS_RESOURCE): keep each container's at least the runtime's
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_unprivileged_ports = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.run / 'cni'}"
    max_conf_num = 1
""")
        self._spawn("containerd", ["containerd", "--config", str(cfg), "--log-level", "warn"])
        self._wait("containerd", lambda: self.ctr("version", timeout=10).returncode == 0, 60)
        self._clear_leftovers()

    def _clear_leftovers(self) -> None:
        """Containers a previous run left in the shared store (stopped ones; nothing runs without a containerd)."""
        for cid in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("tasks", "delete", "--force", cid, check=False)
            self.ctr("containers", "delete", cid, check=False)

    def _check_images(self) -> None:
        have = set(self.ctr("images", "ls", "-q").stdout.split())
        lack = [i for i in (IMAGE, PAUSE_IMAGE) if _normalized(i) not in have]
        if lack:
            raise RuntimeError(f"images {lack} are not in the node's store {STORE}; build and import them with "
                               "`make image`")

    def _coredns(self) -> None:
        corefile = self.dir / "Corefile"
        corefile.write_text(f"""cluster.local:53 {{
    bind {GATEWAY}
    errors
    kubernetes cluster.local {{
        kubeconfig {self.cp.kubeconfig} admin
        pods verified
        ttl 5
    }}
}}
.:53 {{
    bind {GATEWAY}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
""")
        # nothing outside cluster.local is answered: no query ever leaves this machine
        self._spawn("coredns", [str(BIN / "bin" / "coredns"), "-conf", str(corefile)])
        self._wait("CoreDNS", lambda: _dns_answers(GATEWAY), 60)

    def _scheduler(self) -> None:
        """kube-scheduler, restarted when it exits, as the kubelet restarts its static pod (or systemd its unit) on
        a real control-plane node: after the API server came back from a restart it once exited with 1, silently
        ("Scheduler cache is corrupted" its last line), and every later pod stayed Pending."""
        import threading

        self._spawn("kube-scheduler", [str(BIN / "bin" / "kube-scheduler"), f"--kubeconfig={self.cp.kubeconfig}",
                                       "--leader-elect=false", "--secure-port=0", "--v=1"])
        self._keep = threading.Event()

        def keep_running():
            while not self._keep.wait(1.0):
                p = self.procs["kube-scheduler"]
                if p.poll() is not None and not self._keep.is_set():
                    self.say(f"kube-scheduler exited with {p.returncode}: started again")
                    self.scheduler_restarts += 1
                    self._spawn("kube-scheduler", *self._argv["kube-scheduler"])
        self._keeper = threading.Thread(target=keep_running, daemon=True, name="kube-scheduler-keeper")
        self._keeper.start()

    def _stop_keeper(self) -> None:
        if getattr(self, "_keeper", None) is not None:
            self._keep.set()
            self._keeper.join(timeout=10)

    def _cgroup_root(self) -> None:
        """The kubelet's cgroup root, made in every v1 hierarchy (the kubelet refuses a root with missing paths);
        cpuset's copies its parent's CPUs and memory nodes, as a new cpuset starts with none."""
        for hier in Path("/sys/fs/cgroup").iterdir():
            if hier.name == "unified" or not hier.is_dir() or hier.is_symlink():
                continue
            top = hier / CGROUP_ROOT
            top.mkdir(exist_ok=True)
            if hier.name == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (top / f).write_text((hier / f).read_text())

    def _kubelet(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography import x509

        ca = x509.load_pem_x509_certificate((self.cp.dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((self.cp.dir / "ca.key").read_bytes(), None)
        key = _key()
        cert = _cert(NODE_NAME, key, ca, ca_key, dns=(NODE_NAME, "localhost"), ips=(self.cp.host_ip, "127.0.0.1"))
        (self.dir / "kubelet-serving.crt").write_bytes(_pem_cert(cert))
        (self.dir / "kubelet-serving.key").write_bytes(_pem_key(key))
        resolv = self.dir / "resolv.conf"
        resolv.write_text("")   # the host's search domains and name servers stay out of the pods
        self.port, self.healthz_port = free_port(), free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False,                 # this machine has cgroup v1 only
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "address": self.cp.host_ip, "port": self.port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.healthz_port,
            "tlsCertFile": str(self.dir / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(self.dir / "kubelet-serving.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.cp.dir / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [GATEWAY], "clusterDomain": "cluster.local", "resolvConf": str(resolv),
            "failSwapOn": False, "podLogsDir": str(self.pod_logs),
            "registerWithTaints": [{"key": GPU, "value": "present", "effect": "NoSchedule"}],
            # the store is shared with the machine's disk: only a really full disk evicts, images are never GC'd
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "5s", "syncFrequency": "10s",
            "serializeImagePulls": False, "rotateCertificates": False, "serverTLSBootstrap": False,
            "shutdownGracePeriod": "0s", "logging": {"format": "text"},
            # no KUBE-FIREWALL / canary chains in the machine's iptables (pkg/kubelet/kubelet_network_linux.go)
            "makeIPTablesUtilChains": False,
            # restarts in place back off 1 s at most instead of up to 5 min (KubeletCrashLoopBackOffMax, beta and on
            # in 1.36: pkg/features/kube_features.go), so a test can count a container's restarts to backoffLimit
            "crashLoopBackOff": {"maxContainerRestartPeriod": "1s"},
        }
        cfg = self.dir / "kubelet.yaml"
        cfg.write_text(yaml.safe_dump(config))
        self._spawn("kubelet", [
            str(BIN / "bin" / "kubelet"), f"--config={cfg}", f"--kubeconfig={self.cp.kubeconfig}",
            f"--root-dir={self.kubelet_root}", f"--cert-dir={self.dir / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={self.cp.host_ip}",
            "--node-labels=nvidia.com/gpu.present=true", "--v=1"])
        from kubernetes import client

        core = client.CoreV1Api(self.cp.api_client())

        def ready():
            node = core.read_node(NODE_NAME)
            return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))
        self._wait("the kubelet's node Ready", ready, 180)
        # an extended resource without a device plugin is advertised in the Node's status (the kubelet keeps it)
        core.patch_node_status(NODE_NAME, {"status": {"capacity": {GPU: str(self.gpus)}}})
        self._wait(f"{GPU} allocatable", lambda: (core.read_node(NODE_NAME).status.allocatable or {}).get(GPU)
                   == str(self.gpus), 60)
        self.say(f"node {NODE_NAME} ready: kubelet on {self.cp.host_ip}:{self.port}, pods on {POD_NET}")

    # ------------------------------------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """Everything ``start()`` made, taken away; each step runs even when an earlier one fails. A node that never
        got the claim made nothing, and touches nothing another node may own."""
        if self.claim is None or not self.claim.held:
            return
        try:
            self._teardown()
        finally:
            self.claim.release()

    def _teardown(self) -> None:
        steps = [self._stop_keeper, self._drain, lambda: self._stop_proc("kubelet", 30), self._kill_containers,
                 lambda: self._stop_proc("containerd", 20), self._kill_shims, self._kill_cgroup_tasks,
                 lambda: self._stop_proc("kube-scheduler", 10), lambda: self._stop_proc("coredns", 10),
                 self._unmount, self._remove_netns, self._remove_cgroups, self._remove_network, self._remove_files]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as e:  # keep cleaning
                errors.append(f"{getattr(step, '__name__', 'step')}: {e}")
        if errors:
            raise RuntimeError("real node teardown: " + "; ".join(errors))   # the ledger stays for the next start
        if self.ledger is not None and not self.leftovers():
            self.ledger.drop()

    def _drain(self) -> None:
        """Every pod deleted at once, and the kubelet given a moment to stop their sandboxes (network torn down by
        the runtime, as in a real cluster)."""
        if "kubelet" not in self.procs or self.procs["kubelet"].poll() is not None:
            return
        from kubernetes import client

        core = client.CoreV1Api(self.cp.api_client())
        for p in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE_NAME}").items:
            try:
                core.delete_namespaced_pod(p.metadata.name, p.metadata.namespace, grace_period_seconds=0)
            except Exception:
                pass
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = [t for t in self.ctr("tasks", "ls", check=False).stdout.splitlines()[1:] if "RUNNING" in t]
            if not running:
                return
            time.sleep(1)

    def _stop_proc(self, name: str, grace: float) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        except ProcessLookupError:
            pass

    def _kill_containers(self) -> None:
        if self.procs.get("containerd") is None or self.procs["containerd"].poll() is not None:
            return
        for line in self.ctr("tasks", "ls", check=False).stdout.splitlines()[1:]:
            tid = line.split()[0]
            self.ctr("tasks", "kill", "--signal", "SIGKILL", tid, check=False)
        time.sleep(0.5)
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "delete", "--force", cid, check=False)
            self.ctr("containers", "delete", cid, check=False)

    def _kill_shims(self) -> None:
        """The runtime's shims outlive containerd by design: they are ours when their address is our socket."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(self.sock).encode() in argv:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _kill_cgroup_tasks(self) -> None:
        """Whatever still runs in the kubelet's cgroups (containers whose shim is gone), killed: only this node's
        pods live there."""
        for _ in range(20):
            pids = _cgroup_pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    def _unmount(self) -> None:
        for m in sorted((m for m in _mounts() if _under(m, self.run, self.kubelet_root, STORE)), key=len,
                        reverse=True):
            _run("umount", "-l", m, check=False)
        for m in _mounts():
            if m.startswith("/run/netns/cni-") or m.startswith("/var/run/netns/cni-"):
                if os.path.basename(m) not in self._netns_before:
                    _run("umount", "-l", m, check=False)

    def _remove_netns(self) -> None:
        d = Path("/var/run/netns")
        if d.is_dir():
            for name in _netns() - self._netns_before:
                if name.startswith("cni-"):
                    _run("ip", "netns", "del", name, check=False)
                    (d / name).unlink(missing_ok=True)

    def _remove_cgroups(self) -> None:
        root = Path("/sys/fs/cgroup")
        for hier in root.iterdir():
            top = hier / CGROUP_ROOT
            if not top.is_dir():
                continue
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                top.rmdir()
            except OSError:
                pass

    def _remove_network(self) -> None:
        for rule in self._iptables:
            _run("iptables", "-D", *rule, check=False)
        self._iptables.clear()
        # chains a kubelet makes despite makeIPTablesUtilChains: false (none seen with it), with the jumps to them
        for ipt, table, chain in sorted(_kube_chains() - self._chains_before):
            for rule in _run(ipt, "-t", table, "-S", check=False).stdout.splitlines():
                if rule.startswith("-A ") and f"-j {chain}" in rule:
                    _run(ipt, "-t", table, "-D", *rule.split()[1:], check=False)
            _run(ipt, "-t", table, "-F", chain, check=False)
            _run(ipt, "-t", table, "-X", chain, check=False)
        if self._made_bridge:
            # veths of pods whose namespaces are gone went with them; the bridge goes last
            _run("ip", "link", "del", BRIDGE, check=False)
            self._made_bridge = False

    def _remove_files(self) -> None:
        logs = Path("/var/log/containers")
        if logs.is_dir():
            for link in logs.iterdir():
                try:
                    if link.is_symlink() and os.readlink(link).startswith(str(self.pod_logs)):
                        link.unlink()
                except OSError:
                    pass
        shutil.rmtree(self.run, ignore_errors=True)
        shutil.rmtree(self.kubelet_root, ignore_errors=True)

    @classmethod
    def _remains_of(cls, ledger: remains.Ledger) -> "RealNode":
        """A node object for what a dead pytest's node made (its ledger), to be taken away by the teardown's own
        steps: its network namespaces are those behind the bridge's ports, the only ones it can have made."""
        made = ledger.data["made"]
        n = cls.__new__(cls)
        n.dir, n.run = Path(made["dir"]), Path(made["run"])
        n.sock = n.run / "containerd.sock"
        n.kubelet_root, n.pod_logs = Path(made["kubelet_root"]), Path(made["pod_logs"])
        n.procs, n._lines, n.ledger = {}, [], ledger
        n._made_bridge = bool(made.get("bridge"))
        n._iptables = [list(r) for r in made.get("iptables", [])]
        n._netns_before = _netns() - (_bridge_netns() if n._made_bridge else set())
        n._chains_before = _kube_chains()   # KUBE-* chains cannot be told apart by owner: left as they are
        return n

    def _what_remains(self) -> list[str]:
        out = [f"mount {m}" for m in _mounts() if _under(m, self.run, self.kubelet_root)]
        out += [f"network namespace {n}" for n in sorted(_netns() - self._netns_before)]
        out += [f"process {pid} in the pods' cgroups" for pid in sorted(_cgroup_pids())]
        if self._made_bridge and _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            out.append(f"link {BRIDGE}")
        out += [f"iptables rule {' '.join(r)}" for r in self._iptables
                if _run("iptables", "-C", *r, check=False).returncode == 0]
        if self.run.exists():
            out.append(f"directory {self.run}")
        return out

    def leftovers(self) -> list[str]:
        """What of this node is still on the machine after ``stop()`` (empty when the teardown was complete)."""
        out = []
        if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            out.append(f"link {BRIDGE}")
        out += [f"mount {m}" for m in _mounts() if _under(m, self.run, self.kubelet_root)]
        out += [f"process {n} ({p.pid})" for n, p in self.procs.items() if p.poll() is None]
        out += [f"cgroup {h}/{CGROUP_ROOT}" for h in Path("/sys/fs/cgroup").iterdir() if (h / CGROUP_ROOT).exists()]
        if self.run.exists():
            out.append(f"directory {self.run}")
        out += [f"iptables chain {' '.join(c)}" for c in sorted(_kube_chains() - self._chains_before)]
        if OPT.exists() and not self._opt_before:
            out.append(f"directory {OPT}")
        return out


def reclaim() -> list[str]:
    """Take away what test nodes left on this machine when their pytest died without ``stop()`` (see
    ``remains.py``): their processes, the containers in the kubelet's cgroups and the shims of their socket, mounts,
    network namespaces, cgroups, the bridge and its iptables rule, state directories. Returns what was there;
    ``remains.Busy`` while a test node runs."""
    return remains.under_claim("node", _reclaim_held)


def _reclaim_held(claim: remains.Claim) -> list[str]:
    ledgers, out, bad = remains.dead(claim)
    for ledger in ledgers:
        if "run" not in ledger.data["made"]:
            ledger.drop()   # killed before it made anything; its processes (if any) are stopped
            continue
        errors = []
        try:
            n = RealNode._remains_of(ledger)
            found = n._what_remains()
        except (KeyError, TypeError, OSError, ValueError) as e:
            bad.append(f"{ledger.path} ({e!r})")
            continue
        for step in (n._kill_shims, n._kill_cgroup_tasks, n._unmount, n._remove_netns, n._remove_cgroups,
                     n._remove_network, n._remove_files):
            try:
                step()
            except Exception as e:  # keep taking away
                errors.append(f"{step.__name__}: {e}")
        out += [f"{x} of {ledger.owner}" for x in found]
        if errors:
            bad.append(f"{ledger.path} ({'; '.join(errors)})")
        else:
            ledger.drop()
    return out + [f"ledger {b}: left in place, not all taken away" for b in bad]


def _under(path: str, *dirs) -> bool:
    return any(path == str(d) or path.startswith(f"{d}/") for d in dirs)


def _cgroup_pids() -> set[int]:
    """The processes in the kubelet's cgroups (in any hierarchy)."""
    return {int(x) for f in _cgroup_files("cgroup.procs") for x in _read(f).split()}


def _netns() -> set[str]:
    d = Path("/var/run/netns")
    return set(os.listdir(d)) if d.is_dir() else set()


def _bridge_netns() -> set[str]:
    """The named network namespaces at the other end of the bridge's ports (a pod's veth pair)."""
    ports = json.loads(_run("ip", "-j", "link", "show", "master", BRIDGE, check=False).stdout or "[]")
    ids = {p["link_netnsid"] for p in ports if "link_netnsid" in p}
    named = json.loads(_run("ip", "-j", "netns", "list", check=False).stdout or "[]")
    return {n["name"] for n in named if n.get("id") in ids}


def _cgroup_files(name: str) -> list[Path]:
    """File ``name`` of every cgroup under the kubelet's root, in each hierarchy."""
    root = Path("/sys/fs/cgroup")
    return [f for hier in (root.iterdir() if root.is_dir() else ()) if (hier / CGROUP_ROOT).is_dir()
            for f in (hier / CGROUP_ROOT).rglob(name)]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _kube_chains() -> set[tuple[str, str, str]]:
    """The KUBE-* chains of iptables and ip6tables (filter, nat, mangle) on this machine now."""
    out = set()
    for ipt in ("iptables", "ip6tables"):
        if shutil.which(ipt) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            res = _run(ipt, "-t", table, "-S", check=False)
            out |= {(ipt, table, line.split()[1]) for line in res.stdout.splitlines()
                    if line.startswith("-N KUBE-")}
    return out


def _dns_answers(server: str) -> bool:
    """True when ``server`` answers a DNS query for kubernetes.default.svc.cluster.local over UDP."""
    q = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
         + b"".join(bytes([len(p)]) + p.encode() for p in "kubernetes.default.svc.cluster.local".split("."))
         + b"\x00\x00\x01\x00\x01")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(q, (server, 53))
        data, _ = s.recvfrom(512)
    return data[:2] == b"\x12\x34"



class PodHistory:
    """Every state the API server reported for the pods of one namespace, from a watch started before the pods
    exist: a deleted pod's last status (its exit code) is kept after the object is gone."""

    def __init__(self, api_client, namespace: str):
        import threading

        self.api, self.ns = api_client, namespace
        self.seen: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"pods-{namespace}")
        self._thread.start()

    def _watch(self) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(self.api)
        version = None
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(core.list_namespaced_pod, self.ns, timeout_seconds=5,
                                   **({"resource_version": version} if version else {})):
                    pod = ev["object"]
                    version = pod.metadata.resource_version
                    self.seen.append({"type": ev["type"], "name": pod.metadata.name, "uid": pod.metadata.uid,
                                      "phase": pod.status.phase, "node": pod.spec.node_name,
                                      "containers": {c.name: c for c in (pod.status.container_statuses or [])},
                                      "init": {c.name: c for c in (pod.status.init_container_statuses or [])}})
                    if self._stop.is_set():
                        break
            except Exception:  # an expired resource version or a closed stream: list again
                version = None
                time.sleep(0.5)

    def uids(self, prefix: str) -> set[str]:
        """The distinct pods (by UID) whose name starts with ``prefix``."""
        return {s["uid"] for s in self.seen if s["name"].startswith(prefix)}

    def exit_codes(self, uid: str, container: str) -> list[int]:
        """Every exit code ``container`` of pod ``uid`` reported (terminated now, or as its last state)."""
        out = []
        for s in self.seen:
            c = s["containers"].get(container) if s["uid"] == uid else None
            for st in (c.state, c.last_state) if c else ():
                if st is not None and st.terminated is not None:
                    code = st.terminated.exit_code
                    if not out or out[-1] != code:
                        out.append(code)
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def restarts(self, prefix: str, container: str) -> int:
        """In-place restarts of ``container`` over all pods named ``prefix``...: what the operator counts against
        ``backoffLimit`` under restartPolicy OnFailure."""
        most: dict[str, int] = {}
        for s in self.seen:
            c = s["containers"].get(container) if s["name"].startswith(prefix) else None
            if c is not None:
                most[s["uid"]] = max(most.get(s["uid"], 0), c.restart_count or 0)
        return sum(most.values())
