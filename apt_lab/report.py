"""A self-contained HTML report of any run folder (a run or a sweep): what ran, the paper table, a chart, and the
anomaly maps each cell kept — all read from the folder (:mod:`apt_lab.store`), never from a live process. plotly.js
is written once beside the page (``plotly.min.js``), so the page opens offline and stays small.

Maps of one cell share one colour range (the minimum and maximum over its whole test set), so a normal image's
faint response is not stretched into a red blob. Nothing here loads torch.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from .data.files import inside, write_if_changed
from .metrics import format_metric
from .store import PLOTLY_JS, TABLE_METRICS, caption, format_cell, read_run, table_rows

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
         "margin-bottom:1em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}tr.mean td{font-weight:bold;border-top:2px solid #555;"
         "background:#f4f4f4}.warn{background:#fee;border:2px solid #c00;padding:1em;font-weight:bold}"
         ".legend{color:#444;font-size:90%}")


def random_weights_banner(backbone) -> str | None:
    """The loud notice every face prints when a backbone fell back to random weights (None when it did not)."""
    reason = getattr(backbone, "fallback_reason", None)
    if reason is None:
        return None
    line = "!" * 100
    return (f"\n{line}\n!! PRETRAINED WEIGHTS UNAVAILABLE — running {backbone.name} with RANDOM WEIGHTS.\n!! {reason}\n"
            "!! Scores below measure the pipeline, not APT's accuracy; every cell records \"pretrained\": false.\n"
            f"{line}\n")


def write_report(folder: str | Path, repair: bool = False) -> Path:
    """Write ``<folder>/report.html`` for any run folder, entirely from what the run left on disk.

    A rerun draws exactly the same page (figures get fixed ids; an unchanged page is not rewritten), and the page
    goes through a temporary file and an atomic rename: an interrupted write leaves the previous report intact.
    """
    from .plots import metric_label, metric_legend

    store, identity, cells = read_run(folder, repair)
    rows = table_rows(identity, cells.values())
    parts = [_header(store.folder, identity, cells), f"<p>{html.escape(caption(identity, cells))}</p>",
             _table(rows), f"<p class='legend'>{html.escape(metric_legend(TABLE_METRICS, percent=True))}</p>"]
    figures = [_bars(rows)] if len(rows) > 1 else []
    figures += [(f"{metric_label('image_auroc')} against {key}", "Mean over categories; error bars: std over seeds.",
                 setting_figure(identity, rows, key)) for key in numeric_settings(identity)]
    figures += _maps(store.folder, identity, cells)
    for number, (title, note, figure) in enumerate(figures):
        parts.append(f"<h2>{html.escape(title)}</h2>" + (f"<p>{html.escape(note)}</p>" if note else ""))
        parts.append(figure.to_html(full_html=False, include_plotlyjs="directory" if number == 0 else False,
                                    div_id=f"figure-{number}"))
    if figures:  # plotly.js once beside the page (opens offline; the page itself stays small)
        from plotly.offline import get_plotlyjs

        write_if_changed(PLOTLY_JS, get_plotlyjs(), store.folder)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>apt_lab: {html.escape(store.folder.name)}"
            f"</title><style>{STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>")
    write_if_changed("report.html", page, store.folder)
    return store.folder / "report.html"


def _header(folder: Path, identity: dict, cells: dict) -> str:
    backbone = identity["config"]["backbone"]
    random = not cells or not all(c["pretrained"] for c in cells.values())
    weights = "RANDOM weights" if random else f"pretrained weights ({backbone['pretrained']})"
    methods = ", ".join(identity["variants"])
    lines = [f"<h1>apt_lab: {html.escape(folder.name)}</h1>"]
    if random:
        lines.append("<p class='warn'>RANDOM weights: pretrained weights were unavailable (or not asked for), so "
                     "these numbers measure the pipeline, not APT's accuracy.</p>")
    lines.append(f"<p>Dataset <b>{html.escape(identity['dataset'])}</b> · methods <b>{html.escape(methods)}</b> · "
                 f"backbone <b>{html.escape(backbone['name'])}</b> with <b>{weights}</b> · shots "
                 f"{identity['shots']} · seeds {identity['seeds']}.</p>")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    from .plots import metric_label

    head = "".join(f"<th>{html.escape(metric_label(c))}</th>"
                   for c in ("method", "shots", "category", "n", *TABLE_METRICS))
    body = []
    for row in rows:
        cells = [html.escape(row["method"]), str(row["shots"]), html.escape(row["category"]), str(row["n"]),
                 *[format_cell(row.get(m)) for m in TABLE_METRICS]]
        kind = " class='mean'" if row.get("mean") else ""
        body.append(f"<tr{kind}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _bars(rows: list[dict], metric: str = "image_auroc"):
    """Bars of one metric per category (and the mean), one colour per (method, shots), ± std where n ≥ 2; in
    percent like the table."""
    import plotly.graph_objects as go

    from .plots import metric_label

    figure = go.Figure()
    for method, shots in dict.fromkeys((r["method"], r["shots"]) for r in rows):
        chosen = [r for r in rows if (r["method"], r["shots"]) == (method, shots) and metric in r]
        figure.add_trace(go.Bar(
            x=[r["category"] for r in chosen], y=[r[metric][0] * 100 for r in chosen],
            error_y=dict(type="data", array=[(r[metric][1] or 0) * 100 for r in chosen], visible=True),
            name=f"{method}, {shots} shots" if shots else f"{method}, zero-shot"))
    figure.update_layout(barmode="group", yaxis=dict(title=f"{metric_label(metric)} (%)", range=[0, 102]), height=360,
                         margin=dict(l=50, r=10, t=10, b=40), legend=dict(orientation="h", y=-0.15))
    return f"{metric_label(metric)} per category", None, figure


def numeric_settings(identity: dict) -> list[str]:
    """The varied settings (``--vary``) with two or more numeric values: what a metric can be plotted against."""
    return [key for key, values in identity.get("vary", {}).items()
            if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)]


def setting_figure(identity: dict, rows: list[dict], key: str, metric: str = "image_auroc"):
    """The macro mean of ``metric`` (± std over seeds, in percent) against a varied numeric setting ``key``: one
    line per method and shot count (and per value of any other varied setting). ``rows``: :func:`table_rows`."""
    import plotly.graph_objects as go

    from .plots import metric_label

    lines: dict[str, list[tuple[float, tuple]]] = {}
    for row in rows:
        settings = identity["variants"][row["method"]]["settings"]
        if not row.get("mean") or key not in settings or metric not in row:
            continue
        others = "".join(f" {k}={v}" for k, v in settings.items() if k in identity["vary"] and k != key)
        lines.setdefault(f"{row['method'].split(' ')[0]}{others}, {row['shots']} shots", []).append(
            (settings[key], row[metric]))
    figure = go.Figure()
    for name, points in lines.items():
        points.sort(key=lambda point: point[0])
        figure.add_trace(go.Scatter(x=[x for x, _ in points], y=[m * 100 for _, (m, _) in points], name=name,
                                    mode="lines+markers", error_y=dict(type="data", visible=True,
                                                                       array=[(sd or 0) * 100 for _, (_, sd) in points])))
    figure.update_layout(xaxis_title=key, yaxis=dict(title=f"{metric_label(metric)} (%)"), height=360, margin=dict(l=50, r=10, t=10, b=40))
    return figure


def _maps(folder: Path, identity: dict, cells: dict) -> list[tuple]:
    """One map grid per category: the first cell (plan order) that kept example maps."""
    from .plots import anomaly_map_grid

    figures, shown = [], set()
    for record in cells.values():
        if record["category"] in shown:
            continue
        examples = _load_examples(folder, record["artefacts"])
        if examples is None:
            continue
        shown.add(record["category"])
        zmin, zmax = (float(v) for v in examples["colour_range"])  # the whole test set's range
        titles = [f"{defect} · {float(value):.3f}" for defect, value in zip(examples["defects"],
                                                                           examples["image_scores"])]
        masks = examples.get("masks")
        figure = anomaly_map_grid(examples["images"], examples["anomaly_maps"], None if masks is None else masks > 0,
                                  zmin=zmin, zmax=zmax, titles=titles, cols=4, max_side=56, title=None)
        note = (f"{record['key']}: the highest-scoring anomalous and normal test images (title: defect · image "
                f"score). One colour range for the whole test set: [{format_metric(zmin, 3)}, "
                f"{format_metric(zmax, 3)}]. White outline: ground truth.")
        figures.append((record["category"], note, figure))
    return figures


def _load_examples(folder: Path, artefacts: list[str]) -> dict | None:
    """A cell's example maps (numpy arrays + ``defects``), or None when it kept none or the file is unreadable."""
    from safetensors import SafetensorError, safe_open

    names = [p for p in artefacts if p.endswith("examples.safetensors")]
    if not names:
        return None
    try:
        path = inside(folder, names[0])
        with safe_open(str(path), framework="numpy") as handle:
            out = {key: handle.get_tensor(key) for key in handle.keys()}
            out["defects"] = json.loads(handle.metadata()["defects"])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
    out["images"] = out["images"].astype("float32") / 255
    out["anomaly_maps"] = out["anomaly_maps"].astype("float32")
    return out
