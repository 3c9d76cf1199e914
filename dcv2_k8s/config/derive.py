"""Cross-key checks and derived values of a composed config.

Derived values and cross-key checks, on the composed (raw) config once each value has typed and met its own
field's rule (``schema.checked``).

A derived value is computed from its source of truth. If the user also gave it:
- on the command line, a different value is an error naming both values;
- in a config file (VISSL's files carry placeholders such as ``num_train_samples: 1281167``), the
  derived value is used and a note names both values. Nothing is replaced silently.

Also here: the rules that hold for training only (``for_training``), and the checks of one key whose facts live
with the code that uses them (``schema.py`` imports nothing from the project): ResNet depths, input norms and
feature sizes in ``model/resnet.py``, transform names (and which have an OpenCV version) in
``data/transforms.py``, scheduler names in ``optim/schedule.py``, apex's presence in ``runtime.py``.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from dcv2_k8s.config.dicts import get, given_in
from dcv2_k8s.schema import Config, MultiCrop, multicrop_of

LOSS = "LOSS.deepclusterv2_loss"
LR = "OPTIMIZER.param_schedulers.lr"


@dataclass
class Sources:
    """Who wrote what: keys set on the command line, keys written by files, and VISSL's repeated loss values
    (key -> (value, given on the command line))."""

    cli_keys: set = field(default_factory=set)
    file_keys: set = field(default_factory=set)
    repeated: dict = field(default_factory=dict)


def _fill(cfg: dict, derived: dict, key: str, value: Any, why: str, src: Sources, errors: list,
          notes: list) -> None:
    """``derived[key] = value``, unless the command line gave ``key`` a different value (an error)."""
    given = get(cfg, key)
    if given is not None and given != value:
        if given_in(key, src.cli_keys):
            errors.append(f"config.{key}={given!r} conflicts with the derived value {value!r} ({why}); "
                          f"drop config.{key} or change the source")
            return
        if given_in(key, src.file_keys):
            notes.append(f"config.{key}: using the derived value {value!r} ({why}) instead of {given!r} "
                         "from the config file")
    derived[key] = value


def _repeated(src: Sources, key: str, truth: Any, why: str, errors: list, notes: list) -> None:
    """VISSL's loss section repeats a value whose source is elsewhere: check it, never read it."""
    if key not in src.repeated:
        return
    given, on_cli = src.repeated[key]
    if truth is None:
        notes.append(f"config.{key}={given!r} is not read: {why}")
    elif given != truth:
        if on_cli:
            errors.append(f"config.{key}={given!r} conflicts with the derived value {truth!r} ({why}); "
                          f"drop config.{key} or change the source")
        else:
            notes.append(f"config.{key}: using the derived value {truth!r} ({why}) instead of {given!r} "
                         "from the config file")


# ----------------------------------------------------------------------------------------- transforms
def _check_transforms(cfg: dict, for_training: bool, errors: list) -> None:
    """The entries against ``data/transforms.py``: known names, an OpenCV version where the backend needs one, each
    on its side of ImgPilToMultiCrop, preprocessing arguments accepted (the list's shape is ``schema.py``'s)."""
    from dcv2_k8s.data.transforms import TRANSFORMS

    transforms = get(cfg, "DATA.TRAIN.TRANSFORMS")
    backend = get(cfg, "DATA.TRAIN.AUG_BACKEND")
    if backend == "opencv" and for_training and importlib.util.find_spec("cv2") is None:
        errors.append("config.DATA.TRAIN.AUG_BACKEND=opencv but OpenCV is not installed; pip install "
                      "opencv-python-headless, or set config.DATA.TRAIN.AUG_BACKEND=pil")
    for i, t in enumerate(transforms):
        op = TRANSFORMS.get(t["name"])
        if op is None:
            errors.append(f"config.DATA.TRAIN.TRANSFORMS[{i}].name={t['name']!r} is not supported; "
                          f"choose from {sorted(TRANSFORMS)}")
        elif backend == "opencv" and op.opencv is None and not (op.multicrop or op.pre):
            errors.append(f"config.DATA.TRAIN.TRANSFORMS[{i}].name={t['name']!r} has no opencv version; set "
                          "config.DATA.TRAIN.AUG_BACKEND=pil or drop the transform")
    at = [t["name"] for t in transforms].index("ImgPilToMultiCrop")
    for i, t in enumerate(transforms):
        op = TRANSFORMS.get(t["name"])
        if op is not None and not op.multicrop and op.pre != (i < at):
            where = "before" if op.pre else "after"
            errors.append(f"config.DATA.TRAIN.TRANSFORMS[{i}].name={t['name']!r} must come {where} ImgPilToMultiCrop "
                          f"({'whole-image preprocessing' if op.pre else 'a per-crop transform'}); move it")
        elif op is not None and op.pre:
            try:
                op.pil({k: v for k, v in t.items() if k != "name"})
            except (TypeError, ValueError) as e:
                errors.append(f"config.DATA.TRAIN.TRANSFORMS[{i}] ({t['name']}): {e}")


# -------------------------------------------------------------------------------------- trunk, head
def _check_trunk(cfg: dict, errors: list) -> int | None:
    """The trunk's feature size, or None after an error."""
    from dcv2_k8s.model.resnet import DEPTHS, INPUT_NORMS, feature_dim

    if get(cfg, "MODEL.TRUNK.INPUT_NORM") not in INPUT_NORMS:
        errors.append(f"config.MODEL.TRUNK.INPUT_NORM={get(cfg, 'MODEL.TRUNK.INPUT_NORM')!r}: choose one of "
                      f"{', '.join(INPUT_NORMS)}")
    depth, width = get(cfg, "MODEL.TRUNK.RESNETS.DEPTH"), get(cfg, "MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER")
    if depth not in DEPTHS:
        errors.append(f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}: choose one of {sorted(DEPTHS)}")
        return None
    return feature_dim(depth, width)


def _head(cfg: dict, derived: dict, feat: int, src: Sources, errors: list, notes: list) -> None:
    """The head follows the trunk and the embedding unless the command line wrote ``MODEL.HEAD.PARAMS``: a head
    from a file was written for that file's trunk, so its first size becomes the trunk's feature size and its
    last the ``embedding_dim`` (a note names both values). A head written on the command line is the user's own:
    any disagreement is an error naming both values."""
    params = get(cfg, "MODEL.HEAD.PARAMS")
    emb = get(cfg, f"{LOSS}.memory_params.embedding_dim")
    if not params:
        errors.append("config.MODEL.HEAD.PARAMS must be a list like [[\"mlp\", {\"dims\": [2048, 128]}]]")
        return
    depth, width = get(cfg, "MODEL.TRUNK.RESNETS.DEPTH"), get(cfg, "MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER")
    # written on the command line: the whole list, or one stage's value (MODEL.HEAD.PARAMS.1.1.dims=...)
    if not (given_in("MODEL.HEAD.PARAMS", src.cli_keys)
            or any(k.startswith("MODEL.HEAD.PARAMS.") for k in src.cli_keys)):
        params = copy.deepcopy(params)
        first, last = params[0][1]["dims"], params[-1][1]["dims"]
        if first[0] != feat:
            notes.append(f"config.MODEL.HEAD.PARAMS[0].dims[0]: {first[0]} -> {feat}, the feature size of "
                         f"ResNet-{depth} x{width:g} (the head follows the trunk; write config.MODEL.HEAD.PARAMS "
                         "on the command line to fix it yourself)")
            first[0] = feat
        if last[-1] != emb:
            notes.append(f"config.MODEL.HEAD.PARAMS[{len(params) - 1}].dims[-1]: {last[-1]} -> {emb}, "
                         f"config.{LOSS}.memory_params.embedding_dim (the head follows the embedding)")
            last[-1] = emb
        if params != get(cfg, "MODEL.HEAD.PARAMS"):
            derived["MODEL.HEAD.PARAMS"] = params
    prev = feat
    for i, (_, opts) in enumerate(params):
        dims = opts["dims"]
        if dims[0] != prev:
            what = (f"the feature size of ResNet-{depth} x{width:g}" if i == 0 else f"the output of PARAMS[{i - 1}]")
            fixed = ", ".join(str(d) for d in [prev, *dims[1:]])
            errors.append(f"config.MODEL.HEAD.PARAMS[{i}].dims starts at {dims[0]} but {what} is {prev}; "
                          f"set config.MODEL.HEAD.PARAMS.{i}.1.dims=[{fixed}] (or leave MODEL.HEAD.PARAMS to the "
                          "config file: it follows the trunk)")
        if (opts.get("use_relu") or opts.get("use_bn")) and "skip_last_layer_relu_bn" not in opts and len(dims) == 2:
            notes.append(f"config.MODEL.HEAD.PARAMS[{i}] sets use_relu/use_bn but skip_last_layer_relu_bn "
                         "defaults to true, so its only layer gets no ReLU/BN (as in VISSL); set "
                         "skip_last_layer_relu_bn: false to apply them")
        prev = dims[-1]
    if prev != emb:
        errors.append(f"config.{LOSS}.memory_params.embedding_dim={emb} but the head outputs {prev}; "
                      f"set config.{LOSS}.memory_params.embedding_dim={prev} (or end the last "
                      f"MODEL.HEAD.PARAMS dims at {emb})")


def _check_memory_bank(cfg: dict, mc: MultiCrop, errors: list) -> None:
    """The memory bank is filled from the large crops: they come first, and ``crops_for_mb`` indexes them."""
    mb = get(cfg, f"{LOSS}.memory_params.crops_for_mb")
    if not (mb and all(0 <= c < mc.n_large for c in mb)):
        errors.append(f"config.{LOSS}.memory_params.crops_for_mb={list(mb)!r} must index the large crops "
                      f"(0..{mc.n_large - 1}, the first {mc.n_large} of size {mc.large_size})")
    if len(mc.size_crops) > 1 and max(mc.size_crops) != mc.large_size:
        errors.append("config.DATA.TRAIN.TRANSFORMS[ImgPilToMultiCrop].size_crops must list the large crops "
                      "first (the memory bank is filled from them)")


# ----------------------------------------------------------------------------- distributed, machine
def _check_distributed(cfg: dict, derived: dict, world_size: int | None, local_world_size: int | None,
                       for_training: bool, errors: list, notes: list) -> int:
    """The world size, checked against the launcher's; fills ``DISTRIBUTED.NUM_NODES`` and ``NUM_PROC_PER_NODE``."""
    from dcv2_k8s.runtime import apex_available

    nodes = get(cfg, "DISTRIBUTED.NUM_NODES")
    ppn = get(cfg, "DISTRIBUTED.NUM_PROC_PER_NODE")
    if world_size is not None:
        lws = local_world_size or world_size
        if ppn is None:
            ppn = lws
        if nodes is None:
            nodes = max(1, world_size // ppn)
        if nodes * ppn != world_size:
            errors.append(f"config.DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE = {nodes} x {ppn} = {nodes * ppn} but "
                          f"the launcher started WORLD_SIZE={world_size} processes; set "
                          f"config.DISTRIBUTED.NUM_NODES={world_size // lws} "
                          f"config.DISTRIBUTED.NUM_PROC_PER_NODE={lws} (or drop both)")
    nodes, ppn = nodes or 1, ppn or 1
    derived["DISTRIBUTED.NUM_NODES"] = nodes
    derived["DISTRIBUTED.NUM_PROC_PER_NODE"] = ppn
    world = nodes * ppn
    gs = get(cfg, "MODEL.SYNC_BN_CONFIG.GROUP_SIZE")
    if get(cfg, "MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN"):
        if gs < -1:
            errors.append(f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE={gs}: use -1 (per node), 0 (global) or > 0")
        elif gs > 0 and world > 1 and world % min(gs, world) != 0:
            errors.append(f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE={gs} does not divide the world size {world}; "
                          "pick a divisor (or -1 for per node, 0 for global)")
        sbn_type = get(cfg, "MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE")
        if sbn_type not in ("pytorch", "apex"):
            errors.append("config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE must be pytorch or apex")
        elif sbn_type == "apex" and for_training and not apex_available():
            # VISSL's own files ask for apex, which current images lack: run torch's SyncBatchNorm over the
            # same groups, and record it (the resolved config says what ran)
            derived["MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE"] = "pytorch"
            notes.append("config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex: apex is not installed here, so torch's "
                         "SyncBatchNorm runs over the same groups; set config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE="
                         "pytorch to silence this")
    amp = get(cfg, "MODEL.AMP_PARAMS")
    if amp["USE_AMP"] and amp.get("AMP_TYPE") == "apex":
        derived["MODEL.AMP_PARAMS.AMP_TYPE"] = "pytorch"
        notes.append("config.MODEL.AMP_PARAMS.AMP_TYPE=apex runs as torch's native mixed precision (opt_level "
                     "O1/O2: autocast + GradScaler); set config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch to silence this")
    backend, device = get(cfg, "DISTRIBUTED.BACKEND"), get(cfg, "MACHINE.DEVICE")
    if backend == "nccl" and device == "cpu":
        errors.append("config.DISTRIBUTED.BACKEND=nccl runs on CUDA devices only but config.MACHINE.DEVICE=cpu; "
                      "set config.DISTRIBUTED.BACKEND=gloo")
    level = str((amp.get("AMP_ARGS") or {}).get("opt_level", "O1"))
    if amp["USE_AMP"] and level not in ("O0", "O1", "O2"):
        errors.append(f"config.MODEL.AMP_PARAMS.AMP_ARGS.opt_level={level}: only O0, O1 and O2 are supported (O1/O2 "
                      "run as native autocast float16 + GradScaler); use O1, or DTYPE=bfloat16")
    return world


# ---------------------------------------------------------------------------------------- LR schedule
def _check_schedule(lr: dict, errors: list) -> bool:
    from dcv2_k8s.optim.schedule import CHILD_SCHEDULES, SCHEDULES

    name = lr.get("name")
    if name not in SCHEDULES:
        errors.append(f"config.{LR}.name={name!r}: choose from {sorted(SCHEDULES)}")
        return False
    if name != "composite":
        return True
    scheds, lengths = lr.get("schedulers") or [], lr.get("lengths") or []
    scaling = lr.get("interval_scaling") or ["rescaled"] * len(scheds)
    if not scheds or len(scheds) != len(lengths) or len(scaling) != len(scheds):
        errors.append(f"config.{LR}: composite needs schedulers, lengths and interval_scaling of the same length")
        return False
    if abs(sum(lengths) - 1.0) > 1e-6:
        errors.append(f"config.{LR}.lengths={list(lengths)} must sum to 1")
    for i, s in enumerate(scheds):
        if s.get("name") not in CHILD_SCHEDULES:
            errors.append(f"config.{LR}.schedulers[{i}].name={s.get('name')!r}: inside a composite schedule choose "
                          f"from {sorted(CHILD_SCHEDULES)}")
            return False
    return True


def _derive_lr(cfg: dict, derived: dict, world: int, src: Sources, errors: list, notes: list) -> None:
    lr = get(cfg, LR)
    if not _check_schedule(lr, errors):
        return
    auto = lr.get("auto_lr_scaling") or {}
    if not auto.get("auto_scale"):
        return
    global_batch = get(cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA") * world
    peak = auto["base_value"] * global_batch / auto["base_lr_batch_size"]
    why = f"auto_lr_scaling: {auto['base_value']} x {global_batch}/{auto['base_lr_batch_size']}"
    name = lr["name"]

    def fill(key: str, value: Any, reason: str = why) -> None:
        _fill(cfg, derived, key, value, reason, src, errors, notes)

    if name == "composite":
        for i, s in enumerate(lr["schedulers"]):
            prefix = f"{LR}.schedulers.{i}"
            if s["name"] == "linear":
                fill(f"{prefix}.end_value", peak)
                if s.get("start_value", 0) > peak:
                    fill(f"{prefix}.start_value", peak, "warmup start capped at the scaled peak")
            elif s["name"] == "cosine":
                fill(f"{prefix}.start_value", peak)
            elif s["name"] == "constant":
                fill(f"{prefix}.value", peak)
    elif name in ("cosine", "linear"):
        fill(f"{LR}.{'start_value' if name == 'cosine' else 'end_value'}", peak)
    elif name == "constant":
        fill(f"{LR}.value", peak)
    elif name == "swav_warmup_cosine":
        fill(f"{LR}.base_lr", peak)
    elif name in ("multistep", "step") and lr.get("values"):
        values = lr["values"]
        fill(f"{LR}.values", [v * peak / values[0] for v in values])


# ---------------------------------------------------------------------------------------------- entry
def derive_and_validate(cfg: dict, src: Sources, errors: list, notes: list, world_size: int | None,
                        local_world_size: int | None, for_training: bool = True) -> dict[str, Any]:
    """Check every rule of ``cfg`` beyond its fields' own (each value has typed and met those already) and return
    the derived values (dotted key -> value, ready for ``schema.with_values``); ``cfg`` itself is only read."""
    derived: dict[str, Any] = {}
    mc = multicrop_of(get(cfg, "DATA.TRAIN.TRANSFORMS"))
    _check_transforms(cfg, for_training, errors)
    feat = _check_trunk(cfg, errors)
    if for_training:
        if feat is not None:
            _head(cfg, derived, feat, src, errors, notes)
        _check_memory_bank(cfg, mc, errors)
    world = _check_distributed(cfg, derived, world_size, local_world_size, for_training, errors, notes)
    if for_training and not get(cfg, "DATA.TRAIN.DROP_LAST"):
        errors.append("config.DATA.TRAIN.DROP_LAST must be true for DeepClusterV2 (every rank's memory bank "
                      "must have the same size)")
    if errors:
        return derived
    _repeated(src, f"{LOSS}.BATCHSIZE_PER_REPLICA", get(cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA"),
              "DATA.TRAIN.BATCHSIZE_PER_REPLICA", errors, notes)
    _repeated(src, f"{LOSS}.DROP_LAST", get(cfg, "DATA.TRAIN.DROP_LAST"), "DATA.TRAIN.DROP_LAST", errors, notes)
    _repeated(src, f"{LOSS}.num_crops", sum(mc.num_crops), "sum of ImgPilToMultiCrop.num_crops", errors, notes)
    _repeated(src, f"{LOSS}.num_train_samples", None, "the dataset's length is used (after DATA_LIMIT)", errors,
              notes)
    _derive_lr(cfg, derived, world, src, errors, notes)
    return derived


def check_dataset(cfg: Config, num_samples: int, world: int | None = None) -> list[str]:
    """What the dataset's size means for the run (checked once the data is on this node): at least one batch
    per rank, and no more clusters than each rank's memory bank holds. ``world`` overrides the config's world size
    (preflight passes the one its other suggestions lead to). Every line's suggestion is a token that works when
    typed, and the clusters are checked against the batch size that the first line suggests."""
    world = world or cfg.DISTRIBUTED.world_size
    bs = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    share = -(-num_samples // world)  # DistributedSampler pads to a multiple of the world size
    problems = []
    if share < bs:
        problems.append(f"the dataset has {num_samples} images: {share} per rank over {world} ranks, fewer than one "
                        f"batch of {bs} (config.DATA.TRAIN.BATCHSIZE_PER_REPLICA); set "
                        f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={share} or use fewer processes")
        bs = share
    per_rank = (share // bs) * bs  # drop_last keeps whole batches
    heads = list(cfg.LOSS.deepclusterv2_loss.num_clusters)
    if max(heads) > per_rank:
        fixed = ", ".join(str(min(k, per_rank)) for k in heads)
        problems.append(f"config.{LOSS}.num_clusters={heads}: {max(heads)} clusters but each rank's memory bank "
                        f"holds {per_rank} embeddings ({num_samples} images / {world} ranks, whole batches of {bs}); "
                        f"set config.{LOSS}.num_clusters=[{fixed}]")
    return problems
