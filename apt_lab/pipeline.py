"""The four verbs chained on one dataset category: shots → tune (or human prompts) → score → metrics.

This is what ``apt-lab demo``, ``apt-lab run`` and the benchmark notebook call. It never shows test images
or labels to the tuning step: shots come from the training split only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import metrics as metrics_lib
from .backbone import Backbone
from .config import APTConfig
from .data import Dataset, few_shot, load_dataset
from .scoring import build_memory, human_prompt_features, score
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


def run_category(backbone: Backbone, dataset: Dataset, config: APTConfig, k: int | None = None, seed: int = 0,
                 method: str = "apt", shot_seed: int | None = None, callbacks: Sequence[Callable] = (),
                 progress: bool = False) -> CategoryResult:
    """Tune on k normal shots of ``dataset.train`` (or use human prompts) and evaluate on ``dataset.test``.

    Args:
        k: normal shots; None = ``config.train.k_shot``.
        seed: training seed (perturbations, prompt init, batch order); overrides ``config.train.seed``.
        method: "apt" (learned prompts, SMGS per ``config.smgs``) or "human" (WinCLIP ensemble, no tuning).
        shot_seed: None = the fixed shot lists shipped with apt_lab; an int = a seeded random draw.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    k = config.train.k_shot if k is None else k
    config = config.replace(train__seed=seed, train__k_shot=k)
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
        prompts = human_prompt_features(backbone, category="object")  # (2, D)
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
            variants: dict[str, tuple[str, APTConfig]], seeds: Sequence[int] = (0,), k: int = 4,
            root: str | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every variant on every category and seed with the same shots; one row of metrics per run.

    Example:
        >>> variants = {"human": ("human", cfg), "APT λ=0": ("apt", cfg.replace(smgs__lam=0.0)),
        ...             "APT": ("apt", cfg)}                                    # doctest: +SKIP
        >>> rows = compare(backbone, "demo", ["brick"], variants, seeds=(0, 1))  # doctest: +SKIP
    """
    rows = []
    for category in categories:
        dataset = load_dataset(dataset_name, root=root, category=category)
        for seed in seeds:
            for variant, (method, config) in variants.items():
                result = run_category(backbone, dataset, config, k=k, seed=seed, method=method)
                row = {"variant": variant, "category": category, "seed": seed, **result.metrics,
                       **{k_: round(v, 3) for k_, v in result.timings.items()}}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def mean_metrics(per_category: dict[str, dict]) -> dict:
    """Macro mean over categories of every metric present in all of them.

    Example:
        >>> mean_metrics({"a": {"image_auroc": 0.5}, "b": {"image_auroc": 1.0}})
        {'image_auroc': 0.75}
    """
    if not per_category:
        return {}
    names = set.intersection(*(set(k for k, v in m.items() if isinstance(v, (int, float)))
                               for m in per_category.values()))
    return {name: sum(m[name] for m in per_category.values()) / len(per_category) for name in sorted(names)}
