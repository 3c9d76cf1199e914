"""Labels files of flat images (LOC_val_solution.csv, IMAGE,CLASS lines) and WebDataset class-name lists, read
from local files (the devkit and s3:// specs: tests/test_stage_layouts.py)."""

from __future__ import annotations

import pytest

from dcv2_k8s.data.labels import load_class_names, load_labels
from dcv2_k8s.data.layout import StageError


def test_labels_files(tmp_path):
    loc = tmp_path / "LOC_val_solution.csv"
    loc.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01 1 2 3 4 n01 5 6 7 8\n")
    assert load_labels(str(loc)) == {"ILSVRC2012_val_00000001": "n01"}
    table = tmp_path / "labels.tsv"
    table.write_text("filename\tclass\na.JPEG\tn02\nb\tn03\n")
    assert load_labels(str(table)) == {"a": "n02", "b": "n03"}
    spaced = tmp_path / "labels.txt"
    spaced.write_text("a.jpg n04\nb.png n05\n")
    assert load_labels(str(spaced)) == {"a": "n04", "b": "n05"}
    ids = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    ids.write_text("65\n970\n")
    with pytest.raises(StageError, match="class IDs without names"):
        load_labels(str(ids))
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(StageError, match="the labels file is empty"):
        load_labels(str(tmp_path / "empty.csv"))
    with pytest.raises(StageError, match="no such labels file"):
        load_labels(str(tmp_path / "nope.csv"))


def test_class_names(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    assert load_class_names(str(tmp_path / "names.txt")) == ["cat", "dog"]
    (tmp_path / "none.txt").write_text("\n")
    with pytest.raises(StageError, match="class-name list is empty"):
        load_class_names(str(tmp_path / "none.txt"))
