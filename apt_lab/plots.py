"""Plotly figure builders shared by the notebooks, the widgets and the HTML report.

Every function here is pure: tensors or arrays in, a ``plotly.graph_objects.Figure`` out, nothing displayed.
Images are (3, H, W) float pixels in [0, 1] (torch or numpy), anomaly maps (H, W) floats, masks (H, W) bool.
Images travel as PNG data URIs (``go.Image(source=...)``), so a figure of a few 224-pixel images stays small.

Anomaly maps share **one colour range for the whole set** by default (``anomaly_map_grid``): per-image
normalisation stretches a normal image's faint noise to full red and makes it look anomalous.

Metrics come in as fractions (what the Python API returns) and are drawn in **percent with one decimal**, as every
table prints them: axes titled "image AUROC (%)", ± std only where there are two seeds or more, no error-bar caps,
and an axis that spans at least ``MIN_SPAN`` points (``percent_range``), so seed noise is not drawn as a trend.

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
import re
from typing import Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .metrics import METRIC_KEYS, format_metric
from .store import format_cell, mean_std

MAP_COLORSCALE = "Jet"  # the anomaly-map convention in the CLIP-AD literature: blue normal, red anomalous
MASK_COLOR = "white"  # ground-truth outline
THRESHOLD_COLOR = "magenta"  # predicted region outline (map >= threshold)
# The one place where result keys get the names a reader sees (notebook tables, widgets, reports) and what they mean.
METRIC_NAMES = {
    "image_auroc": "image AUROC", "image_ap": "image AP", "image_f1max": "image F1-max",
    "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP", "pixel_f1max": "pixel F1-max", "aupro": "AUPRO",
    "encode_s": "encode test images (s)", "tune_s": "tune prompts (s)", "pool_s": "of which: anomaly pool (s)",
    "score_s": "score (s)", "evaluate_s": "metrics (s)", "total_s": "total (s)",
}
METRIC_MEANINGS = {  # what a family of metrics measures, in the order the legend lists them
    "AUROC": "chance that an anomalous image (pixel) scores above a normal one, 0.5 = guessing",
    "AP": "average precision of the anomalous class",
    "F1-max": "best F1 over all thresholds",
    "AUPRO": "mean overlap with each defect region up to 30 % false-positive rate",
}
LOSS_KEYS = ("loss", "image_loss", "focal", "dice", "meta_loss")
# Metrics the Python API returns as fractions in [0, 1] and every table, figure and widget shows in percent with one
# decimal, as papers print them (``format_cell``): one unit for a reader, fractions only in return values.
PERCENT_KEYS = (*METRIC_KEYS, "fpr_at_threshold", "tpr_at_threshold")
MIN_SPAN = 10.0  # percentage points: the least a metric axis spans, so a 0.2-point wobble is not drawn as a trend
MEAN_FILL = "#e8eaf6"  # background of the rows a table sets apart ("mean" rows)
SUBPLOT_TITLE_SIZE = 14  # px; plotly's default (16) makes three titles collide on a 700 px docs column


def metric_label(key: str) -> str:
    """The name a reader sees for a result key (``METRIC_NAMES``), else the key itself.

    Example:
        >>> metric_label("image_auroc"), metric_label("tune_s"), metric_label("run")
        ('image AUROC', 'tune prompts (s)', 'run')
    """
    return METRIC_NAMES.get(key, key)


def metric_legend(keys: Sequence[str] | None = None, percent: bool = False) -> str:
    """One line saying what each metric means: the families (AUROC, AP, F1-max, AUPRO) among ``keys`` (all when
    None). Put it under every table a person reads; ``METRIC_MEANINGS`` holds the wording.

    Args:
        percent: the table shows metrics in percent (0–100, 50 = guessing for AUROC) rather than in [0, 1].

    Example:
        >>> metric_legend(["image_auroc", "pixel_auroc", "tune_s"])
        'AUROC: chance that an anomalous image (pixel) scores above a normal one, 0.5 = guessing. All metrics in [0, 1], higher is better.'
        >>> metric_legend(["image_auroc"], percent=True)
        'AUROC: chance that an anomalous image (pixel) scores above a normal one, 50 = guessing. All metrics in percent, higher is better.'
    """
    families = {metric_label(key).split(" ")[-1] for key in (METRIC_NAMES if keys is None else keys)}
    parts = [f"{family}: {meaning}" for family, meaning in METRIC_MEANINGS.items() if family in families]
    if not parts:
        return ""
    text = "; ".join(parts) + (". All metrics in percent, higher is better." if percent else
                               ". All metrics in [0, 1], higher is better.")
    return text.replace("0.5 = guessing", "50 = guessing") if percent else text


def metric_axis_title(key: str) -> str:
    """The title of an axis that shows a metric: its readable name and its unit.

    Example:
        >>> metric_axis_title("image_auroc"), metric_axis_title("tune_s")
        ('image AUROC (%)', 'tune prompts (s)')
    """
    return f"{metric_label(key)} (%)" if key in PERCENT_KEYS else metric_label(key)


def percent_range(lows: Sequence[float], highs: Sequence[float], span: float = MIN_SPAN,
                  limits: tuple[float, float] = (0.0, 100.0), pad: float = 1.0) -> list[float]:
    """A metric axis in percent that shows the interval rather than magnifying noise: it holds every point with its
    error bar (``lows`` = mean − std, ``highs`` = mean + std, in percent) plus ``pad``, and spans at least ``span``
    points, widened about the data's middle and kept inside ``limits`` where the data allow; ends on whole points.

    Example:
        >>> percent_range([79.3, 80.0], [80.7, 80.2])        # a 0.2-point change with a 0.7 std: 10 points, not 1
        [75.0, 85.0]
        >>> percent_range([99.0], [100.0]), percent_range([20.0], [90.0])
        ([91.0, 101.0], [19.0, 91.0])
    """
    if not lows:
        return [limits[0], limits[1]]
    low, high = min(lows) - pad, max(highs) + pad
    if high - low < span:
        middle = (low + high) / 2
        low, high = middle - span / 2, middle + span / 2
    floor, ceiling = min(limits[0], min(lows) - pad), max(limits[1], max(highs) + pad)
    shift = max(0.0, floor - low) - max(0.0, high - ceiling)  # move the window inside the limits, keeping the data
    return [float(math.floor(low + shift + 1e-9)), float(math.ceil(high + shift - 1e-9))]  # whole points


def error_bars(stds: Sequence[float | None]) -> dict:
    """``error_y`` of a trace of means in percent: ± std (a fraction) where a point has one; no cap anywhere, and no
    bar at all where the std is None (n = 1) — a zero-length bar without a cap draws nothing.

    Example:
        >>> error_bars([None, None])
        {'visible': False}
        >>> error_bars([0.012, None])
        {'type': 'data', 'array': [1.2, 0.0], 'visible': True, 'width': 0, 'thickness': 1.5}
    """
    if all(std is None for std in stds):
        return {"visible": False}
    return {"type": "data", "array": [0.0 if std is None else round(std * 100, 9) for std in stds], "visible": True,
            "width": 0, "thickness": 1.5}


def summary_hover(name: str) -> str:
    """The hover text of a point whose ``customdata`` is [``format_cell`` text, n]: "brick: 95.3 ± 0.4 % (n = 2)"."""
    return "%{x}: %{customdata[0]} % (n = %{customdata[1]})<extra>" + name + "</extra>"


def summary_bar_figure(groups: Mapping[str, Sequence[tuple]], metric: str = "image_auroc",
                       title: str | None = "auto", height: int = 400) -> go.Figure:
    """Grouped bars of summaries already computed: ``groups`` maps a bar colour's name to its bars, each
    ``(x, (mean, std), n)`` with mean and std as fractions (std None for n = 1, as :func:`~apt_lab.store.mean_std`
    gives). Bars in percent from 0 to 100 (or to the highest error bar), ± std only where n ≥ 2, no caps.

    Example:
        >>> fig = summary_bar_figure({"APT": [("brick", (0.9, 0.01), 2), ("grass", (0.7, None), 1)]})
        >>> list(fig.data[0].y), list(fig.data[0].error_y.array), fig.layout.yaxis.title.text
        ([90.0, 70.0], [1.0, 0.0], 'image AUROC (%)')
    """
    fig = go.Figure()
    tops = [100.0]
    for name, bars in groups.items():
        means = [round(mean * 100, 9) for _, (mean, _), _ in bars]
        stds = [std for _, (_, std), _ in bars]
        tops += [m + (s or 0) * 100 for m, s in zip(means, stds)]
        fig.add_trace(go.Bar(x=[x for x, _, _ in bars], y=means, name=name, error_y=error_bars(stds),
                             customdata=[[format_cell(value), n] for _, value, n in bars],
                             hovertemplate=summary_hover(name)))
    title = f"{metric_label(metric)} (mean ± std over seeds)" if title == "auto" else title
    fig.update_layout(barmode="group", title=title, height=height, margin=dict(l=50, r=10, t=50 if title else 10, b=40),
                      yaxis=dict(title=metric_axis_title(metric), range=[0, max(tops) + 2]))
    return fig


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
def image_figure(image, title: str | None = "image", mask=None, height: int = 360) -> go.Figure:
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
                       opacity: float = 0.5, title: str | None = "anomaly map", threshold: float | None = None,
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
                     per_image_range: bool = False, panel_height: int = 230, max_side: int | None = 112,
                     title: str | None = "auto") -> go.Figure:
    """A grid of maps over images with **one shared colour range** (the set's min/max unless given).

    Args:
        images: (B, 3, H, W) or a list of (3, H, W).
        maps: (B, H, W) anomaly maps.
        masks: (B, H, W) bool ground truth, or None.
        titles: one per panel (default ``#0``, ``#1``, ...).
        per_image_range: True normalises each map to its own range instead (misleading; for comparison only).
        max_side: maps are area-averaged to at most this many pixels per side for display (None = full size).
        title: "auto" states the colour range ("one colour range for all: [0.002, 1.000]"); None draws no figure
            title (a page that states the range in its own text, as the run report does); any other text is used.
            The top margin leaves room for the title *and* the panel titles, so neither crowds the other.
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
                        vertical_spacing=0.08 if rows > 1 else 0.0)
    fig.update_annotations(font_size=SUBPLOT_TITLE_SIZE)
    shared = map_range(maps, zmin, zmax)
    for index, (image, anomaly_map, mask) in enumerate(zip(images, maps, masks)):
        low, high = map_range([anomaly_map]) if per_image_range else shared
        traces = _map_traces(image, anomaly_map, mask, low, high, opacity, None,
                             showscale=(index == 0 and not per_image_range), max_side=max_side)
        for trace in traces:
            fig.add_trace(trace, row=index // cols + 1, col=index % cols + 1)
    if title == "auto":
        constant = shared[1] - shared[0] <= 1e-6
        title = ("per-image colour range (misleading)" if per_image_range else
                 f"every map is constant: {format_metric(shared[0], 3)}" if constant else
                 f"one colour range for all: [{format_metric(shared[0], 3)}, {format_metric(shared[1], 3)}]")
    top = _top_margin(title, panel_titles=any(titles))
    fig.update_layout(height=panel_height * rows + top + 10, margin=dict(l=10, r=10, t=top, b=10),
                      title=_title(title))
    _style_image_axes(fig, rows, cols)
    return fig


def _top_margin(title: str | None, panel_titles: bool, panel_lines: int = 1) -> int:
    """Pixels above the plot area: the figure title's band, then the panel titles' lines (drawn just above the
    panels), so the two never overlap."""
    return (34 if title else 0) + (panel_lines * int(SUBPLOT_TITLE_SIZE * 1.4) + 4 if panel_titles else 0) + 6


def _title(text: str | None) -> dict:
    """A figure title pinned to the top edge (not centred in the margin, where panel titles sit)."""
    return dict(text=text, x=0.5, xanchor="center", y=1.0, yref="container", yanchor="top", pad=dict(t=8))


def perturbation_figure(image, perturbed, mask, roi=None, title: str | None = "a synthetic anomaly",
                        height: int = 330) -> go.Figure:
    """CFG at a glance: the normal image (region of interest outlined), the perturbed one, and its mask.

    Args:
        image: (3, H, W) normal pixels in [0, 1].
        perturbed: (3, H, W) perturbed pixels.
        mask: (H, W) bool synthetic-anomaly mask.
        roi: (H, W) bool region of interest, or None.
    """
    outline = roi is not None and to_numpy(roi).any() and not to_numpy(roi).all()
    normal = ("normal (yellow:<br>region of interest)" if outline else "normal (region of<br>interest: whole image)"
              if roi is not None else "normal")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.02,
                        subplot_titles=(normal, "perturbed", "anomaly mask (red)<br>on perturbed"))
    fig.update_annotations(font_size=SUBPLOT_TITLE_SIZE)
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
    top = _top_margin(title, panel_titles=True, panel_lines=2)
    fig.update_layout(title=_title(title), height=height + top - 60, margin=dict(l=10, r=10, t=top, b=10))
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
                        subplot_titles=("losses", "gradient conflicts<br>(where SMGS acts)",
                                        "meta-prompt drift,<br>anchor similarity"))
    fig.update_annotations(font_size=SUBPLOT_TITLE_SIZE)
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
    top = _top_margin("prompt tuning", panel_titles=True, panel_lines=2)
    fig.update_layout(title=_title("prompt tuning" + last), height=height, margin=dict(l=40, r=10, t=top, b=40),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _metric(row: Mapping, metric: str):
    """A metric from a flat row (``row["image_auroc"]``) or one with a nested ``metrics`` dict."""
    if metric in row:
        return row[metric]
    return (row.get("metrics") or {}).get(metric)


def metrics_bar_figure(rows: Sequence[Mapping], metric: str = "image_auroc", x: str = "category",
                       group: str = "variant", height: int = 400) -> go.Figure:
    """Grouped bars of one metric in percent: ``x`` on the axis, one bar colour per ``group``; mean ± std over seeds
    (the sample std, as the tables print it; no error bar where there is one seed).

    Rows are dicts such as ``{"variant": "APT", "category": "brick", "seed": 0, "image_auroc": 0.91}``
    (a run folder's cells, flattened; a row without ``seed`` counts as one more seed); a nested ``metrics`` dict
    works too. With more than one category a "mean" is added — the macro mean over categories per seed, then mean
    ± std over the seeds every category has, as the tables compute it: on the axis when ``x`` is "category", as a
    bar of each ``x`` when ``group`` is "category". Nothing is ever averaged across variants.
    """
    values: dict[tuple[str, str], dict] = {}  # (x, group) → seed → value
    xs, groups = [], []
    for row in rows:
        value = _metric(row, metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        key_x, key_g = str(row.get(x, "all")), str(row.get(group, "result"))
        xs += [key_x] if key_x not in xs else []
        groups += [key_g] if key_g not in groups else []
        seeds = values.setdefault((key_x, key_g), {})
        seeds[row.get("seed", len(seeds))] = float(value)
    bars = {key_g: [(key_x, mean_std(list(values[(key_x, key_g)].values())), len(values[(key_x, key_g)]))
                    for key_x in xs if (key_x, key_g) in values] for key_g in groups}
    if x == "category" and len(xs) > 1:
        for key_g in groups:
            mean = _macro_mean([values[(key_x, key_g)] for key_x in xs if (key_x, key_g) in values])
            bars[key_g] += [("mean", *mean)] if mean else []
    elif group == "category" and len(groups) > 1:
        bars["mean"] = [(key_x, *mean) for key_x in xs for mean in
                        [_macro_mean([values[(key_x, key_g)] for key_g in groups if (key_x, key_g) in values])] if mean]
    title = f"{metric_label(metric)} per {x} (mean ± std over seeds)"
    return summary_bar_figure({name: chosen for name, chosen in bars.items() if chosen}, metric, title, height)


def _macro_mean(per_category: list[dict]) -> tuple | None:
    """((mean, std), n) of the per-seed means over categories (``per_category``: seed → value each), over the seeds
    every category has; None when they share none.

    Example:
        >>> _macro_mean([{0: 0.8, 1: 1.0}, {0: 0.6, 1: 0.6, 2: 0.9}])
        ((0.75, 0.070710678119), 2)
    """
    seeds = [seed for seed in per_category[0] if all(seed in values for values in per_category)]
    if not seeds:
        return None
    return mean_std([sum(values[seed] for values in per_category) / len(per_category) for seed in seeds]), len(seeds)


def metrics_table_figure(rows: Sequence[Mapping], columns: Sequence[str] | None = None, digits: int = 3,
                         height: int | None = None, legend: bool = True,
                         set_apart: Callable[[Mapping], bool] | None = None, title: str | None = "results"
                         ) -> go.Figure:
    """A table of result rows, keys shown by their readable names (``METRIC_NAMES``: "image AUROC", "tune prompts
    (s)"); metrics (``PERCENT_KEYS``, fractions in the rows) in percent with one decimal as every table prints them,
    other numbers rounded to ``digits``.

    Args:
        columns: keys to show, in order; default every scalar key seen, in order of appearance.
        legend: a line under the table saying what the metrics shown mean (:func:`metric_legend`).
        set_apart: which rows to set apart (bold, shaded); default the "mean" rows, i.e. rows with a cell that
            reads "mean" (the macro mean under per-category rows).
        title: what the table shows (None: no title, for a page that names it).

    Example:
        >>> fig = metrics_table_figure([{"category": "brick", "image_auroc": 0.5}, {"category": "mean", "image_auroc": 0.5}])
        >>> list(fig.data[0].header.values), list(fig.data[0].cells.values[0]), list(fig.data[0].cells.values[1])
        (['category', 'image AUROC (%)'], ['brick', '<b>mean</b>'], ['50.0', '<b>50.0</b>'])
    """
    flat = []
    for row in rows:
        row = dict(row)
        row.update(row.pop("metrics", None) or {})
        flat.append(row)
    if columns is None:
        columns = []
        for row in flat:
            columns += [key for key in row if key not in columns and _is_scalar(row[key])]
    apart = [(set_apart or _is_mean_row)(row) for row in flat]
    cells = []
    for column in columns:
        cells.append([f"<b>{text}</b>" if text and bold else text
                      for text, bold in zip((_table_text(row.get(column), column, digits) for row in flat), apart)])
    fills = [MEAN_FILL if bold else "white" for bold in apart]
    note = metric_legend(columns, percent=True) if legend else ""
    fig = go.Figure(go.Table(header=dict(values=[metric_axis_title(c) for c in columns], align="left",
                                         fill_color="#f0f0f0"),
                             cells=dict(values=cells, align="left", fill_color=[fills] * len(columns))))
    lines = _wrap(note, 90) if note else []
    bottom = 5 + 16 * len(lines)
    if lines:
        fig.add_annotation(text="<br>".join(lines), x=0, xanchor="left", xref="paper", y=0, yanchor="top",
                           yref="paper", yshift=-4, showarrow=False, align="left", font=dict(size=11, color="#555"))
    top = _top_margin(title, panel_titles=False)
    fig.update_layout(height=height or 55 + 28 * (len(flat) + 1) + top + bottom,
                      margin=dict(l=5, r=5, t=top, b=bottom), title=_title(title))
    return fig


def _table_text(value, column: str, digits: int) -> str:
    """A table cell: a metric (a fraction) in percent with one decimal; anything else rounded to ``digits``."""
    if column in PERCENT_KEYS and isinstance(value, (int, float, np.floating)) and not isinstance(value, bool):
        return format_metric(float(value) * 100, 1)
    return format_metric(value, digits)


def _is_mean_row(row: Mapping) -> bool:
    return any(isinstance(value, str) and value.strip().lower() == "mean" for value in row.values())


def _wrap(text: str, width: int) -> list[str]:
    """``text`` broken into lines of at most ``width`` characters, at spaces."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines


def score_histogram_figure(image_scores, labels=None, threshold: float | None = None, bins: int = 20,
                           title: str = "image scores", height: int = 320) -> go.Figure:
    """Histogram of image scores, split by label (0 normal, 1 anomalous) when labels are given.

    Every class is counted in the **same bins** (``bins`` equal bins over all the scores), so bar widths and heights
    compare: binning each class on its own range would draw six normal scores in 0.26–0.29 as 0.002-wide bars.

    Example:
        >>> fig = score_histogram_figure([0.26, 0.27, 0.29, 0.5, 0.9], [0, 0, 0, 1, 1], bins=4)
        >>> [(round(t.xbins.start, 2), round(t.xbins.size, 4)) for t in fig.data]
        [(0.26, 0.16), (0.26, 0.16)]
    """
    scores = to_numpy(image_scores).astype(np.float64).ravel()
    low, high = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    if high <= low:  # one value (or none): one bin around it
        low, high = low - 0.5, high + 0.5
    size = (high - low) / bins * (1 + 1e-9)  # the maximum falls inside the last bin, not on its right edge
    shared = dict(start=low, end=low + bins * size, size=size)
    fig = go.Figure()
    if labels is None:
        fig.add_trace(go.Histogram(x=scores, xbins=shared, name="all"))
    else:
        labels = to_numpy(labels).astype(int).ravel()
        for value, name in ((0, "normal"), (1, "anomalous")):
            fig.add_trace(go.Histogram(x=scores[labels == value], xbins=shared, name=name,
                                       opacity=0.7))
    if threshold is not None:
        fig.add_vline(x=threshold, line=dict(color=THRESHOLD_COLOR, dash="dash"),
                      annotation_text=f"threshold {threshold:.3f}")
    fig.update_layout(barmode="overlay", title=title, xaxis_title="image score", yaxis_title="images",
                      height=height, margin=dict(l=50, r=10, t=50, b=40))
    return fig


def title_overlaps(fig: go.Figure, width: int | None = None) -> list[str]:
    """Titles of ``fig`` that would overlap each other or stick out of the figure at ``width`` pixels — the figure
    title and every paper-anchored annotation (make_subplots' panel titles). An estimate from the text length
    (0.58 × font size per character, the width of plotly's default font), good enough to catch titles printed over
    each other or cut at the edge; ``[]`` when all fit.

    Args:
        width: the figure's width on the page; default ``layout.width``, else 700 (the docs site's column).

    Example:
        >>> fig = make_subplots(rows=1, cols=2, subplot_titles=("a rather long first title", "and a second one"))
        >>> title_overlaps(fig, width=1000)
        []
        >>> title_overlaps(fig, width=500)
        ["title 'a rather long first title' overlaps title 'and a second one' at 500 px"]
    """
    layout = fig.layout
    width = width or layout.width or 700
    height = layout.height or 450
    margin = layout.margin
    left, right = (margin.l if margin.l is not None else 80), (margin.r if margin.r is not None else 80)
    top, bottom = (margin.t if margin.t is not None else 100), (margin.b if margin.b is not None else 80)
    plot_w, plot_h = width - left - right, height - top - bottom
    base = (layout.font.size if layout.font and layout.font.size else None) or 12
    boxes = []

    def box(text, size, x_px, y_px, xanchor, yanchor):
        lines = re.split(r"<br\s*/?>", str(text))
        w = max(len(re.sub(r"<[^>]+>", "", line)) for line in lines) * 0.58 * size
        h = len(lines) * 1.3 * size
        x0 = x_px - {"left": 0, "right": w}.get(xanchor, w / 2)
        y0 = y_px - {"top": 0, "bottom": h}.get(yanchor, h / 2)
        return (x0, y0, x0 + w, y0 + h)

    title = layout.title
    if title is not None and title.text:
        size = (title.font.size if title.font and title.font.size else None) or base * 1.4
        x = title.x if title.x is not None else 0.5
        xanchor = title.xanchor if title.xanchor not in (None, "auto") else (
            "left" if x < 1 / 3 else "right" if x > 2 / 3 else "center")
        if title.y is None or title.y == "auto":
            y_px, yanchor = top / 2, "middle"
        else:
            pad = title.pad.t if title.pad and title.pad.t else 0
            y_px, yanchor = (1 - title.y) * height + pad, title.yanchor if title.yanchor != "auto" else "top"
        boxes.append(("figure title", title.text, box(title.text, size, x * width, y_px, xanchor, yanchor)))
    for note in layout.annotations or ():
        if note.xref != "paper" or note.yref != "paper" or not note.text or note.showarrow:
            continue
        size = (note.font.size if note.font and note.font.size else None) or base
        xanchor = note.xanchor if note.xanchor not in (None, "auto") else (
            "left" if note.x < 1 / 3 else "right" if note.x > 2 / 3 else "center")
        yanchor = note.yanchor if note.yanchor not in (None, "auto") else (
            "bottom" if note.y < 1 / 3 else "top" if note.y > 2 / 3 else "middle")
        y_px = top + (1 - note.y) * plot_h - (note.yshift or 0)
        boxes.append(("title", note.text, box(note.text, size, left + note.x * plot_w, y_px, xanchor, yanchor)))
    problems = []
    for index, (kind, text, (x0, y0, x1, y1)) in enumerate(boxes):
        if x0 < -1 or x1 > width + 1:
            problems.append(f"{kind} {text!r} is cut at the {'left' if x0 < -1 else 'right'} edge of a "
                            f"{width} px figure")
        for other_kind, other, (u0, v0, u1, v1) in boxes[index + 1:]:
            if min(x1, u1) - max(x0, u0) > 1 and min(y1, v1) - max(y0, v0) > 1:
                problems.append(f"{kind} {text!r} overlaps {other_kind} {other!r} at {width} px")
    return problems


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, np.integer, np.floating))


__all__ = ["image_figure", "anomaly_map_figure", "anomaly_map_grid", "perturbation_figure", "training_curves_figure",
           "metrics_bar_figure", "summary_bar_figure", "metrics_table_figure", "score_histogram_figure", "map_range",
           "image_data_uri", "image_to_uint8", "to_numpy", "metric_label", "metric_legend", "metric_axis_title",
           "percent_range", "error_bars", "summary_hover", "title_overlaps", "METRIC_NAMES", "METRIC_MEANINGS",
           "PERCENT_KEYS", "MIN_SPAN"]
