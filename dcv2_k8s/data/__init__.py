"""Indexed datasets, multi-crop transforms, the resumable sampler and synthetic data."""
