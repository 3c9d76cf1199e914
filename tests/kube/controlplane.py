"""A real Kubernetes control plane on 127.0.0.1 for the end-to-end tests: etcd, kube-apiserver (RBAC and Pod
Security admission on, webhooks resolved through EndpointSlices), kube-controller-manager (garbage collector,
namespace and service-account controllers, ...), the Kubeflow training operator v1.9 with its validating
webhook, and Kubeflow Trainer v2.3.0's controller manager with JobSet v0.12.0, each with its mutating and validating
webhooks, all built by ``make controlplane`` and ``make trainer`` from the Go module proxy (binaries in
``CONTROLPLANE_DIR``).

Test infrastructure only. The node (kubelet, containerd, CNI, CoreDNS, kube-scheduler) is ``node.py``.
Every process is started by this module and stopped by PID (SIGTERM, then SIGKILL) in ``stop()``, or, if its
pytest dies first, by the next start (``reclaim()``, from the ledger ``remains.py`` keeps).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from tests.kube import remains

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CONTROLPLANE_DIR", ROOT / "build" / "controlplane"))
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "training-operator.v1", "trainer-controller-manager",
            "jobset")
OPERATOR_NS = "kubeflow"
WEBHOOK_SERVICE = "training-operator"   # the operator's --webhook-service-name default
WEBHOOK_CONFIG = "validator.training-operator.kubeflow.org"  # cmd/training-operator.v1/main.go
WEBHOOK_SECRET = "training-operator-webhook-cert"
CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")  # the operator's pkg/cert/cert.go certDir (fixed)
# Kubeflow Trainer v2.3.0 and JobSet v0.12.0 (``make trainer``): CRDs and kustomized webhook configurations from their
# modules in BIN/trainer. Trainer's namespace is read from its service-account namespace file (written for it by
# install_trainer), kubeflow-system by default (pkg/util/cert/cert.go GetOperatorNamespace); the Service and webhook
# configuration names are those its manifests install.
TRAINER_NS = "kubeflow-system"
TRAINER_SERVICE = "kubeflow-trainer-controller-manager"
TRAINER_SECRET = "kubeflow-trainer-webhook-cert"  # the status server's CA for the pods comes from it (ca.crt)
JOBSET_NS = "jobset-system"
JOBSET_SERVICE = "jobset-webhook-service"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not (BIN / "bin" / b).is_file()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_ip() -> str:
    """This machine's first non-loopback IPv4 address. The API server calls webhooks at a Service's endpoint, and
    EndpointSlice validation refuses loopback addresses (pkg/apis/discovery/validation: ValidateEndpointIP)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        ip = ipaddress.ip_address(addr)
        if not (ip.is_loopback or ip.is_link_local):
            return addr
    raise RuntimeError("no non-loopback IPv4 address on this machine: the operator's webhook needs one")


def reclaim() -> list[str]:
    """Take away what test control planes left when their pytest died without ``stop()`` (``remains.py``): their
    processes, and the files and directories they made outside their work directory. Returns what was there;
    ``remains.Busy`` while a test control plane runs."""
    return remains.under_claim("controlplane", _reclaim_held)


def _reclaim_held(claim: remains.Claim) -> list[str]:
    ledgers, out, bad = remains.dead(claim)
    for ledger in ledgers:
        paths = [p for p in ledger.data["made"].get("paths", []) if isinstance(p, str)]
        out += [f"{p} of {ledger.owner}" for p in paths if os.path.lexists(p)]
        left = _remove_paths(paths)
        if left:
            bad.append(f"{ledger.path} ({', '.join(left)} not removed)")
        else:
            ledger.drop()
    return out + [f"ledger {b}: left in place, not all taken away" for b in bad]


def _remove_paths(paths: list[str]) -> list[str]:
    """Files, then (empty) directories, deepest first. Returns those still there: a directory someone else put
    files in stays."""
    for p in sorted(paths, key=len, reverse=True):
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            else:
                os.unlink(p)
        except OSError:
            pass   # gone already, or not empty
    return [p for p in paths if os.path.lexists(p)]


def wait_until(what: str, check, timeout: float, procs: dict, log_tail, context: str = "") -> None:
    """Poll ``check`` until it is true; fail at once, with its log's tail, if one of ``procs`` (name -> Popen)
    exits meanwhile, and with ``context`` appended after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{log_tail(name)}")
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s (last error: {last})" + context)


# ---------------------------------------------------------------------------------------------------------- certs
def _key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert(cn: str, key, issuer=None, issuer_key=None, org: str | None = None, ca: bool = False,
          dns: tuple = (), ips: tuple = (), client: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(attrs)
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


class ControlPlane:
    """``start()`` brings the control plane up in ``workdir``; ``kubeconfig`` is the admin's (system:masters)."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._argv: dict[str, tuple] = {}
        self.api_port = free_port()
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.webhook_port = free_port()
        self.host_ip = host_ip()  # where the API server reaches the operator's webhook
        self._clients: dict[str, object] = {}
        self.claim: remains.Claim | None = None
        self.ledger: remains.Ledger | None = None
        self._made: list[str] = []   # paths outside workdir made here (CERT_DIR's), deepest last

    # ------------------------------------------------------------------------------------------------ set-up
    def _write_certs(self) -> None:
        from cryptography.hazmat.primitives import serialization

        ca_key = _key()
        ca = _cert("dcv2-test-ca", ca_key, ca=True)
        srv_key = _key()
        srv = _cert("kube-apiserver", srv_key, ca, ca_key,
                    dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
                    ips=("127.0.0.1", "10.0.0.1"))
        adm_key = _key()
        adm = _cert("admin", adm_key, ca, ca_key, org="system:masters", client=True)
        sa_key = _key()
        files = {"ca.crt": _pem_cert(ca), "ca.key": _pem_key(ca_key), "apiserver.crt": _pem_cert(srv),
                 "apiserver.key": _pem_key(srv_key), "admin.crt": _pem_cert(adm), "admin.key": _pem_key(adm_key),
                 "sa.key": _pem_key(sa_key),
                 "sa.pub": sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)}
        for name, data in files.items():
            (self.dir / name).write_bytes(data)
        b64 = lambda n: base64.b64encode(files[n]).decode()  # noqa: E731
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "admin",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority-data":
                                                      b64("ca.crt")}}],
            "users": [{"name": "admin", "user": {"client-certificate-data": b64("admin.crt"),
                                                 "client-key-data": b64("admin.key")}}],
            "contexts": [{"name": "admin", "context": {"cluster": "test", "user": "admin",
                                                       "namespace": "default"}}]}))

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def _spawn(self, name: str, args: list[str], env: dict | None = None, wrap: tuple = ()) -> None:
        """Start ``name`` from BIN/bin with ``args``; ``wrap``: a command line that execs it (the binary and its
        arguments appended)."""
        log = self.dir / f"{name}.log"
        self.logs[name] = log
        self._argv[name] = (args, env, wrap)
        self.procs[name] = subprocess.Popen([*wrap, str(BIN / "bin" / name.split(":")[0]), *args],
                                            stdout=log.open("a"), stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})}, cwd=self.dir, start_new_session=True)
        if self.ledger is not None:
            self.ledger.process(name, self.procs[name].pid)

    def _claim(self) -> None:
        """The control plane's claim on this machine (``remains.Busy`` while another test control plane runs: the
        operator's certificate directory is the same for both), what dead runs left taken away, and this control
        plane's ledger begun."""
        self.claim = remains.Claim("controlplane").take()
        remains.report("control plane", _reclaim_held(self.claim))
        self.ledger = remains.Ledger.new("controlplane")

    def _make(self, *paths: Path) -> None:
        """Directories or files about to be made outside the work directory, written down first (the ledger):
        ``stop()`` removes them, or the next start does if this process dies before."""
        new = [str(p) for p in paths if not p.exists() and str(p) not in self._made]
        if new:
            self._made += new
            if self.ledger is not None:
                self.ledger.made(paths=self._made)

    def _operator_cert_files(self, data: dict) -> None:
        """The operator's certificate files from its Secret's ``data``, in its fixed directory."""
        self._make(CERT_DIR.parent, CERT_DIR, *(CERT_DIR / k for k in ("tls.crt", "tls.key", "ca.crt")))
        CERT_DIR.mkdir(parents=True, exist_ok=True)
        for k in ("tls.crt", "tls.key", "ca.crt"):
            (CERT_DIR / k).write_bytes(base64.b64decode(data[k]))

    def _stop_one(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def restart(self, name: str, down_seconds: float = 0.0) -> None:
        """Stop component ``name`` by its PID (SIGTERM, as a node's process manager would), leave it down for
        ``down_seconds`` (etcd keeps the cluster's state), start it again with the same arguments and wait until it
        serves."""
        self._stop_one(name)
        time.sleep(down_seconds)
        self._spawn(name, *self._argv[name])
        if name == "kube-apiserver":
            self._wait("kube-apiserver", lambda: self.get_raw("/readyz") == "ok", 180)
        elif name == "training-operator.v1":
            self._wait("operator webhook server", lambda: socket.create_connection(
                (self.host_ip, self.webhook_port), timeout=2).close() is None, 120)

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])
        except (KeyError, OSError):
            return ""

    def _wait(self, what: str, check, timeout: float = 120) -> None:
        wait_until(what, check, timeout, self.procs, self.log_tail)

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        ctx.load_cert_chain(self.dir / "admin.crt", self.dir / "admin.key")
        return ctx

    def get_raw(self, path: str) -> str:
        with urllib.request.urlopen(self.server + path, context=self._ssl(), timeout=10) as r:
            return r.read().decode()

    def start(self) -> "ControlPlane":
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"control-plane binaries missing in {BIN / 'bin'}: {missing}; run `make controlplane "
                               "trainer`")
        self._claim()
        self._write_certs()
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn("etcd", ["--name", "test", "--data-dir", str(self.dir / "etcd"),
                             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                             "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
                             "--unsafe-no-fsync", "--log-level", "warn"])
        self._wait("etcd", lambda: urllib.request.urlopen(etcd_url + "/health", timeout=2).status == 200, 60)
        d = self.dir
        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1", f"--secure-port={self.api_port}",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--cert-dir={d / 'apiserver-certs'}", f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}", f"--client-ca-file={d / 'ca.crt'}",
            "--authorization-mode=RBAC", "--enable-admission-plugins=PodSecurity,ValidatingAdmissionWebhook,"
            "MutatingAdmissionWebhook,ServiceAccount,NamespaceLifecycle",
            "--service-cluster-ip-range=10.0.0.0/24", "--enable-aggregator-routing=true",
            # the first issuer signs: one that processes on this machine can reach for OIDC discovery (Trainer's
            # status server verifies the pods' projected tokens through it), the in-cluster name accepted too
            f"--service-account-issuer={self.server}", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--kubelet-client-certificate={d / 'admin.crt'}", f"--kubelet-client-key={d / 'admin.key'}",
            f"--kubelet-certificate-authority={d / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP", "--profiling=false", "--v=1"])
        self._wait("kube-apiserver", lambda: self.get_raw("/readyz") == "ok", 180)
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1",
            "--secure-port=0", "--use-service-account-credentials=false", f"--root-ca-file={d / 'ca.crt'}",
            # no cloud, no persistent volumes; the node lifecycle controller lifts the kubelet's not-ready taint
            "--controllers=*,-persistentvolume-binder,-attachdetach,-persistentvolume-expander,"
            "-service-lb-controller,-node-route-controller,-cloud-node-lifecycle-controller",
            "--concurrent-gc-syncs=5", "--v=1"])
        self.install_operator()
        return self

    # -------------------------------------------------------------------------------------------- clients
    def api_client(self, impersonate: str | None = None):
        """A ``kubernetes.client.ApiClient`` as the admin, or impersonating ``impersonate`` (a user name such as
        ``system:serviceaccount:NS:NAME``: the API server then authorizes every call as that identity). One client
        per identity, made on first use (the kubeconfig is read once)."""
        from kubernetes import client, config

        key = impersonate or ""
        if key not in self._clients:
            cfg = client.Configuration()
            config.load_kube_config(str(self.kubeconfig), client_configuration=cfg)
            api = client.ApiClient(cfg)
            if impersonate:
                api.set_default_header("Impersonate-User", impersonate)
            self._clients[key] = api
        return self._clients[key]

    def dynamic(self, impersonate: str | None = None):
        from kubernetes.dynamic import DynamicClient

        return DynamicClient(self.api_client(impersonate))

    def apply(self, obj: dict, namespace: str | None = None, manager: str = "dcv2-tests", impersonate=None,
              dry_run: bool = False):
        """Server-side apply of one object (what ``kubectl apply --server-side [--dry-run=server]`` sends)."""
        dyn = self.dynamic(impersonate)
        res = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        kw = {"namespace": namespace or obj["metadata"].get("namespace")} if res.namespaced else {}
        if dry_run:
            kw["dry_run"] = "All"
        return res.server_side_apply(body=obj, name=obj["metadata"]["name"], field_manager=manager,
                                     force_conflicts=True, **kw)

    def create_namespace(self, name: str, labels: dict | None = None) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})
        # the service-account controller creates "default" (the ServiceAccount admission plugin needs it)
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        self._wait(f"service account default in {name}",
                   lambda: core.read_namespaced_service_account("default", name) is not None, 60)

    # -------------------------------------------------------------------------------------------- operator
    def install_operator(self) -> None:
        """The operator's PyTorchJob CRD and webhook configuration from its Go module (copied by ``make
        controlplane``), its namespace, the Secret its cert rotator fills, and the Service + EndpointSlice that
        route the API server's webhook calls to the operator process on this machine."""
        from kubernetes import client

        api = self.api_client()
        self._crds(BIN / "operator" / "kubeflow.org_pytorchjobs.yaml")
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}})
        self.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": WEBHOOK_SECRET,
                                                                        "namespace": OPERATOR_NS}})
        self._route(OPERATOR_NS, WEBHOOK_SERVICE, {"webhook": self.webhook_port})
        hooks = yaml.safe_load((BIN / "operator" / "webhook.yaml").read_text())
        hooks["metadata"] = {"name": WEBHOOK_CONFIG}
        for h in hooks["webhooks"]:
            h["clientConfig"]["service"].update({"name": WEBHOOK_SERVICE, "namespace": OPERATOR_NS, "port": 443})
        self.apply(hooks)
        self._spawn("training-operator.v1", [
            "--enable-scheme=pytorchjob", f"--webhook-server-port={self.webhook_port}",
            f"--metrics-bind-address=127.0.0.1:{free_port()}",
            f"--health-probe-bind-address=127.0.0.1:{free_port()}"],
            env={"MY_POD_NAMESPACE": OPERATOR_NS, "KUBECONFIG": str(self.kubeconfig)})
        # the kubelet mounts the Secret the cert rotator fills at the operator's cert dir (pkg/cert/cert.go, certDir);
        # the operator is a plain process here, so the files are written from the Secret as the kubelet would
        core = client.CoreV1Api(api)

        def cert_files():
            data = core.read_namespaced_secret(WEBHOOK_SECRET, OPERATOR_NS).data or {}
            if not {"tls.crt", "tls.key", "ca.crt"} <= set(data):
                return False
            self._operator_cert_files(data)
            return True
        self._wait("operator webhook certificate", cert_files, 120)
        adm = client.AdmissionregistrationV1Api(api)
        # the cert rotator has put its CA into the webhook configuration, and the webhook server answers
        self._wait("operator webhook CA", lambda: all(
            h.client_config.ca_bundle for h in adm.read_validating_webhook_configuration(WEBHOOK_CONFIG).webhooks),
            120)
        self._wait("operator webhook server", lambda: socket.create_connection(
            (self.host_ip, self.webhook_port), timeout=2).close() is None, 120)

    def _route(self, namespace: str, service: str, ports: dict[str, int], address: str | None = None,
               headless: bool = False) -> None:
        """A selectorless Service (port ``name`` -> ``ports[name]``; the webhook one as port 443) and its
        EndpointSlice at ``address`` (this machine's by default): the API server calls webhooks at a Service's
        endpoints (--enable-aggregator-routing). ``headless``: CoreDNS answers the Service's name with that address
        too, which is how pods reach a process on this machine (no kube-proxy here)."""
        spec = {"ports": [{"name": n, "port": 443 if n == "webhook" else p, "targetPort": p}
                          for n, p in ports.items()]}
        if headless:
            spec["clusterIP"] = "None"
        self.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": service, "namespace": namespace},
                    "spec": spec})
        self.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": service, "namespace": namespace,
                                 "labels": {"kubernetes.io/service-name": service}},
                    "addressType": "IPv4", "ports": [{"name": n, "port": p} for n, p in ports.items()],
                    "endpoints": [{"addresses": [address or self.host_ip], "conditions": {"ready": True}}]})

    # ------------------------------------------------------------------------------------ Trainer and JobSet
    def _serving_cert(self, cert_dir: Path, namespace: str, service: str) -> bytes:
        """``tls.crt``/``tls.key`` for ``service``'s webhook server, issued by this cluster's CA, written to
        ``cert_dir`` (where controller-runtime's webhook server reads them); returns the CA for the caBundle."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        key = _key()
        cert = _cert(f"{service}.{namespace}.svc", key, ca, ca_key,
                     dns=(service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
                          f"{service}.{namespace}.svc.cluster.local"))
        cert_dir.mkdir(parents=True, exist_ok=True)
        (cert_dir / "tls.crt").write_bytes(_pem_cert(cert))
        (cert_dir / "tls.key").write_bytes(_pem_key(key))
        return (self.dir / "ca.crt").read_bytes()

    def _webhooks(self, path: Path, namespace: str, service: str, port: int, ca: bytes, prefix: str = "") -> None:
        """The webhook configurations of ``path`` (kustomized from the project's module) pointed at ``service``,
        with this cluster's CA; the Service objects in the file are replaced by ``_route``'s."""
        bundle = base64.b64encode(ca).decode()
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
                continue
            doc["metadata"] = {"name": prefix + doc["metadata"]["name"]}
            for h in doc["webhooks"]:
                h["clientConfig"]["service"].update({"name": service, "namespace": namespace, "port": 443})
                h["clientConfig"]["caBundle"] = bundle
            self.apply(doc)

    def _crds(self, *files: Path) -> None:
        """The CRDs in ``files`` applied, and waited for until the API server serves them (Established)."""
        from kubernetes import client

        ext = client.ApiextensionsV1Api(self.api_client())
        names = []
        for f in files:
            crd = yaml.safe_load(f.read_text())
            self.apply(crd)
            names.append(crd["metadata"]["name"])

        def established():
            return all(any(x.type == "Established" and x.status == "True"
                           for x in (ext.read_custom_resource_definition(n).status.conditions or []))
                       for n in names)
        self._wait(f"CRDs {names}", established, 60)

    def install_trainer(self, pod_address: str | None = None) -> None:
        """JobSet, then Kubeflow Trainer, as their releases install them: CRDs (JobSet's before Trainer starts: Trainer
        watches JobSets), namespaces, webhook configurations (failurePolicy Fail) whose calls reach these processes.
        Each gets a serving certificate from this cluster's CA in a directory of its own (its rotator off: JobSet's
        ``internalCertManagement.enable``, Trainer's ``certManagement.enable``), leader election off, its metrics
        server off and its probe and webhook ports free ones. ``pod_address``: an address of this machine the pods
        reach (the node's bridge), where Trainer's status server is found by its Service's name; without it the
        Service points at this machine's address for the API server only."""
        self._crds(BIN / "trainer" / "jobset.x-k8s.io_jobsets.yaml")
        for ns in (JOBSET_NS, TRAINER_NS):
            self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        # JobSet: apis/config/v1alpha1 Configuration (webhook.certDir, internalCertManagement); flags win over it
        js_port, js_certs = free_port(), self.dir / "jobset-certs"
        ca = self._serving_cert(js_certs, JOBSET_NS, JOBSET_SERVICE)
        self._route(JOBSET_NS, JOBSET_SERVICE, {"webhook": js_port})
        cfg = self.dir / "jobset-config.yaml"
        cfg.write_text(yaml.safe_dump({
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
            "webhook": {"port": js_port, "certDir": str(js_certs)},
            "internalCertManagement": {"enable": False}, "leaderElection": {"leaderElect": False}}))
        self._webhooks(BIN / "trainer" / "jobset-webhooks.yaml", JOBSET_NS, JOBSET_SERVICE, js_port, ca, "jobset-")
        self._spawn("jobset", [f"--config={cfg}", "--leader-elect=false", "--metrics-bind-address=0",
                               f"--health-probe-bind-address=127.0.0.1:{free_port()}", "--zap-log-level=info"],
                    env={"KUBECONFIG": str(self.kubeconfig)})
        self._wait("JobSet webhook server", lambda: socket.create_connection(
            (self.host_ip, js_port), timeout=2).close() is None, 120)
        # Trainer: pkg/config Configuration (unknown fields are fatal), with the TrainJobStatus feature and its
        # status server. Its webhook server and the status server both read the serving certificate from
        # /tmp/k8s-webhook-server/serving-certs (controller-runtime's default under os.TempDir(), and pkg/util/cert
        # certDir, fixed), the directory the training operator uses too; the status server finds the token issuer
        # from the service-account token file (pkg/statusserver/auth.go getClusterOIDCIssuerURL). Trainer runs in a
        # mount namespace of its own where its certificates are bound over that directory and its service account's
        # token and namespace lie at /var/run/secrets/kubernetes.io/serviceaccount, as in its pod: nothing of
        # that is seen (or left) on this machine.
        self._crds(*(BIN / "trainer" / f"trainer.kubeflow.org_{k}.yaml"
                     for k in ("trainjobs", "trainingruntimes", "clustertrainingruntimes")))
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        tr_port, self.trainer_status_port = free_port(), free_port()
        tr_certs = self.dir / "trainer-webhook-server" / CERT_DIR.name
        ca = self._serving_cert(tr_certs, TRAINER_NS, TRAINER_SERVICE)
        self.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": TRAINER_SECRET, "namespace": TRAINER_NS},
                    "data": {k: base64.b64encode(v).decode() for k, v in (
                        ("ca.crt", ca), ("tls.crt", (tr_certs / "tls.crt").read_bytes()),
                        ("tls.key", (tr_certs / "tls.key").read_bytes()))}})
        self._route(TRAINER_NS, TRAINER_SERVICE, {"webhook": tr_port, "status": self.trainer_status_port},
                    address=pod_address, headless=pod_address is not None)
        self.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": TRAINER_SERVICE, "namespace": TRAINER_NS}})
        sa = self.dir / "trainer-sa"
        sa.mkdir(exist_ok=True)
        (sa / "namespace").write_text(TRAINER_NS)
        (sa / "token").write_text(core.create_namespaced_service_account_token(
            TRAINER_SERVICE, TRAINER_NS, {"spec": {"expirationSeconds": 86400}}).status.token)
        self.trainer_health = f"127.0.0.1:{free_port()}"
        cfg = self.dir / "trainer-config.yaml"
        cfg.write_text(yaml.safe_dump({
            "apiVersion": "config.trainer.kubeflow.org/v1alpha1", "kind": "Configuration",
            "webhook": {"port": tr_port}, "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": self.trainer_health},
            "leaderElection": {"leaderElect": False},
            "certManagement": {"enable": False, "webhookServiceName": TRAINER_SERVICE,
                               "webhookSecretName": TRAINER_SECRET},
            "statusServer": {"port": self.trainer_status_port},
            "featureGates": {"TrainJobStatus": True}}))
        self._webhooks(BIN / "trainer" / "trainer-webhooks.yaml", TRAINER_NS, TRAINER_SERVICE, tr_port, ca)
        self._make(CERT_DIR.parent)
        CERT_DIR.parent.mkdir(parents=True, exist_ok=True)  # the mount point (the operator's directory)
        own_mounts = ("set -e; mount --bind \"$1\" \"$3\"; mount -t tmpfs -o size=1m,mode=0755 dcv2-trainer /run; "
                      "d=/run/secrets/kubernetes.io/serviceaccount; mkdir -p $d; cp \"$2/token\" \"$2/namespace\" $d/; "
                      "shift 3; exec \"$@\"")
        self._spawn("trainer-controller-manager", [f"--config={cfg}", "--zap-log-level=info"],
                    env={"KUBECONFIG": str(self.kubeconfig)},
                    wrap=("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", own_mounts,
                          "sh", str(tr_certs.parent), str(sa), str(CERT_DIR.parent)))
        self._wait("Trainer ready (webhook server started)", lambda: urllib.request.urlopen(
            f"http://{self.trainer_health}/readyz", timeout=2).status == 200, 120)

    # -------------------------------------------------------------------------------------------- teardown
    def stop(self) -> None:
        """Every process stopped and what was made outside the work directory removed. A control plane that never
        got the claim started and made nothing."""
        if self.claim is None or not self.claim.held:
            return
        try:
            for name in reversed(list(self.procs)):
                self._stop_one(name)
            left = _remove_paths(self._made)
            if self.ledger is not None and not left and all(p.poll() is not None for p in self.procs.values()):
                self.ledger.drop()
        finally:
            self.claim.release()

    def dump(self) -> str:
        """The tail of every component's log (for a failing test's message)."""
        return "\n".join(f"--- {n} ---\n{self.log_tail(n, 15)}" for n in self.procs)
