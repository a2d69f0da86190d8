"""Running a plan of cells into a run folder, locally or on a Ray cluster: ``run_sweep(Plan(...))``.

A :class:`Plan` names cells — categories × shots × seeds × variants (and, for the severity experiment, rows of
perturbation × strength) — of one dataset under one config. Each cell's identity is what it computes
(:mod:`apt_lab.store`): its category's file fingerprint, shots and few-shot draw, seed, its variant's resolved config
without where-it-runs settings, and the source of any plugin perturbation it uses. A cell already in the folder
with the same identity is reused; the rest run, each appended to ``cells.jsonl`` as it finishes. So a rerun resumes
(on another device, through another path to the same files), one more seed or variant extends, and a changed
computation under an existing cell's name is refused naming what differs (``overwrite=True`` replaces those cells).

Methods: ``apt`` (APT with SMGS), ``no-smgs`` (λ = 0), ``human`` (WinCLIP's human prompts: zero-shot, one cell per
category), named ablation variants, or any registered pixel perturbation (APT trained on that scheme alone), e.g.
your own ``@register_perturbation("stripes")`` loaded with ``plugins=("my_noise.py",)``. Each becomes a *variant*: a
method (``apt`` learned prompts or ``human`` prompts) and the config settings it changes.

Example:
    >>> resolve_variants(("apt", "no-smgs", "human", "gaussian"), APTConfig.preset("quick"))["no-smgs"]
    {'method': 'apt', 'settings': {'smgs.lam': 0.0}, 'zero_shot': False}
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ._version import __version__
from .config import APTConfig
from .data.files import Folder, check_name
from .store import (
    CELLS_FILE,
    RUN_FILE,
    Cell,
    RunStore,
    cell_id,
    differences,
    plan,
    same_computation_note,
)

BUILTIN_METHODS = ("apt", "no-smgs", "human")  # the default methods of a sweep
MAX_VARIANTS = 64  # --vary's product of values at most this (a typo like 6 keys × 10 values is 10⁶ variants)
CELL_SET = {"train.seed": "--seeds (seeds=)", "train.k_shot": "--shots (shots=)"}  # set by each cell, not varied
RUNTIME = ("name", "backbone.device", "score.batch_size", "prompts.truncate")  # where/how fast it runs: not identity
NEUTRAL = {"train.draw": "fixed"}  # fields added since cells were first keyed, at the value that computes what cells
#   without them computed: left out of the identity there, so a release that adds a field resumes earlier folders
UNUSED_BY_HUMAN = ("perturb", "prompts", "smgs", "train")  # config sections human prompts never read


@dataclass(frozen=True)
class Severity:
    """The severity experiment's settings (:mod:`apt_lab.severity`): rows of perturbation × strength per cell."""

    strengths: tuple[float, ...]  # what the generators take, each finite ≥ 0; 0 leaves images unchanged
    perturbations: tuple[str, ...] | None = None  # registered pixel perturbations; None = every one
    threshold: str = "quantile"  # "quantile" (1 − target_fpr of calibration normals) or "f1"
    target_fpr: float = 0.05  # in (0, 1), for threshold "quantile"
    held_out: int | None = None  # at most this many held-out normal train images (≥ 2); None = all
    tune_on: str = "mix"  # "mix": prompts tuned on the config's perturb.generators, once per unit; "kind": each
    #                       perturbation row's prompts tuned on that kind alone (test rows keep the mix)
    test_share: float = 0.5  # in [0, 1): this share of the test normals (seeded) joins the evaluation normals;
    #                          the test rows keep the rest as their negatives (0 = evaluation from train only)


@dataclass(frozen=True)
class Plan:
    """Which cells a command wants: the product of its lists, of one dataset, under one config."""

    dataset: str  # "mvtec", "visa", "btad", "mpdd", "folder" or "demo"
    config: APTConfig  # the base config every variant changes
    root: str | None = None  # dataset folder; None = $APT_LAB_DATA/<dataset> (the package's own for demo)
    categories: tuple[str, ...] | None = None  # None = every category
    shots: tuple[int, ...] = (1, 2, 4)  # shot counts (repeats count once)
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds (repeats count once)
    methods: tuple[str, ...] = BUILTIN_METHODS  # named variants or registered pixel perturbations
    vary: Mapping[str, Sequence] = field(default_factory=dict)  # dotted config name → values: every method × product
    ablation: str | None = None  # a name in ABLATIONS, used instead of methods
    reference: str | None = None  # the variant others are compared with, paired; None = apt, else the first tuned
    plugins: tuple[str, ...] = ()  # .py files or module names registering perturbations, imported first
    artefacts: bool = False  # keep each cell's prompts and example maps (what the report draws)
    severity: Severity | None = None  # set: the severity experiment instead of the benchmark


@dataclass(frozen=True)
class Ray:
    """Run categories as Ray tasks (one GPU each when the cluster has GPUs)."""

    address: str | None = None  # an existing cluster; None = a local Ray instance
    workers: int | None = None  # the local instance's CPUs


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


def code_of(names: Iterable[str]) -> dict[str, str]:
    """perturbation name → SHA-256 of the source it runs, for every name not built into apt_lab (the file of a
    plugin, else the function's own source): a cell that used an edited plugin is never taken for the old one."""
    from .perturbations import get_perturbation

    out = {}
    for name in sorted(set(names)):
        fn = get_perturbation(name)
        if fn.__module__.startswith("apt_lab.") and not fn.__module__.startswith("apt_lab.plugin"):
            continue
        try:
            source = Path(inspect.getsourcefile(fn)).read_bytes()
        except (TypeError, OSError):
            try:
                source = inspect.getsource(fn).encode()
            except (TypeError, OSError):
                source = fn.__code__.co_code + repr(fn.__code__.co_consts).encode()
        out[name] = "sha256:" + hashlib.sha256(source).hexdigest()
    return out


NAMED_VARIANTS = {  # name → (method, settings by dotted config name): the paper's components switched on and off
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


def method_settings(name: str) -> tuple[str, dict]:
    """A name of ``--methods`` → (its method, ``apt`` or ``human``; the config settings it changes, by dotted name):
    a named variant (:data:`NAMED_VARIANTS`) or a registered pixel perturbation (APT trained on that scheme alone)."""
    if name in NAMED_VARIANTS:
        method, settings = NAMED_VARIANTS[name]
        return method, dict(settings)
    from .perturbations import list_perturbations

    if name in list_perturbations(space="pixel"):
        return "apt", {"perturb.generators": [name]}
    raise ValueError(f"unknown method {name!r}: use one of {list(NAMED_VARIANTS)} or a registered pixel "
                     f"perturbation {list_perturbations(space='pixel')} (load your own with --plugin file.py)")


def ablation_methods(name: str) -> tuple[str, ...]:
    """``--ablation NAME`` → its methods.

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


def parse_vary(texts: Sequence[str], config: APTConfig | None = None) -> dict[str, list]:
    """``["smgs.lam=0,0.5,1", "perturb.roi_method=text,pixels"]`` → ``{"smgs.lam": [0, 0.5, 1], ...}``: each value
    read as JSON where it is JSON (numbers, true/false, [lists]), else as a string. Refused (ValueError naming the
    text): a key given twice, a key each cell sets itself (train.seed, train.k_shot), a number that is not finite,
    more than :data:`MAX_VARIANTS` combinations, and — with ``config`` — any value the config's rules refuse.

    Example:
        >>> parse_vary(["smgs.lam=0,1", "perturb.strength=[0.1,0.2],[0.5,0.6]", "perturb.roi_method=text"])
        {'smgs.lam': [0, 1], 'perturb.strength': [[0.1, 0.2], [0.5, 0.6]], 'perturb.roi_method': ['text']}
    """
    out = {}
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--vary {text!r}: write KEY=V1,V2,... with a dotted config name, e.g. smgs.lam=0,1")
        if key in out:
            raise ValueError(f"--vary {key} is given twice; give all its values once: {key}=V1,V2,...")
        if key in CELL_SET:
            raise ValueError(f"--vary {key}: every cell sets its own {key}; use {CELL_SET[key]} instead")
        out[key] = [_value(part.strip(), text) for part in _split(values)]
    combinations = math.prod(len(v) for v in out.values())
    if combinations > MAX_VARIANTS:
        raise ValueError(f"--vary gives {combinations} combinations per method, more than {MAX_VARIANTS}; vary fewer "
                         "settings per sweep (several sweeps into one folder extend it), or raise "
                         "apt_lab.sweep.MAX_VARIANTS from Python")
    if config is not None:
        from .errors import ConfigError

        for key, values in out.items():
            for value in values:
                try:
                    apply_settings(config, {key: value})
                except ConfigError as error:
                    raise ConfigError(f"--vary {key}={json.dumps(value)}: {error}") from None
    return out


def _split(values: str) -> list[str]:
    """Split on commas outside [brackets]: ``"[0.1,0.2],[0.5,0.6]"`` → two values."""
    parts, depth, current = [], 0, ""
    for char in values:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def _value(text: str, whole: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
        raise ValueError(f"--vary {whole!r}: {text} is not a finite number")
    return value


def vary_variants(methods: Sequence[str], vary: Mapping[str, Sequence]) -> dict[str, tuple[str, dict]]:
    """Every method × every combination of the varied values (their product), as named variants. Human prompts,
    which never read a varied section (perturb, prompts, smgs, train), are kept once.

    Example:
        >>> list(vary_variants(["apt", "human"], {"smgs.lam": [0, 1]}))
        ['apt smgs.lam=0', 'apt smgs.lam=1', 'human']
    """
    combos = [dict(zip(vary, values)) for values in itertools.product(*vary.values())]
    out = {}
    for name in methods:
        method, settings = method_settings(name)
        if method == "human" and all(key.split(".")[0] in UNUSED_BY_HUMAN for key in vary):
            out[name] = (method, settings)
            continue
        for combo in combos:
            label = " ".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in combo.items())
            out[f"{name} {label}"] = (method, {**settings, **combo})
    return out


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
    """Every method — or, when given, every one of ``variants`` (name → (method, settings)) — as name → {method,
    settings, zero_shot}; each variant's config is built now, so a bad name or setting fails before anything runs.
    Zero-shot = human prompts without the shots' visual memory."""
    named = dict(variants) if variants else {m: method_settings(m) for m in dict.fromkeys(methods)}
    out = {}
    for name, (method, settings) in named.items():
        check_name(name, "method")
        cell_config = apply_settings(config, settings)
        out[name] = {"method": method, "settings": settings,
                     "zero_shot": method == "human" and not cell_config.score.memory}
    if not out:
        raise ValueError("no methods: name at least one (e.g. apt)")
    return out


def computation(config: APTConfig, method: str) -> dict:
    """The part of a config that decides a cell's numbers: every field but :data:`RUNTIME` and those at their
    :data:`NEUTRAL` value (and, for human prompts, the sections they never read).

    Example:
        >>> sorted(computation(APTConfig.preset("quick"), "human"))
        ['backbone', 'score']
    """
    data = config.to_dict()
    for dotted in (*RUNTIME, *NEUTRAL):
        *sections, leaf = dotted.split(".")
        target = data
        for section in sections:
            target = target[section]
        if dotted not in NEUTRAL or target.get(leaf) == NEUTRAL[dotted]:
            target.pop(leaf, None)
    return {k: v for k, v in data.items() if not (method == "human" and k in UNUSED_BY_HUMAN)}


def plan_variants(p: "Plan") -> dict[str, dict]:
    """The plan's variants, resolved (:func:`resolve_variants`): its ablation's or methods' names × its ``vary``."""
    methods = ablation_methods(p.ablation) if p.ablation else tuple(p.methods)
    return resolve_variants(methods, p.config, vary_variants(methods, p.vary) if p.vary else None)


# ------------------------------------------------------------------------------------------------- planning
@dataclass
class _Resolved:
    """A plan made concrete (no model loaded): its cells, what each computes, and the folder layout it asks for."""

    cells: list
    computes: dict
    layout: dict


def resolve(p: Plan) -> _Resolved:
    """Everything that needs no model, checked: methods, settings, names, every category's files and enough
    training images for the largest shot count (and the held-out images severity needs)."""
    from .pipeline import check_datasets, with_shots

    if not p.shots or not p.seeds:
        raise ValueError(f"shots={list(p.shots)}, seeds={list(p.seeds)}: give at least one of each")
    for k in p.shots:  # every shot count and seed is a valid config value (k ≥ 1, seed ≥ 0), checked now
        for seed in p.seeds:
            with_shots(p.config, k, seed)
    load_plugins(p.plugins)
    vary = dict(p.vary or {})
    bad = [key for key in vary if key in CELL_SET]
    if bad:
        raise ValueError(f"vary {bad[0]}: every cell sets its own; use {CELL_SET[bad[0]]} instead")
    variants = plan_variants(p)
    if p.reference is not None and p.reference not in variants:
        raise ValueError(f"reference {p.reference!r} is not one of this plan's variants {list(variants)}")
    datasets = check_datasets(p.dataset, p.categories, p.root, max(p.shots))
    layout = {"dataset": p.dataset, "experiment": "severity" if p.severity else "benchmark",
              "categories": list(datasets), "shots": sorted({int(k) for k in p.shots}),
              "seeds": sorted({int(s) for s in p.seeds}), "variants": variants, "vary": vary,
              **({"reference": p.reference} if p.reference is not None else {})}
    rows, spec = _severity_spec(p, datasets, layout) if p.severity else ([None], None)
    zero = [name for name, v in variants.items() if v["zero_shot"]]
    cells, computes = [], {}
    for category, dataset in datasets.items():
        fingerprint = dataset.fingerprint()
        defects = [(f"test:{d}", None) for d in sorted({d for d, label in zip(dataset.test.defects,
                                                                               dataset.test.labels.tolist()) if label})]
        for cell in plan([category], p.shots, p.seeds, list(variants), zero, rows + defects if spec else rows):
            computes[cell.key] = _computes(p, cell, dataset, fingerprint, variants[cell.variant], spec)
            cells.append(cell)
    return _Resolved(cells, computes, layout)


def _severity_spec(p: Plan, datasets: dict, layout: dict) -> tuple[list, dict]:
    """The severity experiment's rows (perturbation, strength) and the settings every cell's identity holds; the
    layout gets its perturbations and strengths. Each category must leave held-out images for every k."""
    from .severity import check_request, split_held_out

    s = p.severity
    strengths, kinds = check_request(s.strengths, s.perturbations, s.threshold, s.target_fpr, s.held_out,
                                     s.tune_on, s.test_share)
    layout["severity"] = {"perturbations": kinds, "strengths": list(strengths)}
    for dataset in datasets.values():
        for k in p.shots:
            split_held_out(dataset, k, 0, s.held_out)  # enough held-out images for every k?
    spec = {"threshold": s.threshold, "held_out": s.held_out, "tune_on": s.tune_on, "test_share": s.test_share,
            "target_fpr": s.target_fpr if s.threshold == "quantile" else None}
    return [(kind, strength) for kind in kinds for strength in strengths], spec


def _computes(p: Plan, cell: Cell, dataset, fingerprint: str, variant: dict, spec: dict | None) -> dict:
    """What ``cell`` computes — its identity (see the module docstring), as it reads back from JSON."""
    from .data import few_shot
    from .pipeline import with_shots

    config = with_shots(apply_settings(p.config, variant["settings"]), cell.shots or None, cell.seed)
    seeded = cell.seed if config.train.draw == "seed" else None
    out = {"dataset": p.dataset, "category": cell.category, "files": fingerprint, "shots": cell.shots,
           "draw": few_shot(dataset.train, cell.shots, seed=seeded) if cell.shots else [], "seed": cell.seed,
           "variant": cell.variant, "method": variant["method"], "config": computation(config, variant["method"]),
           "code": code_of(config.perturb.generators) if variant["method"] == "apt" else {}}
    if spec:
        from .severity import tuning_generators

        measured = cell.row[1] is not None  # a perturbation row (else a real defect type of the test set)
        out.update(row=list(cell.row), row_code=code_of([cell.row[0]]) if measured else {}, severity=spec,
                   tuned_with=list(tuning_generators(config.perturb.generators, spec["tune_on"], cell.row)))
    return _as_json(out)


def _as_json(value):
    """``value`` as it reads back from a JSON line (tuples become lists), so the two compare equal."""
    return json.loads(json.dumps(value))


def run_name(p: Plan) -> str:
    """The default folder name: ``<dataset>-<config name>-<method>-k<k>-s<seed>`` for one method, shot count and
    seed (a run), else ``sweep-<dataset>-<config name>`` (``severity-...`` for the severity experiment).

    Example:
        >>> run_name(Plan("demo", APTConfig.preset("quick"), shots=(2,), seeds=(0,), methods=("apt",)))
        'demo-quick-apt-k2-s0'
    """
    what = "severity" if p.severity else "sweep"
    if len(set(p.shots)) == 1 and len(set(p.seeds)) == 1 and len(p.methods) == 1 and not p.vary and not p.ablation:
        what = "severity" if p.severity else p.methods[0]
        return check_name(f"{p.dataset}-{p.config.name}-{what}-k{p.shots[0]}-s{p.seeds[0]}", "run name")
    return check_name(f"{what}-{p.dataset}-{p.config.name}", "run name")


VARIANT_FIELDS = ("method", "config", "code", "severity")  # one variant name in a folder: one computation
CATEGORY_FIELDS = ("files",)  # one category name in a folder: one set of files


def _shared(computes: dict, fields: Sequence[str]) -> dict:
    """The part of a cell's identity every cell of its variant (or category) shares: shots and seed left out."""
    out = {f: computes.get(f) for f in fields}
    train = (out.get("config") or {}).get("train")
    if train is not None:
        out["config"] = {**out["config"], "train": {k: v for k, v in train.items() if k not in ("k_shot", "seed")}}
    return out


def _conflicts(existing: dict, resolved: _Resolved) -> tuple[list[str], set[str]]:
    """What the plan would compute differently from the folder's cells: (lines naming the differences, the keys
    of the stale cells). A cell of the same name, and every cell of the same variant (settings, plugin code) or
    category (files), must agree with the plan."""
    problems, stale = [], set()
    for cell in resolved.cells:
        old, new = existing.get(cell.key), resolved.computes[cell.key]
        if old is not None and old["id"] != cell_id(new):
            problems.append(f"{cell.key}: {'; '.join(differences(old['computes'], new)[:4])}")
            stale.add(cell.key)
    for attr, fields in (("variant", VARIANT_FIELDS), ("category", CATEGORY_FIELDS)):
        planned = {}
        for cell in resolved.cells:
            planned.setdefault(getattr(cell, attr), _shared(resolved.computes[cell.key], fields))
        for key, record in existing.items():
            new = planned.get(record[attr])
            differ = [] if new is None or key in stale else differences(_shared(record["computes"], fields), new)
            if differ:
                problems.append(f"{key}: {'; '.join(differ[:4])}")
                stale.add(key)
    return problems, stale


def _fallen_back(existing: dict, resolved: _Resolved) -> set[str]:
    """The planned cells that ran on random weights because their pretrained weights could not be had then, when
    they can be had now: recomputed, never reused (the weights a cell asked for are in its identity; whether it got
    them is known only once they load)."""
    from .weights import resolve_weights

    def wanted(key: str) -> tuple[str, str | None]:
        backbone = existing[key]["computes"]["config"]["backbone"]
        return backbone["name"], backbone.get("pretrained")

    fallen = [key for key in resolved.computes if key in existing and not existing[key]["pretrained"]
              and wanted(key)[1]]
    available = {}
    for key in fallen:
        if wanted(key) not in available:
            try:
                available[wanted(key)] = bool(resolve_weights(*wanted(key)))
            except Exception:  # still offline, or the tag went away: the random-weight cell stands (and says so)
                available[wanted(key)] = False
    now = {key for key in fallen if available[wanted(key)]}
    if now:
        print(f"{len(now)} cell(s) ran on random weights because the pretrained weights were unavailable then; "
              "they are available now, so those cells run again", flush=True)
    return now


def run_sweep(p: Plan, *, out: str | Path = "runs", name: str | None = None, overwrite: bool = False,
              repair: bool = False, progress: bool = True, executor: Ray | None = None, backbone=None) -> Path:
    """Run every cell of plan ``p`` that ``<out>/<name>/`` does not hold yet; returns the folder.

    Args:
        overwrite: replace the folder's cells that the plan would compute differently (their lines and artefacts)
            instead of refusing; every other cell stays.
        repair: move malformed or conflicting lines of cells.jsonl aside instead of refusing.
        progress: a progress bar over cells (False: one line per cell).
        executor: None runs here; :class:`Ray` spreads categories over a Ray cluster.
        backbone: an already loaded backbone for the base config (the command line loads it first).
    """
    resolved = resolve(p)
    path = Path(out) / check_name(name or run_name(p), "run name")
    created = not path.exists()
    with Folder(path, create=True) as folder:
        try:
            with folder.lock():  # one process per run folder; a dead holder's lock is taken over
                store = RunStore(folder)
                store.layout()  # another version's folder is refused before anything is written
                store.cut_partial_line()
                existing = store.cells(repair=repair)
                problems, stale = _conflicts(existing, resolved)
                if problems and not overwrite:
                    more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
                    raise _mismatch(path, problems[:5], more)
                store.claim(resolved.layout)
                stale |= _fallen_back(existing, resolved)
                if stale:
                    store.drop(stale)
                    existing = {k: v for k, v in existing.items() if k not in stale}
                todo = [cell for cell in resolved.cells if cell.key not in existing]
                print(f"{path}: {len(resolved.cells) - len(todo)} cells done, {len(todo)} to run"
                      f"{' on Ray' if executor else ''}", flush=True)
                with _bar(len(todo), progress) as bar:
                    def keep(record):
                        store.append(record)
                        bar.update(1)
                    if executor is None:
                        run_cells(p, todo, resolved.computes, path if p.artefacts else None, backbone=backbone,
                                  on_record=keep, verbose=not progress, folder=folder)
                    else:
                        _run_on_ray(p, todo, resolved.computes, path, executor, keep)
                note = same_computation_note(store.cells().values())
                if note:  # once per run, in words: a switch that did nothing must not read as "adds 0"
                    print(f"note: {note}", flush=True)
        except BaseException:
            if created:  # nothing finished: leave no folder behind
                with contextlib.suppress(Exception):
                    if not RunStore(folder).cells(strict=False):
                        folder.remove([RUN_FILE, CELLS_FILE])
                        os.rmdir(path)
            raise
    return path


def _mismatch(path, problems, more):
    from .errors import RunMismatchError

    return RunMismatchError(f"{path} holds cells that this plan would compute differently — {' | '.join(problems)}"
                            f"{more}. Reusing them would mix two computations under one name: run the same settings "
                            "as before, pass --overwrite to replace just those cells, or choose another --name.")


def environment(backbone, root) -> dict:
    """Where a cell runs (recorded on its line, never part of its id)."""
    import open_clip
    import torch

    return {"device": str(backbone.device), "host": socket.gethostname(), "root": str(root),
            "apt_lab": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def run_cells(p: Plan, cells: Sequence[Cell], computes: Mapping[str, dict], artefacts: Path | None = None,
              backbone=None, threads: int | None = None, on_record=None, verbose: bool = False,
              folder: Folder | None = None) -> list[dict]:
    """Run ``cells`` of plan ``p`` and return their records (``on_record`` gets each as it finishes). What a local
    sweep and each Ray task call. Cells are grouped by the backbone their variant needs (one load each;
    ``backbone`` serves the base config), then by category, with one FeatureStore per (backbone, category) whose
    test images and largest shot draw are encoded first, in a fixed order. ``threads``: torch CPU threads (a Ray
    task gets the driver's count: float sums depend on it, so cells stay bit-identical)."""
    import torch

    from .backbone import load_backbone_from_config
    from .data import dataset_root

    if threads is not None:
        torch.set_num_threads(threads)
    load_plugins(p.plugins)
    variants = plan_variants(p)
    configs = {name: apply_settings(p.config, v["settings"]) for name, v in variants.items()}
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(repr(configs[cell.variant].backbone), []).append(cell)
    records, root = [], dataset_root(p.dataset, p.root).expanduser().resolve()
    opened = folder or (Folder(artefacts) if artefacts is not None else None)

    def keep(record):
        if on_record is not None:
            on_record(record)
        records.append(record)
    try:
        for group in groups.values():
            base = configs[group[0].variant]
            same = backbone is not None and base.backbone == p.config.backbone
            model = backbone if same else load_backbone_from_config(base, fallback_to_random=True)
            for category in dict.fromkeys(cell.category for cell in group):
                _run_category(p, model, base, [c for c in group if c.category == category], computes, variants,
                              configs, opened if artefacts is not None else None, environment(model, root), keep,
                              verbose)
    finally:
        if opened is not None and folder is None:
            opened.close()
    return records


def _run_category(p: Plan, model, base: APTConfig, cells: list[Cell], computes, variants, configs, folder, where,
                  keep, verbose: bool) -> None:
    """One category's cells on one backbone: its test images and largest shot draw encoded first (a fixed order,
    charged to its first cell), then one tuning per (shots, seed, variant) unit; each record goes to ``keep``."""
    from .data import few_shot, load_dataset
    from .features import FeatureStore

    dataset = load_dataset(p.dataset, root=p.root, category=cells[0].category)
    store = FeatureStore(model, base.score.batch_size)
    radius, warm = base.score.locality_radius, time.perf_counter()
    store.features(dataset.test, None, radius)
    store.features(dataset.train, few_shot(dataset.train, max(p.shots)), radius)
    warm = time.perf_counter() - warm
    for unit in dict.fromkeys((c.shots, c.seed, c.variant) for c in cells):
        todo = [c for c in cells if (c.shots, c.seed, c.variant) == unit]
        if verbose:
            print(f"[{todo[0].category}] {todo[0].key}: {len(dataset.train)} train / {len(dataset.test)} test "
                  "images", flush=True)
        started = _now()
        for cell, record in _compute(p, model, dataset, configs[unit[2]], variants[unit[2]]["method"], todo, store,
                                     folder):
            record["timings"]["encode_s"] = round(record["timings"].get("encode_s", 0) + warm, 3)
            warm = 0.0
            record.update(key=cell.key, id=cell_id(computes[cell.key]), computes=computes[cell.key],
                          category=cell.category, shots=cell.shots, seed=cell.seed, variant=cell.variant,
                          eval_resolution=model.image_size, pretrained=bool(model.pretrained_loaded),
                          ran={**where, "started": started, "finished": _now()})
            started = _now()
            keep(record)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _compute(p: Plan, backbone, dataset, config: APTConfig, method: str, cells: list[Cell], store, folder):
    """(cell, record without its names) for each of ``cells`` — one (category, shots, seed, variant) unit, tuned
    once — as each is done."""
    from .pipeline import run_category, save_cell_artefacts

    if p.severity is not None:
        from .severity import severity_rows

        yield from severity_rows(backbone, dataset, config, p.severity, cells, store)
        return
    (cell,) = cells
    start = time.perf_counter()
    result = run_category(backbone, dataset, config, k=cell.shots or None, seed=cell.seed, method=method,
                          store=store, progress=False)
    if result.tuned is not None and result.tuned.interrupted:
        raise KeyboardInterrupt(f"tuning of {cell.key} was interrupted; the cell is not recorded")
    saved = save_cell_artefacts(folder, cell.folder, result, dataset, config, backbone) if folder else []
    yield cell, {"metrics": result.metrics, "artefacts": saved, "shot_indices": result.shots,
                 "timings": {**{k: round(v, 3) for k, v in result.timings.items()},
                             "cell_s": round(time.perf_counter() - start, 3)},
                 "n_test": int(result.labels.numel()), "n_anomalous": int(result.labels.sum()),
                 "image_scores": [round(float(v), 6) for v in result.image_scores],  # paired bootstraps read them
                 "labels": [int(v) for v in result.labels], **_tuning_facts(result.tuned, config)}


def _tuning_facts(tuned, config: APTConfig) -> dict:
    """What a tuned cell keeps of its tuning: the loss curve (at most 100 points), the fraction of the image its
    region of interest covered and the settings in effect (a region covering everything is the whole image)."""
    if tuned is None:
        return {}
    history = tuned.history
    stride = max(1, -(-len(history) // 100))
    curve = [[h["step"], round(h["loss"], 6)] for h in history[::stride]]
    if history and curve[-1][0] != history[-1]["step"]:
        curve.append([history[-1]["step"], round(history[-1]["loss"], 6)])
    whole = tuned.roi_coverage is not None and tuned.roi_coverage >= 1.0
    return {"loss_curve": curve, "roi_coverage": tuned.roi_coverage,
            "effective": {"perturb.region": "image" if whole else config.perturb.region,
                          "smgs.lam": config.smgs.lam, "perturb.generators": list(config.perturb.generators)}}


def _run_on_ray(p: Plan, todo: list[Cell], computes, path: Path, executor: Ray, keep) -> None:
    from .cluster import ray_session

    with ray_session(executor.address, executor.workers) as ray:
        import torch

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_gpus=gpus, num_cpus=1)(run_cells)
        by_category: dict[str, list[Cell]] = {}
        for cell in todo:
            by_category.setdefault(cell.category, []).append(cell)
        pending = [task.remote(p, cells, {c.key: computes[c.key] for c in cells},
                               artefacts=path if p.artefacts else None,
                               threads=None if gpus else torch.get_num_threads())
                   for cells in by_category.values()]
        while pending:  # a category's cells land in cells.jsonl as soon as its task returns
            ready, pending = ray.wait(pending, num_returns=1)
            for record in ray.get(ready[0]):
                keep(record)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cells", disable=not enabled or total == 0)
