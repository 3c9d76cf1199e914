"""Projection head built from VISSL's ``MODEL.HEAD.PARAMS``.

Each stage is ``["mlp", {"dims": [d0, d1, ...], "use_relu", "use_bn", "skip_last_layer_relu_bn", ...}]``
and follows VISSL's MLP exactly: a Linear for every consecutive pair of dims, each followed by BN and/or
ReLU when asked, except after the stage's last Linear when ``skip_last_layer_relu_bn`` (default true).
"""

from __future__ import annotations

from torch import nn


def mlp_stage(dims: list[int], use_relu: bool = False, use_bn: bool = False, skip_last_layer_relu_bn: bool = True,
              use_bias: bool = True, use_dropout: bool = False, bn_eps: float = 1e-5,
              bn_momentum: float = 0.1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=use_bias))
        if i == len(dims) - 2 and skip_last_layer_relu_bn:
            break
        if use_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], eps=bn_eps, momentum=bn_momentum))
        if use_relu:
            layers.append(nn.ReLU(inplace=True))
        if use_dropout:
            layers.append(nn.Dropout())
    return nn.Sequential(*layers)


def build_head(head_cfg) -> nn.Sequential:
    """The head of ``MODEL.HEAD`` (a typed ``config.schema.Head``)."""
    return nn.Sequential(*[mlp_stage(list(s.dims), s.use_relu, s.use_bn, s.skip_last_layer_relu_bn, s.use_bias,
                                     s.use_dropout, head_cfg.BATCHNORM_EPS, head_cfg.BATCHNORM_MOMENTUM)
                           for s in head_cfg.PARAMS])
