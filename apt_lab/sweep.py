"""Sweeps: every (category, shots, seed, method) cell of a benchmark, resumable, locally or on a Ray cluster.

A sweep is a run folder ``runs/<name>/`` holding

    sweep.json    what the sweep is (dataset, root, categories, shots, seeds, methods, config, backbone, library
                  version, the few-shot draws used); a rerun with anything different is refused
    cells.jsonl   one JSON line per finished cell, appended (and fsynced) the moment the cell finishes

Re-running the same command skips the cells already in ``cells.jsonl`` and redoes any cell that was interrupted
half-way (it was never written). Cells run category-outermost, so a category's data is read once for all its
shot counts, seeds and methods. ``sweep_table`` turns the cells into the tables papers print (per category and
macro mean ± std over seeds, per shot count and method).

Methods: ``apt`` (APT with SMGS), ``no-smgs`` (λ = 0: plain prompt tuning), ``human`` (WinCLIP's human prompts,
no tuning), or the name of any registered pixel perturbation (APT trained on that scheme alone), e.g. ``gaussian``
or your own ``@register_perturbation("stripes")`` loaded with ``plugins=["my_noise.py"]``.

Example:
    >>> cells = plan(["bottle", "cable"], shots=(1, 2), seeds=(0,), methods=("apt", "human"))
    >>> [c.key for c in cells][:3], len(cells)
    (['bottle/k1/s0/apt', 'bottle/k1/s0/human', 'bottle/k2/s0/apt'], 8)
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ._version import __version__
from .config import APTConfig
from .errors import RunMismatchError
from .metrics import format_metric

SWEEP_FILE = "sweep.json"
CELLS_FILE = "cells.jsonl"
BUILTIN_METHODS = ("apt", "no-smgs", "human")
TABLE_METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "aupro")  # the columns papers print


@dataclass(frozen=True)
class Cell:
    """One independent unit of a sweep."""

    category: str
    shots: int
    seed: int
    method: str

    @property
    def key(self) -> str:
        return f"{self.category}/k{self.shots}/s{self.seed}/{self.method}"


def plan(categories: Sequence[str], shots: Sequence[int], seeds: Sequence[int], methods: Sequence[str]) -> list[Cell]:
    """Every cell, category-outermost (then shots, seeds, methods), so a category's data is loaded once."""
    return [Cell(c, k, s, m) for c in categories for k in shots for s in seeds for m in methods]


def method_config(method: str, config: APTConfig) -> tuple[str, APTConfig]:
    """A sweep method name → (``run_category`` method, config).

    Example:
        >>> kind, cfg = method_config("no-smgs", APTConfig.preset("quick"))
        >>> kind, cfg.smgs.lam
        ('apt', 0.0)
        >>> method_config("gaussian", APTConfig.preset("quick"))[1].perturb.generators
        ('gaussian',)
    """
    if method == "apt":
        return "apt", config
    if method == "no-smgs":
        return "apt", config.replace(smgs__lam=0.0)
    if method == "human":
        return "human", config
    from .perturbations import list_perturbations

    if method in list_perturbations(space="pixel"):
        return "apt", config.replace(perturb__generators=(method,))
    raise ValueError(f"unknown sweep method {method!r}: use one of {list(BUILTIN_METHODS)} or a registered pixel "
                     f"perturbation {list_perturbations(space='pixel')} (load your own with plugins=[file.py] / "
                     "--plugin file.py)")


def load_plugins(plugins: Iterable[str]) -> None:
    """Import each plugin (a ``.py`` file or a module name) so the perturbations it registers can be swept."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"plugin {plugin!r}: no such file; give a .py file that calls "
                                        "@apt_lab.register_perturbation, or an importable module name")
            spec = importlib.util.spec_from_file_location(f"apt_lab_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(plugin)


# ------------------------------------------------------------------------------------------------ the run folder
def read_cells(folder: Path) -> dict[str, dict]:
    """Finished cells by key. A last line cut short by a kill (no newline, or not JSON) is not a finished cell."""
    path = Path(folder) / CELLS_FILE
    if not path.is_file():
        return {}
    cells = {}
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        cells[record["key"]] = record
    return cells


def append_cell(folder: Path, record: dict) -> None:
    """Append one finished cell as a single line with one ``write`` (O_APPEND), then fsync: a kill leaves either
    the whole line or a cut-off tail that :func:`repair_cells` drops."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(Path(folder) / CELLS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_cells(folder: Path) -> int:
    """Cut a partial last line (left by a kill mid-write) so the next append starts on a fresh line; returns
    the number of bytes removed."""
    path = Path(folder) / CELLS_FILE
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep == len(data):
        return 0
    with open(path, "r+b") as handle:
        handle.truncate(keep)
    return len(data) - keep


def _identity(dataset: str, root, categories, shots, seeds, methods, config: APTConfig, draws: dict) -> dict:
    return {"dataset": dataset, "root": None if root is None else str(Path(root).expanduser().resolve()),
            "categories": list(categories), "shots": list(shots), "seeds": list(seeds), "methods": list(methods),
            "config": json.loads(config.to_json()), "apt_lab": __version__, "draws": draws}


def _claim_folder(folder: Path, identity: dict, overwrite: bool) -> None:
    """Write ``sweep.json`` for a new sweep, or check that an existing one is the same sweep."""
    path = folder / SWEEP_FILE
    if overwrite:
        for name in (SWEEP_FILE, CELLS_FILE):
            (folder / name).unlink(missing_ok=True)
    if path.is_file():
        from .pipeline import differences

        differ = differences(json.loads(path.read_text()), identity)  # e.g. "config.train.steps: 3 → 4"
        if differ:
            more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
            raise RunMismatchError(
                f"{folder} holds a different sweep (differs in: {'; '.join(differ[:6])}{more}); its cells cannot be "
                "mixed with this one. Resume it with the same arguments, start afresh with --overwrite (deletes its "
                "cells), or choose another --out/--name.")
        return
    from .checkpoint import atomic_write

    text = json.dumps(identity, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ------------------------------------------------------------------------------------------------ running cells
def run_cells(config: APTConfig, dataset_name: str, root, cells: Sequence[Cell], progress: bool = False,
              backbone=None, plugins: Sequence[str] = (), folder: Path | None = None,
              threads: int | None = None, warm_shots: int | None = None, on_record=None) -> list[dict]:
    """Run ``cells`` (all of one category, or several) in order; each finished record is appended to ``folder``
    at once when a folder is given. Returns the records. What a local sweep and each Ray task call.

    One :class:`~apt_lab.features.FeatureStore` per category: its test images and shots are encoded once for all
    its cells. ``warm_shots``: encode the category's test images and its ``warm_shots``-shot draw (the sweep's
    largest; the draws are nested) before the first cell, so every cell reads features encoded in the same
    batches whichever cell runs first — a resumed or distributed sweep gives the same numbers as one run through.
    ``threads``: torch CPU threads (a Ray task gets the driver's count on a CPU-only cluster: float sums depend
    on the thread count, so this keeps CPU cells bit-identical to a local run). ``on_record``: called with each
    record once it is saved (progress bars)."""
    import torch

    from .backbone import load_backbone_from_config
    from .data import few_shot, load_dataset
    from .features import FeatureStore
    from .pipeline import run_category

    if threads is not None:
        torch.set_num_threads(threads)
    load_plugins(plugins)
    backbone = backbone or load_backbone_from_config(config, fallback_to_random=True)
    records, dataset, store = [], None, None
    for cell in cells:
        if dataset is None or dataset.category != cell.category:
            dataset = load_dataset(dataset_name, root=root, category=cell.category)
            store = FeatureStore(backbone, config.score.batch_size)  # this category's features, encoded once
            radius = config.score.locality_radius
            if warm_shots:
                store.features(dataset.train, few_shot(dataset.train, warm_shots), radius)
            store.features(dataset.test, None, radius)
        kind, cell_config = method_config(cell.method, config)
        start = time.perf_counter()
        result = run_category(backbone, dataset, cell_config, k=cell.shots, seed=cell.seed, method=kind,
                              progress=progress, store=store)
        if result.tuned is not None and result.tuned.interrupted:
            raise KeyboardInterrupt(f"tuning of {cell.key} was interrupted; the cell is not recorded")
        record = {"key": cell.key, "category": cell.category, "shots": cell.shots, "seed": cell.seed,
                  "method": cell.method, "metrics": result.metrics, "shot_indices": result.shots,
                  "n_test": int(result.labels.numel()), "eval_resolution": backbone.image_size,
                  "pretrained": backbone.pretrained_loaded, "seconds": round(time.perf_counter() - start, 3)}
        if folder is not None:
            append_cell(folder, record)
        if on_record is not None:
            on_record(record)
        records.append(record)
    return records


def run_sweep(dataset_name: str, config: APTConfig, root=None, categories: Sequence[str] | None = None,
              shots: Sequence[int] = (1, 2, 4), seeds: Sequence[int] = (0, 1, 2),
              methods: Sequence[str] = BUILTIN_METHODS, out: str | Path = "runs", name: str | None = None,
              executor: str = "local", address: str | None = None, workers: int | None = None,
              plugins: Sequence[str] = (), overwrite: bool = False, progress: bool = True) -> Path:
    """Run every missing cell of a sweep into ``<out>/<name>/``; returns the folder. See the module docstring.

    Args:
        executor: "local" (this process) or "ray" (categories as Ray tasks, one GPU each when the cluster has
            GPUs; ``address`` of an existing cluster, else a local Ray instance with ``workers`` CPUs).
        plugins: ``.py`` files or module names imported first (here and in every Ray worker) so the
            perturbations they register can be named in ``methods``.
    """
    from .data import few_shot, list_categories, load_dataset

    load_plugins(plugins)
    for method in methods:
        method_config(method, config)  # unknown names fail before anything runs
    from .data.files import check_name, folder_lock

    categories = [check_name(c) for c in (categories or list_categories(dataset_name, root))]
    folder = Path(out) / check_name(name or f"sweep-{dataset_name}-{config.name}", "sweep name")
    draws = {c: {str(k): few_shot(load_dataset(dataset_name, root=root, category=c), k) for k in shots}
             for c in categories}
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder, "sweep folder"):  # one process per sweep folder; a dead holder's lock is taken over
        _claim_folder(folder, _identity(dataset_name, root, categories, shots, seeds, methods, config, draws),
                      overwrite)
        repair_cells(folder)
        done = read_cells(folder)
        todo = [cell for cell in plan(categories, shots, seeds, methods) if cell.key not in done]
        print(f"sweep {folder}: {len(done)} cells done, {len(todo)} to run ({executor})", flush=True)
        if executor == "local":
            bar = _bar(len(todo), progress)
            try:  # one backbone for the whole sweep; each category's features encoded once (run_cells)
                run_cells(config, dataset_name, root, todo, folder=folder, warm_shots=max(shots),
                          on_record=lambda record: bar.update(1))
            finally:
                bar.close()
        elif executor == "ray":
            _run_on_ray(config, dataset_name, root, todo, folder, address, workers, plugins, progress, max(shots))
        else:
            raise ValueError(f"executor={executor!r}: use 'local' or 'ray'")
    return folder


def _run_on_ray(config, dataset_name, root, todo: list[Cell], folder: Path, address, workers, plugins, progress,
                warm_shots: int):
    try:
        import ray
    except ImportError:
        raise ImportError("executor='ray' needs Ray: pip install 'apt-lab[cluster]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        _start_ray(ray, address, workers)
    import torch

    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    threads = None if gpus else torch.get_num_threads()
    task = ray.remote(num_gpus=gpus, num_cpus=1)(run_cells)
    by_category: dict[str, list[Cell]] = {}
    for cell in todo:
        by_category.setdefault(cell.category, []).append(cell)
    config_json = config.to_json()
    pending = [task.remote(APTConfig.from_json(config_json), dataset_name, root, cells, False, None, list(plugins),
                           None, threads, warm_shots) for cells in by_category.values()]
    bar = _bar(len(todo), progress)
    try:
        while pending:  # a category's cells land in cells.jsonl as soon as its task returns
            ready, pending = ray.wait(pending, num_returns=1)
            for record in ray.get(ready[0]):
                append_cell(folder, record)
                bar.update(1)
    finally:
        bar.close()
        if started_here:
            ray.shutdown()


def _start_ray(ray, address, workers) -> None:
    """``ray.init``; a local instance that times out starting (Ray waits 30 s for its raylet, too little on a
    busy laptop) is started once more before giving up."""
    for attempt in (1, 2):
        try:
            ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            if address or attempt == 2 or "timed out during startup" not in str(error):
                raise
            ray.shutdown()
            print("Ray's local instance timed out starting (a busy machine?); trying once more", flush=True)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep cells", disable=not enabled or total == 0)


# ------------------------------------------------------------------------------------------------ tables
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value).

    Example:
        >>> mean_std([0.8, 0.9, 1.0])
        (0.9, 0.1)
    """
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return round(mean, 12), round(std, 12)


def sweep_table(cells: Iterable[dict], metrics: Sequence[str] = TABLE_METRICS) -> list[dict]:
    """Rows of the paper table: one per (method, shots, category) plus a ``mean`` row per (method, shots).

    A category's entry is mean ± std over its seeds. The ``mean`` row is the macro mean over categories computed
    per seed, then mean ± std over seeds (so its std is the seed-to-seed spread of the benchmark number).
    Metrics a cell lacks (e.g. pixel metrics without masks) are left out of that row.

    Example:
        >>> cells = [{"category": c, "shots": 1, "seed": s, "method": "apt", "metrics": {"image_auroc": v}}
        ...          for c, s, v in [("a", 0, 0.8), ("a", 1, 1.0), ("b", 0, 0.6), ("b", 1, 0.8)]]
        >>> [(r["category"], r["image_auroc"]) for r in sweep_table(cells, ["image_auroc"])]
        [('a', (0.9, 0.141421356237)), ('b', (0.7, 0.141421356237)), ('mean', (0.8, 0.141421356237))]
    """
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for cell in cells:
        groups.setdefault((cell["method"], cell["shots"]), {}).setdefault(cell["category"], {})[cell["seed"]] = \
            cell["metrics"]
    rows = []
    for (method, shots), by_category in groups.items():
        for category, by_seed in by_category.items():
            row = {"method": method, "shots": shots, "category": category, "seeds": len(by_seed)}
            for metric in metrics:
                values = [m[metric] for m in by_seed.values() if m.get(metric) is not None]
                if len(values) == len(by_seed):
                    row[metric] = mean_std(values)
            rows.append(row)
        seeds = sorted(set.intersection(*(set(s) for s in by_category.values())))
        mean_row = {"method": method, "shots": shots, "category": "mean", "seeds": len(seeds)}
        for metric in metrics:
            per_seed = []
            for seed in seeds:
                values = [by_seed[seed].get(metric) for by_seed in by_category.values()]
                if all(v is not None for v in values):
                    per_seed.append(sum(values) / len(values))
            if seeds and len(per_seed) == len(seeds):
                mean_row[metric] = mean_std(per_seed)
        rows.append(mean_row)
    return rows


def format_cell(value: tuple[float, float] | None, scale: float = 100.0) -> str:
    """(mean, std) → "95.3 ± 0.4" in percent, as papers print; "" when missing.

    Example:
        >>> format_cell((0.9532, 0.004)), format_cell(None)
        ('95.3 ± 0.4', '')
    """
    if value is None:
        return ""
    return f"{format_metric(value[0] * scale, 1)} ± {format_metric(value[1] * scale, 1)}"


def table_caption(folder: Path) -> str:
    """What every table of a sweep says about itself: dataset, backbone, weights, resolution, shots, seeds."""
    identity = json.loads((Path(folder) / SWEEP_FILE).read_text())
    cells = list(read_cells(folder).values())
    backbone = identity["config"]["backbone"]
    resolution = sorted({c["eval_resolution"] for c in cells}) or ["?"]
    weights = "pretrained" if cells and all(c["pretrained"] for c in cells) else "RANDOM weights"
    return (f"{identity['dataset']}: {backbone['name']} / {backbone['pretrained'] or 'no tag'} ({weights}), "
            f"evaluated at {', '.join(map(str, resolution))} px; shots {identity['shots']}; mean ± std over seeds "
            f"{identity['seeds']}; apt_lab {identity['apt_lab']}; few-shot draws fixed (recorded in sweep.json).")


def write_tables(folder: str | Path, metrics: Sequence[str] = TABLE_METRICS) -> tuple[Path, Path, str]:
    """Write ``table.md`` and ``table.csv`` into a sweep folder; returns their paths and the markdown text."""
    from .checkpoint import atomic_write

    folder = Path(folder)
    rows = sweep_table(read_cells(folder).values(), metrics)
    header = ["method", "shots", "category", *metrics]
    lines = [f"*{table_caption(folder)}*", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    csv_lines = [",".join(header + [f"{m}_std" for m in metrics])]
    for row in rows:
        lines.append("| " + " | ".join([row["method"], str(row["shots"]), row["category"],
                                        *[format_cell(row.get(m)) for m in metrics]]) + " |")
        csv_lines.append(",".join([row["method"], str(row["shots"]), row["category"],
                                   *[format_metric(row[m][0]) if m in row else "" for m in metrics],
                                   *[format_metric(row[m][1]) if m in row else "" for m in metrics]]))
    markdown = "\n".join(lines) + "\n"
    md_path, csv_path = folder / "table.md", folder / "table.csv"
    atomic_write(md_path, lambda tmp: tmp.write_text(markdown))
    atomic_write(csv_path, lambda tmp: tmp.write_text("\n".join(csv_lines) + "\n"))
    return md_path, csv_path, markdown
