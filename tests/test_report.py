"""The HTML report's own parts: one plotly.js per runs folder, a map note that says only what is drawn, and figures
that carry their own title, a metric per figure in percent, an axis that does not magnify noise, no error bar where
n = 1, and the tuning losses. Run folders are built by hand (no model), so every number is checkable by eye."""
from __future__ import annotations

import json

import numpy as np
import pytest
from plotly.offline import get_plotlyjs
from safetensors.numpy import save

from apt_lab import plots, report
from apt_lab.data.files import Folder
from apt_lab.store import TABLE_METRICS, RunStore, cell_id


def test_run_folders_share_one_plotly_js_in_their_parent(tmp_path):
    """Issue 24: plotly.min.js (4.8 MB) was copied into every run folder (59 MB over 12 folders)."""
    runs = tmp_path / "runs"
    pages = []
    for name in ("a", "b"):
        (runs / name).mkdir(parents=True)
        html = plots.image_figure(np.zeros((3, 4, 4))).to_html(include_plotlyjs=report.plotly_script(runs / name))
        (runs / name / "report.html").write_text(html)
        pages.append(runs / name / "report.html")
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "plotly.min.js"]
    assert [sorted(p.name for p in (runs / n).iterdir()) for n in "ab"] == [["report.html"], ["report.html"]]
    for page in pages:  # the page opens offline from disk: its script lies at the relative path it names
        assert '<script charset="utf-8" src="../plotly.min.js"></script>' in page.read_text()
        assert (page.parent / "../plotly.min.js").read_text() == get_plotlyjs()
    written = (runs / "plotly.min.js").stat().st_mtime_ns
    assert report.plotly_script(runs / "a") == "../plotly.min.js"
    assert (runs / "plotly.min.js").stat().st_mtime_ns == written  # unchanged: not rewritten


def _examples(folder, name: str, masks: bool) -> list[str]:
    tensors = {"images": np.zeros((2, 3, 8, 8), np.uint8), "anomaly_maps": np.zeros((2, 8, 8), np.float16),
               "image_scores": np.array([0.9, 0.1], np.float32), "colour_range": np.array([0, 1], np.float32)}
    if masks:
        tensors["masks"] = np.pad(np.ones((2, 2, 2), np.uint8), ((0, 0), (3, 3), (3, 3)))
    folder.write(f"cells/{name}/examples.safetensors", save(tensors, {"defects": json.dumps(["hole", "good"])}))
    return [f"cells/{name}/examples.safetensors"]


def test_the_map_note_names_the_ground_truth_only_when_it_is_drawn(tmp_path):
    """Issue 24: "White outline: ground truth" was printed under maps of a dataset without masks."""
    with Folder(tmp_path / "run", create=True) as folder:
        cells = {key: {"key": key, "category": key.split("/")[0], "artefacts": _examples(folder, key[:5], masks)}
                 for key, masks in (("brick/k1/s0/apt", True), ("parts/k1/s0/apt", False))}
        (_, _, with_masks, drawn), (_, _, without, bare) = report._maps(folder, {}, cells)
    assert with_masks.endswith("White outline: ground truth.") and any(t.type == "contour" for t in drawn.data)
    assert "ground truth" not in without and not any(t.type == "contour" for t in bare.data)


LAMBDAS = (0, 0.5, 1)


def _variants() -> dict:
    variants = {"human": {"method": "human", "settings": {}, "zero_shot": True}}
    variants.update({f"apt smgs.lam={lam}": {"method": "apt", "settings": {"smgs.lam": lam}, "zero_shot": False}
                     for lam in LAMBDAS})
    return variants


def _cell(category: str, shots: int, seed: int, variant: str, metrics: dict, **extra) -> dict:
    computes = {"dataset": "demo", "category": category, "shots": shots, "seed": seed, "variant": variant,
                "config": {"backbone": {"name": "apt-tiny", "pretrained": None}}}
    return {"key": f"{category}/k{shots}/s{seed}/{variant}", "id": cell_id(computes), "computes": computes,
            "category": category, "shots": shots, "seed": seed, "variant": variant, "metrics": metrics,
            "timings": {}, "artefacts": [], "pretrained": False, "eval_resolution": 224, "n_test": 14,
            "ran": {"device": "cpu"}, **extra}


def _sweep(path, seeds) -> Folder:
    """A λ sweep (0, 0.5, 1) of apt on brick and grass, 1 shot, with a zero-shot human baseline: image AUROC rises by
    0.17 points over λ while the seeds differ by ± 0.5 (a std of 0.7 points) — noise, not a trend. Every tuned cell
    keeps a loss curve; grass at λ = 1 lacks seed 1 (an unfinished run: n = 1 beside n = 2)."""
    folder = Folder(path, create=True)
    store = RunStore(folder)
    store.claim({"dataset": "demo", "experiment": "benchmark", "categories": ["brick", "grass"], "shots": [1],
                 "seeds": list(seeds), "vary": {"smgs.lam": list(LAMBDAS)}, "variants": _variants()})
    for category in ("brick", "grass"):
        examples = _examples(folder, f"{category}/k0/s0/human", masks=True)
        store.append(_cell(category, 0, 0, "human", {m: 0.6 for m in TABLE_METRICS}, artefacts=examples))
        for number, lam in enumerate(LAMBDAS):
            for seed in seeds:
                if (category, lam, seed) == ("grass", 1, 1):
                    continue
                value = 0.8 + 0.00085 * number + (0.005 if seed else -0.005) * (len(seeds) > 1)
                curve = [[step, 1.0 / (1 + step + seed)] for step in range(0, 50, 10)]
                store.append(_cell(category, 1, seed, f"apt smgs.lam={lam}",
                                   {m: round(value - 0.1 * i, 6) for i, m in enumerate(TABLE_METRICS)},
                                   loss_curve=curve))
    return folder


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_every_report_figure_has_a_title_percent_axes_and_no_error_bar_where_n_is_1(tmp_path, seeds):
    """Issue 25: the report plotted image AUROC only, on an autoscaled axis that drew a 0.17-point change within a
    0.7-point std as a steady rise, with error-bar caps even for one seed."""
    with _sweep(tmp_path / "run", seeds):
        figures = report.report_figures(tmp_path / "run")
    sections = list(dict.fromkeys(f.section for f in figures))
    assert sections == ["Per category", "Against smgs.lam", "Tuning loss", "Anomaly maps: brick", "Anomaly maps: grass"]
    for section, title, _, figure in figures:
        assert title and figure.layout.title.text == title, (section, title)  # self-describing
        if section in ("Per category", "Against smgs.lam"):
            assert figure.layout.yaxis.title.text.endswith(" (%)"), title
        for trace in (t for t in figure.data if t.type in ("bar", "scatter")):
            if trace.error_y.visible:
                assert trace.error_y.width == 0, title  # no caps
                for value, (_, n) in zip(trace.error_y.array, trace.customdata):
                    assert n > 1 or value == 0, (title, trace.name)  # no error bar for n = 1
            if trace.customdata is not None and all(n == 1 for _, n in trace.customdata):
                assert not trace.error_y.visible, (title, trace.name)
            if len(seeds) == 1:
                assert not trace.error_y.visible, (title, trace.name)
    labels = [plots.metric_label(m) for m in TABLE_METRICS]
    assert [f.title for f in figures if f.section == "Per category"] == [f"{label} per category" for label in labels]
    assert [f.title for f in figures if f.section == "Against smgs.lam"] == [f"{label} against smgs.lam"
                                                                             for label in labels]


def test_a_setting_figure_holds_its_error_bars_and_spans_at_least_ten_points(tmp_path):
    with _sweep(tmp_path / "run", (0, 1)):
        figures = report.report_figures(tmp_path / "run")
    lines = [f.figure for f in figures if f.section == "Against smgs.lam"]
    for figure in lines:
        low, high = figure.layout.yaxis.range
        (trace,) = figure.data  # one line: apt, 1 shot (the zero-shot baseline has no λ)
        ends = [(y - e, y + e) for y, e in zip(trace.y, trace.error_y.array)]
        assert high - low >= plots.MIN_SPAN
        assert low <= min(end for end, _ in ends) and high >= max(end for _, end in ends)
    auroc = lines[0].data[0]
    assert list(auroc.y) == pytest.approx([80.0, 80.085, 79.67]) and list(auroc.customdata) == [
        ["80.0 ± 0.7", 2], ["80.1 ± 0.7", 2], ["79.7", 1]]  # λ = 1: grass lacks seed 1, so the mean is of seed 0
    assert list(auroc.error_y.array) == pytest.approx([0.7071068, 0.7071068, 0])
    bars = next(f.figure for f in figures if f.section == "Per category")
    assert list(bars.layout.yaxis.range) == pytest.approx([0, 102])  # bars: the whole 0–100 scale


def test_the_report_draws_each_tuned_cells_loss_curve_grouped_by_variant(tmp_path):
    with _sweep(tmp_path / "run", (0, 1)):
        (losses,) = [f.figure for f in report.report_figures(tmp_path / "run") if f.section == "Tuning loss"]
    tuned = 2 * 3 * 2 - 1  # categories × λ × seeds, less grass λ = 1 seed 1
    assert len(losses.data) == tuned and losses.layout.xaxis.title.text == "step"
    assert losses.layout.yaxis.title.text == "loss" and "11 cells" in losses.layout.title.text
    assert [t.name for t in losses.data if t.showlegend] == [f"apt smgs.lam={lam}" for lam in LAMBDAS]
    assert all(t.legendgroup == t.name for t in losses.data)
    first = losses.data[0]
    assert list(first.x) == [0, 10, 20, 30, 40] and first.y[1] == pytest.approx(1 / 11)
    assert "brick/k1/s0/apt smgs.lam=0" in first.hovertemplate


def test_write_report_draws_every_figure_under_its_section(tmp_path):
    with _sweep(tmp_path / "runs" / "run", (0, 1)):
        pass
    page = report.write_report(tmp_path / "runs" / "run").read_text()
    figures = report.report_figures(tmp_path / "runs" / "run")
    assert page.count("Plotly.newPlot(") == len(figures) == 5 + 5 + 1 + 2
    assert page.count("<h2>") == 6 and "<h2>Tuning loss</h2>" in page and "<h2>Paired differences to apt smgs.lam=0</h2>" in page
