"""``apt-lab``: the command line — argument parsing only; the work is in :mod:`apt_lab.pipeline`.

    apt-lab demo [--preset fast] [--k 4] [--seed 0]        APT on every category of the bundled demo photos
    apt-lab run --dataset mvtec --root DATA [--preset paper] the same on a benchmark or your own folder
    apt-lab download mvtec DATA [--url FILE] [--sha256 HEX]  fetch a benchmark (or say what to do by hand)
    apt-lab report runs/NAME                                 redraw a run folder's report.html
    apt-lab sweep --dataset mvtec --root DATA [--shots 1 2 4] [--seeds 0 1 2] [--methods apt no-smgs human]
                                                             every (category, shots, seed, method) cell, resumable
    apt-lab table runs/NAME                                  the paper table of a sweep (markdown, CSV, HTML)
    apt-lab presets                                          list presets and their backbones

A run writes ``runs/<name>/results.json`` after every category (the same command again resumes where it
stopped; other settings are refused: ``--overwrite`` or a new ``--name``), plus ``results.csv``, ``report.html``
and the learned prompts per category. One process at a time per run folder.

Exit status: 0 done; 1 an error (one line, the message; ``--debug`` shows the traceback); 2 bad arguments;
130 Ctrl-C (every finished category is saved; run the same command again to resume).
"""
from __future__ import annotations

import argparse
import sys

from .config import APTConfig, list_presets

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apt-lab", description="APT anomaly detection with learned prompts")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, preset):
        p.add_argument("--preset", default=preset, help=f"one of {list_presets()} (default {preset})")
        p.add_argument("--config", help="a JSON config file (overrides --preset)")
        p.add_argument("--categories", nargs="+", help="default: every category")
        p.add_argument("--k", type=int, help="normal shots per category (default: the config's train.k_shot)")
        p.add_argument("--seed", type=int, help="training seed (default: the config's train.seed)")
        p.add_argument("--method", choices=("apt", "human"), default="apt")
        p.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
        p.add_argument("--steps", type=int, help="override train.steps (0 = score the initial prompts, no tuning)")
        p.add_argument("--out", default="runs", help="parent folder of the run folder (default runs/)")
        p.add_argument("--name", help="run folder name (default <dataset>-<preset>-<method>-k<k>-s<seed>)")
        p.add_argument("--overwrite", action="store_true", help="delete the run folder's outputs and start afresh")
        p.add_argument("--max-image-pixels", type=int,
                       help="decoding limit per image, width x height (default apt_lab.data.images.MAX_IMAGE_PIXELS)")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")

    common(sub.add_parser("demo", help="APT on the bundled demo photos (the main job)"), "fast")
    run = sub.add_parser("run", help="APT on a benchmark dataset or your own folder")
    common(run, "fast")
    run.add_argument("--dataset", required=True, help="mvtec, visa, btad, mpdd, folder or demo")
    run.add_argument("--root", help="dataset root folder")
    download = sub.add_parser("download", help="download and extract a benchmark dataset")
    download.add_argument("dataset")
    download.add_argument("root")
    download.add_argument("--url", help="a mirror URL or local archive path")
    download.add_argument("--sha256", help="expected SHA-256 of the archive (checked before extracting)")
    download.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    report = sub.add_parser("report", help="redraw report.html of a run folder")
    report.add_argument("folder")
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    sweep = sub.add_parser("sweep", help="every (category, shots, seed, method) cell of a benchmark, resumable")
    sweep.add_argument("--dataset", required=True, help="mvtec, visa, btad, mpdd, folder or demo")
    sweep.add_argument("--root", help="dataset root folder")
    sweep.add_argument("--categories", nargs="+", help="default: every category ('all')")
    sweep.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4], help="shot counts (default 1 2 4)")
    sweep.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    sweep.add_argument("--methods", nargs="+", default=["apt", "no-smgs", "human"],
                       help="apt, no-smgs, human, or a registered perturbation (default apt no-smgs human)")
    sweep.add_argument("--preset", default="fast", help=f"one of {list_presets()} (default fast)")
    sweep.add_argument("--config", help="a JSON config file (overrides --preset)")
    sweep.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    sweep.add_argument("--steps", type=int, help="override train.steps")
    sweep.add_argument("--plugin", action="append", default=[], help="a .py file or module registering perturbations")
    sweep.add_argument("--out", default="runs", help="parent folder of the sweep folder (default runs/)")
    sweep.add_argument("--name", help="sweep folder name (default sweep-<dataset>-<preset>)")
    sweep.add_argument("--executor", choices=("local", "ray"), default="local")
    sweep.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    sweep.add_argument("--workers", type=int, help="local Ray instance: number of CPUs/workers")
    sweep.add_argument("--overwrite", action="store_true", help="delete the sweep's cells and start afresh")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    table = sub.add_parser("table", help="print and write the paper table of a sweep folder")
    table.add_argument("folder")
    table.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    sub.add_parser("presets", help="list presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        saved = ("every finished category is saved; run the same command again to resume"
                 if args.command in ("demo", "run") else "nothing half-done was kept")
        print(f"\napt-lab: interrupted — {saved}.", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line for the person at the terminal; --debug for the traceback
        if args.debug:
            raise
        print(f"apt-lab: error: {_message(error)}", file=sys.stderr, flush=True)
        return EXIT_ERROR


def _message(error: Exception) -> str:
    """The error's own message; its type too when that message cannot stand alone (KeyError('x') → "'x'")."""
    from . import errors

    text = str(error).strip() or type(error).__name__
    own = type(error).__module__ == errors.__name__ or type(error) in (ValueError, FileNotFoundError,
                                                                        FileExistsError, ConnectionError)
    return text if own else f"{type(error).__name__}: {text} (run with --debug for the traceback)"


def _command(args) -> int:
    if args.command == "presets":
        for name in list_presets():
            b = APTConfig.preset(name).backbone
            print(f"{name:<10} {b.name} / {b.pretrained} / image_size={b.image_size or 'native'}")
        return 0
    if args.command == "download":
        from .data import download

        download(args.dataset, args.root, url=args.url, sha256=args.sha256)
        return 0
    if args.command == "report":
        from pathlib import Path

        from .data.files import folder_lock
        from .report import write_report

        if not Path(args.folder).is_dir():
            raise FileNotFoundError(f"{args.folder} is not a folder; pass a run folder such as runs/<name>.")
        with folder_lock(args.folder):  # not while a run is writing into it
            print(f"wrote {write_report(args.folder)}")
        return 0

    if args.command == "sweep":
        from .sweep import run_sweep, write_tables

        config = APTConfig.from_json(args.config) if args.config else APTConfig.preset(args.preset)
        if args.device:
            config = config.replace(backbone__device=args.device)
        if args.steps is not None:
            config = config.replace(train__steps=args.steps)
        categories = None if args.categories in (None, ["all"]) else args.categories
        folder = run_sweep(args.dataset, config, args.root, categories, args.shots, args.seeds, args.methods,
                           args.out, args.name, args.executor, args.address, args.workers, args.plugin,
                           args.overwrite, progress=not args.no_progress)
        print(write_tables(folder)[2])
        return 0
    if args.command == "table":
        from .report import write_sweep_report
        from .sweep import write_tables

        md_path, csv_path, markdown = write_tables(args.folder)
        print(markdown)
        print(f"wrote {md_path}, {csv_path}, {write_sweep_report(args.folder)}")
        return 0

    from .backbone import load_backbone_from_config
    from .data import images
    from .pipeline import check_datasets, claim_folder, run_experiment, run_folder, with_shots
    from .report import random_weights_banner, write_report

    config = APTConfig.from_json(args.config) if args.config else APTConfig.preset(args.preset)
    if args.device:
        config = config.replace(backbone__device=args.device)
    if args.steps is not None:
        config = config.replace(train__steps=args.steps)
    if args.max_image_pixels is not None:
        images.MAX_IMAGE_PIXELS = args.max_image_pixels
    config = with_shots(config, args.k, args.seed)  # checks every value now, before anything is loaded
    dataset, root = ("demo", None) if args.command == "demo" else (args.dataset, args.root)
    folder = run_folder(dataset, config, args.method, args.out, args.name)
    check_datasets(dataset, args.categories, root, config.train.k_shot)  # bad data fails before anything is made
    with claim_folder(folder):  # a second process is refused here, before the backbone loads
        backbone = load_backbone_from_config(config, fallback_to_random=True)
        banner = random_weights_banner(backbone)
        if banner:
            print(banner, file=sys.stderr, flush=True)
        run_experiment(dataset, config, args.categories, root, out=args.out, name=folder.name, method=args.method,
                       overwrite=args.overwrite, progress=not args.no_progress, backbone=backbone)
        report = write_report(folder)
    print(f"\nwrote {folder / 'results.json'}, {folder / 'results.csv'}, {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
