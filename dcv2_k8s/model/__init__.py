"""Trunk, projection head, multi-resolution forward and synchronised batch norm."""

from dcv2_k8s.model.dcv2_model import DCv2Model, build_model
from dcv2_k8s.model.resnet import ResNetTrunk, build_trunk

__all__ = ["DCv2Model", "ResNetTrunk", "build_model", "build_trunk"]
