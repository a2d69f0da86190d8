"""Interactive widgets for the notebooks: core ipywidgets controls driving a plotly figure.

Each builder returns a displayable ``ipywidgets.VBox`` that also exposes ``.controls`` (name → control),
``.figure`` (the latest ``go.Figure``) and ``.render()``, so tests drive it exactly as a reader does. The figure
is drawn in a plotly ``FigureWidget`` where that works and in a core ``ipywidgets.Output`` in Colab (or when
``backend="output"``); see :func:`choose_backend`.
"""
from ._view import BACKENDS, FigureView, PlotWidget, choose_backend, in_colab
from .perturbation import PerturbationExplorer, perturbation_explorer
from .results import ResultsExplorer, results_explorer
from .training import TrainingDashboard, smooth_history, training_dashboard
from .viewer import MapViewer, map_viewer

__all__ = ["perturbation_explorer", "training_dashboard", "map_viewer", "results_explorer", "choose_backend",
           "in_colab", "BACKENDS", "FigureView", "PlotWidget", "PerturbationExplorer", "TrainingDashboard",
           "MapViewer", "ResultsExplorer", "smooth_history"]
