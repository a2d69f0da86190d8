"""severity — how detection changes with the strength of an anomaly, and the false-positive rate that comes with it.

The APT paper leaves open how detection varies with the level of the noise perturbation and the severity of
anomalies, and names a failure signature: prompts that overfit to noise show high false-positive rates on normal
images. This experiment measures both, per category::

    train split ─ few_shot(train, k) ──────────────────────► k shots ─► tune_prompts (once)
               └ every other train image, seeded shuffle ─┬► calibration half ─► threshold (apt_lab.thresholds)
                 (at most ``held_out`` of them)            └► evaluation half: clean (negatives) and, for each kind
                                                              and strength s, perturbed with (s, s) (positives)
    test split ─ per defect type: its images (positives) vs the test normals (negatives), the same threshold

One row per (kind, strength) and per real defect type (kind ``"test:<defect>"``, strength None): image AUROC,
pixel AUROC (masks from the perturbation, or the ground truth), and at the threshold the false-positive rate on
normal images (the held-out evaluation normals; the test normals for test rows) and the detection rate of the
anomalous ones. No test image is used to choose anything.

**Strength** is what the generator takes (``config.perturb.strength`` becomes ``(s, s)``): the Gaussian's pixel std,
the blend weight towards uniform noise, the salt-and-pepper fraction. Strength 0 leaves every image unchanged for
the built-ins, so the detector cannot tell the two sets apart: image AUROC is exactly 0.5 (an unchanged image reuses
its clean score — the score of an image depends only on its pixels). Every (kind, strength) row uses the same seed,
so its anomalies sit in the same regions of the same images: the rows of a curve differ only in the noise.

**Threshold** (``threshold=``): ``"quantile"`` (default) —
:func:`apt_lab.thresholds.pixel_threshold` (a linear-interpolation quantile of any values) at ``1 − target_fpr`` of
the calibration normals' image scores, normal images only; the evaluation FPR then estimates ``target_fpr`` and the
detection rate is the number to read. ``"f1"`` — :func:`apt_lab.thresholds.choose_thresholds`' image threshold
(best F1 between the calibration normals and their CFG copies, made as in training): the threshold APT itself
would deploy, whose FPR on normal images shows noise overfitting.

Example (apt-tiny with random weights, 2 tuning steps):
    >>> import apt_lab
    >>> from apt_lab.config import APTConfig
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> data = apt_lab.data.load_dataset("demo", category="brick")          # 8 train images: 2 shots, 3 + 3 held out
    >>> result = severity(b, data, APTConfig.preset("quick", train__steps=2), [0, 1.0], kinds=["gaussian"])
    >>> [(r["kind"], r["strength"], r["n_normal"], r["n_anomalous"]) for r in result.rows][:3]
    [('gaussian', 0.0, 3, 3), ('gaussian', 1.0, 3, 3), ('test:hole', None, 6, 2)]
    >>> result.rows[0]["image_auroc"]                                      # strength 0: nothing changed, chance
    0.5
"""
from __future__ import annotations

import csv
import html
import io
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from . import metrics
from .backbone import Backbone, load_backbone_from_config
from .config import APTConfig
from .data import Dataset, few_shot, list_categories, load_dataset
from .data.files import atomic_write, check_name, make_folder, write_if_changed
from .features import FeatureStore
from .pipeline import with_shots
from .perturbations import list_perturbations, perturb
from .roi import region_of_interest
from .scoring import build_memory, score
from .thresholds import choose_thresholds, pixel_threshold
from .tuning import tune_prompts

COLUMNS = ("category", "kind", "strength", "image_auroc", "pixel_auroc", "fpr_at_threshold", "tpr_at_threshold",
           "threshold", "n_normal", "n_anomalous")
THRESHOLDS = ("quantile", "f1")
PLOTTED = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "fpr_at_threshold": "false-pos. rate",
           "tpr_at_threshold": "detection rate"}  # what the report plots, and its titles


@dataclass
class SeverityResult:
    """What :func:`severity` returns (one category) or :func:`run_severity` writes (several, merged).

    Attributes:
        rows: one dict per (category, kind, strength), keys :data:`COLUMNS`; strength None for ``test:`` rows.
        scores: (category, kind, strength) → (normal (n,), anomalous (m,)) float32 image scores of that row.
        thresholds: category → the image threshold; calibration_scores: category → (c,) the scores it came from.
        settings: what was run (dataset, backbone, k, seed, threshold rule, the train indices of shots, calibration
            and evaluation images per category, seconds).
    """

    rows: list[dict] = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    calibration_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @staticmethod
    def merge(results: Sequence["SeverityResult"]) -> "SeverityResult":
        """Several categories' results as one (settings: the first one's, with every category's entry)."""
        if not results:
            return SeverityResult()
        out = SeverityResult(settings={**results[0].settings, "categories": {}})
        for result in results:
            out.rows += result.rows
            out.scores.update(result.scores)
            out.thresholds.update(result.thresholds)
            out.calibration_scores.update(result.calibration_scores)
            out.settings["categories"].update(result.settings.get("categories", {}))
        return out


# ------------------------------------------------------------------------------------------------ checks
def check_request(strengths, kinds=None, threshold: str = "quantile", target_fpr: float = 0.05,
                  held_out: int | None = None) -> tuple[tuple[float, ...], list[str]]:
    """Validated ``(strengths ascending without repeats, kinds)``; ValueError naming the argument otherwise.

    Example:
        >>> check_request([1.0, 0, 0.5], kinds="gaussian")
        ((0.0, 0.5, 1.0), ['gaussian'])
    """
    if isinstance(strengths, (str, bytes)) or not hasattr(strengths, "__iter__"):
        raise ValueError(f"strengths={strengths!r}: expected a list of numbers ≥ 0, e.g. [0, 0.1, 0.5, 1.0]")
    values = list(strengths)
    if not values:
        raise ValueError("strengths is empty: give at least one strength ≥ 0, e.g. [0, 0.1, 0.5, 1.0]")
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s < 0]
    if bad:
        raise ValueError(f"strengths={values}: {bad} not a finite number ≥ 0 (strength is what the generator takes: "
                         "the Gaussian's std, the uniform blend weight, the salt-and-pepper fraction; 0 = unchanged)")
    pixel, registered = list_perturbations("pixel"), list_perturbations()
    names = pixel if kinds is None else [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [n for n in names if n not in registered]
    feature = [n for n in names if n in registered and n not in pixel]
    if not names or unknown or feature:
        problem = ("is empty" if not names else f"names unknown perturbation(s) {unknown}" if unknown
                   else f"names feature-space perturbation(s) {feature}, which change features, not pixels")
        raise ValueError(f"kinds={names} {problem}; the pixel-space kinds registered are {pixel} (None = all)")
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold={threshold!r}; choose one of {THRESHOLDS}")
    if isinstance(target_fpr, bool) or not isinstance(target_fpr, numbers.Real) or not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr={target_fpr!r}: must lie in (0, 1), e.g. 0.05")
    if held_out is not None and (isinstance(held_out, bool) or not isinstance(held_out, numbers.Integral)
                             or held_out < 2):
        raise ValueError(f"held_out={held_out!r}: must be None (every non-shot train image) or an int ≥ 2 (one half "
                         "calibrates the threshold, the other is evaluated)")
    return tuple(sorted({float(s) for s in values})), list(dict.fromkeys(names))


def split_held_out(dataset: Dataset, k: int, seed: int, held_out: int | None = None
                   ) -> tuple[list[int], list[int], list[int]]:
    """(shots, calibration, evaluation) train indices: the fixed k-shot draw, then the other train images in a
    seeded order (the first ``held_out`` of them), split into halves (calibration gets the odd one).

    Example:
        >>> shots, calibration, evaluation = split_held_out(load_dataset("demo", category="brick"), k=2, seed=0)
        >>> len(shots), len(calibration), len(evaluation), sorted(shots + calibration + evaluation) == list(range(8))
        (2, 3, 3, True)
    """
    train = dataset.train
    shots = few_shot(train, k)
    rest = [i for i in range(len(train)) if i not in set(shots)]
    if len(rest) < 2:
        raise ValueError(f"{dataset.name}/{dataset.category}: {len(train)} train images and k={k} shots leave "
                         f"{len(rest)} held-out normal image(s); the severity experiment needs at least 2 (one to "
                         f"calibrate the threshold, one to evaluate). Use k ≤ {len(train) - 2} or add train images.")
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    rest = [rest[i] for i in order][:held_out]
    half = (len(rest) + 1) // 2
    return list(shots), sorted(rest[:half]), sorted(rest[half:])


# ------------------------------------------------------------------------------------------ the experiment
def severity(backbone: Backbone, dataset: Dataset, config: APTConfig, strengths: Sequence[float],
             kinds: Sequence[str] | None = None, k: int | None = None, seed: int | None = None,
             held_out: int | None = None, threshold: str = "quantile", target_fpr: float = 0.05,
             store: FeatureStore | None = None, progress: bool = False) -> SeverityResult:
    """Tune once on ``dataset`` (one category), then measure detection against strength (see the module docstring).

    Args:
        strengths: what the generators take, each ≥ 0 (sorted, repeats dropped); 0 = unchanged images.
        kinds: registered pixel-space perturbations; None = all of them (``list_perturbations("pixel")``).
        k: shots, overriding ``config.train.k_shot``.
        seed: overriding ``config.train.seed``; it also draws the held-out split and the perturbations.
        held_out: at most this many non-shot train images (a seeded draw); None = all.
        threshold: ``"quantile"`` (1 − ``target_fpr`` quantile of calibration normal scores) or ``"f1"``.
        store: features of this category's images (a run's store: nothing is encoded twice).
    """
    strengths, kinds = check_request(strengths, kinds, threshold, target_fpr, held_out)
    config = with_shots(config, k, seed)
    k, seed, radius = config.train.k_shot, config.train.seed, config.score.locality_radius
    shots, calibration, evaluation = split_held_out(dataset, k, seed, held_out)
    store = store or FeatureStore(backbone, config.score.batch_size)
    category, start = dataset.category, time.perf_counter()

    tuned = tune_prompts(backbone, store.images(dataset.train, shots).to(backbone.device), config, progress=progress,
                         shot_features=store.features(dataset.train, shots, radius))  # the store's: no second pass
    if tuned.interrupted:
        raise KeyboardInterrupt(f"tuning of {category} was interrupted; nothing was measured")
    prompts, tune_s = tuned.prompts, time.perf_counter() - start
    memory = build_memory(backbone, store.features(dataset.train, shots, radius), config) if config.score.memory \
        else None

    def scored(images):  # pixels (B, 3, S, S) or features → image scores (B,), maps (B, S, S), float32 on the CPU
        out = score(backbone, prompts, images, config, memory=memory)
        return out.image_scores, out.anomaly_maps

    start = time.perf_counter()
    if threshold == "quantile":
        calibration_scores = scored(store.features(dataset.train, calibration, radius))[0]  # (c,)
        cut = pixel_threshold(calibration_scores, 1 - target_fpr)
    else:  # "f1": calibration normals vs their CFG copies made as in training, seeded
        chosen = choose_thresholds(backbone, prompts, store.images(dataset.train, calibration).to(backbone.device),
                                   config, torch.Generator().manual_seed(seed))
        calibration_scores, cut = chosen.normal_scores.image_scores, chosen.image
    result = SeverityResult(thresholds={category: cut}, calibration_scores={category: calibration_scores})

    def add(kind, strength, normal, anomalous, maps, masks):
        """One row: normal (n,) / anomalous (m,) image scores; maps (n+m, S, S) and bool masks, or None."""
        labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))])  # (n+m,)
        both = len(normal) and len(anomalous)
        result.rows.append({
            "category": category, "kind": kind, "strength": strength,
            "image_auroc": metrics.image_auroc(torch.cat([normal, anomalous]), labels) if both else None,
            "pixel_auroc": metrics.pixel_auroc(maps, masks) if masks is not None and masks.any() else None,
            "fpr_at_threshold": float((normal >= cut).float().mean()) if len(normal) else None,
            "tpr_at_threshold": float((anomalous >= cut).float().mean()), "threshold": cut,
            "n_normal": len(normal), "n_anomalous": len(anomalous)})
        result.scores[(category, kind, strength)] = (normal, anomalous)

    pixels = store.images(dataset.train, evaluation).to(backbone.device)  # (n, 3, S, S)
    features = store.features(dataset.train, evaluation, radius)
    clean, clean_maps = scored(features)  # (n,), (n, S, S)
    roi = region_of_interest(backbone, pixels, config, features=features if radius == 0 else None)  # (n, S, S)
    for kind in kinds:
        for strength in strengths:
            cfg = config.replace(perturb__generators=(kind,), perturb__strength=(strength, strength))
            out = perturb(pixels, cfg, torch.Generator().manual_seed(seed), roi=roi, backbone=backbone)
            changed = (out.images != pixels).flatten(1).any(1).cpu()  # (n,) an unchanged image keeps its clean score
            anomalous, maps = clean.clone(), clean_maps.clone()  # (n,), (n, S, S)
            if changed.any():
                anomalous[changed], maps[changed] = scored(out.images[changed.to(pixels.device)])
            masks = torch.cat([torch.zeros_like(out.masks), out.masks]).cpu()  # (2n, S, S) clean first
            add(kind, strength, clean, anomalous, torch.cat([clean_maps, maps]), masks)

    test = dataset.test
    labels = test.labels  # (T,)
    if bool((labels == 1).any()):  # the real defect types, where the dataset has them
        test_scores, test_maps = scored(store.features(test, None, radius))  # (T,), (T, S, S)
        test_masks = test.masks(backbone.image_size)  # (T, S, S) bool, or None without masks
        normal = labels == 0  # (T,)
        for defect in sorted({d for d, label in zip(test.defects, labels.tolist()) if label == 1}):
            rows = normal | (torch.tensor([d == defect for d in test.defects], device=labels.device) & (labels == 1))  # (T,)
            add(f"test:{defect}", None, test_scores[normal], test_scores[rows & ~normal], test_maps[rows],
                None if test_masks is None else test_masks[rows])
    result.settings = {
        "dataset": dataset.name, "backbone": backbone.name, "pretrained": bool(backbone.pretrained_loaded),
        "image_size": backbone.image_size, "config": config.name, "k": k, "seed": seed, "threshold": threshold,
        "target_fpr": target_fpr if threshold == "quantile" else None, "kinds": kinds, "strengths": list(strengths),
        "categories": {category: {"shots": shots, "calibration": calibration, "evaluation": evaluation,
                                  "tune_s": round(tune_s, 3), "score_s": round(time.perf_counter() - start, 3)}}}
    return result


def run_severity(dataset_name: str, config: APTConfig, strengths: Sequence[float], kinds: Sequence[str] | None = None,
                 categories: Sequence[str] | None = None, root: str | None = None, k: int | None = None,
                 seed: int | None = None, out: str | Path = "runs", name: str | None = None,
                 held_out: int | None = None, threshold: str = "quantile", target_fpr: float = 0.05,
                 backbone: Backbone | None = None, progress: bool = False) -> Path:
    """:func:`severity` on every category of a dataset, written to ``<out>/<name>/`` (:func:`write_severity`).

    Everything is checked before the backbone loads: strengths, kinds, threshold, the config, each category's
    files and that k shots leave at least 2 held-out train images. The default name is
    ``<dataset>-<config name>-severity-k<k>-s<seed>``. The files are rewritten after every category (an interrupted
    run keeps the finished categories; it does not resume). Returns the folder.
    """
    check_request(strengths, kinds, threshold, target_fpr, held_out)
    config = with_shots(config, k, seed)
    names = [check_name(c) for c in dict.fromkeys(categories or list_categories(dataset_name, root))]
    datasets = [load_dataset(dataset_name, root=root, category=c) for c in names]
    for dataset in datasets:
        split_held_out(dataset, config.train.k_shot, config.train.seed, held_out)  # enough held-out images?
        if bool((dataset.test.labels == 1).any()) and bool((dataset.test.labels == 0).any()):
            dataset.check(config.train.k_shot)  # mask sizes, before any tuning
    folder = Path(out) / check_name(
        name or f"{dataset_name}-{config.name}-severity-k{config.train.k_shot}-s{config.train.seed}", "run name")
    backbone = backbone or load_backbone_from_config(config, fallback_to_random=True)
    results = []
    for dataset in datasets:
        if progress:
            print(f"[{dataset.category}] severity: {len(dataset.train)} train / {len(dataset.test)} test images",
                  flush=True)
        store = FeatureStore(backbone, config.score.batch_size)  # this category's features, encoded once
        results.append(severity(backbone, dataset, config, strengths, kinds, held_out=held_out, threshold=threshold,
                                target_fpr=target_fpr, store=store, progress=progress))
        write_severity(folder, SeverityResult.merge(results))  # after every category: Ctrl-C keeps the finished ones
    return folder


# -------------------------------------------------------------------------------------------------- files
def severity_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV text, columns :data:`COLUMNS`, numbers with 6 decimals, empty for None."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([metrics.format_metric(row[c], 6) for c in COLUMNS])
    return buffer.getvalue()


def severity_figure(rows: Sequence[dict], plotted: dict[str, str] = PLOTTED):
    """Each metric against strength, one line per kind, one row of panels per category; the mean over the real
    test defect types (where there are any) as a dashed grey line."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    categories = list(dict.fromkeys(r["category"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows if r["strength"] is not None))
    strengths = [r["strength"] for r in rows if r["strength"] is not None] or [0.0]
    fig = make_subplots(rows=len(categories), cols=len(plotted), shared_xaxes=True,
                        vertical_spacing=0.3 / len(categories),
                        subplot_titles=[f"{c}<br>{title}" for c in categories for title in plotted.values()])
    fig.update_annotations(font_size=13)  # two short lines per panel title: they fit four panels at 700 px
    for i, category in enumerate(categories):
        for j, metric in enumerate(plotted):
            place = dict(row=i + 1, col=j + 1)
            for n, kind in enumerate(kinds):
                points = sorted((r["strength"], r[metric]) for r in rows if r["category"] == category
                                and r["kind"] == kind and r[metric] is not None)
                fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                         name=kind, legendgroup=kind, showlegend=i == 0 and j == 0,
                                         line=dict(color=qualitative.Plotly[n % len(qualitative.Plotly)])), **place)
            real = [r[metric] for r in rows if r["category"] == category and r["strength"] is None
                    and r[metric] is not None]
            if real:
                fig.add_trace(go.Scatter(x=[min(strengths), max(strengths)], y=[sum(real) / len(real)] * 2,
                                         mode="lines", name="test defects (mean)", legendgroup="test",
                                         showlegend=i == 0 and j == 0, line=dict(color="grey", dash="dash")), **place)
    fig.update_yaxes(range=[-0.03, 1.03])
    fig.update_xaxes(title_text="strength", row=len(categories))
    fig.update_layout(height=240 * len(categories) + 120, margin=dict(t=60, b=40))
    return fig


def write_severity(folder: str | Path, result: SeverityResult) -> Path:
    """``severity.csv`` and ``severity.html`` (the plot and the table; plotly.js beside it, so it opens offline)
    into ``folder``, each through a temporary file and an atomic rename, never through a link. Returns the folder."""
    from plotly.offline import get_plotlyjs

    folder = make_folder(folder)
    text = severity_csv(result.rows)
    atomic_write("severity.csv", lambda tmp: tmp.write_text(text), folder)
    s = result.settings
    rule = (f"the {1 - s['target_fpr']:g} quantile of the calibration normals' image scores" if s.get("threshold") ==
            "quantile" else "best F1 between calibration normals and their CFG copies")
    parts = [f"<h1>Severity: {html.escape(str(s.get('dataset')))}</h1>",
             f"<p>Backbone <b>{html.escape(str(s.get('backbone')))}</b>, config {html.escape(str(s.get('config')))}, "
             f"k = {s.get('k')} shots, seed {s.get('seed')}. Threshold: {rule}, chosen without the test set. "
             "Synthetic rows: held-out normal train images, clean vs perturbed; <code>test:</code> rows: the real "
             "defect types vs the test normals. Strength 0 leaves the images unchanged (image AUROC 0.5).</p>"]
    if not s.get("pretrained", True):
        parts.append("<p class='warn'>RANDOM weights: these numbers measure the pipeline, not APT's accuracy.</p>")
    parts.append(severity_figure(result.rows).to_html(full_html=False, include_plotlyjs="directory",
                                                      div_id="severity"))
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(metrics.format_metric(r[c], 4))}</td>" for c in COLUMNS)
                   + "</tr>" for r in result.rows)
    parts.append(f"<table><tr>{head}</tr>{body}</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>apt_lab severity</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}.warn{background:#fee;border:2px solid #c00;"
            "padding:1em;font-weight:bold}</style></head><body>" + "\n".join(parts) + "</body></html>")
    atomic_write("severity.html", lambda tmp: tmp.write_text(page), folder)
    write_if_changed("plotly.min.js", get_plotlyjs(), folder)
    return folder
