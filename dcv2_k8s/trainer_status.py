"""Progress in ``kubectl get trainjob``: report to Kubeflow Trainer v2's TrainJob status server.

Trainer v2.3.0's TrainJobStatus plugin (kubeflow/trainer ``pkg/runtime/framework/plugins/trainjobstatus``) gives the
trainer container three variables: ``KUBEFLOW_TRAINER_SERVER_URL`` (the full URL,
``https://<service>.<ns>.svc:<port>/apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs/NAME/status``),
``KUBEFLOW_TRAINER_SERVER_CA_CERT`` and ``KUBEFLOW_TRAINER_SERVER_TOKEN`` (files under
``/var/run/secrets/kubeflow/trainer``; the token is a projected service-account token that expires after an hour
and is rotated in place, so it is read again for every request). The server (``pkg/statusserver``) takes
``POST`` of ``{"trainerStatus": {"progressPercentage": 0-100, "estimatedRemainingSeconds": >= 0,
"metrics": [{"name": ..., "value": "<string>"}] (at most 256, 1-64 characters each), "lastUpdatedTime": RFC 3339}}``
with ``Authorization: Bearer <token>``.

Global rank 0 reports at most every ``min_interval`` seconds, from a background thread: the newest update wins,
training never waits for the server, every request has a short timeout, and an unreachable or refusing server
gives one warning, not a failure.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger("dcv2")

ENV_URL, ENV_CA, ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_URL", "KUBEFLOW_TRAINER_SERVER_CA_CERT", \
    "KUBEFLOW_TRAINER_SERVER_TOKEN"
ENV_INTERVAL = "DCV2_TRAINER_STATUS_INTERVAL"  # seconds between reports (default 30)
MAX_METRICS, MAX_LEN = 256, 64


def payload(progress: float | None, remaining_s: float | None, metrics: dict, now: float | None = None) -> dict:
    """The request body, within the server's limits (integers in range, metric values as short strings)."""
    status: dict = {}
    if progress is not None and math.isfinite(progress):
        status["progressPercentage"] = int(min(100, max(0, round(progress))))
    if remaining_s is not None and math.isfinite(remaining_s):
        status["estimatedRemainingSeconds"] = int(min(2 ** 31 - 1, max(0, round(remaining_s))))
    items = []
    for name, value in list(metrics.items())[:MAX_METRICS]:
        if value is None:
            continue
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        items.append({"name": str(name)[:MAX_LEN], "value": text[:MAX_LEN]})
    if items:
        status["metrics"] = items
    t = datetime.datetime.fromtimestamp(time.time() if now is None else now, tz=datetime.timezone.utc)
    status["lastUpdatedTime"] = t.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"trainerStatus": status}


class TrainerStatusReporter:
    """Posts the newest status at a bounded rate; ``update()`` never blocks on the network."""

    def __init__(self, url: str, ca_file: str, token_file: str, min_interval: float = 30.0, timeout: float = 5.0):
        self.url, self.ca_file, self.token_file = url, ca_file, token_file
        self.min_interval, self.timeout = min_interval, timeout
        self.metrics: dict = {}
        self._pending: dict | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._warned = False
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="dcv2-trainer-status", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, env=None, **kw) -> "TrainerStatusReporter | None":
        env = os.environ if env is None else env
        if not all(env.get(k) for k in (ENV_URL, ENV_CA, ENV_TOKEN)):
            return None
        kw.setdefault("min_interval", float(env.get(ENV_INTERVAL, "30")))
        return cls(env[ENV_URL], env[ENV_CA], env[ENV_TOKEN], **kw)

    def update(self, progress: float | None = None, remaining_s: float | None = None, **metrics) -> None:
        """Record the newest figures (metrics accumulate: loss, epoch, knn_top1, ...); sent within min_interval."""
        with self._lock:
            self.metrics.update({k: v for k, v in metrics.items() if v is not None})
            self._pending = payload(progress, remaining_s, dict(self.metrics))
        self._wake.set()

    def close(self, flush: bool = True) -> None:
        """Stop; with ``flush``, send what is pending first (bounded by the request timeout)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.timeout + 1)
        if flush:
            with self._lock:
                body, self._pending = self._pending, None
            if body is not None:
                self._post(body)

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            wait = self.min_interval - (time.time() - last)
            if wait > 0 and self._stop.wait(wait):
                return
            with self._lock:
                body, self._pending = self._pending, None
                self._wake.clear()
            if body is not None:
                self._post(body)
                last = time.time()

    def _post(self, body: dict) -> bool:
        try:
            with open(self.token_file) as f:  # rotated by the kubelet: read it every time
                token = f.read().strip()
            ctx = ssl.create_default_context(cafile=self.ca_file)
            req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=self.timeout, context=ctx) as resp:
                resp.read()
            self.sent += 1
            return True
        except (OSError, ssl.SSLError, urllib.error.URLError, ValueError) as e:
            if not self._warned:
                self._warned = True
                detail = e.read().decode(errors="replace")[:200] if isinstance(e, urllib.error.HTTPError) else ""
                log.warning("TrainJob status not reported to %s: %s %s (training goes on; later failures are not "
                            "logged)", self.url, e, detail)
            return False
