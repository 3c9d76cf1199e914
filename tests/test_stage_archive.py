"""The archive generators of staging, one job each, on tars built in memory: members with their byte spans,
byte counting, WebDataset samples grouped by key, files for DEST (nested per-class archives included), the refusal
of unsafe members, and the classes a sample or a flat image gets."""

from __future__ import annotations

import io
import tarfile
import threading

import pytest

from dcv2_k8s.data.archive import (File, Member, NestedDone, Sample, UnsafeArchive, count_bytes, group_samples,
                                   members, to_files)
from dcv2_k8s.data.fetch import Cancelled
from dcv2_k8s.data.labels import Classes
from dcv2_k8s.data.layout import StageError
from tests.test_stage_layouts import _tar


def _files(data: bytes, name: str = "x.tar", only=None, classes: Classes | None = None) -> list:
    classes = classes or Classes("src")
    items = group_samples(members(io.BytesIO(data), name, 0, threading.Event()))
    return list(to_files(items, name, only, classes.of_sample))


def test_members_have_their_byte_spans_and_the_counted_bytes_add_up():
    data = _tar({"./n1/a.JPEG": b"a" * 700, "n1/b.JPEG": b"b" * 10})
    seen = []
    got = [(m.name, m.start, m.end, m.read()) for m in count_bytes(
        members(io.BytesIO(data), "x.tar", 1000, threading.Event()), 1000, 1000 + len(data), seen.append)]
    assert got == [("n1/a.JPEG", 1000, 1000 + 512 + 1024, b"a" * 700),
                   ("n1/b.JPEG", 1000 + 1536, 1000 + 1536 + 1024, b"b" * 10)]
    assert seen[:2] == [1536, 1024] and sum(seen) == len(data)


def test_webdataset_members_are_grouped_by_key_and_others_pass_through():
    def member(name: str, data: bytes = b"") -> Member:
        return Member(name, 0, 0, lambda: data)

    out = list(group_samples([member("k1.cls", b"2"), member("k1.jpg", b"J1"), member("k1.json", b"{}"),
                              member("n5/x.JPEG"), member("k2.jpg", b"J2"), member("k2.jpg", b"J2b"),
                              member("inner.tar")]))
    assert [type(x).__name__ for x in out] == ["Member", "Sample", "Sample", "Member", "Sample"]
    assert out[0].name == "n5/x.JPEG" and out[3].name == "inner.tar"  # passed on as they come
    assert out[1] == Sample("k1", ("k1.jpg", b"J1"), 2)     # the CLASS/IMAGE member did not end the sample
    assert out[2] == Sample("k2", ("k2.jpg", b"J2"), None)  # a second image under one key starts another sample
    assert out[4] == Sample("k2", ("k2.jpg", b"J2b"), None)


def test_files_of_samples_shards_and_nested_archives():
    inner = _tar({"a.JPEG": b"A", "notes.txt": b"-", "b.jpeg": b"B"})
    data = _tar({"s0.jpg": b"S0", "s0.cls": b"1", "s1.cls": b"0", "s1.jpg": b"S1", "n7/x.JPEG": b"X",
                 "n9.tar": inner, "n8.tar.gz": _tar({"c.JPEG": b"C"}, gz=True), "meta.json": b"{}"})
    out = _files(data, classes=Classes("src", names=["cat", "dog"]))
    files = [(f.rel, f.data, f.nested) for f in out if isinstance(f, File)]
    # a sample is complete when a member of another sample comes (meta.json for s1), not at a CLASS/IMAGE member
    assert files == [("dog/s0.jpg", b"S0", ""), ("n7/x.JPEG", b"X", ""), ("n9/a.JPEG", b"A", "n9.tar"),
                     ("n9/b.jpeg", b"B", "n9.tar"), ("n8/c.JPEG", b"C", "n8.tar.gz"), ("cat/s1.jpg", b"S1", "")]
    done = [d for d in out if isinstance(d, NestedDone)]
    assert [d.name for d in done] == ["n9.tar", "n8.tar.gz"]
    assert data[done[0].start + 512:done[0].start + 512 + len(inner)] == inner  # the span holds the inner tar
    # a repair extracts only the nested archives asked for
    assert [f.rel for f in _files(data, only={"n8.tar.gz"}, classes=Classes("src", names=["cat", "dog"]))
            if isinstance(f, File) and f.nested] == ["n8/c.JPEG"]


def test_classes_of_flat_images_and_labels():
    flat = _tar({"ILSVRC2012_val_00000001.JPEG": b"1", "ILSVRC2012_val_00000002.JPEG": b"2"})
    labelled = Classes("src", labels={"ILSVRC2012_val_00000001": "n1", "ILSVRC2012_val_00000002": "n2"})
    assert [f.rel for f in _files(flat, "val.tar", classes=labelled)] == \
        ["n1/ILSVRC2012_val_00000001.JPEG", "n2/ILSVRC2012_val_00000002.JPEG"]
    assert [f.rel for f in _files(flat, "s3://b/n0042.tar", classes=Classes("src", per_class_tars=True))] == \
        ["n0042/ILSVRC2012_val_00000001.JPEG", "n0042/ILSVRC2012_val_00000002.JPEG"]
    with pytest.raises(StageError, match="no class folder; pass --labels"):
        _files(flat, "val.tar")
    with pytest.raises(StageError, match="no entry in the labels file"):
        _files(flat, "val.tar", classes=Classes("src", labels={"ILSVRC2012_val_00000001": "n1"}))
    wds = _tar({"k.jpg": b"J", "k.cls": b"7"})
    assert [f.rel for f in _files(wds)] == ["00007/k.jpg"]
    with pytest.raises(StageError, match="label 7 is outside the class-name list"):
        _files(wds, classes=Classes("src", names=["a", "b"]))


@pytest.mark.parametrize("name", ["../escape.JPEG", "/abs.JPEG", "C:evil.JPEG"])
def test_unsafe_members_refuse_the_archive(name):
    with pytest.raises(UnsafeArchive, match="escapes the target directory; refusing the archive"):
        _files(_tar({"n1/ok.JPEG": b"1", name: b"2"}))
    nested = _tar({"n1.tar": _tar({name: b"2"})})
    with pytest.raises(UnsafeArchive, match=r"x\.tar:n1\.tar: member"):
        _files(nested)


def test_cancel_stops_between_members():
    cancel = threading.Event()
    it = members(io.BytesIO(_tar({"n1/a.JPEG": b"1", "n1/b.JPEG": b"2"})), "x.tar", 0, cancel)
    assert next(it).name == "n1/a.JPEG"
    cancel.set()
    with pytest.raises(Cancelled):
        next(it)
