"""A throttling object store: staging and checkpoints through tests/faultproxy.py, a proxy in front of the real HTTP
S3 server (moto) that answers ``503 SlowDown`` and ``500 InternalError`` with S3's XML error bodies and cuts GET
bodies off mid-way (ranged GETs included).

- botocore's retry modes (standard, adaptive) retry SlowDown and InternalError themselves, but a body cut off is
  raised while the body is READ, outside botocore's retry loop: ``S3Storage.get_range`` (staging's reads) reads on
  from where the body stopped; ``get_bytes``/``download_file`` (s3transfer: a few immediate retries) are retried
  again with backoff;
- staging and a checkpoint's upload and download complete byte-exact while the proxy injects all three faults;
- a store that fails everything past the retry budget ends staging (exit 200, one line) and the checkpoint upload
  (a transient StorageError: exit 200 in training) within a bounded time; nothing half-written is committed.

Figures for docs/reliability.md: ``-s`` prints one ``throttling:`` line per scenario.
"""

from __future__ import annotations

import io
import os
import tarfile
import time

import boto3
import pytest
import torch

from dcv2_k8s import exitcodes
from dcv2_k8s.storage import StorageError
from tests.conftest import environ, run_cli
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.slow

RATES = {"slowdown": 0.1, "internal": 0.1, "truncate": 0.15}


def report(scenario: str, proxy: FaultProxy, seconds: float, **extra) -> None:
    c = proxy.counts
    print(f"\nthrottling: {scenario}: {c['requests']} requests, injected {c['SlowDown']} SlowDown + "
          f"{c['InternalError']} InternalError + {c['truncated']} cut bodies ({c['bytes_withheld']} bytes withheld) "
          f"in {seconds:.1f} s; " + ", ".join(f"{k} {v}" for k, v in extra.items()))


@pytest.fixture(scope="module")
def store():
    """(moto server, fault proxy in front of it, a boto3 client of the server itself); this process's S3 variables
    point at the proxy for the module's tests."""
    from dcv2_k8s.s3server import EmbeddedS3

    server = EmbeddedS3().start(["data", "ckpt"])
    proxy = FaultProxy(server.port, seed=7).start()
    direct = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    with environ(dict(server.env(), AWS_ENDPOINT_URL_S3=proxy.endpoint)):
        yield server, proxy, direct
    proxy.stop()
    server.stop()


@pytest.fixture
def proxy(store, monkeypatch):
    """The proxy, healed and its counts reset before and after each test."""
    _, p, _ = store
    monkeypatch.setenv("DCV2_S3_MAX_ATTEMPTS", "8")
    p.heal()
    p.reset_counts()
    yield p
    p.heal()
    p.schedule.clear()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _is_object_read(method: str, path: str) -> bool:
    return method == "GET" and "list-type" not in path


# ----------------------------------------------------------------------------------------------- botocore itself
@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_botocore_retries_errors_but_not_a_body_cut_off(store, proxy, monkeypatch, mode):
    """What botocore does on its own (why our reads retry): SlowDown and InternalError (the XML bodies the proxy
    sends) are retried by both retry modes, for GET, PUT and HEAD; a body cut off mid-way is not (it is raised while
    the body is read)."""
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    from dcv2_k8s.storage import s3_client

    monkeypatch.setenv("DCV2_S3_RETRY_MODE", mode)
    c = s3_client()
    c.put_object(Bucket="data", Key="thr/botocore.bin", Body=b"x" * 5000)
    for call in (lambda: c.get_object(Bucket="data", Key="thr/botocore.bin"),
                 lambda: c.put_object(Bucket="data", Key="thr/botocore2.bin", Body=b"y"),
                 lambda: c.head_object(Bucket="data", Key="thr/botocore.bin")):
        proxy.schedule[:] = ["SlowDown", "InternalError"]
        assert call()["ResponseMetadata"]["RetryAttempts"] == 2
    assert proxy.counts["SlowDown"] == proxy.counts["InternalError"] == 3
    proxy.schedule[:] = ["truncate"]
    body = c.get_object(Bucket="data", Key="thr/botocore.bin")["Body"]
    with pytest.raises((ResponseStreamingError, IncompleteReadError)):
        body.read()
    assert proxy.counts["truncated"] == 1


# ----------------------------------------------------------------------------------------------- staging
def _upload_dataset(direct, seed: int = 3) -> tuple[dict[str, bytes], bytes]:
    """An ImageFolder prefix (3 classes x 8 images) and a release archive of 4 per-class tars (5 images each,
    ~0.6 MB); returns (the folder's files by relative path, the archive)."""
    import random

    rng = random.Random(seed)
    folder = {f"c{c}/img{i}.jpg": rng.randbytes(rng.randint(4000, 20000)) for c in range(3) for i in range(8)}
    for rel, data in folder.items():
        direct.put_object(Bucket="data", Key=f"thr/folder/{rel}", Body=data)
    inner = {f"n{w:08d}.tar": _tar({f"n{w:08d}_{j}.JPEG": rng.randbytes(rng.randint(20000, 40000)) for j in range(5)})
             for w in range(4)}
    release = _tar(inner)
    direct.put_object(Bucket="data", Key="thr/release/release.tar", Body=release)
    return folder, release


def _archive_files(release: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(release)) as outer:
        for m in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                for im in inner.getmembers():
                    out[f"{m.name[:-4]}/{im.name}"] = inner.extractfile(im).read()
    return out


def test_staging_completes_byte_exact_through_a_throttling_store(store, proxy, tmp_path, monkeypatch):
    """Objects (one GET each) and an archive (ranged GETs of 32 KiB) staged while the proxy answers SlowDown
    and InternalError and cuts bodies off: every staged file equals its source byte for byte."""
    import dcv2_k8s.data.fetch as fetch
    from dcv2_k8s.data.layout import verify
    from dcv2_k8s.data.stage import stage

    _, _, direct = store
    folder, release = _upload_dataset(direct)
    monkeypatch.setattr(fetch, "CHUNK", 32 << 10)  # many ranged GETs of the archive
    proxy.set(**RATES)
    t0 = time.time()
    m1 = stage("s3://data/thr/folder", str(tmp_path / "folder"), workers=8, progress=False)
    m2 = stage("s3://data/thr/release/release.tar", str(tmp_path / "release"), workers=8, progress=False)
    seconds = time.time() - t0
    report("staging (24 objects + a 0.6 MB archive in 32 KiB ranges)", proxy, seconds, bytes_lost=0)
    expected = {**{("folder", k): v for k, v in folder.items()},
                **{("release", k): v for k, v in _archive_files(release).items()}}
    for (d, rel), data in expected.items():
        assert (tmp_path / d / rel).read_bytes() == data, rel
    assert m1["num_files"] == 24 and m2["num_files"] == 20
    assert verify(str(tmp_path / "folder")) == [] and verify(str(tmp_path / "release")) == []
    c = proxy.counts
    assert c["SlowDown"] > 0 and c["InternalError"] > 0 and c["truncated"] > 0, c


def test_staging_gives_up_with_one_line_and_exit_200(store, proxy, tmp_path, monkeypatch):
    """A store that fails every request for longer than the retry budget: ``dcv2 stage`` ends with one line and
    the retryable exit code, within seconds (DCV2_S3_MAX_ATTEMPTS=2); bodies cut off on every object read end the
    staging the same way (a transient StorageError: the resume state is kept, staging again resumes)."""
    from dcv2_k8s.data.layout import STATE
    from dcv2_k8s.data.stage import stage

    _, _, direct = store
    _upload_dataset(direct)
    proxy.fail_all("SlowDown", "InternalError")
    t0 = time.time()
    p = run_cli("stage", "s3://data/thr/folder", str(tmp_path / "cli"), timeout=120,
                env={"AWS_ENDPOINT_URL_S3": proxy.endpoint, "DCV2_S3_MAX_ATTEMPTS": "2"})
    seconds = time.time() - t0
    lines = p.stderr.strip().splitlines()
    assert p.returncode == exitcodes.RETRYABLE and len(lines) == 1, p.stderr
    assert lines[0].startswith("dcv2: error: s3://data/thr/folder") and "through every retry" in lines[0], lines[0]
    assert seconds < 30
    report("staging, every request failing (dcv2 stage, 2 attempts)", proxy, seconds, exit=p.returncode)

    proxy.fail_all("truncate", only=_is_object_read)  # listing works, every object read is cut off
    proxy.reset_counts()
    monkeypatch.setenv("DCV2_S3_MAX_ATTEMPTS", "2")
    t0 = time.time()
    with pytest.raises(StorageError) as e:
        stage("s3://data/thr/folder", str(tmp_path / "cut"), workers=4, progress=False)
    seconds = time.time() - t0
    assert e.value.transient and exitcodes.classify(e.value) == exitcodes.RETRYABLE, e.value
    assert "closed the connection in the middle of a response" in str(e.value) and "\n" not in str(e.value)
    assert seconds < 30 and (tmp_path / "cut" / STATE).exists()
    report("staging, every object read cut off (2 attempts)", proxy, seconds, error="transient")


# ----------------------------------------------------------------------------------------------- checkpoints
def _states(seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    main = {"model": {"w": torch.randn(3 * 2 ** 20, generator=g)}, "step": seed}  # 12 MiB: a multipart upload
    bank = {"emb": torch.randn(64, 1000, generator=g)}
    return main, bank


def test_checkpoint_upload_and_download_byte_exact_through_a_throttling_store(store, proxy, tmp_path):
    """CheckpointManager's upload (multipart and single PUTs) and commit, then its download, and the storage calls
    it is made of (put_bytes, upload_file, get_bytes, download_file, get_range), all byte-exact while the proxy
    injects the three faults."""
    from dcv2_k8s.checkpoint import CheckpointManager
    from dcv2_k8s.storage import S3Storage

    proxy.set(**RATES)
    t0 = time.time()
    mgr = CheckpointManager("s3://ckpt/thr", background=False, retry_seconds=60)
    main, bank = _states(1)
    mgr.save("step_000000001", main, bank, {"epoch": 0, "global_step": 1})
    latest = mgr.latest()
    assert latest["name"] == "step_000000001"
    got_main, got_bank = mgr.load_state(latest), mgr.load_bank(latest)
    assert torch.equal(got_main["model"]["w"], main["model"]["w"]) and got_main["step"] == 1
    assert torch.equal(got_bank["emb"], bank["emb"])

    s = S3Storage("s3://ckpt/thr")
    blob = os.urandom(12 * 2 ** 20 + 12345)
    local = tmp_path / "blob.bin"
    local.write_bytes(blob)
    s.upload_file(str(local), "s3://ckpt/thr/raw/up.bin")
    s.put_bytes("s3://ckpt/thr/raw/put.bin", blob)
    for path in ("s3://ckpt/thr/raw/up.bin", "s3://ckpt/thr/raw/put.bin"):
        assert s.get_bytes(path) == blob
        s.download_file(path, str(tmp_path / "down.bin"))
        assert (tmp_path / "down.bin").read_bytes() == blob
        assert s.get_range(path) == blob and s.get_range(path, 1000, 5 * 2 ** 20) == blob[1000:5 * 2 ** 20]
    seconds = time.time() - t0
    report("checkpoint save + load (12 MiB multipart) and storage round trips of 12 MiB", proxy, seconds,
           bytes_lost=0)
    c = proxy.counts
    assert c["SlowDown"] > 0 and c["InternalError"] > 0 and c["truncated"] > 0, c


def test_checkpoint_gives_up_retryable_within_its_budget(store, proxy, monkeypatch):
    """A store that fails everything past the budget (CHECKPOINT.UPLOAD_RETRY_SECONDS=3, 2 attempts per call):
    the save ends with one transient (exit 200) line within seconds and the previous checkpoint stays latest; the
    same when only reads fail (every body cut off: the commit reads the ranks' done markers), and for a load."""
    from dcv2_k8s.checkpoint import CheckpointManager

    monkeypatch.setenv("DCV2_S3_MAX_ATTEMPTS", "2")
    mgr = CheckpointManager("s3://ckpt/gone", retry_seconds=3)
    main, bank = _states(2)
    mgr.save("step_000000001", main, bank, {"epoch": 0, "global_step": 1})
    mgr.wait()
    for faults, only, what in ((("SlowDown", "InternalError"), None, "every request failing"),
                               (("truncate",), _is_object_read, "every object read cut off")):
        proxy.fail_all(*faults, only=only)
        proxy.reset_counts()
        t0 = time.time()
        mgr.save("step_000000002", main, bank, {"epoch": 0, "global_step": 2})
        with pytest.raises(StorageError) as e:
            mgr.wait()
        seconds = time.time() - t0
        report(f"checkpoint upload, {what} (retry budget 3 s, 2 attempts)", proxy, seconds, error="transient")
        assert e.value.transient and exitcodes.classify(e.value) == exitcodes.RETRYABLE, e.value
        assert "through every retry" in str(e.value) and "\n" not in str(e.value), e.value
        assert seconds < 30
        proxy.heal()
        assert mgr.latest()["name"] == "step_000000001"
    proxy.fail_all("truncate", only=_is_object_read)
    with pytest.raises(StorageError) as e:
        mgr.load_state({"name": "step_000000001"})
    assert e.value.transient and exitcodes.classify(e.value) == exitcodes.RETRYABLE, e.value
