"""A self-contained HTML report of a run: the metrics table and anomaly-map heatmaps per category.

Maps of one category share one colour range (the minimum and maximum over its whole test set), so a
normal image's faint response is not stretched into a red blob. plotly.js is embedded once, so the file
opens offline.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from .checkpoint import atomic_write
from .metrics import METRIC_KEYS, format_metric, metric_rows
from .pipeline import load_examples
from .plots import anomaly_map_grid


def random_weights_banner(backbone) -> str | None:
    """The loud notice every face prints when a backbone fell back to random weights (None when it did not)."""
    reason = getattr(backbone, "fallback_reason", None)
    if reason is None:
        return None
    line = "!" * 100
    return (f"\n{line}\n!! PRETRAINED WEIGHTS UNAVAILABLE — running {backbone.name} with RANDOM WEIGHTS.\n!! {reason}\n"
            "!! Scores below measure the pipeline, not APT's accuracy; results record \"pretrained\": false.\n"
            f"{line}\n")


def write_report(folder: str | Path, path: str | Path | None = None) -> Path:
    """Write ``<folder>/report.html`` for a run folder, entirely from what the run left on disk.

    Reads ``results.json`` and the example maps each category saved under ``examples/`` (see
    :func:`apt_lab.pipeline.save_examples`), so a finished run can be redrawn at any time and a rerun draws
    exactly the same page. The page goes through a temporary file and an atomic rename: an interrupted write
    leaves the previous report intact.
    """
    folder = Path(folder)
    results = json.loads((folder / "results.json").read_text())
    parts = [_header(results), _metrics_table(results)]
    first_figure = True
    for category in results["categories"]:
        parts.append(f"<h2>{html.escape(category)}</h2>")
        examples = load_examples(folder / "examples" / category)
        if examples is None:
            parts.append(f"<p>Maps not shown: {html.escape(str(folder / 'examples' / category))}.safetensors is "
                         "missing or unreadable (rerun the category with --overwrite to regenerate it).</p>")
            continue
        zmin, zmax = (float(v) for v in examples["colour_range"])  # the whole test set's range
        titles = [f"{defect} · score {float(value):.3f}"
                  for defect, value in zip(examples["defects"], examples["image_scores"])]
        masks = examples.get("masks")
        figure = anomaly_map_grid(examples["images"], examples["anomaly_maps"], None if masks is None else masks.bool(),
                                  zmin=zmin, zmax=zmax, titles=titles, cols=4)
        parts.append(f"<p>Colour range for the whole test set: [{zmin:.3f}, {zmax:.3f}]. White outline: ground "
                     "truth.</p>")
        parts.append(figure.to_html(full_html=False, include_plotlyjs=first_figure))
        first_figure = False
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>apt_lab report</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
            ".warn{background:#fee;border:2px solid #c00;padding:1em;font-weight:bold}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    target = Path(path) if path is not None else folder / "report.html"
    atomic_write(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return target


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
    body = []
    for category, metrics in metric_rows(results):
        cells = "".join(f"<td>{format_metric(metrics.get(c))}</td>" for c in METRIC_KEYS)
        body.append(f"<tr><td>{html.escape(category)}</td>{cells}</tr>")
    return f"<h2>Metrics</h2><table><tr>{head}</tr>{''.join(body)}</table>"
