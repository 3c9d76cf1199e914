"""dcv2-k8s: DeepClusterV2 self-supervised pretraining on modern PyTorch, for Kubernetes and Kubeflow."""

__version__ = "0.1.0"
