"""ResNet trunks with torchvision's module names and SwAV/VISSL width multipliers.

``WIDTH_MULTIPLIER`` multiplies every layer's channels (stem included), as SwAV's ``resnet50w2``/``w4`` and
VISSL do; torchvision's ``wide_resnet`` only widens the bottleneck and is a different network. At width 1 the
state dict has exactly torchvision's keys and shapes (minus ``fc``), so a trained trunk loads into
``torchvision.models.resnet50`` and friends.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

LAYERS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
          101: (Bottleneck, [3, 4, 23, 3]), 152: (Bottleneck, [3, 8, 36, 3])}
DEPTHS = tuple(sorted(LAYERS))


def feature_dim(depth: int, width: float = 1.0) -> int:
    """Size of the pooled features of a trunk (2048 for ResNet-50, 4096 for ResNet-50 x2, 512 for ResNet-18)."""
    block = LAYERS[depth][0]
    return int(64 * width) * 8 * block.expansion


# MODEL.TRUNK.INPUT_NORM: what the trunk does to each input image before its first convolution (parameter-free)
INPUT_NORMS = ("none", "standardize", "standardize_polarity")


def standardize_input(x: torch.Tensor, polarity: bool) -> torch.Tensor:
    """Each image of ``x [B, C, H, W]``: every channel minus its own mean, then divided by the image's RMS, so that
    its brightness, contrast and colour cast are gone; with ``polarity`` also negated when its third moment is
    negative, so that dark figures on a light ground and light on dark look the same (a minority of bright pixels
    has a positive third moment). Per channel, not over the channels: the ImageNet normalisation gives each channel
    its own offset, which would survive a sign flip as a colour cast the network reads polarity from."""
    x = x - x.mean(dim=(2, 3), keepdim=True)
    x = x / (x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-3)
    if polarity:
        x = x * torch.where(x.pow(3).mean(dim=(1, 2, 3), keepdim=True) < 0, -1.0, 1.0)
    return x


class ResNetTrunk(nn.Module):
    """ResNet up to global average pooling; ``forward`` returns ``[B, out_dim]`` features."""

    def __init__(self, depth: int = 50, width: float = 1, groups: int = 1, width_per_group: int = 64,
                 zero_init_residual: bool = False, input_norm: str = "none"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {input_norm!r}: choose one of {', '.join(INPUT_NORMS)}")
        self.input_norm = input_norm
        block, layers = LAYERS[depth]
        base = int(64 * width)
        self.groups, self.base_width = groups, width_per_group
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = feature_dim(depth, width)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        kw = {"groups": self.groups, "base_width": self.base_width} if block is Bottleneck else {}
        layers = [block(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm != "none":
            x = standardize_input(x, polarity=self.input_norm == "standardize_polarity")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_trunk(trunk_cfg) -> ResNetTrunk:
    """The trunk of ``MODEL.TRUNK`` (a typed ``config.schema.Trunk``)."""
    r = trunk_cfg.RESNETS
    return ResNetTrunk(depth=r.DEPTH, width=r.WIDTH_MULTIPLIER, groups=r.GROUPS, width_per_group=r.WIDTH_PER_GROUP,
                       zero_init_residual=r.ZERO_INIT_RESIDUAL, input_norm=trunk_cfg.INPUT_NORM)
