"""The DeepClusterV2 method, as the training loop calls it.

The method: memory bank, distributed spherical k-means, the loss, cluster statistics, and the
:class:`~dcv2_k8s.dcv2.method.DeepClusterV2` state object the training loop calls."""

from dcv2_k8s.dcv2.method import DeepClusterV2

__all__ = ["DeepClusterV2"]
