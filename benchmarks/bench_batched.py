"""Batched tuning: S prompt sets of one category in one step (``tune_prompts_batched``) vs one by one.

The sets are what a sweep trains per category: k ∈ {1, 2, 4} cycled, seeds 0 … S−1. Both arms run the same
configs in this one process, one after the other (two torch processes on the same cores slow each other).
Seconds per step = the time one step of *all* S sets takes: sequential, the sum over the sets of each
``tune_prompts`` run's median step (history ``seconds``, after the first, warm-up step); batched, the median
batched step. The one-time work (shots, pool) is the same in both arms and not counted. ``--clock cpu`` (the
default) points the two modules' step clock at this process's CPU time on one thread, so other jobs on a
shared machine do not move the figures; ``--clock wall`` is for a machine of one's own (and for GPUs).

Run:  HF_HUB_OFFLINE=1 python benchmarks/bench_batched.py            (apt-tiny and ViT-B-16, random weights)
      python benchmarks/bench_batched.py --models ViT-B-16 --device cuda --clock wall --steps 20 --sets 1 3 9 27
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import apt_lab  # noqa: E402
from apt_lab.batched import tune_prompts_batched  # noqa: E402
from apt_lab.config import APTConfig  # noqa: E402
from apt_lab.tuning import tune_prompts  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "apt_lab" / "data" / "demo" / "brick" / "train" / "good"
SHOTS = (1, 2, 4)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def median_step(result) -> float:
    seconds = [r["seconds"] for r in result.history[1:]] or [r["seconds"] for r in result.history]
    return statistics.median(seconds)


def bench(model: str, sets: int, shots: torch.Tensor, args) -> dict:
    backbone = args.backbones[model]
    base = APTConfig().replace(backbone__name=model, train__steps=1 + args.steps, train__pool_size=args.pool_size,
                               train__batch_size=args.batch_size, perturb__region="image")
    configs = [base.replace(train__seed=seed) for seed in range(sets)]
    shots_list = [shots[:SHOTS[seed % len(SHOTS)]] for seed in range(sets)]
    sequential = sum(median_step(tune_prompts(backbone, s, c, progress=False)) for s, c in zip(shots_list, configs))
    batched = median_step(tune_prompts_batched(backbone, shots_list, configs)[0]) * sets  # history: 1/S share
    return {"model": model, "sets": sets, "sequential_s": sequential, "batched_s": batched,
            "ratio": sequential / batched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["apt-tiny", "ViT-B-16"])
    parser.add_argument("--sets", nargs="+", type=int, default=[1, 3, 9], help="prompt sets trained together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="steps measured (after one warm-up step)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: this process's CPU time")
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --clock cpu)")
    args = parser.parse_args()
    args.threads = args.threads or (1 if args.clock == "cpu" else torch.get_num_threads())
    if args.clock == "cpu":  # the steps' "seconds" in both modules: CPU time instead of wall time
        apt_lab.tuning.time = apt_lab.batched.time = types.SimpleNamespace(perf_counter=time.process_time)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, {args.clock} clock; batch "
          f"{args.batch_size}, pool {args.pool_size}, {args.steps} steps; sets: k in {SHOTS} cycled, seeds 0..S-1")
    print(f"{'model':<10} {'S':>3} {'sequential s/step':>18} {'batched s/step':>15} {'ratio':>7}")
    args.backbones = {}
    for model in args.models:
        args.backbones[model] = apt_lab.load_backbone(model, pretrained=None, device=args.device)
        shots = args.backbones[model].load_images(sorted(DEMO.glob("*.png"))[:max(SHOTS)])  # (4, 3, S, S)
        for sets in args.sets:
            r = bench(model, sets, shots, args)
            print(f"{r['model']:<10} {r['sets']:>3} {r['sequential_s']:>17.4f}s {r['batched_s']:>14.4f}s "
                  f"{r['ratio']:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
