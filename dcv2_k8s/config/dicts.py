"""Dotted-key helpers over plain nested dicts (the raw form of a config before it is typed)."""

from __future__ import annotations

import copy
from typing import Any

FREE_FORM = {"MODEL.AMP_PARAMS.AMP_ARGS"}  # mappings passed through to a library as they are


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"A": {"B": 1}}`` -> ``{"A.B": 1}``; free-form and empty mappings stay whole."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and key not in FREE_FORM and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


def get(d: Any, dotted: str, default: Any = None) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return default
    return cur


def put(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur: Any = d
    for part in parts[:-1]:
        if isinstance(cur, list) and part.isdigit():
            cur = cur[int(part)]
            continue
        if part not in cur or not isinstance(cur[part], (dict, list)):
            cur[part] = {}
        cur = cur[part]
    last = parts[-1]
    if isinstance(cur, list) and last.isdigit():
        cur[int(last)] = value
    else:
        cur[last] = value


def delete(d: dict, dotted: str) -> None:
    parts = dotted.split(".")
    cur = d
    for part in parts[:-1]:
        cur = cur.get(part, {})
    cur.pop(parts[-1], None)


def merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def has(d: dict, dotted: str) -> bool:
    sentinel = object()
    return get(d, dotted, sentinel) is not sentinel


def given_in(key: str, keys: set) -> bool:
    """Whether ``key`` or a section/list containing it is among ``keys`` (what one source wrote)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))
