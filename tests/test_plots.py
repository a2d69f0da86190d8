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
    assert list(apt.y) == pytest.approx([0.9, 0.6, 0.75]) and list(apt.error_y.array) == pytest.approx([0.1, 0, 0])
    assert list(human.x) == ["brick", "mean"] and fig.layout.title.text == "image AUROC"


def test_metrics_table_formats_numbers():
    fig = plots.metrics_table_figure([{"variant": "APT", "metrics": {"image_auroc": 0.91234}, "k": 4},
                                      {"variant": "human", "image_auroc": float("nan"), "k": 4}])
    header, cells = fig.data[0].header.values, fig.data[0].cells.values
    assert list(header) == ["variant", "k", "image AUROC"]
    assert list(cells[2]) == ["0.912", "nan"]


def test_score_histogram_splits_labels_and_marks_threshold():
    fig = plots.score_histogram_figure(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1]), 0.5)
    assert [t.name for t in fig.data] == ["normal", "anomalous"]
    assert list(fig.data[1].x) == pytest.approx([0.8, 0.9]) and fig.layout.shapes[0].x0 == 0.5


def test_a_constant_map_gets_no_colour_bar_spanning_one_to_one_point_000001():
    """01's region of interest of a texture is all ones: a bar from 1 to 1.000001 pretends there is a range."""
    images, full = torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8)
    fig = plots.anomaly_map_grid(images, full, full.bool())
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert not any(h.showscale for h in heats) and fig.layout.title.text == "every map is constant: 1"
    single = plots.anomaly_map_figure(images[0], full[0])
    assert not single.data[1].showscale
    varying = plots.anomaly_map_grid(images, torch.rand(2, 8, 8), None)
    assert sum(bool(t.showscale) for t in varying.data if t.type == "heatmap") == 1


def test_perturbation_figure_names_the_yellow_outline_only_when_it_is_drawn():
    image, mask = torch.full((3, 6, 6), 0.5), torch.zeros(6, 6, dtype=torch.bool)
    whole = plots.perturbation_figure(image, image, mask, roi=torch.ones(6, 6, dtype=torch.bool))
    titles = [a.text for a in whole.layout.annotations]
    assert titles[0] == "normal (region of interest: whole image)" and "region of interest" not in [t.name for t in whole.data]
    assert plots.perturbation_figure(image, image, mask).layout.annotations[0].text == "normal"


def test_metrics_bar_never_averages_across_variants():
    rows = [{"variant": v, "category": c, "seed": 0, "image_auroc": a}
            for v, scores in (("human", (0.5, 0.7)), ("APT", (0.9, 0.6))) for c, a in zip(("brick", "grass"), scores)]
    by_variant = plots.metrics_bar_figure(rows, "image_auroc", x="variant", group="category")
    assert all("mean" not in list(t.x) for t in by_variant.data)        # no bar "mean of human and APT"
    assert [t.name for t in by_variant.data] == ["brick", "grass", "mean"]
    mean = by_variant.data[2]
    assert list(mean.x) == ["human", "APT"] and list(mean.y) == pytest.approx([0.6, 0.75])  # over categories
    by_category = plots.metrics_bar_figure(rows, "image_auroc")
    assert [list(t.x) for t in by_category.data] == [["brick", "grass", "mean"]] * 2
    assert by_category.data[1].y[2] == pytest.approx(0.75)
