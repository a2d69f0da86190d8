"""Every widget builder, driven as a reader would: set a control, check the figure changed accordingly."""
import json

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from apt_lab import widgets
from apt_lab.config import APTConfig
from apt_lab.widgets import choose_backend

BACKENDS = ["figurewidget", "output"]


def image_sources(fig):
    return [t.source for t in fig.data if t.type == "image"]


def test_choose_backend_explicit_env_and_colab(monkeypatch):
    assert choose_backend("output") == "output"
    assert choose_backend("figurewidget") == "figurewidget"
    with pytest.raises(ValueError, match="backend="):
        choose_backend("matplotlib")
    monkeypatch.setenv("APT_LAB_WIDGET_BACKEND", "output")
    assert choose_backend() == "output"
    monkeypatch.delenv("APT_LAB_WIDGET_BACKEND")
    assert choose_backend() == "figurewidget"  # anywidget is installed here
    monkeypatch.setitem(__import__("sys").modules, "google.colab", object())
    assert choose_backend() == "output"  # Colab: core ipywidgets only


@pytest.fixture(scope="module")
def normal_images(tiny_backbone):
    generator = torch.Generator().manual_seed(0)
    size = tiny_backbone.image_size
    base = torch.rand(2, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear").clamp(0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbation_explorer_redraws_on_every_control(tiny_backbone, normal_images, backend):
    config = APTConfig.preset("quick")
    explorer = widgets.perturbation_explorer(tiny_backbone, normal_images, config, backend=backend)
    assert isinstance(explorer, ipywidgets.VBox) and explorer.backend == backend
    assert set(explorer.controls) == {"image", "generator", "strength", "region", "seed"}
    if backend == "figurewidget":
        assert isinstance(explorer.view.widget, go.FigureWidget)
    else:
        assert isinstance(explorer.view.widget, ipywidgets.Output)
    first = image_sources(explorer.figure)
    assert len(first) == 3  # normal, perturbed, overlay
    mask_before = explorer.last.masks.clone()

    explorer.controls["seed"].value = 7  # new blob and noise
    assert not torch.equal(explorer.last.masks, mask_before)
    assert image_sources(explorer.figure)[1] != first[1]
    assert image_sources(explorer.figure)[0] == first[0]  # the normal image never changes

    explorer.controls["strength"].value = 0.0  # zero noise: pixels equal the original
    assert torch.allclose(explorer.last.images, normal_images[:1], atol=1e-6)
    explorer.controls["strength"].value = 1.0
    assert not torch.allclose(explorer.last.images, normal_images[:1], atol=1e-3)

    explorer.controls["region"].value = False  # anywhere in the image
    assert bool(explorer.last.roi.all())
    explorer.controls["generator"].value = "salt_pepper"
    assert explorer.last.generators == ["salt_pepper"]
    assert "salt_pepper" in explorer.figure.layout.title.text
    explorer.controls["image"].value = 1
    assert image_sources(explorer.figure)[0] != first[0]
    assert "mask covers" in explorer.info.value
    if backend == "figurewidget":  # the FigureWidget shows what the figure holds
        assert explorer.view.widget.layout.title.text == explorer.figure.layout.title.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_dashboard_callback_appends_and_redraws(backend):
    dashboard, callback = widgets.training_dashboard(backend=backend, min_interval=0.0)
    assert isinstance(dashboard, ipywidgets.VBox) and callback == dashboard.callback
    assert len(dashboard.figure.data) == 0  # nothing to plot yet
    for step in range(5):
        callback({"step": step, "loss": 1.0 / (step + 1), "focal": 0.3, "meta_loss": 0.1,
                  "conflict_rate": 0.25, "meta_drift": 0.01 * step, "seconds": 0.1})
    assert len(dashboard.history) == 5
    losses = {t.name: list(t.y) for t in dashboard.figure.data}
    assert losses["loss"] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert losses["meta_drift"][-1] == pytest.approx(0.04)
    assert "step 4" in dashboard.figure.layout.title.text and "step 4" in dashboard.info.value

    dashboard.controls["smooth"].value = 2  # moving average over 2 steps
    smoothed = {t.name: list(t.y) for t in dashboard.figure.data}["loss"]
    assert smoothed[1] == pytest.approx((1 + 1 / 2) / 2)
    dashboard.controls["log_y"].value = True
    assert dashboard.figure.layout.xaxis.type is None and dashboard.figure.layout.yaxis.type == "log"
    dashboard.reset()
    assert dashboard.history == [] and len(dashboard.figure.data) == 0


def test_training_dashboard_throttles_but_draws_the_last_step():
    dashboard, callback = widgets.training_dashboard(backend="output", total_steps=50, min_interval=3600)
    renders = dashboard.view.renders
    for step in range(50):
        callback({"step": step, "loss": 1.0})
    assert dashboard.view.renders == renders + 1  # only the last step drew (throttled otherwise)
    assert len(dashboard.figure.data[0].x) == 50


@pytest.fixture(scope="module")
def scored_set():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=generator)
    maps = torch.zeros(3, 32, 32)
    maps[1, 8:16, 8:16] = 1.0  # image 1: a strong square anomaly
    maps[2] = 0.2 * torch.rand(32, 32, generator=generator)  # image 2: faint noise only
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[1, 8:16, 8:16] = True
    return images, maps, masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_viewer_controls(scored_set, backend):
    images, maps, masks = scored_set
    viewer = widgets.map_viewer(images, maps, masks, image_scores=torch.tensor([0.1, 0.9, 0.3]),
                                labels=torch.tensor([0, 1, 0]), titles=["a", "b", "c"], threshold=0.5,
                                backend=backend)
    assert set(viewer.controls) == {"image", "threshold", "colour_range", "opacity"}
    heat = lambda: next(t for t in viewer.figure.data if t.type == "heatmap")  # noqa: E731

    viewer.controls["image"].value = 1
    assert "anomalous" in viewer.figure.layout.title.text and "0.900" in viewer.figure.layout.title.text
    assert viewer.controls["image"].options[1][0] == "#1 b · anomalous · score 0.900"
    assert "IoU with the ground truth 100.0%" in viewer.info.value  # the square, thresholded at 0.5, is the mask
    assert [t.name for t in viewer.figure.data].count("map ≥ threshold") == 1

    viewer.controls["image"].value = 2  # faint noise: global range keeps it blue, per image stretches it
    assert (heat().zmin, heat().zmax) == pytest.approx((0.0, 1.0))
    viewer.controls["colour_range"].value = "per image"
    assert heat().zmax == pytest.approx(float(maps[2].max()))

    viewer.controls["opacity"].value = 0.9
    assert heat().opacity == pytest.approx(0.9)
    viewer.controls["image"].value = 1
    viewer.controls["threshold"].value = 0.0  # everything above threshold: IoU = mask share
    assert "100.0% of pixels" in viewer.info.value
    contour = next(t for t in viewer.figure.data if t.name == "map ≥ threshold")
    assert contour.contours.start == pytest.approx(0.0)


def test_map_viewer_labels_fit_their_dropdown_and_colours_sit_beside_their_buttons(scored_set):
    """Issue 19: the image dropdown cut "#6 hole · anomalous · score 0.3…" (a fixed-width select), and "colours" sat
    on its own line above its buttons (ipywidgets 8 stacks a ToggleButtons' label). The browser test measures both
    in JupyterLab; here: the select is sized by its longest label and the toggle lays out in one row."""
    images, maps, masks = scored_set
    viewer = widgets.map_viewer(images, maps, masks, image_scores=torch.tensor([0.1, 0.9, 0.3]),
                                labels=torch.tensor([0, 1, 0]), titles=["a hole", "a long defect name", "good"])
    longest = max(len(label) for label, _ in viewer.controls["image"].options)
    assert f"{longest}" in viewer.controls["image"].layout.width or f"{longest + 3}ch" in viewer.controls[
        "image"].layout.width
    toggle = viewer.controls["colour_range"]
    assert toggle.layout.display == "flex" and toggle.layout.flex_flow == "row nowrap"


def test_map_viewer_rejects_mismatched_inputs(scored_set):
    images, maps, masks = scored_set
    with pytest.raises(ValueError, match="one map"):
        widgets.map_viewer(images[:2], maps, backend="output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_explorer_metric_and_axis(backend):
    rows = [{"variant": v, "category": c, "seed": s, "image_auroc": a + 0.01 * s, "pixel_auroc": 0.5}
            for v, a in (("human", 0.6), ("APT", 0.8)) for c in ("brick", "grass") for s in (0, 1)]
    explorer = widgets.results_explorer(rows, backend=backend)
    names = [t.name for t in explorer.figure.data]
    assert names == ["human", "APT"] and list(explorer.figure.data[1].x) == ["brick", "grass", "mean"]
    assert explorer.figure.data[1].y[0] == pytest.approx(80.5)  # percent, like every table
    explorer.controls["metric"].value = "pixel_auroc"
    assert explorer.figure.data[1].y[0] == pytest.approx(50)
    explorer.controls["x"].value = "variant"
    assert [t.name for t in explorer.figure.data] == ["brick", "grass", "mean"]  # mean over categories, per variant
    assert all("mean" not in list(t.x) for t in explorer.figure.data)  # never a mean across variants
    with pytest.raises(ValueError, match="no row holds a metric"):
        widgets.results_explorer([{"variant": "x"}], backend=backend)


def test_output_backend_mimebundle_is_json_and_html_that_loads_plotly_from_the_cdn():
    import re

    from apt_lab.plots import image_figure
    from apt_lab.widgets._view import mimebundle

    bundle = mimebundle(image_figure(np.zeros((3, 4, 4))))
    json.dumps(bundle["application/vnd.plotly.v1+json"])
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["type"] == "image"
    html = bundle["text/html"]
    # the fallback fetches plotly.js from its CDN (one <script src>) instead of embedding its ~4 MB
    sources = re.findall(r'<script[^>]*\ssrc="([^"]*)"', html)
    assert len(sources) == 1 and re.fullmatch(r"https://cdn\.plot\.ly/plotly-[0-9.]+\.min\.js", sources[0]), sources
    assert len(html) < 100_000 and "<html" not in html  # a fragment for a notebook cell, not a page
    assert "Plotly.newPlot(" in html and '"type":"image"' in html.replace(" ", "")  # and draws this figure


def test_perturbation_info_says_when_the_region_of_interest_is_off(tiny_backbone, normal_images):
    explorer = widgets.perturbation_explorer(tiny_backbone, normal_images, APTConfig.preset("quick"),
                                             backend="output")
    assert "(mask = region of interest ∩ random blob)" in explorer.info_text
    explorer.controls["region"].value = False
    assert "region of interest off" in explorer.info_text and "100%" not in explorer.info_text
    assert "<b>" not in explorer.info_text and explorer.info_text.startswith("gaussian, strength")
    assert "(mask = random blob)" in explorer.info_text


def test_map_viewer_reports_no_iou_on_a_normal_image(scored_set):
    images, maps, masks = scored_set
    viewer = widgets.map_viewer(images, maps, masks, threshold=0.1, backend="output")
    viewer.controls["image"].value = 2  # normal (empty mask), faint noise partly above 0.1
    assert "IoU" not in viewer.info_text and "false alarms" in viewer.info_text
    viewer.controls["threshold"].value = 1.0
    viewer.controls["image"].value = 0  # all zeros: nothing flagged
    assert "IoU" not in viewer.info_text and "nothing flagged" in viewer.info_text
    viewer.controls["image"].value = 1
    assert "IoU with the ground truth 100.0%" in viewer.info_text


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_explorer_mean_is_over_categories_on_both_axes(backend):
    rows = [{"variant": v, "category": c, "seed": 0, "image_auroc": a}
            for v, scores in (("human", (0.5, 0.7)), ("APT", (0.9, 0.6))) for c, a in zip(("brick", "grass"), scores)]
    explorer = widgets.results_explorer(rows, backend=backend)
    explorer.controls["x"].value = "variant"
    bars = {t.name: list(t.y) for t in explorer.figure.data}
    assert all(list(t.x) == ["human", "APT"] for t in explorer.figure.data)  # no "mean" variant
    assert bars["mean"] == pytest.approx([60, 75]) and "over categories" in explorer.info_text


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_explorer_shows_percent_with_one_decimal(backend):
    """Issue 25: 05's explorer showed fractions with three decimals (and np.std caps) while the tables print
    percent with one decimal and a sample std only where n ≥ 2."""
    rows = [{"variant": v, "category": c, "seed": s, "image_auroc": a + 0.01 * s}
            for v, a, seeds in (("human", 0.61234, (0,)), ("APT", 0.8, (0, 1))) for c in ("brick", "grass")
            for s in seeds]
    explorer = widgets.results_explorer(rows, backend=backend)
    text = explorer.info_text
    assert "macro mean over categories: human 61.2 %, APT 80.5 ± 0.7 %" in text, text
    assert "in percent" in text and "0.61" not in text and "0.80" not in text
    human, apt = explorer.figure.data
    assert explorer.figure.layout.yaxis.title.text == "image AUROC (%)"
    assert [c[0] for c in apt.customdata] == ["80.5 ± 0.7", "80.5 ± 0.7", "80.5 ± 0.7"]
    assert human.error_y.visible is False and apt.error_y.width == 0  # n = 1: no bar; no caps anywhere
    explorer.controls["x"].value = "variant"
    assert "human 61.2 %, APT 80.5 ± 0.7 %" in explorer.info_text


def test_display_bundle_holds_the_live_widget_and_a_static_copy(scored_set, monkeypatch):
    """Pages without a widget manager (the docs, nbviewer) show text/html: the info line and the current figure."""
    images, maps, masks = scored_set
    viewer = widgets.map_viewer(images, maps, masks, backend="output")
    bundle = viewer._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == viewer.model_id
    static = bundle["text/html"]
    assert viewer.info.value in static and "Plotly.newPlot" in static and "<script src=" not in static
    shown = []  # both ipywidgets 7 and 8 display through _ipython_display_, under a display id
    monkeypatch.setattr("IPython.display.display",
                        lambda obj, raw=False, display_id=None: shown.append((obj, raw, display_id)))
    viewer._ipython_display_()
    assert shown and shown[0][1] and set(shown[0][0]) == set(bundle) and shown[0][2] == f"apt-lab-{viewer.model_id}"


def test_training_dashboard_leaves_the_finished_curves_as_its_static_copy(monkeypatch):
    """Issue 19: the executed docs page of notebook 03 showed the dashboard as displayed before training —
    "waiting for the first tuning step…", "no steps yet", one empty axis. On the last step the dashboard replaces
    its output's static copy (update_display under its display id) with the finished curves."""
    from apt_lab.widgets import _view

    shown, updated = [], []
    monkeypatch.setattr(_view, "_kernel_running", lambda: True)
    monkeypatch.setattr("IPython.display.display",  # the output backend draws through display() too: no id
                        lambda obj, raw=False, display_id=None: display_id and shown.append((obj, display_id)))
    monkeypatch.setattr("IPython.display.update_display",
                        lambda obj, raw=False, display_id=None: updated.append((obj, display_id)))
    dashboard, callback = widgets.training_dashboard(backend="output", total_steps=5, min_interval=3600)
    dashboard._ipython_display_()
    (first, display_id), = shown
    assert "waiting for the first tuning step" in first["text/html"] and "no steps yet" in first["text/html"]
    for step in range(4):
        callback({"step": step, "loss": 1.0 / (step + 1), "conflict_rate": 0.5, "meta_drift": 0.01 * step})
    assert updated == []  # nothing replaced while training
    callback({"step": 4, "loss": 0.2, "conflict_rate": 0.5, "meta_drift": 0.04})
    (final, final_id), = updated
    assert final_id == display_id and "widget-view+json" in "".join(final)  # the live widget stays live
    static = final["text/html"]
    assert "step 4" in static and "no steps yet" not in static and "waiting for" not in static
    assert "Plotly.newPlot" in static and '"x":[0,1,2,3,4]' in static.replace(" ", "")
    without_total, feed = widgets.training_dashboard(backend="output")  # total unknown: finish() after the loop
    without_total._ipython_display_()
    feed({"step": 0, "loss": 1.0})
    assert len(updated) == 1
    without_total.finish()
    assert len(updated) == 2 and "step 0" in updated[1][0]["text/html"]


def test_widgets_run_on_the_ipywidgets_version_under_test():
    """scripts/check_ipywidgets7.py runs this file again with Colab's ipywidgets 7 and plotly 5 first on the path."""
    import os

    import plotly

    expected = os.environ.get("APT_LAB_EXPECT_IPYWIDGETS")
    if expected:
        assert ipywidgets.__version__.startswith(expected + "."), ipywidgets.__version__
        assert plotly.__version__.startswith(os.environ["APT_LAB_EXPECT_PLOTLY"] + "."), plotly.__version__
    assert int(ipywidgets.__version__.split(".")[0]) in (7, 8)
