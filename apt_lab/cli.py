"""``apt-lab``: the command line — argument parsing only; the work is in :mod:`apt_lab.pipeline`.

    apt-lab demo [--preset fast] [--k 4] [--seed 0]        APT on every category of the bundled demo photos
    apt-lab run --dataset mvtec --root DATA [--preset paper] the same on a benchmark or your own folder
    apt-lab download mvtec DATA                              fetch a benchmark (or say what to do by hand)
    apt-lab presets                                          list presets and their backbones

A run writes ``runs/<name>/results.json`` after every category (an interrupted run resumes where it
stopped), plus ``results.csv``, ``report.html`` and the learned prompts per category.
"""
from __future__ import annotations

import argparse
import sys

from .config import APTConfig, list_presets


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apt-lab", description="APT anomaly detection with learned prompts")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, preset):
        p.add_argument("--preset", default=preset, help=f"one of {list_presets()} (default {preset})")
        p.add_argument("--config", help="a JSON config file (overrides --preset)")
        p.add_argument("--categories", nargs="+", help="default: every category")
        p.add_argument("--k", type=int, help="normal shots per category (default: the config's train.k_shot)")
        p.add_argument("--seed", type=int, help="training seed (default: the config's train.seed)")
        p.add_argument("--method", choices=("apt", "human"), default="apt")
        p.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
        p.add_argument("--steps", type=int, help="override train.steps")
        p.add_argument("--out", default="runs", help="parent folder of the run folder (default runs/)")
        p.add_argument("--name", help="run folder name (default <dataset>-<preset>-<method>-k<k>-s<seed>)")
        p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
        p.add_argument("--no-progress", action="store_true")

    common(sub.add_parser("demo", help="APT on the bundled demo photos (the main job)"), "fast")
    run = sub.add_parser("run", help="APT on a benchmark dataset or your own folder")
    common(run, "fast")
    run.add_argument("--dataset", required=True, help="mvtec, visa, btad, mpdd, folder or demo")
    run.add_argument("--root", help="dataset root folder")
    download = sub.add_parser("download", help="download and extract a benchmark dataset")
    download.add_argument("dataset")
    download.add_argument("root")
    download.add_argument("--url", help="a mirror URL or local archive path")
    sub.add_parser("presets", help="list presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "presets":
        for name in list_presets():
            b = APTConfig.preset(name).backbone
            print(f"{name:<10} {b.name} / {b.pretrained} / image_size={b.image_size or 'native'}")
        return 0
    if args.command == "download":
        from .data import download

        download(args.dataset, args.root, url=args.url)
        return 0

    from .backbone import load_backbone_from_config
    from .pipeline import run_experiment
    from .report import random_weights_banner, write_report

    config = APTConfig.from_json(args.config) if args.config else APTConfig.preset(args.preset)
    if args.device:
        config = config.replace(backbone__device=args.device)
    if args.steps is not None:
        config = config.replace(train__steps=args.steps)
    backbone = load_backbone_from_config(config, fallback_to_random=True)
    banner = random_weights_banner(backbone)
    if banner:
        print(banner, file=sys.stderr, flush=True)
    dataset, root = ("demo", None) if args.command == "demo" else (args.dataset, args.root)
    folder = run_experiment(dataset, config, args.categories, root, args.k, args.seed, args.out, args.name,
                            args.method, args.overwrite, progress=not args.no_progress, backbone=backbone)
    report = write_report(folder)
    print(f"\nwrote {folder / 'results.json'}, {folder / 'results.csv'}, {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
