"""Trunk key compatibility with torchvision, widths, heads from HEAD.PARAMS, multi-resolution forward."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dcv2_k8s.config import resolve
from dcv2_k8s.model import DCv2Model, ResNetTrunk, build_model
from dcv2_k8s.model.head import build_head

BASE = "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_trunk_loads_strictly_into_torchvision(depth):
    trunk = ResNetTrunk(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")()
    sd = trunk.state_dict()
    tv_sd = tv.state_dict()
    assert set(tv_sd) - set(sd) == {"fc.weight", "fc.bias"} and set(sd) <= set(tv_sd)
    assert all(sd[k].shape == tv_sd[k].shape for k in sd)
    sd.update({"fc.weight": tv_sd["fc.weight"], "fc.bias": tv_sd["fc.bias"]})
    tv.load_state_dict(sd, strict=True)
    if depth <= 50:  # same features as torchvision's network before fc
        tv.fc = nn.Identity()
        trunk.eval(), tv.eval()
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(trunk(x), tv(x))


def test_width_multiplier_scales_every_layer():
    t = ResNetTrunk(50, width=2)
    assert t.conv1.out_channels == 128 and t.layer1[0].conv1.out_channels == 128
    assert t.layer4[0].conv3.out_channels == 4096 and t.out_dim == 4096
    assert 93e6 < sum(p.numel() for p in t.parameters()) < 95e6  # SwAV's RN50-w2: 94 M
    assert ResNetTrunk(50, width=4).out_dim == 8192


def test_resnext_groups():
    t = ResNetTrunk(50, groups=32, width_per_group=4)
    tv = torchvision.models.resnext50_32x4d()
    sd = t.state_dict()
    assert all(sd[k].shape == tv.state_dict()[k].shape for k in sd)


HEADS = {
    "default": ('[["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}], '
                '["mlp", {"dims": [2048, 128]}]]', [nn.Linear, nn.ReLU, nn.Linear], 128),
    "3 layers": ('[["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}], '
                 '["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}], '
                 '["mlp", {"dims": [2048, 128]}]]', [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear], 128),
    "hidden 4096": ('[["mlp", {"dims": [2048, 4096], "use_relu": True, "skip_last_layer_relu_bn": False}], '
                    '["mlp", {"dims": [4096, 128]}]]', [nn.Linear, nn.ReLU, nn.Linear], 128),
    "swav reference (BN)": ('[["mlp", {"dims": [2048, 2048], "use_relu": True, "use_bn": True, '
                            '"skip_last_layer_relu_bn": False}], ["mlp", {"dims": [2048, 128]}]]',
                            [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear], 128),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_heads_from_params(name):
    params, layers, out = HEADS[name]
    cfg = resolve([BASE, f"config.MODEL.HEAD.PARAMS={params}"]).cfg
    head = build_head(cfg.MODEL.HEAD)
    flat = [m for m in head.modules() if not isinstance(m, nn.Sequential)]
    assert [type(m) for m in flat] == layers
    assert head(torch.randn(4, 2048)).shape == (4, out)


def test_vissl_page_head_without_skip_flag_warns_and_follows_vissl():
    # VISSL's page writes {"dims": [2048, 2048], "use_relu": True}: skip_last_layer_relu_bn defaults to True
    r = resolve([BASE, 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 2048], "use_relu": True}], '
                       '["mlp", {"dims": [2048, 128]}]]'])
    assert any("gets no ReLU/BN (as in VISSL)" in n for n in r.notes)
    assert [type(m) for m in build_head(r.cfg.MODEL.HEAD).modules() if not isinstance(m, nn.Sequential)] \
        == [nn.Linear, nn.Linear]


def test_multi_resolution_forward_groups_crops_and_normalises():
    torch.manual_seed(0)
    model = DCv2Model(ResNetTrunk(18, width=0.25), nn.Linear(128, 16)).eval()
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16),
             torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    z = model(crops)
    assert z.shape == (15, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(15))
    # crop-major order: rows 6..8 are crop 2; the trunk ran on each size group as one batch
    with torch.no_grad():
        expect = torch.nn.functional.normalize(model.head(model.trunk(crops[2])), dim=1)
    torch.testing.assert_close(z[6:9], expect, atol=1e-5, rtol=1e-5)


def test_build_model_from_preset_runs():
    cfg = resolve(["config=pretrain/deepcluster_v2/deepclusterv2_demo_cpu"]).cfg
    model = build_model(cfg)
    z = model([torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64), torch.randn(4, 3, 32, 32)])
    assert z.shape == (12, 64)


def test_input_norm_removes_brightness_contrast_colour_cast_and_polarity():
    """MODEL.TRUNK.INPUT_NORM: ``standardize`` makes the trunk blind to an image's brightness, contrast and
    per-channel offset; ``standardize_polarity`` also to a negative. A grey image and its negative, each
    ImageNet-normalised, give the same features (the per-channel offsets of that normalisation must not survive
    the sign flip); ``none`` leaves the trunk as it was."""
    from dcv2_k8s.model.resnet import standardize_input

    torch.manual_seed(0)
    grey = (torch.rand(2, 1, 32, 32) < 0.15).float() * 0.5 + 0.2 + 0.02 * torch.rand(2, 1, 32, 32)  # sparse figure
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    img, neg = (grey.expand(-1, 3, -1, -1) - mean) / std, ((1 - grey).expand(-1, 3, -1, -1) - mean) / std
    trunk = ResNetTrunk(18, width=0.25, input_norm="standardize_polarity").eval()
    plain = ResNetTrunk(18, width=0.25).eval()
    plain.load_state_dict(trunk.state_dict())  # parameter-free: the same keys and weights
    with torch.no_grad():
        torch.testing.assert_close(trunk(img), trunk(neg), atol=1e-4, rtol=1e-4)
        # up to the 1e-3 floor of the RMS division
        torch.testing.assert_close(trunk(img), trunk(img * 3.0 + 0.7), atol=1e-2, rtol=2e-3)
        assert not torch.allclose(plain(img), plain(neg), atol=1e-2)
    x = standardize_input(img, polarity=False)
    torch.testing.assert_close(x.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardize_input(neg, polarity=False), -x, atol=1e-5, rtol=1e-5)
    assert (standardize_input(neg, polarity=True).pow(3).mean(dim=(1, 2, 3)) > 0).all()
    with pytest.raises(ValueError, match="input_norm"):
        ResNetTrunk(18, input_norm="lab")


def test_input_norm_is_a_config_key_with_one_line_errors():
    from dcv2_k8s.config import ConfigError

    cfg = resolve([BASE, "config.MODEL.TRUNK.INPUT_NORM=standardize"], for_training=False).cfg
    assert build_model(cfg).trunk.input_norm == "standardize"
    assert resolve([BASE], for_training=False).cfg.MODEL.TRUNK.INPUT_NORM == "none"
    with pytest.raises(ConfigError) as e:
        resolve([BASE, "config.MODEL.TRUNK.INPUT_NORM=lab"], for_training=False)
    assert any("INPUT_NORM='lab'" in line and "standardize_polarity" in line for line in e.value.lines)
