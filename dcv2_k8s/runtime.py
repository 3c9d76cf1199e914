"""Process-level settings shared by training and evaluation: logging, seeding, mixed precision, optional packages."""

from __future__ import annotations

import importlib.util
import logging
import random
import sys

import numpy as np
import torch

log = logging.getLogger("dcv2")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere; one line per record, tagged with the rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [dcv2 r{rank}] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def apex_available() -> bool:
    """Whether NVIDIA apex can be imported (only its SyncBN is used; AMP runs natively)."""
    return importlib.util.find_spec("apex") is not None


def amp_settings(amp_cfg, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(enabled, dtype, use GradScaler) from ``MODEL.AMP_PARAMS``; AMP_TYPE apex O1/O2 maps to native autocast."""
    if not amp_cfg.USE_AMP or amp_cfg.AMP_ARGS.get("opt_level", "O1") == "O0":  # O3 is refused by validation
        return False, torch.float32, False
    dtype = torch.bfloat16 if amp_cfg.DTYPE == "bfloat16" else torch.float16
    if device.type != "cuda" and dtype == torch.float16:
        log.warning("mixed precision float16 needs CUDA; running float32 on %s (set "
                    "config.MODEL.AMP_PARAMS.DTYPE=bfloat16 for CPU autocast)", device)
        return False, torch.float32, False
    return True, dtype, dtype == torch.float16
