"""Derived values and cross-key checks.

A derived value is computed from its source of truth. If the user also gave it:
- on the command line, a different value is an error naming both values;
- in a config file (VISSL's files carry placeholders such as ``num_train_samples: 1281167``), the
  derived value is used and a note names both values. Nothing is replaced silently.
"""

from __future__ import annotations

import importlib.util

from typing import Any

from dcv2_k8s.config.loader import _get, _set

LOSS = "LOSS.deepclusterv2_loss"
DEPTHS = {18: "basic", 34: "basic", 50: "bottleneck", 101: "bottleneck", 152: "bottleneck"}
TRANSFORM_NAMES = {"ImgPilToMultiCrop", "RandomHorizontalFlip", "ImgPilColorDistortion", "ImgPilGaussianBlur",
                   "ToTensor", "Normalize", "ImgPilRandomGrayscale", "ColorJitter"}
SCHEDULER_NAMES = {"composite", "linear", "cosine", "constant", "multistep", "step", "swav_warmup_cosine"}


def trunk_out_dim(depth: int, width: float) -> int:
    return int(64 * width) * 8 * (1 if DEPTHS[depth] == "basic" else 4)


def _given_in(key: str, keys: set) -> bool:
    """Whether ``key`` or a section/list containing it was written by that source."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))


def _fill(cfg: dict, key: str, value: Any, why: str, cli_keys: set, file_keys: set, errors: list,
          notes: list) -> None:
    given = _get(cfg, key)
    if given is not None and given != value:
        if _given_in(key, cli_keys):
            errors.append(f"config.{key}={given!r} conflicts with the derived value {value!r} ({why}); "
                          f"drop config.{key} or change the source")
            return
        if _given_in(key, file_keys):
            notes.append(f"config.{key}: using the derived value {value!r} ({why}) instead of {given!r} "
                         "from the config file")
    _set(cfg, key, value)


def multicrop_params(cfg: dict) -> dict | None:
    for t in _get(cfg, "DATA.TRAIN.TRANSFORMS") or []:
        if isinstance(t, dict) and t.get("name") == "ImgPilToMultiCrop":
            return t
    return None


def _check_transforms(cfg: dict, errors: list) -> dict | None:
    transforms = _get(cfg, "DATA.TRAIN.TRANSFORMS")
    if not isinstance(transforms, list) or not transforms:
        errors.append("config.DATA.TRAIN.TRANSFORMS must be a non-empty list of {name: ..., ...} entries")
        return None
    for i, t in enumerate(transforms):
        if not isinstance(t, dict) or "name" not in t:
            errors.append(f"config.DATA.TRAIN.TRANSFORMS[{i}] must be a mapping with a 'name'")
        elif t["name"] not in TRANSFORM_NAMES:
            errors.append(f"config.DATA.TRAIN.TRANSFORMS[{i}].name={t['name']!r} is not supported; "
                          f"choose from {sorted(TRANSFORM_NAMES)}")
    mc = multicrop_params(cfg)
    if mc is None:
        errors.append("config.DATA.TRAIN.TRANSFORMS needs an ImgPilToMultiCrop entry (DeepClusterV2 is multi-crop)")
        return None
    key = "config.DATA.TRAIN.TRANSFORMS[ImgPilToMultiCrop]"
    nc, sc, cs, total = mc.get("num_crops"), mc.get("size_crops"), mc.get("crop_scales"), mc.get("total_num_crops")
    if not (isinstance(nc, list) and isinstance(sc, list) and isinstance(cs, list)):
        errors.append(f"{key}: num_crops, size_crops and crop_scales must be lists")
        return None
    if not (len(nc) == len(sc) == len(cs)):
        errors.append(f"{key}: size_crops ({len(sc)}), num_crops ({len(nc)}) and crop_scales ({len(cs)}) "
                      "must have the same length, one entry per resolution")
        return None
    if total is not None and sum(nc) != total:
        errors.append(f"{key}: sum(num_crops)={sum(nc)} != total_num_crops={total}; make them agree")
    for s in cs:
        if not (isinstance(s, list) and len(s) == 2 and 0 < s[0] <= s[1] <= 1):
            errors.append(f"{key}: crop_scales entry {s!r} must be [min, max] with 0 < min <= max <= 1")
    if any(not isinstance(v, int) or v <= 0 for v in list(nc) + list(sc)):
        errors.append(f"{key}: num_crops and size_crops must be positive integers")
    return mc


def _check_head(cfg: dict, errors: list, notes: list) -> None:
    params = _get(cfg, "MODEL.HEAD.PARAMS")
    depth = _get(cfg, "MODEL.TRUNK.RESNETS.DEPTH")
    width = _get(cfg, "MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER")
    if _get(cfg, "MODEL.TRUNK.NAME") != "resnet":
        errors.append(f"config.MODEL.TRUNK.NAME={_get(cfg, 'MODEL.TRUNK.NAME')!r}: only 'resnet' is supported")
    if depth not in DEPTHS:
        errors.append(f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}: choose one of {sorted(DEPTHS)}")
        return
    if not isinstance(width, (int, float)) or width <= 0 or int(64 * width) != 64 * width:
        errors.append(f"config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER={width}: must be positive with 64 x width "
                      "a whole number of channels (e.g. 0.25, 0.5, 1, 2, 4)")
        return
    if not isinstance(params, list) or not params:
        errors.append("config.MODEL.HEAD.PARAMS must be a list like [[\"mlp\", {\"dims\": [2048, 128]}]]")
        return
    prev = trunk_out_dim(depth, width)
    allowed = {"dims", "use_relu", "use_bn", "skip_last_layer_relu_bn", "use_bias", "use_dropout"}
    for i, stage in enumerate(params):
        if not (isinstance(stage, list) and len(stage) == 2 and stage[0] == "mlp" and isinstance(stage[1], dict)):
            errors.append(f"config.MODEL.HEAD.PARAMS[{i}]={stage!r} must be [\"mlp\", {{\"dims\": [...], ...}}]")
            return
        opts = stage[1]
        unknown = set(opts) - allowed
        if unknown:
            errors.append(f"config.MODEL.HEAD.PARAMS[{i}]: unknown mlp option(s) {sorted(unknown)}; "
                          f"allowed: {sorted(allowed)}")
        dims = opts.get("dims")
        if not (isinstance(dims, list) and len(dims) >= 2 and all(isinstance(d, int) and d > 0 for d in dims)):
            errors.append(f"config.MODEL.HEAD.PARAMS[{i}].dims={dims!r} must list at least two positive sizes")
            return
        if dims[0] != prev:
            what = "the trunk's feature size" if i == 0 else f"the output of PARAMS[{i - 1}]"
            errors.append(f"config.MODEL.HEAD.PARAMS[{i}].dims starts at {dims[0]} but {what} is {prev}; "
                          f"set dims[0]={prev}")
        if (opts.get("use_relu") or opts.get("use_bn")) and "skip_last_layer_relu_bn" not in opts \
                and len(dims) == 2:
            notes.append(f"config.MODEL.HEAD.PARAMS[{i}] sets use_relu/use_bn but skip_last_layer_relu_bn "
                         "defaults to true, so its only layer gets no ReLU/BN (as in VISSL); set "
                         "skip_last_layer_relu_bn: false to apply them")
        prev = dims[-1]
    emb = _get(cfg, f"{LOSS}.memory_params.embedding_dim")
    if prev != emb:
        errors.append(f"config.{LOSS}.memory_params.embedding_dim={emb} but the head outputs {prev}; "
                      f"make the last MODEL.HEAD.PARAMS dims end at {emb} (or set embedding_dim={prev})")


def _check_loss(cfg: dict, mc: dict | None, errors: list) -> None:
    loss = _get(cfg, LOSS)
    k = loss["num_clusters"]
    if not (isinstance(k, list) and k and all(isinstance(v, int) and v > 1 for v in k)):
        errors.append(f"config.{LOSS}.num_clusters={k!r} must be a non-empty list of integers > 1")
    if not (isinstance(loss["temperature"], (int, float)) and loss["temperature"] > 0):
        errors.append(f"config.{LOSS}.temperature must be > 0")
    if not (isinstance(loss["kmeans_iters"], int) and loss["kmeans_iters"] >= 0):
        errors.append(f"config.{LOSS}.kmeans_iters must be an integer >= 0")
    mb = loss["memory_params"]["crops_for_mb"]
    if mc is not None and isinstance(mc.get("num_crops"), list) and mc["num_crops"]:
        n_large = mc["num_crops"][0]
        if not (isinstance(mb, list) and mb and all(isinstance(c, int) and 0 <= c < n_large for c in mb)):
            errors.append(f"config.{LOSS}.memory_params.crops_for_mb={mb!r} must index the large crops "
                          f"(0..{n_large - 1}, the first {n_large} of size {mc['size_crops'][0]})")
        if len(mc["size_crops"]) > 1 and max(mc["size_crops"]) != mc["size_crops"][0]:
            errors.append("config.DATA.TRAIN.TRANSFORMS[ImgPilToMultiCrop].size_crops must list the large crops "
                          "first (the memory bank is filled from them)")


def _check_distributed(cfg: dict, world_size: int | None, local_world_size: int | None, errors: list,
                       notes: list) -> int:
    nodes = _get(cfg, "DISTRIBUTED.NUM_NODES")
    ppn = _get(cfg, "DISTRIBUTED.NUM_PROC_PER_NODE")
    for key, v in (("NUM_NODES", nodes), ("NUM_PROC_PER_NODE", ppn)):
        if v is not None and v < 1:
            errors.append(f"config.DISTRIBUTED.{key}={v} must be >= 1")
            return 1
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
    nodes = nodes or 1
    ppn = ppn or 1
    _set(cfg, "DISTRIBUTED.NUM_NODES", nodes)
    _set(cfg, "DISTRIBUTED.NUM_PROC_PER_NODE", ppn)
    if _get(cfg, "DISTRIBUTED.BACKEND") not in ("auto", "nccl", "gloo"):
        errors.append(f"config.DISTRIBUTED.BACKEND={_get(cfg, 'DISTRIBUTED.BACKEND')!r}: choose auto, nccl or gloo")
    if _get(cfg, "DISTRIBUTED.TIMEOUT_SECONDS") <= 0:
        errors.append("config.DISTRIBUTED.TIMEOUT_SECONDS must be > 0")
    if _get(cfg, "DISTRIBUTED.MAX_RESTARTS") < 0:
        errors.append("config.DISTRIBUTED.MAX_RESTARTS must be >= 0")
    world = nodes * ppn
    gs = _get(cfg, "MODEL.SYNC_BN_CONFIG.GROUP_SIZE")
    if _get(cfg, "MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN"):
        if gs < -1:
            errors.append(f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE={gs}: use -1 (per node), 0 (global) or > 0")
        elif gs > 0 and world > 1 and world % min(gs, world) != 0:
            errors.append(f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE={gs} does not divide the world size {world}; "
                          "pick a divisor (or -1 for per node, 0 for global)")
        if _get(cfg, "MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE") not in ("pytorch", "apex"):
            errors.append("config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE must be pytorch or apex")
    if _get(cfg, "MACHINE.DEVICE") not in ("auto", "gpu", "cpu", "cuda"):
        errors.append(f"config.MACHINE.DEVICE={_get(cfg, 'MACHINE.DEVICE')!r}: choose auto, gpu or cpu")
    amp = _get(cfg, "MODEL.AMP_PARAMS")
    if amp["AMP_TYPE"] not in ("pytorch", "apex"):
        errors.append(f"config.MODEL.AMP_PARAMS.AMP_TYPE={amp['AMP_TYPE']!r}: choose pytorch or apex")
    level = str((amp.get("AMP_ARGS") or {}).get("opt_level", "O1"))
    if amp["USE_AMP"] and level not in ("O0", "O1", "O2"):
        errors.append(f"config.MODEL.AMP_PARAMS.AMP_ARGS.opt_level={level}: only O0, O1 and O2 are supported (O1/O2 "
                      "run as native autocast float16 + GradScaler); use O1, or DTYPE=bfloat16")
    if amp["DTYPE"] not in ("float16", "bfloat16"):
        errors.append(f"config.MODEL.AMP_PARAMS.DTYPE={amp['DTYPE']!r}: choose float16 or bfloat16")
    return world


def _derive_lr(cfg: dict, world: int, cli_keys: set, file_keys: set, errors: list, notes: list) -> None:
    lr = _get(cfg, "OPTIMIZER.param_schedulers.lr")
    name = lr.get("name")
    if name not in SCHEDULER_NAMES:
        errors.append(f"config.OPTIMIZER.param_schedulers.lr.name={name!r}: choose from {sorted(SCHEDULER_NAMES)}")
        return
    if lr.get("update_interval", "step") not in ("step", "epoch"):
        errors.append("config.OPTIMIZER.param_schedulers.lr.update_interval must be step or epoch")
    if name == "composite":
        scheds, lengths = lr.get("schedulers") or [], lr.get("lengths") or []
        scaling = lr.get("interval_scaling") or ["rescaled"] * len(scheds)
        if not scheds or len(scheds) != len(lengths) or len(scaling) != len(scheds):
            errors.append("config.OPTIMIZER.param_schedulers.lr: composite needs schedulers, lengths and "
                          "interval_scaling of the same length")
            return
        if abs(sum(lengths) - 1.0) > 1e-6:
            errors.append(f"config.OPTIMIZER.param_schedulers.lr.lengths={lengths} must sum to 1")
        for i, s in enumerate(scheds):
            if not isinstance(s, dict) or s.get("name") not in SCHEDULER_NAMES - {"composite"}:
                errors.append(f"config.OPTIMIZER.param_schedulers.lr.schedulers[{i}] has an unknown name")
                return
        if any(x not in ("rescaled", "fixed") for x in scaling):
            errors.append("config.OPTIMIZER.param_schedulers.lr.interval_scaling entries must be rescaled or fixed")
    auto = lr.get("auto_lr_scaling") or {}
    if not auto.get("auto_scale"):
        return
    global_batch = _get(cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA") * world
    peak = float(auto["base_value"]) * global_batch / float(auto["base_lr_batch_size"])
    why = f"auto_lr_scaling: {auto['base_value']} x {global_batch}/{auto['base_lr_batch_size']}"
    base = "OPTIMIZER.param_schedulers.lr"
    if name == "composite":
        for i, s in enumerate(lr["schedulers"]):
            prefix = f"{base}.schedulers.{i}"
            if s["name"] == "linear":
                _fill(cfg, f"{prefix}.end_value", peak, why, cli_keys, file_keys, errors, notes)
                if s.get("start_value", 0) > peak:
                    _fill(cfg, f"{prefix}.start_value", peak, "warmup start capped at the scaled peak", cli_keys,
                          file_keys, errors, notes)
            elif s["name"] in ("cosine", "swav_warmup_cosine"):
                _fill(cfg, f"{prefix}.start_value", peak, why, cli_keys, file_keys, errors, notes)
            elif s["name"] == "constant":
                _fill(cfg, f"{prefix}.value", peak, why, cli_keys, file_keys, errors, notes)
    elif name in ("cosine", "linear"):
        key = "start_value" if name == "cosine" else "end_value"
        _fill(cfg, f"{base}.{key}", peak, why, cli_keys, file_keys, errors, notes)
    elif name == "constant":
        _fill(cfg, f"{base}.value", peak, why, cli_keys, file_keys, errors, notes)
    elif name == "swav_warmup_cosine":
        _fill(cfg, f"{base}.base_lr", peak, why, cli_keys, file_keys, errors, notes)
    elif name in ("multistep", "step"):
        values = lr.get("values") or []
        if values:
            scaled = [v * peak / values[0] for v in values]
            _fill(cfg, f"{base}.values", scaled, why, cli_keys, file_keys, errors, notes)


def derive_and_validate(cfg: dict, cli_keys: set, file_keys: set, errors: list, notes: list,
                        world_size: int | None, local_world_size: int | None,
                        num_train_samples: int | None, for_training: bool = True) -> None:
    mc = _check_transforms(cfg, errors)
    backend = _get(cfg, "DATA.TRAIN.AUG_BACKEND")
    if backend not in ("pil", "opencv"):
        errors.append(f"config.DATA.TRAIN.AUG_BACKEND={backend!r}: choose pil or opencv")
    elif backend == "opencv" and for_training and importlib.util.find_spec("cv2") is None:
        errors.append("config.DATA.TRAIN.AUG_BACKEND=opencv but OpenCV is not installed; pip install "
                      "opencv-python-headless, or set config.DATA.TRAIN.AUG_BACKEND=pil")
    port = _get(cfg, "METRICS.PORT")
    if not 1 <= port <= 65535:
        errors.append(f"config.METRICS.PORT={port} must be a TCP port between 1 and 65535")
    if _get(cfg, "TRAINER.NONFINITE_POLICY") not in ("stop", "skip"):
        errors.append(f"config.TRAINER.NONFINITE_POLICY={_get(cfg, 'TRAINER.NONFINITE_POLICY')!r}: choose stop or skip")
    if for_training:
        _check_head(cfg, errors, notes)
        _check_loss(cfg, mc, errors)
    elif _get(cfg, "MODEL.TRUNK.RESNETS.DEPTH") not in DEPTHS:
        errors.append(f"config.MODEL.TRUNK.RESNETS.DEPTH={_get(cfg, 'MODEL.TRUNK.RESNETS.DEPTH')}: choose one of "
                      f"{sorted(DEPTHS)}")
    world = _check_distributed(cfg, world_size, local_world_size, errors, notes)
    bs = _get(cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA")
    if bs < 1:
        errors.append(f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={bs} must be >= 1")
    if _get(cfg, "OPTIMIZER.num_epochs") < 1:
        errors.append("config.OPTIMIZER.num_epochs must be >= 1")
    if errors:
        return
    _fill(cfg, f"{LOSS}.BATCHSIZE_PER_REPLICA", bs, "DATA.TRAIN.BATCHSIZE_PER_REPLICA", cli_keys, file_keys,
          errors, notes)
    _fill(cfg, f"{LOSS}.DROP_LAST", bool(_get(cfg, "DATA.TRAIN.DROP_LAST")), "DATA.TRAIN.DROP_LAST", cli_keys,
          file_keys, errors, notes)
    _fill(cfg, f"{LOSS}.num_crops", sum(mc["num_crops"]), "sum of ImgPilToMultiCrop.num_crops", cli_keys,
          file_keys, errors, notes)
    if not _get(cfg, "DATA.TRAIN.DROP_LAST"):
        errors.append("config.DATA.TRAIN.DROP_LAST must be true for DeepClusterV2 (every rank's memory bank "
                      "must have the same size)")
    if num_train_samples is not None:
        _fill(cfg, f"{LOSS}.num_train_samples", num_train_samples, "the dataset length", cli_keys, file_keys,
              errors, notes)
        # DistributedSampler pads to a multiple of the world size; drop_last keeps whole batches
        per_rank = (-(-num_train_samples // world) // bs) * bs
        if per_rank == 0:
            errors.append(f"the dataset has {num_train_samples} images, fewer than one batch per rank "
                          f"({bs} x {world} ranks); lower config.DATA.TRAIN.BATCHSIZE_PER_REPLICA")
        kmax = max(_get(cfg, f"{LOSS}.num_clusters"))
        if per_rank and kmax > per_rank:
            errors.append(f"config.{LOSS}.num_clusters has {kmax} clusters but each rank's memory bank holds "
                          f"{per_rank} embeddings ({num_train_samples} images / {world} ranks, whole batches of "
                          f"{bs}); lower num_clusters to <= {per_rank}")
    _derive_lr(cfg, world, cli_keys, file_keys, errors, notes)
