"""``training_dashboard``: losses, gradient conflicts, meta-prompt drift and anchor similarity, live while tuning."""
from __future__ import annotations

import time
from typing import Callable

import ipywidgets as widgets
import plotly.graph_objects as go

from .. import plots
from ._view import PlotWidget


class TrainingDashboard(PlotWidget):
    """Fed one record per tuning step through :meth:`callback`; redraws at most every ``min_interval`` seconds
    (and on the last step when ``total_steps`` is known), so drawing never dominates a fast CPU run.

    Controls: ``log_y`` (log-scale losses), ``smooth`` (moving-average window over steps).

    Attributes:
        history: the records received, in order (the same dicts ``TuneResult.history`` holds).
    """

    def __init__(self, backend: str | None = None, total_steps: int | None = None, min_interval: float = 0.5):
        controls = {
            "log_y": widgets.Checkbox(value=False, description="log-scale losses"),
            "smooth": widgets.IntSlider(1, 1, 25, description="smooth", continuous_update=False),
        }
        self.history: list[dict] = []
        self.total_steps, self.min_interval = total_steps, min_interval
        self._last_draw = 0.0
        super().__init__(controls, backend)
        self.render()

    def callback(self, record: dict) -> None:
        """Append one tuning record (``step``, ``loss``, ``conflict_rate``, ``anchor_similarity``, ...); maybe redraw.
        The last step (``total_steps - 1``) calls :meth:`finish`."""
        self.history.append(dict(record))
        if self.total_steps is not None and record.get("step", -1) >= self.total_steps - 1:
            self.finish()
        elif time.monotonic() - self._last_draw >= self.min_interval:
            self.render()

    def finish(self) -> go.Figure:
        """Draw the finished curves from :attr:`history` and make them the output's static copy too, so an executed
        notebook saved or rendered without a kernel (the docs page) shows the training, not the empty dashboard
        it was displayed as. Called on the last step when ``total_steps`` is known; call it after the loop
        otherwise."""
        figure = self.render()
        self.refresh_static()
        return figure

    def reset(self) -> None:
        """Forget the history (before a second run into the same dashboard)."""
        self.history.clear()
        self.render()

    def build_figure(self) -> go.Figure:
        window = int(self.controls["smooth"].value)
        history = smooth_history(self.history, window) if window > 1 else self.history
        if self.history:
            last = self.history[-1]
            parts = [f"{key} {last[key]:.4f}" for key in ("loss", "meta_loss", "conflict_rate", "anchor_similarity",
                                                          "meta_drift")
                     if isinstance(last.get(key), (int, float))]
            self.info.value = f"step {last.get('step', len(self.history) - 1)}: " + ", ".join(parts)
        else:
            self.info.value = "waiting for the first tuning step…"
        return plots.training_curves_figure(history, log_y=bool(self.controls["log_y"].value))

    def render(self) -> go.Figure:
        self._last_draw = time.monotonic()
        return super().render()


def smooth_history(history: list[dict], window: int) -> list[dict]:
    """Trailing moving average of every numeric key except ``step`` over ``window`` records.

    Example:
        >>> [r["loss"] for r in smooth_history([{"loss": 1.0}, {"loss": 3.0}, {"loss": 5.0}], 2)]
        [1.0, 2.0, 4.0]
    """
    out = []
    for index, record in enumerate(history):
        recent = history[max(0, index - window + 1):index + 1]
        smoothed = dict(record)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [r[key] for r in recent if isinstance(r.get(key), (int, float))]
                smoothed[key] = sum(values) / len(values)
        out.append(smoothed)
    return out


def training_dashboard(backend: str | None = None, total_steps: int | None = None,
                       min_interval: float = 0.5) -> tuple[TrainingDashboard, Callable[[dict], None]]:
    """A live training dashboard and the callback that feeds it.

    Pass the callback to ``tune_prompts(..., callbacks=[callback])``; each call appends one record and redraws
    (throttled to ``min_interval`` seconds); on step ``total_steps - 1`` it draws the finished curves and makes them
    the output's static copy (:meth:`TrainingDashboard.finish`). Without ``total_steps``, call ``dashboard.finish()``
    after training.

    Returns:
        (dashboard, callback): the displayable widget (``.controls``, ``.figure``, ``.history``) and its
        ``callback(record: dict)``.
    """
    dashboard = TrainingDashboard(backend=backend, total_steps=total_steps, min_interval=min_interval)
    return dashboard, dashboard.callback
