"""``apt-lab``: the command line — a parser, three shared argument groups and a dispatch table; the work is in
:mod:`apt_lab.sweep`.

    apt-lab demo [--preset quick] [--k 4] [--seed 0]        APT on every category of the bundled demo photos
    apt-lab run --dataset mvtec --root DATA [--preset paper] the same on a benchmark or your own folder
    apt-lab sweep --dataset mvtec --root DATA [--shots 1 2 4] [--seeds 0 1 2] [--methods apt no-smgs human]
                  [--vary smgs.lam=0,1] [--ablation paper]   every (category, shots, seed, variant) cell, resumable
    apt-lab severity --dataset mvtec --root DATA --strengths 0.1 0.5 1.0   detection against anomaly strength
    apt-lab table runs/NAME [--repair]                       the paper table of a run (markdown, CSV, HTML)
    apt-lab report runs/NAME                                 redraw a run folder's report.html
    apt-lab download mvtec DATA [--url FILE] [--sha256 HEX]  fetch a benchmark (or say what to do by hand)
    apt-lab presets                                          list presets and their backbones

demo, run, sweep and severity share three argument groups — data (``--dataset --root --categories``), method
(``--preset --config --steps --device --plugin --max-image-pixels``) and output (``--out --name --overwrite --repair
--no-progress``) — and each builds a :class:`~apt_lab.sweep.Plan` that :func:`~apt_lab.sweep.run_sweep` runs into
one run folder. The folder keeps every finished cell at once: the same command again resumes where it stopped, more
shots, seeds or variants extend it, and a cell that other settings would compute differently is refused
(``--overwrite`` replaces it, or choose a new ``--name``); beside the cells, the table and ``report.html``. One
process at a time per run folder.

Exit status: 0 done; 1 an error (one line, the message; ``--debug`` shows the traceback); 2 bad arguments, printed
under the subcommand's usage: types and ranges, the ``--config`` file, ``--name``, ``--vary`` values (by the
config's own rules, their product capped), backbone names — all found before torch is imported; a CUDA or MPS
``backbone.device`` is checked with torch, still before any work; 130 Ctrl-C (every finished cell is saved; run the
same command again to resume).

A subcommand is its arguments, the plan it builds (if any) and its work: one line in :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

from .config import DRAWS, APTConfig, list_presets

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


# ------------------------------------------------------------------------------- argument types (errors exit 2)
def parsed(convert, check, allowed: str):
    """An argparse ``type``: ``convert(text)`` when ``check`` accepts it, else exit 2 saying what is ``allowed``.

    Example:
        >>> STRENGTH("0.5"), at_least(1)("3")
        (0.5, 3)
        >>> STRENGTH("nan")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a number from 0 to 10, got 'nan'
    """
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def at_least(low: int):
    """An argparse ``type``: a whole number ≥ ``low``."""
    return parsed(int, lambda value: value >= low, f"a whole number ≥ {low}")


POSITIVE, NATURAL = at_least(1), at_least(0)
STRENGTH = parsed(float, lambda value: math.isfinite(value) and 0 <= value <= 10, "a number from 0 to 10")
OPEN_FRACTION = parsed(float, lambda value: 0 < value < 1, "a number in (0, 1)")


def existing_file(text: str) -> str:
    """An argparse ``type``: the path of a file that exists."""
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def dataset_name(text: str) -> str:
    from .data.readers import DATASET_NAMES  # imported when the argument is given: a demo's parse stays light

    if text not in DATASET_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; choose from {', '.join(DATASET_NAMES)}")
    return text


def ablation_name(text: str) -> str:
    from .sweep import ABLATIONS  # imported only when the argument is given

    if text not in ABLATIONS:
        raise argparse.ArgumentTypeError(f"unknown ablation {text!r}; choose from {', '.join(ABLATIONS)}")
    return text


# ------------------------------------------------------------------------------------ shared argument groups
def _shared_arguments(p: argparse.ArgumentParser, dataset: bool = True, preset: str | None = "fast") -> None:
    """The data, method and output groups of demo (no --dataset, --root: the bundled photos), run, sweep, severity."""
    data = p.add_argument_group("data", "which images")
    if dataset:
        data.add_argument("--dataset", required=True, type=dataset_name,
                          help="a benchmark (mvtec, visa, ...) or folder (your own good/ and bad/ images)")
        data.add_argument("--root", help="dataset root folder (default: $APT_LAB_DATA/<dataset>)")
    data.add_argument("--categories", nargs="+", metavar="NAME", help="the categories to run (default: all)")
    method = p.add_argument_group("method", "the config (a preset or a file) and what changes it")
    either = method.add_mutually_exclusive_group()
    default = f"default {preset}" if preset else "default: fast with a CUDA GPU, else cpu"
    either.add_argument("--preset", choices=list_presets(), default=preset, help=f"a preset ({default})")
    either.add_argument("--config", dest="config_file", type=existing_file, metavar="FILE",
                        help="a JSON config file (instead of a preset)")
    method.add_argument("--steps", type=NATURAL, help="override train.steps (0 = score the initial prompts, no tuning)")
    method.add_argument("--device", help="override backbone.device: cpu, cuda, cuda:1, ... (default: CUDA when there)")
    method.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="a .py file or module registering perturbations (repeatable)")
    method.add_argument("--max-image-pixels", type=POSITIVE,
                        help="decoding limit per image, width x height (default apt_lab.data.images.MAX_IMAGE_PIXELS)")
    output = p.add_argument_group("output", "the run folder <out>/<name>/")
    output.add_argument("--out", default="runs", help="parent folder of the run folder (default runs/)")
    output.add_argument("--name", help="run folder name (default from the dataset, config, methods, shots and seeds)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace the folder's cells that this plan computes differently (else refused)")
    output.add_argument("--repair", action="store_true", help="move bad lines of cells.jsonl aside instead of stopping")
    output.add_argument("--no-progress", action="store_true", help="no progress bars (a line per cell instead)")


def _shot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=POSITIVE, help="normal shots per category (default: the config's train.k_shot)")
    p.add_argument("--seed", type=NATURAL, help="training seed (default: the config's train.seed)")


def _demo_arguments(p: argparse.ArgumentParser, dataset: bool = False) -> None:
    _shared_arguments(p, dataset, "fast" if dataset else None)
    _shot_arguments(p)
    p.add_argument("--method", default="apt", help="apt, no-smgs, human or a registered perturbation (default apt)")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    _demo_arguments(p, dataset=True)


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    _shared_arguments(p)
    p.add_argument("--shots", nargs="+", type=POSITIVE, default=[1, 2, 4], help="shot counts (default 1 2 4)")
    p.add_argument("--seeds", nargs="+", type=NATURAL, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--methods", nargs="+", default=["apt", "no-smgs", "human"],
                   help="apt, no-smgs, human, or a registered perturbation (default apt no-smgs human)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a config field by its dotted name, e.g. smgs.lam=0,0.5,1 (repeatable: the product)")
    p.add_argument("--ablation", type=ablation_name, help="named variants instead of --methods: paper, perturbations")
    p.add_argument("--reference", help="the variant every other is compared with, paired by category, shots and "
                   "seed (default apt, else the first tuned variant)")
    p.add_argument("--draw", choices=DRAWS, help="the k shots: fixed = the paper's nested lists (seeds "
                   "vary training only); seed = each seed draws its own shots (default: the config's train.draw)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process; ray: categories spread over a Ray cluster (default local)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--workers", type=POSITIVE, help="local Ray instance: number of CPUs/workers")


def _severity_arguments(p: argparse.ArgumentParser) -> None:
    _shared_arguments(p)
    _shot_arguments(p)
    p.add_argument("--strengths", nargs="+", type=STRENGTH, required=True, help="anomaly strengths, e.g. 0 0.1 0.5 1")
    p.add_argument("--kinds", nargs="+", help="perturbations (default: every registered pixel perturbation)")
    p.add_argument("--held-out", type=at_least(2), help="at most this many held-out normal train images (≥ 2)")
    p.add_argument("--threshold", choices=("quantile", "f1"), default="quantile",
                   help="quantile: 1 − target FPR of held-out normal scores; f1: best F1 against their CFG copies")
    p.add_argument("--target-fpr", type=OPEN_FRACTION, default=0.05, help="for --threshold quantile (default 0.05)")
    p.add_argument("--tune-on", choices=("mix", "kind"), default="mix",
                   help="mix: tune the prompts once, on the config's perturbation mix; kind: tune each "
                        "perturbation's rows on that kind alone, so --kinds stripes measures prompts trained on "
                        "stripes (test-defect rows keep the mix; default mix)")
    p.add_argument("--test-share", type=parsed(float, lambda value: 0 <= value < 1, "a number in [0, 1)"),
                   default=0.5, help="share of the test set's normal images (a seeded draw) added to the evaluation "
                                     "normals; the test-defect rows keep the rest (default 0.5; 0 = train only)")


def _folder_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a run folder, e.g. runs/NAME")
    p.add_argument("--repair", action="store_true", help="move bad lines of cells.jsonl aside instead of stopping")


def _download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="the benchmark: mvtec, visa, ...")
    p.add_argument("root", help="the folder to extract it into")
    p.add_argument("--url", help="a mirror URL or local archive path")
    p.add_argument("--sha256", help="expected SHA-256 of the archive (checked before extracting)")


# ---------------------------------------------------------------- checks after parsing (still exit 2, no work done)
def check_arguments(args: argparse.Namespace) -> None:
    """What the parser cannot check alone, in order of cost: ``--name``, the config (``--config`` or ``--preset``,
    then ``--device --steps --k --seed``), ``--vary`` by the config's own rules (:func:`~apt_lab.sweep.parse_vary`),
    backbone names, devices. Sets ``args.config`` (an APTConfig), ``args.vary`` (a dict) and ``args.categories``."""
    from .data.files import check_name
    from .sweep import load_plugins, parse_vary

    if args.name is not None:
        check_name(args.name, "run name")
    args.categories = None if args.categories in (None, ["all"]) else tuple(args.categories)
    args.config = build_config(args)
    texts = getattr(args, "vary", [])
    if args.plugin and any(text.startswith("perturb.generators") for text in texts):
        load_plugins(args.plugin)  # the perturbations a plugin registers are valid generator names
    args.vary = parse_vary(texts, args.config) if texts else {}
    for k in getattr(args, "shots", ()):  # sweep's shot counts and seeds, by the config's rules too
        args.config.replace(train__k_shot=k)
    for seed in getattr(args, "seeds", ()):
        args.config.replace(train__seed=seed)
    check_backbones(args.config, args.vary)


def build_config(args: argparse.Namespace) -> APTConfig:
    """The one place a command's config is made: ``--config`` or ``--preset``, then ``--device``, ``--steps``,
    ``--k`` and ``--seed`` on top; every value is checked here (ConfigError), before anything is loaded."""
    config = APTConfig.from_json(args.config_file) if args.config_file else APTConfig.preset(_preset(args.preset))
    changes = {"backbone__device": args.device, "train__steps": args.steps,
               "train__k_shot": getattr(args, "k", None), "train__seed": getattr(args, "seed", None),
               "train__draw": getattr(args, "draw", None)}
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


def known_backbones() -> set[str]:
    """Every architecture name ``load_backbone`` accepts — open_clip's model config files and apt_lab's own
    (``apt-tiny``) — read from the files, without importing open_clip or torch."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(place) / "model_configs" for place in (spec.submodule_search_locations or [])] if spec else []
    folders.append(Path(__file__).parent / "model_configs")  # apt-tiny
    return {path.stem for folder in folders for path in folder.glob("*.json")}


def check_backbones(config: APTConfig, vary: dict) -> None:
    """Every backbone name and device the cells will use, before any cell runs. Names need no torch; a device
    other than the CPU is checked with torch (``cuda:7`` on a machine with one GPU)."""
    names = {config.backbone.name, *vary.get("backbone.name", ())}
    known = known_backbones()
    for name in sorted(names - known):
        close = sorted(m for m in known if str(name).lower().split("-")[0] in m.lower())[:8]
        raise ValueError(f"unknown backbone {name!r}; try one of {close or ['ViT-B-16', 'ViT-L-14-336']}, "
                         "see open_clip.list_models() or `apt-lab presets`; 'apt-tiny' is the small CPU test model")
    devices = {config.backbone.device, *vary.get("backbone.device", ())} - {None, "cpu"}
    if devices:
        import torch  # whether a device exists needs torch: only when one other than the CPU is named

    for text in sorted(devices):
        try:
            device = torch.device(text)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device {text!r}: {error} (use cpu, cuda, cuda:1, ...)") from None
        count = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}.get(device.type)
        if count is not None and (device.index or 0) >= count:
            raise ValueError(f"device {text!r} does not exist: this machine has {count} {device.type} device(s); "
                             "use --device cpu or another one")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: any problem exits 2 with the subcommand's usage, before work starts."""
    args, unknown = parser().parse_known_args(argv)
    if unknown:  # argparse would print the top-level usage; this names the subcommand's
        args.usage_error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.plan_of is not None:
        try:
            check_arguments(args)
        except Exception as error:
            if args.debug:
                raise
            args.usage_error(_message(error))
    return args


# ------------------------------------------------------------------------------------------------- plans
def demo_plan(args: argparse.Namespace):
    """demo and run: one method, k shots, one seed, every category; prompts and example maps kept for the report."""
    from .sweep import Plan

    dataset, root = (args.dataset, args.root) if args.command == "run" else ("demo", None)
    return Plan(dataset, args.config, root, args.categories, shots=(args.config.train.k_shot,),
                seeds=(args.config.train.seed,), methods=(args.method,), plugins=tuple(args.plugin), artefacts=True)


def sweep_plan(args: argparse.Namespace):
    from .sweep import Plan

    return Plan(args.dataset, args.config, args.root, args.categories, shots=tuple(args.shots),
                seeds=tuple(args.seeds), methods=tuple(args.methods), vary=args.vary, ablation=args.ablation,
                plugins=tuple(args.plugin), reference=args.reference)


def severity_plan(args: argparse.Namespace):
    from .sweep import Plan, Severity

    severity = Severity(tuple(args.strengths), tuple(args.kinds) if args.kinds else None, args.threshold,
                        args.target_fpr, args.held_out, args.tune_on, args.test_share)
    return Plan(args.dataset, args.config, args.root, args.categories, shots=(args.config.train.k_shot,),
                seeds=(args.config.train.seed,), methods=("apt",), plugins=tuple(args.plugin), severity=severity)


# ------------------------------------------------------------------------------------------- subcommands
def run(args: argparse.Namespace) -> int:
    """demo, run, sweep and severity: the command's plan into its run folder, then the table and report."""
    from .data import images
    from .sweep import Ray, run_name, run_sweep

    images.MAX_IMAGE_PIXELS = args.max_image_pixels or images.MAX_IMAGE_PIXELS
    plan = args.plan_of(args)
    _check_root(plan.dataset, plan.root)
    executor = Ray(args.address, args.workers) if getattr(args, "executor", "local") == "ray" else None
    folder = run_sweep(plan, out=args.out, name=args.name or run_name(plan), overwrite=args.overwrite,
                       repair=args.repair, progress=not args.no_progress, executor=executor)
    _finish(folder)
    return 0


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


def _finish(folder: Path, repair: bool = False) -> None:
    """Tables and report of a run folder, the markdown table printed (only printed while a run holds the folder)."""
    from .report import write_report
    from .store import write_tables

    md_path, csv_path, markdown = write_tables(folder, repair=repair)
    print(markdown)
    if md_path is None:
        print(f"\n{folder} is in use by a running sweep: the table above is not written; run `apt-lab table` later")
    else:
        print(f"\nwrote {md_path}, {csv_path}, {write_report(folder, repair=repair)}")


def _run_folder(text: str) -> Path:
    folder = Path(text)
    if not folder.is_dir():
        raise FileNotFoundError(f"{text} is not a folder; pass a run folder such as runs/<name> (`ls runs`).")
    return folder


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


COMMANDS = {  # name → (help, its arguments, the Plan it builds or None, its work)
    "demo": ("APT on the bundled demo photos (the main job)", _demo_arguments, demo_plan, run),
    "run": ("APT on a benchmark dataset or your own folder", _run_arguments, demo_plan, run),
    "sweep": ("every (category, shots, seed, method) cell of a benchmark", _sweep_arguments, sweep_plan, run),
    "severity": ("detection against anomaly strength, per perturbation", _severity_arguments, severity_plan, run),
    "table": ("print and write the paper table of a run folder", _folder_argument, None, table),
    "report": ("redraw report.html of a run folder", _folder_argument, None, report),
    "download": ("download and extract a benchmark dataset", _download_arguments, None, download),
    "presets": ("list presets and their backbones", lambda p: None, None, presets),
}


# ------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="apt-lab", description="APT anomaly detection with learned prompts")
    top.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = top.add_subparsers(dest="command", required=True)
    for name, (text, arguments, plan_of, work) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
        p.set_defaults(work=work, plan_of=plan_of, usage_error=p.error)
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except SystemExit as stop:  # argparse printed the problem: bad arguments are exit 2 (--help is 0)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return args.work(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        kept = "every finished cell is saved; run the same command again to resume" if args.plan_of \
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
