"""Evaluation of a trained trunk: weighted k-NN, linear evaluation, cluster extraction."""


def what_was_scored(cfg, size: int, weights: str | None, input_norm: str | None = None, pre=None) -> dict:
    """What a k-NN or linear result measured, recorded beside it: the trunk's architecture, the resolution and input
    view of the evaluation images (the pretraining's whole-image preprocessing, the resize and center crop, the
    normalisation) and the weights (a file, or a random initialisation and its seed). Scores of random features
    differ with each of these, so a baseline is only comparable when all four match. ``input_norm`` and ``pre``:
    what the evaluation used where it took them from the weights' own run rather than from ``cfg``."""
    trunk = cfg.MODEL.TRUNK
    arch = f"ResNet-{trunk.RESNETS.DEPTH} x{trunk.RESNETS.WIDTH_MULTIPLIER:g}"
    input_norm = input_norm or trunk.INPUT_NORM
    if input_norm != "none":
        arch += f" (input norm {input_norm})"
    mean, std = cfg.DATA.TRAIN.normalize
    pre = cfg.DATA.TRAIN.preprocess if pre is None else pre
    view = {"preprocess": [p["name"] for p in pre], "resize": int(round(size / 0.875)),
            "center_crop": size, "mean": [round(float(m), 4) for m in mean], "std": [round(float(s), 4) for s in std]}
    return {"architecture": arch, "resolution": size, "view": view,
            "weights": weights or f"random-init (seed {cfg.SEED_VALUE})"}
