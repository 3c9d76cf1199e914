"""An operator's first week: one rule for dataset roots, outputs where users look, architectures read from
checkpoints, one-line store mistakes and where a run's data is staged."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from dcv2_k8s.checkpoint import to_bytes
from dcv2_k8s.config import resolve, to_yaml
from dcv2_k8s.data.dataset import DatasetRoot, check_split_dir, check_splits
from dcv2_k8s.data.stage import ensure_local
from dcv2_k8s.eval.linear import result_path
from dcv2_k8s.model import build_model
from dcv2_k8s.storage import StorageError, open_storage, s3_endpoint
from tests.conftest import DEMO, run_cli

LINEAR = "config=benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear"
SMALL_TRUNK = ["config.MODEL.TRUNK.RESNETS.DEPTH=18", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.25",
               "config.MODEL.TRUNK.INPUT_NORM=standardize",
               'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [128, 64], "use_relu": true, "use_bn": true, '
               '"skip_last_layer_relu_bn": false}], ["mlp", {"dims": [64, 32]}]]',
               "config.LOSS.deepclusterv2_loss.memory_params.embedding_dim=32",
               "config.LOSS.deepclusterv2_loss.num_clusters=[20, 20]"]


# ------------------------------------------------------------------------------------ 3: dataset roots
def test_a_dataset_root_is_refused_by_every_reader_with_the_split_to_give(synth_data, tmp_path):
    root = str(synth_data)
    with pytest.raises(DatasetRoot, match=f"give one split, e.g. {synth_data / 'train'}$"):
        check_split_dir(root)
    with pytest.raises(DatasetRoot, match=f"e.g. {synth_data / 'val'}$"):
        check_splits(synth_data / "train", root)
    check_split_dir(synth_data / "train")  # class folders: accepted
    assert check_splits(synth_data / "train", synth_data / "val")  # what the messages suggest works

    fixes = {"train": (["train", DEMO, f"config.DATA.TRAIN.DATA_PATHS=[{root}]", f"config.CHECKPOINT.DIR={tmp_path}"],
                       f"config.DATA.TRAIN.DATA_PATHS: {root} holds"),
             "knn": (["knn", "--train", root, "--val", str(synth_data / "val")], f"{root} holds"),
             "clusters": (["clusters", str(tmp_path / "no-checkpoint"), root, str(tmp_path / "cl")], f"{root} holds"),
             "data check": (["data", "check", root], f"{root} holds"),
             "linear-eval": (["linear-eval", LINEAR, f"config.DATA.TRAIN.DATA_PATHS=[{root}]",
                              f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]"], f"{root} holds")}
    for name, (args, start) in fixes.items():
        p = run_cli(*args, timeout=120)
        assert p.returncode == 2, (name, p.stderr[-1500:])
        assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"dcv2: error: {start}"), (name, p.stderr)
        assert f"not class folders: give one split, e.g. {synth_data / 'train'}" in p.stderr, (name, p.stderr)


# -------------------------------------------------------------------------- 6: outputs and architectures
def test_linear_eval_result_goes_next_to_the_weights_unless_a_place_is_set(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def where(*tokens):
        r = resolve([LINEAR, *tokens], for_training=False)
        return result_path(r.cfg, r.cli_keys | r.file_keys)

    assert where(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={run_dir}") == str(run_dir / "linear_eval.json")
    assert where(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={run_dir / 'r50.pth'}") == str(run_dir / "linear_eval.json")
    assert where("config.MODEL.WEIGHTS_INIT.PARAMS_FILE=s3://b/run") == "s3://b/run/linear_eval.json"
    # a checkpoint of a run: the run's directory (checkpoint retention deletes old step_* directories)
    (run_dir / "step_000000004").mkdir()
    assert where(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={run_dir / 'step_000000004'}") == \
        str(run_dir / "linear_eval.json")
    assert where("config.MODEL.WEIGHTS_INIT.PARAMS_FILE=s3://b/run/step_000000004/") == "s3://b/run/linear_eval.json"
    assert where() == "linear_eval.json"  # a random trunk: the current directory
    assert where(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={run_dir}",
                 f"config.CHECKPOINT.DIR={tmp_path / 'le'}") == str(tmp_path / "le" / "linear_eval.json")
    assert where(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={run_dir}", "config.LINEAR_EVAL.OUTPUT=/x/r.json") == \
        "/x/r.json"


def _small_checkpoint(run_dir: Path) -> None:
    torch.manual_seed(0)
    r = resolve(["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet", *SMALL_TRUNK])
    run_dir.mkdir()
    (run_dir / "state.pt").write_bytes(to_bytes({"model": build_model(r.cfg).state_dict(),
                                                 "config_yaml": to_yaml(r.raw)}))


def test_linear_eval_reads_the_trunk_from_our_checkpoint_and_says_where_it_wrote(synth_data, tmp_path):
    """Depth 18 at 1/4 width with standardised inputs, none of it repeated on the command line; the result lands
    in the run directory (not ./checkpoints of the current directory) and the last line says so."""
    run_dir = tmp_path / "run"
    _small_checkpoint(run_dir)
    le = [LINEAR, f"config.DATA.TRAIN.DATA_PATHS=[{synth_data / 'train'}]",
          f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]", "config.LINEAR_EVAL.CROP_SIZE=32",
          "config.LINEAR_EVAL.FEATURE_CACHE=true", "config.OPTIMIZER.num_epochs=1",
          "config.DATA.NUM_DATALOADER_WORKERS=0", "config.MACHINE.DEVICE=cpu",
          "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={run_dir}"]
    p = run_cli("linear-eval", *le, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == f"dcv2: wrote linear_eval.json to {run_dir}"
    assert json.loads((run_dir / "linear_eval.json").read_text())["num_classes"] == 10
    assert not (tmp_path / "checkpoints").exists()
    # what the user sets explicitly still wins over the checkpoint (here: a trunk its weights do not fit)
    p = run_cli("linear-eval", *le, "config.MODEL.TRUNK.RESNETS.DEPTH=34", timeout=300, cwd=str(tmp_path))
    assert p.returncode == 2 and "does not match config.MODEL.TRUNK" in p.stderr


def _events() -> bytes:
    steps = [{"kind": "step", "epoch": e, "global_step": 10 * e + 10, "loss": 3.4 - 0.1 * e, "lr": 0.1,
              "images_per_s": 100.0, "data_wait_ratio": 0.05, "ignored_ratio": 0.0} for e in range(3)]
    return "\n".join(json.dumps(e) for e in steps).encode()


def test_report_of_a_remote_run_is_written_here_and_named_after_it(s3, tmp_path):
    open_storage("s3://ckpt/week/run7").put_bytes("s3://ckpt/week/run7/metrics.jsonl", _events())
    p = run_cli("report", "s3://ckpt/week/run7", timeout=120, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "report-run7"
    assert (tmp_path / p.stdout.strip()).resolve() == (out / "report.html").resolve()
    assert p.stderr.strip().splitlines()[-1] == f"dcv2: wrote report.html and its plots to {out}"
    assert not (tmp_path / "report").exists()


# --------------------------------------------------------------------------------- 7: store mistakes
def test_an_endpoint_without_a_scheme_is_one_line_whose_fix_works(s3, tmp_path, monkeypatch):
    hostport = s3.endpoint.split("://", 1)[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", hostport)
    with pytest.raises(StorageError, match=f"^AWS_ENDPOINT_URL_S3={hostport} is not an endpoint URL"):
        s3_endpoint()
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://" + hostport)
    with pytest.raises(StorageError, match=f"set AWS_ENDPOINT_URL=http://{hostport}$"):
        s3_endpoint()
    monkeypatch.undo()  # the embedded server's endpoint again

    _upload("s3://data/week")
    p = run_cli("stage", "s3://data/week", str(tmp_path / "st"), env={"AWS_ENDPOINT_URL_S3": hostport}, timeout=120)
    fix = f"AWS_ENDPOINT_URL_S3=http://{hostport}"
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.strip().endswith(f"set {fix}"), p.stderr
    p = run_cli("stage", "s3://data/week", str(tmp_path / "st"), env={"AWS_ENDPOINT_URL_S3": fix.split("=", 1)[1]},
                timeout=120)
    assert p.returncode == 0, p.stderr


def test_a_run_says_where_its_data_is_staged_and_when_it_falls_back(s3, tmp_path, monkeypatch, caplog):
    _upload("s3://data/fallback")
    dest = str(tmp_path / "staged")
    caplog.set_level(logging.INFO, logger="dcv2")
    assert ensure_local("s3://data/fallback", dest, progress=False) == dest
    assert f"data: staging s3://data/fallback to {dest}" in caplog.text
    caplog.clear()
    assert ensure_local("s3://data/fallback", dest, progress=False) == dest
    assert f"data: s3://data/fallback, staged at {dest} 0 minutes ago (reused" in caplog.text
    os.utime(Path(dest) / ".dcv2_staged", (0, os.stat(Path(dest) / ".dcv2_staged").st_mtime - 3 * 86400))
    for endpoint, why in (("http://127.0.0.1:9", "cannot reach the S3 endpoint"),
                          ("127.0.0.1:9", "AWS_ENDPOINT_URL_S3=127.0.0.1:9 is not an endpoint URL")):
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        monkeypatch.setenv("DCV2_S3_MAX_ATTEMPTS", "1")
        caplog.clear()
        assert ensure_local("s3://data/fallback", dest, progress=False) == dest
        warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warning) == 1 and why in warning[0], caplog.text
        assert f"falling back to the copy of s3://data/fallback staged at {dest} 3.0 days ago" in warning[0]


def _upload(prefix: str) -> None:
    import io

    from PIL import Image

    store = open_storage(prefix)
    for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
        for i in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), colour).save(buf, "PNG")
            store.put_bytes(store.join(c, f"{i}.png"), buf.getvalue())
