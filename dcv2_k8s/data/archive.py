"""Tar and WebDataset archives to ``CLASS/IMAGE`` files, as small generators.

Tar and WebDataset archives to ``CLASS/IMAGE`` files, as small generators with one job each (in the spirit of
webdataset's tariterators): a streamed archive's members -> WebDataset samples grouped by key -> files.

- :func:`members`: the regular members of a tar stream (``.tar``, ``.tar.gz``, ``.tgz``) with their byte span in
  the object; a member that could escape DEST or is not data (a link, a device) refuses the whole archive;
- :func:`count_bytes`: passes the members on and reports the bytes read (progress);
- :func:`group_samples`: flat members grouped into WebDataset samples (``KEY.jpg`` + ``KEY.cls`` + ``KEY.json``
  ...); ``CLASS/IMAGE`` members and nested archives pass through;
- :func:`to_files`: samples, ``CLASS/IMAGE`` members and nested per-class archives (the ILSVRC train release) ->
  :class:`File` records, and a :class:`NestedDone` after each nested archive.

A member's data is read while it is the current one (``Member.read``): tar streams cannot go back.
"""

from __future__ import annotations

import io
import tarfile
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable, Iterable, Iterator

from dcv2_k8s.data.fetch import Cancelled
from dcv2_k8s.data.layout import StageError, archive_stem, is_archive, is_image


class UnsafeArchive(StageError):
    pass


@dataclass
class Member:
    """A regular member of a streamed archive: its name, the byte span of its header and (padded) data in the
    object, and how to read its data (only while it is the current member)."""

    name: str
    start: int
    end: int
    read: Callable[[], bytes]


@dataclass
class Sample:
    """A WebDataset sample: one image (member name, bytes) and its integer label from ``KEY.cls`` (or None)."""

    key: str
    image: tuple[str, bytes] | None = None
    label: int | None = None


@dataclass
class File:
    """One file for DEST: ``CLASS/IMAGE``; ``nested``: the inner archive it came from ("" for none)."""

    rel: str
    data: bytes
    nested: str = ""


@dataclass
class NestedDone:
    """A nested archive was extracted completely: its member name and byte span in the outer object."""

    name: str
    start: int
    end: int


def check_member(m: tarfile.TarInfo, archive: str) -> bool:
    """True for a regular file, False for a directory; anything that could escape or is not data is refused."""
    name = m.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UnsafeArchive(f"{archive}: member {name!r} escapes the target directory; refusing the archive")
    if m.issym() or m.islnk():
        raise UnsafeArchive(f"{archive}: member {name!r} is a link; refusing the archive")
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        raise UnsafeArchive(f"{archive}: member {name!r} is a device or fifo; refusing the archive")
    return m.isfile()


def members(stream, archive: str, base: int, cancel: threading.Event) -> Iterator[Member]:
    """The regular members of the tar stream ``stream`` (which starts at byte ``base`` of the object ``archive``;
    gzip is detected unless the name ends in ``.tar``), in order. Raises Cancelled between members once
    ``cancel`` is set."""
    mode = "r|" if archive.lower().endswith(".tar") else "r|*"
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        for m in tar:
            if cancel.is_set():
                raise Cancelled()
            if not check_member(m, archive):
                continue
            name = m.name.lstrip("./") if m.name.startswith("./") else m.name
            end = base + m.offset_data + ((m.size + 511) // 512) * 512
            yield Member(name, base + m.offset, end, lambda m=m: tar.extractfile(m).read())


def count_bytes(items: Iterable[Member], start: int, end: int, add: Callable[[int], None]) -> Iterator[Member]:
    """Pass the members on; once each is handled, report the bytes up to its end (the rest up to ``end`` last)."""
    last = start
    for m in items:
        yield m
        add(m.end - last)
        last = m.end
    add(max(0, end - last))


def is_sample_member(name: str) -> bool:
    """A member of a WebDataset sample (or a flat image): neither a nested archive nor a ``CLASS/IMAGE`` file."""
    return not is_archive(name) and not (is_image(name) and len(PurePosixPath(name).parts) >= 2)


def sample_key(name: str) -> str:
    """A WebDataset sample key: the member path up to the first dot of its file name."""
    p = PurePosixPath(name)
    return str(p.parent / p.name.split(".", 1)[0])


def group_samples(items: Iterable[Member], archive: str = "") -> Iterator[Member | Sample]:
    """Consecutive sample members with one key become one :class:`Sample` (a second image under one key starts
    another: not WebDataset, flat images); members that are no sample's pass through as they come. A ``.cls``
    member that is no integer refuses ``archive``."""
    sample: Sample | None = None
    for m in items:
        if not is_sample_member(m.name):
            yield m
            continue
        key = sample_key(m.name)
        if sample is not None and sample.key != key:
            yield sample
            sample = None
        if sample is None:
            sample = Sample(key)
        if is_image(m.name):
            if sample.image is not None:
                yield sample
                sample = Sample(key)
            sample.image = (m.name, m.read())
        elif m.name.lower().endswith(".cls"):
            text = m.read().decode(errors="replace").strip()
            if not text.lstrip("-").isdigit():
                raise StageError(f"{archive or 'the archive'}: {m.name} holds {text[:40]!r}, not an integer label; "
                                 "fix the shard's .cls members (one integer each)")
            sample.label = int(text)
    if sample is not None:
        yield sample


def nested_images(m: Member, archive: str) -> Iterator[File]:
    """The images of a nested per-class archive as ``CLASS/IMAGE`` files, the class being the archive's name."""
    cls = archive_stem(m.name)
    with tarfile.open(fileobj=io.BytesIO(m.read())) as inner:
        for im in inner:
            if check_member(im, f"{archive}:{m.name}") and is_image(im.name):
                yield File(f"{cls}/{PurePosixPath(im.name).name}", inner.extractfile(im).read(), m.name)


def to_files(items: Iterable[Member | Sample], archive: str, only: set[str] | None,
             class_of: Callable[[Sample, str], str]) -> Iterator[File | NestedDone]:
    """Files for DEST: a sample's image in the class ``class_of(sample, archive)`` names (samples without an image
    are metadata: skipped), a ``CLASS/IMAGE`` member as it is, a nested archive's images (only those in ``only``
    when given) followed by its NestedDone."""
    for it in items:
        if isinstance(it, Sample):
            if it.image is not None:
                name, data = it.image
                yield File(f"{class_of(it, archive)}/{PurePosixPath(name).name}", data)
        elif is_archive(it.name):
            if only is None or it.name in only:
                yield from nested_images(it, archive)
                yield NestedDone(it.name, it.start, it.end)
        else:
            yield File(it.name, it.read())
