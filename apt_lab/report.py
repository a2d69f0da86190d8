"""A self-contained HTML report of any run folder (a run or a sweep): what ran, the paper table, a figure per metric
(per category, and against each varied setting), the tuning losses and the anomaly maps each cell kept — all read
from the folder (:mod:`apt_lab.store`), never from a live process. plotly.js is written once per runs folder
(``runs/plotly.min.js``, :func:`plotly_script`), so every page opens offline and stays small, and twelve run folders
share one 4.8 MB script.

Every figure carries its own title (:func:`report_figures` lists them), metrics are in percent like the table, error
bars show the std over seeds only where there are two seeds or more (no caps), and a metric axis spans at least
``plots.MIN_SPAN`` points around the data, so a 0.2-point change within a 0.7-point std does not look like a trend.

Maps of one cell share one colour range (the minimum and maximum over its whole test set), so a normal image's
faint response is not stretched into a red blob. Nothing here loads torch.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import NamedTuple

from .data.files import Folder
from .metrics import format_metric
from .store import caption, format_cell, metrics_of, read_run, row_labels, table_header, table_rows

PLOTLY_JS = "plotly.min.js"  # one copy in the folder holding the run folders; each page loads ../plotly.min.js

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
         "margin-bottom:1em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}tr.mean td{font-weight:bold;border-top:2px solid #555;"
         "background:#f4f4f4}.warn{background:#fee;border:2px solid #c00;padding:1em;font-weight:bold}"
         ".legend{color:#444;font-size:90%}")


def plotly_script(run_folder: str | Path) -> str:
    """The ``src`` a page in ``run_folder`` loads plotly.js from: ``../plotly.min.js``, written into the run folder's
    parent (``runs/``) when absent or different. One copy serves every run folder beside it, and a page opened from
    disk still works offline.

    Example:
        >>> import tempfile
        >>> runs = Path(tempfile.mkdtemp())
        >>> plotly_script(runs / "a"), plotly_script(runs / "b"), sorted(p.name for p in runs.iterdir())
        ('../plotly.min.js', '../plotly.min.js', ['plotly.min.js'])
    """
    from plotly.offline import get_plotlyjs

    with Folder(Path(run_folder).absolute().parent, link=True) as parent:  # runs/ may be a link to a drive
        parent.write_if_changed(PLOTLY_JS, get_plotlyjs())
    return f"../{PLOTLY_JS}"


class ReportFigure(NamedTuple):
    """One figure of the report: the section (``<h2>``) it stands in, its title (also the figure's own layout title,
    so a figure is self-describing wherever it is shown), the note printed above it (None: no note) and the
    figure."""

    section: str
    title: str
    note: str | None
    figure: object  # plotly.graph_objects.Figure


def write_report(folder: str | Path, repair: bool = False) -> Path:
    """Write ``<folder>/report.html`` for any run folder, entirely from what the run left on disk.

    A rerun draws exactly the same page (figures get fixed ids; an unchanged page is not rewritten), and the page
    goes through a temporary file and an atomic rename: an interrupted write leaves the previous report intact.
    """
    from .plots import metric_legend

    with Folder(folder) as opened, opened.lock():  # a writer: not while a run writes into the folder
        _, identity, cells = read_run(opened, repair)
        rows = table_rows(identity, cells.values())
        metrics = metrics_of(identity)
        parts = [_header(opened.path, identity, cells), f"<p>{html.escape(caption(identity, cells))}</p>",
                 _table(identity, rows), f"<p class='legend'>{html.escape(metric_legend(metrics, percent=True))}</p>",
                 _comparison(identity, cells)]
        section = None
        for number, (heading, _, note, figure) in enumerate(_figures(opened, identity, cells, rows)):
            if heading != section:
                parts.append(f"<h2>{html.escape(heading)}</h2>")
                section = heading
            parts.append(f"<p>{html.escape(note)}</p>" if note else "")
            script = plotly_script(opened.path) if number == 0 else False  # the page loads plotly.js once
            parts.append(figure.to_html(full_html=False, include_plotlyjs=script, div_id=f"figure-{number}"))
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>apt_lab: {html.escape(opened.path.name)}"
                f"</title><style>{STYLE}</style></head><body>" + "\n".join(p for p in parts if p) + "</body></html>")
        opened.write_if_changed("report.html", page)
        return opened.path / "report.html"


def _comparison(identity: dict, cells: dict) -> str:
    """The table's paired differences to the reference and the component view (:mod:`apt_lab.store`), and the
    note where two variants computed the same thing — the same numbers ``table.md`` prints, as HTML."""
    from .store import components, paired_differences, reference_of, same_computation_note

    if identity.get("experiment") == "severity":
        return ""
    parts, note = [], same_computation_note(cells.values())
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")

    def table(head: list[str], rows: list[list]) -> str:
        return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows) + "</table>")

    def interval(d: dict) -> str:
        low, high = (None, None) if d["low"] is None else (100 * d["low"], 100 * d["high"])
        return "" if low is None else f"[{format_metric(low, 1)}, {format_metric(high, 1)}]"
    differences = paired_differences(identity, cells.values())
    if differences:
        parts.append(f"<h2>Paired differences to {html.escape(reference_of(identity))}</h2><p>Image AUROC, percentage "
                     "points: the mean over the (category, seed) pairs both variants ran, with a 95 % bootstrap "
                     "interval — over the pairs, or over the test images when there is one pair.</p>")
        parts.append(table(["variant", "shots", "pairs", "Δ image AUROC (points)", "95 % interval", "resampled"],
                           [[d["variant"], d["shots"], d["n"], format_metric(100 * d["mean"], 1), interval(d),
                             d["over"] or ""] for d in differences]))
    view = components(identity, cells.values())
    if view:
        parts.append("<h2>Components</h2><p>What switching each on adds (image AUROC, percentage points), paired over "
                     "(category, seed) and both states of the other component.</p>")
        parts.append(table(["component", "shots", "pairs", "Δ image AUROC (points)", "95 % interval"],
                           [[c["component"], c["shots"], c["n"], format_metric(100 * c["mean"], 1), interval(c)]
                            for c in view]))
    return "\n".join(parts)


def report_figures(folder: str | Path) -> list[ReportFigure]:
    """Every figure :func:`write_report` draws for ``folder``, in page order, without writing anything."""
    with Folder(folder) as opened:
        _, identity, cells = read_run(opened)
        return _figures(opened, identity, cells, table_rows(identity, cells.values()))


def _figures(folder: Folder, identity: dict, cells: dict, rows: list[dict]) -> list[ReportFigure]:
    """The report's figures: severity curves (the severity experiment) or one bar chart per metric (per category),
    one figure per metric against each varied numeric setting, the tuning losses, then the anomaly maps."""
    from .plots import MIN_SPAN

    present = [m for m in metrics_of(identity) if any(m in row for row in rows)]
    figures = []
    if identity.get("experiment") == "severity":
        figure = severity_figure(rows)
        figures.append(ReportFigure("Severity curves", figure.layout.title.text, "Each metric against the strength "
                                    "of the synthetic anomaly; dashed: the mean over the real defect types of the test "
                                    "set.", figure))
    elif len(rows) > 1:
        for number, metric in enumerate(present):
            figure = _bars(rows, metric)
            figures.append(ReportFigure("Per category", figure.layout.title.text, None if number else
                                        "Mean over seeds and ± their std (only where n ≥ 2), per category and the "
                                        "macro mean; one colour per method and shot count.", figure))
    for key in numeric_settings(identity):
        drawn = [setting_figure(identity, rows, key, metric) for metric in present]
        for number, figure in enumerate(f for f in drawn if f.data):
            figures.append(ReportFigure(f"Against {key}", figure.layout.title.text, None if number else
                                        f"The macro mean over categories against {key}; error bars: std over seeds "
                                        f"(only where n ≥ 2). Each axis spans at least {MIN_SPAN:g} points, so a "
                                        f"change within the error bars is not drawn as a trend.", figure))
    losses = loss_figure(identity, cells)
    if losses is not None:
        figures.append(ReportFigure("Tuning loss", losses.layout.title.text, "The loss of each tuned cell while its "
                                    "prompts were tuned; zero-shot cells tune nothing.", losses))
    return figures + _maps(folder, identity, cells)


def _header(folder: Path, identity: dict, cells: dict) -> str:
    backbones = [c["computes"]["config"]["backbone"] for c in cells.values()]
    backbone = backbones[0] if backbones else {"name": "?", "pretrained": None}
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


def _table(identity: dict, rows: list[dict]) -> str:
    from .plots import metric_label

    metrics = metrics_of(identity)
    head = "".join(f"<th>{html.escape(metric_label(c))}</th>" for c in table_header(identity, metrics))
    body = []
    for row in rows:
        cells = [*map(html.escape, row_labels(identity, row)), *[format_cell(row.get(m)) for m in metrics]]
        kind = " class='mean'" if row.get("mean") else ""
        body.append(f"<tr{kind}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _bars(rows: list[dict], metric: str = "image_auroc"):
    """Bars of one metric per category (and the mean), one colour per (method, shots), ± std only where n ≥ 2; in
    percent like the table."""
    from .plots import metric_label, summary_bar_figure

    groups: dict[str, list[tuple]] = {}
    for row in rows:
        if metric in row:
            name = f"{row['variant']}, {row['shots']} shots" if row["shots"] else f"{row['variant']}, zero-shot"
            groups.setdefault(name, []).append((row["category"], row[metric], row["n"]))
    figure = summary_bar_figure(groups, metric, title=f"{metric_label(metric)} per category", height=380)
    figure.update_layout(legend=dict(orientation="h", y=-0.15))
    return figure


SHORT = {"fpr_at_threshold": "false-pos. rate", "tpr_at_threshold": "detection rate"}  # fit four panels at 700 px


def severity_figure(rows: list[dict]):
    """The severity experiment's curves from :func:`~apt_lab.store.table_rows` of its folder: each metric (in
    percent, mean over seeds) against strength, one line per perturbation, one row of panels per category; the mean
    over the real defect types of the test set as a dashed grey line. A rate of one seed carries its 95 % Wilson
    interval (``<rate>_interval`` of the rows): error bars on each point, and a grey band around the test defects'
    false-positive rate (one set of test normals, so one interval for every defect type)."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    from .plots import metric_label
    from .store import SEVERITY_METRICS

    rows = [r for r in rows if not r.get("mean")]
    categories = list(dict.fromkeys(r["category"] for r in rows)) or ["-"]
    kinds = list(dict.fromkeys(r["perturbation"] for r in rows if r.get("strength") is not None))
    strengths = [r["strength"] for r in rows if r.get("strength") is not None] or [0.0]
    fig = make_subplots(rows=len(categories), cols=len(SEVERITY_METRICS), shared_xaxes=True,
                        vertical_spacing=0.3 / len(categories),
                        subplot_titles=[f"{c}<br>{SHORT.get(m, metric_label(m))}" for c in categories
                                        for m in SEVERITY_METRICS])
    fig.update_annotations(font_size=12)
    for i, category in enumerate(categories):
        for j, metric in enumerate(SEVERITY_METRICS):
            place, first = dict(row=i + 1, col=j + 1), i == 0 and j == 0
            for n, kind in enumerate(kinds):
                points = sorted((r["strength"], r[metric][0] * 100, r.get(f"{metric}_interval")) for r in rows
                                if r["category"] == category and r.get("perturbation") == kind
                                and r.get("strength") is not None and metric in r)
                bars = None if not any(b for *_, b in points) else dict(  # 95 % interval, percent
                    type="data", symmetric=False, thickness=1, width=0,
                    array=[None if b is None else b[1] * 100 - y for _, y, b in points],
                    arrayminus=[None if b is None else y - b[0] * 100 for _, y, b in points])
                fig.add_trace(go.Scatter(x=[x for x, *_ in points], y=[y for _, y, _ in points], error_y=bars,
                                         mode="lines+markers", name=kind, legendgroup=kind, showlegend=first,
                                         line=dict(color=qualitative.Plotly[n % len(qualitative.Plotly)])), **place)
            real = [r[metric][0] * 100 for r in rows if r["category"] == category and r.get("strength") is None
                    and metric in r]
            band = {r.get(f"{metric}_interval") for r in rows if r["category"] == category
                    and r.get("strength") is None and metric in r}
            if real and len(band) == 1 and None not in band:  # every defect type: one interval (the FPR)
                (low, high), ends = band.pop(), [min(strengths), max(strengths)]
                fig.add_trace(go.Scatter(x=ends + ends[::-1], y=[low * 100] * 2 + [high * 100] * 2, fill="toself",
                                         mode="none", fillcolor="rgba(128,128,128,0.15)", hoverinfo="skip",
                                         legendgroup="test", showlegend=False), **place)
            if real:
                fig.add_trace(go.Scatter(x=[min(strengths), max(strengths)], y=[sum(real) / len(real)] * 2,
                                         mode="lines", name="test defects (mean)", legendgroup="test",
                                         showlegend=first, line=dict(color="grey", dash="dash")), **place)
    fig.update_yaxes(range=[-3, 103])
    fig.update_xaxes(title_text="strength", row=len(categories))
    fig.update_yaxes(title_text="%", col=1)
    fig.update_layout(title=dict(text="Detection against anomaly strength (%)", y=0.995, yanchor="top"),
                      height=240 * len(categories) + 160, margin=dict(t=120, b=40))
    return fig


def numeric_settings(identity: dict) -> list[str]:
    """The varied settings (``--vary``) with two or more numeric values: what a metric can be plotted against."""
    return [key for key, values in identity.get("vary", {}).items()
            if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)]


def setting_figure(identity: dict, rows: list[dict], key: str, metric: str = "image_auroc", title: str | None = "auto"):
    """The macro mean of ``metric`` (± std over seeds where n ≥ 2, in percent) against a varied numeric setting
    ``key``: one line per method and shot count (and per value of any other varied setting). ``rows``:
    :func:`table_rows`. The y axis holds every error bar and spans at least ``plots.MIN_SPAN`` points.
    ``title``: "auto" = "<metric> against <key>"; None for a page that titles the figure itself."""
    import plotly.graph_objects as go

    from .plots import error_bars, metric_axis_title, metric_label, percent_range, summary_hover

    lines: dict[str, list[tuple]] = {}
    for row in rows:
        settings = identity["variants"][row["variant"]]["settings"]
        if not row.get("mean") or key not in settings or metric not in row:
            continue
        others = "".join(f" {k}={v}" for k, v in settings.items() if k in identity["vary"] and k != key)
        lines.setdefault(f"{row['variant'].split(' ')[0]}{others}, {row['shots']} shots", []).append(
            (settings[key], row[metric], row["n"]))
    figure = go.Figure()
    lows, highs = [], []
    for name, points in lines.items():
        points.sort(key=lambda point: point[0])
        means = [round(mean * 100, 9) for _, (mean, _), _ in points]
        stds = [std for _, (_, std), _ in points]
        lows += [m - (s or 0) * 100 for m, s in zip(means, stds)]
        highs += [m + (s or 0) * 100 for m, s in zip(means, stds)]
        figure.add_trace(go.Scatter(x=[x for x, _, _ in points], y=means, name=name, mode="lines+markers",
                                    error_y=error_bars(stds), customdata=[[format_cell(v), n] for _, v, n in points],
                                    hovertemplate=summary_hover(name).replace("%{x}", f"{key} = %{{x}}")))
    title = f"{metric_label(metric)} against {key}" if title == "auto" else title
    figure.update_layout(title=title, xaxis_title=key, height=360, margin=dict(l=50, r=10, t=40 if title else 10, b=40),
                         yaxis=dict(title=metric_axis_title(metric), range=percent_range(lows, highs)))
    return figure


def loss_figure(identity: dict, cells: dict):
    """The tuning loss of every tuned cell (its record's ``loss_curve``: [step, loss] pairs), one line per cell, one
    colour per variant (a legend entry per variant toggles its cells); None when no cell kept a curve."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    order = {name: number for number, name in enumerate(identity.get("variants", {}))}
    curves = [(record["variant"], record["key"], _loss_points(record.get("loss_curve"))) for record in cells.values()]
    curves = sorted((c for c in curves if c[2]), key=lambda c: order.get(c[0], len(order)))
    if not curves:
        return None
    figure, colours = go.Figure(), {}
    for variant, key, points in curves:
        first = variant not in colours
        colours.setdefault(variant, qualitative.Plotly[len(colours) % len(qualitative.Plotly)])
        figure.add_trace(go.Scatter(x=[x for x, _ in points], y=[y for _, y in points], mode="lines", name=variant,
                                    legendgroup=variant, showlegend=first, opacity=0.7,
                                    line=dict(color=colours[variant], width=1.5),
                                    hovertemplate=f"{html.escape(key)}<br>step %{{x}}: loss %{{y:.4g}}<extra></extra>"))
    cells_drawn = f"{len(curves)} cell" + ("s" if len(curves) != 1 else "")
    figure.update_layout(title=f"Tuning loss of each cell ({cells_drawn}; a colour per variant)",
                         xaxis_title="step", yaxis_title="loss", height=380, margin=dict(l=50, r=10, t=40, b=40))
    return figure


def _loss_points(curve) -> list[tuple[float, float]]:
    """A record's ``loss_curve`` as (step, loss) pairs; points that are not two finite numbers are left out (a
    reader validates what it reads).

    Example:
        >>> _loss_points([[0, 1.5], [10, 0.5], ["x", 1], [20, float("nan")]]), _loss_points(None)
        ([(0.0, 1.5), (10.0, 0.5)], [])
    """
    points = []
    for point in curve if isinstance(curve, list) else []:
        if isinstance(point, (list, tuple)) and len(point) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point):
            points.append((float(point[0]), float(point[1])))
    return points


def _maps(folder: Folder, identity: dict, cells: dict) -> list[ReportFigure]:
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
        masks = None if masks is None or not masks.any() else masks > 0  # (B, H, W) bool; none: no outline drawn
        title = f"Anomaly maps of {record['key']}"
        figure = anomaly_map_grid(examples["images"], examples["anomaly_maps"], masks,
                                  zmin=zmin, zmax=zmax, titles=titles, cols=4, max_side=56, title=title)
        note = (f"{record['key']}: the highest-scoring anomalous and normal test images (title: defect · image "
                f"score). One colour range for the whole test set: [{format_metric(zmin, 3)}, "
                f"{format_metric(zmax, 3)}]." + (" White outline: ground truth." if masks is not None else ""))
        figures.append(ReportFigure(f"Anomaly maps: {record['category']}", title, note, figure))
    return figures


def _load_examples(folder: Folder, artefacts: list[str]) -> dict | None:
    """A cell's example maps (numpy arrays + ``defects``), or None when it kept none or the file is unreadable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    names = [p for p in artefacts if p.endswith("examples.safetensors")]
    try:
        data = folder.read(names[0]) if names else None  # never through a link
        if data is None:
            return None
        out = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # safetensors: 8-byte length, JSON
        out["defects"] = json.loads(header["__metadata__"]["defects"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError):
        return None
    out["images"] = out["images"].astype("float32") / 255
    out["anomaly_maps"] = out["anomaly_maps"].astype("float32")
    return out
