"""Severity you can trust (issue 25, point 4): enough normal images by a stated policy, a warning below the minimum,
95 % Wilson intervals beside every rate (checked against the formula worked by hand), and prompts tuned on the kind
being tested when asked — a choice that is part of each cell's identity.

The runs use apt-tiny with random weights and two tuning steps on the demo brick (8 train images, 6 normal and 8
anomalous test images): numbers are compared between runs, never expected to be good."""
from __future__ import annotations

import csv
import json
import math
import warnings

import pytest
import torch

import apt_lab.severity as sev
from apt_lab.config import APTConfig
from apt_lab.data import load_dataset
from apt_lab.errors import RunMismatchError
from apt_lab.metrics import wilson_interval
from apt_lab.store import CELLS_FILE, write_tables
from apt_lab.sweep import Plan, Severity, run_sweep

Z = 1.959963984540054  # the standard normal's 97.5 % quantile
DEMO_EVALUATION = 6  # the demo brick, 2 shots: 3 held-out train images + 3 of its 6 normal test images


def wilson_by_hand(successes: int, trials: int) -> tuple[float, float]:
    """The Wilson score interval written out: (p + z²/2n ± z √(p(1 − p)/n + z²/4n²)) / (1 + z²/n)."""
    p, n = successes / trials, trials
    centre = (p + Z ** 2 / (2 * n)) / (1 + Z ** 2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z ** 2 / (4 * n ** 2)) / (1 + Z ** 2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _plan(tune_on: str = "mix", kinds=("salt_pepper",), **changes) -> Plan:
    config = APTConfig.preset("quick", train__steps=2, train__pool_size=8, perturb__blob="ellipse")  # cheap, as in
    return Plan("demo", config, categories=("brick",), shots=(2,), seeds=(0,), methods=("apt",),  # test_severity
                severity=Severity((0.5,), kinds, tune_on=tune_on, **changes))


def _cells(folder) -> dict:
    return {record["key"]: record for record in map(json.loads, (folder / CELLS_FILE).read_text().splitlines())}


@pytest.fixture(scope="module")
def mix_folder(tmp_path_factory):
    """One severity run with the default settings: salt_pepper at 0.5 and brick's 4 real defect types."""
    with pytest.warns(sev.FewNormalsWarning, match=r"brick \(k=2, seed=0\): 3 calibration and 6 evaluation"):
        return run_sweep(_plan(), out=tmp_path_factory.mktemp("severity"), name="s", progress=False)


# ------------------------------------------------------------------------------------------------ intervals
@pytest.mark.parametrize("successes, trials", [(1, 20), (0, 3), (3, 3), (2, 6)])
def test_wilson_interval_is_the_formula_worked_by_hand(successes, trials):
    assert wilson_interval(successes, trials) == pytest.approx(wilson_by_hand(successes, trials), abs=1e-12)
    low, high = wilson_interval(successes, trials)
    assert 0.0 <= low <= successes / trials <= high <= 1.0


def test_wilson_interval_hand_numbers_and_refusals():
    assert wilson_interval(0, 3) == (0.0, pytest.approx(Z ** 2 / (3 + Z ** 2)))  # 0 of 3: [0, z²/(n + z²)] exactly
    assert [round(b, 4) for b in wilson_interval(1, 20)] == [0.0089, 0.2361]  # the textbook values
    for bad in [(1, 0), (4, 3), (-1, 3), (0.5, 3), (True, 3)]:
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(*bad)


def test_each_rate_of_a_row_carries_its_wilson_interval():
    """1 of 20 normals above the threshold and 0 of 3 anomalies: the row's bounds are the hand-computed ones."""
    normal = torch.cat([torch.full((19,), 0.1), torch.tensor([0.9])])  # (20,) one false positive at threshold 0.5
    anomalous = torch.tensor([0.2, 0.3, 0.4])  # (3,) none detected
    maps, masks = torch.rand(23, 4, 4), torch.zeros(23, 4, 4, dtype=torch.bool)
    measured = sev._measure(normal, anomalous, maps, masks, 0.5)["metrics"]
    assert measured["fpr_at_threshold"] == 1 / 20 and measured["tpr_at_threshold"] == 0.0
    assert (measured["fpr_low"], measured["fpr_high"]) == pytest.approx(wilson_by_hand(1, 20), abs=1e-12)
    assert (measured["tpr_low"], measured["tpr_high"]) == pytest.approx(wilson_by_hand(0, 3), abs=1e-12)


def test_cells_tables_and_report_carry_the_intervals(mix_folder):
    for key, record in _cells(mix_folder).items():
        m = record["metrics"]
        for rate, n, (low, high) in (("fpr_at_threshold", record["n_normal"], ("fpr_low", "fpr_high")),
                                     ("tpr_at_threshold", record["n_anomalous"], ("tpr_low", "tpr_high"))):
            count = round(m[rate] * n)
            assert m[rate] == count / n, key
            assert (m[low], m[high]) == pytest.approx(wilson_by_hand(count, n), abs=1e-12), (key, rate)
    markdown, table = write_tables(mix_folder)[2], list(csv.DictReader(open(mix_folder / "table.csv")))
    (row,) = [r for r in table if r["perturbation"] == "salt_pepper" and r["category"] == "brick"]
    record = _cells(mix_folder)["brick/k2/s0/apt/salt_pepper@0.5"]["metrics"]
    assert float(row["fpr_at_threshold_low_pct"]) == pytest.approx(record["fpr_low"] * 100, abs=0.05)
    assert float(row["tpr_at_threshold_high_pct"]) == pytest.approx(record["tpr_high"] * 100, abs=0.05)
    printed = (f"{record['fpr_at_threshold'] * 100:.1f} [{record['fpr_low'] * 100:.1f}, "
               f"{record['fpr_high'] * 100:.1f}]")
    assert printed in markdown  # e.g. "0.0 [0.0, 39.0]": the rate of one seed with its interval
    from apt_lab.report import severity_figure
    from apt_lab.store import read_run, table_rows
    from apt_lab.data.files import Folder

    with Folder(mix_folder) as folder:
        _, layout, cells = read_run(folder)
    figure = severity_figure(table_rows(layout, cells.values()))
    bars = [t for t in figure.data if t.name == "salt_pepper" and t.error_y is not None and t.error_y.array]
    assert len(bars) == 2  # the false-positive and the detection panel


# --------------------------------------------------------------------------------------------- the normals
def test_default_policy_gives_enough_evaluation_normals_and_never_an_anomalous_one(mix_folder):
    dataset = load_dataset("demo", category="brick")
    labels = dataset.test.labels.tolist()
    test_normals = {i for i, label in enumerate(labels) if label == 0}
    for key, record in _cells(mix_folder).items():
        shots, calibration, evaluation = record["shot_indices"], record["calibration"], record["evaluation"]
        lent, kept = record["evaluation_test"], record["test_normals"]
        assert len(set(shots + calibration + evaluation)) == len(shots + calibration + evaluation) == 8, key
        assert set(lent) | set(kept) == test_normals and not set(lent) & set(kept), key  # normals only, once each
        assert all(labels[i] == 0 for i in lent + kept), key
        assert len(evaluation) + len(lent) >= DEMO_EVALUATION, key  # was 3 (held-out train images only)
        synthetic = record["computes"]["row"][1] is not None
        assert (record["n_normal"], record["n_anomalous"]) == ((6, 6) if synthetic else (3, 2)), key


def test_test_rows_use_only_the_kept_test_normals(mix_folder, tiny_backbone):
    """A test row's false-positive rate is measured on ``test_normals`` exactly: scored by hand here."""
    from apt_lab.pipeline import prepare_prompts, score_chunked, with_shots
    from apt_lab.features import FeatureStore

    cells = _cells(mix_folder)
    record = cells["brick/k2/s0/apt/test:hole"]
    dataset, config = load_dataset("demo", category="brick"), with_shots(_plan().config, 2, 0)
    store = FeatureStore(tiny_backbone)
    prompts, _, memory = prepare_prompts(tiny_backbone, dataset, config, "apt", record["shot_indices"], store)
    scores = score_chunked(tiny_backbone, prompts, store.features(dataset.test, record["test_normals"],
                                                                  config.score.locality_radius), config,
                           memory)[0]
    cut = record["metrics"]["threshold"]
    assert record["metrics"]["fpr_at_threshold"] == pytest.approx(float((scores >= cut).double().mean()))


def test_split_test_normals_is_seeded_and_keeps_one_for_the_test_rows():
    dataset = load_dataset("demo", category="brick")
    assert sev.split_test_normals(dataset, 0) == sev.split_test_normals(dataset, 0)
    assert sev.split_test_normals(dataset, 0, 0.0) == ([], [0, 1, 2, 3, 4, 5])
    lent, kept = sev.split_test_normals(dataset, 3, 0.99)
    assert len(lent) == 5 and len(kept) == 1  # at most all but one: a test row always has a negative


def test_the_warning_fires_below_the_minimum_only():
    with pytest.warns(sev.FewNormalsWarning, match="coins .*19 calibration and 40 evaluation.*MIN_NORMALS = 20"):
        sev.warn_few_normals("coins", 1, 0, 19, 40, 10)
    with pytest.warns(sev.FewNormalsWarning, match="20 calibration and 19 evaluation"):
        sev.warn_few_normals("coins", 1, 0, 20, 19, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sev.FewNormalsWarning)
        sev.warn_few_normals("coins", 1, 0, sev.MIN_NORMALS, sev.MIN_NORMALS, 3)  # at the minimum: silent


def test_the_warning_fires_once_per_unit(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sev, "warn_few_normals", lambda *args: calls.append(args))
    run_sweep(_plan(kinds=("gaussian", "salt_pepper"), test_share=0.0), out=tmp_path, progress=False)
    assert calls == [("brick", 2, 0, 3, 3, 6)]  # one unit, 10 cells; test_share 0: the old policy's counts


# ------------------------------------------------------------------------------------------------- tune_on
def test_tune_on_kind_tunes_per_kind_gives_other_numbers_and_is_refused_over_mix_cells(mix_folder, tmp_path,
                                                                                       monkeypatch):
    tuned_with = []
    real = sev.prepare_prompts

    def counting(backbone, dataset, config, *args):
        tuned_with.append(tuple(config.perturb.generators))
        return real(backbone, dataset, config, *args)

    monkeypatch.setattr(sev, "prepare_prompts", counting)
    with pytest.warns(sev.FewNormalsWarning):
        folder = run_sweep(_plan("kind"), out=tmp_path, name="s", progress=False)
    mix = _plan().config.perturb.generators
    assert tuned_with == [("salt_pepper",), mix]  # one tuning per group: the kind's rows, then the test rows
    kind, base = _cells(folder), _cells(mix_folder)
    row = "brick/k2/s0/apt/salt_pepper@0.5"
    assert kind[row]["computes"]["tuned_with"] == ["salt_pepper"] and base[row]["computes"]["tuned_with"] == list(mix)
    assert kind[row]["metrics"]["threshold"] != base[row]["metrics"]["threshold"]  # other prompts, other numbers
    assert kind[row]["id"] != base[row]["id"]
    for key in (k for k in kind if "test:" in k):  # the test rows keep the mix: the same numbers as a mix run
        assert kind[key]["metrics"] == base[key]["metrics"]
    before = (mix_folder / CELLS_FILE).read_bytes()
    with pytest.raises(RunMismatchError, match="severity.tune_on: 'mix' → 'kind'"):
        run_sweep(_plan("kind"), out=mix_folder.parent, name="s", progress=False)
    assert (mix_folder / CELLS_FILE).read_bytes() == before  # refused: nothing written


def test_bad_tune_on_or_test_share_fail_before_anything_runs(tmp_path):
    for changes, argument in [(dict(tune_on="both"), "tune_on"), (dict(test_share=1.0), "test_share"),
                              (dict(test_share=-0.1), "test_share")]:
        tune_on = changes.pop("tune_on", "mix")
        with pytest.raises(ValueError, match=argument):
            run_sweep(_plan(tune_on, **changes), out=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_cli_severity_flags_reach_the_plan(capsys):
    from apt_lab import cli

    base = ["severity", "--dataset", "demo", "--preset", "quick", "--strengths", "0.5"]
    args = cli.parse(base + ["--tune-on", "kind", "--test-share", "0.25"])
    severity = args.plan_of(args).severity
    assert (severity.tune_on, severity.test_share) == ("kind", 0.25)
    args = cli.parse(base)
    assert (args.plan_of(args).severity.tune_on, args.plan_of(args).severity.test_share) == ("mix", 0.5)
    for bad, message in [(["--tune-on", "both"], "--tune-on"), (["--test-share", "1"], "--test-share")]:
        assert cli.main(base + bad) == 2
        assert message in capsys.readouterr().err
