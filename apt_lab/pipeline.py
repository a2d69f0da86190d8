"""Running a method over a dataset: the four verbs chained per category, and a run folder that survives.

``run_category``: shots → tune (or human prompts) → score → metrics, for one category. ``run_experiment``: every
category of a dataset into ``runs/<name>/`` — ``results.json`` after every category (an interrupted run resumes),
``results.csv``, ``report.html`` and the learned prompts per category. ``apt-lab demo``/``run``, the notebooks
and the benchmark notebook all call these. Test images and labels never reach the tuning step: shots come from
the training split only.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import metrics as metrics_lib
from ._version import __version__
from .backbone import Backbone, load_backbone_from_config
from .baselines import human_prompt_features
from .checkpoint import atomic_write, save_prompts, write_if_changed
from .config import APTConfig
from .data import Dataset, dataset_root, few_shot, list_categories, load_dataset
from .data.files import check_name, folder_lock
from .errors import CorruptFileError, RunMismatchError
from .features import FeatureStore
from .metrics import METRIC_KEYS, format_metric, mean_metrics, metric_rows
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
                 callbacks: Sequence[Callable] = (), progress: bool = False,
                 store: FeatureStore | None = None) -> CategoryResult:
    """Tune on k normal shots of ``dataset.train`` (or use human prompts) and evaluate on ``dataset.test``.

    Args:
        k: normal shots; None = ``config.train.k_shot``.
        seed: training seed (perturbations, prompt init, batch order); None = ``config.train.seed``.
        method: "apt" (learned prompts, SMGS per ``config.smgs``) or "human" (WinCLIP ensemble with the category
            name filled in, no tuning).
        shot_seed: None = the fixed shot lists shipped with apt_lab; an int = a seeded random draw.
        store: where the test images' and shots' features come from; pass one store to every run of a category
            (shot counts, seeds, methods) and each image is encoded once. None = a store for this run only.

    Maps are kept at the evaluation resolution (the backbone's input size) in float16, and evaluated from there
    a few at a time (``apt_lab.metrics.evaluate``): a large test set never holds every map in float32.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    config = with_shots(config, k, seed)
    k = config.train.k_shot
    size, radius = backbone.image_size, config.score.locality_radius
    store = store or FeatureStore(backbone, config.score.batch_size)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    shots_idx = few_shot(dataset.train, k, seed=shot_seed)
    shots = store.images(dataset.train, shots_idx).to(backbone.device)  # (k, 3, S, S)
    shot_features = store.features(dataset.train, shots_idx, radius)  # encoded once per store
    test_features = store.features(dataset.test, None, radius)  # (T images) encoded once per store
    timings["encode_s"] = time.perf_counter() - start  # 0 when the store already held them

    start = time.perf_counter()
    tuned = None
    if method == "apt":
        with backbone.reuse_features(shots, shot_features, radius):  # tuning's clean shots: no second pass
            tuned = tune_prompts(backbone, shots, config, callbacks=callbacks, progress=progress)
        if tuned.interrupted and not callbacks:  # only Ctrl-C stops tuning without a callback: score nothing half-done
            raise KeyboardInterrupt(f"tuning of {dataset.category} was interrupted")
        prompts = tuned.prompts
    else:
        prompts = human_prompt_features(backbone, category=dataset.category.replace("_", " "))  # (2, D)
    timings["tune_s"] = time.perf_counter() - start
    if tuned is not None:
        timings["pool_s"] = tuned.timings["pool_s"]  # perturb + encode the pool, part of tune_s

    start = time.perf_counter()
    memory = build_memory(backbone, shot_features, config) if config.score.memory else None
    test = dataset.test
    image_scores = torch.empty(len(test))  # (T,)
    anomaly_maps = torch.empty(len(test), size, size, dtype=torch.float16)  # (T, S, S), half the memory
    chunk = 64  # maps held in float32 at once
    for begin in range(0, len(test), chunk):
        out = score(backbone, prompts, test_features[begin:begin + chunk], config, memory=memory)
        image_scores[begin:begin + chunk] = out.image_scores
        anomaly_maps[begin:begin + chunk] = out.anomaly_maps
    timings["score_s"] = time.perf_counter() - start
    labels, masks = test.labels, test.masks(size)  # (T,), (T, S, S) nearest-neighbour; None without masks

    start = time.perf_counter()
    result_metrics = metrics_lib.evaluate(image_scores, anomaly_maps, labels, masks)
    timings["evaluate_s"] = time.perf_counter() - start
    return CategoryResult(dataset.category, method, result_metrics, image_scores, anomaly_maps, labels, masks,
                          list(test.defects), [str(p) for p in test.paths], list(shots_idx), timings, tuned)


def compare(backbone: Backbone, dataset_name: str, categories: Sequence[str],
            variants: dict[str, tuple[str, APTConfig]], seeds: Sequence[int] = (0,),
            k: int | Sequence[int] | None = None, root: str | None = None,
            on_row: Callable[[dict], None] | None = None, cache_dir: str | Path | None = None) -> list[dict]:
    """Run every variant on every category, shot count and seed with the same shots; one row of metrics per run.

    ``k``: one shot count, several (``(1, 2, 4)``), or None = each variant's ``config.train.k_shot``.
    The loop is category-outermost with one :class:`~apt_lab.features.FeatureStore` per category, so a category's
    test images and shots are encoded once for all its runs (``cache_dir``: also kept on disk across sessions).

    Example:
        >>> import apt_lab
        >>> b, cfg = apt_lab.load_backbone("apt-tiny"), APTConfig.preset("quick", train__steps=2)
        >>> rows = compare(b, "demo", ["brick"], {"human": ("human", cfg), "APT": ("apt", cfg)})
        >>> [(r["variant"], r["category"], r["seed"]) for r in rows]
        [('human', 'brick', 0), ('APT', 'brick', 0)]
    """
    rows = []
    shot_counts = [k] if k is None or isinstance(k, int) else list(k)
    for category in categories:
        dataset = load_dataset(dataset_name, root=root, category=category)
        batch_size = next(iter(variants.values()))[1].score.batch_size if variants else 16
        store = FeatureStore(backbone, batch_size, cache_dir=cache_dir)  # this category's features, encoded once
        for shots in shot_counts:
            for seed in seeds:
                for variant, (method, config) in variants.items():
                    result = run_category(backbone, dataset, config, k=shots, seed=seed, method=method, store=store)
                    row = {"variant": variant, "category": category, "k": len(result.shots), "seed": seed,
                           **result.metrics, **{name: round(seconds, 3) for name, seconds in result.timings.items()}}
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
        del store  # free this category's features before the next one
    return rows


# ------------------------------------------------------------------------------------------------ run folders
RESULTS_FILE = "results.json"
OUTPUTS = ("results.json", "results.csv", "report.html", "results.previous.json", "examples", "prompts")
IDENTITY_KEYS = ("dataset", "root", "method", "k", "seed", "config", "backbone", "apt_lab")


def run_folder(dataset_name: str, config: APTConfig, method: str = "apt", out: str | Path = "runs",
               name: str | None = None) -> Path:
    """``<out>/<name>``; the default name is ``<dataset>-<config name>-<method>-k<k>-s<seed>``.

    Example:
        >>> run_folder("demo", APTConfig.preset("quick")).as_posix()
        'runs/demo-quick-apt-k2-s0'
    """
    name = name or f"{dataset_name}-{config.name}-{method}-k{config.train.k_shot}-s{config.train.seed}"
    return Path(out) / check_name(name, "run name")


@contextlib.contextmanager
def claim_folder(folder: str | Path):
    """Create ``folder`` if needed and hold its lock for the ``with`` block (re-entrant in one process).

    A second process is refused with RunInUseError; a lock left by a killed process is taken over. When the block
    ends in an error (or Ctrl-C) and this call created the folder but nothing was saved in it yet, the folder is
    removed again: a failed command never leaves an empty run folder behind.
    """
    folder = Path(folder)
    new = [path for path in (folder, *folder.parents) if not path.exists()]  # what this call creates (e.g. runs/)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        try:
            yield folder
        except BaseException:
            if new and not (folder / RESULTS_FILE).exists():
                shutil.rmtree(folder, ignore_errors=True)
                for parent in new[1:]:
                    with contextlib.suppress(OSError):
                        parent.rmdir()  # only when still empty
            raise


def check_datasets(dataset_name: str, categories: Sequence[str] | None, root: str | None, k: int) -> dict[str, Dataset]:
    """Every requested category listed and checked (names, masks, both classes, k train images); no pixel is read.

    Example:
        >>> list(check_datasets("demo", ["grass", "brick"], None, k=2))
        ['grass', 'brick']
    """
    names = [check_name(c) for c in (categories or list_categories(dataset_name, root))]
    return {c: load_dataset(dataset_name, root=root, category=c).check(k) for c in dict.fromkeys(names)}


def run_experiment(dataset_name: str, config: APTConfig, categories: list[str] | None = None,
                   root: str | None = None, k: int | None = None, seed: int | None = None,
                   out: str | Path = "runs", name: str | None = None, method: str = "apt", overwrite: bool = False,
                   progress: bool = True, backbone: Backbone | None = None) -> Path:
    """Run ``method`` on every category into ``<out>/<name>/``, saving results after each one; returns the folder.

    Everything is checked before any tuning: the config's values, the method, every category's name and files
    (masks of the right size, both classes in the test set, at least k train images). A folder holding an earlier
    run is resumed only when it is the same run — same dataset, root, each category's files, k, seed, method,
    config, backbone and apt_lab version — otherwise RunMismatchError says what differs. A category counts as done
    only once its prompts, example maps and results are saved: Ctrl-C (or a crash) during a category records
    nothing of it, and the next run redoes it. Rerunning a finished run changes no byte of its outputs.

    Args:
        k: overrides ``config.train.k_shot`` when given.
        seed: overrides ``config.train.seed`` when given.
        backbone: an already loaded backbone (the command line loads it first to announce random weights);
            None = ``load_backbone_from_config(config, fallback_to_random=True)``.
        overwrite: delete the folder's earlier outputs and start afresh instead of resuming.

    Raises:
        RunMismatchError: the folder holds another run. RunInUseError: another process is running in it.
        KeyboardInterrupt: after Ctrl-C, with every finished category saved.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    config = with_shots(config, k, seed).validate()
    datasets = check_datasets(dataset_name, categories, root, config.train.k_shot)
    folder = run_folder(dataset_name, config, method, out, name)
    with claim_folder(folder):
        backbone = backbone or load_backbone_from_config(config, fallback_to_random=True)
        n_patches = backbone.grid[0] * backbone.grid[1]
        print(f"{backbone}\nfeatures per image: cls ({backbone.embed_dim},), patches ({len(backbone.layers)}, "
              f"{n_patches}, {backbone.embed_dim}) from blocks {list(backbone.layers)}", flush=True)
        root_path = str(dataset_root(dataset_name, root).expanduser().resolve())
        results = _new_results(folder.name, dataset_name, root_path, method, config, backbone)
        if overwrite:
            _remove_outputs(folder)
        previous = read_results(folder)
        if previous is not None:
            _check_same_run(folder, previous, results, datasets)
            results["categories"], results["timings"] = previous["categories"], previous.get("timings", {})
            done = [c for c in datasets if c in results["categories"]]
            if done:
                print(f"resuming {folder}: {done} already done", flush=True)
        todo = [c for c in datasets if c not in results["categories"]]
        for category in todo:  # each one saved as it finishes; a finished run writes nothing (no byte changes)
            _run_one(backbone, datasets[category], config, method, folder, results, progress)
        write_csv(folder / "results.csv", results)  # regenerated identically; unchanged bytes are not rewritten
        print(summary_table(results))
    return folder


def _run_one(backbone: Backbone, dataset: Dataset, config: APTConfig, method: str, folder: Path, results: dict,
             progress: bool) -> None:
    """One category: run it, save its example maps and prompts, then record it in results.json and the CSV."""
    start = time.perf_counter()
    category = dataset.category
    print(f"[{category}] {len(dataset.train)} train / {len(dataset.test)} test images, k={config.train.k_shot}",
          flush=True)
    result = run_category(backbone, dataset, config, method=method, progress=progress)
    if result.tuned is not None and result.tuned.interrupted:  # never record half-trained prompts as a result
        raise KeyboardInterrupt(f"tuning of {category} was interrupted; it is not recorded")
    save_examples(folder / "examples" / category, result, dataset)
    if result.tuned is not None:
        save_prompts(result.tuned, folder / "prompts" / category, config=config, backbone=backbone)
    results["categories"][category] = {**result.summary(), "files": dataset.fingerprint()}
    results["mean"] = mean_metrics({c: r["metrics"] for c, r in results["categories"].items()})
    total = results.setdefault("timings", {}).get("total_s", 0.0)
    results["timings"]["total_s"] = round(total + time.perf_counter() - start, 2)  # seconds over all sessions
    write_json(folder / RESULTS_FILE, results)  # after every category: an interrupted run keeps its work
    write_csv(folder / "results.csv", results)


def _new_results(name: str, dataset_name: str, root: str, method: str, config: APTConfig, backbone: Backbone) -> dict:
    """The results schema: what was run, on what, where; categories fill in as they finish."""
    return {
        "name": name, "dataset": dataset_name, "root": root, "method": method, "k": config.train.k_shot,
        "seed": config.train.seed,
        "backbone": {"name": backbone.name, "tag": config.backbone.pretrained, "pretrained": backbone.pretrained_loaded,
                     "image_size": backbone.image_size, "layers": list(backbone.layers)},
        "pretrained": backbone.pretrained_loaded, "eval_resolution": backbone.image_size,
        "config": json.loads(config.to_json()), "categories": {},
        "environment": {"apt_lab": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "device": str(backbone.device), "threads": torch.get_num_threads()},
    }


def run_identity(results: dict) -> dict:
    """What makes two runs the same run (their numbers comparable and mergeable): :data:`IDENTITY_KEYS`."""
    identity = {key: results.get(key) for key in IDENTITY_KEYS if key != "apt_lab"}
    identity["apt_lab"] = results.get("environment", {}).get("apt_lab")
    return identity


def differences(old, new, path: str = "") -> list[str]:
    """Human-readable leaf differences between two JSON values (run and sweep identities).

    Example:
        >>> differences({"k": 1, "config": {"train": {"steps": 10}}}, {"k": 1, "config": {"train": {"steps": 20}}})
        ['config.train.steps: 10 → 20']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in dict.fromkeys([*old, *new])
                for d in differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]
    return [] if old == new else [f"{path}: {old!r} → {new!r}"]


def _check_same_run(folder: Path, previous: dict, current: dict, datasets: dict[str, Dataset]) -> None:
    how = ("Run the same command as before to resume it, pass --overwrite (overwrite=True) to replace it, or choose "
           "another --name for a new run folder.")
    differ = differences(run_identity(previous), run_identity(current))
    if differ:
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise RunMismatchError(f"{folder} holds a run with other settings ({'; '.join(differ[:6])}{more}); resuming "
                               f"it would mix two runs' results. {how}")
    changed = [c for c, ds in datasets.items()
               if c in previous.get("categories", {}) and previous["categories"][c].get("files") != ds.fingerprint()]
    if changed:
        raise RunMismatchError(f"{folder}: the files of {changed} changed since they were run (added, removed or "
                               f"modified images or masks), so their saved results no longer describe this data. {how}")


def read_results(folder: str | Path) -> dict | None:
    """A run folder's results.json, or None when there is none; CorruptFileError when it cannot be parsed."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
        if not isinstance(results.get("categories"), dict):
            raise ValueError("no 'categories' object")
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} cannot be read ({err}); it was not written by this apt_lab or was edited. "
                               "Pass --overwrite (overwrite=True) to start this run afresh, or choose another "
                               "--name.") from None
    return results


def _remove_outputs(folder: Path) -> None:
    for entry in OUTPUTS:
        path = folder / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


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
    target = Path(path).parent / (Path(path).name + ".safetensors")  # the category name may hold dots
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata))
    return target


def load_examples(path: Path) -> dict | None:
    """What :func:`save_examples` wrote (tensors + ``defects``), or None when the file is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    target = Path(path).parent / (Path(path).name + ".safetensors")
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
    """One row per category and the mean row: every metric, tuning and scoring seconds. Unchanged content is not
    rewritten."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", *METRIC_KEYS, "tune_s", "score_s"])
    rows = metric_rows(results)
    for index, (category, metrics) in enumerate(rows):
        timings = results["categories"][category].get("timings", {}) if index < len(rows) - 1 else {}
        writer.writerow([category, *[format_metric(metrics.get(c)) for c in METRIC_KEYS],
                         timings.get("tune_s", ""), timings.get("score_s", "")])
    write_if_changed(Path(path), buffer.getvalue())


def summary_table(results: dict) -> str:
    """The run's metrics as a fixed-width text table (what the command line prints)."""
    weights = "pretrained" if results["pretrained"] else "RANDOM WEIGHTS"
    header = f"{'category':<12}" + "".join(f"{c:>12}" for c in METRIC_KEYS)
    lines = [f"\n{results['name']}: {results['backbone']['name']} ({weights}), k={results['k']}, "
             f"evaluated at {results['eval_resolution']} px", header, "-" * len(header)]
    for category, metrics in metric_rows(results):
        lines.append(f"{category:<12}" + "".join(f"{format_metric(metrics.get(c)) or '-':>12}" for c in METRIC_KEYS))
    return "\n".join(lines)
