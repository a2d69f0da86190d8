"""Plotly figure builders shared by the notebooks, the widgets and the HTML report.

Every function here is pure: tensors or arrays in, a ``plotly.graph_objects.Figure`` out, nothing displayed.
Images are (3, H, W) float pixels in [0, 1] (torch or numpy), anomaly maps (H, W) floats, masks (H, W) bool.
Images travel as PNG data URIs (``go.Image(source=...)``), so a figure of a few 224-pixel images stays small.

Anomaly maps share **one colour range for the whole set** by default (``anomaly_map_grid``): per-image
normalisation stretches a normal image's faint noise to full red and makes it look anomalous.

Example:
    >>> import torch
    >>> fig = anomaly_map_figure(torch.rand(3, 8, 8), torch.rand(8, 8), mask=torch.rand(8, 8) > 0.8)
    >>> [t.type for t in fig.data]
    ['image', 'heatmap', 'contour']
"""
from __future__ import annotations

import base64
import io
import math
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .metrics import format_metric

MAP_COLORSCALE = "Jet"  # the anomaly-map convention in the CLIP-AD literature: blue normal, red anomalous
MASK_COLOR = "white"  # ground-truth outline
THRESHOLD_COLOR = "magenta"  # predicted region outline (map >= threshold)
METRIC_NAMES = {
    "image_auroc": "image AUROC", "image_ap": "image AP", "image_f1max": "image F1-max",
    "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP", "pixel_f1max": "pixel F1-max", "aupro": "AUPRO",
}
LOSS_KEYS = ("loss", "image_loss", "focal", "dice", "meta_loss")


# ------------------------------------------------------------------------------------------- helpers
def to_numpy(x) -> np.ndarray:
    """A torch tensor (any device, with or without grad) or array-like → a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def image_to_uint8(image) -> np.ndarray:
    """(3, H, W) or (H, W, 3) pixels in [0, 1] → (H, W, 3) uint8."""
    array = to_numpy(image).astype(np.float32)
    if array.ndim != 3:
        raise ValueError(f"image: expected (3, H, W) pixels in [0, 1], got shape {array.shape}")
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # (H, W, 3)
    return (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def image_data_uri(image) -> str:
    """(3, H, W) pixels → ``data:image/png;base64,...`` (what ``go.Image(source=...)`` takes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_to_uint8(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_trace(image, name: str = "image") -> go.Image:
    return go.Image(source=image_data_uri(image), name=name, hoverinfo="skip")


def _shrink(values, max_side: int | None, dtype=np.float32) -> tuple[np.ndarray, dict]:
    """(H, W) → an area-averaged copy at most ``max_side`` pixels wide, and the x0/dx/y0/dy that keep it aligned
    with the full-resolution image underneath (keeps figures of many maps small)."""
    array = to_numpy(values).astype(np.float32)
    factor = 1 if not max_side else max(1, math.ceil(max(array.shape) / max_side))
    if factor > 1:
        h, w = array.shape[0] // factor * factor, array.shape[1] // factor * factor
        array = array[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    offset = (factor - 1) / 2
    return array.astype(dtype), dict(x0=offset, dx=factor, y0=offset, dy=factor)


def _outline_trace(mask, color: str, name: str, level: float = 0.5, z=None, max_side: int | None = None
                   ) -> go.Contour:
    """A single contour line around ``mask`` (or around ``z >= level`` when ``z`` is given)."""
    values, place = _shrink(mask if z is None else z, max_side)
    if z is None and place["dx"] == 1:
        values = values.astype(np.uint8)  # a mask travels as bytes
    return go.Contour(z=values, contours=dict(start=level, end=level, size=1, coloring="none"),
                      line=dict(color=color, width=2), showscale=False, hoverinfo="skip", name=name,
                      showlegend=False, **place)


def _style_image_axes(fig: go.Figure, rows: int = 1, cols: int = 1) -> None:
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed",
                     scaleanchor="x", constrain="domain")
    for index in range(2, rows * cols + 1):  # keep every panel square: y of panel i follows x of panel i
        fig.update_yaxes(scaleanchor=f"x{index}", row=(index - 1) // cols + 1, col=(index - 1) % cols + 1)


def map_range(maps, zmin: float | None = None, zmax: float | None = None) -> tuple[float, float]:
    """One colour range for a set of maps: (min, max) over all of them unless given.

    Example:
        >>> map_range([np.zeros((2, 2)), np.full((2, 2), 3.0)])
        (0.0, 3.0)
    """
    if zmin is None or zmax is None:
        values = [to_numpy(m) for m in maps]
        low = float(min(v.min() for v in values)) if zmin is None else zmin
        high = float(max(v.max() for v in values)) if zmax is None else zmax
        zmin, zmax = low, high
    if zmax <= zmin:  # a constant map: widen so the colour bar stays valid
        zmax = zmin + 1e-6
    return float(zmin), float(zmax)


def _map_traces(image, anomaly_map, mask, zmin, zmax, opacity, threshold, showscale, max_side=None):
    showscale = showscale and zmax - zmin > 1e-6  # a constant map's bar would span v … v + 1e-6: say it in the title
    traces = [_image_trace(image)]
    z, place = _shrink(anomaly_map, max_side)
    traces.append(go.Heatmap(z=z, zmin=zmin, zmax=zmax, colorscale=MAP_COLORSCALE, opacity=opacity,
                             showscale=showscale, name="anomaly map", **place,
                             hovertemplate="x %{x}, y %{y}<br>score %{z:.3f}<extra></extra>"))
    if mask is not None and to_numpy(mask).any():
        traces.append(_outline_trace(mask, MASK_COLOR, "ground truth", max_side=max_side))
    if threshold is not None:
        traces.append(_outline_trace(None, THRESHOLD_COLOR, "map ≥ threshold", level=threshold, z=anomaly_map,
                                     max_side=max_side))
    return traces


# -------------------------------------------------------------------------------------------- figures
def image_figure(image, title: str | None = None, mask=None, height: int = 360) -> go.Figure:
    """One image (3, H, W) in [0, 1], optionally with a mask outline.

    Example:
        >>> image_figure(np.zeros((3, 4, 4))).data[0].type
        'image'
    """
    fig = go.Figure([_image_trace(image)])
    if mask is not None and to_numpy(mask).any():
        fig.add_trace(_outline_trace(mask, MASK_COLOR, "mask"))
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    _style_image_axes(fig)
    return fig


def anomaly_map_figure(image, anomaly_map, mask=None, zmin: float | None = None, zmax: float | None = None,
                       opacity: float = 0.5, title: str | None = None, threshold: float | None = None,
                       height: int = 420) -> go.Figure:
    """An anomaly map (H, W) over its image (3, H, W), the ground-truth outline (white) if ``mask`` is given.

    Args:
        zmin: lower end of the colour range; None = this map's own minimum. Pass the set's range
            (``map_range``) to compare images fairly.
        zmax: upper end of the colour range; None = this map's own maximum.
        opacity: of the heat map over the image, 0 (image only) to 1 (map only).
        threshold: optional score; draws the outline of ``anomaly_map >= threshold`` (magenta).
    """
    zmin, zmax = map_range([anomaly_map], zmin, zmax)
    fig = go.Figure(_map_traces(image, anomaly_map, mask, zmin, zmax, opacity, threshold, showscale=True))
    # The colour bar gets a fixed right margin: plotly.js's automatic margin is lost when a FigureWidget swaps its
    # traces (a widget moving to an image with another trace count), which pushed the bar off the canvas.
    scale = bool(fig.data[1].showscale)
    fig.update_traces(colorbar=dict(thickness=15, x=1.0, xanchor="left", xpad=8), selector=dict(type="heatmap"))
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=75 if scale else 10, t=40 if title else 10,
                                                              b=10, autoexpand=False))
    _style_image_axes(fig)
    return fig


def anomaly_map_grid(images, maps, masks=None, zmin: float | None = None, zmax: float | None = None,
                     titles: Sequence[str] | None = None, cols: int = 4, opacity: float = 0.5,
                     per_image_range: bool = False, panel_height: int = 230, max_side: int | None = 112
                     ) -> go.Figure:
    """A grid of maps over images with **one shared colour range** (the set's min/max unless given).

    Args:
        images: (B, 3, H, W) or a list of (3, H, W).
        maps: (B, H, W) anomaly maps.
        masks: (B, H, W) bool ground truth, or None.
        per_image_range: True normalises each map to its own range instead (misleading; for comparison only).
        max_side: maps are area-averaged to at most this many pixels per side for display (None = full size).
    """
    images, maps = list(images), list(maps)
    masks = [None] * len(images) if masks is None else list(masks)
    if not (len(images) == len(maps) == len(masks)):
        raise ValueError(f"anomaly_map_grid: {len(images)} images, {len(maps)} maps, {len(masks)} masks; "
                         "pass one map (and mask) per image")
    if not images:
        raise ValueError("anomaly_map_grid: no images given")
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    titles = list(titles) if titles is not None else [f"#{i}" for i in range(len(images))]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.02,
                        vertical_spacing=0.06 if rows > 1 else 0.0)
    shared = map_range(maps, zmin, zmax)
    for index, (image, anomaly_map, mask) in enumerate(zip(images, maps, masks)):
        low, high = map_range([anomaly_map]) if per_image_range else shared
        traces = _map_traces(image, anomaly_map, mask, low, high, opacity, None,
                             showscale=(index == 0 and not per_image_range), max_side=max_side)
        for trace in traces:
            fig.add_trace(trace, row=index // cols + 1, col=index % cols + 1)
    constant = shared[1] - shared[0] <= 1e-6
    fig.update_layout(height=panel_height * rows + 60, margin=dict(l=10, r=10, t=40, b=10),
                      title="per-image colour range (misleading)" if per_image_range else
                      f"every map is constant: {shared[0]:.3g}" if constant else
                      f"one colour range for all: [{shared[0]:.3g}, {shared[1]:.3g}]")
    _style_image_axes(fig, rows, cols)
    return fig


def perturbation_figure(image, perturbed, mask, roi=None, title: str | None = None, height: int = 330) -> go.Figure:
    """CFG at a glance: the normal image (region of interest outlined), the perturbed one, and its mask.

    Args:
        image: (3, H, W) normal pixels in [0, 1].
        perturbed: (3, H, W) perturbed pixels.
        mask: (H, W) bool synthetic-anomaly mask.
        roi: (H, W) bool region of interest, or None.
    """
    outline = roi is not None and to_numpy(roi).any() and not to_numpy(roi).all()
    normal = ("normal (yellow: region of interest)" if outline else "normal (region of interest: whole image)"
              if roi is not None else "normal")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.02,
                        subplot_titles=(normal, "perturbed", "anomaly mask (red) on perturbed"))
    fig.add_trace(_image_trace(image, "normal"), row=1, col=1)
    if outline:
        fig.add_trace(_outline_trace(roi, "yellow", "region of interest"), row=1, col=1)
    fig.add_trace(_image_trace(perturbed, "perturbed"), row=1, col=2)
    overlay = image_to_uint8(perturbed).astype(np.float32)
    red = to_numpy(mask).astype(bool)
    overlay[red] = 0.45 * overlay[red] + 0.55 * np.array([255.0, 0.0, 0.0])
    fig.add_trace(_image_trace(overlay.transpose(2, 0, 1) / 255.0, "overlay"), row=1, col=3)
    if red.any():
        fig.add_trace(_outline_trace(red, MASK_COLOR, "mask"), row=1, col=3)
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=60 if title else 30, b=10))
    _style_image_axes(fig, 1, 3)
    return fig


def training_curves_figure(history: Sequence[Mapping], log_y: bool = False, height: int = 380) -> go.Figure:
    """Tuning history (one dict per step, as ``tune_prompts`` records it) → losses, gradient conflicts, meta-prompt.

    Keys used when present: ``step``; losses ``loss, image_loss, focal, dice, meta_loss``; ``conflict_rate``
    (share of parameter tensors whose task and meta gradients disagreed, i.e. where SMGS acted);
    ``meta_drift`` (how far the self-optimising meta-prompt moved from its start) and ``anchor_similarity``
    (cosine of the learned prompts to the *initial* meta-prompt). Missing keys are skipped.
    """
    history = list(history)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("losses", "gradient conflicts (SMGS acts)",
                                        "meta-prompt drift, anchor similarity"))
    steps = [record.get("step", index) for index, record in enumerate(history)]

    def series(key):
        return [float(record[key]) if record.get(key) is not None else None for record in history]

    for key in LOSS_KEYS:
        if any(record.get(key) is not None for record in history):
            fig.add_trace(go.Scatter(x=steps, y=series(key), mode="lines", name=key), row=1, col=1)
    for column, key in ((2, "conflict_rate"), (3, "meta_drift"), (3, "anchor_similarity")):
        if any(record.get(key) is not None for record in history):
            fig.add_trace(go.Scatter(x=steps, y=series(key), mode="lines", name=key), row=1, col=column)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    if log_y:
        fig.update_yaxes(type="log", row=1, col=1)
    last = f" — step {steps[-1]}, loss {history[-1].get('loss', float('nan')):.4f}" if history else " — no steps yet"
    fig.update_layout(title="prompt tuning" + last, height=height, margin=dict(l=40, r=10, t=70, b=40),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _metric(row: Mapping, metric: str):
    """A metric from a flat row (``row["image_auroc"]``) or one with a nested ``metrics`` dict."""
    if metric in row:
        return row[metric]
    return (row.get("metrics") or {}).get(metric)


def metrics_bar_figure(rows: Sequence[Mapping], metric: str = "image_auroc", x: str = "category",
                       group: str = "variant", height: int = 400) -> go.Figure:
    """Grouped bars of one metric: ``x`` on the axis, one bar colour per ``group``; mean ± std over seeds.

    Rows are dicts such as ``{"variant": "APT", "category": "brick", "seed": 0, "image_auroc": 0.91}``
    (what ``apt_lab.pipeline.compare`` returns); a nested ``metrics`` dict works too. With more than one category
    a "mean" (the macro mean over categories) is added: on the axis when ``x`` is "category", as a bar of each
    ``x`` when ``group`` is "category". Nothing is ever averaged across variants.
    """
    values: dict[tuple[str, str], list[float]] = {}
    xs, groups = [], []
    for row in rows:
        value = _metric(row, metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        key_x, key_g = str(row.get(x, "all")), str(row.get(group, "result"))
        xs += [key_x] if key_x not in xs else []
        groups += [key_g] if key_g not in groups else []
        values.setdefault((key_x, key_g), []).append(float(value))
    if x == "category" and len(xs) > 1:
        for key_g in groups:  # macro mean over categories of the per-category means
            means = [float(np.mean(values[(key_x, key_g)])) for key_x in xs if (key_x, key_g) in values]
            values[("mean", key_g)] = means
        xs.append("mean")
    elif group == "category" and len(groups) > 1:
        for key_x in xs:  # the same, as one more bar of each x (e.g. each variant)
            values[(key_x, "mean")] = [float(np.mean(values[(key_x, key_g)])) for key_g in groups
                                       if (key_x, key_g) in values]
        groups.append("mean")
    fig = go.Figure()
    for key_g in groups:
        present = [key_x for key_x in xs if (key_x, key_g) in values]
        means = [float(np.mean(values[(k, key_g)])) for k in present]
        stds = [float(np.std(values[(k, key_g)])) if "mean" not in (k, key_g) else 0.0 for k in present]
        fig.add_trace(go.Bar(x=present, y=means, name=key_g, error_y=dict(type="data", array=stds, visible=True),
                             hovertemplate="%{x}: %{y:.3f}<extra>" + key_g + "</extra>"))
    label = METRIC_NAMES.get(metric, metric)
    fig.update_layout(barmode="group", title=label, yaxis_title=label, height=height,
                      yaxis=dict(range=[0, 1.02]), margin=dict(l=50, r=10, t=50, b=40))
    return fig


def metrics_table_figure(rows: Sequence[Mapping], columns: Sequence[str] | None = None, digits: int = 3,
                         height: int | None = None) -> go.Figure:
    """A table of result rows; numbers rounded to ``digits``. ``columns`` defaults to every key seen, in order."""
    flat = []
    for row in rows:
        row = dict(row)
        row.update(row.pop("metrics", None) or {})
        flat.append(row)
    if columns is None:
        columns = []
        for row in flat:
            columns += [key for key in row if key not in columns and _is_scalar(row[key])]
    cells = []
    for column in columns:
        cells.append([format_metric(row.get(column), digits) for row in flat])
    fig = go.Figure(go.Table(header=dict(values=[METRIC_NAMES.get(c, c) for c in columns], align="left"),
                             cells=dict(values=cells, align="left")))
    fig.update_layout(height=height or 60 + 28 * (len(flat) + 1), margin=dict(l=5, r=5, t=5, b=5))
    return fig


def score_histogram_figure(image_scores, labels=None, threshold: float | None = None, bins: int = 20,
                           title: str = "image scores", height: int = 320) -> go.Figure:
    """Histogram of image scores, split by label (0 normal, 1 anomalous) when labels are given."""
    scores = to_numpy(image_scores).astype(np.float64).ravel()
    fig = go.Figure()
    if labels is None:
        fig.add_trace(go.Histogram(x=scores, nbinsx=bins, name="all"))
    else:
        labels = to_numpy(labels).astype(int).ravel()
        for value, name in ((0, "normal"), (1, "anomalous")):
            fig.add_trace(go.Histogram(x=scores[labels == value], nbinsx=bins, name=name, opacity=0.7))
    if threshold is not None:
        fig.add_vline(x=threshold, line=dict(color=THRESHOLD_COLOR, dash="dash"),
                      annotation_text=f"threshold {threshold:.3f}")
    fig.update_layout(barmode="overlay", title=title, xaxis_title="image score", yaxis_title="images",
                      height=height, margin=dict(l=50, r=10, t=50, b=40))
    return fig


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, np.integer, np.floating))


__all__ = ["image_figure", "anomaly_map_figure", "anomaly_map_grid", "perturbation_figure", "training_curves_figure",
           "metrics_bar_figure", "metrics_table_figure", "score_histogram_figure", "map_range", "image_data_uri",
           "image_to_uint8", "to_numpy"]
