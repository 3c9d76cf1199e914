"""Compile the DeepClusterV2 Kubeflow Pipeline for an image (the pipeline itself: ``dcv2_k8s/kfp_pipeline.py``).

    python pipelines/dcv2_pipeline.py my-pipeline.yaml --image REGISTRY/dcv2-k8s:TAG [--image-pull-secret NAME]

The committed ``pipelines/dcv2_pipeline.yaml`` is this script's output for the placeholder image.
"""

import sys

from dcv2_k8s.kfp_pipeline import main

if __name__ == "__main__":
    sys.exit(main())
