"""The main job end to end: `apt-lab demo` writes its three files, resumes, and falls back loudly offline."""
import csv
import json

import pytest

from apt_lab.cli import main
from apt_lab.config import APTConfig
from apt_lab.metrics import mean_metrics

METRICS = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"}


def test_mean_metrics_is_the_macro_mean():
    assert mean_metrics({"a": {"image_auroc": 0.5, "aupro": 0.2}, "b": {"image_auroc": 1.0}}) == {"image_auroc": 0.75}


@pytest.mark.slow
def test_demo_writes_results_csv_and_report_then_resumes(tmp_path, capsys):
    args = ["demo", "--preset", "quick", "--categories", "brick", "--steps", "10", "--out", str(tmp_path),
            "--name", "t", "--no-progress"]
    assert main(args) == 0
    folder = tmp_path / "t"
    results = json.loads((folder / "results.json").read_text())
    assert results["pretrained"] is False and results["eval_resolution"] == 224
    metrics = results["categories"]["brick"]["metrics"]
    assert set(metrics) == METRICS and all(0.0 <= v <= 1.0 for v in metrics.values())
    assert results["mean"] == pytest.approx(metrics)
    assert results["config"]["train"]["steps"] == 10
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [r["category"] for r in rows] == ["brick", "mean"]
    assert float(rows[0]["image_auroc"]) == pytest.approx(metrics["image_auroc"], abs=1e-4)
    page = (folder / "report.html").read_text()
    assert "RANDOM weights" in page and "brick" in page and "plotly" in page.lower()
    assert (folder / "prompts" / "brick.safetensors").is_file() and (folder / "prompts" / "brick.json").is_file()
    out = capsys.readouterr().out
    assert "image_auroc" in out and "brick" in out

    # a second run with the same config keeps what was computed instead of recomputing it
    assert main(args) == 0
    assert "already done" in capsys.readouterr().out
    assert json.loads((folder / "results.json").read_text())["categories"]["brick"] == results["categories"]["brick"]


@pytest.mark.slow
def test_demo_without_weights_falls_back_to_random_weights_loudly(tmp_path, capsys):
    config = APTConfig.preset("fast", train__steps=2, train__pool_size=4, train__batch_size=4)
    path = tmp_path / "config.json"
    config.to_json(path)
    assert main(["demo", "--config", str(path), "--categories", "grass", "--out", str(tmp_path), "--name", "b16",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.err and "'openai'" in captured.err
    results = json.loads((tmp_path / "b16" / "results.json").read_text())
    assert results["pretrained"] is False and results["backbone"]["name"] == "ViT-B-16"
    assert results["backbone"]["tag"] == "openai"


def test_unknown_preset_is_a_clear_error(capsys):
    assert main(["demo", "--preset", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("apt-lab: error: unknown preset 'nope'") and "Traceback" not in err
