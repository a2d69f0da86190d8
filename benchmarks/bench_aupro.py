"""Benchmark apt_lab.metrics.aupro (exact, vectorised) against a straightforward threshold loop.

Usage: python benchmarks/bench_aupro.py [--n 100] [--size 256] [--thresholds 200]

Data: n random score maps of size x size with random blob masks (smoothed noise thresholded, several
8-connected regions per image, a quarter of the images fully normal). The loop baseline is the
straightforward implementation: regions labelled once, then for each of 200 evenly spaced thresholds
(between min and max score) binarise all maps, count false positives and loop over the regions for
their overlap. It is *coarser* than the exact curve (200 points instead of one per distinct score),
so the speed ratio understates the gain at equal accuracy. Both run in this process, one after the
other; peak memory is measured with tracemalloc (numpy allocations are traced) for each call, and
the growth of the process's max RSS during the first aupro call is printed as a cross-check.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from apt_lab.metrics import aupro  # noqa: E402


def make_data(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)).astype(np.float32),
                                    sigma=(0, 6, 6))                   # (n, size, size)
    masks = noise > np.quantile(noise, 0.93)                           # blobs, ~7 % of pixels
    masks[: n // 4] = False                                            # fully normal images
    maps = ndimage.gaussian_filter(masks.astype(np.float32), (0, 3, 3))
    maps += 0.5 * rng.random(maps.shape, dtype=np.float32)             # (n, size, size) float32
    return maps, masks


def loop_aupro(maps: np.ndarray, masks: np.ndarray, steps: int = 200, limit: float = 0.3) -> float:
    structure = np.ones((3, 3), dtype=int)
    regions = []
    for b in range(len(masks)):
        lab, k = ndimage.label(masks[b], structure)
        regions += [(b, np.nonzero(lab == r)) for r in range(1, k + 1)]
    normal = ~masks
    n_normal = normal.sum()
    fprs, pros = [], []
    for t in np.linspace(maps.min(), maps.max(), steps)[::-1]:
        pred = maps > t
        fprs.append((pred & normal).sum() / n_normal)
        pros.append(np.mean([pred[b][idx].sum() / len(idx[0]) for b, idx in regions]))
    fprs, pros = np.array([0.0, *fprs, 1.0]), np.array([0.0, *pros, 1.0])
    keep = fprs <= limit
    y_at = np.interp(limit, fprs, pros)
    x, y = np.append(fprs[keep], limit), np.append(pros[keep], y_at)
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / limit)


def timed(fn, *args, **kwargs):
    tracemalloc.start()
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return value, seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--thresholds", type=int, default=200)
    args = parser.parse_args()
    maps, masks = make_data(args.n, args.size)
    n_regions = sum(ndimage.label(m, np.ones((3, 3)))[1] for m in masks)
    print(f"data: {args.n} maps of {args.size}x{args.size} float32 "
          f"({maps.size / 1e6:.2f} M pixels, {masks.mean():.1%} anomalous, {n_regions} regions)")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fast, t_first, mem_fast = timed(aupro, maps, masks)               # includes first-touch costs
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _, t_fast, _ = timed(aupro, maps, masks)
    slow, t_slow, mem_slow = timed(loop_aupro, maps, masks, args.thresholds)
    print(f"apt_lab aupro (exact, every distinct score): first call {t_first:.2f} s, "
          f"repeat {t_fast:.2f} s, peak {mem_fast:.0f} MiB, AUPRO@0.3 = {fast:.6f}")
    print(f"loop over {args.thresholds} thresholds (approximate): {t_slow:.2f} s, "
          f"peak {mem_slow:.0f} MiB, AUPRO@0.3 = {slow:.6f}")
    print(f"speed-up: {t_slow / t_first:.1f}x (first call), {t_slow / t_fast:.1f}x (repeat); "
          f"input arrays: {(maps.nbytes + masks.nbytes) / 2**20:.0f} MiB; max RSS grew by "
          f"{rss_after - rss_before:.0f} MiB during aupro (process: {rss_after:.0f} MiB, most of "
          f"it the torch/open_clip imports of the apt_lab package)")

if __name__ == "__main__":
    main()
