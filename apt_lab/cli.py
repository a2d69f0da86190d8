"""``apt-lab``: the command line. ``apt-lab demo`` is the main job (what ``make demo`` runs).

    apt-lab demo [--preset fast] [--k 4] [--seed 0]        APT on every category of the bundled demo photos
    apt-lab run --dataset mvtec --root DATA [--preset paper] the same on a benchmark or your own folder
    apt-lab download mvtec DATA                              fetch a benchmark (or say what to do by hand)
    apt-lab presets                                          list presets and their backbones

A run writes ``runs/<name>/results.json`` after every category (an interrupted run resumes where it
stopped), plus ``results.csv``, ``report.html`` and the learned prompts per category.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .config import APTConfig, list_presets
from .metrics import METRIC_KEYS



def run_experiment(dataset_name: str, config: APTConfig, categories: list[str] | None = None, root: str | None = None,
                   k: int = 4, seed: int = 0, out: str | Path = "runs", name: str | None = None,
                   method: str = "apt", overwrite: bool = False, progress: bool = True) -> Path:
    """Run ``method`` on every category, saving results after each one; returns the run folder."""
    from .backbone import load_backbone_or_random
    from .checkpoint import save_prompts
    from .data import list_categories, load_dataset
    from .pipeline import mean_metrics, run_category
    from .report import select_examples, write_report

    categories = categories or list_categories(dataset_name, root)
    name = name or f"{dataset_name}-{config.name}-{method}-k{k}-s{seed}"
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    results_path = folder / "results.json"
    backbone = load_backbone_or_random(config)
    n_patches = backbone.grid[0] * backbone.grid[1]
    print(f"{backbone}\nfeatures per image: cls ({backbone.embed_dim},), patches ({len(backbone.layers)}, "
          f"{n_patches}, {backbone.embed_dim}) from blocks {list(backbone.layers)}", flush=True)
    results = {
        "name": name, "dataset": dataset_name, "method": method, "k": k, "seed": seed,
        "backbone": {"name": backbone.name, "tag": config.backbone.pretrained, "pretrained": backbone.pretrained_loaded,
                     "image_size": backbone.image_size, "layers": list(backbone.layers)},
        "pretrained": backbone.pretrained_loaded, "eval_resolution": backbone.image_size,
        "config": json.loads(config.to_json()), "categories": {},
        "environment": {"apt_lab": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "device": str(backbone.device), "threads": torch.get_num_threads()},
    }
    if results_path.is_file() and not overwrite:
        previous = json.loads(results_path.read_text())
        if previous.get("config") == results["config"] and previous.get("backbone") == results["backbone"]:
            results["categories"] = previous.get("categories", {})
            if results["categories"]:
                print(f"resuming {folder}: {sorted(results['categories'])} already done")
        else:
            print(f"{results_path} holds a run with another config/backbone; starting afresh (old file kept as "
                  f"results.previous.json)")
            results_path.replace(folder / "results.previous.json")

    category_results, test_images = {}, {}
    start = time.perf_counter()
    for category in categories:
        if category in results["categories"]:
            continue
        dataset = load_dataset(dataset_name, root=root, category=category)
        print(f"[{category}] {len(dataset.train)} train / {len(dataset.test)} test images, k={k}", flush=True)
        result = run_category(backbone, dataset, config, k=k, seed=seed, method=method, progress=progress)
        category_results[category] = result
        shown = select_examples(result.labels, result.image_scores)
        test_images[category] = (shown, dataset.test.images(backbone.image_size, indices=shown))
        results["categories"][category] = result.summary()
        if result.tuned is not None:
            save_prompts(result.tuned, folder / "prompts" / category, config=config, backbone=backbone)
        results["mean"] = mean_metrics({c: r["metrics"] for c, r in results["categories"].items()})
        _write_json_atomic(results_path, results)  # after every category: an interrupted run keeps its work
    results["timings"] = {"total_s": round(time.perf_counter() - start, 2)}
    _write_json_atomic(results_path, results)
    _write_csv(folder / "results.csv", results)
    write_report(folder / "report.html", results, category_results, test_images)
    print_summary(results)
    print(f"\nwrote {results_path}, {folder / 'results.csv'}, {folder / 'report.html'}")
    return folder


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


def _write_csv(path: Path, results: dict) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", *METRIC_KEYS, "tune_s", "score_s"])
        rows = list(results["categories"].items()) + [("mean", {"metrics": results.get("mean", {})})]
        for category, entry in rows:
            m, t = entry["metrics"], entry.get("timings", {})
            writer.writerow([category, *[_fmt(m.get(c)) for c in METRIC_KEYS], t.get("tune_s", ""),
                             t.get("score_s", "")])


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


def print_summary(results: dict) -> None:
    weights = "pretrained" if results["pretrained"] else "RANDOM WEIGHTS"
    print(f"\n{results['name']}: {results['backbone']['name']} ({weights}), k={results['k']}, "
          f"evaluated at {results['eval_resolution']} px")
    header = f"{'category':<12}" + "".join(f"{c:>12}" for c in METRIC_KEYS)
    print(header)
    print("-" * len(header))
    rows = list(results["categories"].items()) + [("mean", {"metrics": results.get("mean", {})})]
    for category, entry in rows:
        print(f"{category:<12}" + "".join(f"{_fmt(entry['metrics'].get(c)) or '-':>12}" for c in METRIC_KEYS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apt-lab", description="APT anomaly detection with learned prompts")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, preset):
        p.add_argument("--preset", default=preset, help=f"one of {list_presets()} (default {preset})")
        p.add_argument("--config", help="a JSON config file (overrides --preset)")
        p.add_argument("--categories", nargs="+", help="default: every category")
        p.add_argument("--k", type=int, default=4, help="normal shots per category (default 4)")
        p.add_argument("--seed", type=int, default=0)
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
    args = parser.parse_args(argv)

    if args.command == "presets":
        for name in list_presets():
            b = APTConfig.preset(name).backbone
            print(f"{name:<10} {b.name} / {b.pretrained} / image_size={b.image_size or 'native'}")
        return 0
    if args.command == "download":
        from .data import download as download_dataset

        download_dataset(args.dataset, args.root, url=args.url)
        return 0

    config = APTConfig.from_json(args.config) if args.config else APTConfig.preset(args.preset)
    if args.device:
        config = config.replace(backbone__device=args.device)
    if args.steps:
        config = config.replace(train__steps=args.steps)
    dataset, root = ("demo", None) if args.command == "demo" else (args.dataset, args.root)
    run_experiment(dataset, config, args.categories, root, args.k, args.seed, args.out, args.name, args.method,
                   args.overwrite, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
