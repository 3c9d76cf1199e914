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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from dcv2_k8s import schema
from dcv2_k8s.config import derive, dicts
from dcv2_k8s.config.dicts import FREE_FORM

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
    "EXTRACT_FEATURES.CHUNK_THRESHOLD",
}
# VISSL's loss section repeats four values whose source of truth is elsewhere. They are accepted, checked
# against that source (a disagreeing command-line value is an error, a file's placeholder a note), and dropped.
VISSL_DERIVED = {f"{derive.LOSS}.{k}" for k in ("num_train_samples", "BATCHSIZE_PER_REPLICA", "num_crops",
                                                "DROP_LAST")}
# Lists whose items are checked by the typed schema (schema.py) rather than against the defaults.
ITEM_VALIDATED = {"DATA.TRAIN.TRANSFORMS", "MODEL.HEAD.PARAMS", "OPTIMIZER.param_schedulers.lr.schedulers"}
# Keys that only some values of a sibling 'name' use (single LR schedulers).
OPTIONAL_UNDER = {"OPTIMIZER.param_schedulers.lr": set(schema.SCHEDULER_KEYS)}
# Specific advice for keys people are known to get wrong.
KNOWN_MISTAKES = {
    "DATA.TRANSFORMS": "config.DATA.TRANSFORMS is not read: transforms belong in config.DATA.TRAIN.TRANSFORMS "
    "(VISSL's multicrop group file has this bug; use our group +config/pretrain/deepcluster_v2/transforms=NAME)",
}


class ConfigError(Exception):
    """One or more user mistakes in the configuration; each line names the key and the fix."""

    def __init__(self, lines: Iterable[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


@dataclass
class Resolved:
    """A resolved configuration: typed (``cfg``), as the nested dict it came from (``raw``, what checkpoints and
    spawned processes carry), plus what the user should be told about it."""

    cfg: schema.Config
    raw: dict
    name: str
    notes: list[str] = field(default_factory=list)
    cli_keys: set[str] = field(default_factory=set)
    file_keys: set[str] = field(default_factory=set)

    def yaml(self) -> str:
        return to_yaml(self.raw)


# --------------------------------------------------------------------------------------------- files
def _read_yaml(path: Path) -> tuple[dict, dict]:
    """``(config, header)``: the ``config:`` mapping and the file's other root keys (a resolved file's
    ``resolved_from`` and ``added_keys``), from one parse."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the file"]) from None
    if not isinstance(data, dict) or "config" not in data or not isinstance(data["config"], dict):
        raise ConfigError([f"{path}: a config file must have a root key 'config:' holding a mapping"])
    return data["config"], {k: v for k, v in data.items() if k != "config"}


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


# ---------------------------------------------------------------------------------------- validation
def _prefixes(valid) -> set[str]:
    out = set()
    for k in valid:
        parts = k.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _ignored_section(key: str, valid_prefixes: set[str]) -> str | None:
    """The VISSL-only section ``key`` belongs to (what is dropped and reported), or None. In an ignored section
    that also holds keys we read (``HOOKS``: ``HOOKS.TENSORBOARD_SETUP``), the dropped section is the key's
    sibling (``HOOKS.PERF_STATS``); an unknown key inside a section we read is not ignored (a misspelling)."""
    top = next((ig for ig in VISSL_IGNORED if key == ig or key.startswith(ig + ".")), None)
    if top in valid_prefixes:
        top = ".".join(key.split(".")[:top.count(".") + 2])
        if top in valid_prefixes:
            return None
    return top


def _check_keys(user: dict, defaults: dict, source: str, errors: list[str], ignored: list[str],
                added: set[str], repeated: dict[str, tuple[Any, bool]]) -> None:
    """Unknown keys get the closest valid key suggested; known VISSL-only keys are dropped; VISSL's repeated
    values are moved to ``repeated`` (key -> (value, from the command line))."""
    valid = dicts.flatten(defaults)
    valid_prefixes = _prefixes(valid)
    for key in list(dicts.flatten(user)):
        if key in valid or key in added or any(key.startswith(f + ".") for f in FREE_FORM):
            continue
        if key in VISSL_DERIVED:
            repeated[key] = (dicts.get(user, key), source == "the command line")
            dicts.delete(user, key)
            continue
        top = _ignored_section(key, valid_prefixes)
        if top:
            if top not in ignored:
                ignored.append(top)
            dicts.delete(user, top)
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
        close = [v for v in valid if v.lower() == key.lower()]  # NUM_EPOCHS for num_epochs
        close = close or [c for c in difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)  # a leaf alike too
                          if difflib.SequenceMatcher(None, c.split(".")[-1], key.split(".")[-1]).ratio() >= 0.6]
        if not close:  # compare the last component too: a misspelt leaf under the right section
            leaf = key.split(".")[-1]
            same_leaf = [v for v in valid if difflib.SequenceMatcher(None, v.split(".")[-1], leaf).ratio() > 0.8]
            close = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.3)
        given = f"={token_value(dicts.get(user, key))}" if source == "the command line" else ""
        hint = f"; did you mean config.{close[0]}{given}?" if close else ""
        errors.append(f"config.{key} (from {source}) is not a known key{hint}")


def token_value(value: Any) -> str:
    """``value`` written the way a ``config.KEY=VALUE`` token parses back to it (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def _through_list(cfg: dict, key: str) -> tuple[str | None, str | None]:
    """For a key that walks into a list by name: the section-list's key, and the existing key it most likely
    meant (``MODEL.HEAD.PARAMS.0.dims`` -> ``MODEL.HEAD.PARAMS.0.1.dims``: a head stage is ``[name, options]``)."""
    parts = key.split(".")
    cur: Any = cfg
    for i, part in enumerate(parts):
        if isinstance(cur, list):
            if not part.isdigit():
                return ".".join(parts[:i]), None
            if int(part) >= len(cur):
                return ".".join(parts[:i]), None
            cur = cur[int(part)]
            if (isinstance(cur, list) and len(cur) == 2 and isinstance(cur[1], dict) and i + 1 < len(parts)
                    and not parts[i + 1].isdigit()):
                meant = ".".join(parts[:i + 1] + ["1"] + parts[i + 1:])
                return ".".join(parts[:i]), meant if dicts.has(cfg, meant) else None
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return None, None
    return None, None


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
    return _read_yaml(DEFAULTS_FILE)[0]


def resolve(tokens: Iterable[str], world_size: int | None = None, local_world_size: int | None = None,
            for_training: bool = True) -> Resolved:
    """Compose, type (each value once, with its field's own rule), then check what spans keys and add the derived
    values. No side effects: nothing is read but the config files.

    Args:
        tokens: command-line tokens as described in the module docstring.
        world_size: number of processes of the run when a launcher (torchrun, a PyTorchJob) says so, else None.
        local_world_size: processes on this node, likewise.
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
    repeated: dict[str, tuple[Any, bool]] = {}
    cfg = copy.deepcopy(defaults)
    file_keys: set[str] = set()
    name = "defaults"

    layers: list[tuple[str, dict]] = []
    if toks.base is not None:
        path = find_config_file(toks.base)
        layer, header = _read_yaml(path)
        layers.append((f"config={toks.base}", layer))
        added.update(header.get("added_keys") or ())  # a resolved file names its added keys
        name = toks.base[:-5] if toks.base.endswith(".yaml") else toks.base
    for group, gname in toks.groups:
        layers.append((f"+config/{group}={gname}", _read_yaml(find_group_file(group, gname))[0]))
    for source, layer in layers:
        _check_keys(layer, defaults, source, errors, ignored, added, repeated)
        file_keys.update(dicts.flatten(layer))
        cfg = dicts.merge(cfg, layer)

    cli_keys: set[str] = set()
    for key, value, add in toks.sets:
        if key in VISSL_DERIVED:
            repeated[key] = (value, True)
            continue
        exists = dicts.has(cfg, key)
        if add and exists:
            errors.append(f"+config.{key}: the key exists already; drop the '+' to override it")
            continue
        in_list, meant = _through_list(cfg, key) if not exists else (None, None)
        if in_list:
            fix = (f"set config.{meant}={token_value(value)}" if meant else
                   f"index its items by number, e.g. config.{in_list}.0")
            errors.append(f"{'+' if add else ''}config.{key}: config.{in_list} is a list; {fix}")
            continue
        if not add and not exists:
            if _ignored_section(key, _prefixes(dicts.flatten(defaults))):
                if key not in ignored:
                    ignored.append(key)
                continue
            probe: dict = {}
            dicts.put(probe, key, value)
            before = len(errors)
            _check_keys(probe, defaults, "the command line", errors, ignored, added, repeated)
            if len(errors) == before:
                errors.append(f"config.{key}: no such key; use +config.{key}={token_value(value)} to add a new one")
            continue
        if add:
            added.add(key)
        dicts.put(cfg, key, value)
        cli_keys.add(key)

    notes = [f"ignored (not used by dcv2): config.{k}" for k in ignored]
    notes += [f"added key config.{k} is not read by dcv2" for k in sorted(added)]
    typed, field_errors = schema.build(cfg, _added_values(cfg, added))
    errors += field_errors
    if errors:
        raise ConfigError(errors)
    derived = derive.derive_and_validate(cfg, derive.Sources(cli_keys, file_keys, repeated), errors, notes,
                                         world_size, local_world_size, for_training)
    if errors:
        raise ConfigError(errors)
    for key, value in derived.items():
        dicts.put(cfg, key, value)
    return Resolved(schema.with_values(typed, derived), cfg, name, notes, cli_keys, file_keys)


def _added_values(raw: dict, keys) -> dict:
    return {k: dicts.get(raw, k) for k in sorted(keys) if dicts.has(raw, k)}


def to_yaml(raw: dict) -> str:
    """A resolved config as a config file (root key ``config:``)."""
    return yaml.safe_dump({"config": raw}, sort_keys=False, default_flow_style=None, width=110)


def write_resolved(resolved: Resolved, path: str | os.PathLike) -> str:
    """Write the resolved config for the processes a launcher starts (``dcv2 train --resolved FILE``). The file is
    also a plain config file: ``config=FILE`` resolves to the same values."""
    with open(path, "w") as f:
        f.write(yaml.safe_dump({"config": resolved.raw, "resolved_from": resolved.name,
                                "added_keys": sorted(resolved.cfg.extra)}, sort_keys=False,
                               default_flow_style=None, width=110))
    return str(path)


def load_resolved(path: str | os.PathLike) -> Resolved:
    """Read a file written by :func:`write_resolved`: typed as it is, not composed or derived again."""
    raw, header = _read_yaml(Path(path))
    name = header.get("resolved_from", Path(path).stem)
    cfg, errors = schema.build(raw, _added_values(raw, header.get("added_keys") or ()))
    if errors:
        raise ConfigError([f"{path}: not a resolved config ({e})" for e in errors])
    return Resolved(cfg, raw, name)


def config_from_checkpoint(obj: dict, tokens: Iterable[str] = (), for_training: bool = True) -> Resolved:
    """The config saved inside one of our checkpoints (``config_yaml``) with ``tokens`` applied on top. The
    checkpoint's config is the base; a ``config=NAME`` token among ``tokens`` is not applied (a note says so)."""
    if "config_yaml" not in obj:
        raise ConfigError(["the checkpoint carries no config (not one of ours); pass the config tokens"])
    tokens = list(tokens)
    bases = [t for t in tokens if t.startswith("config=")]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(obj["config_yaml"])
    try:
        r = resolve([f"config={f.name}", *[t for t in tokens if t not in bases]], for_training=for_training)
    finally:
        os.unlink(f.name)
    r.notes += [f"{b}: not applied; the checkpoint's own config is the base (its model must match the weights)"
                for b in bases]
    return r
