"""Late or silent failures become early, clear ones (issue 11, defect 7): bad masks and one-class test sets stop a
run before any tuning, config values are checked when the config is made, skipped pixel metrics say why, unusable
backbones are refused by name, CLI errors are one line and leave no run folder, a category called "mean" keeps its
own row."""
from __future__ import annotations

import csv
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import apt_lab
import apt_lab.pipeline as pipeline
from apt_lab import metrics
from apt_lab.cli import main
from apt_lab.config import APTConfig
from apt_lab.data import load_dataset
from apt_lab.data.files import Folder
from apt_lab.data.readers import DEMO_ROOT
from apt_lab.errors import ConfigError, DatasetCheckError, UnknownBackboneError
from apt_lab.prompts import PromptLearner
from apt_lab.store import read_run, write_tables
from apt_lab.sweep import Plan, run_sweep


def one_run(dataset: str, root, out, method: str = "apt"):
    """What `apt-lab run` does: one method, the config's shots and seed, every category, artefacts kept."""
    config = APTConfig.preset("quick")
    plan = Plan(dataset, config, root=str(root), shots=(config.train.k_shot,), seeds=(config.train.seed,),
                methods=(method,), artefacts=True)
    return run_sweep(plan, out=out, progress=False)


def cells_of(folder) -> dict:
    with Folder(folder) as opened:
        return read_run(opened)[2]


@pytest.fixture
def brick(tmp_path):
    """A copy of the demo's brick category in the MVTec layout, free to damage."""
    root = tmp_path / "data"
    shutil.copytree(DEMO_ROOT / "brick", root / "brick")
    return root


@pytest.fixture
def no_tuning(monkeypatch):
    """Records every call of tune_prompts by the pipeline (and refuses it): the checks must come first."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("tuning started before the data was checked")

    monkeypatch.setattr(pipeline, "tune_prompts", refuse)
    return calls


def test_a_mask_of_the_wrong_size_stops_the_run_before_tuning(brick, tmp_path, no_tuning):
    mask = brick / "brick/ground_truth/hole/001_mask.png"
    Image.open(mask).resize((64, 64)).save(mask)
    with pytest.raises(DatasetCheckError, match=r"mvtec/brick .*001_mask\.png has size 64x64 .* is 128x128"):
        one_run("mvtec", brick, tmp_path / "runs")
    assert no_tuning == [] and not (tmp_path / "runs").exists()


def test_a_test_set_with_one_class_stops_the_run_before_tuning(brick, tmp_path, no_tuning):
    for defect in ("hole", "paste", "scratch", "stain"):
        shutil.rmtree(brick / "brick/test" / defect)
    with pytest.raises(DatasetCheckError, match="only normal test images; image AUROC, AP and F1-max need both"):
        one_run("mvtec", brick, tmp_path / "runs")
    assert no_tuning == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, field", [
    ({"score__temperature": 0}, "score.temperature=0"), ({"train__steps": -1}, "train.steps=-1"),
    ({"train__batch_size": 0}, "train.batch_size=0"), ({"score__batch_size": 0}, "score.batch_size=0"),
    ({"train__anomaly_fraction": 1.5}, "train.anomaly_fraction=1.5"), ({"train__lr": 0.0}, "train.lr=0.0"),
    ({"train__k_shot": 0}, "train.k_shot=0"), ({"smgs__update": "sometimes"}, "smgs.update='sometimes'"),
    ({"perturb__min_area": 0.5, "perturb__max_area": 0.1}, "perturb.max_area=0.1 is below")])
def test_config_values_are_checked_when_the_config_is_made(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
        APTConfig.preset("quick", **override)


def test_steps_zero_scores_the_initial_prompts(tiny_backbone):
    config = APTConfig.preset("quick", train__steps=0)
    dataset = load_dataset("demo", category="brick")
    result = pipeline.run_category(tiny_backbone, dataset, config)
    initial = PromptLearner(tiny_backbone, config.prompts, seed=config.train.seed)
    assert result.tuned.history == [] and not result.tuned.interrupted
    assert torch.equal(result.tuned.prompts.text_features(), initial.text_features())
    assert 0.0 <= result.metrics["image_auroc"] <= 1.0


def test_resnet_and_other_towers_are_refused_by_name():
    for name, tower in (("RN50", "ResNet"), ("convnext_base", "timm or custom")):
        with pytest.raises(UnknownBackboneError, match=rf"'{name}' is not a ViT CLIP .*{tower}.*'ViT-B-16'"):
            apt_lab.load_backbone(name)


def test_skipped_pixel_metrics_say_why(tmp_path):
    scores, maps = torch.tensor([0.1, 0.9]), torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="pixel metrics skipped: none of the 2 masks marks an anomalous pixel"):
        out = metrics.evaluate(scores, maps, torch.tensor([0, 1]), torch.zeros(2, 8, 8, dtype=torch.bool))
    assert out["pixel_auroc"] is None and out["image_auroc"] == 1.0
    root = tmp_path / "parts"
    for i, kind in enumerate(("good", "good", "bad", "bad")):
        (root / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(root / kind / f"{i}.png")
    (root / "masks").mkdir()
    Image.fromarray(np.full((6, 8), 255, np.uint8)).save(root / "masks" / "2.png")  # 3.png has no mask
    with pytest.warns(UserWarning, match=r"pixel metrics skipped — 1 of 2 anomalous test images have no mask "
                                         r"\(e\.g\. .*3\.png\)"):
        assert load_dataset("folder", root).test.masks(8) is None


def test_command_line_errors_are_one_line_and_leave_no_run_folder(tmp_path, capsys):
    argv = ["demo", "--preset", "quick", "--categories", "nope", "--out", str(tmp_path / "runs"), "--name", "x"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("apt-lab: error: Unknown category 'nope'") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    assert main(["demo", "--preset", "nope"]) == 2  # a bad argument: exit 2 (issue 18)
    assert "argument --preset: invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["demo", "--preset", "quick", "--steps", "-2", "--out", str(tmp_path / "runs")]) == 2
    assert "argument --steps: must be a whole number ≥ 0, got '-2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown category 'nope'"):  # --debug: the traceback, for a bug report
        main(["--debug", *argv])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_steps_zero_on_the_command_line_is_honoured(tmp_path):
    assert main(["demo", "--preset", "quick", "--categories", "brick", "--steps", "0", "--out", str(tmp_path),
                 "--name", "s0", "--no-progress"]) == 0
    cells = cells_of(tmp_path / "s0")
    assert cells["brick/k2/s0/apt"]["computes"]["config"]["train"]["steps"] == 0


def test_a_category_called_mean_keeps_its_own_row(tmp_path):
    root = tmp_path / "mean"  # the folder format names its one category after the folder
    for kind, source in (("good", "good"), ("bad", "scratch")):
        shutil.copytree(DEMO_ROOT / "brick" / "test" / source, root / kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no masks: pixel metrics skipped (tested above)
        folder = one_run("folder", root, tmp_path / "runs", method="human")
    rows = list(csv.reader(open(write_tables(folder)[1])))
    assert [r[2] for r in rows] == ["category", "mean", "(mean)"]
    value = cells_of(folder)["mean/k0/s0/human"]["metrics"]["image_auroc"]
    assert rows[1][4] == rows[2][4] == f"{value * 100:.1f}"
