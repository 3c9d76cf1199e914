#!/usr/bin/env bash
# One-GPU throughput benchmark (under 10 minutes); results in benchmarks/results/gpu_cuda.{json,md}. Arguments go to gpu_bench.py.
cd "$(dirname "$0")" && exec "${PYTHON:-python3}" gpu_bench.py "$@"
