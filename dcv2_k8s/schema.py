"""The typed, frozen form of a resolved configuration (what every module reads; ``config/`` resolves it).

``defaults.yaml`` holds every key's default value and its comment; the dataclasses here hold every key's type.
``build(raw)`` turns the resolved nested dict into a :class:`Config`: lists become tuples, integers given for
floats become floats, and a value of the wrong type is reported as one line naming the key. A field declared with
:func:`checked` also carries the rules its value must meet on its own (``num_clusters`` > 1, a port's range, the
choices of a name); ``build`` runs them on every value that typed, in the same pass. Rules that span keys, or whose
facts live in other modules, are ``config/derive.py``'s. Code reads the result
directly (``cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA`` is an ``int``), never through casts. The nested
dict stays with the resolved config (``Resolved.raw``): it is the YAML that checkpoints carry and spawned
processes load.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple

HEAD_OPTIONS = ("dims", "use_relu", "use_bn", "skip_last_layer_relu_bn", "use_bias", "use_dropout")
SCHEDULER_KEYS = ("name", "start_value", "end_value", "value", "values", "milestones", "base_lr", "final_lr",
                  "start_warmup", "warmup_fraction", "schedulers", "lengths", "interval_scaling", "update_interval",
                  "auto_lr_scaling")


# ------------------------------------------------------------------------------------- field rules
def checked(ok: Callable[[Any], bool], message: str, **kw) -> Any:
    """A dataclass field whose typed value must also satisfy ``ok(value)``; else the error line is ``message``
    formatted with ``key`` (dotted) and ``value`` (as written). ``kw`` are :func:`dataclasses.field`'s."""
    return checked_by(lambda key, value: [] if ok(value) else [message.format(key=key, value=value)], **kw)


def checked_by(check: Callable[[str, Any], list], **kw) -> Any:
    """A dataclass field whose typed value is also checked by ``check(key, value)`` -> its error lines."""
    return field(metadata={"check": check}, **kw)


# ------------------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class Transform:
    """One entry of ``DATA.TRAIN.TRANSFORMS``: a VISSL transform name and its arguments."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def as_dict(self) -> dict:
        return {"name": self.name, **{k: _thaw(v) for k, v in self.params.items()}}


@dataclass(frozen=True)
class MultiCrop:
    """The ``ImgPilToMultiCrop`` entry: per resolution, how many crops of which size from which scale range."""

    num_crops: Tuple[int, ...]
    size_crops: Tuple[int, ...]
    crop_scales: Tuple[Tuple[float, float], ...]
    total_num_crops: Optional[int] = None

    @property
    def sizes(self) -> list[int]:
        """The side of every crop, in the order the model sees them (large crops first)."""
        return [s for n, s in zip(self.num_crops, self.size_crops) for _ in range(n)]

    @property
    def crops(self) -> list[tuple[int, tuple[float, float]]]:
        """(size, scale range) of every crop, in order."""
        return [(s, tuple(c)) for n, s, c in zip(self.num_crops, self.size_crops, self.crop_scales) for _ in range(n)]

    @property
    def large_size(self) -> int:
        return self.size_crops[0]

    @property
    def n_large(self) -> int:
        return self.num_crops[0]


def multicrop_of(transforms) -> MultiCrop | None:
    """The multi-crop entry of a transform list (typed entries or plain dicts); None when there is none. The one
    place that knows where the crop layout lives."""
    for t in transforms or ():
        d = t.as_dict() if isinstance(t, Transform) else t
        if isinstance(d, dict) and d.get("name") == "ImgPilToMultiCrop":
            return MultiCrop(tuple(d.get("num_crops") or ()), tuple(d.get("size_crops") or ()),
                             tuple(tuple(s) for s in d.get("crop_scales") or ()), d.get("total_num_crops"))
    return None


def normalize_of(transforms) -> tuple[list[float], list[float]]:
    """(mean, std) of the ``Normalize`` entry (ImageNet's when there is none)."""
    for t in transforms or ():
        d = t.as_dict() if isinstance(t, Transform) else t
        if d.get("name") == "Normalize":
            return list(d["mean"]), list(d["std"])
    return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _transforms_errors(key: str, transforms: list) -> list[str]:
    """``DATA.TRAIN.TRANSFORMS`` on its own: not empty, with one well-formed ImgPilToMultiCrop entry. (Which names
    exist, and on which side of the multi-crop each goes, is ``data/transforms.py``'s: ``config/derive.py``.)"""
    if not transforms:
        return [f"config.{key} must be a non-empty list of {{name: ..., ...}} entries"]
    mc = multicrop_of(transforms)
    if mc is None:
        return [f"config.{key} needs an ImgPilToMultiCrop entry (DeepClusterV2 is multi-crop)"]
    where = f"config.{key}[ImgPilToMultiCrop]"
    nc, sc, cs = mc.num_crops, mc.size_crops, mc.crop_scales
    if not (len(nc) == len(sc) == len(cs)) or not nc:
        return [f"{where}: size_crops ({len(sc)}), num_crops ({len(nc)}) and crop_scales ({len(cs)}) "
                "must have the same length, one entry per resolution"]
    errors = []
    if mc.total_num_crops is not None and sum(nc) != mc.total_num_crops:
        errors.append(f"{where}: sum(num_crops)={sum(nc)} != total_num_crops={mc.total_num_crops}; make them agree")
    for s in cs:
        if not (len(s) == 2 and all(isinstance(v, (int, float)) for v in s) and 0 < s[0] <= s[1] <= 1):
            errors.append(f"{where}: crop_scales entry {list(s)!r} must be [min, max] with 0 < min <= max <= 1")
    if any(not isinstance(v, int) or v <= 0 for v in list(nc) + list(sc)):
        errors.append(f"{where}: num_crops and size_crops must be positive integers")
    return errors


@dataclass(frozen=True)
class HeadStage:
    """``["mlp", {dims, use_relu, use_bn, skip_last_layer_relu_bn, use_bias, use_dropout}]`` (VISSL's MLP)."""

    dims: Tuple[int, ...]
    use_relu: bool = False
    use_bn: bool = False
    skip_last_layer_relu_bn: bool = True
    use_bias: bool = True
    use_dropout: bool = False


@dataclass(frozen=True)
class AutoLR:
    auto_scale: bool = False
    base_value: float = 0.3
    base_lr_batch_size: int = 256


@dataclass(frozen=True)
class Schedule:
    """``OPTIMIZER.param_schedulers.lr`` or one child of a composite schedule (see ``optim/schedule.py``)."""

    name: str
    start_value: Optional[float] = None
    end_value: Optional[float] = None
    value: Optional[float] = None
    values: Tuple[float, ...] = ()
    milestones: Tuple[float, ...] = ()
    base_lr: Optional[float] = None
    final_lr: Optional[float] = None
    start_warmup: Optional[float] = None
    warmup_fraction: Optional[float] = None
    schedulers: Tuple["Schedule", ...] = ()
    lengths: Tuple[float, ...] = ()
    interval_scaling: Tuple[str, ...] = checked(lambda v: all(x in ("rescaled", "fixed") for x in v),
                                                "config.{key} entries must be rescaled or fixed", default=())
    update_interval: str = checked(lambda v: v in ("step", "epoch"), "config.{key} must be step or epoch",
                                   default="step")
    auto_lr_scaling: Optional[AutoLR] = None


# ----------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class TrainData:
    DATA_SOURCES: Tuple[str, ...]
    DATA_PATHS: Tuple[str, ...]
    STAGE_DIR: str
    DATA_LIMIT: int
    BATCHSIZE_PER_REPLICA: int = checked(lambda v: v >= 1, "config.{key}={value} must be >= 1")
    DROP_LAST: bool
    LABEL_TYPE: str
    COLLATE_FUNCTION: str
    AUG_BACKEND: str = checked(lambda v: v in ("pil", "opencv"), "config.{key}={value!r}: choose pil or opencv")
    TRANSFORMS: Tuple[Transform, ...] = checked_by(_transforms_errors)

    @property
    def multicrop(self) -> MultiCrop:
        mc = multicrop_of(self.TRANSFORMS)
        if mc is None:  # validation refuses such a config; this is for hand-built ones
            raise ValueError("DATA.TRAIN.TRANSFORMS has no ImgPilToMultiCrop entry")
        return mc

    @property
    def normalize(self) -> tuple[list[float], list[float]]:
        return normalize_of(self.TRANSFORMS)

    @property
    def preprocess(self) -> tuple[dict, ...]:
        """The whole-image preprocessing entries (those before ImgPilToMultiCrop), which every evaluation view
        applies too."""
        entries = [t.as_dict() for t in self.TRANSFORMS]
        names = [e["name"] for e in entries]
        return tuple(entries[:names.index("ImgPilToMultiCrop")]) if "ImgPilToMultiCrop" in names else ()


@dataclass(frozen=True)
class TestData:
    DATA_PATHS: Tuple[str, ...]
    BATCHSIZE_PER_REPLICA: int


@dataclass(frozen=True)
class Data:
    NUM_DATALOADER_WORKERS: int
    PIN_MEMORY: bool
    PREFETCH_FACTOR: int
    TRAIN: TrainData
    TEST: TestData


@dataclass(frozen=True)
class ResNets:
    DEPTH: int
    WIDTH_MULTIPLIER: float = checked(lambda v: v > 0 and int(64 * v) == 64 * v,
                                      "config.{key}={value}: must be positive with 64 x width a whole number of "
                                      "channels (e.g. 0.25, 0.5, 1, 2, 4)")
    GROUPS: int
    WIDTH_PER_GROUP: int
    ZERO_INIT_RESIDUAL: bool


@dataclass(frozen=True)
class Trunk:
    NAME: str = checked(lambda v: v == "resnet", "config.{key}={value!r}: only 'resnet' is supported")
    RESNETS: ResNets
    INPUT_NORM: str = "none"


@dataclass(frozen=True)
class Head:
    PARAMS: Tuple[HeadStage, ...]
    BATCHNORM_EPS: float
    BATCHNORM_MOMENTUM: float


@dataclass(frozen=True)
class SyncBN:
    CONVERT_BN_TO_SYNC_BN: bool
    SYNC_BN_TYPE: str
    GROUP_SIZE: int


@dataclass(frozen=True)
class Amp:
    USE_AMP: bool
    AMP_TYPE: str = checked(lambda v: v in ("pytorch", "apex"), "config.{key}={value!r}: choose pytorch or apex")
    AMP_ARGS: Mapping[str, Any]
    DTYPE: str = checked(lambda v: v in ("float16", "bfloat16"), "config.{key}={value!r}: choose float16 or bfloat16")


@dataclass(frozen=True)
class WeightsInit:
    PARAMS_FILE: str


@dataclass(frozen=True)
class Model:
    TRUNK: Trunk
    HEAD: Head
    SYNC_BN_CONFIG: SyncBN
    AMP_PARAMS: Amp
    WEIGHTS_INIT: WeightsInit
    CHANNELS_LAST: bool
    COMPILE: bool


@dataclass(frozen=True)
class MemoryParams:
    crops_for_mb: Tuple[int, ...]
    embedding_dim: int = checked(lambda v: v >= 1, "config.{key} must be >= 1")


@dataclass(frozen=True)
class DCv2Loss:
    temperature: float = checked(lambda v: v > 0, "config.{key} must be > 0")
    num_clusters: Tuple[int, ...] = checked(lambda v: v and all(k > 1 for k in v),
                                            "config.{key}={value!r} must be a non-empty list of integers > 1")
    kmeans_iters: int = checked(lambda v: v >= 0, "config.{key} must be an integer >= 0")
    memory_params: MemoryParams


@dataclass(frozen=True)
class Loss:
    name: str
    deepclusterv2_loss: DCv2Loss


@dataclass(frozen=True)
class Larc:
    clip: bool
    trust_coefficient: float
    eps: float


@dataclass(frozen=True)
class ParamSchedulers:
    lr: Schedule


@dataclass(frozen=True)
class Optimizer:
    name: str
    use_larc: bool
    larc_config: Larc
    weight_decay: float
    momentum: float
    nesterov: bool
    num_epochs: int = checked(lambda v: v >= 1, "config.{key} must be >= 1")
    regularize_bn: bool
    regularize_bias: bool
    param_schedulers: ParamSchedulers


@dataclass(frozen=True)
class Distributed:
    # always set once resolved (from the launcher, else 1)
    NUM_NODES: Optional[int] = checked(lambda v: v is None or v >= 1, "config.{key}={value} must be >= 1")
    NUM_PROC_PER_NODE: Optional[int] = checked(lambda v: v is None or v >= 1, "config.{key}={value} must be >= 1")
    BACKEND: str = checked(lambda v: v in ("auto", "nccl", "gloo"), "config.{key}={value!r}: choose auto, nccl or gloo")
    INIT_METHOD: str
    TIMEOUT_SECONDS: float = checked(lambda v: v > 0, "config.{key} must be > 0")
    MAX_RESTARTS: int = checked(lambda v: v >= 0, "config.{key} must be >= 0")

    @property
    def world_size(self) -> int:
        return (self.NUM_NODES or 1) * (self.NUM_PROC_PER_NODE or 1)


@dataclass(frozen=True)
class Machine:
    DEVICE: str = checked(lambda v: v in ("auto", "gpu", "cpu", "cuda"),
                          "config.{key}={value!r}: choose auto, gpu or cpu")


@dataclass(frozen=True)
class Checkpoint:
    DIR: str
    AUTO_RESUME: bool
    CHECKPOINT_FREQUENCY: int
    CHECKPOINT_ITER_FREQUENCY: int
    KEEP_LAST: int
    KEEP_EVERY_EPOCHS: int
    UPLOAD_RETRY_SECONDS: float


@dataclass(frozen=True)
class LinearEval:
    HEAD: str
    CROP_SIZE: int
    FEATURE_CACHE: bool
    OUTPUT: str


@dataclass(frozen=True)
class ExtractFeatures:
    OUTPUT_DIR: str


@dataclass(frozen=True)
class Metrics:
    ENABLED: bool
    PORT: int = checked(lambda v: 1 <= v <= 65535, "config.{key}={value} must be a TCP port between 1 and 65535")
    ADDR: str


@dataclass(frozen=True)
class Monitor:
    KNN_FREQUENCY: int = checked(lambda v: v >= 0, "config.{key}={value!r} must be an integer >= 0")
    KNN_K: int
    KNN_TEMPERATURE: float
    DIAG_FREQUENCY: int = checked(lambda v: v >= 0, "config.{key}={value!r} must be an integer >= 0")
    DIAG_IMAGES: int = checked(lambda v: v >= 2, "config.{key}={value!r} must be an integer >= 2")


@dataclass(frozen=True)
class Trainer:
    DETERMINISTIC: bool
    MAX_STEPS: int
    NONFINITE_POLICY: str = checked(lambda v: v in ("stop", "skip"), "config.{key}={value!r}: choose stop or skip")
    MAX_NONFINITE_SKIPS: int


@dataclass(frozen=True)
class TensorboardSetup:
    USE_TENSORBOARD: bool
    LOG_DIR: str
    EXPERIMENT_LOG_DIR: str
    FLUSH_EVERY_N_MIN: float = checked(lambda v: v > 0, "config.{key}={value!r} must be a number of minutes > 0")
    LOG_PARAMS: bool
    LOG_PARAMS_GRADIENTS: bool
    LOG_PARAMS_EVERY_N_ITERS: int = checked(lambda v: v > 0 or v == -1,
                                            "config.{key}={value!r}: a number of steps > 0, or -1 (every epoch)")


@dataclass(frozen=True)
class Hooks:
    TENSORBOARD_SETUP: TensorboardSetup


@dataclass(frozen=True)
class Config:
    LOG_FREQUENCY: int
    SEED_VALUE: int
    RUN_NAME: str
    DATA: Data
    MODEL: Model
    LOSS: Loss
    OPTIMIZER: Optimizer
    DISTRIBUTED: Distributed
    MACHINE: Machine
    CHECKPOINT: Checkpoint
    LINEAR_EVAL: LinearEval
    EXTRACT_FEATURES: ExtractFeatures
    METRICS: Metrics
    MONITOR: Monitor
    TRAINER: Trainer
    HOOKS: Hooks
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys added with +config.KEY=VALUE (not read)


# ------------------------------------------------------------------------------------------ building
def type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping", type(None): "null"}.get(type(v), type(v).__name__)


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    if isinstance(v, (dict, types.MappingProxyType)):
        return {k: _thaw(x) for k, x in v.items()}
    return v


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return types.MappingProxyType({k: _freeze(x) for k, x in v.items()})
    return v


class _Builder:
    def __init__(self):
        self.errors: list[str] = []

    def fail(self, key: str, value: Any, want: str) -> None:
        self.errors.append(f"config.{key}={value!r} must be {want}, got {type_name(value)}")

    def value(self, tp: Any, v: Any, key: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Union or origin is types.UnionType:
            if v is None and type(None) in args:
                return None
            return self.value(next(a for a in args if a is not type(None)), v, key)
        if tp is Any:
            return _freeze(v)
        if tp is bool:
            if not isinstance(v, bool):
                return self.fail(key, v, "a boolean")
            return v
        if tp is int:
            if not isinstance(v, int) or isinstance(v, bool):
                return self.fail(key, v, "an integer")
            return v
        if tp is float:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                return self.fail(key, v, "a number")
            return float(v)
        if tp is str:
            if not isinstance(v, str):
                return self.fail(key, v, "a string")
            return v
        if origin in (tuple, Tuple):
            if not isinstance(v, (list, tuple)):
                self.fail(key, v, "a list")
                if isinstance(v, (str, int, float)) and not isinstance(v, bool):  # how to write one, typed as is
                    self.errors[-1] += f"; write a list in brackets: config.{key}=[{v}]"
                return None
            item = args[0]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.value(item, x, f"{key}.{i}") for i, x in enumerate(v))
            if len(v) != len(args):
                return self.fail(key, v, f"a list of {len(args)}")
            return tuple(self.value(a, x, f"{key}.{i}") for i, (a, x) in enumerate(zip(args, v)))
        if origin in (Mapping, dict, collections.abc.Mapping) or tp is Mapping:
            if not isinstance(v, dict):
                return self.fail(key, v, "a mapping")
            return _freeze(v)
        if tp is Transform:
            return self.transform(v, key)
        if tp is HeadStage:
            return self.head_stage(v, key)
        if dataclasses.is_dataclass(tp):
            return self.section(tp, v, key)
        raise TypeError(f"no rule for {tp!r}")  # a bug in this file

    def field_value(self, f: dataclasses.Field, tp: Any, v: Any, key: str) -> Any:
        """One field's value typed, then, if it typed, checked by the field's own rule (see :func:`checked`)."""
        before = len(self.errors)
        out = self.value(tp, v, key)
        check = f.metadata.get("check")
        if check is not None and len(self.errors) == before:
            self.errors += check(key, v)
        return out

    def replaced(self, obj: Any, key: str, v: Any, at: str) -> Any:
        """``obj`` (typed) with the value at the dotted ``key`` replaced by ``v``, typed and checked as its field;
        ``at`` is the whole key, for error lines."""
        name, _, rest = key.partition(".")
        if isinstance(obj, tuple):  # an item of a list of sections (a composite schedule's children)
            i = int(name)
            return obj[:i] + (self.replaced(obj[i], rest, v, at),) + obj[i + 1:]
        f = next(f for f in dataclasses.fields(obj) if f.name == name)
        new = self.replaced(getattr(obj, name), rest, v, at) if rest else \
            self.field_value(f, typing.get_type_hints(type(obj))[name], v, at)
        return dataclasses.replace(obj, **{name: new})

    def section(self, cls: type, d: Any, key: str) -> Any:
        if not isinstance(d, dict):
            return self.fail(key, d, "a mapping")
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            sub = f"{key}.{f.name}" if key else f.name
            if f.name not in d:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.errors.append(f"config.{sub} is missing")
                continue
            kw[f.name] = self.field_value(f, hints[f.name], d[f.name], sub)
        if cls is Schedule:
            unknown = sorted(set(d) - set(SCHEDULER_KEYS))
            if unknown:
                self.errors.append(f"config.{key}: unknown scheduler key(s) {unknown}; allowed: {list(SCHEDULER_KEYS)}")
        try:
            return cls(**kw)
        except TypeError:  # a missing field, reported above
            return None

    def transform(self, v: Any, key: str) -> Transform | None:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            self.errors.append(f"config.{key.rsplit('.', 1)[0]}[{key.rsplit('.', 1)[1]}] must be a mapping with a "
                               "'name'")
            return None
        return Transform(v["name"], _freeze({k: x for k, x in v.items() if k != "name"}))

    def head_stage(self, v: Any, key: str) -> HeadStage | None:
        where = f"config.MODEL.HEAD.PARAMS[{key.rsplit('.', 1)[1]}]"
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == "mlp" and isinstance(v[1], dict)):
            self.errors.append(f"{where}={v!r} must be [\"mlp\", {{\"dims\": [...], ...}}]")
            return None
        opts = v[1]
        unknown = sorted(set(opts) - set(HEAD_OPTIONS))
        if unknown:
            self.errors.append(f"{where}: unknown mlp option(s) {unknown}; allowed: {sorted(HEAD_OPTIONS)}")
            return None
        dims = opts.get("dims")
        if not (isinstance(dims, (list, tuple)) and len(dims) >= 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
            self.errors.append(f"{where}.dims={dims!r} must list at least two positive sizes")
            return None
        flags = {}
        for k in HEAD_OPTIONS[1:]:
            if k in opts:
                if not isinstance(opts[k], bool):
                    self.fail(f"MODEL.HEAD.PARAMS.{key.rsplit('.', 1)[1]}.{k}", opts[k], "a boolean")
                    return None
                flags[k] = opts[k]
        return HeadStage(tuple(dims), **flags)


def build(raw: dict, extra: dict | None = None) -> tuple[Config | None, list[str]]:
    """``(Config, [])`` or ``(None, errors)``; ``extra`` (dotted key -> value) are the added keys, kept as they are.
    This module imports nothing from the project: every other module may read the typed config."""
    core = {f.name: raw[f.name] for f in dataclasses.fields(Config) if f.name in raw}
    b = _Builder()
    cfg = b.section(Config, core, "")
    if b.errors:
        return None, b.errors
    return dataclasses.replace(cfg, extra=_freeze(dict(extra or {}))), []


def with_values(cfg: Config, values: Mapping[str, Any]) -> Config:
    """``cfg`` with the values at dotted keys (``DISTRIBUTED.NUM_NODES``, ``OPTIMIZER.param_schedulers.lr.
    schedulers.0.end_value``) replaced, each typed and checked as its field: how derived values join a config
    typed already. Raises ValueError naming every problem (a derived value that breaks its field's rule is a bug)."""
    b = _Builder()
    for key, v in values.items():
        cfg = b.replaced(cfg, key, v, key)
    if b.errors:
        raise ValueError("; ".join(b.errors))
    return cfg


def build_section(cls: type, d: dict, key: str = ""):
    """One typed section from a plain dict (tests, tools); raises ValueError naming every problem."""
    b = _Builder()
    out = b.section(cls, d, key)
    if b.errors:
        raise ValueError("; ".join(b.errors))
    return out
