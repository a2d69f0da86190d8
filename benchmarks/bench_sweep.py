"""An MVTec-AD-shaped sweep: counts image-encoder passes and times each stage (not a test).

The sweep of issue 9: 15 categories with MVTec AD's train and test counts (1,725 test images), k ∈ {1, 2, 4} with
the shipped fixed draws (nested), 3 seeds, APT with the paper preset (ViT-L-14-336 at 518 px, 400 steps, a pool
of 64 perturbed images), random weights (weight values never change speed). It runs ``apt_lab.sweep.run_sweep``,
category-outermost with one FeatureStore per category. The data are synthetic images in the MVTec layout, written
once under ``--data`` (test images at ``--image-px`` pixels, so decoding costs something; anomalous ones with a
blob mask; files repeat through symbolic links).

Encoder passes are counted by the backbone (``backbone.images_encoded``: every image through the image tower),
not estimated. ``--no-reuse`` runs every cell with its own store, which is what the pipeline did before issue 9
(each run encoded its test set and shots again): the same script then counts the old figure.

Modes:
    (default)     the full sweep above; needs a GPU (the paper preset takes days on a CPU).
    --count-only  the full sweep's structure (15 categories, 1,725 test images, k ∈ {1, 2, 4}, 3 seeds, pool 64)
                  on apt-tiny at 32 px with 1 tuning step (steps never encode; the pool is built once): every
                  encoder pass is real and counted, in a minute or two on a CPU.
    --small       apt-tiny at 224 px on the CPU, MVTec's test counts / 10, pool 16, 20 steps: per-stage seconds
                  in a few minutes (``make bench``).

Stages (seconds summed over the runs): encode = decoding and encoding test images and shots (FeatureStore),
pool = perturbing and encoding the pools, tuning = the optimiser steps (tune minus pool), scoring = maps and
scores from features, metrics = evaluation; total = wall time of the sweep. A sweep encodes each category's test
set and largest shot draw before its first cell, so there the encode stage is the time spent outside the cells
(the total minus the cells' own seconds: data checks and file fingerprints are in it too).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sweep.py --count-only [--no-reuse]
      HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sweep.py --small
      python benchmarks/bench_sweep.py                       (on a CUDA machine; --json out.json for the table)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import apt_lab  # noqa: E402
from apt_lab.backbone import load_backbone_from_config, pick_device  # noqa: E402
from apt_lab.config import APTConfig  # noqa: E402
from apt_lab.data.draws import TRAIN_COUNTS  # noqa: E402
from apt_lab.data.files import Folder  # noqa: E402
from apt_lab.features import FeatureStore  # noqa: E402
from apt_lab.pipeline import run_category  # noqa: E402
from apt_lab.store import read_run  # noqa: E402
from apt_lab.sweep import Plan, run_sweep  # noqa: E402

# MVTec AD test split: (all test images, normal ones) per category; 1,725 test images in all.
MVTEC_TEST = {"bottle": (83, 20), "cable": (150, 58), "capsule": (132, 23), "carpet": (117, 28), "grid": (78, 21),
              "hazelnut": (110, 40), "leather": (124, 32), "metal_nut": (115, 22), "pill": (167, 26),
              "screw": (160, 41), "tile": (117, 33), "toothbrush": (42, 12), "transistor": (100, 60),
              "wood": (79, 19), "zipper": (151, 32)}
DISTINCT = 6  # distinct normal and anomalous pictures per category; the rest are links to them
STAGES = ("encode", "pool", "tuning", "scoring", "metrics")


def write_dataset(root: Path, px: int, scale: float) -> Path:
    """MVTec layout under ``root``: train/good (MVTec's train counts, tiny files), test/good, test/defect and
    ground_truth/defect with ``px``-pixel images; test counts × ``scale`` (at least 2 normal and 2 anomalous)."""
    marker = root / f"complete-{px}-{scale}"
    if marker.is_file():
        return root
    rng = np.random.default_rng(0)
    for c, category in enumerate(MVTEC_TEST):
        total, normal = MVTEC_TEST[category]
        n_normal = max(2, round(normal * scale))
        n_bad = max(2, round((total - normal) * scale))
        base = root / category
        for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        tiny = base / "train" / "tiny.bin"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tiny.with_suffix(".png"))
        for i in range(TRAIN_COUNTS["mvtec"][category]):
            _link(base / "train/good" / f"{i:03d}.png", tiny.with_suffix(".png"))
        yy, xx = np.mgrid[0:px, 0:px] / px
        for kind, count in (("good", n_normal), ("defect", n_bad)):
            for i in range(count):
                target = base / "test" / kind / f"{i:03d}.png"
                if i >= DISTINCT:
                    _link(target, base / "test" / kind / f"{i % DISTINCT:03d}.png")
                    if kind == "defect":
                        _link(base / "ground_truth/defect" / f"{i:03d}_mask.png",
                              base / "ground_truth/defect" / f"{i % DISTINCT:03d}_mask.png")
                    continue
                phase = rng.random(3) * 6.28
                texture = 0.5 + 0.2 * np.sin(2 * np.pi * (3 + c % 5) * xx[..., None] + phase) \
                    * np.cos(2 * np.pi * 4 * yy[..., None]) + 0.05 * rng.standard_normal((px, px, 3))
                if kind == "defect":
                    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
                    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                    texture[mask] = rng.random(3)
                    Image.fromarray((mask * 255).astype(np.uint8)).save(
                        base / "ground_truth/defect" / f"{i:03d}_mask.png", compress_level=1)
                Image.fromarray((np.clip(texture, 0, 1) * 255).astype(np.uint8)).save(target, compress_level=1)
    marker.write_text("ok\n")
    return root


def _link(path: Path, target: Path) -> None:
    if not path.exists():
        path.symlink_to(target.name if target.parent == path.parent else os.path.relpath(target, path.parent))


def settings(args) -> tuple[APTConfig, float, int]:
    """(config, test-count scale, image px) of the chosen mode."""
    if args.count_only:
        config = APTConfig.preset("paper", backbone__name="apt-tiny", backbone__image_size=32, backbone__layers=None,
                                  train__steps=1)
        return config, 1.0, 32
    if args.small:
        config = APTConfig.preset("quick", train__steps=20, train__pool_size=16, train__batch_size=8)
        return config, 0.1, 64
    return APTConfig.preset("paper"), 1.0, args.image_px


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--small", action="store_true", help="apt-tiny at 224 px, test counts / 10 (CPU, minutes)")
    mode.add_argument("--count-only", action="store_true", help="full structure on apt-tiny at 32 px, 1 step")
    parser.add_argument("--no-reuse", action="store_true", help="a store per run: the pre-issue-9 behaviour")
    parser.add_argument("--categories", nargs="+", default=list(MVTEC_TEST))
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image-px", type=int, default=700, help="test image size on disk (MVTec: 700–1024)")
    parser.add_argument("--precision", default=None, help="backbone precision (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--data", default=None, help="folder for the synthetic dataset (default under /tmp)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    config, scale, px = settings(args)
    config = config.replace(backbone__pretrained=None, backbone__precision=args.precision)
    device = pick_device(args.device)
    if not (args.small or args.count_only) and device.type != "cuda":
        parser.error("the full sweep needs a GPU; use --small or --count-only on a CPU")
    root = Path(args.data or f"/tmp/apt_lab_bench_sweep_{px}px_{scale}")
    t0 = time.perf_counter()
    write_dataset(root, px, scale)
    data_s = time.perf_counter() - t0
    backbone = load_backbone_from_config(config, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print(f"{backbone}\ntorch {torch.__version__}, {torch.get_num_threads()} CPU threads; config: steps "
          f"{config.train.steps}, pool {config.train.pool_size}, batch {config.train.batch_size}; data {root} "
          f"(written in {data_s:.1f} s); {'a store per run (no reuse)' if args.no_reuse else 'one store per category'}",
          flush=True)

    start = time.perf_counter()
    if args.no_reuse:
        rows = []
        for category in args.categories:
            dataset = apt_lab.data.load_dataset("mvtec", root=str(root), category=category)
            for k in args.shots:
                for seed in args.seeds:
                    result = run_category(backbone, dataset, config, k=k, seed=seed,
                                          store=FeatureStore(backbone, config.score.batch_size))
                    rows.append({"category": category, **result.timings})
    else:  # the sweep itself, into a fresh run folder: what `apt-lab sweep` does
        plan = Plan("mvtec", config, root=str(root), categories=tuple(args.categories), shots=tuple(args.shots),
                    seeds=tuple(args.seeds), methods=("apt",))
        folder = run_sweep(plan, out=Path(root) / "runs", name=f"bench-{os.getpid()}", backbone=backbone,
                           progress=args.small)
        with Folder(folder) as opened:
            rows = [{"category": c["category"], **c["timings"]} for c in read_run(opened)[2].values()]
    total = time.perf_counter() - start

    def summed(key: str) -> float:
        return sum(row.get(key, 0.0) for row in rows)

    encode = summed("encode_s") if args.no_reuse else total - summed("cell_s")  # a sweep encodes before its cells
    seconds = {"encode": encode, "pool": summed("pool_s"), "tuning": summed("tune_s") - summed("pool_s"),
               "scoring": summed("score_s"), "metrics": summed("evaluate_s")}
    n_test = sum(len(apt_lab.data.load_dataset("mvtec", root=str(root), category=c).test) for c in args.categories)
    summary = {"mode": "count-only" if args.count_only else "small" if args.small else "full",
               "reuse": not args.no_reuse, "backbone": backbone.name, "image_size": backbone.image_size,
               "precision": backbone.precision, "device": str(device), "categories": len(args.categories),
               "test_images": n_test, "shots": args.shots, "seeds": args.seeds, "runs": len(rows),
               "steps": config.train.steps, "pool_size": config.train.pool_size,
               "encoder_passes": backbone.images_encoded, "seconds": {k: round(v, 2) for k, v in seconds.items()},
               "total_s": round(total, 2)}
    if device.type == "cuda":
        summary["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"\n{summary['mode']} sweep: {len(args.categories)} categories, {n_test} test images, k={args.shots}, "
          f"seeds={args.seeds}, {len(rows)} runs, {backbone.name} at {backbone.image_size} px ({backbone.precision}) "
          f"on {device}")
    print(f"encoder passes (counted): {backbone.images_encoded:,}")
    print("  ".join(f"{stage} {seconds[stage]:.1f} s" for stage in STAGES) + f"  | total {total:.1f} s"
          + (f"  | peak GPU memory {summary['peak_gpu_gib']} GiB" if "peak_gpu_gib" in summary else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
