"""apt_lab.metrics: hand-checked examples (mirroring the docstrings), AUPRO against slow references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc

from apt_lab.metrics import (aupro, evaluate, image_ap, image_auroc, image_f1max, pixel_ap,
                             pixel_auroc, pixel_f1max, pro_curve)


# --- slow, straightforward references ------------------------------------------------------------
def _regions(masks):
    out = []
    for b, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        out += [(b, lab == k) for k in range(1, n + 1)]
    return out


def reference_aupro(maps, masks, limit=0.3):
    """Official definition, one binarisation per distinct score (descending)."""
    regions = _regions(masks)
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[b] & r).sum() / r.sum() for b, r in regions]))
    fprs, pros = np.array(fprs + [1.0]), np.array(pros + [1.0])
    area = 0.0
    for i in range(len(fprs) - 1):
        x0, x1, y0, y1 = fprs[i], fprs[i + 1], pros[i], pros[i + 1]
        if x0 >= limit:
            break
        if x1 > limit:                                      # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


def reference_cflow200(maps, masks, limit=0.3):
    """The published 200-step loop (APRIL-GAN / AnomalyCLIP style), thresholds without float drift."""
    lo, hi = maps.min(), maps.max()
    regions = _regions(masks)
    fprs, pros = [], []
    for th in lo + (hi - lo) / 200 * np.arange(200):
        pred = maps > th
        pros.append(np.mean([pred[b][r].sum() / r.sum() for b, r in regions]))
        fprs.append(np.logical_and(~masks, pred).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    f = fprs[keep]
    return auc((f - f.min()) / (f.max() - f.min()), pros[keep])


def _random_case(seed, b=3, h=24, w=24, levels=None):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(b, h, w)), sigma=(0, 2, 2))
    masks = noise > np.quantile(noise, 0.85)                # several blobs per image
    masks[0] = False                                         # one fully normal image
    maps = ndimage.gaussian_filter(masks.astype(float), (0, 1.5, 1.5)) + 0.4 * rng.random((b, h, w))
    if levels:
        maps = np.round(maps * levels) / levels               # many ties
    return maps, masks


def _docstring_case():
    a = np.zeros((2, 4, 4))
    g = np.zeros((2, 4, 4), dtype=bool)
    g[0, :2, :2] = True; a[0, 0, :2] = 0.9; a[0, 1, :2] = 0.2           # noqa: E702 region A
    g[1, 1, 1] = g[1, 2, 2] = True; a[1, 1, 1] = 0.7; a[1, 2, 2] = 0.1  # noqa: E702 region B
    a[0, 0, 2:] = 0.8; a[0, 2:] = 0.4; a[1, 0] = 0.4; a[1, 3, 0] = 0.4  # noqa: E702 normals
    return a, g


# --- image and pixel metrics ---------------------------------------------------------------------
def test_image_metrics_hand_examples():
    assert image_auroc([0.5, 0.5, 0.9], [0, 1, 1]) == 0.75
    assert image_ap([0.5, 0.5, 0.9], [0, 1, 1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert image_f1max([0.5, 0.5, 0.9], [0, 1, 1]) == pytest.approx(0.8)
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert image_auroc(torch.tensor([0.9, 0.1]), torch.tensor([1, 0])) == 1.0
    assert image_auroc(np.array([0.2, 0.6, 0.4], np.float16), [0, 1, 0]) == 1.0


def test_pixel_metrics_hand_examples():
    assert pixel_auroc([[[0.1, 0.9], [0.8, 0.3]]], [[[0, 1], [0, 0]]]) == 1.0
    assert pixel_ap([[[0.1, 0.9], [0.95, 0.3]]], [[[0, 1], [0, 0]]]) == pytest.approx(0.5)
    assert pixel_f1max([[[0.1, 0.9], [0.95, 0.3]]], [[[0, 1], [0, 0]]]) == pytest.approx(2 / 3)
    maps = torch.tensor([[[0.1, 0.9], [0.95, 0.3]]])[:, None]        # (B, 1, H, W) accepted
    assert pixel_auroc(maps, torch.tensor([[[False, True], [False, False]]])) == pytest.approx(2 / 3)


# --- AUPRO ---------------------------------------------------------------------------------------
def test_aupro_docstring_example_by_hand():
    a, g = _docstring_case()
    expected = (0.25 * 2 / 26 + 0.5 * (0.3 - 2 / 26)) / 0.3
    assert aupro(a, g) == pytest.approx(expected, abs=1e-12)
    assert round(aupro(a, g), 6) == 0.435897
    assert reference_aupro(a, g) == pytest.approx(expected, abs=1e-12)
    fpr, pro, th = pro_curve(a, g)
    assert fpr[:5].tolist() == pytest.approx([0, 0, 2 / 26, 2 / 26, 15 / 26])
    assert pro[:5].tolist() == pytest.approx([0, 0.25, 0.25, 0.5, 0.5])
    assert fpr[-1] == 1 and pro[-1] == 1 and th[0] == np.inf
    # 8-connectivity matters: cutting B's diagonal link (4-connectivity would) changes the value
    g4 = g.copy()
    g4[1, 2, 2] = False
    g4[1, 3, 3] = True
    a4 = a.copy()
    a4[1, 2, 2], a4[1, 3, 3] = 0.0, 0.1
    assert aupro(a4, g4) != pytest.approx(aupro(a, g))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("levels", [None, 20])
def test_aupro_equals_the_official_definition(seed, levels):
    maps, masks = _random_case(seed, levels=levels)
    n_regions = len(_regions(masks))
    assert n_regions >= 3
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(
            reference_aupro(maps, masks, limit), abs=1e-6)
    assert aupro(torch.from_numpy(maps).float(), torch.from_numpy(masks)) == pytest.approx(
        reference_aupro(maps.astype(np.float32), masks), abs=1e-6)


def test_aupro_perfect_and_inverted_maps():
    maps, masks = _random_case(7)
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert aupro(-masks.astype(float), masks) == pytest.approx(0.0)


def test_cflow200_is_the_documented_approximation():
    a, g = _docstring_case()
    assert aupro(a, g, method="cflow200") == pytest.approx(0.25, abs=1e-12)   # official: 0.4359
    fpr, pro, th = pro_curve(a, g, method="cflow200")
    assert len(th) == 200 and th[0] == 0.0 and th[-1] == pytest.approx(0.9 - 0.9 / 200)
    assert np.all(np.diff(th) > 0)
    for seed in range(3):
        maps, masks = _random_case(seed)
        ours = aupro(maps, masks, method="cflow200")
        assert ours == pytest.approx(reference_cflow200(maps, masks), abs=1e-9)
        assert abs(ours - aupro(maps, masks)) > 1e-4            # it is a different number


# --- evaluate and errors -------------------------------------------------------------------------
def test_evaluate_all_metrics_and_skipping():
    maps, masks = _random_case(3)
    labels = masks.reshape(3, -1).any(axis=1).astype(int)
    scores = maps.reshape(3, -1).max(axis=1)
    out = evaluate(scores, maps, labels, masks)
    assert list(out) == ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                         "pixel_f1max", "aupro"]
    assert out["aupro"] == pytest.approx(aupro(maps, masks))
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks))
    assert out["image_auroc"] == image_auroc(scores, labels)
    skipped = evaluate(scores, maps, labels, None)
    assert skipped["aupro"] is None and skipped["pixel_ap"] is None
    assert evaluate(scores, maps, labels, np.zeros_like(masks))["pixel_auroc"] is None
    assert evaluate(scores, None, labels)["image_ap"] == out["image_ap"]


def test_errors_say_what_and_where():
    maps, masks = _random_case(1)
    with pytest.raises(ValueError, match=r"anomaly_maps has shape \(3, 24, 24\) but masks has "
                                         r"shape \(3, 12, 12\)"):
        aupro(maps, masks[:, ::2, ::2])
    bad = maps.copy()
    bad[2, 5, 6] = np.nan
    bad[2, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"1 NaN and 1 inf values .*look at images \[2\]"):
        pixel_auroc(bad, masks)
    with pytest.raises(ValueError, match=r"image_scores contains 1 NaN"):
        image_auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="AUROC needs both normal and anomalous images; got only "
                                         r"normal \(label 0\) images \(3 of them\)"):
        image_auroc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="got only normal .* pixels"):
        aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match=r"masks must be binary .*\[255\]"):
        pixel_ap(maps, masks.astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="image_scores has shape"):
        image_ap([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0)
    with pytest.raises(ValueError, match="Unknown AUPRO method 'fast'"):
        aupro(maps, masks, method="fast")
    with pytest.raises(ValueError, match="has 3 maps .* labels has 2"):
        evaluate([0.1, 0.9], maps, [0, 1], masks)


def test_skipped_pixel_metrics_are_said_once_per_process(monkeypatch):
    """Issue 24: a run printed "pixel metrics skipped" once per cell (17 times): Python's once-per-place filter forgets
    whenever code changes the warning filters, as torch does between cells."""
    import warnings

    from apt_lab import metrics

    monkeypatch.setattr(metrics, "SKIP_NOTICES", set(), raising=False)
    maps, masks = _random_case(3)
    scores, labels = maps.reshape(3, -1).max(axis=1), np.array([0, 1, 1])
    with warnings.catch_warnings(record=True) as caught:
        for _ in range(17):
            warnings.simplefilter("default")  # what torch's own catch_warnings does: the registry is forgotten
            assert evaluate(scores, maps, labels, np.zeros_like(masks))["pixel_auroc"] is None
    said = [w for w in caught if "pixel metrics skipped" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, metrics.PixelMetricsSkipped), len(said)
    assert "none of the 3 masks marks an anomalous pixel" in str(said[0].message)
    assert said[0].filename == __file__  # points at the caller of evaluate
