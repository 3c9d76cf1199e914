"""Progress reports to Kubeflow Trainer v2's TrainJob status server, against a real HTTPS server on 127.0.0.1 with
a CA generated here. The server holds the rules of kubeflow/trainer v2.3.0 pkg/statusserver (server.go: ``POST``
on ``/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status`` only, 403 without the
bearer token, 422 on an invalid payload) and of the TrainerStatus schema (pkg/apis/trainer/v1alpha1/
trainjob_types.go: progressPercentage 0-100, estimatedRemainingSeconds >= 0, at most 256 metrics whose name and value
are strings of 1-64 characters, lastUpdatedTime required)."""

from __future__ import annotations

import datetime
import http.server
import json
import re
import ssl
import threading
import time
from pathlib import Path

import pytest

from dcv2_k8s.trainer_status import ENV_CA, ENV_INTERVAL, ENV_TOKEN, ENV_URL, TrainerStatusReporter, payload
from tests.conftest import run_cli, tiny_train_tokens

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs/dcv2-r50/status"


def _certs(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test trainer CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "status")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, cert_pem, key_pem = tmp / "ca.crt", tmp / "tls.crt", tmp / "tls.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


def schema_errors(body: dict) -> list[str]:
    errs = []
    if set(body) - {"trainerStatus"}:
        errs.append(f"unknown fields {set(body) - {'trainerStatus'}}")
    ts = body.get("trainerStatus", {})
    if set(ts) - {"progressPercentage", "estimatedRemainingSeconds", "metrics", "lastUpdatedTime"}:
        errs.append(f"unknown trainerStatus fields {set(ts)}")
    if "progressPercentage" in ts and not (isinstance(ts["progressPercentage"], int) and
                                           0 <= ts["progressPercentage"] <= 100):
        errs.append("progressPercentage")
    if "estimatedRemainingSeconds" in ts and not (isinstance(ts["estimatedRemainingSeconds"], int) and
                                                  ts["estimatedRemainingSeconds"] >= 0):
        errs.append("estimatedRemainingSeconds")
    metrics = ts.get("metrics", [])
    if len(metrics) > 256 or any(set(m) != {"name", "value"} or not all(
            isinstance(m[k], str) and 1 <= len(m[k]) <= 64 for k in ("name", "value")) for m in metrics):
        errs.append("metrics")
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(ts.get("lastUpdatedTime", ""))):
        errs.append("lastUpdatedTime is required (RFC 3339)")
    return errs


class StatusServer:
    def __init__(self, tmp: Path, token: str = "token-1"):
        self.ca, cert, key = _certs(tmp)
        self.token_file = tmp / "token"
        self.token_file.write_text(token)
        self.received: list[dict] = []
        self.refused: list[int] = []
        self.delay = 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.refused.append(404)
                self._answer(404, {"message": "Not found"})

            def do_POST(self):
                time.sleep(server.delay)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != PATH:
                    server.refused.append(404)
                    return self._answer(404, {"message": "Not found"})
                if self.headers.get("Authorization") != f"Bearer {server.token_file.read_text().strip()}":
                    server.refused.append(403)
                    return self._answer(403, {"message": "Forbidden"})
                try:
                    data = json.loads(body)
                except ValueError:
                    server.refused.append(422)
                    return self._answer(422, {"message": "Invalid payload"})
                errs = schema_errors(data)
                if errs:
                    server.refused.append(422)
                    return self._answer(422, {"message": f"Validation failed: {errs}"})
                server.received.append(data)
                self._answer(200, {})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}{PATH}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def env(self, interval: float = 0.2) -> dict:
        return {ENV_URL: self.url, ENV_CA: str(self.ca), ENV_TOKEN: str(self.token_file), ENV_INTERVAL: str(interval)}

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def server(tmp_path):
    s = StatusServer(tmp_path)
    yield s
    s.close()


def _wait(pred, timeout=10.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline
        time.sleep(0.02)


def test_payload_fits_the_schema():
    body = payload(103.7, -5, {"loss": 2.0 / 3, "epoch": 3, "x" * 80: "y" * 80, "none": None}, now=0)
    assert schema_errors(body) == []
    ts = body["trainerStatus"]
    assert ts["progressPercentage"] == 100 and ts["estimatedRemainingSeconds"] == 0
    assert ts["metrics"][:2] == [{"name": "loss", "value": "0.666667"}, {"name": "epoch", "value": "3"}]
    assert ts["lastUpdatedTime"] == "1970-01-01T00:00:00Z" and len(ts["metrics"]) == 3
    assert schema_errors(payload(None, float("nan"), {f"m{i}": i for i in range(300)})) == []


def test_reports_newest_status_at_a_bounded_rate_with_the_rotated_token(server):
    """Many updates: at most one request per interval, the newest values win, and the token file is read again
    for every request (the kubelet rotates the projected token in place)."""
    r = TrainerStatusReporter.from_env(server.env(interval=0.5))
    t0 = time.time()
    for i in range(200):
        r.update(100.0 * i / 200, 200 - i, loss=1.0 / (i + 1), epoch=i // 50)
    assert time.time() - t0 < 0.5  # update() never waits for the network
    _wait(lambda: server.received)
    server.token_file.write_text("token-2")  # rotation
    r.update(99.0, 1.0, loss=0.001)
    _wait(lambda: len(server.received) >= 2)
    r.close()
    assert len(server.received) <= 3 and not server.refused
    last = server.received[-1]["trainerStatus"]
    assert last["progressPercentage"] == 99 and {"name": "loss", "value": "0.001"} in last["metrics"]
    assert {"name": "epoch", "value": "3"} in last["metrics"]  # metrics accumulate across updates


def test_an_unreachable_or_refusing_server_warns_once_and_never_blocks(server, tmp_path, caplog):
    env = server.env(interval=0.0)
    other = tmp_path / "other"
    other.mkdir()
    env[ENV_CA] = str(_certs(other)[0])
    r = TrainerStatusReporter.from_env(env)  # a CA that did not sign the server: TLS fails
    for i in range(5):
        r.update(float(i), 10.0, loss=1.0)
        time.sleep(0.1)
    r.close()
    warnings = [rec for rec in caplog.records if "TrainJob status not reported" in rec.getMessage()]
    assert len(warnings) == 1 and not server.received
    server.delay = 3.0  # a server that hangs: updates still return at once, close() is bounded
    r = TrainerStatusReporter(server.url, str(server.ca), str(server.token_file), min_interval=0, timeout=1)
    t0 = time.time()
    r.update(5.0, 1.0, loss=1.0)
    assert time.time() - t0 < 0.1
    r.close()
    assert time.time() - t0 < 6
    assert TrainerStatusReporter.from_env({}) is None  # not under Trainer v2: nothing is started


@pytest.mark.slow
def test_training_reports_progress_loss_and_knn(server, synth_data, tmp_path):
    """A real (tiny) run with the TrainJob variables: rank 0 reports progress up to 100 %, the ETA, loss, epoch
    and the k-NN top-1 of the in-training monitor."""
    p = run_cli("train", *tiny_train_tokens(synth_data, tmp_path / "ckpt", "config.OPTIMIZER.num_epochs=2",
                                            f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]",
                                            "config.MONITOR.KNN_FREQUENCY=1"),
                env=server.env(interval=0.0), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert server.received and not server.refused
    names = {m["name"] for r in server.received for m in r["trainerStatus"].get("metrics", [])}
    assert {"loss", "epoch", "knn_top1", "global_step"} <= names
    progress = [r["trainerStatus"]["progressPercentage"] for r in server.received
                if "progressPercentage" in r["trainerStatus"]]
    assert progress == sorted(progress) and progress[-1] == 100
    assert any(r["trainerStatus"].get("estimatedRemainingSeconds", 0) > 0 for r in server.received)


def test_the_run_reporter_sends_windows_and_holds_back_a_nonfinite_one(server, tmp_path, monkeypatch):
    """``RunReporter.window``: progress, the ETA and the loss go to the TrainJob status and a ``step`` event to
    metrics.jsonl; a window whose loss is not finite reaches neither (the loop stops on it)."""
    from dcv2_k8s.config import resolve
    from dcv2_k8s.distributed import DistInfo
    from dcv2_k8s.reporter import RunReporter
    from dcv2_k8s.storage import open_storage

    for k, v in server.env(interval=0.0).items():
        monkeypatch.setenv(k, v)
    ckpt = tmp_path / "run"
    reporter = RunReporter(resolve(tiny_train_tokens(tmp_path, ckpt)), DistInfo(), open_storage(str(ckpt)), 100, 10)
    rec = {"epoch": 0, "step": 5, "global_step": 5, "loss": 2.5, "lr": 0.1, "images_per_s": 100.0,
           "data_wait_ratio": 0.1, "ignored_ratio": 0.0, "bad_images": 0}
    reporter.window(rec, 0.5)
    reporter.window(dict(rec, step=10, global_step=10, loss=float("nan")), 0.5)
    reporter.close()
    steps = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["global_step"]) for e in steps] == [("step", 5)]
    last = server.received[-1]["trainerStatus"]
    assert last["progressPercentage"] == 5 and last["estimatedRemainingSeconds"] == 48
    assert {"name": "loss", "value": "2.5"} in last["metrics"] and not server.refused
