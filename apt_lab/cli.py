"""``apt-lab``: the command line — a parser and a dispatch table; the work is in :mod:`apt_lab.sweep`.

    apt-lab demo [--preset quick] [--k 4] [--seed 0]        APT on every category of the bundled demo photos
    apt-lab run --dataset mvtec --root DATA [--preset paper] the same on a benchmark or your own folder
    apt-lab download mvtec DATA [--url FILE] [--sha256 HEX]  fetch a benchmark (or say what to do by hand)
    apt-lab report runs/NAME                                 redraw a run folder's report.html
    apt-lab sweep --dataset mvtec --root DATA [--shots 1 2 4] [--seeds 0 1 2] [--methods apt no-smgs human]
                  [--vary smgs.lam=0,1] [--ablation paper]   every (category, shots, seed, variant) cell, resumable
    apt-lab table runs/NAME [--repair]                       the paper table of a run (markdown, CSV, HTML)
    apt-lab severity --dataset mvtec --root DATA --strengths 0.1 0.5 1.0   detection against anomaly strength
    apt-lab presets                                          list presets and their backbones

A run folder keeps every finished cell at once (the same command again resumes where it stopped; other settings
are refused: ``--overwrite`` or a new ``--name``), plus the table, ``report.html`` and the learned prompts. One
process at a time per run folder. Everything that needs no model — arguments, config, names, the dataset's files,
shots against the data, plugins — is checked before the backbone loads or a file is written.

Exit status: 0 done; 1 an error (one line, the message; ``--debug`` shows the traceback); 2 bad arguments (found
before torch is imported); 130 Ctrl-C (every finished cell is saved; run the same command again to resume).

A subcommand is two functions — its arguments and its work — and one line in :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import APTConfig, list_presets

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


# ------------------------------------------------------------------------------- argument types (errors exit 2)
def at_least(low: int):
    """An argparse ``type``: a whole number ≥ ``low``.

    Example:
        >>> at_least(1)("3")
        3
        >>> at_least(1)("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a whole number ≥ 1, got '0'
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number ≥ {low}, got {text!r}")
        return value

    return parse


def existing_file(text: str) -> str:
    """An argparse ``type``: the path of a file that exists."""
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


POSITIVE, NATURAL = at_least(1), at_least(0)


# ------------------------------------------------------------------------------------- argument groups
def _config_arguments(p: argparse.ArgumentParser, preset: str | None) -> None:
    default = f"default {preset}" if preset else "default: fast with a CUDA GPU, else cpu"
    either = p.add_mutually_exclusive_group()
    either.add_argument("--preset", choices=list_presets(), default=preset, help=f"a preset ({default})")
    either.add_argument("--config", type=existing_file, help="a JSON config file (instead of a preset)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--steps", type=NATURAL, help="override train.steps (0 = score the initial prompts, no tuning)")


def dataset_name(text: str) -> str:
    from .data.readers import DATASET_NAMES  # imported when the argument is given: a demo's parse stays light

    if text not in DATASET_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; choose from {', '.join(DATASET_NAMES)}")
    return text


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, type=dataset_name,
                   help="a benchmark (mvtec, visa, ...) or folder (your own good/ and bad/ images)")
    p.add_argument("--root", help="dataset root folder (default: $APT_LAB_DATA/<dataset>)")


def _folder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--categories", nargs="+", help="default: every category")
    p.add_argument("--out", default="runs", help="parent folder of the run folder (default runs/)")
    p.add_argument("--name", help="run folder name (default from the dataset, preset, method, shots and seed)")
    p.add_argument("--overwrite", action="store_true", help="delete the run folder's outputs and start afresh")
    p.add_argument("--repair", action="store_true", help="move bad lines of cells.jsonl aside instead of stopping")
    p.add_argument("--no-progress", action="store_true")


def _demo_arguments(p: argparse.ArgumentParser, preset: str | None = None) -> None:
    _config_arguments(p, preset)
    _folder_arguments(p)
    p.add_argument("--k", type=POSITIVE, help="normal shots per category (default: the config's train.k_shot)")
    p.add_argument("--seed", type=NATURAL, help="training seed (default: the config's train.seed)")
    p.add_argument("--method", default="apt", help="apt, no-smgs, human or a registered perturbation (default apt)")
    p.add_argument("--max-image-pixels", type=POSITIVE,
                   help="decoding limit per image, width x height (default apt_lab.data.images.MAX_IMAGE_PIXELS)")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p)
    _demo_arguments(p, "fast")


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p)
    _config_arguments(p, "fast")
    _folder_arguments(p)
    p.add_argument("--shots", nargs="+", type=POSITIVE, default=[1, 2, 4], help="shot counts (default 1 2 4)")
    p.add_argument("--seeds", nargs="+", type=NATURAL, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--methods", nargs="+", default=["apt", "no-smgs", "human"],
                   help="apt, no-smgs, human, or a registered perturbation (default apt no-smgs human)")
    p.add_argument("--vary", action="append", type=vary_setting, default=[], metavar="KEY=V1,V2",
                   help="sweep a config field by its dotted name, e.g. smgs.lam=0,0.5,1 (repeatable: the product)")
    p.add_argument("--ablation", type=ablation_name, help="named variants instead of --methods: paper, perturbations")
    p.add_argument("--plugin", action="append", default=[], help="a .py file or module registering perturbations")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--workers", type=POSITIVE, help="local Ray instance: number of CPUs/workers")


def vary_setting(text: str) -> str:
    """``--vary KEY=V1,V2``: the shape is checked here; the values by the config's rules before anything runs."""
    key, sep, values = text.partition("=")
    if not sep or not values or "." not in key:
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=V1,V2,... with a dotted config name, e.g. "
                                         "smgs.lam=0,1")
    return text


def ablation_name(text: str) -> str:
    from .sweep import ABLATIONS  # imported only when the argument is given

    if text not in ABLATIONS:
        raise argparse.ArgumentTypeError(f"unknown ablation {text!r}; choose from {', '.join(ABLATIONS)}")
    return text


def _folder_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a run folder, e.g. runs/NAME")
    p.add_argument("--repair", action="store_true", help="move bad lines of cells.jsonl aside instead of stopping")


def _severity_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p)
    _config_arguments(p, "fast")
    p.add_argument("--strengths", nargs="+", type=float, required=True, help="anomaly strengths, e.g. 0 0.1 0.5 1")
    p.add_argument("--kinds", nargs="+", help="perturbations (default: every registered pixel perturbation)")
    p.add_argument("--categories", nargs="+", help="default: every category")
    p.add_argument("--k", type=POSITIVE, help="normal shots per category (default: the config's train.k_shot)")
    p.add_argument("--seed", type=NATURAL, help="training seed (default: the config's train.seed)")
    p.add_argument("--held-out", type=POSITIVE, help="at most this many held-out normal train images")
    p.add_argument("--threshold", choices=("quantile", "f1"), default="quantile",
                   help="quantile: 1 − target FPR of held-out normal scores; f1: best F1 against their CFG copies")
    p.add_argument("--target-fpr", type=float, default=0.05, help="for --threshold quantile (default 0.05)")
    p.add_argument("--plugin", action="append", default=[], help="a .py file or module registering perturbations")
    p.add_argument("--out", default="runs", help="parent folder of the result folder (default runs/)")
    p.add_argument("--name", help="result folder name (default <dataset>-<preset>-severity-k<k>-s<seed>)")


def _download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset")
    p.add_argument("root")
    p.add_argument("--url", help="a mirror URL or local archive path")
    p.add_argument("--sha256", help="expected SHA-256 of the archive (checked before extracting)")


# ------------------------------------------------------------------------------------------ shared steps
def build_config(args: argparse.Namespace) -> APTConfig:
    """The one place a command's config is made: ``--config`` or ``--preset``, then ``--device``, ``--steps``,
    ``--k`` and ``--seed`` on top; every value is checked here (ConfigError), before anything is loaded."""
    config = APTConfig.from_json(args.config) if args.config else APTConfig.preset(_preset(args.preset))
    changes = {"backbone__device": args.device, "train__steps": args.steps,
               "train__k_shot": getattr(args, "k", None), "train__seed": getattr(args, "seed", None)}
    changes = {key: value for key, value in changes.items() if value is not None}
    return config.replace(**changes) if changes else config


def _preset(name: str | None) -> str:
    """``name``, or for ``apt-lab demo`` without --preset: "fast" on a CUDA GPU, else the "cpu" preset; says why."""
    if name is not None:
        return name
    import torch

    gpu = torch.cuda.is_available()
    name = "fast" if gpu or "cpu" not in list_presets() else "cpu"
    print(f"preset {name!r}: {'a CUDA GPU is available' if gpu else 'no CUDA GPU found'} (choose with --preset)",
          flush=True)
    return name


def _check_root(dataset: str, root: str | None) -> None:
    """A missing dataset folder, said with the command that fetches it."""
    from .data import dataset_root

    folder = dataset_root(dataset, root)
    if folder.is_dir():
        return
    fix = ("put your normal images in <root>/good/ and the anomalous ones in <root>/bad/ (masks in <root>/masks/)"
           if dataset == "folder" else f"fetch it with `apt-lab download {dataset} {folder}`")
    raise FileNotFoundError(f"dataset folder {folder} does not exist: pass --root with the folder holding the data, "
                            f"or {fix}.")


def _load_backbone(config: APTConfig):
    """The config's backbone, with the loud notice when it fell back to random weights."""
    from .backbone import load_backbone_from_config
    from .report import random_weights_banner

    backbone = load_backbone_from_config(config, fallback_to_random=True)
    banner = random_weights_banner(backbone)
    if banner:
        print(banner, file=sys.stderr, flush=True)
    return backbone


def _finish(folder: Path, repair: bool = False) -> None:
    """Tables and report of a run folder, the markdown table printed."""
    from .report import write_report
    from .store import write_tables

    md_path, csv_path, markdown = write_tables(folder, repair=repair)
    print(markdown)
    print(f"\nwrote {md_path}, {csv_path}, {write_report(folder)}")


def _run_folder(text: str) -> Path:
    folder = Path(text)
    if not folder.is_dir():
        raise FileNotFoundError(f"{text} is not a folder; pass a run folder such as runs/<name> (`ls runs`).")
    return folder


# ------------------------------------------------------------------------------------------- subcommands
def demo(args: argparse.Namespace) -> int:
    """``apt-lab demo`` and ``apt-lab run``: one method, k shots, one seed, every category. The checks that
    ``run_experiment`` makes before it writes run here before the backbone loads (to announce random weights)."""
    from .data import images
    from .data.files import check_name
    from .pipeline import check_datasets
    from .sweep import resolve_variants, run_experiment, run_name

    config = build_config(args)
    dataset, root = (args.dataset, args.root) if args.command == "run" else ("demo", None)
    images.MAX_IMAGE_PIXELS = args.max_image_pixels or images.MAX_IMAGE_PIXELS
    _check_root(dataset, root)
    resolve_variants([args.method], config)
    check_datasets(dataset, args.categories, root, config.train.k_shot)
    name = check_name(args.name or run_name(dataset, config, args.method), "run name")
    folder = run_experiment(dataset, config, categories=args.categories, root=root, method=args.method, out=args.out,
                            name=name, overwrite=args.overwrite, repair=args.repair, progress=not args.no_progress,
                            backbone=_load_backbone(config))
    _finish(folder)
    return 0


def sweep(args: argparse.Namespace) -> int:
    """``apt-lab sweep``: every (category, shots, seed, method) cell; run_sweep checks everything before it loads."""
    from .sweep import parse_vary, run_sweep

    config = build_config(args)
    _check_root(args.dataset, args.root)
    categories = None if args.categories in (None, ["all"]) else args.categories
    folder = run_sweep(args.dataset, config, root=args.root, categories=categories, shots=args.shots,
                       seeds=args.seeds, methods=args.methods, vary=parse_vary(args.vary) if args.vary else None,
                       ablation=args.ablation, out=args.out, name=args.name, executor=args.executor,
                       address=args.address, workers=args.workers, plugins=args.plugin, overwrite=args.overwrite,
                       repair=args.repair, progress=not args.no_progress)
    _finish(folder)
    return 0


def severity(args: argparse.Namespace) -> int:
    """``apt-lab severity``: detection against anomaly strength; severity.csv and severity.html."""
    from .severity import check_request, run_severity
    from .sweep import load_plugins

    config = build_config(args)
    _check_root(args.dataset, args.root)
    load_plugins(args.plugin)
    check_request(args.strengths, args.kinds, args.threshold, args.target_fpr, args.held_out)
    folder = run_severity(args.dataset, config, args.strengths, kinds=args.kinds, categories=args.categories,
                          root=args.root, out=args.out, name=args.name, held_out=args.held_out,
                          threshold=args.threshold, target_fpr=args.target_fpr, backbone=_load_backbone(config),
                          progress=not getattr(args, "no_progress", False))
    print((folder / "severity.csv").read_text())
    print(f"wrote {folder / 'severity.csv'}, {folder / 'severity.html'}")
    return 0


def table(args: argparse.Namespace) -> int:
    """``apt-lab table``: the paper table (markdown printed; table.md, table.csv and report.html written)."""
    _finish(_run_folder(args.folder), repair=args.repair)
    return 0


def report(args: argparse.Namespace) -> int:
    """``apt-lab report``: redraw report.html, not while a run is writing into the folder."""
    from .data.files import folder_lock
    from .report import write_report

    folder = _run_folder(args.folder)
    with folder_lock(folder):
        print(f"wrote {write_report(folder, repair=args.repair)}")
    return 0


def download(args: argparse.Namespace) -> int:
    from .data import download as fetch

    fetch(args.dataset, args.root, url=args.url, sha256=args.sha256)
    return 0


def presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        b = APTConfig.preset(name).backbone
        print(f"{name:<10} {b.name} / {b.pretrained or 'random weights'} / image_size={b.image_size or 'native'}")
    return 0


COMMANDS = {  # name → (help, its arguments, its work)
    "demo": ("APT on the bundled demo photos (the main job)", _demo_arguments, demo),
    "run": ("APT on a benchmark dataset or your own folder", _run_arguments, demo),
    "download": ("download and extract a benchmark dataset", _download_arguments, download),
    "report": ("redraw report.html of a run folder", _folder_argument, report),
    "sweep": ("every (category, shots, seed, method) cell of a benchmark, resumable", _sweep_arguments, sweep),
    "table": ("print and write the paper table of a run folder", _folder_argument, table),
    "severity": ("detection against anomaly strength: severity.csv and a plot", _severity_arguments, severity),
    "presets": ("list presets and their backbones", lambda p: None, presets),
}


# ------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="apt-lab", description="APT anomaly detection with learned prompts")
    top.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = top.add_subparsers(dest="command", required=True)
    for name, (text, arguments, work) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
        p.set_defaults(work=work)
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # argparse printed the problem: bad arguments are exit 2 (--help is 0)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return args.work(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        kept = "every finished cell is saved; run the same command again to resume" if args.work in (demo, sweep) \
            else "nothing half-done was kept"
        print(f"\napt-lab: interrupted — {kept}.", file=sys.stderr, flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
