"""Full disks lose nothing: staging (``dcv2 stage``) and checkpoints (a local ``CHECKPOINT.DIR``) on a filesystem
that is too small from the start or fills up on the way (another writer), each on a size-limited tmpfs made for
the test (mounted as root, unmounted and removed whatever happens; skipped where mounting is not permitted).

What each must show: one line naming the path, the space needed and the space available; exit 2 (a full disk is
not something a retry fixes: ``exitcodes.USAGE``); no partial file left or taken for a good one; the previous
checkpoint still ``latest`` and loadable; and, once space is freed, the same command completes and resumes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dcv2_k8s import exitcodes
from dcv2_k8s.checkpoint import CheckpointManager
from dcv2_k8s.data.layout import MARKER, STATE, verify
from dcv2_k8s.storage import DiskFull
from tests.conftest import run_cli, tiny_train_tokens

TIMES: dict[str, float] = {}  # seconds to recover after freeing space, by scenario (printed with -s)


class SmallFS:
    """A tmpfs at ``path``: ``mount(kib)`` mounts it, or resizes it keeping its files (a bigger volume); ``fill``
    takes all but ``leave`` bytes of it (another writer), ``free`` gives them back."""

    def __init__(self, path: Path):
        self.path, self.mounted = path, False

    def mount(self, kib: int) -> None:
        opts = f"size={kib}k" if not self.mounted else f"remount,size={kib}k"
        try:
            p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)], capture_output=True,
                               text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if p.returncode != 0:
            if not self.mounted:
                pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
            raise RuntimeError(p.stderr)
        self.mounted = True

    def available(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        with open(self.path / "filler", "ab") as f:
            while self.available() > leave:
                try:
                    f.write(b"\0" * min(65536, self.available() - leave))
                    f.flush()
                except OSError:
                    break

    def free(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted and subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        self.mounted = False


@pytest.fixture
def small_fs():
    fs = SmallFS(Path(tempfile.mkdtemp(prefix="dcv2-fullfs-")))
    try:
        yield fs
    finally:
        fs.unmount()
        shutil.rmtree(fs.path, ignore_errors=True)


def _leftovers(root: Path) -> list[str]:
    """Partial files of any kind: staging's ``.NAME.part`` and ``*.tmp``, the storage layer's ``.tmp-*``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith((".part", ".tmp")) or p.name.startswith(".tmp-"))


def _one_error_line(stderr: str, *parts: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("dcv2: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------------------ staging
@pytest.fixture
def src(tmp_path) -> Path:
    """3 classes x 6 images of 20,000 random bytes (360 kB; 368 KiB on a 4 KiB-page tmpfs)."""
    root = tmp_path / "src"
    for c in "abc":
        (root / c).mkdir(parents=True)
        for i in range(6):
            (root / c / f"{i}.jpg").write_bytes(os.urandom(20000))
    return root


def _same_as_source(src: Path, dest: Path) -> list[str]:
    """Files under DEST's class folders whose bytes differ from the source's (a partial file taken for good)."""
    bad = []
    for p in dest.rglob("*"):
        rel = p.relative_to(dest)
        if p.is_file() and len(rel.parts) == 2 and not rel.parts[-1].startswith("."):
            if p.read_bytes() != (src / rel).read_bytes():
                bad.append(str(rel))
    return bad


def test_stage_into_a_too_small_dest_is_refused_up_front_then_completes(small_fs, src):
    """Not enough room for the listing's bytes: refused before anything is written (DEST as it was: absent), one
    line with DEST, the bytes needed and available, exit 2; a bigger volume (the same tmpfs, remounted) and the
    same command completes."""
    small_fs.mount(200)
    dest = small_fs.path / "d"
    p = run_cli("stage", str(src), str(dest), "--workers", "2", timeout=120)
    assert p.returncode == exitcodes.USAGE, p.stderr
    _one_error_line(p.stderr, str(dest), "not enough space", "needs 376.8 kB more", "204.8 kB available")
    assert not dest.exists() and list(small_fs.path.iterdir()) == []
    small_fs.mount(600)
    t0 = time.time()
    p = run_cli("stage", str(src), str(dest), "--workers", "2", timeout=120)
    TIMES["staging, too small"] = time.time() - t0
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["num_files"] == 18 and verify(str(dest)) == [] and _same_as_source(src, dest) == []


def test_stage_dest_filling_up_midway_keeps_what_was_staged_and_resumes(small_fs, src, monkeypatch, capsys):
    """Another writer fills DEST's disk after 5 of 18 images: one line, exit 2; no partial file, every file the
    resume state records is whole, no marker; once the other writer's file is deleted the same command resumes
    (the 5 images are not fetched again) and the result is the source, byte for byte."""
    import dcv2_k8s.data.layout as L
    from dcv2_k8s.cli import main

    small_fs.mount(1024)
    dest = small_fs.path / "d"
    real, written = L.write_file, []

    def another_writer_fills_the_disk(d, rel, data):
        if len(written) == 5:
            small_fs.fill(leave=8192)  # the next image is cut off after 8 KiB
        out = real(d, rel, data)
        written.append(rel)
        return out

    monkeypatch.setattr(L, "write_file", another_writer_fills_the_disk)
    code = main(["stage", str(src), str(dest), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == exitcodes.USAGE, err
    _one_error_line(err, str(dest), "no space left on the device after staging 5 of 18 objects",
                    "the rest needs about 260.0 kB", "available", "run the same command again: it resumes")
    assert _leftovers(dest) == [] and not (dest / MARKER).exists()
    state = json.loads((dest / STATE).read_text())
    assert len(state["files"]) == 5  # saved after the failure: what is whole, nothing else
    for rel, (size, md5, _) in state["files"].items():
        assert hashlib.md5((dest / rel).read_bytes()).hexdigest() == md5 and (dest / rel).stat().st_size == size
    assert _same_as_source(src, dest) == []
    before = {rel: (dest / rel).stat().st_mtime_ns for rel in written}

    monkeypatch.setattr(L, "write_file", real)
    small_fs.free()
    t0 = time.time()
    code = main(["stage", str(src), str(dest), "--workers", "1"])
    TIMES["staging, filled midway"] = time.time() - t0
    out = capsys.readouterr()
    assert code == 0, out.err
    m = json.loads(out.out)
    assert m["skipped"] == 5 and m["transferred"] == 13 and m["num_files"] == 18, m
    assert verify(str(dest)) == [] and _same_as_source(src, dest) == [] and _leftovers(dest) == []
    assert {rel: (dest / rel).stat().st_mtime_ns for rel in before} == before  # resumed, not fetched again


# ------------------------------------------------------------------------------------------------ checkpoints
def _save(m: CheckpointManager, step: int, size: int = 50_000) -> None:
    m.save(CheckpointManager.name_for(step), {"model": {"w": torch.full((size,), float(step))}},
           {"bank": {"ptr": step}}, {"epoch": step, "global_step": step, "epoch_end": True})
    m.wait()


def _loads(root: Path) -> int:
    """The step of the checkpoint ``latest`` gives a resumed run, read as a run reads it."""
    m = CheckpointManager(str(root))
    latest = m.latest()
    return int(m.load_state(latest)["model"]["w"][0].item())


@pytest.mark.parametrize("fills_before", ["state.pt", "manifest.json", "latest.json"])
def test_checkpoint_disk_filling_during_a_commit_keeps_the_previous_one(small_fs, fills_before):
    """Another writer fills CHECKPOINT.DIR's disk while a background save writes a part (cut off midway), the
    manifest or latest.json: the save raises DiskFull (one line: the checkpoint, the bytes needed and available,
    which checkpoint stays the newest), classified exit 2; latest.json still names the previous checkpoint and
    it loads; the failed checkpoint's files and every temporary file are gone; with the space back the same save
    commits."""
    small_fs.mount(2048)
    root = small_fs.path / "ckpt"
    m = CheckpointManager(str(root), background=True)
    _save(m, 10)
    real = m.store.put_bytes

    def put_bytes(path, data):
        if os.path.basename(path) == fills_before and not (small_fs.path / "filler").exists():
            small_fs.fill(leave=8192 if fills_before == "state.pt" else 0)
        real(path, data)

    m.store.put_bytes = put_bytes
    with pytest.raises(DiskFull) as info:
        _save(m, 20)
    line = str(info.value)
    assert "\n" not in line and exitcodes.classify(info.value) == exitcodes.USAGE
    for part in (str(root / "step_000000020"), "no space left on the device", "needs 221.2 kB", "available",
                 "step_000000010 stays the newest checkpoint", "config.CHECKPOINT.DIR"):
        assert part in line, (part, line)
    assert json.loads((root / "latest.json").read_text())["name"] == "step_000000010"
    assert _loads(root) == 10 and [c["name"] for c in m.committed()] == ["step_000000010"]
    assert not (root / "step_000000020").exists() and _leftovers(small_fs.path) == []

    small_fs.free()
    m.store.put_bytes = real
    t0 = time.time()
    _save(m, 20)
    TIMES[f"checkpoint, filled before {fills_before}"] = time.time() - t0
    assert _loads(root) == 20 and _leftovers(small_fs.path) == []


def test_checkpoint_too_big_for_the_disk_is_refused_before_writing(small_fs):
    """No room for the checkpoint at all: refused by ``save`` (the training thread) before a byte is written (no
    step directory); the line says that no checkpoint was committed yet."""
    small_fs.mount(128)
    root = small_fs.path / "ckpt"
    m = CheckpointManager(str(root), background=True)
    with pytest.raises(DiskFull, match=r"needs 221\.2 kB, 127\.0 kB available .*; it was not written and no "
                       "checkpoint was committed yet"):
        m.save(CheckpointManager.name_for(10), {"model": {"w": torch.zeros(50_000)}}, {"bank": {"ptr": 10}},
               {"epoch": 10, "global_step": 10})  # save() itself, not the next save or wait: no interval later
    assert not (root / "step_000000010").exists() and _leftovers(small_fs.path) == []
    small_fs.mount(512)
    _save(m, 10)
    assert _loads(root) == 10


def test_event_log_on_a_full_disk_drops_whole_lines_and_goes_on(small_fs):
    """metrics.jsonl on a full disk: no exception (the run goes on to its checkpoint, which says what is needed),
    no half line; lines are recorded again once there is room."""
    from dcv2_k8s.events import EventLog

    small_fs.mount(64)
    log = EventLog(str(small_fs.path), None, True)
    log.emit("step", n=1)
    small_fs.fill(leave=0)
    room = 4096 - (small_fs.path / "metrics.jsonl").stat().st_size  # the rest of the file's last page
    log.emit("step", n=2, pad="x" * room)  # does not fit: dropped whole
    small_fs.free()
    log.emit("step", n=3)
    lines = (small_fs.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 3]


@pytest.mark.slow
def test_training_run_whose_checkpoint_disk_is_full_stops_cleanly_and_resumes(small_fs, synth_data):
    """A real tiny run (one process, 2 epochs of 15 steps, a 5.9 MB checkpoint each epoch) on a 9 MiB
    CHECKPOINT.DIR: the first checkpoint commits, the second does not fit. The run exits 2 with one line (no
    traceback) from the background checkpoint thread; latest.json names the first checkpoint and it loads; no
    partial file. With the volume grown, the same command resumes from it and commits the second."""
    small_fs.mount(9 * 1024)
    ckpt = small_fs.path / "ckpt"
    tokens = tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=2",
                               "config.DISTRIBUTED.NUM_PROC_PER_NODE=1")
    p = run_cli("train", *tokens, timeout=300)
    assert p.returncode == exitcodes.USAGE, p.stderr[-3000:]
    _one_error_line(p.stderr, str(ckpt / "step_000000030"), "no space left on the device", "MB available",
                    "step_000000015 stays the newest checkpoint")
    assert json.loads((ckpt / "latest.json").read_text())["name"] == "step_000000015"
    assert CheckpointManager(str(ckpt)).latest()["global_step"] == 15
    assert not (ckpt / "step_000000030").exists() and _leftovers(ckpt) == []

    small_fs.mount(20 * 1024)
    t0 = time.time()
    p = run_cli("train", *tokens, timeout=300)
    TIMES["training run, checkpoint too big"] = time.time() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    starts = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if '"run_start"' in line]
    assert starts[-1]["checkpoint"] == "step_000000015" and starts[-1]["attempt"] == 2
    assert CheckpointManager(str(ckpt)).latest()["global_step"] == 30 and _leftovers(ckpt) == []


def teardown_module(module):
    for name, seconds in TIMES.items():
        print(f"\nrecovery after freeing space, {name}: {seconds:.2f} s")
