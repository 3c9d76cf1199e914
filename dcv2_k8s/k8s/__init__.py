"""Kubernetes: the job kinds' facts, manifests, the pipeline's job launcher, ``run-local`` and offline validation."""
