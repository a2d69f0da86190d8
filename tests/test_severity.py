"""The severity experiment on apt-tiny with random weights: chance at strength 0, one row per (kind, strength) and per
real defect type, the threshold and the false-positive rate recomputed by hand, same seed → same table whatever
the order of the strengths, and bad arguments refused before any backbone loads. The curve's shape is printed, not
asserted: random features cannot be expected to rank stronger noise higher."""
import csv

import pytest
import torch

import apt_lab.severity as sev
from apt_lab.config import APTConfig
from apt_lab.data import load_dataset
from apt_lab.perturbations import list_perturbations
from apt_lab.scoring import score
from apt_lab.store import write_tables
from apt_lab.sweep import Plan, Severity, run_sweep
from apt_lab.thresholds import choose_thresholds
from apt_lab.tuning import tune_prompts

STRENGTHS = [0, 0.1, 0.5, 1.0]
DEFECTS = ["hole", "paste", "scratch", "stain"]  # the demo's test defect types (brick and coins)
METRICS = ("image_auroc", "pixel_auroc", "fpr_at_threshold", "tpr_at_threshold")


def _config(steps: int = 5) -> APTConfig:
    # ellipse blobs: Perlin blobs cost ~2 s per perturb call of 3 images on 2 CPU cores, and one call is made per
    # (kind, strength); the blob's shape is no part of what is tested here, nor the size of the tuning pool
    return APTConfig.preset("quick", train__steps=steps, train__pool_size=8, perturb__blob="ellipse")


def _plan(severity: Severity, **changes) -> Plan:
    """Severity cells of one demo category: 2 shots, one seed, APT."""
    return Plan("demo", _config(steps=3), **{"categories": ("brick",), "shots": (2,), "seeds": (0,),
                                             "methods": ("apt",), "severity": severity, **changes})


@pytest.fixture(scope="module")
def brick(tiny_backbone):
    dataset = load_dataset("demo", category="brick")
    return dataset, sev.severity(tiny_backbone, dataset, _config(), STRENGTHS)


def test_one_row_per_kind_and_strength_then_the_real_defects(brick):
    _, rows = brick
    kinds = list_perturbations("pixel")
    expected = [(kind, float(s)) for kind in kinds for s in STRENGTHS] + [(f"test:{d}", None) for d in DEFECTS]
    assert [r["row"] for r in rows] == expected
    print("\nbrick, apt-tiny random weights, 5 steps (the curve's shape, not asserted):")
    for row in rows:
        print(*row["row"], *(f"{m} {row['metrics'][m]:.3f}" for m in METRICS), sep="  ")
        for key in METRICS:
            assert 0.0 <= row["metrics"][key] <= 1.0, (row["row"], key, row["metrics"][key])
        synthetic = row["row"][1] is not None
        # 8 train images: 2 shots, 3 calibrate, 3 are evaluated with 3 of the 6 normal test images; the test rows keep
        # the other 3 test normals (apt_lab.severity's policy)
        assert (row["n_normal"], row["n_anomalous"]) == ((6, 6) if synthetic else (3, 2))


def test_strength_zero_changes_nothing_so_the_detector_is_at_chance(brick):
    _, rows = brick
    for kind in list_perturbations("pixel"):
        (row,) = [r for r in rows if r["row"] == (kind, 0.0)]
        assert row["metrics"]["image_auroc"] == 0.5  # unchanged images keep their scores: every pair ties
        assert row["metrics"]["tpr_at_threshold"] == row["metrics"]["fpr_at_threshold"]
        # pixel AUROC at 0 is chance only in expectation (a random blob over a random map), so it is not asserted


def test_fpr_is_measured_at_the_calibration_threshold(brick, tiny_backbone):
    dataset, rows = brick
    shots, calibration, evaluation = rows[0]["shot_indices"], rows[0]["calibration"], rows[0]["evaluation"]
    assert all((r["shot_indices"], r["calibration"], r["evaluation"]) == (shots, calibration, evaluation) for r in rows)
    assert sorted(shots + calibration + evaluation) == list(range(len(dataset.train)))  # disjoint, each used once
    # by hand, from pixels: tuning is seeded, so the same shots and config give the same prompts
    config, size = _config(), tiny_backbone.image_size
    prompts = tune_prompts(tiny_backbone, dataset.train.images(size, shots), config, progress=False).prompts

    def image_scores(images):
        return score(tiny_backbone, prompts, images, config).image_scores

    threshold = float(torch.quantile(image_scores(dataset.train.images(size, calibration)).double(), 0.95))
    lent, kept = rows[0]["evaluation_test"], rows[0]["test_normals"]  # test normals: evaluated, or the test rows'
    normal = image_scores(torch.cat([dataset.train.images(size, evaluation), dataset.test.images(size, lent)]))
    test, labels = image_scores(dataset.test.images(size)), dataset.test.labels
    for row in rows:
        kind, strength = row["row"]
        measured = row["metrics"]
        assert measured["threshold"] == pytest.approx(threshold, abs=1e-5)  # held-out normals, never test images
        if strength is not None:
            assert measured["fpr_at_threshold"] == pytest.approx(float((normal >= threshold).double().mean()))
            continue
        defect = torch.tensor([d == kind[len("test:"):] for d in dataset.test.defects]) & (labels == 1)
        assert measured["fpr_at_threshold"] == pytest.approx(float((test[kept] >= threshold).double().mean()))
        assert measured["tpr_at_threshold"] == pytest.approx(float((test[defect] >= threshold).double().mean()))


def test_f1_threshold_comes_from_choose_thresholds(tiny_backbone):
    dataset = load_dataset("demo", category="grass")
    config = _config(steps=2)
    (row, *_) = sev.severity(tiny_backbone, dataset, config, [0.5], kinds=["gaussian"], threshold="f1")
    # tuning is seeded: the same shots and config give the same prompts, so the threshold can be chosen again by hand
    size = tiny_backbone.image_size
    prompts = tune_prompts(tiny_backbone, dataset.train.images(size, row["shot_indices"]), config,
                           progress=False).prompts
    chosen = choose_thresholds(tiny_backbone, prompts, dataset.train.images(size, row["calibration"]), config,
                               torch.Generator().manual_seed(0))
    assert row["metrics"]["threshold"] == pytest.approx(chosen.image, abs=1e-6)


def test_same_seed_same_table_whatever_the_order_of_the_strengths(tmp_path):
    kinds = ("gaussian", "salt_pepper")
    first = run_sweep(_plan(Severity((0, 0.5), kinds), categories=("coins",), seeds=(1,)), out=tmp_path, name="a",
                      progress=False)
    second = run_sweep(_plan(Severity((0.5, 0), kinds), categories=("coins",), seeds=(1,)), out=tmp_path, name="b",
                       progress=False)
    text = write_tables(first)[1].read_text()
    assert text == write_tables(second)[1].read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0])[:6] == ["variant", "shots", "perturbation", "strength", "category", "n"]
    assert [(r["perturbation"], r["strength"]) for r in rows if r["category"] == "coins"] == [
        ("gaussian", "0"), ("gaussian", "0.5"), ("salt_pepper", "0"), ("salt_pepper", "0.5"),
        *[(f"test:{d}", "") for d in DEFECTS]]
    assert [r["image_auroc_pct"] for r in rows if r["strength"] == "0"] == ["50.0"] * 4  # coins, then the mean


@pytest.mark.parametrize("changes, argument", [
    (dict(strengths=(0.1, -0.5)), "strengths"),
    (dict(strengths=()), "strengths"),
    (dict(strengths="0.5"), "strengths"),
    (dict(strengths=(float("nan"),)), "strengths"),
    (dict(perturbations=("gaussian", "no-such-noise")), "kinds"),
    (dict(perturbations=("feature",)), "kinds"),  # feature space: nothing to perturb in pixels
    (dict(perturbations=()), "kinds"),
    (dict(threshold="best"), "threshold"),
    (dict(target_fpr=1.5), "target_fpr"),
    (dict(held_out=1), "held_out"),
    (dict(shots=(7,)), "held-out"),  # 8 train images, 7 shots: 1 held out, 2 needed
])
def test_bad_arguments_fail_before_the_backbone_loads(monkeypatch, tmp_path, changes, argument):
    import apt_lab.backbone

    def no_backbone(*args, **kw):
        raise AssertionError("the backbone must not load for a bad request")

    monkeypatch.setattr(apt_lab.backbone, "load_backbone_from_config", no_backbone)
    shots = changes.pop("shots", (2,))
    with pytest.raises(ValueError, match=argument):
        run_sweep(_plan(Severity(**{"strengths": (0.5,), **changes}), shots=shots), out=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_cli_severity_writes_the_table_with_auroc_and_fpr_per_strength_and_kind(tmp_path, capsys):
    from apt_lab.cli import main

    argv = ["severity", "--dataset", "demo", "--categories", "brick", "--preset", "quick", "--steps", "2",
            "--strengths", "0.1", "0.5", "1.0", "--kinds", "gaussian", "uniform", "--out", str(tmp_path),
            "--name", "sev"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "sev" / "table.csv")))
    synthetic = [(r["perturbation"], float(r["strength"])) for r in rows
                 if r["category"] == "brick" and not r["perturbation"].startswith("test:")]
    assert synthetic == [(k, s) for k in ("gaussian", "uniform") for s in (0.1, 0.5, 1.0)]
    assert all(0 <= float(r["image_auroc_pct"]) <= 100 and 0 <= float(r["fpr_at_threshold_pct"]) <= 100
               for r in rows)
    assert (tmp_path / "sev" / "report.html").is_file() and "table.csv" in capsys.readouterr().out
    bad = ["severity", "--dataset", "demo", "--categories", "brick", "--preset", "quick", "--strengths", "-1",
           "--out", str(tmp_path), "--name", "bad"]
    assert main(bad) == 2  # a bad argument: refused by the parser before the backbone loads, nothing written
    assert "strength" in capsys.readouterr().err and not (tmp_path / "bad").exists()
