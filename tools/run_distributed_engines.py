#!/usr/bin/env python
"""VISSL's entry point, kept for its users: ``python tools/run_distributed_engines.py config=... [tokens]`` is
``dcv2 train config=... [tokens]`` (the same tokens, the same exit codes). Works from a checkout where dcv2-k8s is
installed (``make`` installs it into .venv) and in the image (``/home/dcv2/tools``)."""

import sys

try:
    from dcv2_k8s.cli import main
except ImportError as e:  # not installed in this interpreter
    print(f"dcv2: error: {e}; install dcv2-k8s (`make` in a checkout, or pip install .) or use its .venv/bin/python",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
