"""Pixel metrics at scale: one shared curve equals sklearn's three functions; float16 maps are counted per value
(exact on them, streamed), AUPRO from those counts equals `aupro`; evaluation holds no float32 copy of the maps."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from apt_lab.metrics import PixelCounts, aupro, evaluate, pixel_metrics


def sklearn_pixel(maps, masks) -> dict:
    """The exact reference: sklearn on all pixels (what evaluate computed before, three sorts)."""
    s, y = np.asarray(maps, dtype=np.float64).reshape(-1), np.asarray(masks).reshape(-1)
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
    return {"pixel_auroc": roc_auc_score(y, s), "pixel_ap": average_precision_score(y, s), "pixel_f1max": f1.max()}


def case(seed, b=4, size=32, levels=None, low=0.0, high=1.0):
    """Smooth maps in [low, high] that partly follow blob masks; ``levels`` rounds them (many ties)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(b, size, size)), sigma=(0, 2, 2))
    masks = noise > np.quantile(noise, 0.9)
    masks[0] = False  # one normal image
    maps = ndimage.gaussian_filter(masks.astype(float), (0, 1.5, 1.5)) + 0.5 * rng.random((b, size, size))
    maps = low + (high - low) * (maps - maps.min()) / (maps.max() - maps.min())
    if levels:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 7), (3, 50)])
def test_shared_curve_equals_sklearn_on_float32_maps(seed, levels):
    maps, masks = case(seed, levels=levels)
    ours, reference = pixel_metrics(maps, masks), sklearn_pixel(maps, masks)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert ours[key] == pytest.approx(reference[key], abs=1e-12), key


@pytest.mark.parametrize("seed,levels", [(4, None), (5, 9), (6, None)])
def test_float16_counts_are_exact_on_the_float16_values(seed, levels):
    maps, masks = case(seed, levels=levels, low=0.45, high=0.55)  # a narrow band: many float16 ties
    half = maps.astype(np.float16)
    exact = half.astype(np.float64)  # the same values, through the exact sort path and the official aupro
    counts = PixelCounts()
    counts.add(half, masks)
    got = counts.metrics()
    for key, value in sklearn_pixel(exact, masks).items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["aupro"] == pytest.approx(aupro(exact, masks), abs=1e-12)
    assert pixel_metrics(torch.from_numpy(half), masks)["pixel_auroc"] == pytest.approx(got["pixel_auroc"], abs=1e-15)
    # streamed one image at a time: the same counts, the same numbers
    streamed = PixelCounts()
    for i in range(len(half)):
        streamed.add(half[i:i + 1], masks[i:i + 1])
    assert streamed.metrics() == pytest.approx(got, abs=1e-12)


def test_negative_zero_and_negative_scores_sort_correctly():
    maps = np.array([[[-2.0, -0.0], [0.0, 3.0]], [[-1.0, 0.5], [-0.0, 1.0]]], dtype=np.float16)
    masks = np.array([[[0, 1], [0, 1]], [[0, 0], [1, 0]]], dtype=bool)
    counts = PixelCounts()
    counts.add(maps, masks)
    want = sklearn_pixel(maps.astype(np.float64), masks)
    assert counts.metrics(None) == pytest.approx(want, abs=1e-12)


def test_rounding_bound_holds_for_float32_maps_rounded_to_float16():
    maps, masks = case(7, low=0.49, high=0.51)  # so narrow that float16 merges many pixels
    counts = PixelCounts()
    counts.add(maps, masks)  # float32 in: rounded to float16
    error = abs(counts.metrics()["pixel_auroc"] - roc_auc_score(masks.reshape(-1), maps.reshape(-1)))
    bound = counts.auroc_rounding_bound()
    assert 0 < error <= bound < 0.05
    wide = PixelCounts()
    wide.add(*case(7))  # over [0, 1] the bound is far smaller
    assert wide.auroc_rounding_bound() < bound / 5


def test_evaluate_float16_equals_evaluate_on_the_same_values_as_float64():
    maps, masks = case(8, b=6)
    labels = masks.reshape(6, -1).any(1).astype(int)
    labels[0] = 0
    scores = np.linspace(0, 1, 6)
    half = evaluate(scores, torch.from_numpy(maps.astype(np.float16)), labels, masks)
    exact = evaluate(scores, maps.astype(np.float16).astype(np.float64), labels, masks)
    assert half.keys() == exact.keys()
    for key in half:
        assert half[key] == pytest.approx(exact[key], abs=1e-12), key


def test_float16_overflow_and_one_class_are_clear_errors():
    counts = PixelCounts()
    with pytest.raises(ValueError, match="float16 range"):
        counts.add(np.full((1, 2, 2), 1e6, dtype=np.float32), np.eye(2, dtype=bool)[None])
    counts.add(np.zeros((1, 2, 2), dtype=np.float16), np.zeros((1, 2, 2), dtype=bool))
    with pytest.raises(ValueError, match="only normal"):
        counts.metrics()


def peak_bytes_of_evaluate(n: int, size: int = 1024) -> tuple[int, int, float]:
    """tracemalloc peak (numpy allocations are traced) of evaluate on n float16 maps; also their float32 size."""
    rng = np.random.default_rng(0)
    maps = rng.random((n, size, size), dtype=np.float32).astype(np.float16)  # the kept maps
    masks = np.zeros((n, size, size), dtype=bool)
    masks[1:, 100:200, 300:420] = True
    labels, scores = (np.arange(n) > 0).astype(int), rng.random(n)
    tracemalloc.start()
    try:
        result = evaluate(scores, maps, labels, masks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, maps.size * 4, result["pixel_auroc"]


def test_evaluating_float16_maps_streams_in_fixed_memory():
    """24 maps of 1024² pixels (a float32 copy: 100 MB): the peak is that of one chunk, whatever the count."""
    peak_few, _, _ = peak_bytes_of_evaluate(4)
    peak_many, float32_bytes, auroc = peak_bytes_of_evaluate(24)
    assert 0.45 < auroc < 0.55  # random maps
    assert peak_many < 1.25 * peak_few, (peak_few, peak_many)  # does not grow with the number of maps
    assert peak_many < float32_bytes / 3, f"peak {peak_many / 1e6:.0f} MB, a float32 copy {float32_bytes / 1e6:.0f} MB"
