"""Every refusal of `dcv2 stage`, then the command its message suggests, in the same DEST: the refusal is one line
and exit 2 and leaves DEST as it found it (not created, no marker, no resume state, no files), so the suggested
command succeeds. Local sources; the S3-only refusal ("no objects under this prefix") writes nothing either
(tests/test_stage_layouts.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcv2_k8s.data.layout import MARKER, REPLACED, verify
from tests.conftest import run_cli
from tests.test_stage_layouts import WNIDS, _devkit, _tar

pytestmark = pytest.mark.slow

IMG = b"\xff\xd8\xff\xe0 not decoded by staging"


def _files(root: Path, names: list[str]) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(IMG + n.encode())


def _classes(root: Path) -> None:
    _files(root, ["c0/0.jpg", "c1/1.jpg"])


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _flat_tar(path: Path, names=("a.jpg", "b.jpg")) -> None:
    _write(path, _tar({n: IMG + n.encode() for n in names}))


def _shard(path: Path, labels: list[str]) -> None:
    members = {}
    for i, label in enumerate(labels):
        members[f"k{i}.jpg"] = IMG + bytes([i])
        members[f"k{i}.cls"] = label.encode()
    _write(path, _tar(members))


def _staged(*args: str) -> None:
    p = run_cli("stage", *args, timeout=120)
    assert p.returncode == 0, p.stderr


def _snapshot(dest: Path):
    if not dest.exists():
        return None
    return {str(p.relative_to(dest)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(dest.rglob("*"))}


# each case: (t: tmp_path) -> (refused args, part of the message, fix() or None, the retry's args (None: the refused
# ones again), prepare() or None: what DEST and the source hold before the refused command)
def _missing_src(t):
    return [str(t / "src"), str(t / "d")], "no such file or directory", lambda: _classes(t / "src"), None, None


def _empty_src(t):
    (t / "src").mkdir()
    return [str(t / "src"), str(t / "d")], "the directory is empty", lambda: _classes(t / "src"), None, None


def _no_src(t):
    _classes(t / "src")
    return [str(t / "d")], "dcv2 stage SRC DEST", None, [str(t / "src"), str(t / "d")], None


def _splits(t):
    _classes(t / "src" / "train")
    _classes(t / "src" / "val")
    return ([str(t / "src"), str(t / "d")], f"e.g. dcv2 stage {t / 'src'}/train DEST/train", None,
            [str(t / "src" / "train"), str(t / "d" / "train")], None)


def _flat_without_labels(t):
    _files(t / "src", ["a.jpg", "b.jpg"])
    _write(t / "labels.csv", "a,x\nb,y\n")
    return ([str(t / "src"), str(t / "d")], "without class folders (e.g. a.jpg); pass --labels", None,
            [str(t / "src"), str(t / "d"), "--labels", str(t / "labels.csv")], None)


def _no_images(t):
    _write(t / "src" / "c0" / "readme.txt", "x")
    return [str(t / "src"), str(t / "d")], "no images or archives", lambda: _classes(t / "src"), None, None


def _labels_missing(t):
    _files(t / "src", ["a.jpg", "b.jpg"])
    args = [str(t / "src"), str(t / "d"), "--labels", str(t / "labels.csv")]
    return args, "no such labels file", lambda: _write(t / "labels.csv", "a,x\nb,y\n"), None, None


def _labels_empty(t):
    _files(t / "src", ["a.jpg", "b.jpg"])
    _write(t / "labels.csv", "\n")
    args = [str(t / "src"), str(t / "d"), "--labels", str(t / "labels.csv")]
    return args, "the labels file is empty", lambda: _write(t / "labels.csv", "a,x\nb,y\n"), None, None


def _labels_bad_line(t):
    _files(t / "src", ["a.jpg", "b.jpg"])
    _write(t / "labels.csv", "a.jpg\nb.jpg\n")
    args = [str(t / "src"), str(t / "d"), "--labels", str(t / "labels.csv")]
    return args, "is not IMAGE,CLASS", lambda: _write(t / "labels.csv", "a.jpg,x\nb.jpg,y\n"), None, None


def _labels_ids_only(t):
    _files(t / "src", [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2)])
    _write(t / "gt.txt", "1\n2\n")
    _write(t / "ILSVRC2012_devkit_t12.tar.gz", _devkit([1, 2]))
    return ([str(t / "src"), str(t / "d"), "--labels", str(t / "gt.txt")], "pass the whole devkit", None,
            [str(t / "src"), str(t / "d"), "--labels", str(t / "ILSVRC2012_devkit_t12.tar.gz")], None)


def _not_a_devkit(t):
    _files(t / "src", ["a.jpg", "b.jpg"])
    _write(t / "devkit.tar.gz", _tar({"README": b"x"}, gz=True))
    _write(t / "labels.csv", "a,x\nb,y\n")
    return ([str(t / "src"), str(t / "d"), "--labels", str(t / "devkit.tar.gz")], "not an ILSVRC 2012 devkit", None,
            [str(t / "src"), str(t / "d"), "--labels", str(t / "labels.csv")], None)


def _devkit_dir_incomplete(t):
    _files(t / "src", [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2)])
    (t / "devkit").mkdir()
    _write(t / "ILSVRC2012_devkit_t12.tar.gz", _devkit([1, 2]))
    return ([str(t / "src"), str(t / "d"), "--labels", str(t / "devkit")], "pass the ILSVRC 2012 devkit directory "
            "or archive", None, [str(t / "src"), str(t / "d"), "--labels", str(t / "ILSVRC2012_devkit_t12.tar.gz")],
            None)


def _flat_object_not_labelled(t):
    _files(t / "src", ["a.jpg", "b.jpg", "c.jpg"])
    _write(t / "labels.csv", "a,x\nb,y\n")
    args = [str(t / "src"), str(t / "d"), "--labels", str(t / "labels.csv")]
    return args, "image c.jpg has no entry in the labels file", lambda: _write(t / "labels.csv", "a,x\nb,y\nc,y\n"), \
        None, None


def _archive_member_not_labelled(t):
    _flat_tar(t / "src" / "val.tar", ("a.jpg", "b.jpg", "c.jpg"))
    _write(t / "labels.csv", "a,x\nb,y\n")
    args = [str(t / "src" / "val.tar"), str(t / "d"), "--labels", str(t / "labels.csv")]
    return args, "image c.jpg has no entry in the labels file", lambda: _write(t / "labels.csv", "a,x\nb,y\nc,y\n"), \
        None, None


def _single_archive_without_labels(t):
    _flat_tar(t / "src" / "val.tar")
    _write(t / "labels.csv", "a,x\nb,y\n")
    return ([str(t / "src" / "val.tar"), str(t / "d")], "has no class folder; pass --labels", None,
            [str(t / "src" / "val.tar"), str(t / "d"), "--labels", str(t / "labels.csv")], None)


def _class_names_missing(t):
    _shard(t / "src" / "shard-0.tar", ["0", "1"])
    args = [str(t / "src"), str(t / "d"), "--class-names", str(t / "names.txt")]
    return args, "no such class-name list", lambda: _write(t / "names.txt", "cat\ndog\n"), None, None


def _class_names_empty(t):
    _shard(t / "src" / "shard-0.tar", ["0", "1"])
    _write(t / "names.txt", "\n")
    args = [str(t / "src"), str(t / "d"), "--class-names", str(t / "names.txt")]
    return args, "the class-name list is empty", lambda: _write(t / "names.txt", "cat\ndog\n"), None, None


def _label_outside_names(t):
    _shard(t / "src" / "shard-0.tar", ["0", "1", "5"])
    _write(t / "names.txt", "cat\ndog\n")
    args = [str(t / "src"), str(t / "d"), "--class-names", str(t / "names.txt")]
    return args, "label 5 is outside the class-name list (2 names)", \
        lambda: _write(t / "names.txt", "cat\ndog\nc2\nc3\nc4\nbird\n"), None, None


def _label_not_an_integer(t):
    _shard(t / "src" / "shard-0.tar", ["0", "1", "dog"])
    return ([str(t / "src"), str(t / "d")], "k2.cls holds 'dog', not an integer label",
            lambda: _shard(t / "src" / "shard-0.tar", ["0", "1", "1"]), None, None)


def _unsafe_member(t):
    _write(t / "src" / "c0.tar", _tar({f"c0/{i}.jpg": IMG * 50 for i in range(5)}))  # the bigger: staged first
    _write(t / "src" / "c1.tar", _tar({"c1/1.jpg": IMG, "../escape.jpg": IMG}))
    return ([str(t / "src"), str(t / "d"), "--workers", "1"], "escapes the target directory; refusing the archive",
            lambda: _write(t / "src" / "c1.tar", _tar({"c1/1.jpg": IMG})), None, None)


def _not_a_tar(t):
    _write(t / "src" / "c0.tar", _tar({f"c0/{i}.jpg": IMG * 50 for i in range(5)}))
    _write(t / "src" / "c1.tar", b"this is no tar archive" * 40)
    return ([str(t / "src"), str(t / "d"), "--workers", "1"], "not a readable tar archive",
            lambda: _write(t / "src" / "c1.tar", _tar({"c1/1.jpg": IMG})), None, None)


def _no_images_produced(t):
    _write(t / "src" / "c0.tar", _tar({"notes.txt": b"x"}))
    _write(t / "src" / "c1.tar", _tar({"more.txt": b"y"}))

    def fix():
        _write(t / "src" / "c0.tar", _tar({"c0/0.jpg": IMG}))
        _write(t / "src" / "c1.tar", _tar({"c1/1.jpg": IMG}))
    return [str(t / "src"), str(t / "d")], "staging produced no images", fix, None, None


def _one_class_folder(t):
    _files(t / "src", ["all/a.jpg", "all/b.jpg"])
    _write(t / "labels.csv", "a,x\nb,y\n")
    return ([str(t / "src"), str(t / "d")], f"dcv2 stage {t / 'src'}/all {t / 'd'} --labels FILE", None,
            [str(t / "src" / "all"), str(t / "d"), "--labels", str(t / "labels.csv")], None)


def _one_class_of_labels(t):
    _flat_tar(t / "src" / "val.tar")
    _write(t / "labels.csv", "a,x\nb,x\n")
    args = [str(t / "src" / "val.tar"), str(t / "d"), "--labels", str(t / "labels.csv")]
    return args, "every image landed in one class (x)", lambda: _write(t / "labels.csv", "a,x\nb,y\n"), None, None


def _dest_holds_another_source(t):
    _classes(t / "a")
    _files(t / "b", ["c2/2.jpg", "c3/3.jpg"])
    return ([str(t / "b"), str(t / "d")], "pass --replace", None, [str(t / "b"), str(t / "d"), "--replace"],
            lambda: _staged(str(t / "a"), str(t / "d")))


def _dest_holds_other_labels(t):
    _files(t / "src", ["a.jpg", "b.jpg"])
    _write(t / "l1.csv", "a,x\nb,y\n")
    _write(t / "l2.csv", "a,p\nb,q\n")
    src = [str(t / "src"), str(t / "d")]
    return (src + ["--labels", str(t / "l2.csv")], f"(labels {t / 'l1.csv'}); choose another DEST, or pass --replace",
            None, src + ["--labels", str(t / "l2.csv"), "--replace"],
            lambda: _staged(*src, "--labels", str(t / "l1.csv")))


def _dest_holds_other_files(t):
    _classes(t / "src")
    _write(t / "d" / "mine" / "notes.txt", "keep?")
    return ([str(t / "src"), str(t / "d")], "holds 1 entries not staged by dcv2", None,
            [str(t / "src"), str(t / "d"), "--replace"], None)


def _dest_with_a_loose_file(t):
    _classes(t / "src")
    return ([str(t / "src"), str(t / "d")], "a file outside class folders: notes.txt (1 such); remove it",
            lambda: (t / "d" / "notes.txt").unlink(), None,
            lambda: (_staged(str(t / "src"), str(t / "d")), _write(t / "d" / "notes.txt", "mine")))


def _source_changed_to_an_unsafe_archive(t):
    _write(t / "src" / "c0.tar", _tar({"c0/0.jpg": IMG}))
    _write(t / "src" / "c1.tar", _tar({"c1/1.jpg": IMG}))

    def prepare():  # a complete staging, then the source gains an unsafe archive: refused halfway through
        _staged(str(t / "src"), str(t / "d"))
        _write(t / "src" / "c2.tar", _tar({"c2/2.jpg": IMG, "../escape.jpg": IMG}))
    return ([str(t / "src"), str(t / "d")], "escapes the target directory",
            lambda: _write(t / "src" / "c2.tar", _tar({"c2/2.jpg": IMG})), None, prepare)


def _replace_refused_keeps_the_old_copy(t):
    """--replace moves the old copy aside until the new one is committed: refused halfway, DEST is as it was."""
    _classes(t / "old")
    _files(t / "new", ["c0/5.jpg", "c0/6.jpg"])
    return ([str(t / "new"), str(t / "d"), "--replace"], "every image is in one class folder (c0)",
            lambda: _files(t / "new", ["c1/7.jpg"]), None, lambda: _staged(str(t / "old"), str(t / "d")))


CASES = [_missing_src, _empty_src, _no_src, _splits, _flat_without_labels, _no_images, _labels_missing, _labels_empty,
         _labels_bad_line, _labels_ids_only, _not_a_devkit, _devkit_dir_incomplete, _flat_object_not_labelled,
         _archive_member_not_labelled, _single_archive_without_labels, _class_names_missing, _class_names_empty,
         _label_outside_names, _label_not_an_integer, _unsafe_member, _not_a_tar, _no_images_produced,
         _one_class_folder, _one_class_of_labels, _dest_holds_another_source, _dest_holds_other_labels,
         _dest_holds_other_files, _dest_with_a_loose_file, _source_changed_to_an_unsafe_archive,
         _replace_refused_keeps_the_old_copy]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_a_refusal_writes_nothing_and_its_suggestion_then_works(case, tmp_path):
    refused, message, fix, retry, prepare = case(tmp_path)
    dest = tmp_path / "d"
    if prepare is not None:
        prepare()
    before = _snapshot(dest)
    p = run_cli("stage", *refused, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("dcv2: error: "), p.stderr
    assert message in lines[0], lines[0]
    assert _snapshot(dest) == before                      # DEST not created, or exactly as it was
    assert not (tmp_path / "escape.jpg").exists()
    if fix is not None:
        fix()
    p = run_cli("stage", *(retry or refused), timeout=120)
    assert p.returncode == 0, p.stderr
    staged = Path((retry or refused)[1])
    assert (staged / MARKER).exists() and verify(str(staged)) == []
    assert not (staged / REPLACED).exists()               # what --replace moved aside is gone once committed
    assert json.loads(p.stdout)["classes"] >= 2
