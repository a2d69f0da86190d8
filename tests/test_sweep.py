"""Sweeps: resumable cells, killed mid-way and resumed, refused when mixed, Ray = local, paper tables by hand."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apt_lab.config import APTConfig
from apt_lab.data.readers import DEMO_ROOT
from apt_lab.errors import RunMismatchError
from apt_lab.sweep import (CELLS_FILE, append_cell, format_cell, mean_std, plan, read_cells, repair_cells,
                           run_sweep, sweep_table, write_tables)

CATEGORIES = ("brick", "coins")
ARGS = dict(shots=(1,), seeds=(0, 1), methods=("apt", "human"))
N_CELLS = len(CATEGORIES) * 1 * 2 * 2


def small_config() -> APTConfig:
    return APTConfig.preset("quick", train__steps=3, train__pool_size=4, train__batch_size=4, score__batch_size=8)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    """An MVTec-AD-layout dataset (train/good, test/<defect>, ground_truth/<defect>/<id>_mask.png) of two demo
    categories, test sets cut to 2 good + 2 defective images so a cell takes a second or two."""
    root = tmp_path_factory.mktemp("mvtec")
    for category in CATEGORIES:
        source, target = DEMO_ROOT / category, root / category
        shutil.copytree(source / "train", target / "train")
        for defect in ("good", "scratch"):
            (target / "test" / defect).mkdir(parents=True)
            for image in sorted((source / "test" / defect).glob("*.png"))[:2]:
                shutil.copy(image, target / "test" / defect / image.name)
                mask = source / "ground_truth" / defect / f"{image.stem}_mask.png"
                if mask.is_file():
                    (target / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                    shutil.copy(mask, target / "ground_truth" / defect / mask.name)
    return root


@pytest.fixture(scope="module")
def uninterrupted(mvtec_root, tmp_path_factory):
    folder = run_sweep("mvtec", small_config(), root=mvtec_root, categories=CATEGORIES,
                       out=tmp_path_factory.mktemp("runs"), name="whole", progress=False, **ARGS)
    return folder, read_cells(folder)


def _metrics(cells: dict) -> dict:
    return {key: cell["metrics"] for key, cell in cells.items()}


def test_plan_is_category_outermost():
    keys = [c.key for c in plan(["a", "b"], (1, 2), (0,), ("apt",))]
    assert keys == ["a/k1/s0/apt", "a/k2/s0/apt", "b/k1/s0/apt", "b/k2/s0/apt"]


@pytest.mark.slow
def test_sweep_records_every_cell_once_with_its_draws(uninterrupted, mvtec_root):
    folder, cells = uninterrupted
    assert len(cells) == N_CELLS
    lines = (folder / CELLS_FILE).read_text().splitlines()
    assert len(lines) == N_CELLS  # one line per cell, nothing duplicated
    identity = json.loads((folder / "sweep.json").read_text())
    assert identity["draws"]["brick"]["1"] == cells["brick/k1/s0/apt"]["shot_indices"]
    assert identity["apt_lab"] and identity["config"]["train"]["steps"] == 3
    # seeds change APT's numbers, never the human baseline's (no training)
    assert cells["brick/k1/s0/human"]["metrics"] == cells["brick/k1/s1/human"]["metrics"]
    assert cells["brick/k1/s0/apt"]["metrics"] != cells["brick/k1/s1/apt"]["metrics"]


@pytest.mark.slow
def test_rerun_skips_finished_cells(uninterrupted, mvtec_root, capsys):
    folder, cells = uninterrupted
    before = (folder / CELLS_FILE).read_bytes()
    run_sweep("mvtec", small_config(), root=mvtec_root, categories=CATEGORIES, out=folder.parent, name=folder.name,
              progress=False, **ARGS)
    assert f"{N_CELLS} cells done, 0 to run" in capsys.readouterr().out
    assert (folder / CELLS_FILE).read_bytes() == before


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_table(uninterrupted, mvtec_root, tmp_path):
    folder, cells = uninterrupted
    script = (f"from apt_lab.sweep import run_sweep; from apt_lab.config import APTConfig\n"
              f"cfg = APTConfig.preset('quick', train__steps=3, train__pool_size=4, train__batch_size=4, "
              f"score__batch_size=8)\n"
              f"run_sweep('mvtec', cfg, root={str(mvtec_root)!r}, categories={list(CATEGORIES)!r}, "
              f"out={str(tmp_path)!r}, name='killed', progress=False, shots=(1,), seeds=(0, 1), "
              f"methods=('apt', 'human'))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    killed = tmp_path / "killed"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if len(read_cells(killed)) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, f"the sweep ended before it could be killed: {process.stderr.read()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_cells(killed)
    assert 2 <= len(partial) < N_CELLS
    with open(killed / CELLS_FILE, "ab") as handle:  # a kill in the middle of a write leaves a cut-off line
        handle.write(b'{"key": "coins/k1/s0/ap')
    run_sweep("mvtec", small_config(), root=mvtec_root, categories=CATEGORIES, out=tmp_path, name="killed",
              progress=False, **ARGS)
    resumed = read_cells(killed)
    assert len((killed / CELLS_FILE).read_text().splitlines()) == N_CELLS  # no lost and no duplicated cell
    assert _metrics(resumed) == _metrics(cells)
    assert write_tables(killed)[2].split("\n", 1)[1] == write_tables(folder)[2].split("\n", 1)[1]


@pytest.mark.slow
def test_a_changed_config_is_refused(uninterrupted, mvtec_root):
    folder, _ = uninterrupted
    with pytest.raises(RunMismatchError, match=r"differs in: config.*--overwrite"):
        run_sweep("mvtec", small_config().replace(train__steps=4), root=mvtec_root, categories=CATEGORIES,
                  out=folder.parent, name=folder.name, progress=False, **ARGS)


def test_unknown_method_fails_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown sweep method 'stripes'.*--plugin"):
        run_sweep("demo", small_config(), categories=["brick"], methods=("stripes",), out=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_plugin_perturbation_becomes_a_method(tmp_path):
    from apt_lab.perturbations import unregister_perturbation
    from apt_lab.sweep import load_plugins, method_config

    plugin = tmp_path / "stripes.py"
    plugin.write_text("import apt_lab\n\n@apt_lab.register_perturbation('test_stripes')\n"
                      "def stripes(image, region, rng):\n    out = image.clone()\n    out[:, ::4] = 1.0\n"
                      "    return out, region\n")
    try:
        load_plugins([str(plugin)])
        kind, config = method_config("test_stripes", small_config())
        assert kind == "apt" and config.perturb.generators == ("test_stripes",)
    finally:
        unregister_perturbation("test_stripes")


def test_partial_last_line_is_repaired_and_ignored(tmp_path):
    append_cell(tmp_path, {"key": "a/k1/s0/apt", "metrics": {"image_auroc": 0.5}})
    with open(tmp_path / CELLS_FILE, "ab") as handle:
        handle.write(b'{"key": "a/k1/s1/ap')
    assert list(read_cells(tmp_path)) == ["a/k1/s0/apt"]
    assert repair_cells(tmp_path) == len(b'{"key": "a/k1/s1/ap')
    append_cell(tmp_path, {"key": "a/k1/s1/apt", "metrics": {"image_auroc": 0.7}})
    assert list(read_cells(tmp_path)) == ["a/k1/s0/apt", "a/k1/s1/apt"]


def test_table_means_and_stds_by_hand():
    values = {("a", 0): 0.80, ("a", 1): 0.90, ("a", 2): 1.00, ("b", 0): 0.60, ("b", 1): 0.70, ("b", 2): 0.50}
    cells = [{"category": c, "shots": 4, "seed": s, "method": "apt",
              "metrics": {"image_auroc": v, "aupro": None if c == "b" else 0.5}} for (c, s), v in values.items()]
    rows = {r["category"]: r for r in sweep_table(cells, ["image_auroc", "aupro"])}
    # a: mean 0.9, sample std sqrt(((-.1)² + 0 + .1²) / 2) = 0.1; b: mean 0.6, std 0.1
    assert rows["a"]["image_auroc"] == pytest.approx((0.9, 0.1)) and rows["b"]["image_auroc"] == pytest.approx((0.6, 0.1))
    # per-seed macro means: 0.70, 0.80, 0.75 → mean 0.75, std sqrt((0.05² + 0.05² + 0) / 2) = 0.05
    assert rows["mean"]["image_auroc"] == pytest.approx((0.75, 0.05))
    assert rows["a"]["aupro"] == (0.5, 0.0) and "aupro" not in rows["b"] and "aupro" not in rows["mean"]
    assert format_cell(rows["mean"]["image_auroc"]) == "75.0 ± 5.0"
    assert mean_std([0.5]) == (0.5, 0.0)


@pytest.mark.slow
def test_ray_executor_gives_the_local_cells(uninterrupted, mvtec_root, tmp_path):
    pytest.importorskip("ray", reason="the cluster extra: pip install 'apt-lab[cluster]'")
    folder, cells = uninterrupted
    ray_folder = run_sweep("mvtec", small_config(), root=mvtec_root, categories=CATEGORIES, out=tmp_path,
                           name="ray", executor="ray", workers=2, progress=False, **ARGS)
    assert _metrics(read_cells(ray_folder)) == _metrics(cells)
    assert len((ray_folder / CELLS_FILE).read_text().splitlines()) == N_CELLS


@pytest.mark.slow
def test_cli_sweep_then_table(mvtec_root, tmp_path, capsys):
    from apt_lab.cli import main

    args = ["sweep", "--dataset", "mvtec", "--root", str(mvtec_root), "--categories", "brick", "--shots", "1",
            "--seeds", "0", "1", "--methods", "human", "--preset", "quick", "--steps", "2", "--out", str(tmp_path),
            "--name", "cli", "--no-progress"]
    assert main(args) == 0
    assert main(["table", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    cells = read_cells(tmp_path / "cli")
    value = cells["brick/k1/s0/human"]["metrics"]["image_auroc"]
    assert f"| human | 1 | brick | {value * 100:.1f} ± 0.0 |" in out  # human prompts: no seed changes anything
    assert "RANDOM weights" in out and "224 px" in out
    page = (tmp_path / "cli" / "report.html").read_text()
    assert "sweep-table" in page and "sweep-bars" in page and "plotly" in page.lower()
    assert (tmp_path / "cli" / "table.csv").read_text().splitlines()[0].startswith("method,shots,category,image_auroc")
