"""``python -m dcv2_k8s``: the ``dcv2`` command, for environments without the console script on PATH."""

from dcv2_k8s.cli import main

raise SystemExit(main())
