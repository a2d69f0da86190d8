"""Anomaly-detection metrics: image and pixel AUROC / AP / F1-max, and AUPRO.

All functions accept numpy arrays or torch tensors and return Python floats. Scores and maps are
"higher = more anomalous"; labels are 0 (normal) / 1 (anomalous); masks are bool or 0/1.

``aupro`` implements the official MVTec AD definition exactly (vectorised: one sort of the normal
pixels, no per-threshold loop);
``aupro(..., method="cflow200")`` is the 200-threshold approximation published by many CLIP
repositories, offered only to compare with their numbers.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

__all__ = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
           "aupro", "pro_curve", "evaluate", "mean_metrics", "metric_rows", "format_metric", "METRIC_KEYS"]
CFLOW_STEPS = 200


# --- input checks --------------------------------------------------------------------------------
def _as_numpy(x, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} is None.")
    if hasattr(x, "detach"):                                  # torch tensor, any device / dtype
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() and x.dtype != x.double().dtype else x
        x = x.numpy()
    return np.asarray(x)


# Every metric ``evaluate`` returns, in report order (CLI table, CSV, HTML report).
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")

def _scores(x, name: str) -> np.ndarray:
    x = _as_numpy(x, name)
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric scores; got dtype {x.dtype}.")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        where = [tuple(int(v) for v in i) for i in np.argwhere(bad)[:3]]
        look = (f"images {sorted({w[0] for w in where})}" if x.ndim > 1 else f"indices {where}")
        raise ValueError(f"{name} contains {int(np.isnan(x).sum())} NaN and "
                         f"{int(np.isinf(x).sum())} inf values (first at {where}); look at "
                         f"{look}: usually a division by zero or an fp16 overflow in the model.")
    return x


def _binary(x, name: str) -> np.ndarray:
    x = _as_numpy(x, name)
    if x.dtype == bool:
        return x
    odd = (x != 0) & (x != 1)
    if odd.any():
        raise ValueError(f"{name} must be binary (bool or 0/1); found values such as "
                         f"{np.unique(x[odd])[:5].tolist()}. Threshold with {name} > 0, and resize "
                         f"masks with apt_lab.data.resize_masks (nearest), never bilinear.")
    return x.astype(bool)


def _maps(x, name: str) -> np.ndarray:
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]                                                   # (B, 1, H, W) -> (B, H, W)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, H, W); got {x.shape}.")
    return x


def _same_shape(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}; they must "
                         f"match. Up-sample maps to the mask resolution (bilinear), or load masks at "
                         f"the map size with split.masks(size).")


def _two_classes(labels: np.ndarray, what: str) -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        only = "normal (label 0)" if n_pos == 0 else "anomalous (label 1)"
        raise ValueError(f"AUROC needs both normal and anomalous {what}; got only {only} {what} "
                         f"({labels.size} of them). Evaluate on a test set with both kinds.")


def _image_inputs(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores, "image_scores").reshape(-1)
    y = _binary(labels, "labels").reshape(-1)
    _same_shape(s, "image_scores", y, "labels")
    _two_classes(y, "images")
    return s, y


def _pixel_inputs(anomaly_maps, masks) -> tuple[np.ndarray, np.ndarray]:
    m = _maps(_scores(anomaly_maps, "anomaly_maps"), "anomaly_maps")
    g = _maps(_binary(masks, "masks"), "masks")
    _same_shape(m, "anomaly_maps", g, "masks")
    _two_classes(g, "pixels")
    return m, g


def _f1max(y: np.ndarray, s: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
    return float(f1.max())


# --- image and pixel metrics ---------------------------------------------------------------------
def image_auroc(image_scores, labels) -> float:
    """Area under the ROC curve of image scores (ties count one half).

    Example:
        >>> image_auroc([0.5, 0.5, 0.9], [0, 1, 1])   # pairs: tie (0.5) + correct (1) -> 1.5 / 2
        0.75
    """
    s, y = _image_inputs(image_scores, labels)
    return float(roc_auc_score(y, s))


def image_ap(image_scores, labels) -> float:
    """Average precision of image scores (sklearn's step-wise definition, no interpolation).

    Example:
        >>> round(image_ap([0.5, 0.5, 0.9], [0, 1, 1]), 4)   # 0.5 * 1 + 0.5 * 2/3
        0.8333
    """
    s, y = _image_inputs(image_scores, labels)
    return float(average_precision_score(y, s))


def image_f1max(image_scores, labels) -> float:
    """Best F1 over all thresholds of the image scores.

    Example:
        >>> round(image_f1max([0.5, 0.5, 0.9], [0, 1, 1]), 4)  # threshold 0.5: P 2/3, R 1
        0.8
    """
    s, y = _image_inputs(image_scores, labels)
    return _f1max(y, s)


def pixel_auroc(anomaly_maps, masks) -> float:
    """ROC AUC over all pixels of all images; maps and masks ``(B, H, W)``.

    Example:
        >>> pixel_auroc([[[0.1, 0.9], [0.8, 0.3]]], [[[0, 1], [0, 0]]])  # anomaly beats every normal
        1.0
    """
    m, g = _pixel_inputs(anomaly_maps, masks)
    return float(roc_auc_score(g.reshape(-1), m.reshape(-1)))


def pixel_ap(anomaly_maps, masks) -> float:
    """Average precision over all pixels; maps and masks ``(B, H, W)``.

    Example:
        >>> round(pixel_ap([[[0.1, 0.9], [0.95, 0.3]]], [[[0, 1], [0, 0]]]), 4)  # P = 1/2 at R = 1
        0.5
    """
    m, g = _pixel_inputs(anomaly_maps, masks)
    return float(average_precision_score(g.reshape(-1), m.reshape(-1)))


def pixel_f1max(anomaly_maps, masks) -> float:
    """Best F1 over all thresholds, all pixels pooled; maps and masks ``(B, H, W)``.

    Example:
        >>> round(pixel_f1max([[[0.1, 0.9], [0.95, 0.3]]], [[[0, 1], [0, 0]]]), 4)  # 2*0.5*1/1.5
        0.6667
    """
    m, g = _pixel_inputs(anomaly_maps, masks)
    return _f1max(g.reshape(-1), m.reshape(-1))


# --- AUPRO ---------------------------------------------------------------------------------------
def _regions(g: np.ndarray) -> tuple[np.ndarray, int]:
    """Global region ids ``(B, H, W)`` (0 = normal) of 8-connected components; and their count."""
    ids = np.zeros(g.shape, dtype=np.int32)                           # (B, H, W)
    n_regions = 0
    for b in range(g.shape[0]):
        lab, n = ndimage.label(g[b], structure=np.ones((3, 3), dtype=int))
        ids[b] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    return ids, n_regions


def _trapezoid_until(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) (x ascending) for x <= x_max, interpolating y linearly at x_max."""
    inside = x <= x_max
    area = float(np.sum(0.5 * (y[inside][1:] + y[inside][:-1]) * np.diff(x[inside])))
    last = int(np.flatnonzero(inside)[-1])
    if x[last] < x_max and last + 1 < len(x):                         # partial last trapezoid
        x0, x1, y0, y1 = x[last], x[last + 1], y[last], y[last + 1]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def _top_normal_scores(normal: np.ndarray, fpr_limit: float | None) -> np.ndarray:
    """Ascending scores of the normal pixels that can lie at FPR <= ``fpr_limit``.

    All of them when ``fpr_limit`` is None; otherwise the top ``fpr_limit`` fraction plus the whole
    run of ties at its lower end (selected with a linear-time partition, then sorted).
    """
    cut = int(np.floor(normal.size * (1 - fpr_limit))) if fpr_limit is not None else 0
    if cut <= 0:
        normal.sort()
        return normal
    normal.partition(cut)                                             # [:cut] <= pivot <= [cut:]
    pivot = normal[cut]
    n_tied_below = int(np.count_nonzero(normal[:cut] == pivot))
    top = np.sort(normal[cut:])                                       # starts with the pivot
    return np.concatenate([np.full(n_tied_below, pivot, dtype=normal.dtype), top])


def _pro_curve_mvtec(m: np.ndarray, g: np.ndarray, fpr_limit: float | None = None):
    """Exact PRO curve from one sort of the normal pixels and one of the (few) anomalous ones.

    Between two consecutive distinct *normal* scores u > v the official curve only rises vertically
    at FPR(u) (anomalous pixels with scores in (v, u)) and then runs straight to (FPR(v), PRO(>= v)).
    So the breakpoints (FPR(u), PRO(> v)) and (FPR(v), PRO(>= v)) for every distinct normal score v
    give the same piecewise-linear curve (and trapezoid area) as one point per distinct score,
    without arg-sorting all pixels. With ``fpr_limit`` the curve stops at the first point with
    FPR >= fpr_limit (then (1, 1)), which is all the area up to the limit needs.
    """
    ids, n_regions = _regions(g)
    flat_ids = ids.reshape(-1)                                        # (N,) N = B*H*W
    sizes = np.bincount(flat_ids, minlength=n_regions + 1)           # sizes[0] = normal pixels
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / sizes[1:] / n_regions                          # PRO gain of one pixel
    scores = m.reshape(-1)                                            # (N,)
    n_normal = int(sizes[0])
    top = _top_normal_scores(scores[flat_ids == 0], fpr_limit)        # (N0',) ascending
    anomalous = flat_ids > 0
    a_scores, a_weight = scores[anomalous], weight[flat_ids[anomalous]]   # (N1,)
    order = np.argsort(a_scores)
    a_scores, a_weight = a_scores[order], a_weight[order]
    pro_from = np.append(np.cumsum(a_weight[::-1])[::-1], 0.0)        # (N1+1,) PRO of a_scores[i:]
    last = np.append(np.flatnonzero(np.diff(top)), top.size - 1)      # (V,) end of each run
    first = np.append(0, last[:-1] + 1)
    values = top[last][::-1]                                          # (V,) distinct, descending
    fpr_ge = (top.size - first)[::-1] / n_normal                      # (V,) FPR at score >= v
    fpr_before = np.append(0.0, fpr_ge[:-1])
    pro_gt = pro_from[np.searchsorted(a_scores, values, side="right")]   # (V,) PRO at score > v
    pro_ge = pro_from[np.searchsorted(a_scores, values, side="left")]    # (V,) PRO at score >= v
    above = np.nextafter(values, np.inf)                              # threshold of "> v"
    fpr = np.concatenate([[0.0], np.stack([fpr_before, fpr_ge], 1).reshape(-1), [1.0]])
    pro = np.concatenate([[0.0], np.stack([pro_gt, pro_ge], 1).reshape(-1), [1.0]])
    thresholds = np.concatenate([[np.inf], np.stack([above, values], 1).reshape(-1), [-np.inf]])
    return fpr, pro, thresholds


def _pro_curve_cflow(m: np.ndarray, g: np.ndarray):
    lo, hi = float(m.min()), float(m.max())
    if hi == lo:
        raise ValueError(f"anomaly_maps are constant ({lo}); the cflow200 curve needs a score range.")
    thresholds = lo + (hi - lo) / CFLOW_STEPS * np.arange(CFLOW_STEPS)   # (200,) ascending
    ids, n_regions = _regions(g)
    # Pixel p is positive at threshold j iff score > t_j, i.e. for j < n_below[p].
    n_below = np.searchsorted(thresholds, m.reshape(-1), side="left")    # (N,) in 0..200
    hist = np.bincount(ids.reshape(-1).astype(np.int64) * (CFLOW_STEPS + 1) + n_below,
                       minlength=(n_regions + 1) * (CFLOW_STEPS + 1))
    hist = hist.reshape(n_regions + 1, CFLOW_STEPS + 1)                  # (R+1, 201)
    positive = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]          # (R+1, 200): # score > t_j
    sizes = hist.sum(axis=1)                                             # (R+1,)
    fpr = positive[0] / sizes[0]                                         # (200,)
    pro = (positive[1:] / sizes[1:, None]).mean(axis=0)                  # (200,) mean over regions
    return fpr, pro, thresholds


def pro_curve(anomaly_maps, masks, method: str = "mvtec"):
    """The per-region-overlap (PRO) curve behind `aupro`.

    Returns:
        ``(fpr, pro, thresholds)``; a point is (FPR, PRO) of "score >= threshold". ``"mvtec"``:
        the breakpoints of the exact curve, thresholds descending: for each distinct score v of a
        normal pixel, the points just above v and at v (points where only anomalous or only normal
        pixels change lie on the segments between them), plus (0, 0) and (1, 1) (thresholds
        +inf / -inf).
        ``"cflow200"``: one point per each of the 200 ascending thresholds, before any filtering.
    """
    m, g = _pixel_inputs(anomaly_maps, masks)
    if method == "mvtec":
        return _pro_curve_mvtec(m, g)
    if method == "cflow200":
        return _pro_curve_cflow(m, g)
    raise ValueError(f"Unknown AUPRO method {method!r}; use 'mvtec' (official) or 'cflow200'.")


def aupro(anomaly_maps, masks, fpr_limit: float = 0.3, method: str = "mvtec") -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``.

    ``method="mvtec"`` (official MVTec AD definition): ground-truth regions are the 8-connected
    components of each mask; all pixels of all images are sorted by score, descending; at each
    distinct score, FPR = normal pixels above it / all normal pixels and PRO = (sum over anomalous
    pixels above it of 1 / size of their region) / number of regions; (0, 0) and (1, 1) are added;
    the trapezoid area up to ``fpr_limit`` (interpolating linearly at the limit) is divided by
    ``fpr_limit``.

    ``method="cflow200"`` (CFlow-AD / APRIL-GAN / AnomalyCLIP code): 200 thresholds
    ``t_j = min + j (max - min) / 200``, j = 0..199 (the reference's ``np.arange``, without its
    occasional float-rounding 201st step); a pixel is positive when its score > t_j; PRO = mean over
    regions of the overlap fraction; FPR = false positives / normal pixels; only points with
    FPR < ``fpr_limit`` are kept, their FPRs are min-max normalised to [0, 1] (the minimum is
    usually 0, so this is dividing by the largest kept FPR) and integrated with
    ``sklearn.metrics.auc``. It differs from the official value: a coarse threshold grid, no point
    at the limit itself (the segment up to 0.3 is dropped, not interpolated), and a rescaled FPR
    axis that weights the kept range as if it reached the limit.

    Args:
        anomaly_maps: ``(B, H, W)`` scores.
        masks: ``(B, H, W)`` bool ground truth; at least one anomalous and one normal pixel.
        fpr_limit: upper FPR limit of the integration, in (0, 1].
        method: ``"mvtec"`` or ``"cflow200"``.

    Example:
        Two 4x4 maps. Image 0: region A = 2x2 block (4 px), scores 0.9, 0.9, 0.2, 0.2.
        Image 1: region B = 2 diagonal pixels (one region under 8-connectivity), scores 0.7, 0.1.
        26 normal pixels: 2 score 0.8, 13 score 0.4, 11 score 0.0. Each A pixel adds 1/4/2 to
        PRO, each B pixel 1/2/2. Curve: (0, 0) (0, .25) (2/26, .25) (2/26, .5) (15/26, .5) ...
        Area to 0.3: 0.25 * 2/26 + 0.5 * (0.3 - 2/26) = 0.130769...; / 0.3:

        >>> a = np.zeros((2, 4, 4)); g = np.zeros((2, 4, 4), dtype=bool)
        >>> g[0, :2, :2] = True; a[0, 0, :2] = 0.9; a[0, 1, :2] = 0.2          # region A
        >>> g[1, 1, 1] = g[1, 2, 2] = True; a[1, 1, 1] = 0.7; a[1, 2, 2] = 0.1  # region B
        >>> a[0, 0, 2:] = 0.8; a[0, 2:] = 0.4; a[1, 0] = 0.4; a[1, 3, 0] = 0.4  # normals: 2 + 13
        >>> round(aupro(a, g), 6)
        0.435897
        >>> aupro(a, g, method="cflow200")   # kept FPRs {2/26, 0} -> {1, 0}; PRO .25 at both ends
        0.25
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}.")
    if method == "mvtec":
        fpr, pro, _ = _pro_curve_mvtec(*_pixel_inputs(anomaly_maps, masks), fpr_limit)
        return float(_trapezoid_until(fpr, pro, fpr_limit) / fpr_limit)
    fpr, pro, _ = pro_curve(anomaly_maps, masks, method)
    keep = fpr < fpr_limit
    f, p = fpr[keep], pro[keep]
    if f.size < 2 or f.max() == f.min():
        raise ValueError(f"cflow200 AUPRO: only {f.size} threshold(s) give FPR < {fpr_limit} "
                         f"(with distinct FPRs); the maps have too few distinct score levels for "
                         f"this approximation. Use method='mvtec'.")
    return float(auc((f - f.min()) / (f.max() - f.min()), p))


# --- everything at once --------------------------------------------------------------------------
def evaluate(image_scores, anomaly_maps, labels, masks=None, fpr_limit: float = 0.3) -> dict:
    """All seven metrics of the protocol for one category.

    Args:
        image_scores: ``(B,)`` image scores.
        anomaly_maps: ``(B, H, W)`` maps at the mask resolution, or None (image metrics only).
        labels: ``(B,)`` 0/1 image labels.
        masks: ``(B, H, W)`` bool masks, or None (e.g. a folder dataset without masks).

    Returns:
        ``{"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
        "aupro"}`` as floats. The four pixel keys are always present and are ``None`` when
        ``masks`` or ``anomaly_maps`` is None or the masks contain no anomalous pixel.
    """
    out = {"image_auroc": image_auroc(image_scores, labels),
           "image_ap": image_ap(image_scores, labels),
           "image_f1max": image_f1max(image_scores, labels)}
    pixel_keys = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
    out.update(dict.fromkeys(pixel_keys))
    if masks is None or anomaly_maps is None:
        return out
    m = _maps(_scores(anomaly_maps, "anomaly_maps"), "anomaly_maps")
    g = _maps(_binary(masks, "masks"), "masks")
    _same_shape(m, "anomaly_maps", g, "masks")
    n = _as_numpy(labels, "labels").reshape(-1).size
    if m.shape[0] != n:
        raise ValueError(f"anomaly_maps has {m.shape[0]} maps (shape {m.shape}) but labels has {n} "
                         f"entries; pass one map per image.")
    if not g.any():
        return out
    out.update(pixel_auroc=pixel_auroc(m, g), pixel_ap=pixel_ap(m, g),
               pixel_f1max=pixel_f1max(m, g), aupro=aupro(m, g, fpr_limit))
    return out


# --- tables ----------------------------------------------------------------------------------------
def mean_metrics(per_category: dict[str, dict]) -> dict:
    """Macro mean over categories of every metric present (as a number) in all of them.

    Example:
        >>> mean_metrics({"a": {"image_auroc": 0.5}, "b": {"image_auroc": 1.0}})
        {'image_auroc': 0.75}
    """
    if not per_category:
        return {}
    names = set.intersection(*(set(k for k, v in m.items() if isinstance(v, (int, float)) and v is not None)
                               for m in per_category.values()))
    return {name: sum(m[name] for m in per_category.values()) / len(per_category) for name in sorted(names)}


def metric_rows(results: dict) -> list[tuple[str, dict]]:
    """The rows of every results table (terminal, CSV, HTML): (category, metrics) per category, then "mean".

    Example:
        >>> metric_rows({"categories": {"a": {"metrics": {"image_auroc": 0.5}}}, "mean": {"image_auroc": 0.5}})
        [('a', {'image_auroc': 0.5}), ('mean', {'image_auroc': 0.5})]
    """
    rows = [(name, entry["metrics"]) for name, entry in results["categories"].items()]
    return rows + [("mean", results.get("mean") or mean_metrics(dict(rows)))]


def format_metric(value, digits: int = 4) -> str:
    """How every table prints a value: "" for None, "nan", fixed ``digits`` for floats, str() otherwise.

    Example:
        >>> format_metric(0.123456), format_metric(None), format_metric(float("nan")), format_metric(3, 2)
        ('0.1235', '', 'nan', '3')
    """
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "nan" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)

