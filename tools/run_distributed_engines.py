#!/usr/bin/env python
"""VISSL's entry point, kept for its users: ``python tools/run_distributed_engines.py config=... [tokens]`` is
``dcv2 train config=... [tokens]`` (the same tokens, the same exit codes); with ``engine_name=extract_features``
(on the command line or in the config file, as in VISSL) it extracts features with ``dcv2 extract``
(``dcv2_k8s.cli.engine_main``). Works from a checkout where dcv2-k8s is
installed (``make`` installs it into .venv) and in the image (``/home/dcv2/tools``)."""

import sys

try:
    from dcv2_k8s.cli import engine_main
except ImportError as e:  # not installed in this interpreter
    print(f"dcv2: error: {e}; install dcv2-k8s (`make` in a checkout, or pip install .) or use its .venv/bin/python",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(engine_main(sys.argv[1:]))
