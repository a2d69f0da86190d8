"""Running a method over a dataset: the four verbs chained per category, and a run folder that survives.

``run_category``: shots → tune (or human prompts) → score → metrics, for one category. ``run_experiment``: every
category of a dataset into ``runs/<name>/`` — ``results.json`` after every category (an interrupted run resumes),
``results.csv``, ``report.html`` and the learned prompts per category. ``apt-lab demo``/``run``, the notebooks
and the benchmark notebook all call these. Test images and labels never reach the tuning step: shots come from
the training split only.
"""
from __future__ import annotations

import csv
import io
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import metrics as metrics_lib
from ._version import __version__
from .backbone import Backbone, load_backbone_from_config
from .baselines import human_prompt_features
from .checkpoint import atomic_write, save_prompts
from .config import APTConfig
from .data import Dataset, few_shot, list_categories, load_dataset
from .metrics import METRIC_KEYS, format_metric, mean_metrics, metric_rows
from .scoring import build_memory, score
from .tuning import TuneResult, tune_prompts

METHODS = ("apt", "human")  # learned prompts, or WinCLIP's human-written compositional ensemble


@dataclass
class CategoryResult:
    """Everything one (category, method, seed) run produced; tensors on the CPU.

    Attributes:
        metrics: image/pixel AUROC, AP, F1-max and AUPRO (see ``apt_lab.metrics.evaluate``).
        image_scores: (T,) one score per test image; anomaly_maps: (T, S, S); labels: (T,);
            masks: (T, S, S), or None for a folder dataset without masks.
        shots: indices of the training images used as the k normal shots.
        timings: seconds spent tuning, scoring and evaluating.
    """

    category: str
    method: str
    metrics: dict
    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    defects: list[str]
    paths: list[str]
    shots: list[int]
    timings: dict = field(default_factory=dict)
    tuned: TuneResult | None = None

    def summary(self) -> dict:
        """A JSON-ready dict: metrics, shots, timings, test-set size (no tensors)."""
        return {"category": self.category, "method": self.method, "metrics": self.metrics, "shots": self.shots,
                "n_test": int(self.labels.numel()), "n_anomalous": int(self.labels.sum()),
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


def with_shots(config: APTConfig, k: int | None = None, seed: int | None = None) -> APTConfig:
    """``config`` with ``train.k_shot``/``train.seed`` overridden where given: the one place shots and seed change.

    Example:
        >>> cfg = with_shots(APTConfig.preset("quick"), k=4)
        >>> cfg.train.k_shot, cfg.train.seed
        (4, 0)
    """
    changes = {key: value for key, value in (("train__k_shot", k), ("train__seed", seed)) if value is not None}
    return config.replace(**changes) if changes else config


def run_category(backbone: Backbone, dataset: Dataset, config: APTConfig, k: int | None = None,
                 seed: int | None = None, method: str = "apt", shot_seed: int | None = None,
                 callbacks: Sequence[Callable] = (), progress: bool = False) -> CategoryResult:
    """Tune on k normal shots of ``dataset.train`` (or use human prompts) and evaluate on ``dataset.test``.

    Args:
        k: normal shots; None = ``config.train.k_shot``.
        seed: training seed (perturbations, prompt init, batch order); None = ``config.train.seed``.
        method: "apt" (learned prompts, SMGS per ``config.smgs``) or "human" (WinCLIP ensemble with the category
            name filled in, no tuning).
        shot_seed: None = the fixed shot lists shipped with apt_lab; an int = a seeded random draw.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    config = with_shots(config, k, seed)
    k = config.train.k_shot
    size = backbone.image_size
    timings: dict[str, float] = {}
    shots_idx = few_shot(dataset.train, k, seed=shot_seed)
    shots = dataset.train.images(size, indices=shots_idx).to(backbone.device)  # (k, 3, S, S)

    start = time.perf_counter()
    tuned = None
    if method == "apt":
        tuned = tune_prompts(backbone, shots, config, callbacks=callbacks, progress=progress)
        prompts = tuned.prompts
    else:
        prompts = human_prompt_features(backbone, category=dataset.category.replace("_", " "))  # (2, D)
    timings["tune_s"] = time.perf_counter() - start

    start = time.perf_counter()
    memory = build_memory(backbone, shots, config) if config.score.memory else None
    scores, maps = [], []
    test = dataset.test
    chunk = 64  # test images held in memory at once
    for begin in range(0, len(test), chunk):
        indices = list(range(begin, min(begin + chunk, len(test))))
        images = test.images(size, indices=indices)  # (b, 3, S, S)
        out = score(backbone, prompts, images, config, memory=memory)
        scores.append(out.image_scores)
        maps.append(out.anomaly_maps)
    timings["score_s"] = time.perf_counter() - start
    image_scores, anomaly_maps = torch.cat(scores), torch.cat(maps)  # (T,), (T, S, S)
    labels, masks = test.labels, test.masks(size)  # (T,), (T, S, S) nearest-neighbour; None without masks

    start = time.perf_counter()
    result_metrics = metrics_lib.evaluate(image_scores, anomaly_maps, labels, masks)
    timings["evaluate_s"] = time.perf_counter() - start
    return CategoryResult(dataset.category, method, result_metrics, image_scores, anomaly_maps, labels, masks,
                          list(test.defects), [str(p) for p in test.paths], list(shots_idx), timings, tuned)


def compare(backbone: Backbone, dataset_name: str, categories: Sequence[str],
            variants: dict[str, tuple[str, APTConfig]], seeds: Sequence[int] = (0,), k: int | None = None,
            root: str | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every variant on every category and seed with the same shots; one row of metrics per run.

    ``k`` None = each variant's ``config.train.k_shot``.

    Example:
        >>> import apt_lab
        >>> b, cfg = apt_lab.load_backbone("apt-tiny"), APTConfig.preset("quick", train__steps=2)
        >>> rows = compare(b, "demo", ["brick"], {"human": ("human", cfg), "APT": ("apt", cfg)})
        >>> [(r["variant"], r["category"], r["seed"]) for r in rows]
        [('human', 'brick', 0), ('APT', 'brick', 0)]
    """
    rows = []
    for category in categories:
        dataset = load_dataset(dataset_name, root=root, category=category)
        for seed in seeds:
            for variant, (method, config) in variants.items():
                result = run_category(backbone, dataset, config, k=k, seed=seed, method=method)
                row = {"variant": variant, "category": category, "seed": seed, **result.metrics,
                       **{name: round(seconds, 3) for name, seconds in result.timings.items()}}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


# ------------------------------------------------------------------------------------------------ run folders
def run_experiment(dataset_name: str, config: APTConfig, categories: list[str] | None = None,
                   root: str | None = None, k: int | None = None, seed: int | None = None,
                   out: str | Path = "runs", name: str | None = None, method: str = "apt", overwrite: bool = False,
                   progress: bool = True, backbone: Backbone | None = None) -> Path:
    """Run ``method`` on every category into ``<out>/<name>/``, saving results after each one; returns the folder.

    Args:
        k: overrides ``config.train.k_shot`` when given.
        seed: overrides ``config.train.seed`` when given.
        backbone: an already loaded backbone (the command line loads it first to announce random weights);
            None = ``load_backbone_from_config(config, fallback_to_random=True)``.
        overwrite: start afresh instead of resuming the categories already in ``results.json``.
    """
    config = with_shots(config, k, seed)
    k, seed = config.train.k_shot, config.train.seed
    categories = categories or list_categories(dataset_name, root)
    name = name or f"{dataset_name}-{config.name}-{method}-k{k}-s{seed}"
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    results_path = folder / "results.json"
    backbone = backbone or load_backbone_from_config(config, fallback_to_random=True)
    n_patches = backbone.grid[0] * backbone.grid[1]
    print(f"{backbone}\nfeatures per image: cls ({backbone.embed_dim},), patches ({len(backbone.layers)}, "
          f"{n_patches}, {backbone.embed_dim}) from blocks {list(backbone.layers)}", flush=True)
    results = _new_results(name, dataset_name, method, config, backbone)
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

    start = time.perf_counter()
    for category in categories:
        if category in results["categories"]:
            continue
        dataset = load_dataset(dataset_name, root=root, category=category)
        print(f"[{category}] {len(dataset.train)} train / {len(dataset.test)} test images, k={k}", flush=True)
        result = run_category(backbone, dataset, config, method=method, progress=progress)
        save_examples(folder / "examples" / category, result, dataset)
        results["categories"][category] = result.summary()
        if result.tuned is not None:
            save_prompts(result.tuned, folder / "prompts" / category, config=config, backbone=backbone)
        results["mean"] = mean_metrics({c: r["metrics"] for c, r in results["categories"].items()})
        write_json(results_path, results)  # after every category: an interrupted run keeps its work
    results["timings"] = {"total_s": round(time.perf_counter() - start, 2)}
    write_json(results_path, results)
    write_csv(folder / "results.csv", results)
    print(summary_table(results))
    return folder


def _new_results(name: str, dataset_name: str, method: str, config: APTConfig, backbone: Backbone) -> dict:
    """The results schema: what was run, on what, where; categories fill in as they finish."""
    return {
        "name": name, "dataset": dataset_name, "method": method, "k": config.train.k_shot, "seed": config.train.seed,
        "backbone": {"name": backbone.name, "tag": config.backbone.pretrained, "pretrained": backbone.pretrained_loaded,
                     "image_size": backbone.image_size, "layers": list(backbone.layers)},
        "pretrained": backbone.pretrained_loaded, "eval_resolution": backbone.image_size,
        "config": json.loads(config.to_json()), "categories": {},
        "environment": {"apt_lab": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "device": str(backbone.device), "threads": torch.get_num_threads()},
    }


def select_examples(labels: torch.Tensor, image_scores: torch.Tensor, per_kind: int = 4) -> list[int]:
    """Test images to keep for the report: the ``per_kind`` highest-scoring anomalous and normal images.

    Example:
        >>> select_examples(torch.tensor([0, 1, 0, 1]), torch.tensor([0.9, 0.2, 0.1, 0.8]), per_kind=1)
        [3, 0]
    """
    chosen = []
    for label in (1, 0):
        indices = torch.nonzero(labels == label).flatten()
        order = torch.argsort(image_scores[indices], descending=True)
        chosen += indices[order[:per_kind]].tolist()
    return chosen


def save_examples(path: Path, result: CategoryResult, dataset: Dataset) -> Path:
    """Keep what the report draws for a category on disk: a few test images with their maps, masks and scores,
    plus the colour range of the whole test set, in ``<path>.safetensors`` (no pickle). The report can then be
    redrawn at any time from the run folder alone."""
    from safetensors.torch import save_file

    shown = select_examples(result.labels, result.image_scores)
    size = result.anomaly_maps.shape[-1]
    images = dataset.test.images(size, indices=shown)  # (n, 3, S, S)
    tensors = {"indices": torch.tensor(shown, dtype=torch.long),
               "images": (images * 255).round().to(torch.uint8),  # (n, 3, S, S)
               "anomaly_maps": result.anomaly_maps[shown].float(),  # (n, S, S)
               "image_scores": result.image_scores[shown].float(),
               "colour_range": torch.stack([result.anomaly_maps.min(), result.anomaly_maps.max()]).float()}
    if result.masks is not None:
        tensors["masks"] = result.masks[shown].to(torch.uint8)
    metadata = {"defects": json.dumps([result.defects[i] for i in shown])}
    target = Path(path).with_suffix(".safetensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata))
    return target


def load_examples(path: Path) -> dict | None:
    """What :func:`save_examples` wrote (tensors + ``defects``), or None when the file is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    target = Path(path).with_suffix(".safetensors")
    if not target.is_file():
        return None
    try:
        with safe_open(str(target), framework="pt") as handle:
            out = {key: handle.get_tensor(key) for key in handle.keys()}
            out["defects"] = json.loads(handle.metadata()["defects"])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
    out["images"] = out["images"].float() / 255
    return out


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON, through a temporary file and an atomic rename."""
    text = json.dumps(data, indent=2, default=float)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def write_csv(path: Path, results: dict) -> None:
    """One row per category and the mean row: every metric, tuning and scoring seconds."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", *METRIC_KEYS, "tune_s", "score_s"])
    for category, metrics in metric_rows(results):
        timings = results["categories"].get(category, {}).get("timings", {})
        writer.writerow([category, *[format_metric(metrics.get(c)) for c in METRIC_KEYS],
                         timings.get("tune_s", ""), timings.get("score_s", "")])
    atomic_write(Path(path), lambda tmp: tmp.write_text(buffer.getvalue()))


def summary_table(results: dict) -> str:
    """The run's metrics as a fixed-width text table (what the command line prints)."""
    weights = "pretrained" if results["pretrained"] else "RANDOM WEIGHTS"
    header = f"{'category':<12}" + "".join(f"{c:>12}" for c in METRIC_KEYS)
    lines = [f"\n{results['name']}: {results['backbone']['name']} ({weights}), k={results['k']}, "
             f"evaluated at {results['eval_resolution']} px", header, "-" * len(header)]
    for category, metrics in metric_rows(results):
        lines.append(f"{category:<12}" + "".join(f"{format_metric(metrics.get(c)) or '-':>12}" for c in METRIC_KEYS))
    return "\n".join(lines)
