"""A self-contained HTML report of a run: the metrics table and anomaly-map heatmaps per category.

Maps of one category share one colour range (the minimum and maximum over its whole test set), so a
normal image's faint response is not stretched into a red blob. plotly.js is embedded once, so the file
opens offline.
"""
from __future__ import annotations

import html
from pathlib import Path

from .checkpoint import write_if_changed
from .metrics import METRIC_KEYS, format_metric, metric_rows
from .pipeline import load_examples, read_results
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
    exactly the same page (same bytes: figures get fixed ids, and an unchanged page is not rewritten). The page goes
    through a temporary file and an atomic rename: an interrupted write (even SIGKILL) leaves the previous report
    intact.
    """
    folder = Path(folder)
    results = read_results(folder)
    if results is None:
        raise FileNotFoundError(f"{folder / 'results.json'} not found: {folder} is not a run folder (or no category "
                                "has finished yet). Run apt-lab demo/run first.")
    parts = [_header(results), _metrics_table(results)]
    first_figure = True
    for number, category in enumerate(results["categories"]):
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
        parts.append(figure.to_html(full_html=False, include_plotlyjs=first_figure, div_id=f"maps-{number}"))
        first_figure = False
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>apt_lab report</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
            ".warn{background:#fee;border:2px solid #c00;padding:1em;font-weight:bold}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    target = Path(path) if path is not None else folder / "report.html"
    write_if_changed(target, page)
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


def write_sweep_report(folder: str | Path) -> Path:
    """``<folder>/report.html`` of a sweep: its caption, the paper table (mean ± std over seeds) and the image
    AUROC of every method and shot count per category as bars, all read from the sweep folder."""
    from .plots import metrics_bar_figure, metrics_table_figure
    from .sweep import TABLE_METRICS, format_cell, read_cells, sweep_table, table_caption

    folder = Path(folder)
    cells = list(read_cells(folder).values())
    if not cells:
        raise FileNotFoundError(f"{folder} holds no finished sweep cells (cells.jsonl); run apt-lab sweep first.")
    rows = [{"method": r["method"], "shots": r["shots"], "category": r["category"],
             **{m: format_cell(r.get(m)) for m in TABLE_METRICS}} for r in sweep_table(cells)]
    table = metrics_table_figure(rows, columns=["method", "shots", "category", *TABLE_METRICS])
    bars = metrics_bar_figure([{"variant": f"{c['method']} k={c['shots']}", "category": c["category"],
                                "seed": c["seed"], **c["metrics"]} for c in cells], metric="image_auroc")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>apt_lab sweep</title></head>"
            "<body style='font-family:system-ui,sans-serif;margin:2em'>"
            f"<h1>apt_lab sweep: {html.escape(folder.name)}</h1><p>{html.escape(table_caption(folder))}</p>"
            + table.to_html(full_html=False, include_plotlyjs=True, div_id="sweep-table")
            + bars.to_html(full_html=False, include_plotlyjs=False, div_id="sweep-bars") + "</body></html>")
    target = folder / "report.html"
    write_if_changed(target, page)
    return target
