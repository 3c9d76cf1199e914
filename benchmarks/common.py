"""Shared by the benchmarks: timing (medians over repeats), machine facts, and JSON + Markdown results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


def times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    return statistics.median(times(fn, repeats, warmup))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(path: str, result: dict, table: list[list], header: list[str], title: str) -> None:
    """``path``.json with every figure and ``path``.md with the table (``path`` without extension)."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# {title}", "", f"Machine: {json.dumps(result.get('machine', machine()))}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}.json and {path}.md")
