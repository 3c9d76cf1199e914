"""``dcv2 extract`` (VISSL's extract_features engine), its VISSL command line, and the NMI / ARI that
``dcv2 clusters`` reports."""

from __future__ import annotations

import errno
import json
import sys
import time

import numpy as np
import pytest
import torch
import torchvision

from dcv2_k8s.checkpoint import to_bytes
from dcv2_k8s.config import resolve
from dcv2_k8s.data.dataset import scan_image_folder
from dcv2_k8s.eval.partitions import ari, nmi
from tests.conftest import ROOT, child_env, run_cli
from tests.test_eval import _our_checkpoint

TINY = ["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=18",
        "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.25",
        'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [128, 64], "use_relu": true, "use_bn": true, '
        '"skip_last_layer_relu_bn": false}], ["mlp", {"dims": [64, 32]}]]',
        "config.LOSS.deepclusterv2_loss.memory_params.embedding_dim=32",
        "config.LOSS.deepclusterv2_loss.num_clusters=[10, 7]",
        "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 2, size_crops: [32], "
        "num_crops: [2], crop_scales: [[0.3, 1]]}, {name: ToTensor}, "
        "{name: Normalize, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}]"]
OUTPUTS = ("features", "labels", "head")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """One of our checkpoints (state.pt with its config) of a ResNet-18 at 1/4 width with a 32-d head, weights
    perturbed from their initialisation and random unit prototypes: trained-looking, in milliseconds."""
    path, model, _ = _our_checkpoint(tmp_path_factory.mktemp("ckpt"), TINY)
    return path, model


def _load(out) -> dict:
    got = {k: np.load(out / f"{k}.npy") for k in OUTPUTS if (out / f"{k}.npy").exists()}
    got["paths"] = (out / "paths.txt").read_text().splitlines()
    got["meta"] = json.loads((out / "meta.json").read_text())
    return got


# ------------------------------------------------------------------------------------------- NMI / ARI
def test_nmi_and_ari_hand_computed_cases():
    a = [0, 0, 1, 1, 2, 2]
    assert nmi(a, a) == pytest.approx(1.0) and ari(a, a) == pytest.approx(1.0)
    renamed = [7, 7, 3, 3, 5, 5]  # the same partition with other names
    assert nmi(a, renamed) == pytest.approx(1.0) and ari(a, renamed) == pytest.approx(1.0)
    # [0,0,1,1] vs [0,0,1,2]: b refines a, I = H(a) = ln 2, H(b) = 1.5 ln 2: NMI = ln2 / (1.25 ln 2) = 0.8;
    # pairs: same-same 1, C(2,2) + C(2,2) = 2 in a, 1 in b, 6 in all: ARI = (1 - 2/6) / (1.5 - 2/6) = 4/7
    assert nmi([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    assert ari([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    # crossed halves: no information, and fewer agreeing pairs than chance
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert ari([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # one block against several: no shared information; two one-block partitions agree
    assert nmi([0, 0, 0], [0, 1, 2]) == 0.0 and nmi([1, 1], [4, 4]) == 1.0 and ari([1, 1], [4, 4]) == 1.0
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, 20000), rng.integers(0, 10, 20000)
    assert abs(nmi(x, y)) < 0.01 and abs(ari(x, y)) < 0.01
    with pytest.raises(ValueError, match="different numbers"):
        nmi([0, 1], [0, 1, 2])


def test_clusters_report_nmi_and_ari_against_the_folder_labels(tiny_ckpt, synth_data, tmp_path):
    """cluster_sizes.json carries per head the NMI and ARI of the assignments (assignments.csv) against the class
    folders; computed here again from the CSV."""
    import csv

    from dcv2_k8s.eval.clusters import extract_clusters

    _, model = tiny_ckpt
    r = resolve(TINY)
    mean, std = r.cfg.DATA.TRAIN.normalize
    stats = extract_clusters(model, model.prototypes, str(synth_data / "val"), str(tmp_path), 32, mean, std,
                             workers=0)
    rows = list(csv.DictReader(open(tmp_path / "assignments.csv")))
    _, samples = scan_image_folder(synth_data / "val")
    labels = [c for _, c in samples]
    saved = json.loads((tmp_path / "cluster_sizes.json").read_text())
    for h in range(2):
        assigned = [int(row["cluster"]) for row in rows if row["head"] == str(h)]
        assert saved["heads"][h]["nmi"] == pytest.approx(nmi(labels, assigned))
        assert saved["heads"][h]["ari"] == pytest.approx(ari(labels, assigned))
        assert 0 <= stats["heads"][h]["nmi"] <= 1 and -1 <= stats["heads"][h]["ari"] <= 1


# --------------------------------------------------------------------------------------------- extract
def test_extract_from_torchvision_weights_matches_torchvision(synth_data, tmp_path):
    """A torchvision ResNet-18 state dict saved by the test: features.npy is torchvision's pooled output on the
    evaluation view, row i = line i of paths.txt = image i of the sorted listing; labels the class index."""
    from dcv2_k8s.data.dataset import IndexedImageFolder
    from dcv2_k8s.data.transforms import eval_transform

    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "feats"
    p = run_cli("extract", str(synth_data / "val"), str(out), "--checkpoint", str(tmp_path / "r18.pth"),
                "--size", "32", "--workers", "0", "config.MODEL.TRUNK.RESNETS.DEPTH=18", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = _load(out)
    _, samples = scan_image_folder(synth_data / "val")
    assert got["features"].shape == (60, 512) and got["features"].dtype == np.float32
    assert got["paths"] == [s for s, _ in samples] and got["labels"].tolist() == [c for _, c in samples]
    assert got["labels"].dtype == np.int64 and "head" not in got
    meta = got["meta"]
    assert meta["count"] == 60 and meta["feature_layer"] == "res5avg" and meta["layout"] == "torchvision"
    assert meta["resolution"] == 32 and meta["view"]["center_crop"] == 32 and meta["num_classes"] == 10
    assert meta["architecture"]["RESNETS"]["DEPTH"] == 18 and meta["weights"] == str(tmp_path / "r18.pth")
    assert json.loads(p.stdout.strip().splitlines()[-1])["count"] == 60
    tv.fc = torch.nn.Identity()
    tv.eval()
    ds = IndexedImageFolder(synth_data / "val", eval_transform(32))
    with torch.no_grad():
        want = tv(torch.stack([ds[i][1] for i in (0, 17, 59)]))
    np.testing.assert_allclose(got["features"][[0, 17, 59]], want.numpy(), rtol=1e-4, atol=1e-5)


def test_extract_bad_inputs_are_one_line(synth_data, tmp_path, capsys):
    """Exit 2 and one line, before anything is written (in this process: these fail before any work)."""
    from dcv2_k8s.cli import main

    (tmp_path / "junk.pt").write_bytes(to_bytes({"foo": torch.zeros(1)}))
    (tmp_path / "afile").write_text("x")
    cases = [(["extract", str(synth_data / "val"), str(tmp_path / "afile" / "o")], "cannot create the directory"),
             (["extract", str(tmp_path / "nope"), str(tmp_path / "o")], "no such directory"),
             (["extract", str(synth_data), str(tmp_path / "o")], "holds the dataset's splits"),
             (["extract", str(synth_data / "val"), str(tmp_path / "o"), "--checkpoint", str(tmp_path / "junk.pt")],
              "unknown layout"),
             (["extract", str(synth_data / "val"), str(tmp_path / "o"), "--checkpoint", str(tmp_path / "none.pt")],
              "no such file")]
    for argv, text in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and text in err and err.count("\n") == 1 and err.startswith("dcv2: error: "), (argv, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_process_extract_equals_one_process_and_the_vissl_command_line(tiny_ckpt, synth_data, tmp_path):
    """Our checkpoint, trunk and head: 2 processes (torchrun, each a contiguous shard, gathered on rank 0) write
    what 1 process writes, in the same order; VISSL's command line (engine_name=extract_features) under torchrun
    with 2 processes extracts both splits in one launch (two process groups in one process) and writes the same
    under EXTRACT_FEATURES.OUTPUT_DIR/test; a directory of images without class folders (5 images: a short last
    shard) gets labels -1; EVAL_TRUNK_AND_HEAD is read from the config file."""
    ckpt, model = tiny_ckpt
    common = ["--checkpoint", str(ckpt), "--head", "--workers", "0", "--batch-size", "16"]  # its 32 px crops
    one, two = tmp_path / "one", tmp_path / "two"
    p = run_cli("extract", str(synth_data / "val"), str(one), *common, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli("extract", *common, "--nproc", "2", str(synth_data / "val"), str(two), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _load(one), _load(two)
    assert a["features"].shape == (60, model.trunk.out_dim) and a["head"].shape == (60, 32)
    np.testing.assert_allclose(np.linalg.norm(a["head"], axis=1), 1.0, rtol=1e-5)
    for k in OUTPUTS:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert a["paths"] == b["paths"] and a["meta"]["layout"] == "dcv2" and b["meta"]["world_size"] == 2
    assert a["meta"]["head"]["dim"] == 32 and a["meta"]["architecture"]["RESNETS"]["WIDTH_MULTIPLIER"] == 0.25

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in a["paths"][:5]:
        (flat / name.replace("/", "_")).write_bytes((synth_data / "val" / name).read_bytes())
    import subprocess

    vissl = tmp_path / "vissl"
    vissl_file = tmp_path / "extract_trunk_and_head.yaml"
    vissl_file.write_text("engine_name: extract_features\nconfig:\n  MODEL:\n    FEATURE_EVAL_SETTINGS:\n"
                          "      EVAL_MODE_ON: true\n      EVAL_TRUNK_AND_HEAD: true\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "tools/run_distributed_engines.py", f"config={vissl_file}",
                        f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={ckpt}", f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]",
                        f"config.DATA.TRAIN.DATA_PATHS=[{flat}]", f"config.EXTRACT_FEATURES.OUTPUT_DIR={vissl}",
                        "config.DATA.NUM_DATALOADER_WORKERS=0", "config.MACHINE.DEVICE=cpu"],
                       capture_output=True, text=True, timeout=300, env=child_env({"OMP_NUM_THREADS": "1"}),
                       cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    v = _load(vissl / "test")
    assert v["meta"]["world_size"] == 2
    assert v["meta"]["split"] == "test" and v["paths"] == a["paths"] and v["labels"].tolist() == a["labels"].tolist()
    assert v["meta"]["resolution"] == 32 and v["meta"]["view"]["mean"] == [0.5, 0.5, 0.5]  # the checkpoint's view
    for k in OUTPUTS:
        np.testing.assert_allclose(v[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    f = _load(vissl / "train")
    assert f["labels"].tolist() == [-1] * 5 and f["meta"]["labelled"] is False and len(f["paths"]) == 5
    assert f["meta"]["world_size"] == 2 and f["head"].shape == (5, 32)
    by_name = {name.replace("/", "_"): i for i, name in enumerate(a["paths"][:5])}  # the same 5 images
    np.testing.assert_allclose(f["features"], a["features"][[by_name[q] for q in f["paths"]]], rtol=1e-5, atol=1e-6)


def test_bad_image_keeps_its_row_and_a_rerun_leaves_no_stale_files(synth_data, tmp_path, monkeypatch, capsys):
    """An undecodable image is not replaced by the next one (training's rule): its rows are zeros, every other row
    is its own image, meta.json lists it. Re-running into OUT without --head removes head.npy; a write that fails
    (permission) is one line, exit 2, and leaves no meta.json of the earlier run behind (it goes first)."""
    from pathlib import Path

    from dcv2_k8s.cli import main
    from dcv2_k8s.data.transforms import eval_transform
    from dcv2_k8s.eval import extract as X

    _, samples = scan_image_folder(synth_data / "val")
    flat = tmp_path / "flat"
    flat.mkdir()
    for k, (name, _) in enumerate(samples[:3]):
        (flat / f"{2 * k}{Path(name).suffix}").write_bytes((synth_data / "val" / name).read_bytes())
    (flat / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # sorts between the first two good ones
    net = X.load_network("", TINY, with_head=True)
    out = tmp_path / "out"
    meta = X.run_extract(net, str(flat), str(out), batch_size=2, num_workers=1, progress=False)  # a worker
    got = _load(out)
    assert got["paths"][1] == "1.jpg" and len(got["paths"]) == 4 and meta["count"] == 4
    assert [(b["row"], b["path"]) for b in meta["bad"]] == [(1, "1.jpg")] and got["meta"]["bad"] == meta["bad"]
    assert not got["features"][1].any() and not got["head"][1].any()
    assert "1.jpg: cannot be decoded" in capsys.readouterr().err
    cfg = net.resolved.cfg
    ds = X.FlatImageFolder(flat, eval_transform(32, *cfg.DATA.TRAIN.normalize, cfg.DATA.TRAIN.preprocess))
    with torch.no_grad():
        want = net.trunk(torch.stack([ds[i][1] for i in (0, 2, 3)]))
    np.testing.assert_allclose(got["features"][[0, 2, 3]], want.numpy(), rtol=1e-4, atol=1e-5)

    argv = ["extract", str(flat), str(out), "--workers", "0", *TINY]
    assert main(argv) == 0 and not (out / "head.npy").exists()
    assert json.loads((out / "meta.json").read_text())["head"] is None
    capsys.readouterr()

    def refused(store, path, arr):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(X, "_put_npy", refused)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"\ndcv2: error: {out / 'features.npy'}: cannot write it (Permission denied); give a "
                        "writable OUT\n") and err.count("error") == 1 and "Traceback" not in err
    assert not (out / "meta.json").exists()


def test_ranks_wait_for_each_other_through_the_store_bounded():
    """A rank done with its shard waits for the others' reports in the launcher's store (no collective), and gives
    up, retryable, when a rank stays missing past the bound."""
    import torch.distributed as dist

    from dcv2_k8s import exitcodes
    from dcv2_k8s.eval.extract import wait_for_ranks

    store = dist.HashStore()
    store.set("extract_done/1", json.dumps({"rows": 2, "seconds": 0.01, "bad": [{"row": 4}]}))
    store.add("extract_done", 1)  # what rank 1's wait_for_ranks leaves
    reports = wait_for_ranks(store, 0, 2, 3, {"rows": 3, "seconds": 0.01, "bad": []}, 1.0, time.time())
    assert [r["rows"] for r in reports] == [3, 2] and reports[1]["bad"] == [{"row": 4}]
    store = dist.HashStore()
    store.set("extract_done/1", json.dumps({"rows": 3, "seconds": 0.01, "bad": []}))
    store.add("extract_done", 1)
    t0 = time.time()
    with pytest.raises(TimeoutError, match=r"waiting for ranks \[2\]") as e:
        wait_for_ranks(store, 0, 3, 3, {"rows": 3, "seconds": 0.01, "bad": []}, 0.2, t0, poll_s=0.02, look_s=0.05)
    assert time.time() - t0 < 2 and exitcodes.classify(e.value) == exitcodes.RETRYABLE


def test_vissl_engine_name_routes_and_refuses_in_one_line(tmp_path, capsys):
    """``engine_name`` as VISSL reads it: a top-level override on the command line, or the key beside ``config:``
    in the config file; an engine dcv2 does not have is one line, exit 2."""
    from dcv2_k8s.cli import engine_main

    base = "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"
    assert engine_main(["engine_name=extract_label_predictions", base]) == 2
    assert "engine_name=extract_label_predictions: dcv2 runs the engines train and extract_features" in \
        capsys.readouterr().err
    assert engine_main([base, "engine_name=extract_features"]) == 2
    assert "engine_name=extract_features: no split to extract" in capsys.readouterr().err
    vissl_file = tmp_path / "extract_mine.yaml"
    vissl_file.write_text("# @package _global_\nengine_name: extract_features\nconfig:\n  MODEL:\n    TRUNK:\n"
                          "      RESNETS:\n        DEPTH: 18\n  EXTRACT_FEATURES:\n    CHUNK_THRESHOLD: -1\n")
    assert engine_main([f"config={vissl_file}"]) == 2
    assert "no split to extract" in capsys.readouterr().err
    # MACHINE.DEVICE=cuda is VISSL's spelling of gpu: no argparse "invalid choice"
    assert engine_main([base, "engine_name=extract_features", "config.MACHINE.DEVICE=cuda",
                        f"config.DATA.TEST.DATA_PATHS=[{tmp_path}]"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" not in err and ("no CUDA device is visible" in err or "no images" in err), err


def test_eval_trunk_and_head_from_the_command_line_or_the_config_file(tmp_path):
    from dcv2_k8s.cli import _eval_trunk_and_head

    key = "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD"
    f = tmp_path / "x.yaml"
    f.write_text("engine_name: extract_features\nconfig:\n  MODEL:\n    FEATURE_EVAL_SETTINGS:\n"
                 "      EVAL_TRUNK_AND_HEAD: true\n")
    assert _eval_trunk_and_head([f"config={f}"]) and _eval_trunk_and_head([f"{key}=true"])
    assert not _eval_trunk_and_head([f"config={f}", f"{key}=false"]) and not _eval_trunk_and_head([])


def test_extract_to_s3_writes_what_a_local_extract_writes(s3, synth_data, tmp_path):
    """OUT on an S3 store (the embedded endpoint): the same files, byte for byte, as a local OUT."""
    from dcv2_k8s.eval.extract import load_network, run_extract
    from dcv2_k8s.storage import open_storage

    net = load_network("", TINY, with_head=True)
    local = run_extract(net, str(synth_data / "val"), str(tmp_path / "local"), num_workers=0, progress=False)
    remote = run_extract(net, str(synth_data / "val"), "s3://ckpt/feats/val", num_workers=0, progress=False)
    assert remote["files"] == local["files"] == ["features.npy", "labels.npy", "head.npy", "paths.txt", "meta.json"]
    store = open_storage("s3://ckpt/feats/val")
    for name in local["files"][:-1]:
        assert store.get_bytes(store.join(name)) == (tmp_path / "local" / name).read_bytes(), name
    assert json.loads(store.get_bytes(store.join("meta.json")))["count"] == 60
