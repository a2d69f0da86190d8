"""CFG: registry, built-in generators, blobs, region of interest, perturb (CPU, apt-tiny random weights)."""
import pytest
import torch

import apt_lab
from apt_lab.blobs import area_bounds, random_blob
from apt_lab.config import APTConfig, PerturbConfig
from apt_lab.perturbations import (Perturbation, get_perturbation, list_perturbations, patch_mask, perturb,
                                   perturb_features, register_perturbation, unregister_perturbation)
from apt_lab.roi import foreground_from_scores, otsu_threshold, region_of_interest

S = 64  # small images keep the pixel-level tests fast; patch 16 → 4x4 grid


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def backbone():
    return apt_lab.load_backbone("apt-tiny", device="cpu")


@pytest.fixture()
def images():
    return torch.rand(4, 3, S, S, generator=rng(123))


@pytest.fixture()
def box_roi():
    roi = torch.zeros(4, S, S, dtype=torch.bool)
    roi[:, 10:40, 20:50] = True  # 30x30 = 22% of the image
    return roi


def cfg_with(**kw):
    base = dict(min_area=0.02, max_area=0.1)
    base.update(kw)
    return PerturbConfig(**base)


# ------------------------------------------------------------------------------------------------- registry
def test_builtins_registered():
    assert {"gaussian", "uniform", "salt_pepper"} <= set(list_perturbations("pixel"))
    assert list_perturbations("feature") == ["feature"]


def test_unknown_name_lists_registered_and_how_to_register():
    with pytest.raises(ValueError, match=r"unknown perturbation 'nope'.*gaussian.*register_perturbation"):
        get_perturbation("nope")
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(torch.rand(1, 3, S, S), cfg_with(generators=("nope",), region="image"), rng())


@pytest.mark.parametrize("name", ["gaussian", "uniform", "salt_pepper"])
def test_builtin_masks_inside_roi_and_pixels_change_only_inside_mask(name, images, box_roi):
    cfg = cfg_with(generators=(name,), strength=(0.5, 0.5))
    out = perturb(images, cfg, rng(1), roi=box_roi, patch_size=16)
    low, _ = area_bounds((S, S), cfg.min_area, cfg.max_area)
    assert out.generators == [name] * 4
    assert not (out.masks & ~box_roi).any()  # mask ⊆ ROI
    assert (out.masks.flatten(1).sum(1) >= low).all()  # never empty, ≥ min_area
    outside = ~out.masks[:, None].expand_as(images)
    assert torch.equal(out.images[outside], images[outside])  # exact equality outside the mask
    assert not torch.equal(out.images, images)
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_gaussian_strength_zero_changes_nothing(images):
    out = perturb(images, cfg_with(generators=("gaussian",), strength=(0.0, 0.0), region="image"), rng(),
                  patch_size=16)
    assert torch.equal(out.images, images)
    assert out.masks.flatten(1).any(1).all()


def test_salt_pepper_sets_about_strength_of_region_to_0_or_1(images):
    image, region = images[0], torch.zeros(S, S, dtype=torch.bool)
    region[:32] = True
    new, mask = get_perturbation("salt_pepper")(image, region, rng(), 0.5)
    assert torch.equal(mask, region)
    changed = (new != image).any(0)  # (H, W)
    assert 0.4 < changed[region].float().mean() < 0.6 and not changed[~region].any()
    assert ((new[:, changed] == 0) | (new[:, changed] == 1)).all()


def test_researcher_three_argument_generator_works_through_perturb(images):
    @register_perturbation("test_invert")
    def invert(image, region, rng):  # no strength parameter
        return torch.where(region, 1 - image, image), region

    @register_perturbation("test_gray")
    def gray(image, region, rng, strength):  # returns only the image: its mask is the whole region
        return torch.where(region, torch.full_like(image, 0.5), image)

    try:
        out = perturb(images, cfg_with(generators=("test_gray",), region="image"), rng(), patch_size=16)
        assert (out.images[out.masks[:, None].expand_as(images)] == 0.5).all()
        cfg = APTConfig().replace(perturb__generators=("test_invert",), perturb__region="image")
        out = perturb(images, cfg, rng(), patch_size=16)
        assert out.generators == ["test_invert"] * 4
        m = out.masks[:, None].expand_as(images)
        assert torch.allclose(out.images[m], 1 - images[m])
        assert "test_invert" in list_perturbations()
    finally:
        unregister_perturbation("test_invert")
        unregister_perturbation("test_gray")
    assert "test_invert" not in list_perturbations()


def test_registering_a_taken_name_needs_replace():
    with pytest.raises(ValueError, match="already registered"):
        register_perturbation("gaussian")(lambda image, region, rng: (image, region))


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_output_different_seed_differs(images, box_roi):
    cfg = cfg_with(blob="mixed")
    a = perturb(images, cfg, rng(7), roi=box_roi, patch_size=16)
    b = perturb(images, cfg, rng(7), roi=box_roi, patch_size=16)
    c = perturb(images, cfg, rng(8), roi=box_roi, patch_size=16)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and a.generators == b.generators
    assert torch.equal(a.strengths, b.strengths)
    assert not torch.equal(a.masks, c.masks)


# ------------------------------------------------------------------------------------------------------ blobs
@pytest.mark.parametrize("kind", ["perlin", "ellipse", "mixed"])
def test_blob_area_within_bounds(kind):
    g = rng(3)
    low, high = area_bounds((S, S), 0.02, 0.1)
    for _ in range(10):
        blob = random_blob((S, S), g, kind, 0.02, 0.1)
        assert blob.dtype == torch.bool and low <= int(blob.sum()) <= high


def test_blob_fallback_is_exact_min_area_never_empty():
    # max_area == min_area on a tiny image: hard to hit exactly, so the disc fallback of exactly min area is used
    blob = random_blob((9, 9), rng(), "ellipse", 5 / 81, 5 / 81, center=(0, 0))
    assert int(blob.sum()) == 5 and blob[0, 0]


def test_blob_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown blob kind"):
        random_blob((S, S), rng(), "square")
    with pytest.raises(ValueError, match="min_area <= max_area"):
        random_blob((S, S), rng(), "ellipse", 0.2, 0.1)


def test_thin_roi_still_gets_min_area_inside_roi(images):
    roi = torch.zeros(4, S, S, dtype=torch.bool)
    roi[:, :, 30:33] = True  # a 3-pixel-wide stripe: blobs rarely overlap it enough
    cfg = cfg_with(min_area=0.03, max_area=0.04)
    out = perturb(images, cfg, rng(), roi=roi, patch_size=16)
    low, _ = area_bounds((S, S), 0.03, 0.04)
    assert not (out.masks & ~roi).any() and (out.masks.flatten(1).sum(1) >= low).all()


# ------------------------------------------------------------------------------------------------ patch masks
def test_patch_mask_hand_made():
    m = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    assert patch_mask(m, 2, 0.5)[0].tolist() == [[True, False], [False, False]]
    assert patch_mask(m, 2, 0.25)[0].tolist() == [[True, False], [False, True]]


def test_perturb_patch_masks_follow_pixel_masks(images):
    out = perturb(images, cfg_with(region="image", patch_threshold=0.25), rng(), patch_size=16)
    assert out.patch_masks.shape == (4, S // 16, S // 16)
    expected = patch_mask(out.masks, 16, 0.25)
    for i in range(4):  # equal, or (when no patch reaches the threshold) the single most covered patch
        assert torch.equal(out.patch_masks[i], expected[i]) or (not expected[i].any() and out.patch_masks[i].sum() == 1)
    assert out.patch_masks.flatten(1).any(1).all()


# ---------------------------------------------------------------------------------------- region of interest
def test_otsu_hand_made():
    assert otsu_threshold(torch.tensor([0.0, 0, 1, 1, 5, 5, 6, 6])) == 3.0
    assert otsu_threshold(torch.ones(5)) == float("inf")


def test_roi_object_on_plain_background_vs_texture():
    g = rng(5)
    obj = 0.05 * torch.rand(1, 14, 14, generator=g)
    obj[0, 4:9, 5:10] += 1.0  # a 5x5 object on a flat background
    roi = foreground_from_scores(obj, 14, texture_fraction=0.7)
    assert roi[0, 4:9, 5:10].all() and int(roi.sum()) == 5 * 5  # the object, not grown past it
    assert int(foreground_from_scores(obj, 14, dilation=1).sum()) == 7 * 7  # dilation: pixels, after the decision
    noise = torch.rand(1, 14, 14, generator=g)  # no object: the foreground is as dense on the border → texture
    assert foreground_from_scores(noise, 14, texture_fraction=0.7).all()
    tiny = torch.zeros(1, 14, 14)
    tiny[0, 7, 7] = 1.0  # one patch (<5%): degenerate → whole image
    assert foreground_from_scores(tiny, 14).all()


def test_region_of_interest_with_backbone(backbone):
    x = torch.rand(2, 3, 224, 224, generator=rng())
    x[:, :, 64:160, 64:160] = 0.9 + 0.1 * x[:, :, 64:160, 64:160]  # a bright square object on noise
    for method in ("text", "attention", "pixels"):
        roi = region_of_interest(backbone, x, APTConfig().replace(perturb__roi_method=method))
        assert roi.shape == (2, 224, 224) and roi.dtype == torch.bool and roi.flatten(1).any(1).all(), method
    roi = region_of_interest(backbone, x, APTConfig().replace(perturb__roi_method="pixels"))
    assert roi[:, 72:152, 72:152].all() and not roi[:, :48].any()  # the object, drawn at pixel resolution
    assert region_of_interest(backbone, x, APTConfig().replace(perturb__region="image")).all()


def test_perturb_computes_roi_from_backbone(backbone):
    x = torch.rand(2, 3, 224, 224, generator=rng())
    out = perturb(x, APTConfig(), rng(), backbone=backbone)
    assert isinstance(out, Perturbation) and out.patch_masks.shape == (2, 14, 14)
    assert not (out.masks & ~out.roi).any()


# ---------------------------------------------------------------------------------------------- feature space
def test_feature_generator_only_touches_masked_patch_tokens():
    g = rng()
    feats = apt_lab.ImageFeatures(torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1),
                                  torch.nn.functional.normalize(torch.randn(3, 2, 4, 8, generator=g), dim=-1), (2, 2))
    pm = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    out = perturb_features(feats, pm, rng(1), 1.0)
    assert torch.equal(out.cls, feats.cls)
    inside = pm.reshape(1, 2, 4).expand(3, 2, 4)
    assert torch.equal(out.patches[~inside], feats.patches[~inside])
    assert not torch.allclose(out.patches[inside], feats.patches[inside])
    assert torch.allclose(out.patches.norm(dim=-1), torch.ones(3, 2, 4), atol=1e-5)
    assert torch.allclose(perturb_features(feats, pm, rng(1), 0.0).patches, feats.patches, atol=1e-6)


def test_perturb_skips_feature_space_generators(images):
    out = perturb(images, cfg_with(generators=("feature", "gaussian"), region="image"), rng(), patch_size=16)
    assert out.generators == ["gaussian"] * 4
    with pytest.raises(ValueError, match="no pixel-space generator"):
        perturb(images, cfg_with(generators=("feature",), region="image"), rng(), patch_size=16)


# ------------------------------------------------------------------------------------------------------ errors
def test_errors_wrong_channels_nan_and_roi_shape(images, box_roi, backbone):
    with pytest.raises(ValueError, match="expected 3 colour channels, got 1"):
        perturb(torch.rand(2, 1, S, S), cfg_with(region="image"), rng())
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        perturb(bad, cfg_with(region="image"), rng())
    with pytest.raises(ValueError, match=r"roi: expected shape \(4, 64, 64\).*got \(4, 32, 32\)"):
        perturb(images, cfg_with(), rng(), roi=box_roi[:, :32, :32])
    with pytest.raises(ValueError, match="pass backbone="):
        perturb(images, cfg_with(), rng())
    with pytest.raises(ValueError, match="roi is empty for image"):
        perturb(images, cfg_with(), rng(), roi=torch.zeros(4, S, S, dtype=torch.bool))


def test_generator_returning_an_empty_mask_is_an_error(images):
    @register_perturbation("test_nothing")
    def nothing(image, region, rng, strength):
        return image, torch.zeros_like(region)

    try:
        with pytest.raises(ValueError, match="'test_nothing' returned a mask with no pixel"):
            perturb(images, cfg_with(generators=("test_nothing",), region="image"), rng(), patch_size=16)
    finally:
        unregister_perturbation("test_nothing")


def test_region_of_interest_reuses_given_features_without_a_second_encoder_pass(monkeypatch):
    import apt_lab
    from apt_lab.config import APTConfig

    backbone = apt_lab.load_backbone("apt-tiny", device="cpu")
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    config = APTConfig.preset("quick")
    expected = region_of_interest(backbone, images, config)
    features = backbone.encode_images(images)
    calls = []
    original = backbone.encode_images
    monkeypatch.setattr(backbone, "encode_images", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert torch.equal(region_of_interest(backbone, images, config, features=features), expected)
    assert calls == []


def test_salt_pepper_mask_is_the_sprinkled_region_through_perturb(images):
    # the documented definition: mask = the whole sprinkled region, ≈ strength of its pixels change, none outside
    for strength in (0.2, 0.6):
        cfg = cfg_with(generators=("salt_pepper",), strength=(strength, strength), region="image",
                       min_area=0.1, max_area=0.12)
        out = perturb(images, cfg, rng(), patch_size=16)
        changed = (out.images != images).any(1)  # (B, S, S)
        assert abs(float(changed[out.masks].float().mean()) - strength) < 0.06
        assert not (changed & ~out.masks).any()
        # why the region: the specks alone would mark few patches at low strength (patch_threshold 0.25)
        specks = patch_mask(changed, 16, cfg.patch_threshold)
        if strength < cfg.patch_threshold:
            assert int(specks.sum()) < int(out.patch_masks.sum()) // 2
