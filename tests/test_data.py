"""Multi-crop transforms, the indexed dataset, the resumable sampler and synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcv2_k8s.config import resolve
from dcv2_k8s.data.dataset import IndexedImageFolder, ResumableDistributedSampler
from dcv2_k8s.data.transforms import MultiCrop

BASE = "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"


def _multicrop(*tokens):
    return MultiCrop(resolve([BASE, *tokens]).cfg.DATA.TRAIN.TRANSFORMS)


def test_multicrop_shapes_2x160_4x96():
    mc = _multicrop("+config/pretrain/deepcluster_v2/transforms=multicrop_2x160_4x96")
    crops = mc(Image.new("RGB", (500, 375), (120, 30, 200)))
    assert [tuple(c.shape) for c in crops] == [(3, 160, 160)] * 2 + [(3, 96, 96)] * 4
    assert all(c.dtype == torch.float32 for c in crops)


def test_multicrop_shapes_2x224_6x96_and_default():
    crops = _multicrop("+config/pretrain/deepcluster_v2/transforms=multicrop_2x224_6x96")(Image.new("RGB", (300, 200)))
    assert [c.shape[-1] for c in crops] == [224, 224] + [96] * 6
    assert [c.shape[-1] for c in _multicrop()(Image.new("RGB", (300, 200)))] == [224, 224]


def test_dataset_is_sorted_and_augmentation_is_seeded(synth_data):
    mc = MultiCrop([{"name": "ImgPilToMultiCrop", "total_num_crops": 2, "num_crops": [2], "size_crops": [24],
                     "crop_scales": [[0.2, 1]]}, {"name": "ImgPilColorDistortion", "strength": 1.0},
                    {"name": "ToTensor"}])
    ds = IndexedImageFolder(synth_data / "train", mc, seed=3)
    assert len(ds) == 240 and ds.samples == sorted(ds.samples, key=lambda s: (s[1], s[0]))
    i, a = ds[(5, 17)]
    _, b = ds[(5, 17)]
    _, c = ds[(6, 17)]
    assert i == 17 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])  # another epoch, other crops
    assert not torch.equal(a[0], a[1])  # the two crops differ
    assert len(IndexedImageFolder(synth_data / "train", limit=50)) == 50


def test_sampler_pads_splits_and_resumes():
    s0 = ResumableDistributedSampler(10, num_replicas=4, rank=0, seed=1)
    s3 = ResumableDistributedSampler(10, num_replicas=4, rank=3, seed=1)
    s0.set_epoch(2)
    s3.set_epoch(2)
    all0, all3 = list(s0), list(s3)
    assert len(all0) == len(all3) == 3 and all(tag == 2 for tag, _ in all0)
    s0.set_epoch(2, start=1)
    assert list(s0) == all0[1:] and len(s0) == 2
    s0.set_epoch(3)
    assert list(s0) != all0
    s0.set_epoch(0, aug_tag=-1)  # the fill pass: epoch-0 order, its own augmentation tag
    ref = ResumableDistributedSampler(10, 4, 0, seed=1)
    assert [i for _, i in s0] == [i for _, i in ref] and all(t == -1 for t, _ in s0)


def test_synth_has_classes_and_varied_images(synth_data):
    ds = IndexedImageFolder(synth_data / "train")
    assert len(ds.classes) == 10 and ds.classes[0].startswith("c00_")
    a, b = torch.from_numpy(np.array(ds.load(0))), torch.from_numpy(np.array(ds.load(1)))
    assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize("kind", ["glyphs", "naturals", "icons"])
def test_held_out_synth_kinds(tmp_path, kind):
    """The data kinds of the small-scale recipe: 10 named classes; what varies within a class varies (grey levels
    and polarity for glyphs, colours for the others), so only structure tells classes apart."""
    from dcv2_k8s.data.synth import generate

    summary = generate(tmp_path, classes=10, train_per_class=4, val_per_class=1, size=48, progress=False, kind=kind)
    assert summary["kind"] == kind and summary["train"] == 40
    ds = IndexedImageFolder(tmp_path / "train")
    assert len(ds.classes) == 10 and ds.classes[0].startswith("c00_") and len(ds) == 40
    same_class = [np.asarray(ds.load(i), dtype=np.float32) for i in range(4)]
    assert all(a.shape == (48, 48, 3) for a in same_class)
    means = [a.mean(axis=(0, 1)) for a in same_class]
    assert max(float(np.abs(m - means[0]).max()) for m in means) > 15  # colour/grey level is not the class
    if kind == "glyphs":  # grey: the three channels agree
        assert all(float(np.abs(a[..., 0] - a[..., 2]).max()) < 30 for a in same_class)
    with pytest.raises(ValueError, match="choose one of"):
        generate(tmp_path / "x", kind="letters", progress=False)


def test_random_invert_in_both_backends():
    """RandomInvert (torchvision's name) flips dark and light in the PIL and the OpenCV pipelines alike."""
    from PIL import Image

    from dcv2_k8s.data.transforms import build_multicrop

    img = Image.new("RGB", (32, 32), (200, 60, 10))
    spec = [{"name": "ImgPilToMultiCrop", "total_num_crops": 1, "size_crops": [32], "num_crops": [1],
             "crop_scales": [[1.0, 1.0]]}, {"name": "RandomInvert", "p": 1.0}, {"name": "ToTensor"}]
    for backend in ("pil", "opencv"):
        (out,) = build_multicrop(spec, backend)(img)
        assert torch.allclose(out[:, 16, 16], torch.tensor([55, 195, 245]) / 255, atol=1e-6), backend


def test_random_vertical_flip_in_both_backends():
    """RandomVerticalFlip (torchvision's name) mirrors top and bottom, not left and right, in both pipelines."""
    from PIL import Image

    from dcv2_k8s.data.transforms import build_multicrop

    img = Image.new("RGB", (32, 32), (200, 60, 10))
    img.paste((0, 0, 255), (0, 16, 16, 32))  # bottom-left quarter blue
    spec = [{"name": "ImgPilToMultiCrop", "total_num_crops": 1, "size_crops": [32], "num_crops": [1],
             "crop_scales": [[1.0, 1.0]]}, {"name": "RandomVerticalFlip", "p": 1.0}, {"name": "ToTensor"}]
    for backend in ("pil", "opencv"):
        (out,) = build_multicrop(spec, backend)(img)
        assert torch.allclose(out[:, 4, 4], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6), backend  # now top-left
        assert torch.allclose(out[:, 28, 4], torch.tensor([200, 60, 10]) / 255, atol=1e-6), backend
        assert torch.allclose(out[:, 4, 28], torch.tensor([200, 60, 10]) / 255, atol=1e-6), backend


def _bad_folder(root, good_jpeg: bytes):
    """One class of every kind of bad or odd file, plus good images around them."""
    import io
    import os

    from PIL import Image

    d = root / "c0"
    d.mkdir(parents=True)
    (d / "a_good.jpg").write_bytes(good_jpeg)
    (d / "b_truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (d / "c_empty.jpg").write_bytes(b"")
    (d / "d_text.JPEG").write_text("this is not an image\n")
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(buf, "JPEG")
    (d / "e_cmyk.jpg").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.new("L", (40, 30), 128).save(buf, "JPEG")
    (d / "f_gray.jpg").write_bytes(buf.getvalue())
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(d / "g_alpha.png")
    Image.new("1", (12000, 10000)).save(d / "h_huge.png")  # 120 MP in a few KB: a decompression bomb
    os.symlink(root / "does-not-exist.jpg", d / "i_unreadable.jpg")
    (d / "j_good.jpg").write_bytes(good_jpeg)
    return root


@pytest.mark.parametrize("backend", ["pil", "opencv"])
def test_bad_images_never_crash_and_keep_indices(synth_data, tmp_path, backend):
    from dcv2_k8s.data.transforms import build_multicrop

    good = next((synth_data / "train").rglob("*.jpg")).read_bytes()
    root = _bad_folder(tmp_path / "bad", good)
    mc = build_multicrop([{"name": "ImgPilToMultiCrop", "total_num_crops": 2, "num_crops": [2], "size_crops": [16],
                           "crop_scales": [[0.5, 1]]}, {"name": "ToTensor"}], backend)
    ds = IndexedImageFolder(root, mc)
    assert len(ds) == 10
    for i in range(len(ds)):
        index, crops = ds[(0, i)]
        assert index == i and [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2
    assert ds.bad_count.value == 5  # truncated, empty, text, huge, unreadable; each counted once
    white_alpha = ds.load(6)  # transparent red composited on white
    assert white_alpha.mode == "RGB" and white_alpha.getpixel((0, 0)) == (255, 255, 255)
    assert ds.load(4).mode == "RGB" and ds.load(5).mode == "RGB"  # CMYK and greyscale converted
    # a bad image is replaced deterministically by the next good one
    torch.testing.assert_close(ds[(3, 1)][1][0], ds[(3, 1)][1][0])
    # through DataLoader worker processes: no worker dies, every index comes back once
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=4, sampler=[(1, i) for i in range(len(ds))], num_workers=2)
    seen = torch.cat([index for index, _ in loader])
    assert sorted(seen.tolist()) == list(range(10))


def test_data_check_lists_unusable_files(synth_data, tmp_path):
    from tests.conftest import run_cli

    good = next((synth_data / "train").rglob("*.jpg")).read_bytes()
    root = _bad_folder(tmp_path / "bad", good)
    p = run_cli("data", "check", str(root), "--workers", "2", timeout=300)
    assert p.returncode == 1
    bad = sorted(l.split(": ")[1].rsplit("/", 1)[1] for l in p.stdout.splitlines() if l.startswith("bad: "))
    assert bad == ["b_truncated.jpg", "c_empty.jpg", "d_text.JPEG", "h_huge.png", "i_unreadable.jpg"]
    assert "10 images, 5 unusable" in p.stdout and "CMYK" in p.stdout and "with alpha" in p.stdout
    p = run_cli("data", "check", str(synth_data / "val"), timeout=300)
    assert p.returncode == 0 and "60 images, 0 unusable" in p.stdout


# --------------------------------------------------------------------------------- opencv backend
def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


def _photo(seed=3):
    from dcv2_k8s.data.synth import make_image

    return make_image(4, np.random.default_rng(seed), 200, 150, photo_like=True)


def _crop_stats(mc, img, n, seed0):
    """Per-crop statistics of ``n`` seeded draws: mean, contrast, saturation, sharpness, greyness."""
    rows = []
    for i in range(n):
        torch.manual_seed(seed0 + i)
        x = mc(img)[0].numpy()  # [3, H, W] in [0, 1]
        grey = np.abs(x - x.mean(0, keepdims=True)).max() < 1e-6
        lap = np.abs(x[:, 1:-1, 1:-1] * 4 - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]).mean()
        rows.append((x.mean(), x.std(), (x.max(0) - x.min(0)).mean(), lap, grey, x[0].mean() - x[2].mean()))
    return np.array(rows, dtype=np.float64)


def test_opencv_backend_has_the_reference_distribution():
    """The opencv kernels draw the same augmentations as the PIL chain: per-crop statistics of 500 draws each
    (brightness, contrast, saturation, sharpness, hue via the red-blue balance, grey fraction) have the same
    distribution (two-sample KS below the 0.1 % critical value, 0.124 at n=500)."""
    from dcv2_k8s.data.transforms import build_multicrop

    t = [{"name": "ImgPilToMultiCrop", "total_num_crops": 1, "num_crops": [1], "size_crops": [64],
          "crop_scales": [[0.14, 1.0]]}, {"name": "RandomHorizontalFlip", "p": 0.5},
         {"name": "ImgPilColorDistortion", "strength": 1.0},
         {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0}, {"name": "ToTensor"}]
    img = _photo()
    n = 500
    pil = _crop_stats(build_multicrop(t, "pil"), img, n, 0)
    cv = _crop_stats(build_multicrop(t, "opencv"), img, n, 10_000)
    names = ["mean", "contrast", "saturation", "sharpness", "grey", "red-blue"]
    ks = {name: _ks(pil[:, i], cv[:, i]) for i, name in enumerate(names) if name != "grey"}
    assert max(ks.values()) < 0.124, ks
    grey_pil, grey_cv = pil[:, 4].mean(), cv[:, 4].mean()
    assert abs(grey_pil - 0.2) < 0.06 and abs(grey_cv - 0.2) < 0.06, (grey_pil, grey_cv)


def test_opencv_crop_boxes_follow_random_resized_crop():
    from torchvision.transforms import v2

    from dcv2_k8s.data.cv_transforms import crop_params

    torch.manual_seed(0)
    ours = np.array([crop_params(375, 500, (0.08, 1.0)) for _ in range(2000)], dtype=np.float64)
    ref = np.array([v2.RandomResizedCrop.get_params(torch.zeros(3, 375, 500), [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(2000)], dtype=np.float64)
    for f in (lambda r: r[:, 2] * r[:, 3], lambda r: r[:, 3] / r[:, 2], lambda r: r[:, 0], lambda r: r[:, 1]):
        assert _ks(f(ours), f(ref)) < 0.062  # 0.1 % critical value at n=2000


def test_opencv_backend_shapes_normalisation_and_seeding():
    from dcv2_k8s.data.transforms import build_multicrop

    tokens = ("+config/pretrain/deepcluster_v2/transforms=multicrop_2x160_4x96",)
    t = resolve([BASE, *tokens]).cfg.DATA.TRAIN.TRANSFORMS
    mc = build_multicrop(t, "opencv")
    img = _photo()
    torch.manual_seed(7)
    a = mc(img)
    torch.manual_seed(7)
    b = mc(img)
    assert [tuple(c.shape) for c in a] == [(3, 160, 160)] * 2 + [(3, 96, 96)] * 4
    assert all(c.dtype == torch.float32 and torch.equal(x, y) for c, x, y in zip(a, a, b))
    # a crop of a flat image through ToTensor + Normalize is ((v / 255) - mean) / std exactly
    flat = [x for x in t if x.name in ("ImgPilToMultiCrop", "ToTensor", "Normalize")]
    out = build_multicrop(flat, "opencv")(Image.new("RGB", (300, 200), (10, 128, 250)))[0]
    want = (torch.tensor([10, 128, 250]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[:, 5, 5], want, atol=1e-6)


def _figure(size=48, box=(30, 6, 42, 20), bg=200, fg=40):
    """A flat grey image with one dark rectangle (the 'content') at ``box``."""
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    img.paste((fg, fg, fg), box)
    return img


def test_crop_to_content_centres_and_frames_the_figure():
    """ImgPilCropToContent cuts the square around the figure's bounding box, margin x its larger side wider, filled
    with the background where it leaves the image; a flat image is returned as it is."""
    from dcv2_k8s.data.transforms import CropToContent

    out = CropToContent(threshold=35, margin=0.25)(_figure())
    # box 12 x 14 px: the 3 x 3 mean filter widens the mask by one pixel a side where it stays over threshold
    side = out.size[0]
    assert out.size[0] == out.size[1] and 14 * 1.25 + 4 <= side <= 16 * 1.25 + 5, out.size
    a = np.asarray(out.convert("L"), dtype=np.float32)
    ys, xs = np.nonzero(a < 120)
    assert abs((xs.min() + xs.max()) / 2 - side / 2) <= 1.5 and abs((ys.min() + ys.max()) / 2 - side / 2) <= 1.5
    assert a[0, 0] == 200 and a[-1, -1] == 200  # the fill is the background grey (the crop leaves the image)
    flat = Image.new("RGB", (40, 40), (90, 90, 90))
    assert CropToContent()(flat) is flat
    with pytest.raises(ValueError, match="threshold"):
        CropToContent(threshold=0)


def test_preprocessing_runs_before_the_crops_in_both_backends_and_in_evaluation():
    """Entries before ImgPilToMultiCrop apply to the whole image, in both augmentation backends, and in the
    evaluation view (k-NN, linear evaluation, clusters) through ``DATA.TRAIN.preprocess``."""
    from dcv2_k8s.data.transforms import build_multicrop, eval_transform

    img = _figure(box=(34, 2, 46, 14))  # the figure in a corner: a whole-image crop without preprocessing misses it
    spec = [{"name": "ImgPilCropToContent"}, {"name": "ImgPilToMultiCrop", "total_num_crops": 1, "size_crops": [32],
                                               "num_crops": [1], "crop_scales": [[1.0, 1.0]]}, {"name": "ToTensor"}]
    for backend in ("pil", "opencv"):
        (out,) = build_multicrop(spec, backend)(img)
        assert out[:, 16, 16].max() < 0.3, backend  # the centre of the crop is the dark figure
    cfg = resolve(["config.DATA.TRAIN.TRANSFORMS=" + str(spec).replace(" ", "")], for_training=False).cfg
    assert [e["name"] for e in cfg.DATA.TRAIN.preprocess] == ["ImgPilCropToContent"]
    x = eval_transform(32, mean=(0, 0, 0), std=(1, 1, 1), pre=cfg.DATA.TRAIN.preprocess)(img)
    assert x[:, 16, 16].max() < 0.3
    assert eval_transform(32, mean=(0, 0, 0), std=(1, 1, 1))(img)[:, 16, 16].min() > 0.7  # without: background


def test_preprocessing_and_per_crop_transforms_must_sit_on_their_side_of_the_multicrop():
    """One line per misplaced entry, naming it and what to do; bad preprocessing arguments are refused at once."""
    from dcv2_k8s.config import ConfigError

    import json

    mc = {"name": "ImgPilToMultiCrop", "total_num_crops": 1, "size_crops": [32], "num_crops": [1],
          "crop_scales": [[0.5, 1]]}
    crop, tensor = {"name": "ImgPilCropToContent"}, {"name": "ToTensor"}
    for order, needle in (([mc, crop, tensor], "must come before"),
                          ([{"name": "RandomHorizontalFlip"}, mc, tensor], "must come after"),
                          ([{"name": "ImgPilCropToContent", "margin": -1}, mc, tensor], "margin -1")):
        with pytest.raises(ConfigError) as e:
            resolve(["config.DATA.TRAIN.TRANSFORMS=" + json.dumps(order).replace(" ", "")], for_training=False)
        assert needle in "\n".join(e.value.lines), e.value.lines
