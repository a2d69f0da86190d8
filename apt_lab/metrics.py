"""Anomaly-detection metrics: image and pixel AUROC / AP / F1-max, and AUPRO.

All functions accept numpy arrays or torch tensors and return Python floats. Scores and maps are
"higher = more anomalous"; labels are 0 (normal) / 1 (anomalous); masks are bool or 0/1.

Pixel AUROC, AP and F1-max come from one shared curve (true and false positives at every distinct
score): one sort of the pixels for float32/float64 maps, and for float16 maps (how the pipeline keeps
them) a count of pixels per float16 value — exact on those values, and streamed image by image
(:class:`PixelCounts`), so a large test set never needs a float32 copy of every map at once.

``aupro`` implements the official MVTec AD definition exactly (vectorised: one sort of the normal
pixels, no per-threshold loop);
``aupro(..., method="cflow200")`` is the 200-threshold approximation published by many CLIP
repositories, offered only to compare with their numbers.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

__all__ = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
           "pixel_metrics", "PixelCounts", "aupro", "pro_curve", "evaluate",
           "format_metric", "METRIC_KEYS", "PixelMetricsSkipped", "warn_pixel_metrics_skipped", "wilson_interval"]
CFLOW_STEPS = 200
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 % intervals


# --- input checks --------------------------------------------------------------------------------
def _as_numpy(x, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} is None.")
    if hasattr(x, "detach"):                                  # torch tensor, any device / dtype
        x = x.detach().cpu()
        if x.is_floating_point() and str(x.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
            x = x.float()                                     # bfloat16 has no numpy dtype
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
    return pixel_metrics(anomaly_maps, masks)["pixel_auroc"]


def pixel_ap(anomaly_maps, masks) -> float:
    """Average precision over all pixels; maps and masks ``(B, H, W)``.

    Example:
        >>> round(pixel_ap([[[0.1, 0.9], [0.95, 0.3]]], [[[0, 1], [0, 0]]]), 4)  # P = 1/2 at R = 1
        0.5
    """
    return pixel_metrics(anomaly_maps, masks)["pixel_ap"]


def pixel_f1max(anomaly_maps, masks) -> float:
    """Best F1 over all thresholds, all pixels pooled; maps and masks ``(B, H, W)``.

    Example:
        >>> round(pixel_f1max([[[0.1, 0.9], [0.95, 0.3]]], [[[0, 1], [0, 0]]]), 4)  # 2*0.5*1/1.5
        0.6667
    """
    return pixel_metrics(anomaly_maps, masks)["pixel_f1max"]


def pixel_metrics(anomaly_maps, masks) -> dict:
    """Pixel AUROC, AP and F1-max from one shared curve; equal to sklearn's three functions on the same values.

    float16 maps are counted per value (:class:`PixelCounts`, streamed image by image, no float32 copy);
    other maps are sorted once.

    Example:
        >>> maps = [[[0.1, 0.9], [0.95, 0.3]]]
        >>> {k: round(v, 4) for k, v in pixel_metrics(maps, [[[0, 1], [0, 0]]]).items()}
        {'pixel_auroc': 0.6667, 'pixel_ap': 0.5, 'pixel_f1max': 0.6667}
    """
    m = _maps(_as_numpy(anomaly_maps, "anomaly_maps"), "anomaly_maps")
    if m.dtype == np.float16:
        return _streamed(m, masks, fpr_limit=None)
    m, g = _pixel_inputs(m, masks)
    return _curve_metrics(*_counts_by_sort(m, g))


def _counts_by_sort(m: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous, normal) pixel counts per distinct score, descending: one sort of all scores, one of the
    (few) anomalous ones."""
    scores, labels = m.reshape(-1), g.reshape(-1)
    values = np.sort(scores)                                          # (N,) ascending
    ends = np.append(np.flatnonzero(np.diff(values)), values.size - 1)  # (V,) last index of each distinct value
    distinct, total = values[ends], np.diff(np.append(-1, ends))      # (V,), (V,) pixels per value
    anomalous = np.sort(scores[labels])                                # (N1,)
    pos = np.searchsorted(anomalous, distinct, "right") - np.searchsorted(anomalous, distinct, "left")
    return pos[::-1], (total - pos)[::-1]


def _curve_metrics(pos: np.ndarray, neg: np.ndarray) -> dict:
    """AUROC (trapezoid: ties count one half), AP (sklearn's step-wise sum of precision × recall gain) and
    F1-max from the anomalous / normal pixel counts at each distinct score, in descending score order."""
    tps, fps = np.cumsum(pos, dtype=np.float64), np.cumsum(neg, dtype=np.float64)   # (V,) at score >= v
    tpr = np.concatenate([[0.0], tps / tps[-1]])
    fpr = np.concatenate([[0.0], fps / fps[-1]])
    precision, recall = tps / (tps + fps), tps / tps[-1]
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
    return {"pixel_auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)),
            "pixel_ap": float(np.sum(np.diff(tpr) * precision)),
            "pixel_f1max": float(f1.max())}


_F16_VALUES = 1 << 16                                                 # distinct float16 bit patterns
_STREAM_PIXELS = 1 << 19                                              # pixels per chunk when streaming


def _float16_keys(values: np.ndarray) -> np.ndarray:
    """float16 values → int64 keys 0..65535 in the same order (-0 and +0 share a key).

    Example:
        >>> _float16_keys(np.array([-1.0, -0.0, 0.0, 0.5, 1.0], dtype=np.float16)).tolist()
        [17407, 32768, 32768, 47104, 48128]
    """
    keys = (values + np.float16(0)).view(np.uint16).astype(np.int64)  # sign-magnitude bits; -0 + 0 = +0
    negative = keys >= 0x8000
    np.subtract(0xFFFF, keys, out=keys, where=negative)               # in place: a chunk holds one int64 copy
    np.bitwise_or(keys, 0x8000, out=keys, where=~negative)
    return keys


class PixelCounts:
    """Pixel counts per float16 score, accumulated a few images at a time: exact pixel AUROC, AP, F1-max and
    AUPRO of float16 maps (official definition, ties included) in fixed memory (3 × 65,536 numbers).

    Maps given in another dtype are rounded to float16 first; :meth:`auroc_rounding_bound` then bounds how far
    the AUROC can lie from that of the unrounded maps (rounding is monotonic, so only pairs that fall into one
    float16 value can change, each by one half).

    Example:
        >>> counts = PixelCounts()
        >>> counts.add(np.array([[[0.1, 0.9], [0.95, 0.3]]], dtype=np.float16), [[[0, 1], [0, 0]]])
        >>> {k: round(v, 4) for k, v in counts.metrics().items()}
        {'pixel_auroc': 0.6667, 'pixel_ap': 0.5, 'pixel_f1max': 0.6667, 'aupro': 0.0}
    """

    def __init__(self):
        self.normal = np.zeros(_F16_VALUES, dtype=np.int64)              # normal pixels per value
        self.anomalous = np.zeros(_F16_VALUES, dtype=np.int64)           # anomalous pixels per value
        self.region_gain = np.zeros(_F16_VALUES)                         # Σ 1 / region size over those
        self.regions = 0                                                 # 8-connected regions seen

    def add(self, anomaly_maps, masks) -> None:
        """Count ``(b, H, W)`` maps and masks (any number of images per call)."""
        m = _maps(_scores(anomaly_maps, "anomaly_maps"), "anomaly_maps")
        g = _maps(_binary(masks, "masks"), "masks")
        _same_shape(m, "anomaly_maps", g, "masks")
        if m.dtype != np.float16:
            with np.errstate(over="ignore"):
                rounded = m.astype(np.float16)
            if np.isinf(rounded).any():
                raise ValueError(f"anomaly_maps hold values beyond the float16 range (|x| > 65504, max "
                                 f"{float(np.abs(m).max()):.3g}); evaluate them as float32 (exact sort) instead.")
            m = rounded
        keys = _float16_keys(m).reshape(-1)                               # (n,)
        ids, n_regions = _regions(g)                                       # (b, H, W) local region ids
        ids = ids.reshape(-1)
        sizes = np.bincount(ids, minlength=n_regions + 1)                  # sizes[0] = normal pixels
        normal = ids == 0
        self.normal += np.bincount(keys[normal], minlength=_F16_VALUES)
        a_keys, a_ids = keys[~normal], ids[~normal]
        self.anomalous += np.bincount(a_keys, minlength=_F16_VALUES)
        self.region_gain += np.bincount(a_keys, weights=1.0 / sizes[a_ids], minlength=_F16_VALUES)
        self.regions += n_regions

    def _descending(self):
        seen = np.flatnonzero(self.normal + self.anomalous)[::-1]         # distinct values, descending
        n_pos, n_neg = int(self.anomalous.sum()), int(self.normal.sum())
        if n_pos == 0 or n_neg == 0:
            only = "normal (mask 0)" if n_pos == 0 else "anomalous (mask 1)"
            raise ValueError(f"AUROC needs both normal and anomalous pixels; got only {only} pixels "
                             f"({n_pos + n_neg} of them). Evaluate on a test set with both kinds.")
        return self.anomalous[seen], self.normal[seen], self.region_gain[seen]

    def metrics(self, fpr_limit: float | None = 0.3) -> dict:
        """``pixel_auroc``, ``pixel_ap``, ``pixel_f1max`` and (unless ``fpr_limit`` is None) ``aupro``."""
        pos, neg, gain = self._descending()
        out = _curve_metrics(pos, neg)
        if fpr_limit is not None:
            if not 0 < fpr_limit <= 1:
                raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}.")
            fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum(), [1.0]])        # FPR at score >= v
            pro = np.concatenate([[0.0], np.cumsum(gain) / self.regions, [1.0]])     # PRO at score >= v
            out["aupro"] = float(_trapezoid_until(fpr, pro, fpr_limit) / fpr_limit)
        return out

    def auroc_rounding_bound(self) -> float:
        """Largest possible |AUROC of these float16 maps − AUROC of the maps before rounding to float16|."""
        pos, neg, _ = self._descending()
        return float(0.5 * np.sum(pos.astype(np.float64) * neg) / (pos.sum() * float(neg.sum())))


def _streamed(m: np.ndarray, masks, fpr_limit: float | None) -> dict:
    """:class:`PixelCounts` over ``m`` (B, H, W) a few images at a time."""
    g = _maps(_binary(masks, "masks"), "masks")
    _same_shape(m, "anomaly_maps", g, "masks")
    counts, step = PixelCounts(), max(1, _STREAM_PIXELS // max(1, m[0].size if len(m) else 1))
    for start in range(0, len(m), step):
        counts.add(m[start:start + step], g[start:start + step])
    return counts.metrics(fpr_limit)


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
class PixelMetricsSkipped(UserWarning):
    """Pixel metrics are None: the masks mark no anomalous pixel, or some anomalous test image has no mask."""


SKIP_NOTICES: set[str] = set()  # the pixel-metrics notices given in this process


def warn_pixel_metrics_skipped(message: str, stacklevel: int = 3) -> None:
    """Warn ``message`` (:class:`PixelMetricsSkipped`) once per process: every cell of a run evaluates the same test
    set, and Python's own once-per-place filter forgets whenever code changes the warning filters (torch does)."""
    if message not in SKIP_NOTICES:
        SKIP_NOTICES.add(message)
        warnings.warn(message, PixelMetricsSkipped, stacklevel=stacklevel)


def evaluate(image_scores, anomaly_maps, labels, masks=None, fpr_limit: float = 0.3) -> dict:
    """All seven metrics of the protocol for one category.

    float16 maps (what the pipeline keeps) are evaluated a few images at a time through :class:`PixelCounts`,
    never as one float32 copy; float32/float64 maps by one shared sort (and :func:`aupro`). Both are exact on
    the values given.

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
    m = _maps(_as_numpy(anomaly_maps, "anomaly_maps"), "anomaly_maps")   # no copy of a CPU tensor or array
    g = _maps(_binary(masks, "masks"), "masks")
    _same_shape(m, "anomaly_maps", g, "masks")
    n = _as_numpy(labels, "labels").reshape(-1).size
    if m.shape[0] != n:
        raise ValueError(f"anomaly_maps has {m.shape[0]} maps (shape {m.shape}) but labels has {n} "
                         f"entries; pass one map per image.")
    if not g.any():
        warn_pixel_metrics_skipped(f"pixel metrics skipped: none of the {g.shape[0]} masks marks an anomalous pixel, "
                                   "so pixel AUROC, AP, F1-max and AUPRO are undefined (None). Check that the masks "
                                   "are the ground truth of the anomalous images (non-zero = anomalous).")
        return out
    if m.dtype == np.float16:                                         # streamed, checked chunk by chunk
        out.update(_streamed(m, g, fpr_limit))
        return out
    m = _scores(m, "anomaly_maps")
    out.update(_curve_metrics(*_counts_by_sort(m, g)), aupro=aupro(m, g, fpr_limit))
    return out


# --- tables ----------------------------------------------------------------------------------------
def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate, 95 % by default: (low, high) as fractions of ``trials``.

    (p̂ + z²/2n ± z·√(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n), with n = trials and p̂ = successes / n. Chosen over
    the normal ("Wald") interval, which collapses to [0, 0] at 0 successes, and over Clopper–Pearson, which needs
    beta quantiles and covers more than 95 %: Wilson's coverage stays near 95 % at the small counts a false-positive
    rate of a few normal images has, and it is a closed form. Math only (no numpy, no torch).

    Example (0 of 3: the upper bound is z²/(3 + z²) = 3.8415/6.8415; 1 of 20: Wilson's [0.9 %, 23.6 %]):
        >>> [round(b, 4) for b in wilson_interval(0, 3)], [round(b, 4) for b in wilson_interval(1, 20)]
        ([0.0, 0.5615], [0.0089, 0.2361])
    """
    if isinstance(successes, bool) or isinstance(trials, bool) or int(successes) != successes \
            or int(trials) != trials or not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"wilson_interval({successes!r}, {trials!r}): needs whole numbers 0 ≤ successes ≤ trials, "
                         "trials ≥ 1")
    n, rate = trials, successes / trials
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, where rounding would leave 1e-17
    return low, 1.0 if successes == trials else min(1.0, centre + half)


def format_metric(value, digits: int = 4) -> str:
    """How every table prints a value: "" for None, "nan", fixed ``digits`` for floats (never "-0.0"), str()
    otherwise.

    Example:
        >>> format_metric(0.123456), format_metric(None), format_metric(float("nan")), format_metric(3, 2)
        ('0.1235', '', 'nan', '3')
        >>> format_metric(-0.00001, 1)
        '0.0'
    """
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "nan" if np.isnan(value) else f"{round(float(value), digits) + 0.0:.{digits}f}"
    return str(value)

