"""Model weights in and out: our checkpoints, torchvision state dicts, and the swav/VISSL DCv2 layouts.

Layouts read (detected from the keys):
- ours: a checkpoint directory / run directory / ``state.pt`` (``{"model": {"trunk.*", "head.*", "prototypes{h}"}}``);
- torchvision: ``conv1.weight ... layer4.* [fc.*]`` (a ``state_dict`` of ``torchvision.models.resnet*``);
- swav / VISSL model-zoo DCv2 releases: flat, ``module.`` prefix, ``projection_head.{i}.*``,
  ``prototypes.prototypes{h}.weight`` (optionally wrapped in ``{"state_dict": ...}``);
- VISSL training checkpoints (``.torch``): ``classy_state_dict.base_model.model.trunk`` with
  ``_feature_blocks.`` prefixes (and ``heads``).
Everything loads with ``torch.load(weights_only=True)``: a file that needs to execute code is refused.
"""

from __future__ import annotations

import io
import os
import pickle

import torch
from torch import nn

from dcv2_k8s.storage import open_storage


class WeightsError(ValueError):
    """Weights that cannot be used, with the reason and what to do."""


def read_file(path: str) -> dict:
    if path.startswith("s3://") or os.path.isdir(path):
        from dcv2_k8s.checkpoint import CheckpointManager, from_bytes

        store = open_storage(path)
        if store.exists(store.join("state.pt")):
            return from_bytes(store.get_bytes(store.join("state.pt")))
        m = CheckpointManager(path).latest()
        if m is None:
            raise WeightsError(f"{path}: no committed checkpoint (and no state.pt) found")
        return from_bytes(store.get_bytes(store.join(m["name"], "state.pt")))
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file or checkpoint directory")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: refused: loading it would execute code or needs unsafe types "
                           f"(weights_only=True): {str(e).splitlines()[0][:160]}") from None
    except (RuntimeError, EOFError) as e:
        raise WeightsError(f"{path}: not a PyTorch weights file ({type(e).__name__})") from None


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def split_weights(obj: dict) -> tuple[str, dict, dict, dict]:
    """``(layout, trunk state dict (torchvision keys, no fc), head state dict, prototypes {prototypes{h}: [K, D]})``.

    The head state dict has our nested keys (``0.0.weight``) for our checkpoints and flat ``projection_head``
    indices (``0.weight``, ``3.weight``) for swav/VISSL layouts."""
    if not isinstance(obj, dict):
        raise WeightsError("not a state dict")
    if "model" in obj and isinstance(obj["model"], dict) and any(k.startswith("trunk.") for k in obj["model"]):
        sd = obj["model"]
        protos = {k: v for k, v in sd.items() if k.startswith("prototypes")}
        return "dcv2", _strip(sd, "trunk."), _strip(sd, "head."), protos
    if "classy_state_dict" in obj:
        model = obj["classy_state_dict"]["base_model"]["model"]
        trunk = {k.replace("_feature_blocks.", ""): v for k, v in model.get("trunk", {}).items()}
        trunk = {k.split("base_model.", 1)[-1]: v for k, v in trunk.items()}
        heads = {k.split(".", 1)[1] if k[0].isdigit() else k: v for k, v in model.get("heads", {}).items()}
        return "vissl", _drop_fc(trunk), heads, {}
    sd = obj.get("state_dict", obj)
    if any(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    if "conv1.weight" not in sd:
        raise WeightsError("unknown layout: expected our checkpoint, a torchvision/swav ResNet state dict "
                           "(conv1.weight ...) or a VISSL .torch checkpoint (classy_state_dict)")
    head = _strip(sd, "projection_head.")
    protos = {f"prototypes{k.split('prototypes.prototypes', 1)[1].split('.')[0]}": v
              for k, v in sd.items() if k.startswith("prototypes.prototypes")}
    trunk = {k: v for k, v in sd.items() if not k.startswith(("projection_head.", "prototypes."))}
    return ("swav" if head or protos else "torchvision"), _drop_fc(trunk), head, protos


def _drop_fc(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def flat_head_modules(head: nn.Module) -> list[nn.Module]:
    return [m for m in head.modules() if not isinstance(m, nn.Sequential)]


def head_to_flat(head: nn.Module) -> dict:
    out = {}
    for i, m in enumerate(flat_head_modules(head)):
        for k, v in m.state_dict().items():
            out[f"{i}.{k}"] = v
    return out


def load_flat_head(head: nn.Module, flat: dict) -> None:
    for i, m in enumerate(flat_head_modules(head)):
        part = _strip(flat, f"{i}.")
        if part:
            m.load_state_dict(part)


def load_into_trunk(trunk: nn.Module, trunk_sd: dict, source: str = "weights") -> None:
    """Strict load with one clear line on a mismatch (depth, width, layout)."""
    mine = trunk.state_dict()
    missing = sorted(set(mine) - set(trunk_sd))
    unexpected = sorted(set(trunk_sd) - set(mine))
    wrong = [k for k in mine if k in trunk_sd and tuple(trunk_sd[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or wrong:
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + \
               (f" {len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "") + \
               (f" shape differs for {wrong[0]}: {tuple(trunk_sd[wrong[0]].shape)} vs {tuple(mine[wrong[0]].shape)}"
                if wrong else "")
        raise WeightsError(f"{source}: the trunk does not match config.MODEL.TRUNK ({what.strip()}); set the "
                           "matching DEPTH / WIDTH_MULTIPLIER")
    trunk.load_state_dict(trunk_sd)


def trunk_tokens(obj: dict) -> list[str]:
    """``config.MODEL.TRUNK.KEY=VALUE`` tokens of the trunk one of our checkpoints was trained with (architecture
    and ``INPUT_NORM``, from its stored config, read by ``config_from_checkpoint`` as ``dcv2 knn``, ``export`` and
    ``clusters`` read it). A command with a config of its own (``dcv2 linear-eval``) puts them before the user's
    tokens: what the user sets explicitly still wins."""
    import json

    from dcv2_k8s.config import config_from_checkpoint
    from dcv2_k8s.config.dicts import flatten

    trunk = config_from_checkpoint(obj, for_training=False).raw["MODEL"]["TRUNK"]
    return [f"config.MODEL.TRUNK.{k}={json.dumps(v)}" for k, v in sorted(flatten(trunk).items())]


def input_view(cfg) -> dict:
    """What a run's weights expect of their inputs beyond the usual resize, crop and normalise: its
    ``MODEL.TRUNK.INPUT_NORM`` and whole-image preprocessing, when set. Whoever uses exported weights elsewhere
    applies the same (``dcv2_k8s.model.resnet.standardize_input``, ``dcv2_k8s.data.transforms.CropToContent``)."""
    view = {}
    if cfg.MODEL.TRUNK.INPUT_NORM != "none":
        view["input_norm"] = cfg.MODEL.TRUNK.INPUT_NORM
    if cfg.DATA.TRAIN.preprocess:
        view["preprocess"] = list(cfg.DATA.TRAIN.preprocess)
    return view


def export_torchvision(obj: dict, depth: int) -> dict:
    """A state dict that loads with ``strict=True`` into ``torchvision.models.resnet{depth}()``: our trunk plus
    the ``fc`` layer of a default-initialised torchvision model (replace it or train it for your task)."""
    import torchvision

    _, trunk, _, _ = split_weights(obj)
    tv = getattr(torchvision.models, f"resnet{depth}")()
    ref = tv.state_dict()
    if set(ref) - {"fc.weight", "fc.bias"} != set(trunk) or any(tuple(trunk[k].shape) != tuple(ref[k].shape)
                                                              for k in trunk):
        raise WeightsError(f"the trunk is not a torchvision resnet{depth} (a width multiplier or ResNeXt groups "
                           "have no torchvision twin); use --format swav")
    out = dict(trunk)
    out["fc.weight"], out["fc.bias"] = ref["fc.weight"], ref["fc.bias"]
    return out


def export_swav(obj: dict, head: nn.Module) -> dict:
    """The flat layout of the swav / VISSL model-zoo DCv2 releases (``module.`` prefix, ``projection_head.{i}``,
    ``prototypes.prototypes{h}.weight``). ``head`` is a module of the checkpoint's head architecture."""
    layout, trunk, head_sd, protos = split_weights(obj)
    if layout == "dcv2":
        head.load_state_dict(head_sd)
        head_sd = head_to_flat(head)
    out = {f"module.{k}": v for k, v in trunk.items()}
    out.update({f"module.projection_head.{k}": v for k, v in head_sd.items()})
    out.update({f"module.prototypes.{k}.weight": v for k, v in protos.items()})
    return out


def load_weights(model: nn.Module, path: str, trunk_only: bool = False) -> str:
    """Load weights of any supported layout into a DCv2Model (trunk strictly; head and prototypes when they
    exist and fit). Returns the layout name."""
    layout, trunk_sd, head_sd, protos = split_weights(read_file(path))
    load_into_trunk(model.trunk, trunk_sd, path)
    if trunk_only:
        return layout
    if head_sd:
        try:
            if layout == "dcv2":
                model.head.load_state_dict(head_sd)
            else:
                load_flat_head(model.head, head_sd)
        except (RuntimeError, KeyError) as e:
            raise WeightsError(f"{path}: the head does not match config.MODEL.HEAD.PARAMS ({str(e)[:120]})") from None
    current = getattr(model, "prototypes", [])
    if protos and len(protos) == len(current) and all(tuple(protos.get(f"prototypes{h}", torch.empty(0)).shape)
                                                      == tuple(c.shape) for h, c in enumerate(current)):
        model.set_prototypes([protos[f"prototypes{h}"] for h in range(len(current))])
    return layout
