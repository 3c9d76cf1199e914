"""One small interface over local directories and S3-compatible object storage.

Paths are strings: a local path or an ``s3://bucket/prefix`` URI. Writes are atomic: a reader sees the old
object or the new one, never a partial one (local: temporary file, fsync, rename; S3: a PUT or a completed
multipart upload is atomic by itself).

S3 settings come from the standard environment (a Kubernetes Secret through ``envFrom``):
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (MinIO, SeaweedFS, Ceph RGW, the embedded server), and these of ours:

- ``DCV2_S3_ADDRESSING``: ``path`` (default when an endpoint is set; MinIO/SeaweedFS want it) or ``virtual``;
- ``DCV2_S3_RETRY_MODE`` (``standard``/``adaptive``, default standard) and ``DCV2_S3_MAX_ATTEMPTS`` (default 5; also
  the attempts of our own retries of a response body cut off mid-way, which botocore raises outside its retries);
- ``DCV2_S3_CONNECT_TIMEOUT`` / ``DCV2_S3_READ_TIMEOUT`` seconds (default 10 / 60);
- ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` and ``AWS_RESPONSE_CHECKSUM_VALIDATION=when_required`` for
  stores that reject boto3's newer default checksum headers (botocore reads them itself).
"""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

MiB = 2 ** 20


class StorageError(RuntimeError):
    """A storage failure a user can act on; the message names the URI and the fix. ``transient``: the store
    could not be reached or answered "try again" (5xx), so the same request may succeed later."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class Fenced(StorageError):
    """A conditional write lost to a newer writer: another run took over the checkpoint directory
    (``checkpoint.CheckpointManager.take_over``). Permanent (``exitcodes.FENCED``): a retry would fight the newer
    owner."""


class DiskFull(StorageError):
    """No space left on a local filesystem (ENOSPC, or EDQUOT: a quota): permanent, as a retry fills the same disk
    again; the operator frees space or points the path at a bigger volume (``exitcodes.classify``: exit 2).
    ``path``: what was being written; ``needed`` and ``available``: bytes."""

    def __init__(self, message: str, path: str = "", needed: int = 0, available: int = 0):
        super().__init__(message)
        self.path, self.needed, self.available = path, needed, available


def is_disk_full(exc: BaseException) -> bool:
    """An OSError saying that the filesystem (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer can still write on the filesystem holding ``path`` (or its nearest existing
    parent)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def on_disk(size: int, path: str) -> int:
    """The space a file of ``size`` bytes takes on the filesystem holding ``path`` (whole blocks)."""
    block = os.statvfs(_existing(path)).f_frsize or 4096
    return -(-size // block) * block


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``5.9 MB``, ``312.0 kB``, ``18 bytes``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def lock_holder(f) -> str:
    """Who holds the ``flock`` on the open file ``f``, from ``/proc/locks``: ``process PID (its command line,
    stopped)``; ``another writer`` when that is not to be read (another PID namespace, a network filesystem's
    lock taken on another host)."""
    st = os.fstat(f.fileno())
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            rows = [line.split() for line in locks]
    except OSError:
        return "another writer"
    pid = next((r[4] for r in rows if len(r) > 5 and "->" not in r and r[1] == "FLOCK" and r[5] == key), "")
    if not pid.isdigit() or pid == str(os.getpid()) or int(pid) <= 0:
        return "another writer"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as c:
            cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat") as c:
            state = c.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return f"process {pid}"
    cmd = cmd if len(cmd) <= 80 else cmd[:77] + "..."
    return f"process {pid} ({cmd}{', stopped' if state in ('T', 't') else ''})"


class LocalStorage:
    """A directory tree on a local or mounted filesystem. ``lock_wait``: the seconds :meth:`put_if` waits for the
    lock of a file that another writer holds (held for milliseconds by a writer that runs)."""

    def __init__(self, root: str, lock_wait: float = 60.0):
        self.root = root
        self.lock_wait = lock_wait

    def join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def put_bytes(self, path: str, data: bytes) -> None:
        """Write ``path`` atomically (a temporary file, fsync, rename; the temporary file is removed on any
        failure); a full filesystem raises :class:`DiskFull`, naming the path, the size and the space left."""
        tmp = ""
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
            if is_disk_full(e):
                free = free_bytes(path)
                raise DiskFull(f"{path}: no space left on the device: writing it needs {size_text(len(data))}, "
                               f"{size_text(free)} available; free space or use a bigger volume", path, len(data),
                               free) from None
            raise

    def get_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def get_range(self, path: str, lo: int = 0, hi: int | None = None) -> bytes:
        """Bytes ``[lo, hi)`` of a file (``hi=None``: to its end)."""
        with open(path, "rb") as f:
            f.seek(lo)
            return f.read() if hi is None else f.read(max(0, hi - lo))

    def head(self, path: str) -> dict | None:
        """``ContentLength`` and ``ETag`` (empty: no content hash) of a file, as S3's HEAD has them; None when
        ``path`` is not a file."""
        if not os.path.isfile(path):
            return None
        return {"ContentLength": os.path.getsize(path), "ETag": ""}

    def list_objects(self, path: str) -> list[dict]:
        """Every file under the directory ``path`` (recursive, sorted): dicts with Key (relative to path), Size and
        ETag (empty); [] when ``path`` is not a directory."""
        root = Path(path)
        if not root.is_dir():
            return []
        return [{"Key": str(f.relative_to(root)), "Size": f.stat().st_size, "ETag": ""}
                for f in sorted(root.rglob("*")) if f.is_file()]

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """The content of a small file and its version tag (a SHA-256 of the content), or None when absent."""
        import hashlib

        try:
            data = self.get_bytes(path)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, path: str, data: bytes, match: str | None) -> str | None:
        """Compare-and-swap of a small file: write ``path`` only if its version is still ``match`` (a tag from
        :meth:`read_versioned` or an earlier ``put_if``; None: only if ``path`` does not exist). Returns the new
        tag, or None when the precondition failed. Writers serialise on an exclusive ``flock`` of
        ``.NAME.lock`` beside the file: atomic between processes on a local filesystem, and on NFSv4 and CephFS,
        which take it as a server-side lock. A writer that keeps the lock (stopped, frozen or hung inside this
        section) is waited for ``lock_wait`` seconds at most; then a transient :class:`StorageError` names it (a
        retry succeeds once it is gone, or once a network filesystem's lease on its lock lapses)."""
        import fcntl
        import hashlib

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
        with open(lock_path, "a") as lock:
            deadline = time.monotonic() + self.lock_wait
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StorageError(
                            f"{path}: {lock_holder(lock)} holds {lock_path} and did not let go in "
                            f"{self.lock_wait:.0f} s: a writer of this directory is stopped or hung; stop it (or "
                            "let a network filesystem's lease on its lock lapse) and run again; nothing was "
                            "changed", transient=True) from None
                    time.sleep(0.05)
            try:
                cur = self.read_versioned(path)
                if (cur[1] if cur else None) != match:
                    return None
                self.put_bytes(path, data)
                return hashlib.sha256(data).hexdigest()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def list_dirs(self, path: str) -> list[str]:
        if not os.path.isdir(path):
            return []
        return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))

    def delete(self, path: str) -> None:
        """Remove the file ``path``; nothing when it is not there."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def delete_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def check(self) -> None:
        """Whether the directory can be made here, without making it (a refused run leaves nothing behind)."""
        probe = os.path.abspath(self.root)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            why = "is not a directory" if not os.path.isdir(probe) else "is not writable"
            raise StorageError(f"{self.root}: cannot create the directory ({probe} {why}); pick a writable path")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI; write s3://BUCKET/PREFIX")
    return bucket, key


def transfer_config(size_hint: int = 0):
    """Multipart settings: 8 MiB parts (many parts in parallel), doubled as often as needed to keep an object
    under 9,000 parts (S3 allows 10,000), so multi-GB checkpoints upload in parts of 8-64+ MiB."""
    from boto3.s3.transfer import TransferConfig

    chunk = 8 * MiB
    while size_hint and size_hint / chunk > 9000:
        chunk *= 2
    return TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=chunk,
                          max_concurrency=int(os.environ.get("DCV2_S3_CONCURRENCY", "10")), use_threads=True)


def s3_endpoint() -> str:
    """The endpoint URL from the environment (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; '' for AWS), or a
    one-line StorageError naming the variable when its value is not an ``http://`` or ``https://`` URL."""
    from urllib.parse import urlsplit

    var = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    endpoint = os.environ.get(var, "")
    parts = urlsplit(endpoint)
    if endpoint and (parts.scheme not in ("http", "https") or not parts.netloc):
        rest = endpoint.split("://", 1)[1] if "://" in endpoint else endpoint
        raise StorageError(f"{var}={redact(endpoint)} is not an endpoint URL (it needs http:// or https://); set "
                           f"{var}=http://{redact(rest)}")
    return endpoint


def s3_client():
    """A boto3 S3 client configured from the environment (see the module docstring)."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
    addressing = os.environ.get("DCV2_S3_ADDRESSING", "path" if endpoint else "auto")
    cfg = Config(retries={"mode": os.environ.get("DCV2_S3_RETRY_MODE", "standard"),
                          "max_attempts": int(os.environ.get("DCV2_S3_MAX_ATTEMPTS", "5"))},
                 connect_timeout=float(os.environ.get("DCV2_S3_CONNECT_TIMEOUT", "10")),
                 read_timeout=float(os.environ.get("DCV2_S3_READ_TIMEOUT", "60")),
                 s3={"addressing_style": "virtual" if addressing == "virtual" else addressing},
                 max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint or None, config=cfg)


def explain_s3_error(uri: str, err: Exception) -> StorageError:
    """One line naming the URI and what to do, for the mistakes users make."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = redact(s3_endpoint()) or "the AWS default"
    if isinstance(err, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a "
                            "Kubernetes Secret referenced by envFrom)")
    if cut_short(err):
        last = getattr(err, "last_exception", None)  # s3transfer's RetriesExceededError: what its last try raised
        why = type(err).__name__ + (f" of {type(last).__name__}" if last is not None else "")
        return StorageError(f"{uri}: the S3 endpoint {endpoint} closed the connection in the middle of a response, "
                            f"through every retry ({why}); the store is overloaded or failing: try again later",
                            transient=True)
    if isinstance(err, EndpointConnectionError) or type(err).__name__ in ("ConnectTimeoutError", "ReadTimeoutError",
                                                                          "ConnectionClosedError"):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint}; check AWS_ENDPOINT_URL(_S3) and that "
                            "the object store is running", transient=True)
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404", "NotFound"):
            return StorageError(f"{uri}: the bucket does not exist at {endpoint}; create it or fix the URI")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied ({code}); check the credentials and the bucket policy")
        if "checksum" in str(err).lower() or code == "InvalidArgument":
            return StorageError(f"{uri}: the store rejected the request ({code}); for S3-compatible stores set "
                                "AWS_REQUEST_CHECKSUM_CALCULATION=when_required AWS_RESPONSE_CHECKSUM_VALIDATION=when_required")
        transient = code in ("500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                             "RequestTimeout")
        if transient:
            return StorageError(f"{uri}: the S3 endpoint {endpoint} answered {code} through every retry "
                                f"(DCV2_S3_MAX_ATTEMPTS={max_attempts()}); the store is overloaded or failing: try "
                                f"again later ({redact(str(err))})", transient=True)
        return StorageError(f"{uri}: S3 error {code}: {redact(str(err))}")
    return StorageError(f"{uri}: {type(err).__name__}: {redact(str(err))}")


def cut_short(err: BaseException) -> bool:
    """``err`` is a response body cut off mid-way (the connection closed or reset while reading it): botocore
    raises it while the body is READ, outside its own retry loop, so the reader must retry it
    (s3transfer's downloads retry it a few times, then raise RetriesExceededError)."""
    return type(err).__name__ in ("IncompleteReadError", "ResponseStreamingError", "RetriesExceededError",
                                  "ProtocolError", "IncompleteRead") or isinstance(err, ConnectionError)


def max_attempts() -> int:
    return max(1, int(os.environ.get("DCV2_S3_MAX_ATTEMPTS", "5")))


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): full jitter over 1, 2, 4 ... s, at most 20 s (as
    botocore's standard retry mode)."""
    return random.uniform(0, min(20.0, 2.0 ** attempt))


def redact(text: str) -> str:
    """``text`` without the S3 secret key and without URL passwords (``http://user:pw@host`` ->
    ``http://user:***@host``): endpoints and store errors are printed and logged, secrets never are."""
    import re

    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret:
        text = text.replace(secret, "***")
    return re.sub(r"(://[^/:@\s]+):[^@/\s]+@", r"\1:***@", text)


class S3Storage:
    """Objects under ``s3://bucket/prefix``; "directories" are key prefixes."""

    def __init__(self, root: str, client=None):
        self.root = root.rstrip("/")
        self.bucket, self.prefix = split_s3(self.root)
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts]])

    def _key(self, path: str) -> str:
        bucket, key = split_s3(path)
        if bucket != self.bucket:
            raise StorageError(f"{path}: outside the bucket {self.bucket}")
        return key

    def _call(self, path: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except Exception as e:  # botocore errors become one actionable line
            raise explain_s3_error(path, e) from e

    def _download(self, path: str, fn, *args, **kwargs):
        """A read, again (with backoff, up to DCV2_S3_MAX_ATTEMPTS times) when its body was cut off mid-way (a
        transfer-manager download: more often than its own retries allow); other errors as one line."""
        for attempt in range(max_attempts()):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not cut_short(e) or attempt == max_attempts() - 1:
                    raise explain_s3_error(path, e) from e
                time.sleep(backoff(attempt))

    def put_bytes(self, path: str, data: bytes) -> None:
        self._call(path, self.client.upload_fileobj, io.BytesIO(data), self.bucket, self._key(path),
                   Config=transfer_config(len(data)))

    def upload_file(self, local: str, path: str) -> None:
        self._call(path, self.client.upload_file, local, self.bucket, self._key(path),
                   Config=transfer_config(os.path.getsize(local)))

    def download_file(self, path: str, local: str) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{local}.part"
        self._download(path, self.client.download_file, self.bucket, self._key(path), tmp, Config=transfer_config())
        os.replace(tmp, local)

    def get_bytes(self, path: str) -> bytes:
        def fetch() -> bytes:
            buf = io.BytesIO()  # a fresh buffer per attempt
            self.client.download_fileobj(self.bucket, self._key(path), buf, Config=transfer_config())
            return buf.getvalue()

        return self._download(path, fetch)

    def get_range(self, path: str, lo: int = 0, hi: int | None = None) -> bytes:
        """Bytes ``[lo, hi)`` of an object in one GET (``hi=None``: to its end; ``get_range(path)``: the whole
        object). For many small objects and for parallel ranged reads of a large one, where :meth:`get_bytes`'
        transfer manager (a HEAD, then parts) costs a request more."""
        if hi is not None and hi <= lo:
            return b""
        # botocore retries a 503/500 answer itself, but a body cut off mid-way is raised while READING it, outside
        # its retry loop: read on from where the body stopped (a ranged GET of the rest, If-Match the first
        # answer's ETag so that the pieces are of one version), with backoff, up to DCV2_S3_MAX_ATTEMPTS times.
        buf, etag, size = bytearray(), None, None
        for attempt in range(max_attempts()):
            at = lo + len(buf)
            extra = {} if at == 0 and hi is None else {"Range": f"bytes={at}-{'' if hi is None else hi - 1}"}
            if etag:
                extra["IfMatch"] = etag
            resp = self._call(path, self.client.get_object, Bucket=self.bucket, Key=self._key(path), **extra)
            if etag is None:
                etag, size = resp.get("ETag"), int(resp.get("ContentLength", 0))
            try:
                for chunk in resp["Body"].iter_chunks(1 << 20):
                    buf += chunk
                return bytes(buf)
            except Exception as e:
                resp["Body"].close()
                if not cut_short(e) or attempt == max_attempts() - 1:
                    raise explain_s3_error(path, e) from e
                if size is not None and len(buf) >= size:  # every byte arrived before the connection closed
                    return bytes(buf[:size])
                time.sleep(backoff(attempt))
        raise AssertionError("unreachable")

    def head(self, path: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(path))
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise explain_s3_error(path, e) from e
        except Exception as e:
            raise explain_s3_error(path, e) from e

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """The content of a small object and its ETag, from one GET (again, whole, when the body is cut off
        mid-way: up to DCV2_S3_MAX_ATTEMPTS times); None when absent."""
        from botocore.exceptions import ClientError

        def fetch() -> tuple[bytes, str] | None:
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return resp["Body"].read(), resp["ETag"]

        return self._download(path, fetch)

    def put_if(self, path: str, data: bytes, match: str | None) -> str | None:
        """Compare-and-swap of a small object with S3 conditional writes: one PutObject with ``If-Match: match``
        (None: ``If-None-Match: *``, only if absent). Returns the new ETag, or None when the precondition failed
        (412, or 404 for If-Match on a deleted object). A 409 (a concurrent conditional write to the same key) is
        retried as AWS advises. A store that ignores the headers makes this a plain PUT: ``take_over`` detects
        that once and warns."""
        from botocore.exceptions import ClientError

        cond = {"IfNoneMatch": "*"} if match is None else {"IfMatch": match}
        for attempt in range(5):
            try:
                return self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, **cond)["ETag"]
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    return None
                if code not in ("ConditionalRequestConflict", "409") or attempt == 4:
                    raise explain_s3_error(path, e) from e
                time.sleep(0.2 * (attempt + 1))
            except Exception as e:
                raise explain_s3_error(path, e) from e
        return None

    def exists(self, path: str) -> bool:
        return self.head(path) is not None

    def size(self, path: str) -> int:
        h = self.head(path)
        if h is None:
            raise StorageError(f"{path}: no such object")
        return int(h["ContentLength"])

    def list_objects(self, path: str) -> list[dict]:
        """Every object under ``path`` (recursive): dicts with Key (relative to path), Size and ETag."""
        prefix = self._key(path).rstrip("/")
        prefix = f"{prefix}/" if prefix else ""
        out = []
        pages = self._call(path, self.client.get_paginator("list_objects_v2").paginate, Bucket=self.bucket,
                           Prefix=prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append({"Key": obj["Key"][len(prefix):], "Size": obj["Size"],
                                "ETag": obj.get("ETag", "").strip('"')})
        except Exception as e:
            raise explain_s3_error(path, e) from e
        return out

    def list_dirs(self, path: str) -> list[str]:
        prefix = self._key(path).rstrip("/")
        prefix = f"{prefix}/" if prefix else ""
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                               Delimiter="/"):
                out += [cp["Prefix"][len(prefix):].rstrip("/") for cp in page.get("CommonPrefixes", [])]
        except Exception as e:
            raise explain_s3_error(path, e) from e
        return sorted(out)

    def delete(self, path: str) -> None:
        """Remove the object ``path``; nothing when it is not there (S3's DeleteObject)."""
        self._call(path, self.client.delete_object, Bucket=self.bucket, Key=self._key(path))

    def delete_tree(self, path: str) -> None:
        keys = [self._key(path).rstrip("/") + "/" + o["Key"] for o in self.list_objects(path)]
        for i in range(0, len(keys), 1000):
            self._call(path, self.client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def check(self) -> None:
        """Fail fast, with one line, when the bucket cannot be reached or used."""
        self._call(self.root, self.client.head_bucket, Bucket=self.bucket)


def read_bytes(uri: str) -> bytes:
    """The bytes of one object or file, local or ``s3://``."""
    return open_storage(_parent(uri)).get_bytes(uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object or file atomically, local or ``s3://``."""
    open_storage(_parent(uri)).put_bytes(uri, data)


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def open_storage(root: str) -> LocalStorage | S3Storage:
    """The backend for ``root``: ``s3://...`` -> :class:`S3Storage`, anything else a local path."""
    if root.startswith("s3://"):
        return S3Storage(root)
    if "://" in root:
        raise StorageError(f"{root}: unsupported scheme {root.split('://', 1)[0]}://; use a local path or s3://")
    return LocalStorage(root)
