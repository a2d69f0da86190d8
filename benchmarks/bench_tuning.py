"""Tuning step time: pre-encoded perturbed pool (apt_lab's default) vs re-encoding each step's anomalies.

Both arms are the same ``tune_prompts`` loop; the baseline only sets ``config.train.encode_each_step=True``
(each step perturbs and encodes its ``batch_size · anomaly_fraction`` anomalies afresh; clean shots stay
cached in both arms, so the comparison isolates the pool). Both run in this one process, one after the other,
because two torch processes on the same cores slow each other several-fold.

Per-step time = median of the history's ``seconds`` after the first (warm-up) step; the one-time pool
encode of the cached arm is printed beside it.

Run:  HF_HUB_OFFLINE=1 python benchmarks/bench_tuning.py            (apt-tiny and ViT-B-16, random weights)
      python benchmarks/bench_tuning.py --models ViT-B-16 --device cuda --steps 50
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import apt_lab  # noqa: E402
from apt_lab.config import APTConfig  # noqa: E402
from apt_lab.tuning import tune_prompts  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "apt_lab" / "data" / "demo" / "brick" / "train" / "good"


def step_time(result) -> float:
    seconds = [r["seconds"] for r in result.history[1:]] or [r["seconds"] for r in result.history]
    return statistics.median(seconds)


def bench(model: str, args) -> dict:
    t0 = time.perf_counter()
    backbone = apt_lab.load_backbone(model, pretrained=None, device=args.device)
    build_s = time.perf_counter() - t0
    shots = backbone.load_images(sorted(DEMO.glob("*.png"))[:args.k])  # (K, 3, S, S)
    config = APTConfig().replace(backbone__name=model, train__pool_size=args.pool_size,
                                 train__batch_size=args.batch_size, train__anomaly_fraction=0.5)
    cached = tune_prompts(backbone, shots, config.replace(train__steps=args.steps), progress=False)
    fresh = tune_prompts(backbone, shots, config.replace(train__steps=args.baseline_steps,
                                                         train__encode_each_step=True), progress=False)
    row = {"model": model, "device": str(backbone.device), "build_s": build_s,
           "pool_encode_s": cached.timings["pool_s"], "cached_step_s": step_time(cached),
           "fresh_step_s": step_time(fresh)}
    row["ratio"] = row["fresh_step_s"] / row["cached_step_s"]
    row["break_even_steps"] = row["pool_encode_s"] / max(1e-9, row["fresh_step_s"] - row["cached_step_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["apt-tiny", "ViT-B-16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=12, help="steps of the cached (pool) arm")
    parser.add_argument("--baseline-steps", type=int, default=5, help="steps of the re-encode arm")
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=4, help="normal shots")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}; pool {args.pool_size}, "
          f"batch {args.batch_size} (half anomalies), k={args.k}")
    print(f"{'model':<10} {'pool encode':>12} {'cached step':>12} {'re-encode step':>15} {'ratio':>7} "
          f"{'break-even':>11}")
    for model in args.models:
        r = bench(model, args)
        print(f"{r['model']:<10} {r['pool_encode_s']:>11.2f}s {r['cached_step_s']:>11.3f}s "
              f"{r['fresh_step_s']:>14.3f}s {r['ratio']:>6.1f}x {r['break_even_steps']:>7.0f} steps", flush=True)


if __name__ == "__main__":
    main()
