"""``results_explorer``: benchmark rows as grouped bars, one metric at a time."""
from __future__ import annotations

from typing import Mapping, Sequence

import ipywidgets as widgets
import plotly.graph_objects as go

from .. import plots
from ..metrics import METRIC_KEYS
from ._view import PlotWidget


class ResultsExplorer(PlotWidget):
    """Controls ``metric`` and ``x`` (what goes on the axis: category or variant) over ``metrics_bar_figure``."""

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
        self.info.value = (f"{len(self.rows)} rows; bars: mean ± std over seeds; 'mean' = macro mean over categories. "
                           + plots.metric_legend([metric]))
        return plots.metrics_bar_figure(self.rows, metric, x=x, group=group)


def results_explorer(rows: Sequence[Mapping], backend: str | None = None, metric: str | None = None
                     ) -> ResultsExplorer:
    """Grouped bars of benchmark rows (``{"variant", "category", "seed", metrics...}``) with a metric picker.

    Returns:
        a displayable widget; ``.controls`` (metric, x), ``.figure``, ``.render()``.
    """
    return ResultsExplorer(rows, backend=backend, metric=metric)
