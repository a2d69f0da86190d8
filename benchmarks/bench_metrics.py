"""Pixel metrics at scale: a VisA-sized test set (200 maps of 1.5 megapixels) evaluated from float16 maps (not a test).

Three ways to the same pixel AUROC / AP / F1-max, timed in this one process:
    sklearn   roc_auc_score + average_precision_score + precision_recall_curve on float32 (three sorts; what
              ``evaluate`` did before issue 9), on the first ``--subset`` maps only (it needs all pixels at once)
    sort      ``pixel_metrics`` on float32: one shared sort, same subset
    float16   ``evaluate`` on float16 maps: counts per float16 value, a few images at a time (all maps; AUPRO too)
Peak memory is tracemalloc's (numpy allocations are traced), next to the size of the maps in float32.

Run: .venv/bin/python benchmarks/bench_metrics.py [--maps 200] [--height 1000] [--width 1500] [--subset 20]
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from apt_lab.metrics import evaluate, pixel_metrics  # noqa: E402


def make_maps(n: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth float16 maps in [0, 1] with elliptical defects in 3 of 4 images (the maps partly follow them)."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n, height, width), dtype=np.float16)
    masks = np.zeros((n, height, width), dtype=bool)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        base = ndimage.zoom(rng.random((height // 50 + 1, width // 50 + 1)), 50, order=1)[:height, :width]
        if i % 4:
            cy, cx, r = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width, rng.uniform(20, 120)
            masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        maps[i] = np.clip(0.6 * base + 0.4 * masks[i] * rng.random(), 0, 1)
    return maps, masks


def measured(fn):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = fn()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=200)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--subset", type=int, default=20, help="maps for the float32 comparisons")
    args = parser.parse_args()
    maps, masks = make_maps(args.maps, args.height, args.width)
    labels = masks.reshape(args.maps, -1).any(1).astype(int)
    scores = np.random.default_rng(1).random(args.maps)
    pixels = maps.size
    print(f"{args.maps} maps of {args.height}x{args.width} ({pixels / 1e6:.0f} M pixels): float16 maps "
          f"{maps.nbytes / 2**20:.0f} MiB, the same in float32 {pixels * 4 / 2**20:.0f} MiB")

    full, seconds, peak = measured(lambda: evaluate(scores, maps, labels, masks))
    print(f"float16  evaluate, all {args.maps} maps (+ AUPRO, image metrics): {seconds:7.2f} s, peak "
          f"{peak / 2**20:6.0f} MiB   pixel AUROC {full['pixel_auroc']:.6f}, AUPRO {full['aupro']:.6f}")

    sub32, sub_masks = maps[:args.subset].astype(np.float32), masks[:args.subset]

    def sklearn_three():
        y, s = sub_masks.reshape(-1), sub32.reshape(-1)
        precision, recall, _ = precision_recall_curve(y, s)
        f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
        return {"pixel_auroc": roc_auc_score(y, s), "pixel_ap": average_precision_score(y, s),
                "pixel_f1max": f1.max()}

    reference, t_sklearn, p_sklearn = measured(sklearn_three)
    shared, t_sort, p_sort = measured(lambda: pixel_metrics(sub32, sub_masks))
    half, t_half, p_half = measured(lambda: pixel_metrics(maps[:args.subset], sub_masks))
    gap = max(abs(shared[k] - reference[k]) for k in reference)
    gap_half = max(abs(half[k] - reference[k]) for k in reference)
    print(f"first {args.subset} maps ({sub32.size / 1e6:.0f} M pixels), pixel AUROC/AP/F1-max only:")
    print(f"  sklearn (3 sorts, float32)  {t_sklearn:7.2f} s, peak {p_sklearn / 2**20:6.0f} MiB")
    print(f"  one shared sort (float32)   {t_sort:7.2f} s, peak {p_sort / 2**20:6.0f} MiB   max |diff| {gap:.1e}")
    print(f"  float16 counts              {t_half:7.2f} s, peak {p_half / 2**20:6.0f} MiB   max |diff| {gap_half:.1e} "
          "(the maps are float16 values, so no rounding here)")
    print(f"speed-up over sklearn: shared sort {t_sklearn / t_sort:.1f}x, float16 counts {t_sklearn / t_half:.1f}x")


if __name__ == "__main__":
    main()
