"""Resolve VISSL-style configuration tokens into one validated config.

Tokens (the same spelling as VISSL's Hydra command lines):

- ``config=NAME_OR_PATH``: the base file, a preset name such as
  ``pretrain/deepcluster_v2/deepclusterv2_2crops_resnet`` or a path to a ``.yaml`` file;
- ``+config/GROUP/PATH=NAME``: merge the group file ``GROUP/PATH/NAME.yaml`` on top of the base;
- ``config.A.B=VALUE``: set an existing key; VALUE is parsed as YAML (lists, dicts, numbers, booleans);
- ``+config.A.B=VALUE``: add a key that does not exist yet.

Order of composition: defaults, base file, group files (in the order given), then value overrides.
Every mistake is collected and reported as one line each through :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULTS_FILE = Path(__file__).parent / "defaults.yaml"

# Keys that VISSL's DeepClusterV2 files carry and that this trainer does not need. They are accepted,
# dropped, and reported once, so that VISSL's own files load unchanged.
VISSL_IGNORED = {
    "VERBOSE", "TEST_ONLY", "TEST_MODEL", "MULTI_PROCESSING_METHOD", "HOOKS", "METERS",
    "TRAINER.TRAIN_STEP_NAME", "DATA.TRAIN.DATASET_NAMES", "DATA.TRAIN.MMAP_MODE",
    "DATA.TRAIN.COPY_TO_LOCAL_DISK", "DATA.TRAIN.COPY_DESTINATION_DIR", "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP",
    "DISTRIBUTED.RUN_ID", "DISTRIBUTED.NCCL_DEBUG", "DISTRIBUTED.DISTR_ON", "CHECKPOINT.OVERWRITE_EXISTING",
    "LOSS.deepclusterv2_loss.memory_params.crops_for_assign", "MODEL.FEATURE_EVAL_SETTINGS",
}
# Values whose inside is free-form (passed through to a library).
FREE_FORM = {"MODEL.AMP_PARAMS.AMP_ARGS"}
# Lists whose items are checked by dedicated validators rather than against the defaults.
ITEM_VALIDATED = {"DATA.TRAIN.TRANSFORMS", "MODEL.HEAD.PARAMS", "OPTIMIZER.param_schedulers.lr.schedulers"}
# Keys that only some values of a sibling 'name' use (single LR schedulers).
SCHEDULER_KEYS = {"start_value", "end_value", "value", "values", "milestones", "base_lr", "final_lr",
                  "start_warmup", "warmup_fraction"}
OPTIONAL_UNDER = {"OPTIMIZER.param_schedulers.lr": SCHEDULER_KEYS}
# Specific advice for keys people are known to get wrong.
KNOWN_MISTAKES = {
    "DATA.TRANSFORMS": "config.DATA.TRANSFORMS is not read: transforms belong in config.DATA.TRAIN.TRANSFORMS "
    "(VISSL's multicrop group file has this bug; use our group +config/pretrain/deepcluster_v2/transforms=NAME)",
}
# Types of keys whose default is null.
NULL_DEFAULT_TYPES = {
    "LOSS.deepclusterv2_loss.num_train_samples": int,
    "LOSS.deepclusterv2_loss.BATCHSIZE_PER_REPLICA": int,
    "LOSS.deepclusterv2_loss.num_crops": int,
    "LOSS.deepclusterv2_loss.DROP_LAST": bool,
    "DISTRIBUTED.NUM_NODES": int,
    "DISTRIBUTED.NUM_PROC_PER_NODE": int,
}


class ConfigError(Exception):
    """One or more user mistakes in the configuration; each line names the key and the fix."""

    def __init__(self, lines: Iterable[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


@dataclass
class Resolved:
    """A resolved configuration plus what the user should be told about it."""

    cfg: DictConfig
    name: str
    notes: list[str] = field(default_factory=list)
    cli_keys: set[str] = field(default_factory=set)
    file_keys: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------------------------- files
def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the file"]) from None
    if not isinstance(data, dict) or "config" not in data or not isinstance(data["config"], dict):
        raise ConfigError([f"{path}: a config file must have a root key 'config:' holding a mapping"])
    return data["config"]


def preset_names(group: str = "") -> list[str]:
    base = PRESET_DIR / group
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in base.rglob("*.yaml"))


def find_config_file(name: str) -> Path:
    """A preset name (with or without .yaml) or a filesystem path."""
    cand = Path(name)
    if cand.suffix in (".yaml", ".yml") and cand.is_file():
        return cand
    rel = name[:-5] if name.endswith(".yaml") else name
    preset = PRESET_DIR / f"{rel}.yaml"
    if preset.is_file():
        return preset
    close = difflib.get_close_matches(rel, preset_names(), n=1, cutoff=0.5)
    hint = f"; did you mean config={close[0]}?" if close else "; `dcv2 config list` shows the presets"
    raise ConfigError([f"config={name}: no such preset or file{hint}"])


def find_group_file(group: str, name: str) -> Path:
    cand = Path(name)
    if cand.suffix in (".yaml", ".yml") and cand.is_file():
        return cand
    path = PRESET_DIR / group / f"{name}.yaml"
    if path.is_file():
        return path
    choices = [p.split("/")[-1] for p in preset_names(group)] if (PRESET_DIR / group).is_dir() else []
    hint = f"; choose one of: {', '.join(choices)}" if choices else "; no such group (see `dcv2 config list`)"
    raise ConfigError([f"+config/{group}={name}: no such group file{hint}"])


# ---------------------------------------------------------------------------------------------- dicts
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and key not in FREE_FORM and v:
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def _get(d: dict, dotted: str, default: Any = None) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return default
    return cur


def _set(d: dict, dotted: str, value: Any) -> None:
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


def _delete(d: dict, dotted: str) -> None:
    parts = dotted.split(".")
    cur = d
    for part in parts[:-1]:
        cur = cur.get(part, {})
    cur.pop(parts[-1], None)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _has_key(d: dict, dotted: str) -> bool:
    sentinel = object()
    return _get(d, dotted, sentinel) is not sentinel


# ---------------------------------------------------------------------------------------- validation
def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def _type_ok(expected: Any, value: Any) -> bool:
    if value is None:
        return True
    if isinstance(expected, bool):
        return isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(expected, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, type):
        return _type_ok(expected(), value)
    return isinstance(value, type(expected))


def _check_keys(user: dict, defaults: dict, source: str, errors: list[str], ignored: list[str],
                added: set[str]) -> None:
    """Unknown keys get the closest valid key suggested; known VISSL-only keys are dropped."""
    valid = _flatten(defaults)
    valid_prefixes = set()
    for k in valid:
        parts = k.split(".")
        for i in range(1, len(parts)):
            valid_prefixes.add(".".join(parts[:i]))
    for key in list(_flatten(user)):
        if key in valid or key in added or any(key.startswith(f + ".") for f in FREE_FORM):
            continue
        if any(key == ig or key.startswith(ig + ".") for ig in VISSL_IGNORED):
            top = next(ig for ig in VISSL_IGNORED if key == ig or key.startswith(ig + "."))
            if top not in ignored:
                ignored.append(top)
            _delete(user, top)
            continue
        if any(key.startswith(f + ".") for f in ITEM_VALIDATED) or any(key.startswith(a + ".") for a in added):
            continue
        parent, _, leaf = key.rpartition(".")
        if leaf in OPTIONAL_UNDER.get(parent, ()):
            continue
        if key in valid_prefixes:  # an empty mapping given for a section
            continue
        mistake = next((m for k2, m in KNOWN_MISTAKES.items() if key == k2 or key.startswith(k2 + ".")), None)
        if mistake:
            if mistake not in errors:
                errors.append(mistake)
            continue
        close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
        if not close:  # compare the last component too: a misspelt leaf under the right section
            leaf = key.split(".")[-1]
            same_leaf = [v for v in valid if difflib.SequenceMatcher(None, v.split(".")[-1], leaf).ratio() > 0.8]
            close = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.3)
        hint = f"; did you mean config.{close[0]}?" if close else ""
        errors.append(f"config.{key} (from {source}) is not a known key{hint}")


def _check_types(cfg: dict, defaults: dict, errors: list[str]) -> None:
    for key, default in _flatten(defaults).items():
        if key in ITEM_VALIDATED or key in FREE_FORM:
            continue
        value = _get(cfg, key)
        expected = NULL_DEFAULT_TYPES.get(key, default) if default is None else default
        if expected is None or value is None:
            continue
        if not _type_ok(expected, value):
            want = _type_name(expected() if isinstance(expected, type) else expected)
            errors.append(f"config.{key}={value!r} must be {want}, got {_type_name(value)}")


# ------------------------------------------------------------------------------------------- tokens
@dataclass
class Tokens:
    base: str | None = None
    groups: list[tuple[str, str]] = field(default_factory=list)
    sets: list[tuple[str, Any, bool]] = field(default_factory=list)  # (key, value, is_add)


def parse_tokens(tokens: Iterable[str]) -> Tokens:
    out = Tokens()
    errors = []
    for tok in tokens:
        if "=" not in tok:
            errors.append(f"{tok!r}: expected config=NAME, config.KEY=VALUE, +config.KEY=VALUE or "
                          "+config/GROUP=NAME")
            continue
        lhs, rhs = tok.split("=", 1)
        if lhs == "config":
            if out.base is not None:
                errors.append(f"{tok}: the base config is given twice (config={out.base}); give it once")
            out.base = rhs
        elif lhs.startswith("+config/"):
            out.groups.append((lhs[len("+config/"):].strip("/"), rhs))
        elif lhs.startswith("config.") or lhs.startswith("+config."):
            add = lhs.startswith("+")
            key = lhs[len("+config."):] if add else lhs[len("config."):]
            try:
                value = yaml.safe_load(rhs) if rhs != "" else ""
            except yaml.YAMLError:
                value = rhs  # not YAML: keep the text (e.g. a path with a colon)
            out.sets.append((key, value, add))
        else:
            errors.append(f"{tok!r}: unknown argument; keys are written config.SECTION.KEY=VALUE")
    if errors:
        raise ConfigError(errors)
    return out


# ------------------------------------------------------------------------------------------ resolve
def load_defaults() -> dict:
    return _read_yaml(DEFAULTS_FILE)


def resolve(tokens: Iterable[str], world_size: int | None = None, local_world_size: int | None = None,
            num_train_samples: int | None = None, for_training: bool = True) -> Resolved:
    """Compose, validate and derive a config.

    Args:
        tokens: command-line tokens as described in the module docstring.
        world_size: number of processes when launched by torchrun / a PyTorchJob (None: not launched).
        local_world_size: processes on this node when launched.
        num_train_samples: dataset length when known (it fills and checks the loss section).
        for_training: False for evaluation commands: the projection head and the DCv2 loss are not used, so
            their consistency with the trunk is not checked.

    Returns:
        A :class:`Resolved`. Raises :class:`ConfigError` listing every problem found.
    """
    toks = parse_tokens(tokens)
    defaults = load_defaults()
    errors: list[str] = []
    ignored: list[str] = []
    added: set[str] = set()
    cfg = copy.deepcopy(defaults)
    file_keys: set[str] = set()
    name = "defaults"

    layers: list[tuple[str, dict]] = []
    if toks.base is not None:
        path = find_config_file(toks.base)
        layers.append((f"config={toks.base}", _read_yaml(path)))
        name = toks.base[:-5] if toks.base.endswith(".yaml") else toks.base
    for group, gname in toks.groups:
        layers.append((f"+config/{group}={gname}", _read_yaml(find_group_file(group, gname))))
    for source, layer in layers:
        _check_keys(layer, defaults, source, errors, ignored, added)
        file_keys.update(_flatten(layer))
        cfg = _merge(cfg, layer)

    cli_keys: set[str] = set()
    for key, value, add in toks.sets:
        exists = _has_key(cfg, key)
        if add and exists:
            errors.append(f"+config.{key}: the key exists already; drop the '+' to override it")
            continue
        if not add and not exists:
            if any(key == ig or key.startswith(ig + ".") for ig in VISSL_IGNORED):
                if key not in ignored:
                    ignored.append(key)
                continue
            probe: dict = {}
            _set(probe, key, value)
            before = len(errors)
            _check_keys(probe, defaults, "the command line", errors, ignored, added)
            if len(errors) == before:
                errors.append(f"config.{key}: no such key; use +config.{key}=... to add a new one")
            continue
        if add:
            added.add(key)
        _set(cfg, key, value)
        cli_keys.add(key)

    _check_types(cfg, defaults, errors)
    notes = [f"ignored (not used by dcv2): config.{k}" for k in ignored]
    notes += [f"added key config.{k} is not read by dcv2" for k in sorted(added)]
    if not errors:
        from dcv2_k8s.config import derive  # local import: derive needs the helpers above

        derive.derive_and_validate(cfg, cli_keys, file_keys, errors, notes, world_size, local_world_size,
                                   num_train_samples, for_training)
    if errors:
        raise ConfigError(errors)
    return Resolved(OmegaConf.create(cfg), name, notes, cli_keys, file_keys)


def to_yaml(cfg: DictConfig) -> str:
    return yaml.safe_dump({"config": OmegaConf.to_container(cfg, resolve=True)}, sort_keys=False,
                          default_flow_style=None, width=110)


def env_world() -> tuple[int | None, int | None]:
    """World size and processes per node from a launcher's environment (torchrun, PyTorchJob)."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        return world, int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nnodes, nproc = os.environ.get("PET_NNODES", ""), os.environ.get("PET_NPROC_PER_NODE", "")
    if nnodes.isdigit() and nproc.isdigit():  # a pod whose torchrun settings come from PET_* (before spawning)
        return int(nnodes) * int(nproc), int(nproc)
    return None, None


def config_from_checkpoint(obj: dict, tokens: Iterable[str] = ()) -> Resolved:
    """The config saved inside one of our checkpoints (``config_yaml``), with ``tokens`` applied on top."""
    import tempfile

    if "config_yaml" not in obj:
        raise ConfigError(["the checkpoint carries no config (not one of ours); pass the config tokens"])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(obj["config_yaml"])
    try:
        return resolve([f"config={f.name}", *tokens])
    finally:
        os.unlink(f.name)
