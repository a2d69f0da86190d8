"""Regions of interest: anomalies land on the object (demo coins), textures keep the whole image, every source.

Known coin masks come from an independent segmentation of scikit-image's original coins photograph (the one
scripts/build_demo.py crops): region growing by watershed on the Sobel edge map from dark (< 30) and bright
(> 150) markers — scikit-image's own coins tutorial — closed with a 2-px disc and hole-filled. It shares nothing
with the "pixels" method under test (Otsu on cell-averaged luminance/saturation distances from the border), and
computing it here keeps the masks in step with the demo's crop boxes (manifest.json) instead of shipping files.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apt_lab.config import APTConfig, PerturbConfig
from apt_lab.data import load_dataset
from apt_lab.perturbations import perturb
from apt_lab.roi import (attention_scores, border_ring, foreground_from_scores, orient_by_border, pixel_scores,
                         region_of_interest)

SIZE = 224
TEXTURES = ("brick", "grass", "gravel")
MANIFEST = Path(__file__).resolve().parents[1] / "apt_lab" / "data" / "demo" / "manifest.json"


@pytest.fixture(scope="module")
def coins():
    """The 14 normal coin photos (8 train, 6 test) at 224 px and their known coin masks, (14, 3, S, S), (14, S, S)."""
    skimage = pytest.importorskip("skimage")
    from scipy import ndimage
    from skimage import filters, morphology, segmentation

    photo = skimage.data.coins()  # (303, 384) uint8, what build_demo.py crops
    markers = np.zeros_like(photo)
    markers[photo < 30], markers[photo > 150] = 1, 2
    coin = segmentation.watershed(filters.sobel(photo), markers) == 2
    coin = ndimage.binary_fill_holes(ndimage.binary_closing(coin, morphology.disk(2)))
    items = json.loads(MANIFEST.read_text())["items"]
    masks = []
    for split in ("train/good", "test/good"):
        for item in sorted((i for i in items if i["category"] == "coins" and i["file"].startswith(split)),
                           key=lambda i: i["file"]):
            y0, x0, h, w = item["box"]
            crop = torch.from_numpy(coin[y0:y0 + h, x0:x0 + w].astype(np.float32))[None, None]  # (1, 1, 64, 64)
            masks.append(F.interpolate(crop, size=(SIZE, SIZE), mode="nearest")[0, 0] > 0.5)
    data = load_dataset("demo", category="coins")
    good = [i for i, d in enumerate(data.test.defects) if d == "good"]
    images = torch.cat([data.train.images(SIZE), data.test.images(SIZE, good)])
    return images, torch.stack(masks)


def _share_on(roi, truth, images, seeds=(0, 1, 2, 3)):
    """Share of synthetic-anomaly pixels (quick preset, every seed) that fall on ``truth``."""
    config = APTConfig.preset("quick")
    on = total = 0
    for seed in seeds:
        out = perturb(images, config, torch.Generator().manual_seed(seed), roi=roi, patch_size=16)
        on, total = on + int((out.masks & truth).sum()), total + int(out.masks.sum())
    return on / total


def test_known_coin_masks_are_coins(coins):
    images, masks = coins
    area = float(masks.float().mean())
    assert 0.35 < area < 0.5  # the 43%: chance level for an ROI that ignores the object
    lum = images.mean(1)  # (14, S, S) coins are bright on a dark background
    assert all(float(lum[i][masks[i]].mean()) > float(lum[i][~masks[i]].mean()) + 0.2 for i in range(len(images)))


def test_pixels_roi_puts_anomalies_on_the_coin(tiny_backbone, coins):
    images, masks = coins
    config = APTConfig.preset("quick")
    assert config.perturb.roi_method == "pixels"  # quick mode: the source that works offline, random weights
    roi = region_of_interest(tiny_backbone, images, config)
    objects = ~roi.flatten(1).all(1)  # (14,) images treated as an object, not a texture
    assert int(objects.sum()) >= 12
    share = _share_on(roi, masks, images)
    assert share >= 0.90, share  # measured 0.96; the region that ignored the object: 0.48 (chance: 0.44)
    precision = (roi & masks).flatten(1).sum(1) / roi.flatten(1).sum(1)
    assert float(precision[objects].median()) > 0.9


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_perfect_objectness_map_through_the_post_processing_of_text(coins, sign):
    # each patch's true coin fraction (and its inverse, the sign CLIP similarity maps often have)
    images, masks = coins
    fraction = F.avg_pool2d(masks[:, None].float(), 16)[:, 0]  # (14, 14, 14) patch grid
    roi = foreground_from_scores(sign * fraction, SIZE)
    share = _share_on(roi, masks, images)
    assert share >= 0.90, share  # measured 0.97 for both signs; the old rule (dilated, 70% fallback): 0.62
    assert torch.equal(roi, foreground_from_scores(3.0 * fraction - 1.0, SIZE))  # only the ordering matters


def test_textures_keep_the_whole_image(tiny_backbone):
    config = APTConfig.preset("quick")
    for category in TEXTURES:
        data = load_dataset("demo", category=category)
        good = [i for i, d in enumerate(data.test.defects) if d == "good"]
        images = torch.cat([data.train.images(SIZE), data.test.images(SIZE, good)])
        assert region_of_interest(tiny_backbone, images, config).all(), category
    noise = torch.rand(4, 14, 14, generator=torch.Generator().manual_seed(0))  # no object on the grid either
    assert foreground_from_scores(noise, SIZE).all()


def test_border_prior_orients_and_texture_decision_uses_the_undilated_foreground():
    s = torch.zeros(1, 14, 14)
    s[0, 3:11, 3:11] = 1.0  # an 8×8 object: 33% of the grid
    assert torch.equal(orient_by_border(-s), s)
    roi = foreground_from_scores(s, 14)
    assert int(roi.sum()) == 64 and not roi[0, 2].any()
    big = torch.zeros(1, 14, 14)
    big[0, 1:13, 1:13] = 1.0  # 144/196 = 73% > 0.7: texture-like, the whole image
    assert foreground_from_scores(big, 14).all()
    grown = foreground_from_scores(s, 14, dilation=2)  # dilation in pixels, after the decision
    assert int(grown.sum()) == 12 * 12
    assert border_ring(20, 20).sum() == 20 * 20 - 18 * 18


def test_pixel_scores_need_no_model_and_find_a_dark_object_on_a_bright_background():
    x = torch.ones(1, 3, 64, 64)
    x[:, :, 20:44, 16:40] = 0.1  # dark object
    s = pixel_scores(x)  # (1, 16, 16)
    assert s.shape == (1, 16, 16) and float(s[0, 8, 7]) > float(s[0, 0, 0]) + 0.5
    roi = foreground_from_scores(s, 64)
    assert roi[0, 32, 28] and not roi[0, 2, 2]
    inside = roi[0, 20:44, 16:40].float().mean()
    assert float(inside) > 0.9 and float(roi[0].float().mean()) < 0.2


def test_attention_scores_are_the_cls_row_of_the_last_block(tiny_backbone):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    maps = attention_scores(tiny_backbone, images)
    assert maps.shape == (2, 14, 14) and bool((maps >= 0).all())
    total = maps.flatten(1).sum(1)  # CLS also attends to itself: the patches get less than all of it
    assert bool((total < 1).all()) and bool((total > 0.5).all())
    roi = region_of_interest(tiny_backbone, images, PerturbConfig(roi_method="attention"))
    assert roi.shape == (2, SIZE, SIZE) and roi.flatten(1).any(1).all()


def test_user_mask_method(tiny_backbone):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    config = APTConfig.preset("quick", perturb__roi_method="mask")
    with pytest.raises(ValueError, match="pass roi="):
        region_of_interest(tiny_backbone, images, config)
    with pytest.raises(ValueError, match="pass roi="):
        perturb(images, config, torch.Generator().manual_seed(0), backbone=tiny_backbone)
    mine = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    mine[:, 100:160, 40:120] = True
    out = perturb(images, config, torch.Generator().manual_seed(0), roi=mine, backbone=tiny_backbone)
    assert out.masks.any() and not (out.masks & ~mine).any()
    with pytest.raises(ValueError, match="roi_method"):
        region_of_interest(tiny_backbone, images, PerturbConfig(roi_method="saliency"))
