"""A self-contained HTML report of a run: the metrics table and anomaly-map heatmaps per category.

Maps of one category share one colour range (the minimum and maximum over its whole test set), so a
normal image's faint response is not stretched into a red blob. plotly.js is embedded once, so the file
opens offline.
"""
from __future__ import annotations

import html
from pathlib import Path

import torch

from .metrics import METRIC_KEYS
from .plots import anomaly_map_grid



def select_examples(labels: torch.Tensor, image_scores: torch.Tensor, per_kind: int = 4) -> list[int]:
    """Test images to show: the ``per_kind`` highest-scoring anomalous and normal images.

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


def write_report(path: str | Path, results: dict, category_results: dict, test_images: dict | None = None) -> Path:
    """Write ``report.html``.

    Args:
        results: the run's results dict (as written to results.json).
        category_results: {category: CategoryResult} computed in this session (maps are drawn for these).
        test_images: {category: (indices, (n, 3, S, S) pixels)} of the examples to draw, from ``select_examples``.
    """
    path = Path(path)
    test_images = test_images or {}
    parts = [_header(results), _metrics_table(results)]
    first_figure = True
    for category, entry in results["categories"].items():
        parts.append(f"<h2>{html.escape(category)}</h2>")
        result = category_results.get(category)
        if result is None or category not in test_images:
            parts.append("<p>Maps not shown: this category was computed in an earlier session (see results.json).</p>")
            continue
        indices, images = test_images[category]
        zmin, zmax = float(result.anomaly_maps.min()), float(result.anomaly_maps.max())  # whole test set
        titles = [f"{result.defects[i]} · score {float(result.image_scores[i]):.3f}" for i in indices]
        masks = None if result.masks is None else result.masks[indices]
        figure = anomaly_map_grid(images, result.anomaly_maps[indices], masks, zmin=zmin, zmax=zmax,
                                  titles=titles, cols=4)
        parts.append(f"<p>Colour range for the whole test set: [{zmin:.3f}, {zmax:.3f}]. White outline: ground "
                     "truth.</p>")
        parts.append(figure.to_html(full_html=False, include_plotlyjs=first_figure))
        first_figure = False
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>apt_lab report</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
            ".warn{background:#fee;border:2px solid #c00;padding:1em;font-weight:bold}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


def _header(results: dict) -> str:
    b = results["backbone"]
    lines = [f"<h1>apt_lab run: {html.escape(results['name'])}</h1>",
             f"<p>Dataset <b>{html.escape(results['dataset'])}</b>, method <b>{results['method']}</b>, "
             f"backbone <b>{html.escape(b['name'])}</b> ({html.escape(str(b['tag'] or 'no pretrained tag'))}), k = {results['k']} shots, "
             f"seed {results['seed']}, evaluated at {results['eval_resolution']}×{results['eval_resolution']} px.</p>"]
    if not results["pretrained"]:
        lines.append("<p class='warn'>Pretrained weights were unavailable: this run used RANDOM weights. The numbers "
                     "measure the pipeline, not APT's accuracy.</p>")
    return "\n".join(lines)


def _metrics_table(results: dict) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("category", *METRIC_KEYS))
    rows = list(results["categories"].items()) + [("mean", {"metrics": results.get("mean", {})})]
    body = []
    for category, entry in rows:
        cells = "".join(f"<td>{'' if entry['metrics'].get(c) is None else format(entry['metrics'][c], '.4f')}</td>"
                        for c in METRIC_KEYS)
        body.append(f"<tr><td>{html.escape(category)}</td>{cells}</tr>")
    return f"<h2>Metrics</h2><table><tr>{head}</tr>{''.join(body)}</table>"
