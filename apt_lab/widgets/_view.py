"""Where a widget's plotly figure is drawn: a ``go.FigureWidget`` or a plain ``ipywidgets.Output``.

JupyterLab, VS Code and classic Jupyter render plotly's ``FigureWidget`` (an anywidget since plotly 6): traces
update in place, cheap and smooth. Colab renders core ipywidgets but third-party widgets only after its custom
widget manager is enabled, and not reliably, so there every apt_lab widget draws into a core ``Output`` instead
and re-renders the whole figure on each change. ``choose_backend`` picks automatically; ``backend=`` or the
environment variable ``APT_LAB_WIDGET_BACKEND`` force one.
"""
from __future__ import annotations

import html
import json
import os
import re
import sys

import ipywidgets as widgets
import plotly.graph_objects as go
import plotly.io as pio

BACKENDS = ("figurewidget", "output")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # the mimetype frontends with a widget manager render
IPYWIDGETS_7 = widgets.__version__.startswith("7.")  # Colab still ships ipywidgets 7 (displayed differently)


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def choose_backend(backend: str | None = None) -> str:
    """``"figurewidget"`` or ``"output"``: the given one, else ``APT_LAB_WIDGET_BACKEND``, else Colab → output,
    else figurewidget when plotly's FigureWidget can be built (needs anywidget), else output."""
    backend = backend or os.environ.get("APT_LAB_WIDGET_BACKEND") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: use 'figurewidget' (plotly FigureWidget, updates in place), "
                             "'output' (core ipywidgets.Output, re-rendered; works in Colab) or None (automatic)")
        return backend
    if in_colab():
        return "output"
    try:
        go.FigureWidget()
    except Exception:  # anywidget missing or too old: plain Output works everywhere
        return "output"
    return "figurewidget"


def _kernel_running() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipywidgets
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def mimebundle(fig: go.Figure) -> dict:
    """What a notebook frontend needs to draw ``fig``: plotly's own mimetype (JupyterLab, VS Code; plotly.js comes
    with the frontend extension) and an HTML fallback that loads plotly.js from its CDN (Colab, classic)."""
    data = json.loads(pio.to_json(fig, validate=False))
    return {
        "application/vnd.plotly.v1+json": {**data, "config": {"responsive": True}},
        "text/html": fig.to_html(full_html=False, include_plotlyjs="cdn"),
        "text/plain": f"<plotly figure: {len(fig.data)} traces>",
    }


class FigureView:
    """Holds the latest figure and shows it through the chosen backend.

    Attributes:
        backend: "figurewidget" or "output".
        widget: the ipywidget to put in a layout (a ``go.FigureWidget`` or an ``ipywidgets.Output``).
        figure: the last ``go.Figure`` given to :meth:`show` (what tests inspect).
        renders: how many times :meth:`show` ran.
    """

    def __init__(self, backend: str | None = None):
        self.backend = choose_backend(backend)
        self.figure: go.Figure | None = None
        self.renders = 0
        if self.backend == "figurewidget":
            self.widget = go.FigureWidget()
        else:
            self.widget = widgets.Output(layout=widgets.Layout(min_height="200px"))

    def show(self, fig: go.Figure) -> go.Figure:
        """Draw ``fig``: in place in a FigureWidget, or by clearing and re-displaying the Output."""
        self.figure = fig
        self.renders += 1
        if self.backend == "figurewidget":
            self._update_figurewidget(fig)
        else:
            if _kernel_running():  # outside a kernel (unit tests) there is nowhere to draw
                from IPython.display import display

                self.widget.clear_output(wait=True)
                with self.widget:
                    display(mimebundle(fig), raw=True)
        return fig

    def _update_figurewidget(self, fig: go.Figure) -> None:
        target = self.widget
        same = len(target.data) == len(fig.data) and all(a.type == b.type for a, b in zip(target.data, fig.data))
        with target.batch_update():
            if same:  # update traces in place: the browser re-draws without rebuilding the plot
                for old, new in zip(target.data, fig.data):
                    old.update(new.to_plotly_json(), overwrite=True)
            else:
                target.data = ()
                target.add_traces(list(fig.data))
            target.layout = fig.layout


class PlotWidget(widgets.VBox):
    """Base of every apt_lab widget: a row of core controls above one plotly figure.

    Attributes:
        controls: name → ipywidget; set ``controls[name].value`` and the figure is redrawn.
        view: the :class:`FigureView`; ``figure`` is its latest ``go.Figure``, ``backend`` its backend.
        info: an ``ipywidgets.HTML`` line under the controls with the numbers behind the picture.
    """

    def __init__(self, controls: dict, backend: str | None = None, columns: int = 3):
        self.controls = dict(controls)
        self.view = FigureView(backend)
        self.info = widgets.HTML()
        items = list(self.controls.values())
        rows = [widgets.HBox(items[i:i + columns]) for i in range(0, len(items), columns)]
        super().__init__(rows + [self.info, self.view.widget])
        self._display_id: str | None = None  # set on the first display (see _ipython_display_)
        self.add_class("apt-lab-widget")
        for control in items:
            control.observe(self._on_change, names="value")

    @property
    def figure(self) -> go.Figure | None:
        return self.view.figure

    @property
    def backend(self) -> str:
        return self.view.backend

    @property
    def info_text(self) -> str:
        """The info line as plain text, e.g. for ``print`` (``info.value`` is HTML with ``<b>`` tags)."""
        return html.unescape(re.sub(r"<[^>]+>", "", self.info.value))

    def static_html(self) -> str:
        """The info line and the current figure as HTML: what pages without a widget manager show (the docs site,
        nbviewer). The figure needs plotly.js on the page (``window.Plotly``); it is not embedded."""
        plot = pio.to_html(self.figure, include_plotlyjs=False, full_html=False) if self.figure is not None else ""
        return f'<div class="apt-lab-static"><p>{self.info.value}</p>{plot}</div>'

    def _repr_mimebundle_(self, **kwargs):
        """The live widget (frontends with a widget manager show it) and :meth:`static_html` as ``text/html``."""
        parent = getattr(super(), "_repr_mimebundle_", None)  # ipywidgets 8; 7 builds the same bundle in display
        bundle = dict(parent(**kwargs)) if parent is not None else {
            "text/plain": repr(self)[:110], WIDGET_VIEW: {"version_major": 2, "version_minor": 0,
                                                          "model_id": self._model_id}}
        if WIDGET_VIEW in bundle:
            bundle["text/html"] = self.static_html()
        return bundle

    def _ipython_display_(self, **kwargs):
        """Display under a display id (IPython calls this before any repr), so :meth:`refresh_static` can later
        replace the static copy of this output with the current picture."""
        from IPython.display import display

        if self._display_id is None:
            self._display_id = f"apt-lab-{self.model_id}"
        display(self._repr_mimebundle_(), raw=True, display_id=self._display_id)
        if IPYWIDGETS_7:
            self._handle_displayed(**kwargs)

    def refresh_static(self) -> bool:
        """Replace the static copy (``text/html``) of every place this widget was displayed with the current
        picture, through IPython's ``update_display``; True when it was displayed. What a page without a kernel
        shows (the docs site, nbviewer, a saved notebook) is otherwise the picture at display time — for a live
        training dashboard an empty one. Frontends with a widget manager redraw the same live widget."""
        if self._display_id is None or not _kernel_running():
            return False
        from IPython.display import update_display

        update_display(self._repr_mimebundle_(), raw=True, display_id=self._display_id)
        return True

    def _on_change(self, change) -> None:
        self.render()

    def build_figure(self) -> go.Figure:  # pragma: no cover - every widget overrides it
        raise NotImplementedError

    def render(self) -> go.Figure:
        """Rebuild the figure from the current control values and draw it; returns the figure."""
        return self.view.show(self.build_figure())
