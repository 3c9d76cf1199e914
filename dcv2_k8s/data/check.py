"""``dcv2 data check DIR``: find images a long run would trip over, before it starts.

Every file of the ImageFolder (or of a staged manifest) is decoded fully, in parallel. Unusable files
(truncated, empty, not an image, unreadable, above the decompression-bomb limit) are listed with the reason;
files that are converted on the fly (CMYK, greyscale, palette, alpha) are counted. Training itself never crashes
on such files: it replaces an unusable image by the next good one and counts it.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dcv2_k8s.data.dataset import BadImage, open_rgb, scan_image_folder


def _check(path: str) -> tuple[str, str, str]:
    try:
        _, converted = open_rgb(path)
        return path, "ok", converted
    except BadImage as e:
        return path, "bad", str(e)


def check_dataset(root: str, workers: int = 4, progress: bool = True) -> dict:
    from tqdm import tqdm

    _, samples = scan_image_folder(root)
    paths = [str(Path(root) / rel) for rel, _ in samples]
    bad, converted = [], Counter()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, status, detail in tqdm(pool.map(_check, paths, chunksize=64), total=len(paths), desc="check",
                                         unit="img", disable=not progress, mininterval=1.0):
            if status == "bad":
                bad.append((path, detail))
            elif detail:
                converted[detail] += 1
    return {"root": root, "images": len(paths), "bad": bad, "converted": dict(converted)}
