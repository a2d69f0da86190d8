"""The command line: `apt-lab demo` end to end, and (issue 18) exit codes that mean something — bad arguments exit 2
before torch is imported, every check that needs no model runs before the backbone loads or a folder is made, and
each refusal is one line that names a command, not a Python call."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import apt_lab.backbone
from apt_lab import cli
from apt_lab.cli import COMMANDS, main
from apt_lab.config import APTConfig

METRICS = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"}


@pytest.fixture
def no_backbone(monkeypatch):
    """Loading a backbone fails the test: the refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the error was found")

    monkeypatch.setattr(apt_lab.backbone, "load_backbone_from_config", refuse)


def one_line_error(capsys, code=1) -> str:
    err = capsys.readouterr().err
    assert err.startswith("apt-lab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------- bad arguments: exit 2, fast
@pytest.mark.parametrize("argv, complaint", [
    (["demo", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),  # was exit 1 after ~6 s
    (["demo", "--k", "0"], "argument --k: must be a whole number ≥ 1, got '0'"),  # was exit 1 after ~6 s
    (["demo", "--max-image-pixels", "-5"], "argument --max-image-pixels: must be a whole number ≥ 1"),  # was accepted
    (["sweep", "--dataset", "demo", "--seeds", "-1"], "argument --seeds: must be a whole number ≥ 0"),  # wrote a folder
    (["run", "--dataset", "nope"], "argument --dataset: unknown dataset 'nope'; choose from mvtec"),
    (["demo", "--config", "/nope/config.json"], "argument --config: no such file: /nope/config.json"),
    (["demo", "--steps", "-2"], "argument --steps: must be a whole number ≥ 0"),
    (["demo", "--preset", "quick", "--config", __file__], "argument --config: not allowed with argument --preset")])
def test_bad_arguments_exit_2_in_under_a_second_without_torch(argv, complaint, tmp_path):
    code = ("import sys, time; start = time.process_time(); from apt_lab.cli import main; "  # CPU time: load-free
            f"code = main({argv + ['--out', str(tmp_path / 'runs')]!r}); "
            "print(code, round(time.process_time() - start, 3), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, seconds, torch_loaded = done.stdout.split()
    assert exit_code == "2" and torch_loaded == "False", done.stderr
    assert float(seconds) < 1.0, f"{argv}: {seconds} s"
    assert complaint in done.stderr.splitlines()[-1]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------- a bad config file or run name: exit 2 (issue 24), before any load
@pytest.mark.parametrize("section, value, expected", [
    ({"score": {"memory": "no"}}, None, "score.memory='no': must be true or false"),
    ({"train": {"encode_each_step": "false"}}, None, "train.encode_each_step='false': must be true or false"),
    ({"perturb": {"generators": "gaussian"}}, None, "perturb.generators='gaussian': must be a non-empty list"),
    ({"perturb": {"generators": ["gaussian", "nope"]}}, None, "perturb.generators=['gaussian', 'nope']: must be"),
    ({"perturb": {"blob": "star"}}, None, "perturb.blob='star': must be one of 'perlin', 'ellipse', 'mixed'"),
    ({"prompts": {"suffix": 123}}, None, "prompts.suffix=123: must be a string"),
    ({"backbone": {"image_size": 3}}, None, "backbone.image_size=3: must be None"),
    ({"train": {"stepz": 3}}, None, "config.train: unknown field(s) ['stepz']"),
    (None, "{not json", "is not valid JSON: Expecting property name")])
def test_config_errors_come_before_the_backbone_and_name_the_file(section, value, expected, tmp_path, capsys,
                                                                  no_backbone):
    path = tmp_path / "my-config.json"
    path.write_text(value if value is not None else json.dumps({"name": "mine", **section}))
    assert main(["demo", "--config", str(path), "--out", str(tmp_path / "runs")]) == 2  # was 1 (issue 24)
    err = capsys.readouterr().err
    assert err.startswith("usage: apt-lab demo") and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("apt-lab demo: error: ") and f"config file {path}" in last and expected in last
    assert not (tmp_path / "runs").exists()


def test_a_long_name_is_refused_before_anything_is_made(tmp_path, capsys, no_backbone):
    argv = ["demo", "--preset", "quick", "--categories", "brick", "--out", str(tmp_path / "runs"), "--name", "x" * 300]
    assert main(argv) == 2  # was OSError [Errno 36] and an empty folder left behind; then exit 1 (issue 24: 2)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "run name 'xxxx" in err and "is 300 bytes long" in err and "at most 200 bytes" in err
    assert "Errno" not in err and not (tmp_path / "runs").exists()


def test_data_errors_come_before_the_backbone(tmp_path, capsys, no_backbone):
    out = str(tmp_path / "runs")
    assert main(["demo", "--preset", "quick", "--k", "50", "--out", out]) == 1  # more shots than train images
    assert "50" in one_line_error(capsys)
    assert main(["demo", "--preset", "quick", "--categories", "nope", "--out", out]) == 1
    assert "Unknown category 'nope'" in one_line_error(capsys)
    assert main(["demo", "--preset", "quick", "--method", "nope", "--out", out]) == 1
    assert "unknown method 'nope'" in one_line_error(capsys)
    assert main(["sweep", "--dataset", "demo", "--preset", "quick", "--plugin", "nope.py", "--out", out]) == 1
    assert "plugin 'nope.py': no such file" in one_line_error(capsys)
    assert main(["sweep", "--dataset", "demo", "--preset", "quick", "--shots", "50", "--out", out]) == 1
    assert "50" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_missing_dataset_folder_names_the_download_command(tmp_path, capsys, no_backbone):
    assert main(["run", "--dataset", "mvtec", "--root", str(tmp_path / "none"), "--preset", "quick"]) == 1
    err = one_line_error(capsys)
    assert f"`apt-lab download mvtec {tmp_path / 'none'}`" in err and "apt_lab.data.download(" not in err
    assert main(["sweep", "--dataset", "visa", "--root", str(tmp_path / "none"), "--preset", "quick"]) == 1
    assert "`apt-lab download visa" in one_line_error(capsys)


def test_table_and_report_of_a_missing_folder_are_one_line(capsys):
    for command in ("table", "report"):
        assert main([command, "/nope"]) == 1  # was a raw "[Errno 2] ... sweep.json"
        err = one_line_error(capsys)
        assert "/nope is not a folder; pass a run folder such as runs/<name>" in err and "Errno" not in err


def test_presets_say_random_weights(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "quick      apt-tiny / random weights / image_size=native" in out and "None" not in out
    assert "fast       ViT-B-16 / openai" in out


def test_demo_without_preset_chooses_by_hardware(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli._preset(None) == "fast" and "'fast': a CUDA GPU is available" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = "cpu" if "cpu" in cli.list_presets() else "fast"  # apt_lab/presets/cpu.json: ViT-B-32
    assert cli._preset(None) == expected and "no CUDA GPU found" in capsys.readouterr().out
    assert cli._preset("paper") == "paper"


def test_one_helper_builds_the_config_from_the_arguments(tmp_path):
    args = cli.parser().parse_args(["demo", "--preset", "quick", "--steps", "3", "--k", "1", "--seed", "2",
                                    "--device", "cpu"])
    config = cli.build_config(args)
    assert (config.name, config.train.steps, config.train.k_shot, config.train.seed, config.backbone.device) == \
        ("quick", 3, 1, 2, "cpu")
    path = tmp_path / "c.json"
    APTConfig.preset("quick", train__lr=0.5).to_json(path)
    args = cli.parser().parse_args(["sweep", "--dataset", "demo", "--config", str(path), "--steps", "4"])
    assert cli.build_config(args) == APTConfig.preset("quick", train__lr=0.5, train__steps=4)


def test_the_cli_is_a_dispatch_table_of_simple_functions():
    assert set(COMMANDS) == {"demo", "run", "download", "report", "sweep", "table", "severity", "presets"}
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "check", "--no-cache", "--select", "C901", "--config",
                           "lint.mccabe.max-complexity=10", cli.__file__], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout  # the old _command was complexity 14


# ------------------------------------------------------------------------------------------------ end to end
def _cells(folder):
    return [json.loads(line) for line in (folder / "cells.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_demo_writes_its_cells_table_and_report_then_resumes(tmp_path, capsys):
    args = ["demo", "--preset", "quick", "--categories", "brick", "--steps", "10", "--out", str(tmp_path),
            "--name", "t", "--no-progress"]
    assert main(args) == 0
    folder = tmp_path / "t"
    (cell,) = _cells(folder)
    assert cell["category"] == "brick" and cell["pretrained"] is False and cell["eval_resolution"] == 224
    assert set(cell["metrics"]) == METRICS and all(0.0 <= v <= 1.0 for v in cell["metrics"].values())
    assert cell["computes"]["config"]["train"]["steps"] == 10  # what a cell computes is on its line (issue 23)
    assert (folder / "table.md").is_file() and (folder / "table.csv").is_file()
    page = (folder / "report.html").read_text()
    assert "RANDOM weights" in page and "brick" in page
    assert any(name.endswith("prompts.safetensors") for name in cell["artefacts"])
    out = capsys.readouterr().out
    assert "image_auroc" in out and "brick" in out
    before = (folder / "cells.jsonl").read_bytes()
    assert main(args) == 0  # the same command again: nothing to run, nothing rewritten
    assert "1 cells done, 0 to run" in capsys.readouterr().out
    assert (folder / "cells.jsonl").read_bytes() == before


@pytest.mark.slow
def test_demo_without_weights_falls_back_to_random_weights_loudly(tmp_path, capsys, monkeypatch):
    config = APTConfig.preset("fast", train__steps=2, train__pool_size=4, train__batch_size=4)
    path = tmp_path / "config.json"
    config.to_json(path)
    monkeypatch.setattr(apt_lab.backbone, "ANNOUNCED", set(), raising=False)  # announced once per process
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS") as caught:
        assert main(["demo", "--config", str(path), "--categories", "grass", "--out", str(tmp_path), "--name", "b16",
                     "--no-progress"]) == 0
    assert any("'openai'" in str(warning.message) for warning in caught)
    assert "ViT-B-16 (RANDOM weights)" in capsys.readouterr().out  # the table's caption says it too
    (cell,) = _cells(tmp_path / "b16")
    assert cell["pretrained"] is False and cell["computes"]["config"]["backbone"]["name"] == "ViT-B-16"
