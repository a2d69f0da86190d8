"""Running cells into a run folder: ``run_sweep`` for every (category, shots, seed, method) of a benchmark, locally
or on a Ray cluster — and for a single run, which is the sweep of one (shots, seed, method).

Each finished cell is appended to the folder's ``cells.jsonl`` at once (:mod:`apt_lab.store`), so re-running the
same command skips what is done and redoes only a cell that was interrupted half-way. Cells run grouped by
backbone, then category: a category's test images and shots are encoded once for all its shot counts, seeds and
methods (one :class:`~apt_lab.features.FeatureStore` per category, warmed in a fixed order so a resumed or
distributed run reads the same features as one run through).

Methods: ``apt`` (APT with SMGS), ``no-smgs`` (λ = 0: plain prompt tuning), ``human`` (WinCLIP's human prompts, no
tuning: zero-shot, one cell per category), or the name of any registered pixel perturbation (APT trained on that
scheme alone), e.g. ``gaussian`` or your own ``@register_perturbation("stripes")`` loaded with
``plugins=["my_noise.py"]``. Each becomes a *variant*: a kind (``apt``/``human``) and the config settings it
changes, recorded in ``run.json``.

Example:
    >>> resolve_variants(("apt", "no-smgs", "human", "gaussian"), APTConfig.preset("quick"))["no-smgs"]
    {'kind': 'apt', 'settings': {'smgs.lam': 0.0}, 'zero_shot': False}
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ._version import __version__
from .config import APTConfig
from .data.files import check_name, folder_lock, make_folder
from .store import Cell, RunStore, plan_of, run_id

BUILTIN_METHODS = ("apt", "no-smgs", "human")  # the default methods of a sweep


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


NAMED_VARIANTS = {  # name → (kind, settings by dotted config name): the paper's components switched on and off
    "apt": ("apt", {}),  # APT: CFG on the region of interest + SMGS (λ = 1)
    "human": ("human", {}),  # WinCLIP's human-written prompts, no tuning (zero-shot)
    "no-smgs": ("apt", {"smgs.lam": 0.0}),  # plain prompt tuning: SMGS off
    "no-roi": ("apt", {"perturb.region": "image"}),  # CFG anywhere on the image, not on the region of interest
    "no-roi-no-smgs": ("apt", {"perturb.region": "image", "smgs.lam": 0.0}),  # both components off
    "smgs+anchor": ("apt", {"smgs.anchor_weight": 1.0, "smgs.apply_to": "both"}),  # SMGS tied to the initial meta
}
ABLATIONS = {  # --ablation NAME → the variants it expands to (docs/sweeps.md lists their settings)
    "paper": ("human", "no-roi-no-smgs", "no-roi", "no-smgs", "apt"),  # APT's component table: CFG's ROI × SMGS
    "perturbations": (),  # each registered pixel perturbation alone (filled in when expanded: plugins count)
}


def method_settings(method: str) -> tuple[str, dict]:
    """A method name → (kind, the config settings it changes, by dotted name): a named variant
    (:data:`NAMED_VARIANTS`) or a registered pixel perturbation (APT trained on that scheme alone)."""
    if method in NAMED_VARIANTS:
        kind, settings = NAMED_VARIANTS[method]
        return kind, dict(settings)
    from .perturbations import list_perturbations

    if method in list_perturbations(space="pixel"):
        return "apt", {"perturb.generators": [method]}
    raise ValueError(f"unknown method {method!r}: use one of {list(NAMED_VARIANTS)} or a registered pixel "
                     f"perturbation {list_perturbations(space='pixel')} (load your own with --plugin file.py)")


def ablation_methods(name: str) -> tuple[str, ...]:
    """``--ablation NAME`` → its methods, e.g. ``ablation_methods("paper")``.

    Example:
        >>> ablation_methods("paper")
        ('human', 'no-roi-no-smgs', 'no-roi', 'no-smgs', 'apt')
    """
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {list(ABLATIONS)}")
    if name == "perturbations":
        from .perturbations import list_perturbations

        return tuple(list_perturbations(space="pixel"))
    return ABLATIONS[name]


def parse_vary(texts: Sequence[str]) -> dict[str, list]:
    """``["smgs.lam=0,0.5,1", "perturb.roi_method=text,pixels"]`` → ``{"smgs.lam": [0, 0.5, 1], ...}``: each value
    read as JSON where it is JSON (numbers, true/false, [lists]), else as a string. Values are checked by the
    config's own rules when the variants are built (:func:`resolve_variants`), before anything runs.

    Example:
        >>> parse_vary(["smgs.lam=0,1", "perturb.strength=[0.1,0.2],[0.5,0.6]", "perturb.roi_method=text"])
        {'smgs.lam': [0, 1], 'perturb.strength': [[0.1, 0.2], [0.5, 0.6]], 'perturb.roi_method': ['text']}
    """
    out = {}
    for text in texts:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"--vary {text!r}: write KEY=V1,V2,... with a dotted config name, e.g. smgs.lam=0,1")
        parts, depth, current = [], 0, ""
        for char in values:  # split on commas outside [brackets]
            depth += (char == "[") - (char == "]")
            if char == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += char
        parts.append(current)
        out[key.strip()] = [_value(part.strip()) for part in parts]
    return out


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def vary_variants(methods: Sequence[str], vary: Mapping[str, Sequence]) -> dict[str, tuple[str, dict]]:
    """Every method × every combination of the varied values (their product), as named variants. A method whose
    kind never reads a varied section (human prompts ignore perturb, prompts, smgs, train) is kept once.

    Example:
        >>> list(vary_variants(["apt", "human"], {"smgs.lam": [0, 1]}))
        ['apt smgs.lam=0', 'apt smgs.lam=1', 'human']
    """
    combos = [dict(zip(vary, values)) for values in itertools.product(*vary.values())]
    out = {}
    for method in methods:
        kind, settings = method_settings(method)
        if kind == "human" and all(key.split(".")[0] in UNUSED_BY_HUMAN for key in vary):
            out[method] = (kind, settings)
            continue
        for combo in combos:
            label = " ".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in combo.items())
            out[f"{method} {label}"] = (kind, {**settings, **combo})
    return out


UNUSED_BY_HUMAN = ("perturb", "prompts", "smgs", "train")  # config sections human prompts never read


def apply_settings(config: APTConfig, settings: Mapping[str, object]) -> APTConfig:
    """``config`` with dotted-name settings applied (validated like any config).

    Example:
        >>> apply_settings(APTConfig.preset("quick"), {"smgs.lam": 0.0, "train.steps": 3}).train.steps
        3
    """
    return config.replace(**{key.replace(".", "__"): value for key, value in settings.items()}) if settings \
        else config


def resolve_variants(methods: Sequence[str], config: APTConfig,
                     variants: Mapping[str, tuple[str, Mapping]] | None = None) -> dict[str, dict]:
    """Every method — or, when given, every one of ``variants`` (name → (kind, settings)) — as name → {kind,
    settings, zero_shot}; each variant's config is built now, so a bad name or setting fails before anything runs.
    Zero-shot = human prompts without the shots' visual memory."""
    named = dict(variants) if variants else {m: method_settings(m) for m in methods}
    out = {}
    for name, (kind, settings) in named.items():
        check_name(name, "method")
        if kind not in ("apt", "human"):
            raise ValueError(f"variant {name!r}: kind {kind!r} is not 'apt' or 'human'")
        cell_config = apply_settings(config, settings)
        out[name] = {"kind": kind, "settings": settings,
                     "zero_shot": kind == "human" and not cell_config.score.memory}
    if not out:
        raise ValueError("no methods: name at least one (e.g. apt)")
    return out


def run_sweep(dataset_name: str, config: APTConfig, *, root=None, categories: Sequence[str] | None = None,
              shots: Sequence[int] = (1, 2, 4), seeds: Sequence[int] = (0, 1, 2),
              methods: Sequence[str] = BUILTIN_METHODS, vary: Mapping[str, Sequence] | None = None,
              ablation: str | None = None, out: str | Path = "runs", name: str | None = None,
              executor: str = "local", address: str | None = None, workers: int | None = None, plugins: Sequence[str] = (), overwrite: bool = False, repair: bool = False,
              artefacts: bool = False, progress: bool = True, backbone=None) -> Path:
    """Run every missing cell into ``<out>/<name>/``; returns the folder. See the module docstring.

    Args:
        methods: method names (:data:`NAMED_VARIANTS` or registered pixel perturbations).
        vary: ``{dotted config name: [values]}``; every method × the product of the values becomes a variant
            (``parse_vary`` reads the command line's ``--vary KEY=V1,V2``).
        ablation: a name in :data:`ABLATIONS`, used instead of ``methods`` (e.g. "paper").
        executor: "local" (this process) or "ray" (categories as Ray tasks, one GPU each when the cluster has
            GPUs; ``address`` of an existing cluster, else a local Ray instance with ``workers`` CPUs).
        plugins: ``.py`` files or module names imported first (here and in every Ray worker).
        overwrite: delete the folder's earlier run (only the files its manifest names) and start afresh.
        repair: move malformed, foreign or conflicting lines of cells.jsonl aside instead of refusing.
        artefacts: keep each cell's prompts and example maps (what the report draws) beside its line.
        backbone: an already loaded backbone for the base config (the command line loads it first).

    Everything that needs no model is checked first: methods, settings, names, every category's files and
    enough training images for the largest shot count.
    """
    from .pipeline import check_datasets, with_shots

    if executor not in ("local", "ray"):
        raise ValueError(f"executor={executor!r}: use 'local' or 'ray'")
    if not shots or not seeds:
        raise ValueError(f"shots={list(shots)}, seeds={list(seeds)}: give at least one of each")
    for k in shots:  # every shot count and seed is a valid config value (k ≥ 1, seed ≥ 0), checked now
        for seed in seeds:
            with_shots(config, k, seed)
    load_plugins(plugins)
    methods = ablation_methods(ablation) if ablation else tuple(methods)
    resolved = resolve_variants(methods, config, vary_variants(methods, vary) if vary else None)
    datasets = check_datasets(dataset_name, categories, root, max(shots))
    folder = Path(out) / check_name(name or f"sweep-{dataset_name}-{config.name}", "run name")
    identity = {**_identity(dataset_name, root, datasets, shots, seeds, resolved, config), "vary": dict(vary or {})}
    created = not folder.exists()
    make_folder(folder)
    try:
        with folder_lock(folder):  # one process per run folder; a dead holder's lock is taken over
            store = RunStore(folder)
            store.claim(identity, overwrite)
            identity = store.identity()
            store.cut_partial_line()
            done = store.cells(identity, repair=repair)
            todo = [cell for cell in plan_of(identity) if cell.key not in done]
            print(f"{folder}: {len(done)} cells done, {len(todo)} to run ({executor})", flush=True)
            if executor == "local":
                with _bar(len(todo), progress) as bar:
                    run_cells(config, identity, root, todo, folder=folder, backbone=backbone, artefacts=artefacts,
                              on_record=lambda record: (store.append(record), bar.update(1)), verbose=not progress)
            else:
                _run_on_ray(config, identity, root, todo, store, address, workers, plugins, artefacts, progress)
    except BaseException:
        if created and not RunStore(folder).cells(strict=False):  # nothing finished: leave no empty folder behind
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
        raise
    return folder


def _identity(dataset_name, root, datasets, shots, seeds, variants, config: APTConfig) -> dict:
    from .data import dataset_root, few_shot

    return {"dataset": dataset_name, "root": str(dataset_root(dataset_name, root).expanduser().resolve()),
            "categories": list(datasets), "shots": [int(k) for k in shots], "seeds": [int(s) for s in seeds],
            "variants": variants, "config": config.to_dict(), "apt_lab": __version__,
            "files": {c: ds.fingerprint() for c, ds in datasets.items()},
            "draws": {c: {str(k): few_shot(ds.train, k) for k in shots} for c, ds in datasets.items()}}


def run_cells(config: APTConfig, identity: dict, root, cells: Sequence[Cell], folder: Path | None = None,
              backbone=None, artefacts: bool = False, threads: int | None = None, plugins: Sequence[str] = (),
              on_record=None, verbose: bool = False) -> list[dict]:
    """Run ``cells`` and return their records (``on_record`` gets each as it finishes: the local sweep appends it
    to the store at once). What a local sweep and each Ray task call.

    Cells are grouped by the backbone their variant needs (one load each; ``backbone`` serves the base config),
    then by category, with one :class:`~apt_lab.features.FeatureStore` per (backbone, category) whose test images
    and largest shot draw are encoded first, in a fixed order. ``threads``: torch CPU threads (a Ray task on a
    CPU-only cluster gets the driver's count: float sums depend on it, so cells stay bit-identical). ``verbose``:
    print a line as each cell starts (when no progress bar shows it)."""
    import torch

    from .backbone import load_backbone_from_config
    from .data import few_shot, load_dataset
    from .features import FeatureStore

    if threads is not None:
        torch.set_num_threads(threads)
    load_plugins(plugins)
    variants = identity["variants"]
    configs = {name: apply_settings(config, v["settings"]) for name, v in variants.items()}
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(configs[cell.method].backbone.__repr__(), []).append(cell)
    records = []
    for group in groups.values():
        base = configs[group[0].method]
        same = backbone is not None and base.backbone == config.backbone
        model = backbone if same else load_backbone_from_config(base, fallback_to_random=True)
        for category in dict.fromkeys(cell.category for cell in group):
            dataset = load_dataset(identity["dataset"], root=root, category=category)
            store = FeatureStore(model, base.score.batch_size)
            radius = base.score.locality_radius
            store.features(dataset.test, None, radius)  # fixed order: test set, then the largest draw
            store.features(dataset.train, few_shot(dataset.train, max(identity["shots"])), radius)
            for cell in (c for c in group if c.category == category):
                if verbose:
                    print(f"[{category}] {cell.key}: {len(dataset.train)} train / {len(dataset.test)} test images",
                          flush=True)
                record = _run_cell(model, dataset, configs[cell.method], variants[cell.method]["kind"], cell, store,
                                   identity, folder if artefacts else None)
                if on_record is not None:
                    on_record(record)
                records.append(record)
    return records


def _run_cell(backbone, dataset, config: APTConfig, kind: str, cell: Cell, store, identity: dict,
              folder: Path | None) -> dict:
    """One cell: run it, save its artefacts (when ``folder``), and return its record."""
    from .pipeline import run_category, save_cell_artefacts

    start = time.perf_counter()
    result = run_category(backbone, dataset, config, k=cell.shots or None, seed=cell.seed, method=kind,
                          store=store, progress=False)
    if result.tuned is not None and result.tuned.interrupted:
        raise KeyboardInterrupt(f"tuning of {cell.key} was interrupted; the cell is not recorded")
    saved = save_cell_artefacts(folder, cell.key, result, dataset, config, backbone) if folder is not None else []
    return {"run": run_id(identity), "key": cell.key, "category": cell.category, "shots": cell.shots,
            "seed": cell.seed, "method": cell.method, "metrics": result.metrics, "artefacts": saved,
            "timings": {**{k: round(v, 3) for k, v in result.timings.items()},
                        "cell_s": round(time.perf_counter() - start, 3)},
            "shot_indices": result.shots, "n_test": int(result.labels.numel()),
            "n_anomalous": int(result.labels.sum()), "eval_resolution": backbone.image_size,
            "pretrained": bool(backbone.pretrained_loaded)}


def _run_on_ray(config, identity, root, todo: list[Cell], store: RunStore, address, workers, plugins, artefacts,
                progress) -> None:
    from .cluster import ray_session

    with ray_session(address, workers) as ray:
        import torch

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        threads = None if gpus else torch.get_num_threads()
        task = ray.remote(num_gpus=gpus, num_cpus=1)(run_cells)
        by_category: dict[str, list[Cell]] = {}
        for cell in todo:
            by_category.setdefault(cell.category, []).append(cell)
        pending = [task.remote(APTConfig.from_dict(config.to_dict()), identity, root, cells,
                               store.folder if artefacts else None, None, artefacts, threads, list(plugins))
                   for cells in by_category.values()]
        with _bar(len(todo), progress) as bar:
            while pending:  # a category's cells land in cells.jsonl as soon as its task returns
                ready, pending = ray.wait(pending, num_returns=1)
                for record in ray.get(ready[0]):
                    store.append(record)
                    bar.update(1)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cells", disable=not enabled or total == 0)


def run_experiment(dataset_name: str, config: APTConfig, categories: Sequence[str] | None = None, root=None,
                   k: int | None = None, seed: int | None = None, method: str = "apt", out: str | Path = "runs",
                   name: str | None = None, **options) -> Path:
    """One run — ``method`` with k shots and one seed on every category — into ``<out>/<name>/``, keeping each
    category's prompts and example maps for the report: the sweep of one (shots, seed, method). ``options`` as in
    :func:`run_sweep` (overwrite, repair, progress, backbone, ...). The default name is
    ``<dataset>-<config name>-<method>-k<k>-s<seed>``.

    Example:
        >>> run_name("demo", APTConfig.preset("quick"))
        'demo-quick-apt-k2-s0'
    """
    from .pipeline import with_shots

    config = with_shots(config, k, seed)
    return run_sweep(dataset_name, config, root=root, categories=categories, shots=(config.train.k_shot,),
                     seeds=(config.train.seed,), methods=(method,), out=out,
                     name=name or run_name(dataset_name, config, method), artefacts=True, **options)


def run_name(dataset_name: str, config: APTConfig, method: str = "apt") -> str:
    """The default folder name of a run."""
    return check_name(f"{dataset_name}-{config.name}-{method}-k{config.train.k_shot}-s{config.train.seed}",
                      "run name")
