"""Export/import of weights, linear evaluation and cluster extraction."""

from __future__ import annotations

import csv
import io
import json
import pickle

import pytest
import torch
import torchvision

from dcv2_k8s.checkpoint import from_bytes, to_bytes
from dcv2_k8s.config import resolve, to_yaml
from dcv2_k8s.eval.clusters import assign_clusters
from dcv2_k8s.model import build_model
from dcv2_k8s.weights import WeightsError, load_weights, read_file, split_weights
from tests.conftest import run_cli, tiny_train_tokens

R18 = ["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=18",
       'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [512, 256], "use_relu": true, "use_bn": true, '
       '"skip_last_layer_relu_bn": false}], ["mlp", {"dims": [256, 128]}]]',
       "config.LOSS.deepclusterv2_loss.num_clusters=[40, 30]"]


def _our_checkpoint(tmp_path, tokens=R18):
    """A state.pt as the trainer writes it, for a trained-looking ResNet-18 DCv2 model."""
    torch.manual_seed(0)
    r = resolve(tokens)
    model = build_model(r.cfg)
    model.set_prototypes([torch.nn.functional.normalize(torch.randn(p.shape), dim=1) for p in model.prototypes])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "state.pt"
    path.write_bytes(to_bytes({"model": model.state_dict(), "config_yaml": to_yaml(r.raw)}))
    return path, model, r


def test_export_torchvision_loads_strictly_and_matches(tmp_path):
    path, model, _ = _our_checkpoint(tmp_path)
    p = run_cli("export", str(path), str(tmp_path / "tv.pth"), "--format", "torchvision", timeout=120)
    assert p.returncode == 0, p.stderr
    sd = torch.load(tmp_path / "tv.pth", weights_only=True)
    tv = torchvision.models.resnet18()
    tv.load_state_dict(sd, strict=True)
    tv.fc = torch.nn.Identity()
    tv.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv(x), model.trunk(x))


def test_pipeline_model_artifact_is_torchvision_weights_and_a_card(tmp_path):
    """The report step's Model artifact (pipeline_steps.export_model): weights torchvision loads strictly, plus a
    card naming the checkpoint, written under the artifact's own directory."""
    from dcv2_k8s.pipeline_steps import export_model

    path, model, _ = _our_checkpoint(tmp_path)
    card = export_model(str(path), str(tmp_path / "model"))
    saved = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card == saved and card["format"] == "torchvision" and card["checkpoint"] == str(path)
    tv = torchvision.models.resnet18()
    tv.load_state_dict(torch.load(tmp_path / "model" / card["weights"], weights_only=True), strict=True)
    tv.fc = torch.nn.Identity()
    tv.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv(x), model.trunk(x))


def test_export_swav_then_import_is_lossless(tmp_path):
    path, model, r = _our_checkpoint(tmp_path)
    p = run_cli("export", str(path), str(tmp_path / "swav.pth"), "--format", "swav", timeout=120)
    assert p.returncode == 0, p.stderr
    sd = torch.load(tmp_path / "swav.pth", weights_only=True)
    assert all(k.startswith("module.") for k in sd)
    assert "module.projection_head.0.weight" in sd and "module.projection_head.3.weight" in sd  # Linear-BN-ReLU-Linear
    assert sd["module.prototypes.prototypes1.weight"].shape == (30, 128)
    fresh = build_model(r.cfg)
    assert load_weights(fresh, str(tmp_path / "swav.pth")) == "swav"
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vissl_torch_checkpoint_layout_loads(tmp_path):
    _, model, r = _our_checkpoint(tmp_path)
    trunk = {f"_feature_blocks.{k}": v for k, v in model.trunk.state_dict().items()}
    vissl = {"phase_idx": 3, "iteration": 100, "loss": {},
             "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}, "meta": {}}}}
    (tmp_path / "model_phase3.torch").write_bytes(to_bytes(vissl))
    fresh = build_model(r.cfg)
    assert load_weights(fresh, str(tmp_path / "model_phase3.torch"), trunk_only=True) == "vissl"
    assert all(torch.equal(fresh.trunk.state_dict()[k], v) for k, v in model.trunk.state_dict().items())


def test_bad_inputs_are_one_line(tmp_path):
    path, _, _ = _our_checkpoint(tmp_path)
    p = run_cli("export", str(tmp_path / "missing.pt"), str(tmp_path / "o.pth"), timeout=120)
    assert p.returncode == 2 and "no such file" in p.stderr and p.stderr.count("\n") == 1
    (tmp_path / "junk.pt").write_bytes(to_bytes({"foo": torch.zeros(1)}))
    p = run_cli("export", str(tmp_path / "junk.pt"), str(tmp_path / "o.pth"), timeout=120)
    assert p.returncode == 2 and "unknown layout" in p.stderr
    r50 = build_model(resolve(["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"]).cfg)
    with pytest.raises(WeightsError, match="does not match config.MODEL.TRUNK"):
        load_weights(r50, str(path))
    w2 = _our_checkpoint(tmp_path, [*R18, "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2",
                                    'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [1024, 128]}]]'])[0]
    p = run_cli("export", str(w2), str(tmp_path / "o.pth"), "--format", "torchvision", timeout=120)
    assert p.returncode == 2 and "no torchvision twin" in p.stderr


def test_crafted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run at load time",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(WeightsError, match="refused"):
        read_file(str(bad))
    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    bad.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="refused"):
        read_file(str(bad))
    assert split_weights({"state_dict": {"conv1.weight": torch.zeros(1)}})[0] == "torchvision"


@pytest.mark.slow
def test_linear_eval_and_clusters_on_a_trained_run(synth_data, tmp_path):
    ckpt = tmp_path / "run"
    p = run_cli("train", *tiny_train_tokens(synth_data, ckpt, "config.OPTIMIZER.num_epochs=2",
                                            "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"))
    assert p.returncode == 0, p.stderr[-2000:]
    # the cluster of an embedding is the k-means assignment of the same embedding: the table computed at the
    # start of epoch 1 (saved at step 30) from the banks written in epoch 0 (saved at step 15; 15 steps/epoch)
    state = from_bytes((ckpt / "step_000000030" / "state.pt").read_bytes())
    bank = from_bytes((ckpt / "step_000000015" / "bank_rank0000.pt").read_bytes())["bank"]
    for h in range(3):
        clusters, scores = assign_clusters(bank["embeddings"][h % 2], state["model"][f"prototypes{h}"])
        assert torch.equal(clusters, state["table"][h][bank["indices"]])
        assert (scores <= 1.0001).all()
    p = run_cli("clusters", str(ckpt), str(synth_data / "val"), str(tmp_path / "cl"), "--workers", "0", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "cl" / "assignments.csv")))
    assert len(rows) == 60 * 3 and {r["head"] for r in rows} == {"0", "1", "2"}
    sizes = json.loads((tmp_path / "cl" / "cluster_sizes.json").read_text())
    assert [sum(h["sizes"]) for h in sizes["heads"]] == [60, 60, 60]
    assert all((tmp_path / "cl" / f"contact_sheet_head{h}.png").stat().st_size > 1000 for h in range(3))
    # linear eval, distributed like training, VISSL's protocol with augmentation, one epoch
    le = ["config=benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear",
          f"config.DATA.TRAIN.DATA_PATHS=[{synth_data / 'train'}]", f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]",
          "config.MODEL.TRUNK.RESNETS.DEPTH=18", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.25",
          "config.LINEAR_EVAL.CROP_SIZE=32", "config.OPTIMIZER.num_epochs=1", "config.DATA.NUM_DATALOADER_WORKERS=0",
          "config.MACHINE.DEVICE=cpu", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
          f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={ckpt}", f"config.CHECKPOINT.DIR={tmp_path / 'le'}"]
    p = run_cli("linear-eval", *le, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "le" / "linear_eval.json").read_text())
    assert res["protocol"] == "bn_linear" and 0 <= res["top1"] <= res["top5"] <= 100 and res["epochs"] == 1
    assert (res["architecture"], res["resolution"], res["weights"]) == ("ResNet-18 x0.25", 32, str(ckpt))
    # the view this evaluation applied: the crop it was given, the linear preset's normalisation
    assert res["view"]["center_crop"] == 32 and res["view"]["mean"] == [0.485, 0.456, 0.406]
    p = run_cli("linear-eval", *le[:-2], "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=/nonexistent", timeout=120)
    assert p.returncode == 2 and "PARAMS_FILE: /nonexistent does not exist" in p.stderr



def test_knn_of_a_checkpoint_with_the_base_config_given_too(tmp_path, synth_data):
    """``dcv2 knn --checkpoint CKPT config=...``: the checkpoint's own config is the base (its model matches the
    weights); the extra base token is reported as not applied instead of failing as "given twice"."""
    path, _, _ = _our_checkpoint(tmp_path)
    p = run_cli("knn", "--train", str(synth_data / "train"), "--val", str(synth_data / "val"), "--checkpoint",
                str(path), "--size", "32", "--workers", "0",
                "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "not applied; the checkpoint's own config is the base" in p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["weights"] == str(path) and 0 <= res["top1"] <= 100
    assert res["resolution"] == 32 and res["architecture"].startswith("ResNet-")


def test_a_random_init_knn_names_the_network_resolution_view_and_draw_it_scored(synth_data):
    """``dcv2 knn`` without weights: its result says which random network it scored (the defaults' ResNet-50, or
    the network of the tokens given), at which size and view, and which seed, and a note says how to score a run's."""
    common = ["knn", "--train", str(synth_data / "train"), "--val", str(synth_data / "val"), "--workers", "0"]
    p = run_cli(*common, "--size", "32", timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert (res["architecture"], res["resolution"], res["weights"]) == ("ResNet-50 x1", 32, "random-init (seed 0)")
    assert res["view"] == {"preprocess": [], "resize": 37, "center_crop": 32, "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225]}
    assert "scored a randomly initialised ResNet-50 x1 at 32 px" in p.stderr
    p = run_cli(*common, "config=pretrain/deepcluster_v2/deepclusterv2_small_scale", "config.SEED_VALUE=3",
                timeout=300)
    assert p.returncode == 0 and "scored a randomly" not in p.stderr, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert (res["architecture"], res["resolution"], res["weights"]) == \
        ("ResNet-18 x0.5 (input norm standardize_polarity)", 32, "random-init (seed 3)")
    assert res["view"]["preprocess"] == ["ImgPilCropToContent"]


def test_export_and_model_card_name_the_input_view_the_weights_expect(tmp_path):
    """Weights trained with MODEL.TRUNK.INPUT_NORM or whole-image preprocessing are only right on inputs made the
    same way: `dcv2 export` says so (its JSON line and a note) and the pipeline's model card carries it; a plain run
    adds nothing."""
    from dcv2_k8s.pipeline_steps import export_model

    crop = ("config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilCropToContent, margin: 0.5}, {name: ImgPilToMultiCrop, "
            "total_num_crops: 2, num_crops: [2], size_crops: [64], crop_scales: [[0.5, 1]]}, {name: ToTensor}]")
    path, _, _ = _our_checkpoint(tmp_path, [*R18, "config.MODEL.TRUNK.INPUT_NORM=standardize_polarity", crop])
    p = run_cli("export", str(path), str(tmp_path / "tv.pth"), "--format", "torchvision", timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    want = {"input_norm": "standardize_polarity", "preprocess": [{"name": "ImgPilCropToContent", "margin": 0.5}]}
    assert {k: out[k] for k in want} == want and "standardize_input" in p.stderr
    card = export_model(str(path), str(tmp_path / "model"))
    assert {k: card[k] for k in want} == want
    (tmp_path / "plain").mkdir()
    plain, _, _ = _our_checkpoint(tmp_path / "plain")
    assert "input_norm" not in export_model(str(plain), str(tmp_path / "plain_model"))


def test_linear_eval_of_our_checkpoint_uses_the_view_it_was_trained_on(synth_data, tmp_path):
    """A linear-eval config that sets no view of its own takes the checkpoint's INPUT_NORM and whole-image
    preprocessing (the features are only right on such inputs); weights of another layout get the config's."""
    from dcv2_k8s.distributed import DistInfo
    from dcv2_k8s.eval.linear import LinearEval

    crop = ("config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilCropToContent}, {name: ImgPilToMultiCrop, "
            "total_num_crops: 2, num_crops: [2], size_crops: [64], crop_scales: [[0.5, 1]]}, {name: ToTensor}]")
    path, model, _ = _our_checkpoint(tmp_path, [*R18, "config.MODEL.TRUNK.INPUT_NORM=standardize", crop])
    le = ["config=benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear",
          f"config.DATA.TRAIN.DATA_PATHS=[{synth_data / 'train'}]", f"config.DATA.TEST.DATA_PATHS=[{synth_data / 'val'}]",
          "config.MODEL.TRUNK.RESNETS.DEPTH=18", "config.MACHINE.DEVICE=cpu", "config.METRICS.ENABLED=false",
          f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path}"]
    ev = LinearEval(resolve(le, for_training=False), DistInfo())
    assert ev.trunk.input_norm == "standardize" and [e["name"] for e in ev.pre] == ["ImgPilCropToContent"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ev.trunk(x), model.trunk.eval()(x))
    tv = tmp_path / "tv.pth"
    assert run_cli("export", str(path), str(tv), "--format", "torchvision", timeout=120).returncode == 0
    ev = LinearEval(resolve([*le[:-1], f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={tv}"], for_training=False), DistInfo())
    assert ev.trunk.input_norm == "none" and ev.pre == ()
