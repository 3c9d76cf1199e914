"""Evaluation of a trained trunk: weighted k-NN, linear evaluation, cluster extraction."""
