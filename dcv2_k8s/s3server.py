"""``dcv2 s3 serve``: an embedded S3-compatible HTTP endpoint on 127.0.0.1 for local runs and tests.

It is moto's server (an in-memory S3 implementation speaking the real HTTP protocol), so local runs go through
exactly the boto3 code path a cluster uses against AWS S3, MinIO, SeaweedFS or Ceph RGW. It keeps objects in
memory: production uses a real object store.
"""

from __future__ import annotations

import signal
import threading
import time


class EmbeddedS3:
    """Start/stop an S3 endpoint in this process (a thread). ``endpoint`` is its URL."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        from moto.server import ThreadedMotoServer

        if port == 0:
            from dcv2_k8s.distributed import free_port

            port = free_port()
        self.host, self.port = host, port
        self.server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for clients of this endpoint (the credentials are moto's accepted placeholders)."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, buckets: list[str] = ()) -> "EmbeddedS3":
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server.start()
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for b in buckets:
            client.create_bucket(Bucket=b)
        return self

    def stop(self) -> None:
        self.server.stop()


def serve(host: str, port: int, buckets: list[str]) -> int:
    s3 = EmbeddedS3(host, port).start(buckets)
    print(f"S3 endpoint {s3.endpoint} (in memory; buckets: {', '.join(buckets) or 'none'})", flush=True)
    print("use it with:", flush=True)
    for k, v in s3.env().items():
        print(f"  export {k}={v}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        time.sleep(0.5)
    s3.stop()
    return 0

