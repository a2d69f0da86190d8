"""One category, end to end: the four verbs chained — shots → tune (or human prompts) → score → metrics.

``run_category`` is what every run, sweep and notebook calls per cell; :mod:`apt_lab.sweep` runs cells into a run
folder (:mod:`apt_lab.store`) and ``save_cell_artefacts`` keeps a cell's prompts and example maps there. Test
images and labels never reach the tuning step: shots come from the training split only.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import metrics as metrics_lib
from .backbone import Backbone
from .baselines import human_prompt_features
from .checkpoint import prompt_bytes
from .config import APTConfig
from .data import Dataset, few_shot, list_categories, load_dataset
from .data.files import Folder, check_name
from .features import FeatureStore
from .scoring import build_memory, score
from .tuning import TuneResult, tune_prompts

METHODS = ("apt", "human")  # learned prompts, or WinCLIP's human-written compositional ensemble


@dataclass
class CategoryResult:
    """Everything one (category, method, seed) run produced; tensors on the CPU.

    Attributes:
        metrics: image/pixel AUROC, AP, F1-max and AUPRO (see ``apt_lab.metrics.evaluate``).
        image_scores: (T,) one score per test image; anomaly_maps: (T, S, S) float16; labels: (T,);
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
                 callbacks: Sequence[Callable] = (), progress: bool = False,
                 store: FeatureStore | None = None) -> CategoryResult:
    """Tune on k normal shots of ``dataset.train`` (or use human prompts) and evaluate on ``dataset.test``.

    Args:
        k: normal shots; None = ``config.train.k_shot`` (human prompts without ``score.memory`` use none).
        seed: training seed (perturbations, prompt init, batch order); None = ``config.train.seed``.
        method: "apt" (learned prompts, SMGS per ``config.smgs``) or "human" (WinCLIP ensemble with the category
            name filled in, no tuning).
        shot_seed: None = as ``config.train.draw`` says (the fixed shot lists shipped with apt_lab, or a draw seeded
            with ``seed``); an int = a draw seeded with it.
        store: where the test images' and shots' features come from; pass one store to every run of a category
            (shot counts, seeds, methods) and each image is encoded once. None = a store for this run only.

    Maps are kept at the evaluation resolution (the backbone's input size) in float16, and evaluated from there
    a few at a time (``apt_lab.metrics.evaluate``): a large test set never holds every map in float32.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    config = with_shots(config, k, seed)
    size, radius = backbone.image_size, config.score.locality_radius
    store = store or FeatureStore(backbone, config.score.batch_size)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    uses_shots = method == "apt" or config.score.memory  # human prompts alone are zero-shot: no shots at all
    shot_seed = config.train.seed if shot_seed is None and config.train.draw == "seed" else shot_seed
    shots_idx = few_shot(dataset.train, config.train.k_shot, seed=shot_seed) if uses_shots else []
    test_features = store.features(dataset.test, None, radius)  # (T images) encoded once per store
    timings["encode_s"] = time.perf_counter() - start  # 0 when the store already held them

    start = time.perf_counter()
    prompts, tuned, memory = prepare_prompts(backbone, dataset, config, method, shots_idx, store, callbacks, progress)
    timings["tune_s"] = time.perf_counter() - start
    if tuned is not None:
        timings["pool_s"] = tuned.timings["pool_s"]  # perturb + encode the pool, part of tune_s

    start = time.perf_counter()
    image_scores, anomaly_maps = score_chunked(backbone, prompts, test_features, config, memory)  # (T,), (T, S, S)
    timings["score_s"] = time.perf_counter() - start
    test = dataset.test
    labels, masks = test.labels, test.masks(size)  # (T,), (T, S, S) nearest-neighbour; None without masks

    start = time.perf_counter()
    result_metrics = metrics_lib.evaluate(image_scores, anomaly_maps, labels, masks)
    timings["evaluate_s"] = time.perf_counter() - start
    return CategoryResult(dataset.category, method, result_metrics, image_scores, anomaly_maps, labels, masks,
                          list(test.defects), [str(p) for p in test.paths], list(shots_idx), timings, tuned)


def prepare_prompts(backbone: Backbone, dataset: Dataset, config: APTConfig, method: str, shots_idx: list[int],
                    store: FeatureStore, callbacks: Sequence[Callable] = (), progress: bool = False):
    """(prompts, TuneResult or None, visual memory or None): learned prompts tuned on the shots ``shots_idx`` of
    ``dataset.train`` (method "apt") or WinCLIP's human prompts — the one tuning path of runs, sweeps and severity."""
    radius = config.score.locality_radius
    shot_features = store.features(dataset.train, shots_idx, radius) if shots_idx else None  # once per store
    memory = build_memory(backbone, shot_features, config) if config.score.memory else None
    if method != "apt":
        return human_prompt_features(backbone, category=dataset.category.replace("_", " ")), None, memory  # (2, D)
    shots = store.images(dataset.train, shots_idx).to(backbone.device)  # (k, 3, S, S)
    tuned = tune_prompts(backbone, shots, config, callbacks=callbacks, progress=progress,
                         shot_features=shot_features)  # the store's features: no second pass
    if tuned.interrupted and not callbacks:  # only Ctrl-C stops tuning without a callback: score nothing half-done
        raise KeyboardInterrupt(f"tuning of {dataset.category} was interrupted")
    return tuned.prompts, tuned, memory


def score_chunked(backbone: Backbone, prompts, inputs, config: APTConfig, memory=None, chunk: int = 64):
    """Image scores (N,) and float16 maps (N, S, S) of ``inputs`` (features, or pixels (N, 3, S, S)), scored
    ``chunk`` at a time so a large set never holds every map in float32."""
    n, size = len(getattr(inputs, "cls", inputs)), backbone.image_size  # features (cls (N, D)) or pixels
    image_scores = torch.empty(n)  # (N,)
    anomaly_maps = torch.empty(n, size, size, dtype=torch.float16)  # (N, S, S), half the memory
    for begin in range(0, n, chunk):
        out = score(backbone, prompts, inputs[begin:begin + chunk], config, memory=memory)
        image_scores[begin:begin + chunk] = out.image_scores
        anomaly_maps[begin:begin + chunk] = out.anomaly_maps
    return image_scores, anomaly_maps


def check_datasets(dataset_name: str, categories: Sequence[str] | None, root: str | None, k: int) -> dict[str, Dataset]:
    """Every requested category listed and checked (names, masks, both classes, k train images); no pixel is read.

    Example:
        >>> list(check_datasets("demo", ["grass", "brick"], None, k=2))
        ['grass', 'brick']
    """
    names = [check_name(c) for c in (categories or list_categories(dataset_name, root))]
    return {c: load_dataset(dataset_name, root=root, category=c).check(k) for c in dict.fromkeys(names)}


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


def save_cell_artefacts(folder: Folder, cell_folder: str, result: CategoryResult, dataset: Dataset,
                        config: APTConfig, backbone: Backbone) -> list[str]:
    """Keep a cell's learned prompts and example maps in ``<folder>/<cell_folder>/`` (through the opened run
    folder, never a link); returns the files written, relative to the folder (the cell's line lists them)."""
    written = {}
    if result.tuned is not None:
        tensors, text = prompt_bytes(result.tuned, config=config, backbone=backbone)
        written.update({"prompts.safetensors": tensors, "prompts.json": text})
    written["examples.safetensors"] = example_bytes(result, dataset)
    for name, data in written.items():
        folder.write(f"{cell_folder}/{name}", data)
    return [f"{cell_folder}/{name}" for name in written]


def example_bytes(result: CategoryResult, dataset: Dataset, per_kind: int = 4, side: int = 112) -> bytes:
    """What the report draws for a cell, as the bytes of one safetensors file (no pickle): the ``per_kind`` highest-scoring
    anomalous and normal test images, their maps, masks and scores as thumbnails of at most ``side`` pixels (the
    size the report shows them at; maps area-averaged, masks nearest), plus the colour range of the whole test set
    at full resolution. The report is then redrawn at any time from the run folder alone."""
    import torch.nn.functional as F
    from safetensors.torch import save

    shown = select_examples(result.labels, result.image_scores, per_kind)
    size = min(result.anomaly_maps.shape[-1], side)
    images = dataset.test.images(size, indices=shown)  # (n, 3, s, s) resized from the files, antialiased
    maps = F.adaptive_avg_pool2d(result.anomaly_maps[shown].float()[:, None], size)[:, 0]  # (n, s, s)
    tensors = {"indices": torch.tensor(shown, dtype=torch.long),
               "images": (images * 255).round().to(torch.uint8),  # (n, 3, s, s)
               "anomaly_maps": maps.to(torch.float16),  # (n, s, s)
               "image_scores": result.image_scores[shown].float(),
               "colour_range": torch.stack([result.anomaly_maps.min(), result.anomaly_maps.max()]).float()}
    if result.masks is not None:
        masks = F.interpolate(result.masks[shown].float()[:, None], size=size, mode="nearest")[:, 0]  # (n, s, s)
        tensors["masks"] = masks.to(torch.uint8)
    metadata = {"defects": json.dumps([result.defects[i] for i in shown])}
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata)
