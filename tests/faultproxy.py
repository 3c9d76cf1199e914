"""A fault-injecting HTTP proxy in front of an S3 endpoint (test infrastructure): a throttling object store.

Real S3 stores answer ``503 SlowDown`` and ``500 InternalError`` under load and close connections in the middle of a
response body. :class:`FaultProxy` listens on 127.0.0.1 only, forwards every request to the upstream endpoint (the
embedded moto server) and, by a seeded schedule or by rate, instead:

- answers ``503 SlowDown`` or ``500 InternalError`` with S3's XML error body (``Content-Type: application/xml``,
  ``<Error><Code>SlowDown</Code>...``), as S3 does, without forwarding the request (botocore classifies SlowDown as
  throttling and 500 as transient; a HEAD gets the status without a body, as from S3);
- cuts a GET response mid-body (``truncate``): the upstream's status and headers with the full ``Content-Length``
  (ranged GETs: the 206 and its ``Content-Range``), part of the body, then the connection is closed.

``counts`` says what it forwarded and injected (``SlowDown``, ``InternalError``, ``truncated`` and
``bytes_withheld``). ``fail_all()`` fails every request (a store throttling for longer than any retry budget):
``503 SlowDown`` by default, or by a draw among the faults given (a GET that draws ``truncate`` is cut, other
requests get one of the errors); ``set(...)`` changes the rates while it runs; ``only(method, path)``, when given,
picks the requests that faults may hit (the others are forwarded as they are).
"""

from __future__ import annotations

import http.client
import random
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERRORS = {"SlowDown": (503, "Slow Down", "Please reduce your request rate."),
          "InternalError": (500, "Internal Server Error", "We encountered an internal error. Please try again.")}
FAULTS = ("SlowDown", "InternalError", "truncate")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


def error_body(code: str, resource: str, request_id: str) -> bytes:
    """S3's XML error document for ``code``."""
    message = ERRORS[code][2]
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId>"
            f"<HostId>faultproxy</HostId></Error>").encode()


class FaultProxy:
    """``FaultProxy(upstream_port, seed=1, slowdown=0.1, internal=0.1, truncate=0.2).start()``; ``endpoint`` is
    its URL. Rates are per request (``truncate``: per GET whose response has a body); ``schedule``: fault names
    (or None: forward) for the first requests, in order, before the rates apply (a ``truncate`` waits for the
    next GET)."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", seed: int = 0, slowdown: float = 0.0,
                 internal: float = 0.0, truncate: float = 0.0, schedule: list[str | None] | None = None,
                 only=None):
        self.upstream = (upstream_host, upstream_port)
        self.only = only
        self.everything: tuple[str, ...] = ()
        self.rng = random.Random(seed)
        self.rates = {"SlowDown": slowdown, "InternalError": internal, "truncate": truncate}
        self.schedule = list(schedule or [])
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------------------------------ control
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def set(self, slowdown: float | None = None, internal: float | None = None, truncate: float | None = None,
            only=False) -> None:
        """New rates (None: unchanged); ``only``: a new request filter (None: every request)."""
        with self.lock:
            self.everything = ()
            for k, v in (("SlowDown", slowdown), ("InternalError", internal), ("truncate", truncate)):
                if v is not None:
                    self.rates[k] = v
            if only is not False:
                self.only = only

    def fail_all(self, *faults: str, only=False) -> None:
        """Every request from now on gets a fault: one of ``faults`` (default: SlowDown) drawn per request;
        ``truncate`` cuts GET bodies, requests that cannot be cut get one of the error faults (SlowDown if none)."""
        self.set(only=only)
        with self.lock:
            self.everything = faults or ("SlowDown",)

    def heal(self) -> None:
        """No more faults."""
        self.set(slowdown=0.0, internal=0.0, truncate=0.0, only=None)

    def reset_counts(self) -> None:
        with self.lock:
            self.counts.clear()

    @property
    def injected(self) -> int:
        return self.counts["SlowDown"] + self.counts["InternalError"] + self.counts["truncated"]

    # ------------------------------------------------------------------------------------------ decisions
    def decide(self, method: str, path: str = "/") -> str | None:
        """The fault for the next request: from the schedule, else one draw against the rates."""
        with self.lock:
            self.counts["requests"] += 1
            if self.only is not None and not self.only(method, path):
                return None
            if self.everything:
                fault = self.rng.choice(self.everything)
                if fault == "truncate" and method != "GET":
                    fault = self.rng.choice([f for f in self.everything if f != "truncate"] or ["SlowDown"])
                return fault
            if self.schedule:  # a scheduled truncate waits for the next GET
                if self.schedule[0] == "truncate" and method != "GET":
                    return None
                return self.schedule.pop(0)
            u = self.rng.random()
            if u < self.rates["SlowDown"]:
                return "SlowDown"
            u -= self.rates["SlowDown"]
            if u < self.rates["InternalError"]:
                return "InternalError"
            u -= self.rates["InternalError"]
            return "truncate" if method == "GET" and u < self.rates["truncate"] else None

    def cut_at(self, size: int) -> int:
        with self.lock:
            return int(size * self.rng.uniform(0.1, 0.9))

    def count(self, **values: int) -> None:
        with self.lock:
            self.counts.update(values)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format, *args) -> None:  # no line per request
        pass

    def _read_body(self) -> bytes:
        """The request body as sent (chunked framing kept: it is forwarded with its Transfer-Encoding)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = b""
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        t = self.rfile.readline()
                        raw += t
                        if t in (b"\r\n", b"\n", b""):
                            return raw
                raw += self.rfile.read(size + 2)
        n = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._read_body()
        proxy = self.owner
        fault = proxy.decide(self.command, self.path)
        if fault in ERRORS:
            proxy.count(**{fault: 1})
            status, reason, _ = ERRORS[fault]
            rid = uuid.uuid4().hex[:16].upper()
            doc = b"" if self.command == "HEAD" else error_body(fault, self.path.split("?")[0], rid)
            self.send_response_only(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(doc)))
            self.send_header("x-amz-request-id", rid)
            self.end_headers()
            self.wfile.write(doc)
            return
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in ("expect", "connection", "keep-alive"):
                    conn.putheader(k, v)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = resp.getheaders()
        finally:
            conn.close()
        proxy.count(forwarded=1)
        self.send_response_only(resp.status, resp.reason)
        has_length = False
        for k, v in headers:
            if k.lower() in HOP_BY_HOP:
                continue
            has_length |= k.lower() == "content-length"
            self.send_header(k, v)
        if not has_length and self.command != "HEAD" and resp.status not in (204, 304):
            self.send_header("Content-Length", str(len(data)))
        if fault == "truncate" and resp.status in (200, 206) and len(data) >= 2:
            cut = max(1, proxy.cut_at(len(data)))
            proxy.count(truncated=1, bytes_withheld=len(data) - cut)
            self.end_headers()  # no "Connection: close": the cut comes without warning
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
