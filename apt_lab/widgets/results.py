"""``results_explorer``: benchmark rows as grouped bars, one metric at a time."""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import ipywidgets as widgets
import plotly.graph_objects as go

from .. import plots
from ..metrics import METRIC_KEYS
from ._view import PlotWidget


class ResultsExplorer(PlotWidget):
    """Controls ``metric`` and ``x`` (what goes on the axis: category or variant) over ``metrics_bar_figure``: bars
    in percent with one decimal (hover), like every table, from rows whose metrics are fractions."""

    def __init__(self, rows: Sequence[Mapping], backend: str | None = None, metric: str | None = None):
        self.rows = [dict(row) for row in rows]
        present = [m for m in METRIC_KEYS if any(plots._metric(row, m) is not None for row in self.rows)]
        if not present:
            raise ValueError("results_explorer: no row holds a metric such as 'image_auroc'; pass a run folder's "
                             "cells as rows ({'variant': c['method'], **c['metrics']}) or dicts with metric keys")
        controls = {
            "metric": widgets.Dropdown(options=[(plots.metric_label(m), m) for m in present],
                                       value=metric if metric in present else present[0], description="metric"),
            "x": widgets.ToggleButtons(options=["category", "variant"], value="category", description="axis"),
        }
        super().__init__(controls, backend, columns=2)
        self.render()

    def build_figure(self) -> go.Figure:
        metric, x = self.controls["metric"].value, self.controls["x"].value
        group = "variant" if x == "category" else "category"
        figure = plots.metrics_bar_figure(self.rows, metric, x=x, group=group)
        means = {}  # variant → its macro-mean bar's text, read off the figure whichever way it is drawn
        for trace in figure.data:
            for at, (text, _) in zip(trace.x, trace.customdata):
                if "mean" in (at, trace.name):
                    means[trace.name if at == "mean" else at] = text
        listed = ", ".join(f"{html.escape(str(name))} {text} %" for name, text in means.items())
        summary = f"<b>{plots.metric_label(metric)}</b>, macro mean over categories: {listed}. " if means else ""
        self.info.value = (summary + f"{len(self.rows)} rows; bars: mean ± std over seeds (std only where n ≥ 2). "
                           + plots.metric_legend([metric], percent=True))
        return figure


def results_explorer(rows: Sequence[Mapping], backend: str | None = None, metric: str | None = None
                     ) -> ResultsExplorer:
    """Grouped bars of benchmark rows (``{"variant", "category", "seed", metrics...}``) with a metric picker.

    Returns:
        a displayable widget; ``.controls`` (metric, x), ``.figure``, ``.render()``.
    """
    return ResultsExplorer(rows, backend=backend, metric=metric)
