"""The shape of the code: no import cycles between modules, one typed config whose keys are the defaults' keys,
and one source per fact (config validation reads the facts from the code that uses them)."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import yaml

from tests.conftest import ROOT

PKG = ROOT / "dcv2_k8s"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports, at any level (function-level imports included: they run too).
    Importing ``a.b.c`` also runs the package ``a.b``'s ``__init__``."""
    mods = _modules()

    def resolve(name: str) -> list[str]:
        out = []
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
            parent = name.rpartition(".")[0]
            while parent and parent != "dcv2_k8s":
                out.append(parent)
                parent = parent.rpartition(".")[0]
        return out

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dcv2_k8s"):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("dcv2_k8s")]
            for n in names:
                # a module's own packages are initialised already when it runs: not an edge
                graph[m].update(t for t in resolve(n) if t != m and t != "dcv2_k8s" and not m.startswith(t + "."))
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_names_its_one_job_in_its_first_docstring_line():
    """A reader opening any file learns its job from the first line: every module has a docstring whose first line
    is one sentence (ending with a period, short enough to read at a glance)."""
    bad = []
    for name, path in sorted(_modules().items()):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        first = (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""
        if not first.endswith(".") or len(first) > 120:
            bad.append(f"{name}: {first[:60]!r}")
    assert not bad, bad

def test_packages_are_packages_and_the_schema_is_a_leaf():
    for d in PKG.iterdir():
        if d.is_dir() and any(d.glob("*.py")):
            assert (d / "__init__.py").exists(), f"{d.name}/ lacks __init__.py"
    assert not _import_graph()["dcv2_k8s.schema"], "schema.py must import nothing from the project"
    # the package never reaches outside itself (pipelines/, tools/, tests/)
    for m, path in _modules().items():
        text = path.read_text()
        assert "sys.path.insert" not in text and "from pipelines" not in text, m


def _fields(cls, prefix="") -> set[str]:
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp) and tp.__name__ not in ("Schedule",):
            out |= _fields(tp, key + ".")
        else:
            out.add(key)
    return out


def test_typed_config_has_exactly_the_defaults_keys():
    from dcv2_k8s.config.dicts import flatten
    from dcv2_k8s.schema import Config

    defaults = yaml.safe_load((PKG / "config" / "defaults.yaml").read_text())["config"]
    keys = {k for k in flatten(defaults) if not k.startswith("OPTIMIZER.param_schedulers.lr.")}
    keys.add("OPTIMIZER.param_schedulers.lr")
    assert _fields(Config) == keys


def test_resolved_config_is_frozen_and_typed():
    import pytest

    from dcv2_k8s.config import resolve

    cfg = resolve(["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"]).cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA = 3
    assert type(cfg.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER) is float  # written as 1 in the preset
    assert type(cfg.LOSS.deepclusterv2_loss.num_clusters) is tuple
    assert cfg.DISTRIBUTED.NUM_NODES == 1 and cfg.DATA.TRAIN.multicrop.large_size == 224


def test_no_casts_of_config_values_in_the_loop():
    """The training loop reads typed values: no int()/float()/str()/bool() around a cfg value."""
    for name in ("engine.py", "monitor.py", "reporter.py", "eval/linear.py", "dcv2/method.py", "events.py",
                 "runtime.py"):
        for node in ast.walk(ast.parse((PKG / name).read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("int", "float", "str", "bool") and node.args:
                src = ast.unparse(node.args[0])
                assert "cfg" not in src and "CONFIG" not in src, f"{name}: {ast.unparse(node)}"


def test_validation_reads_the_facts_from_the_code_that_uses_them():
    """Depths, transform names and scheduler names accepted by the config are exactly what the model builder, the
    augmentation registry and the schedule implement."""
    from dcv2_k8s.config import ConfigError, resolve
    from dcv2_k8s.data.transforms import TRANSFORMS
    from dcv2_k8s.model.resnet import LAYERS, feature_dim
    from dcv2_k8s.optim.schedule import CHILD_SCHEDULES, SCHEDULES, LRSchedule

    base = "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"
    for depth in LAYERS:
        cfg = resolve([base, f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}"]).cfg
        assert cfg.MODEL.HEAD.PARAMS[0].dims[0] == feature_dim(depth)
    mc = "{name: ImgPilToMultiCrop, num_crops: [2], size_crops: [32], crop_scales: [[0.5, 1]]}"
    for name, op in TRANSFORMS.items():
        if name != "ImgPilToMultiCrop":
            entry = f"{{name: {name}, mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}}" if name == "Normalize" \
                else f"{{name: {name}}}"
            order = [entry, mc] if op.pre else [mc, entry]  # whole-image preprocessing comes before the crops
            resolve([base, "config.DATA.TRAIN.AUG_BACKEND=pil", f"config.DATA.TRAIN.TRANSFORMS=[{', '.join(order)}]"])
    # a composite schedule only takes children the schedule can evaluate (swav_warmup_cosine is top-level only)
    for child in SCHEDULES:
        tokens = [base, "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=false",
                  "config.OPTIMIZER.param_schedulers.lr.schedulers=[{name: linear, start_value: 0.1, end_value: 1}, "
                  f"{{name: {child}, start_value: 1, end_value: 0, value: 1, values: [1], base_lr: 1}}]"]
        if child in CHILD_SCHEDULES:
            lr = resolve(tokens).cfg.OPTIMIZER.param_schedulers.lr
            LRSchedule(lr, 100, 10)(99)
        else:
            try:
                resolve(tokens)
            except ConfigError as e:
                assert any("inside a composite schedule" in line for line in e.lines)
            else:
                raise AssertionError(f"{child} accepted inside a composite schedule")
