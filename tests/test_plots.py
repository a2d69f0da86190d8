"""The plotly builders shared by notebooks, widgets and the HTML report: structure, colour ranges, sizes."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from apt_lab import plots


def decode(source):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))))


def test_image_round_trips_through_png():
    image = torch.zeros(3, 4, 5)
    image[0, 1, 2] = 1.0  # one red pixel at row 1, column 2
    fig = plots.image_figure(image, title="t", mask=torch.ones(4, 5, dtype=torch.bool))
    pixels = decode(fig.data[0].source)
    assert pixels.shape == (4, 5, 3) and tuple(pixels[1, 2]) == (255, 0, 0) and pixels.sum() == 255
    assert [t.type for t in fig.data] == ["image", "contour"] and fig.layout.title.text == "t"
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 at the top, like the image
    with pytest.raises(ValueError, match="expected"):
        plots.image_figure(np.zeros((4, 4)))


def test_anomaly_map_figure_range_opacity_threshold():
    amap = torch.linspace(0, 2, 64).reshape(8, 8)
    fig = plots.anomaly_map_figure(torch.rand(3, 8, 8), amap, opacity=0.3, threshold=1.0)
    heat = fig.data[1]
    assert (heat.zmin, heat.zmax, heat.opacity) == (0.0, 2.0, 0.3)  # own range when none given
    assert [t.name for t in fig.data] == ["image", "anomaly map", "map ≥ threshold"]  # no mask → no outline
    fixed = plots.anomaly_map_figure(torch.rand(3, 8, 8), amap, mask=amap > 1.5, zmin=0, zmax=10)
    assert (fixed.data[1].zmin, fixed.data[1].zmax) == (0, 10)
    assert fixed.data[2].name == "ground truth"
    flat = plots.anomaly_map_figure(torch.rand(3, 8, 8), torch.ones(8, 8))  # constant map: valid range
    assert flat.data[1].zmax > flat.data[1].zmin


def test_grid_shares_one_colour_range_by_default():
    maps = torch.stack([torch.full((8, 8), 0.1), torch.full((8, 8), 0.9)])
    maps[0, 0, 0] = 0.0
    images = torch.rand(2, 3, 8, 8)
    fig = plots.anomaly_map_grid(images, maps, None, titles=["a", "b"])
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert [(h.zmin, h.zmax) for h in heats] == [pytest.approx((0.0, 0.9))] * 2
    assert sum(bool(h.showscale) for h in heats) == 1
    per_image = plots.anomaly_map_grid(images, maps, None, per_image_range=True)
    assert [t for t in per_image.data if t.type == "heatmap"][1].zmax == pytest.approx(0.9 + 1e-6)
    with pytest.raises(ValueError, match="one map"):
        plots.anomaly_map_grid(images, maps[:1], None)


def test_grid_shrinks_large_maps_but_keeps_them_aligned():
    fig = plots.anomaly_map_grid(torch.rand(1, 3, 224, 224), torch.rand(1, 224, 224), torch.ones(1, 224, 224) > 0,
                                 max_side=112)
    heat = fig.data[1]
    assert np.asarray(heat.z).shape == (112, 112) and heat.dx == 2 and heat.x0 == 0.5
    full = plots.anomaly_map_figure(torch.rand(3, 224, 224), torch.rand(224, 224))
    assert np.asarray(full.data[1].z).shape == (224, 224)


def test_perturbation_figure_marks_the_mask_red():
    image = torch.full((3, 6, 6), 0.5)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[2:4, 2:4] = True
    roi = torch.zeros(6, 6, dtype=torch.bool)
    roi[1:5, 1:5] = True
    fig = plots.perturbation_figure(image, image, mask, roi=roi)
    names = [t.name for t in fig.data]
    assert names == ["normal", "region of interest", "perturbed", "overlay", "mask"]
    overlay = decode(fig.data[3].source)
    assert overlay[3, 3, 0] > overlay[3, 3, 1] and overlay[0, 0, 0] == overlay[0, 0, 1]


def test_training_curves_skip_missing_keys():
    history = [{"step": i, "loss": 1.0 / (i + 1), "conflict_rate": 0.5} for i in range(4)]
    fig = plots.training_curves_figure(history, log_y=True)
    assert [t.name for t in fig.data] == ["loss", "conflict_rate"]
    assert list(fig.data[0].x) == [0, 1, 2, 3] and fig.layout.yaxis.type == "log"
    assert "step 3" in fig.layout.title.text
    assert len(plots.training_curves_figure([]).data) == 0


def test_metrics_bar_mean_std_and_macro_mean():
    rows = [{"variant": "APT", "category": c, "seed": s, "image_auroc": v}
            for c, values in (("brick", (0.8, 1.0)), ("grass", (0.6, 0.6))) for s, v in enumerate(values)]
    rows.append({"variant": "human", "category": "brick", "seed": 0, "metrics": {"image_auroc": 0.5}})
    fig = plots.metrics_bar_figure(rows, "image_auroc")
    apt, human = fig.data
    assert list(apt.x) == ["brick", "grass", "mean"]
    # percent; the sample std like the tables (ddof = 1); the mean's std over the per-seed macro means (70, 80)
    assert list(apt.y) == pytest.approx([90, 60, 75]) and list(apt.error_y.array) == pytest.approx(
        [14.1421356, 0, 7.0710678])
    assert [list(c) for c in apt.customdata] == [["90.0 ± 14.1", 2], ["60.0 ± 0.0", 2], ["75.0 ± 7.1", 2]]
    assert list(human.x) == ["brick", "mean"] and fig.layout.title.text.startswith("image AUROC per category")
    assert human.error_y.visible is False  # one seed: no error bar at all
    assert fig.layout.yaxis.title.text == "image AUROC (%)"
    assert list(fig.layout.yaxis.range) == pytest.approx([0, 90 + 14.1421356 + 2])  # 0–100 and every error bar


def test_metrics_table_formats_numbers():
    fig = plots.metrics_table_figure([{"variant": "APT", "metrics": {"image_auroc": 0.91234}, "k": 4},
                                      {"variant": "human", "image_auroc": float("nan"), "k": 4}])
    header, cells = fig.data[0].header.values, fig.data[0].cells.values
    assert list(header) == ["variant", "k", "image AUROC (%)"]
    assert list(cells[2]) == ["91.2", "nan"]  # percent with one decimal, as every table prints a metric


def test_score_histogram_splits_labels_and_marks_threshold():
    fig = plots.score_histogram_figure(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1]), 0.5)
    assert [t.name for t in fig.data] == ["normal", "anomalous"]
    assert list(fig.data[1].x) == pytest.approx([0.8, 0.9]) and fig.layout.shapes[0].x0 == 0.5


def test_a_constant_map_gets_no_colour_bar_spanning_one_to_one_point_000001():
    """01's region of interest of a texture is all ones: a bar from 1 to 1.000001 pretends there is a range."""
    images, full = torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8)
    fig = plots.anomaly_map_grid(images, full, full.bool())
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert not any(h.showscale for h in heats) and fig.layout.title.text == "every map is constant: 1.000"
    single = plots.anomaly_map_figure(images[0], full[0])
    assert not single.data[1].showscale
    varying = plots.anomaly_map_grid(images, torch.rand(2, 8, 8), None)
    assert sum(bool(t.showscale) for t in varying.data if t.type == "heatmap") == 1


def test_perturbation_figure_names_the_yellow_outline_only_when_it_is_drawn():
    image, mask = torch.full((3, 6, 6), 0.5), torch.zeros(6, 6, dtype=torch.bool)
    whole = plots.perturbation_figure(image, image, mask, roi=torch.ones(6, 6, dtype=torch.bool))
    titles = [a.text for a in whole.layout.annotations]
    assert titles[0] == "normal (region of<br>interest: whole image)" and "region of interest" not in [
        t.name for t in whole.data]
    assert plots.perturbation_figure(image, image, mask).layout.annotations[0].text == "normal"


def test_metrics_bar_never_averages_across_variants():
    rows = [{"variant": v, "category": c, "seed": 0, "image_auroc": a}
            for v, scores in (("human", (0.5, 0.7)), ("APT", (0.9, 0.6))) for c, a in zip(("brick", "grass"), scores)]
    by_variant = plots.metrics_bar_figure(rows, "image_auroc", x="variant", group="category")
    assert all("mean" not in list(t.x) for t in by_variant.data)        # no bar "mean of human and APT"
    assert [t.name for t in by_variant.data] == ["brick", "grass", "mean"]
    mean = by_variant.data[2]
    assert list(mean.x) == ["human", "APT"] and list(mean.y) == pytest.approx([60, 75])  # over categories
    by_category = plots.metrics_bar_figure(rows, "image_auroc")
    assert [list(t.x) for t in by_category.data] == [["brick", "grass", "mean"]] * 2
    assert by_category.data[1].y[2] == pytest.approx(75)


def test_histogram_classes_share_bins():
    """Issue 19: six normal scores in 0.26–0.29 were binned on their own range (0.002-wide bars) under the
    anomalous ones; every class must be counted in the same bins."""
    normal = [0.26, 0.265, 0.27, 0.28, 0.285, 0.29]
    anomalous = [0.3, 0.5, 0.7, 0.9]
    fig = plots.score_histogram_figure(torch.tensor(normal + anomalous), torch.tensor([0] * 6 + [1] * 4), bins=8)
    bins = [(t.xbins.start, t.xbins.end, t.xbins.size) for t in fig.data]
    assert bins[0] == bins[1] and bins[0][0] == pytest.approx(0.26) and bins[0][2] == pytest.approx(0.64 / 8)
    assert bins[0][1] > float(torch.tensor(0.9))  # the maximum (as float32) falls inside the last bin
    counts = np.histogram(normal, bins=np.arange(8 + 1) * bins[0][2] + bins[0][0])[0]
    assert counts[0] == 6  # the six normal scores in one bin as wide as the anomalous ones'
    single = plots.score_histogram_figure(torch.tensor([0.5, 0.5]))
    assert single.data[0].xbins.size > 0


@pytest.mark.parametrize("width", [700, 1000, 1400])
def test_training_curve_titles_neither_overlap_nor_cut(width):
    """Issue 19: at the docs column (700 px) two panel titles were printed over each other; in JupyterLab the third
    was cut ("meta-prompt drift, anchor simila")."""
    history = [{"step": i, "loss": 1.0, "conflict_rate": 0.5, "meta_drift": 0.1, "anchor_similarity": 0.9}
               for i in range(3)]
    assert plots.title_overlaps(plots.training_curves_figure(history), width) == []
    assert plots.title_overlaps(plots.training_curves_figure([]), width) == []


def test_title_overlaps_finds_what_the_old_figures_did_wrong():
    from plotly.subplots import make_subplots

    old = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "losses", "gradient conflicts (SMGS acts)", "meta-prompt drift, anchor similarity"))
    old.update_layout(title="prompt tuning — step 39, loss 0.1234", height=380, margin=dict(l=40, r=10, t=70, b=40))
    problems = plots.title_overlaps(old, 700)
    assert any("overlaps" in p for p in problems) and any("cut at the right edge" in p for p in problems)
    assert any("cut at the right edge" in p for p in plots.title_overlaps(old, 1000))


def test_grid_title_leaves_room_for_the_panel_titles_or_goes():
    images, maps = torch.rand(4, 3, 16, 16), torch.full((4, 16, 16), 0.5)
    maps[0, 0, 0], maps[1, 0, 0] = 0.00183, 1.0
    titles = ["good · score 0.123", "good · score 0.456", "hole · score 0.789", "crack · score 0.912"]
    fig = plots.anomaly_map_grid(images, maps, titles=titles)
    assert fig.layout.title.text == "one colour range for all: [0.002, 1.000]"  # the precision of every other range
    assert plots.title_overlaps(fig, 700) == [] and plots.title_overlaps(fig, 1200) == []
    bare = plots.anomaly_map_grid(images, maps, titles=titles, title=None)  # the run report states the range itself
    assert bare.layout.title.text is None and bare.layout.margin.t < fig.layout.margin.t
    assert plots.title_overlaps(bare, 700) == []


def test_metric_names_and_legend_live_in_one_place():
    assert plots.metric_label("image_auroc") == "image AUROC" and plots.metric_label("anything") == "anything"
    for key in ("encode_s", "tune_s", "pool_s", "score_s", "evaluate_s"):  # notebook 07's table showed these raw
        assert "_" not in plots.metric_label(key) and "(s)" in plots.metric_label(key)
    legend = plots.metric_legend()
    assert all(family in legend for family in ("AUROC", "AP", "F1-max", "AUPRO")) and "\n" not in legend
    assert plots.metric_legend(["image_auroc"]).startswith("AUROC: ") and "AUPRO" not in plots.metric_legend(
        ["image_auroc"])
    assert plots.metric_legend(["tune_s"]) == ""


def test_metrics_table_readable_names_legend_and_mean_rows_set_apart():
    rows = [{"category": "brick", "image_auroc": 0.8, "tune_s": 1.5}, {"category": "grass", "image_auroc": 0.6,
                                                                        "tune_s": 1.0},
            {"category": "mean", "image_auroc": 0.7, "tune_s": 1.25}]
    fig = plots.metrics_table_figure(rows)
    table = fig.data[0]
    assert list(table.header.values) == ["category", "image AUROC (%)", "tune prompts (s)"]
    assert list(table.cells.values[1]) == ["80.0", "60.0", "<b>70.0</b>"]  # the mean row in bold
    assert list(table.cells.values[2]) == ["1.500", "1.000", "<b>1.250</b>"]  # seconds are not a metric
    fills = table.cells.fill.color[0]
    assert fills[2] != fills[0] == fills[1]  # and shaded
    assert "AUROC: chance" in fig.layout.annotations[0].text  # the legend under the table
    plain = plots.metrics_table_figure(rows, legend=False, set_apart=lambda row: False)
    assert not plain.layout.annotations and "<b>" not in "".join(plain.data[0].cells.values[1])


@pytest.mark.parametrize("width", [700, 1000])
def test_perturbation_figure_and_table_legend_fit_the_docs_column(width):
    """Issue 19 (found by the docs check): 01's perturbation figure printed its title over its panel titles and cut
    the outer ones at 700 px; the table legend ran past the right edge."""
    image, mask = torch.full((3, 6, 6), 0.5), torch.zeros(6, 6, dtype=torch.bool)
    roi = torch.zeros(6, 6, dtype=torch.bool)
    roi[1:5, 1:5] = True
    for region in (roi, torch.ones(6, 6, dtype=torch.bool), None):
        fig = plots.perturbation_figure(image, image, mask, roi=region, title="salt_pepper · strength 0.40 · seed 0")
        assert plots.title_overlaps(fig, width) == []
    table = plots.metrics_table_figure([{"method": "APT", **{key: 0.5 for key in plots.METRIC_NAMES}}])
    assert plots.title_overlaps(table, width) == []


def test_every_figure_has_a_title_by_default():
    """Issue 24: 03's and 04's tables and single maps had no title. A builder is any public function of plots
    returning a figure; each must be listed here, and each gives its figure a title unless told None."""
    import inspect

    image, amap, mask = torch.rand(3, 8, 8), torch.rand(8, 8), torch.rand(8, 8) > 0.5
    rows = [{"variant": "APT", "category": "brick", "image_auroc": 0.9}]
    built = {"image_figure": plots.image_figure(image),
             "anomaly_map_figure": plots.anomaly_map_figure(image, amap),
             "anomaly_map_grid": plots.anomaly_map_grid(image[None], amap[None]),
             "perturbation_figure": plots.perturbation_figure(image, image, mask),
             "training_curves_figure": plots.training_curves_figure([{"step": 0, "loss": 1.0}]),
             "metrics_bar_figure": plots.metrics_bar_figure(rows),
             "summary_bar_figure": plots.summary_bar_figure({"APT": [("brick", (0.9, None), 1)]}),
             "metrics_table_figure": plots.metrics_table_figure(rows),
             "score_histogram_figure": plots.score_histogram_figure([0.1, 0.9], [0, 1])}
    builders = {name for name, f in vars(plots).items()
                if inspect.isfunction(f) and f.__module__ == plots.__name__ and not name.startswith("_")
                and inspect.signature(f).return_annotation in ("go.Figure", plots.go.Figure)}
    assert builders == set(built)
    untitled = [name for name, fig in built.items() if not fig.layout.title.text]
    assert not untitled, untitled
    assert plots.metrics_table_figure(rows, title=None).layout.title.text is None  # a page that names it itself


def test_metric_figures_and_tables_show_percent_with_one_decimal():
    """Issue 25: 04's metric table and 05's results explorer showed fractions with 3–6 decimals while every table
    printed percent. A metric is a fraction in the API and percent with one decimal on screen."""
    rows = [{"variant": "APT", "category": c, "seed": s, "image_auroc": v, "aupro": 0.123456, "tune_s": 2.0}
            for c, values in (("brick", (0.81234, 0.8)), ("grass", (0.7, 0.7))) for s, v in enumerate(values)]
    bars = plots.metrics_bar_figure(rows, "aupro")
    assert bars.layout.yaxis.title.text == "AUPRO (%)" and bars.data[0].customdata[0][0] == "12.3 ± 0.0"
    assert "%{customdata[0]} %" in bars.data[0].hovertemplate and ".3f" not in bars.data[0].hovertemplate
    table = plots.metrics_table_figure([{"method": "APT", "image_auroc": 0.95321, "aupro": 1.0, "tune_s": 2.0}])
    assert list(table.data[0].header.values) == ["method", "image AUROC (%)", "AUPRO (%)", "tune prompts (s)"]
    assert [list(c) for c in table.data[0].cells.values[1:]] == [["95.3"], ["100.0"], ["2.000"]]
    assert "All metrics in percent" in table.layout.annotations[0].text.replace("<br>", " ")


@pytest.mark.parametrize("lows, highs", [([79.3, 80.0], [80.7, 80.2]), ([99.5], [100.2]), ([0.0], [1.0]),
                                         ([20.0, 60.0], [40.0, 95.0]), ([50.0], [50.0])])
def test_percent_range_holds_the_error_bars_and_never_magnifies_noise(lows, highs):
    """Issue 25: an autoscaled axis drew a 0.17-point change with a 0.7 std as a steady rise."""
    low, high = plots.percent_range(lows, highs)
    assert high - low >= plots.MIN_SPAN and low < min(lows) and high > max(highs)
    assert low >= 0 or min(lows) < 1  # kept above 0 unless the data sit at it
    assert high <= 101.5 or max(highs) > 100


def test_error_bars_have_no_caps_and_none_for_one_seed():
    assert plots.error_bars([None, None]) == {"visible": False}
    bars = plots.error_bars([0.01, None])
    assert bars["width"] == 0 and bars["array"] == [1.0, 0.0]  # no cap; a zero-length bar without a cap: nothing
