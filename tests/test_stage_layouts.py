"""``dcv2 stage`` on the layouts ImageNet is kept in, built here in miniature (generated JPEGs, a generated
ILSVRC 2012 devkit with its meta.mat and ground truth, a LOC_val_solution.csv, WebDataset shards) and staged from
a real HTTP S3 endpoint on 127.0.0.1: the staged tree and its labels, the refusals, interruption, integrity and
repair."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import numpy as np
import pytest

from dcv2_k8s.data.archive import UnsafeArchive
from dcv2_k8s.data.dataset import ManifestMismatch, scan_image_folder
from dcv2_k8s.data.layout import MANIFEST, MARKER, StageError, verify
from dcv2_k8s.data.stage import stage
from tests.conftest import ROOT, child_env, run_cli

pytestmark = pytest.mark.slow

WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="module")
def jpegs(synth_data) -> list[bytes]:
    return [p.read_bytes() for p in sorted((synth_data / "train").rglob("*.jpg"))[:60]]


def _put(s3, key: str, body: bytes) -> None:
    boto3.client("s3", endpoint_url=s3.endpoint).put_object(Bucket="data", Key=key, Body=body)


def _tar(members: dict[str, bytes], gz: bool = False, links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _tree(dest: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in sorted(dest.rglob("*")):
        rel = p.relative_to(dest)
        if p.is_file() and not any(x.startswith(".") for x in rel.parts):
            out.setdefault(rel.parts[0], []).append(rel.parts[-1])
    return out


def _devkit(gt_ids: list[int]) -> bytes:
    """A miniature ILSVRC2012_devkit_t12.tar.gz: data/meta.mat (synsets: ILSVRC2012_ID, WNID, num_children, ...)
    and data/ILSVRC2012_validation_ground_truth.txt."""
    from scipy.io import savemat

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
          ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(i + 1, w, f"class {w}", "", 0, np.zeros((0,)), 0, 4) for i, w in enumerate(WNIDS)]
    rows.append((1001, "n00001740", "entity", "", 3, np.array([1, 2, 3]), 18, 0))  # an inner node: skipped
    synsets = np.array(rows, dtype=dt).reshape(-1, 1)
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    gt = "".join(f"{i}\n" for i in gt_ids).encode()
    return _tar({"ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
                 "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": gt}, gz=True)


def test_ilsvrc_train_release_nested_tars_then_verify_repair_and_strays(s3, jpegs, tmp_path):
    """One object holding one tar per class (the original ILSVRC2012_img_train.tar), given as a single-object
    URI: streamed, nested tars extracted into class folders. Same-size corruption is found by --verify and
    repaired by staging again, which re-reads only the inner tar concerned; a file the source does not have is
    removed."""
    inner = {f"{w}.tar": _tar({f"{w}_{i}.JPEG": jpegs[c * 4 + i] for i in range(4)}) for c, w in enumerate(WNIDS)}
    _put(s3, "ilsvrc/ILSVRC2012_img_train.tar", _tar(inner))
    dest = tmp_path / "train"
    m = stage("s3://data/ilsvrc/ILSVRC2012_img_train.tar", str(dest), workers=4, progress=False)
    assert _tree(dest) == {w: sorted(f"{w}_{i}.JPEG" for i in range(4)) for w in WNIDS}
    assert m["num_files"] == 12 and m["classes"] == {w: 4 for w in WNIDS} and (dest / MARKER).exists()
    assert set(m["objects"]["ILSVRC2012_img_train.tar"]["members"]) == set(inner)
    assert not list(dest.rglob("*.tar")) and verify(str(dest)) == []
    victim = dest / WNIDS[1] / f"{WNIDS[1]}_2.JPEG"
    data = bytearray(victim.read_bytes())
    data[100:110] = bytes(10)  # same size, other bytes
    victim.write_bytes(bytes(data))
    (dest / WNIDS[0] / "stray.JPEG").write_bytes(jpegs[0])
    problems = verify(str(dest))
    assert f"content differs (MD5): {WNIDS[1]}/{WNIDS[1]}_2.JPEG" in problems
    assert f"not in the manifest: {WNIDS[0]}/stray.JPEG" in problems
    m2 = stage("s3://data/ilsvrc/ILSVRC2012_img_train.tar", str(dest), workers=4, progress=False)
    assert m2["repaired"] == 1 and m2["transferred"] == 0 and m2["removed"] == 1
    assert verify(str(dest)) == [] and victim.read_bytes() == jpegs[4 + 2]


def test_interrupted_release_resumes_at_the_next_inner_tar(s3, jpegs, tmp_path, monkeypatch):
    """SIGINT while the train release streams: the inner tars finished so far are kept with their byte spans, and
    staging again reads the archive from the first unfinished inner tar (finished files are not written again)."""
    import dcv2_k8s.data.layout as L
    import dcv2_k8s.data.stage as S

    wnids = [f"n{i:08d}" for i in range(30)]
    inner = {f"{w}.tar": _tar({f"{w}_{j}.JPEG": jpegs[(i + j) % len(jpegs)] * 20 for j in range(3)})
             for i, w in enumerate(wnids)}
    _put(s3, "resume/ILSVRC2012_img_train.tar", _tar(inner))
    dest = tmp_path / "r"
    real = L.StageState.member_done
    calls = []

    def interrupt_after_two(self, *a, **kw):
        real(self, *a, **kw)
        calls.append(a[1])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C would: the handler cancels, the stream stops

    monkeypatch.setattr(L.StageState, "member_done", interrupt_after_two)
    with pytest.raises(S.Interrupted):
        stage("s3://data/resume/ILSVRC2012_img_train.tar", str(dest), workers=2, progress=False)
    monkeypatch.setattr(L.StageState, "member_done", real)
    state = json.loads((dest / ".dcv2_stage_state.json").read_text())
    done = state["partial"]["ILSVRC2012_img_train.tar"]
    assert 2 <= len(done) < 30 and not (dest / MARKER).exists()
    first = dest / wnids[0] / f"{wnids[0]}_0.JPEG"
    before = first.stat().st_mtime_ns
    m = stage("s3://data/resume/ILSVRC2012_img_train.tar", str(dest), workers=2, progress=False)
    assert m["num_files"] == 90 and verify(str(dest)) == [] and first.stat().st_mtime_ns == before


@pytest.mark.parametrize("labels_kind", ["devkit", "loc_csv", "image_class_csv"])
def test_flat_validation_archive_labelled(s3, jpegs, tmp_path, labels_kind):
    """ILSVRC2012_img_val.tar holds flat ILSVRC2012_val_NNNNNNNN.JPEG files; their classes come from the devkit
    (ground-truth IDs mapped to WordNet IDs by meta.mat), from LOC_val_solution.csv, or from an IMAGE,CLASS file."""
    truth = [1, 2, 3, 1, 2, 3, 3, 1, 2]  # ILSVRC2012_ID of val image i
    _put(s3, "val/ILSVRC2012_img_val.tar", _tar({f"ILSVRC2012_val_{i:08d}.JPEG": jpegs[i] for i in range(1, 10)}))
    if labels_kind == "devkit":
        _put(s3, "meta/ILSVRC2012_devkit_t12.tar.gz", _devkit(truth))
        labels = "s3://data/meta/ILSVRC2012_devkit_t12.tar.gz"
    elif labels_kind == "loc_csv":
        labels = str(tmp_path / "LOC_val_solution.csv")
        with open(labels, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for i, t in enumerate(truth, start=1):
                w.writerow([f"ILSVRC2012_val_{i:08d}", f"{WNIDS[t - 1]} 10 20 30 40 {WNIDS[t - 1]} 1 2 3 4"])
    else:
        labels = str(tmp_path / "labels.csv")
        Path(labels).write_text("image,class\n" + "".join(f"ILSVRC2012_val_{i:08d}.JPEG,{WNIDS[t - 1]}\n"
                                                          for i, t in enumerate(truth, start=1)))
    dest = tmp_path / "val"
    m = stage("s3://data/val/ILSVRC2012_img_val.tar", str(dest), progress=False, labels=labels)
    tree = _tree(dest)
    for i, t in enumerate(truth, start=1):
        assert f"ILSVRC2012_val_{i:08d}.JPEG" in tree[WNIDS[t - 1]]
    assert m["classes"] == {WNIDS[0]: 3, WNIDS[1]: 3, WNIDS[2]: 3} and m["labels"] == labels


def test_flat_prefix_kaggle_layout_and_refusal_without_labels(s3, jpegs, tmp_path):
    """The Kaggle copy keeps validation images flat under CLS-LOC/val/: without labels the staging is refused
    with one line (nothing written); with LOC_val_solution.csv from S3 each image lands in its class."""
    for i in range(1, 7):
        _put(s3, f"kaggle/ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_{i:08d}.JPEG", jpegs[i])
    rows = "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_{i:08d},{WNIDS[i % 3]} 1 2 3 4\n"
                                                   for i in range(1, 7))
    _put(s3, "kaggle/LOC_val_solution.csv", rows.encode())
    dest = tmp_path / "kval"
    with pytest.raises(StageError, match="without class folders.*--labels"):
        stage("s3://data/kaggle/ILSVRC/Data/CLS-LOC/val", str(dest), progress=False)
    assert not dest.exists()
    stage("s3://data/kaggle/ILSVRC/Data/CLS-LOC/val", str(dest), progress=False,
          labels="s3://data/kaggle/LOC_val_solution.csv")
    assert {c: len(v) for c, v in _tree(dest).items()} == {w: 2 for w in WNIDS}
    # the dataset root (train/ and val/ side by side) is refused instead of becoming classes "train" and "val"
    _put(s3, "kaggle/ILSVRC/Data/CLS-LOC/train/n01440764/a.JPEG", jpegs[0])
    with pytest.raises(StageError, match=r"splits \(train, val\).*stage each split"):
        stage("s3://data/kaggle/ILSVRC/Data/CLS-LOC", str(tmp_path / "root"), progress=False)


@pytest.mark.parametrize("names", [False, True])
def test_webdataset_shards(s3, jpegs, tmp_path, names):
    """WebDataset shards: KEY.jpg + KEY.cls (the integer label); classes are named from a class-name list (line i
    = label i) or by the zero-padded label; no .cls file is left in the staged tree."""
    for s in range(2):
        members = {}
        for i in range(6):
            key = f"sample{s:02d}{i:03d}"
            sample = {f"{key}.jpg": jpegs[s * 6 + i], f"{key}.cls": str((s * 6 + i) % 3).encode(),
                      f"{key}.json": b'{"source": "generated"}'}
            # the first shard in webdataset's TarWriter order (sorted: .cls, .jpg, .json), the second image first
            members.update(dict(sorted(sample.items())) if s == 0 else sample)
        _put(s3, f"wds/shard-{s:06d}.tar", _tar(members))
    kw = {}
    if names:
        (tmp_path / "names.txt").write_text("\n".join(WNIDS) + "\n")
        kw["class_names"] = str(tmp_path / "names.txt")
    dest = tmp_path / "wds"
    m = stage("s3://data/wds", str(dest), progress=False, **kw)
    expect = WNIDS if names else ["00000", "00001", "00002"]
    assert sorted(m["classes"]) == expect and all(v == 4 for v in m["classes"].values())
    assert not list(dest.rglob("*.cls")) and not [p for p in dest.rglob("*.json") if not p.name.startswith(".")]
    assert "sample00000.jpg" in _tree(dest)[expect[0]] and "sample01003.jpg" in _tree(dest)[expect[0]]


def test_gzipped_per_class_tars_and_image_folder_objects(s3, jpegs, tmp_path):
    for c, w in enumerate(WNIDS):
        _put(s3, f"tgz/{w}.tar.gz", _tar({f"{w}_{i}.JPEG": jpegs[c * 3 + i] for i in range(3)}, gz=True))
        for i in range(2):
            _put(s3, f"lay-folder/{w}/{w}_{i}.JPEG", jpegs[c * 2 + i])
    m = stage("s3://data/tgz", str(tmp_path / "tgz"), progress=False)
    assert m["classes"] == {w: 3 for w in WNIDS}
    m = stage("s3://data/lay-folder", str(tmp_path / "folder"), progress=False)
    assert m["classes"] == {w: 2 for w in WNIDS}
    # staging again fetches nothing and keeps nothing the source lacks (a stray local file is not adopted)
    (tmp_path / "folder" / WNIDS[0] / "local_only.JPEG").write_bytes(jpegs[0])
    m2 = stage("s3://data/lay-folder", str(tmp_path / "folder"), progress=False)
    assert m2["transferred"] == 0 and m2["removed"] == 1 and m2["num_files"] == 6


def test_stage_tar_archives(s3, synth_data, tmp_path):
    imgs = sorted((synth_data / "train").rglob("*.jpg"))
    # ImageNet style: one flat tar per class, named after the class
    _put(s3, "tars/n0001.tar", _tar({f"a{i}.JPEG": imgs[i].read_bytes() for i in range(5)}))
    # a shard with CLASS/IMAGE members
    _put(s3, "tars/shard-000.tar", _tar({f"n0002/b{i}.JPEG": imgs[10 + i].read_bytes() for i in range(4)}))
    dest = tmp_path / "t"
    m = stage("s3://data/tars", str(dest), progress=False)
    assert m["classes"] == {"n0001": 5, "n0002": 4}
    m2 = stage("s3://data/tars", str(dest), progress=False)
    assert m2["transferred"] == 0 and m2["skipped"] == 2


@pytest.mark.parametrize("bad", ["../escape.JPEG", "/abs/path.JPEG", "link"])
def test_unsafe_archives_are_refused(s3, tmp_path, bad):
    members = {"ok/a.JPEG": b"x"}
    links = None
    if bad == "link":
        links = {"ok/link.JPEG": "/etc/passwd"}
    else:
        members[bad] = b"evil"
    key = f"evil-{abs(hash(bad))}/x.tar"  # one archive per case (moto's objects outlive a server in one process)
    _put(s3, key, _tar(members, links=links))
    dest = tmp_path / "e"
    with pytest.raises(UnsafeArchive, match="refusing the archive"):
        stage(f"s3://data/{key}".rsplit("/", 1)[0], str(dest), progress=False)
    assert not (tmp_path / "escape.JPEG").exists() and not Path("/abs/path.JPEG").exists()
    assert not (dest / "ok").exists()  # nothing of the archive was extracted


def test_refusals_leave_no_completion_marker(s3, jpegs, tmp_path):
    # one class only (a flat validation set put into a single folder)
    for i in range(3):
        _put(s3, f"oneclass/all/{i}.JPEG", jpegs[i])
    with pytest.raises(StageError, match="one class"):
        stage("s3://data/oneclass", str(tmp_path / "one"), progress=False)
    assert not (tmp_path / "one" / MARKER).exists()
    # a single flat archive without labels
    _put(s3, "single/val.tar", _tar({f"{i}.JPEG": jpegs[i] for i in range(3)}))
    with pytest.raises(StageError, match="no class folder; pass --labels"):
        stage("s3://data/single/val.tar", str(tmp_path / "single"), progress=False)
    assert not (tmp_path / "single" / MARKER).exists()
    # nothing there
    with pytest.raises(StageError, match="no objects under this prefix and no object of this name"):
        stage("s3://data/does-not-exist.tar", str(tmp_path / "none"), progress=False)
    with pytest.raises(StageError, match="no such file or directory"):
        stage(str(tmp_path / "no-such-dir"), str(tmp_path / "none2"), progress=False)
    assert not (tmp_path / "none").exists() and not (tmp_path / "none2").exists()


def test_dest_holding_another_source_is_refused_unless_replaced(s3, jpegs, tmp_path):
    for c, w in enumerate(WNIDS):
        _put(s3, f"a/{w}/x.JPEG", jpegs[c])
        _put(s3, f"b/{w}/y.JPEG", jpegs[c + 3])
    dest = tmp_path / "d"
    stage("s3://data/a", str(dest), progress=False)
    with pytest.raises(StageError, match="holds a copy of s3://data/a.*--replace"):
        stage("s3://data/b", str(dest), progress=False)
    m = stage("s3://data/b", str(dest), progress=False, replace=True)
    assert _tree(dest) == {w: ["y.JPEG"] for w in WNIDS} and m["source"] == "s3://data/b"


def test_manifest_that_disagrees_with_the_directory_is_an_error(s3, jpegs, tmp_path):
    for c, w in enumerate(WNIDS):
        _put(s3, f"mm/{w}/x.JPEG", jpegs[c])
    dest = tmp_path / "mm"
    stage("s3://data/mm", str(dest), progress=False)
    assert len(scan_image_folder(dest)[1]) == 3
    (dest / WNIDS[0] / "x.JPEG").rename(dest / WNIDS[1] / "moved.JPEG")
    with pytest.raises(ManifestMismatch) as e:
        scan_image_folder(dest)
    text = str(e.value)
    assert MANIFEST in text and f"{WNIDS[0]}/x.JPEG" in text and f"{WNIDS[1]}/moved.JPEG" in text
    assert "\n" not in text and "dcv2 stage" in text


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "dcv2_k8s", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(ROOT), env=child_env(), **kw)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_one_signal_stops_staging_within_seconds_and_it_resumes(s3, jpegs, tmp_path, sig, code):
    """One Ctrl-C (or SIGTERM) cancels the queued transfers: exit 130 (143) within a few seconds, one line, no
    traceback; the same command then completes the staging. Outside a terminal a progress line is logged every
    --log-every seconds (kubectl logs of the staging init container)."""
    c = boto3.client("s3", endpoint_url=s3.endpoint)
    prefix = f"many{code}"
    for i in range(900):
        c.put_object(Bucket="data", Key=f"{prefix}/{WNIDS[i % 3]}/{i:04d}.JPEG", Body=jpegs[i % len(jpegs)])
    dest = tmp_path / "many"
    p = _cli("stage", f"s3://data/{prefix}", str(dest), "--workers", "2", "--log-every", "0.2")
    deadline = time.time() + 60
    while not (dest / ".dcv2_stage_state.json").exists() and not list(dest.rglob("*.JPEG")):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    seconds = time.time() - t0
    assert p.returncode == code and seconds < 10, (p.returncode, seconds, err[-2000:])
    assert "Traceback" not in err and [l for l in err.splitlines() if "interrupted by" in l]
    assert any(l.startswith("stage: ") and "MB/s" in l and "ETA" in l for l in err.splitlines()), err[-2000:]
    assert not (dest / MARKER).exists()
    p = run_cli("stage", f"s3://data/{prefix}", str(dest), "--workers", "8", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["num_files"] == 900 and verify(str(dest)) == []


def test_eval_commands_refuse_splits_with_other_classes(synth_data, tmp_path):
    """k-NN and linear evaluation compare labels by class index: train and val must hold the same class names."""
    import shutil

    val = tmp_path / "val"
    shutil.copytree(synth_data / "val", val)
    first = sorted(d for d in val.iterdir() if d.is_dir())[0]
    first.rename(val / "zz_renamed")
    p = run_cli("knn", "--train", str(synth_data / "train"), "--val", str(val),
                "config=pretrain/deepcluster_v2/deepclusterv2_demo_cpu", timeout=300)
    errors = [l for l in p.stderr.splitlines() if l.startswith("dcv2: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "zz_renamed" in errors[0] and first.name in errors[0], p.stderr
    empty = tmp_path / "empty"
    (empty / "c0").mkdir(parents=True)
    p = run_cli("knn", "--train", str(synth_data / "train"), "--val", str(empty),
                "config=pretrain/deepcluster_v2/deepclusterv2_demo_cpu", timeout=300)
    assert p.returncode == 2 and "no images" in p.stderr and "Traceback" not in p.stderr, p.stderr
