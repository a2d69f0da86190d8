"""The severity experiment on apt-tiny with random weights: chance at strength 0, one row per (kind, strength) and per
real defect type, the false-positive rate at the calibration threshold by hand, same seed → same CSV, and bad
arguments refused before any backbone loads. The curve's shape is printed, not asserted: random features cannot be
expected to rank stronger noise higher."""
import csv
import io

import pytest
import torch

import apt_lab.severity as sev
from apt_lab.config import APTConfig
from apt_lab.data import load_dataset
from apt_lab.perturbations import list_perturbations
from apt_lab.thresholds import choose_thresholds
from apt_lab.tuning import tune_prompts

STRENGTHS = [0, 0.1, 0.5, 1.0]
DEFECTS = ["hole", "paste", "scratch", "stain"]  # the demo's test defect types


def _config(steps: int = 5) -> APTConfig:
    # ellipse blobs: Perlin blobs cost ~2 s per perturb call of 3 images on 2 CPU cores, and one call is made per
    # (kind, strength); the blob's shape is no part of what is tested here, nor the size of the tuning pool
    return APTConfig.preset("quick", train__steps=steps, train__pool_size=8, perturb__blob="ellipse")


@pytest.fixture(scope="module")
def brick(tiny_backbone):
    dataset = load_dataset("demo", category="brick")
    return dataset, sev.severity(tiny_backbone, dataset, _config(), STRENGTHS, seed=0)


def test_one_row_per_kind_and_strength_then_the_real_defects(brick):
    _, result = brick
    kinds = list_perturbations("pixel")
    expected = [(kind, float(s)) for kind in kinds for s in STRENGTHS] + [(f"test:{d}", None) for d in DEFECTS]
    assert [(r["kind"], r["strength"]) for r in result.rows] == expected
    print("\nbrick, apt-tiny random weights, 5 steps (the curve's shape, not asserted):")
    print(sev.severity_csv(result.rows))
    for row in result.rows:
        assert set(row) == set(sev.COLUMNS) and row["category"] == "brick"
        for key in ("image_auroc", "pixel_auroc", "fpr_at_threshold", "tpr_at_threshold"):
            assert 0.0 <= row[key] <= 1.0, (row["kind"], row["strength"], key, row[key])
        synthetic = row["strength"] is not None
        assert (row["n_normal"], row["n_anomalous"]) == ((3, 3) if synthetic else (6, 2))  # 8 train: 2 shots, 3 + 3


def test_strength_zero_changes_nothing_so_the_detector_is_at_chance(brick):
    _, result = brick
    for kind in list_perturbations("pixel"):
        row = next(r for r in result.rows if r["kind"] == kind and r["strength"] == 0.0)
        normal, anomalous = result.scores[("brick", kind, 0.0)]
        assert torch.equal(normal, anomalous)  # unchanged images, identical scores: every pair ties
        assert row["image_auroc"] == 0.5
        assert row["tpr_at_threshold"] == row["fpr_at_threshold"]
        # pixel AUROC at 0 is chance only in expectation (a random blob over a random map), so it is not asserted


def test_fpr_is_measured_at_the_calibration_threshold(brick):
    dataset, result = brick
    calibration = result.calibration_scores["brick"]  # (3,) held-out normals, never shots, never test images
    threshold = result.thresholds["brick"]
    assert threshold == pytest.approx(float(torch.quantile(calibration.double(), 0.95)), abs=1e-6)
    for row in result.rows:
        normal, anomalous = result.scores[("brick", row["kind"], row["strength"])]
        assert row["threshold"] == threshold
        assert row["fpr_at_threshold"] == pytest.approx(float((normal >= threshold).double().mean()))
        assert row["tpr_at_threshold"] == pytest.approx(float((anomalous >= threshold).double().mean()))
    split = result.settings["categories"]["brick"]
    used = split["shots"] + split["calibration"] + split["evaluation"]
    assert sorted(used) == list(range(len(dataset.train)))  # disjoint, and every train image is used once


def test_f1_threshold_comes_from_choose_thresholds(tiny_backbone):
    dataset = load_dataset("demo", category="grass")
    config = _config(steps=2)
    result = sev.severity(tiny_backbone, dataset, config, [0.5], kinds="gaussian", threshold="f1")
    split = result.settings["categories"]["grass"]
    # tuning is seeded: the same shots and config give the same prompts, so the threshold can be chosen again by hand
    size = tiny_backbone.image_size
    prompts = tune_prompts(tiny_backbone, dataset.train.images(size, split["shots"]), config, progress=False).prompts
    chosen = choose_thresholds(tiny_backbone, prompts, dataset.train.images(size, split["calibration"]), config,
                               torch.Generator().manual_seed(0))
    assert result.thresholds["grass"] == pytest.approx(chosen.image, abs=1e-6)
    assert result.settings["threshold"] == "f1" and result.settings["target_fpr"] is None


def test_same_seed_same_csv_and_the_folder(tmp_path, capsys):
    config = _config(steps=3)
    kwargs = dict(kinds=["gaussian", "salt_pepper"], categories=["coins"], out=tmp_path, seed=1)
    first = sev.run_severity("demo", config, [0, 0.5], name="a", **kwargs)
    second = sev.run_severity("demo", config, [0.5, 0], name="b", **kwargs)  # order of strengths does not matter
    text = (first / "severity.csv").read_text()
    assert text == (second / "severity.csv").read_text()
    assert (first / "severity.html").read_bytes() == (second / "severity.html").read_bytes()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(sev.COLUMNS)
    assert [(r["kind"], r["strength"]) for r in rows] == [
        ("gaussian", "0.000000"), ("gaussian", "0.500000"), ("salt_pepper", "0.000000"), ("salt_pepper", "0.500000"),
        *[(f"test:{d}", "") for d in DEFECTS]]
    assert first.name == "a" and "plotly" in (first / "severity.html").read_text()


@pytest.mark.parametrize("kwargs, argument", [
    (dict(strengths=[0.1, -0.5]), "strengths"),
    (dict(strengths=[]), "strengths"),
    (dict(strengths="0.5"), "strengths"),
    (dict(strengths=[float("nan")]), "strengths"),
    (dict(kinds=["gaussian", "no-such-noise"]), "kinds"),
    (dict(kinds=["feature"]), "kinds"),  # feature space: nothing to perturb in pixels
    (dict(kinds=[]), "kinds"),
    (dict(threshold="best"), "threshold"),
    (dict(target_fpr=1.5), "target_fpr"),
    (dict(held_out=1), "held_out"),
    (dict(k=7), "held-out"),  # 8 train images, 7 shots: 1 held out, 2 needed
])
def test_bad_arguments_fail_before_the_backbone_loads(monkeypatch, tmp_path, kwargs, argument):
    def no_backbone(*args, **kw):
        raise AssertionError("the backbone must not load for a bad request")

    monkeypatch.setattr(sev, "load_backbone_from_config", no_backbone)
    call = {"strengths": [0.5], "categories": ["brick"], "out": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=argument):
        sev.run_severity("demo", _config(), **call)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_cli_severity_writes_the_csv_with_auroc_and_fpr_per_strength_and_kind(tmp_path, capsys):
    import csv as csv_module

    from apt_lab.cli import main

    argv = ["severity", "--dataset", "demo", "--categories", "brick", "--preset", "quick", "--steps", "2",
            "--strengths", "0.1", "0.5", "1.0", "--kinds", "gaussian", "uniform", "--out", str(tmp_path),
            "--name", "sev"]
    assert main(argv) == 0
    rows = list(csv_module.DictReader(open(tmp_path / "sev" / "severity.csv")))
    synthetic = [(r["kind"], float(r["strength"])) for r in rows if not r["kind"].startswith("test:")]
    assert synthetic == [(k, s) for k in ("gaussian", "uniform") for s in (0.1, 0.5, 1.0)]
    assert all(0 <= float(r["image_auroc"]) <= 1 and 0 <= float(r["fpr_at_threshold"]) <= 1 for r in rows)
    assert (tmp_path / "sev" / "severity.html").is_file() and "severity.csv" in capsys.readouterr().out
    bad = ["severity", "--dataset", "demo", "--categories", "brick", "--preset", "quick", "--strengths", "-1",
           "--out", str(tmp_path), "--name", "bad"]
    assert main(bad) == 1  # refused before the backbone loads, nothing written
    assert "strength" in capsys.readouterr().err and not (tmp_path / "bad").exists()
