"""severity — how detection changes with the strength of an anomaly, and the false-positive rate that comes with it.

The APT paper leaves open how detection varies with the level of the noise perturbation and the severity of
anomalies, and names a failure signature: prompts that overfit to noise show high false-positive rates on normal
images. This experiment measures both, per category, as cells of the run store (``run_sweep(Plan(...,
severity=Severity(...)))``, ``apt-lab severity``): one cell per (category, shots, seed, variant, row), a row being a
perturbation at a strength or a real defect type of the test set::

    train split ─ few_shot(train, k) ─────────────────────► k shots ─► prepare_prompts (once per unit and tuning mix)
               └ every other train image, seeded shuffle ─┬► calibration ─► threshold (apt_lab.thresholds)
                 (at most ``held_out`` of them)            └► evaluation ─┐
    test split ─ normal images, seeded shuffle ─┬► ``test_share`` of them ─┴► evaluation normals: clean (negatives)
                                                │                             and, per row, perturbed with (s, s)
                                                └► the rest ─► test rows: negatives against each defect type's images

**Which normal images go where** (the policy; every normal image has one role in a unit, so each rate is its own
binomial sample). *Calibration*: the first half (with the odd one) of the held-out train images — the train images
that are not shots, in a seeded order, at most ``held_out`` of them; these are the only images that choose the
threshold, so no test image chooses anything. *Evaluation*: the other half of the held-out train images plus a
seeded share ``test_share`` (default one half, rounded down, at most all but one) of the test set's *normal*
images; they are every synthetic row's negatives and, perturbed, its positives. *Test rows*: each real defect
type's images against the test normals not lent to evaluation. An anomalous test image is never used as a normal.
Each cell records every set: ``shot_indices``, ``calibration`` and ``evaluation`` (train indices),
``evaluation_test`` and ``test_normals`` (test indices). Fewer than :data:`MIN_NORMALS` calibration or evaluation
normals give a :class:`FewNormalsWarning` naming the category and the counts, once per unit: a rate measured on n
images moves in steps of 1/n. On the demo (8 train and 6 normal test images per category, 2 shots): 3 calibration,
6 evaluation (3 + 3) and 3 test-row normals — before this policy 3, 3 and 6.

A row gives image AUROC, pixel AUROC (masks from the perturbation, or the ground truth), and at the threshold the
false-positive rate on its normal images and the detection rate of its anomalous ones, each with a 95 % Wilson
interval (:func:`apt_lab.metrics.wilson_interval`; ``fpr_low``, ``fpr_high``, ``tpr_low``, ``tpr_high``, fractions).
Each row draws its noise from a generator seeded with the cell's seed, so a row's numbers do not depend on which
other rows run with it: other strengths extend a folder, and a resumed run gives the numbers of an uninterrupted one.

**Strength** is what the generator takes (``config.perturb.strength`` becomes ``(s, s)``): the Gaussian's pixel std,
the blend weight towards uniform noise, the salt-and-pepper fraction. Strength 0 leaves every image unchanged for
the built-ins, so image AUROC is exactly 0.5 (an unchanged image reuses its clean score).

**Tuning** (``tune_on``): ``"mix"`` (default) tunes the prompts once per unit on the config's
``perturb.generators``, so a kind outside the mix measures transfer to a scheme the prompts never trained on;
``"kind"`` tunes each perturbation's rows on that kind alone (``perturb.generators=(kind,)``: one tuning per kind,
its own threshold), and the test rows on the mix. Cells record what they were tuned with (``tuned_with``).

**Threshold**: ``"quantile"`` (default) — the ``1 − target_fpr`` quantile of the calibration normals' image scores
(:func:`apt_lab.thresholds.pixel_threshold`); the evaluation FPR then estimates ``target_fpr`` and the detection
rate is the number to read. ``"f1"`` — :func:`apt_lab.thresholds.choose_thresholds`' image threshold (best F1
between the calibration normals and their CFG copies): the threshold APT itself would deploy, whose FPR on normal
images shows noise overfitting.

Example (apt-tiny with random weights, 2 tuning steps):
    >>> import warnings
    >>> import apt_lab
    >>> from apt_lab.config import APTConfig
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> data = apt_lab.data.load_dataset("demo", category="brick")          # 8 train images, 6 normal test images
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", FewNormalsWarning)               # the demo has fewer than 20 normals
    ...     rows = severity(b, data, APTConfig.preset("quick", train__steps=2), [0, 1.0], kinds=["gaussian"])
    >>> [(r["row"], r["n_normal"], r["n_anomalous"]) for r in rows][:3]
    [(('gaussian', 0.0), 6, 6), (('gaussian', 1.0), 6, 6), (('test:hole', None), 3, 2)]
    >>> rows[0]["metrics"]["image_auroc"]                                   # strength 0: nothing changed, chance
    0.5
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Sequence

import torch

from . import metrics
from .backbone import Backbone, ImageFeatures
from .config import APTConfig
from .data import Dataset, few_shot
from .features import FeatureStore
from .perturbations import list_perturbations, perturb
from .pipeline import prepare_prompts, score_chunked, with_shots
from .roi import region_of_interest
from .store import Cell
from .thresholds import choose_thresholds, pixel_threshold

THRESHOLDS = ("quantile", "f1")
TUNE_ON = ("mix", "kind")  # Severity.tune_on: the config's perturbation mix, or each row's own kind
MIN_NORMALS = 20  # fewer calibration or evaluation normals than this: FewNormalsWarning (a rate moves in 1/n steps)


class FewNormalsWarning(UserWarning):
    """A severity unit has fewer than :data:`MIN_NORMALS` calibration or evaluation normal images."""


# ------------------------------------------------------------------------------------------------ checks
def check_request(strengths, kinds=None, threshold: str = "quantile", target_fpr: float = 0.05,
                  held_out: int | None = None, tune_on: str = "mix", test_share: float = 0.5
                  ) -> tuple[tuple[float, ...], list[str]]:
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
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s)
           or not 0 <= s <= 10]
    if bad:
        raise ValueError(f"strengths={values}: {bad} not a number from 0 to 10 (strength is what the generator takes: "
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
    if tune_on not in TUNE_ON:
        raise ValueError(f"tune_on={tune_on!r}; choose one of {TUNE_ON} (mix: the config's perturb.generators; "
                         "kind: each perturbation's rows tuned on that kind alone)")
    if isinstance(test_share, bool) or not isinstance(test_share, numbers.Real) or not 0 <= test_share < 1:
        raise ValueError(f"test_share={test_share!r}: must lie in [0, 1), the share of the test normals that joins the "
                         "evaluation normals (the test rows keep the rest), e.g. 0.5")
    return tuple(sorted({float(s) for s in values})), list(dict.fromkeys(names))


def split_held_out(dataset: Dataset, k: int, seed: int, held_out: int | None = None
                   ) -> tuple[list[int], list[int], list[int]]:
    """(shots, calibration, evaluation) train indices: the fixed k-shot draw, then the other train images in a
    seeded order (the first ``held_out`` of them), split into halves (calibration gets the odd one).

    Example:
        >>> from apt_lab.data import load_dataset
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


def split_test_normals(dataset: Dataset, seed: int, test_share: float = 0.5) -> tuple[list[int], list[int]]:
    """(lent to the evaluation normals, kept for the test rows): test indices of *normal* images only — a seeded
    draw of ``⌊test_share × normals⌋`` of them (at most all but one) and the rest.

    Example (the demo's 6 normal test images are its first 6):
        >>> from apt_lab.data import load_dataset
        >>> lent, kept = split_test_normals(load_dataset("demo", category="brick"), seed=0)
        >>> len(lent), len(kept), sorted(lent + kept) == [0, 1, 2, 3, 4, 5]
        (3, 3, True)
    """
    normal = [i for i, label in enumerate(dataset.test.labels.tolist()) if label == 0]
    lend = min(math.floor(len(normal) * test_share + 1e-9), max(len(normal) - 1, 0))
    order = torch.randperm(len(normal), generator=torch.Generator().manual_seed(seed)).tolist()
    drawn = [normal[i] for i in order]
    return sorted(drawn[:lend]), sorted(drawn[lend:])


def tuning_generators(generators: Sequence[str], tune_on: str, row: tuple | None) -> tuple[str, ...]:
    """The perturbations a row's prompts are tuned with: the config's ``generators``, or with ``tune_on="kind"`` a
    perturbation row's own kind (test rows keep the mix).

    Example:
        >>> mix = ("gaussian", "uniform", "salt_pepper")
        >>> tuning_generators(mix, "kind", ("uniform", 0.5)), tuning_generators(mix, "kind", ("test:hole", None))
        (('uniform',), ('gaussian', 'uniform', 'salt_pepper'))
    """
    return (row[0],) if tune_on == "kind" and row is not None and row[1] is not None else tuple(generators)


def warn_few_normals(category: str, k: int, seed: int, calibration: int, evaluation: int, test_rows: int) -> None:
    """:class:`FewNormalsWarning` when fewer than :data:`MIN_NORMALS` calibration or evaluation normals remain."""
    if min(calibration, evaluation) < MIN_NORMALS:
        warnings.warn(f"severity {category} (k={k}, seed={seed}): {calibration} calibration and {evaluation} "
                      f"evaluation normal images (the test rows: {test_rows}), fewer than MIN_NORMALS = {MIN_NORMALS}. "
                      f"A rate of n images moves in steps of 1/n ({100 / max(evaluation, 1):.0f} % here): read the "
                      "95 % intervals beside each rate, or give more normal images (more train images, held_out=None, "
                      "a larger test_share).", FewNormalsWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ the experiment
def severity(backbone: Backbone, dataset: Dataset, config: APTConfig, strengths: Sequence[float],
             kinds: Sequence[str] | None = None, store: FeatureStore | None = None, **settings) -> list[dict]:
    """Every row of one category (``config.train.k_shot`` shots, ``config.train.seed``), outside any run folder:
    each a dict with ``row`` (perturbation, strength), ``metrics``, ``n_normal``, ``n_anomalous`` and the indices.
    ``settings``: the other fields of :class:`apt_lab.sweep.Severity` (threshold, target_fpr, held_out, tune_on,
    test_share)."""
    from .sweep import Severity

    spec = Severity(tuple(strengths), None if kinds is None else (kinds,) if isinstance(kinds, str) else tuple(kinds),
                    **settings)
    strengths, kinds = check_request(spec.strengths, spec.perturbations, spec.threshold, spec.target_fpr,
                                     spec.held_out, spec.tune_on, spec.test_share)
    k, seed = config.train.k_shot, config.train.seed
    defects = sorted({d for d, label in zip(dataset.test.defects, dataset.test.labels.tolist()) if label})
    rows = [(kind, s) for kind in kinds for s in strengths] + [(f"test:{d}", None) for d in defects]
    cells = [Cell(dataset.category, k, seed, "apt", row) for row in rows]
    store = store or FeatureStore(backbone, config.score.batch_size)
    return [{"row": cell.row, **record} for cell, record in severity_rows(backbone, dataset, config, spec, cells,
                                                                           store)]


def severity_rows(backbone: Backbone, dataset: Dataset, config: APTConfig, spec, cells: Sequence[Cell],
                  store: FeatureStore):
    """(cell, record) for each of ``cells`` — rows of one (category, shots, seed, variant) unit, tuned once per
    perturbation mix they tune with (:func:`tuning_generators`) — as each is measured (a run appends it at once).
    ``spec``: :class:`apt_lab.sweep.Severity`."""
    k, seed = cells[0].shots, cells[0].seed
    config = with_shots(config, k, seed)
    radius = config.score.locality_radius
    shots, calibration, evaluation = split_held_out(dataset, k, seed, spec.held_out)
    lent, kept = split_test_normals(dataset, seed, spec.test_share)
    warn_few_normals(dataset.category, k, seed, len(calibration), len(evaluation) + len(lent), len(kept))
    common = {"shot_indices": shots, "calibration": calibration, "evaluation": evaluation, "evaluation_test": lent,
              "test_normals": kept, "artefacts": []}
    groups: dict[tuple[str, ...], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(tuning_generators(config.perturb.generators, spec.tune_on, cell.row), []).append(cell)
    normals = test = None  # shared by every tuning: the evaluation normals' inputs, the test set's
    for generators, group in groups.items():
        tuned = config.replace(perturb__generators=generators)
        start = time.perf_counter()
        prompts, _, memory = prepare_prompts(backbone, dataset, tuned, "apt", shots, store)
        tune_s = time.perf_counter() - start

        def scored(inputs, prompts=prompts, memory=memory, tuned=tuned):  # features or pixels (B, 3, S, S)
            image_scores, maps = score_chunked(backbone, prompts, inputs, tuned, memory)  # (B,), (B, S, S)
            return image_scores, maps.float()

        if spec.threshold == "quantile":
            calibration_scores = scored(store.features(dataset.train, calibration, radius))[0]  # (c,)
            cut = pixel_threshold(calibration_scores, 1 - spec.target_fpr)
        else:  # "f1": calibration normals vs their CFG copies made as in training, seeded
            cut = choose_thresholds(backbone, prompts, store.images(dataset.train, calibration).to(backbone.device),
                                    tuned, torch.Generator().manual_seed(seed)).image
        clean = scored_test = None
        for cell in group:
            kind, strength = cell.row
            start = time.perf_counter()
            if strength is not None:
                if normals is None:  # evaluation normals, train then test: pixels (n, 3, S, S), features, roi (n, S, S)
                    parts = [(dataset.train, evaluation), *([(dataset.test, lent)] if lent else [])]
                    pixels = torch.cat([store.images(split, indices) for split, indices in parts]).to(backbone.device)
                    features = ImageFeatures.cat([store.features(split, indices, radius) for split, indices in parts])
                    normals = (pixels, features, region_of_interest(backbone, pixels, config,
                                                                    features=features if radius == 0 else None))
                pixels, features, roi = normals
                if clean is None:  # this tuning's scores of the clean evaluation normals: (n,), maps (n, S, S)
                    clean = scored(features)
                clean_scores, clean_maps = clean
                cfg = config.replace(perturb__generators=(kind,), perturb__strength=(strength, strength))
                out = perturb(pixels, cfg, torch.Generator().manual_seed(seed), roi=roi, backbone=backbone)
                changed = (out.images != pixels).flatten(1).any(1).cpu()  # (n,) an unchanged image keeps its score
                anomalous, maps = clean_scores.clone(), clean_maps.clone()  # (n,), (n, S, S)
                if changed.any():
                    anomalous[changed], maps[changed] = scored(out.images[changed.to(pixels.device)])
                masks = torch.cat([torch.zeros_like(out.masks), out.masks]).cpu()  # (2n, S, S) clean first
                measured = _measure(clean_scores, anomalous, torch.cat([clean_maps, maps]), masks, cut)
            else:
                if test is None:  # the test set: masks (T, S, S) or None, the normals kept for the test rows (T,)
                    normal = torch.zeros(len(dataset.test), dtype=torch.bool)
                    normal[kept] = True
                    test = (dataset.test.masks(backbone.image_size), normal)
                if scored_test is None:  # this tuning's scores of the whole test set: (T,), maps (T, S, S)
                    scored_test = scored(store.features(dataset.test, None, radius))
                (test_masks, normal), (test_scores, test_maps) = test, scored_test
                defect = torch.tensor([d == kind[len("test:"):] for d in dataset.test.defects], device=normal.device) \
                    & (dataset.test.labels == 1)  # (T,)
                chosen = normal | defect
                measured = _measure(test_scores[normal], test_scores[defect], test_maps[chosen],
                                    None if test_masks is None else test_masks[chosen], cut)
            yield cell, {**common, **measured,
                         "timings": {"tune_s": round(tune_s, 3), "row_s": round(time.perf_counter() - start, 3)}}
            tune_s = 0.0  # tuned once for the group: later rows cost only their own measurement


def _rate(hits: torch.Tensor) -> tuple:
    """(rate, low, high) of a bool (n,): the share that is True and its 95 % Wilson interval; Nones for n = 0."""
    if not len(hits):
        return None, None, None
    count = int(hits.sum())
    return (count / len(hits), *metrics.wilson_interval(count, len(hits)))


def _measure(normal: torch.Tensor, anomalous: torch.Tensor, maps: torch.Tensor, masks, cut: float) -> dict:
    """One row's numbers: normal (n,) / anomalous (m,) image scores, maps (n+m, S, S) and bool masks (n+m, S, S) in
    one order, or masks None."""
    labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))])  # (n+m,)
    both = len(normal) and len(anomalous)
    fpr, fpr_low, fpr_high = _rate(normal >= cut)
    tpr, tpr_low, tpr_high = _rate(anomalous >= cut)
    return {"metrics": {
        "image_auroc": metrics.image_auroc(torch.cat([normal, anomalous]), labels) if both else None,
        "pixel_auroc": metrics.pixel_auroc(maps, masks) if masks is not None and masks.any() else None,
        "fpr_at_threshold": fpr, "fpr_low": fpr_low, "fpr_high": fpr_high,
        "tpr_at_threshold": tpr, "tpr_low": tpr_low, "tpr_high": tpr_high, "threshold": float(cut)},
        "n_normal": len(normal), "n_anomalous": len(anomalous), "n_test": len(normal) + len(anomalous)}
