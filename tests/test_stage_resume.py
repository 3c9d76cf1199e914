"""Resuming, repairing and coordinating a staging: what a staged directory keeps between runs (the resume state,
the manifest), what staging again fetches, the progress it reports, and the other processes of a node waiting for
local rank 0's staging. Sources: a local directory (no S3) and a real HTTP S3 endpoint on 127.0.0.1 (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dcv2_k8s.data.layout import MANIFEST, MARKER, STATE, verify
from dcv2_k8s.data.stage import StageOptions, ensure_local, stage
from tests.test_stage_layouts import _tar
from tests.test_storage import _client


def test_local_release_resumes_after_a_failure_and_repairs_one_inner_tar(tmp_path, monkeypatch):
    """A local ILSVRC-style release (a tar of per-class tars), read through the storage interface as an S3 object
    is: a failure after two inner tars keeps them (state with byte spans) and staging again goes on from the third;
    a damaged file is fetched again by re-reading only its inner tar; the release given by a relative path."""
    import dcv2_k8s.data.layout as L

    wnids = [f"n{i:08d}" for i in range(5)]
    inner = {f"{w}.tar": _tar({f"{w}_{j}.JPEG": os.urandom(2000 + j) for j in range(3)}) for w in wnids}
    src = tmp_path / "src"
    src.mkdir()
    (src / "release.tar").write_bytes(_tar(inner))
    dest = tmp_path / "d"
    real, calls = L.StageState.member_done, []

    def fail_after_two(self, *a, **kw):
        real(self, *a, **kw)
        calls.append(a[1])
        if len(calls) == 2:
            raise OSError("disk went away")

    monkeypatch.chdir(src)
    monkeypatch.setattr(L.StageState, "member_done", fail_after_two)
    with pytest.raises(OSError, match="disk went away"):
        stage("release.tar", str(dest), StageOptions(workers=2, progress=False))
    monkeypatch.setattr(L.StageState, "member_done", real)
    state = json.loads((dest / STATE).read_text())
    assert len(state["partial"]["release.tar"]) == 2 and not (dest / MARKER).exists()
    first = dest / wnids[0] / f"{wnids[0]}_0.JPEG"
    before = first.stat().st_mtime_ns
    m = stage("release.tar", str(dest), StageOptions(workers=2, progress=False))
    assert m["num_files"] == 15 and m["classes"] == {w: 3 for w in wnids} and verify(str(dest)) == []
    assert first.stat().st_mtime_ns == before and not (dest / STATE).exists() and (dest / MARKER).exists()
    victim = dest / wnids[3] / f"{wnids[3]}_1.JPEG"
    victim.write_bytes(b"x" * victim.stat().st_size)
    assert verify(str(dest)) == [f"content differs (MD5): {wnids[3]}/{wnids[3]}_1.JPEG"]
    m2 = stage("release.tar", str(dest), progress=False, workers=2)
    assert m2["repaired"] == 1 and m2["transferred"] == 0 and verify(str(dest)) == []
    assert first.stat().st_mtime_ns == before  # the other inner tars were not extracted again


def test_other_local_ranks_wait_for_the_staging_marker(tmp_path):
    import threading
    import time

    from dcv2_k8s.storage import StorageError

    dest = tmp_path / "staged"
    uri = "s3://bucket/imagenet/train"

    def rank0_finishes():
        time.sleep(1.0)
        dest.mkdir()
        (dest / MANIFEST).write_text(json.dumps({"source": uri, "files": []}))
        (dest / MARKER).write_text("{}")

    threading.Thread(target=rank0_finishes).start()
    t0 = time.time()
    assert ensure_local(uri, str(dest), local_rank=1, timeout=30) == str(dest)
    assert 0.9 < time.time() - t0 < 10
    with pytest.raises(StorageError, match="did not finish within 1 s"):
        ensure_local(uri, str(tmp_path / "never"), local_rank=1, timeout=1)
    assert ensure_local("/local/dir", "", local_rank=1) == "/local/dir"  # local paths are used as they are


def _upload_folder(s3, local: Path, prefix: str) -> int:
    c = _client(s3)
    n = 0
    for p in sorted(local.rglob("*.jpg")):
        c.upload_file(str(p), "data", f"{prefix}/{p.relative_to(local)}")
        n += 1
    return n



@pytest.mark.slow
def test_stage_image_folder_then_resume(s3, synth_data, tmp_path):
    n = _upload_folder(s3, synth_data / "train", "folder")
    dest = tmp_path / "staged"
    m = stage("s3://data/folder", str(dest), workers=8, progress=False)
    assert m["num_files"] == n == 240 and len(m["classes"]) == 10 and m["transferred"] == n
    assert verify(str(dest)) == []
    # an interruption: some files missing, one truncated, one leftover partial download
    files = sorted(dest.rglob("*.jpg"))
    for p in files[:30]:
        p.unlink()
    files[40].write_bytes(files[40].read_bytes()[:100])
    (files[41].parent / ".x.jpg.part").write_bytes(b"junk")
    problems = verify(str(dest))
    assert len(problems) == 31 and any("size differs" in p for p in problems)
    m2 = stage("s3://data/folder", str(dest), workers=8, progress=False)
    assert m2["transferred"] == 31 and m2["skipped"] == n - 31 and verify(str(dest)) == []
    # the staged manifest fixes the dataset's file list; a directory that no longer matches it is an error naming
    # both (not a silent change of sample indices), and staging again brings them back in line
    from dcv2_k8s.data.dataset import IndexedImageFolder, ManifestMismatch

    assert len(IndexedImageFolder(dest)) == n
    (dest / "c00_stripes" / "late_arrival.jpg").write_bytes(files[0].read_bytes())
    with pytest.raises(ManifestMismatch, match="late_arrival.jpg"):
        IndexedImageFolder(dest)
    m3 = stage("s3://data/folder", str(dest), workers=8, progress=False)
    assert m3["removed"] == 1 and len(IndexedImageFolder(dest)) == n



@pytest.mark.slow
def test_stage_progress_metrics(s3, synth_data, tmp_path):
    import urllib.request

    from dcv2_k8s.distributed import free_port
    from dcv2_k8s.metrics import StageMetrics

    _upload_folder(s3, synth_data / "val", "metrics-src")
    port = free_port()
    sm = StageMetrics("s3://data/metrics-src", port, "127.0.0.1")
    try:
        stage("s3://data/metrics-src", str(tmp_path / "m"), progress=False, on_event=sm)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        sm.close()
    values = {l.split("{")[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("dcv2_stage")}
    assert values["dcv2_stage_files_done"] == 60 and values["dcv2_stage_complete"] == 1
    assert values["dcv2_stage_bytes_done"] == values["dcv2_stage_bytes_total"] > 0

