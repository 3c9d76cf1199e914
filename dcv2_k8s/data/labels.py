"""The class folder of each staged image: labels files and class-name lists.

Classes of staged images: labels files (the ILSVRC 2012 devkit, ``LOC_val_solution.csv``, ``IMAGE,CLASS``
files), WebDataset class-name lists, and which class folder an image goes to."""

from __future__ import annotations

import csv
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dcv2_k8s.data.layout import StageError, archive_stem, is_archive, is_image
from dcv2_k8s.storage import read_bytes


def load_labels(spec: str) -> dict[str, str]:
    """Image name (without extension) -> class, from ``spec`` (local or s3://):

    - the ILSVRC 2012 devkit (``ILSVRC2012_devkit_t12.tar.gz`` or its directory): ``data/
      ILSVRC2012_validation_ground_truth.txt`` (the class ID of validation image i on line i) mapped to WordNet IDs
      with ``data/meta.mat``;
    - ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first word of the prediction is the class);
    - any CSV/TSV/text file of ``IMAGE,CLASS`` lines (header optional, image names with or without extension).
    """
    if os.path.isdir(spec):
        return _devkit_labels(_find_file(spec, "ILSVRC2012_validation_ground_truth.txt"), _find_file(spec, "meta.mat"))
    data = _read_spec(spec)
    if is_archive(spec):
        return _devkit_archive_labels(spec, data)
    return _table_labels(spec, data.decode("utf-8-sig", errors="replace"))


def _devkit_archive_labels(spec: str, data: bytes) -> dict[str, str]:
    gt = meta = None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            if m.isfile() and m.name.endswith("ILSVRC2012_validation_ground_truth.txt"):
                gt = tar.extractfile(m).read()
            elif m.isfile() and m.name.endswith("meta.mat"):
                meta = tar.extractfile(m).read()
    if gt is None or meta is None:
        raise StageError(f"{spec}: not an ILSVRC 2012 devkit (no data/ILSVRC2012_validation_ground_truth.txt "
                         "and data/meta.mat); pass the devkit, LOC_val_solution.csv or an IMAGE,CLASS file")
    return _devkit_labels(gt, meta)


def _table_labels(spec: str, text: str) -> dict[str, str]:
    """``LOC_val_solution.csv``, or ``IMAGE,CLASS`` lines (commas, tabs or spaces)."""
    rows = [r for r in csv.reader(io.StringIO(text.replace("\t", ",")))]
    rows = [[c.strip() for c in r] for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise StageError(f"{spec}: the labels file is empty")
    out: dict[str, str] = {}
    if rows[0][:2] == ["ImageId", "PredictionString"]:
        for r in rows[1:]:
            out[r[0]] = r[1].split()[0]
        return out
    if all(len(r) == 1 and " " in r[0] for r in rows[:5]):
        rows = [r[0].split() for r in rows]
    if all(len(r) == 1 and r[0].isdigit() for r in rows[:5]):
        raise StageError(f"{spec}: class IDs without names (the devkit's ground truth alone); pass the whole devkit "
                         "(ILSVRC2012_devkit_t12.tar.gz), whose meta.mat maps the IDs to WordNet IDs")
    start = 1 if rows[0][0].lower() in ("image", "imageid", "image_id", "file", "filename", "path") else 0
    for r in rows[start:]:
        if len(r) < 2:
            raise StageError(f"{spec}: line {r!r} is not IMAGE,CLASS")
        out[_stem(r[0])] = r[1]
    return out


def _stem(name: str) -> str:
    base = PurePosixPath(name).name
    return base.rsplit(".", 1)[0] if is_image(base) else base


def _find_file(root: str, name: str) -> bytes:
    for p in Path(root).rglob(name):
        return p.read_bytes()
    raise StageError(f"{root}: no {name}; pass the ILSVRC 2012 devkit directory or archive")


def _read_spec(spec: str, what: str = "labels file") -> bytes:
    if spec.startswith("s3://"):
        return read_bytes(spec)
    if not os.path.isfile(spec):
        raise StageError(f"{spec}: no such {what}")
    return Path(spec).read_bytes()


def _devkit_labels(gt: bytes, meta: bytes) -> dict[str, str]:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise StageError("reading the devkit's meta.mat needs scipy: pip install scipy") from None
    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    out = {}
    for i, line in enumerate(gt.decode().split(), start=1):
        out[f"ILSVRC2012_val_{i:08d}"] = wnid[int(line)]
    return out


def load_class_names(spec: str) -> list[str]:
    names = [l.strip() for l in _read_spec(spec, "class-name list").decode("utf-8-sig").splitlines() if l.strip()]
    if not names:
        raise StageError(f"{spec}: the class-name list is empty (one name per line, line i = label i)")
    return names


@dataclass
class Classes:
    """Which class folder a staged image goes to: ``labels`` (image stem -> class, from a labels file) for flat
    images, else the per-class archive's name (``per_class_tars``: the source has several archives); a WebDataset
    label is named by ``names`` (line i = label i), else zero-padded. ``source``: named in the errors."""

    source: str
    labels: dict[str, str] | None = None
    names: list[str] | None = None
    per_class_tars: bool = False

    def of_image(self, name: str, archive: str) -> str:
        """The class of a flat image ``name`` (in ``archive``, or "" for an object of its own)."""
        stem = _stem(name)
        if self.labels is not None:
            if stem not in self.labels:
                raise StageError(f"{archive or self.source}: image {name} has no entry in the labels file; pass the "
                                 "labels of this split")
            return self.labels[stem]
        if archive and self.per_class_tars:
            return archive_stem(archive)
        raise StageError(f"{archive or self.source}: image {name} has no class folder; pass --labels "
                         "(LOC_val_solution.csv, the ILSVRC 2012 devkit, or an IMAGE,CLASS file)")

    def of_label(self, label: int, archive: str) -> str:
        """The class named by a WebDataset integer label."""
        if self.names is None:
            return f"{label:05d}"
        if not 0 <= label < len(self.names):
            raise StageError(f"{archive}: label {label} is outside the class-name list ({len(self.names)} names)")
        return self.names[label]

    def of_sample(self, sample, archive: str) -> str:
        """A WebDataset sample's class: from its ``.cls`` label, else from its image name."""
        return self.of_label(sample.label, archive) if sample.label is not None else \
            self.of_image(sample.image[0], archive)
