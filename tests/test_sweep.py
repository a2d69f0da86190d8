"""Sweeps (and runs, their one-cell case): resumable cells, killed mid-way and resumed, refused when mixed,
Ray = local in cells and table order."""
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
from apt_lab.data.files import Folder
from apt_lab.data.readers import DEMO_ROOT
from apt_lab.errors import RunMismatchError
from apt_lab.store import CELLS_FILE, RUN_FILE, read_run, write_tables
from apt_lab.sweep import Plan, Ray, run_sweep

CATEGORIES = ("brick", "coins")
ARGS = dict(categories=CATEGORIES, shots=(1,), seeds=(0, 1), methods=("apt", "human"), vary={"train.steps": [2, 3]})
N_CELLS = len(CATEGORIES) * (1 * 2 * 2 + 1)  # apt: 1 shot count × 2 seeds × 2 steps; human: zero-shot, once each


def read_cells(folder) -> dict:
    """The folder's finished cells, checked; none while it holds no run yet."""
    if not (Path(folder) / RUN_FILE).is_file():
        return {}
    with Folder(folder) as opened:
        return read_run(opened)[2]


SMALL = dict(train__steps=3, train__pool_size=4, train__batch_size=4, score__batch_size=8)


def small_config(**changes) -> APTConfig:
    return APTConfig.preset("quick", **{**SMALL, **changes})


def plan(root, config=None) -> Plan:
    """The module's sweep: two MVTec-layout categories, one shot count, two seeds, APT at 2 and 3 steps, human."""
    return Plan("mvtec", config or small_config(), root=str(root), **ARGS)


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
    folder = run_sweep(plan(mvtec_root), out=tmp_path_factory.mktemp("runs"), name="whole", progress=False)
    return folder, read_cells(folder)


def _metrics(cells: dict) -> dict:
    return {key: cell["metrics"] for key, cell in cells.items()}


@pytest.mark.slow
def test_sweep_records_every_cell_once_with_its_draws(uninterrupted, mvtec_root):
    folder, cells = uninterrupted
    assert len(cells) == N_CELLS
    lines = (folder / CELLS_FILE).read_text().splitlines()
    assert len(lines) == N_CELLS  # one line per cell, nothing duplicated
    layout = json.loads((folder / RUN_FILE).read_text())
    assert layout["vary"] == {"train.steps": [2, 3]} and layout["categories"] == list(CATEGORIES)
    assert layout["variants"]["apt train.steps=2"] == {"method": "apt", "settings": {"train.steps": 2},
                                                       "zero_shot": False}
    cell = cells["brick/k1/s0/apt train.steps=3"]  # what it computes: its draw and its resolved config
    assert cell["computes"]["draw"] == cell["shot_indices"] and cell["computes"]["config"]["train"]["steps"] == 3
    assert cell["ran"]["apt_lab"] and cell["ran"]["device"] == "cpu"  # where it ran: beside, never in, its id
    # human prompts are zero-shot: one cell per category, no shots; seeds change APT's numbers
    assert "brick/k0/s0/human" in cells and cells["brick/k0/s0/human"]["shot_indices"] == []
    assert cells["brick/k1/s0/apt train.steps=3"]["metrics"] != cells["brick/k1/s1/apt train.steps=3"]["metrics"]
    assert cells["brick/k1/s0/apt train.steps=2"]["metrics"] != cells["brick/k1/s0/apt train.steps=3"]["metrics"]


@pytest.mark.slow
def test_rerun_skips_finished_cells(uninterrupted, mvtec_root, capsys):
    folder, cells = uninterrupted
    before = (folder / CELLS_FILE).read_bytes()
    run_sweep(plan(mvtec_root), out=folder.parent, name=folder.name, progress=False)
    assert f"{N_CELLS} cells done, 0 to run" in capsys.readouterr().out
    assert (folder / CELLS_FILE).read_bytes() == before


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_table(uninterrupted, mvtec_root, tmp_path):
    folder, cells = uninterrupted
    script = (f"from apt_lab.config import APTConfig; from apt_lab.sweep import Plan, run_sweep\n"
              f"config = APTConfig.preset('quick', **{SMALL!r})\n"
              f"run_sweep(Plan('mvtec', config, root={str(mvtec_root)!r}, **{ARGS!r}), out={str(tmp_path)!r}, "
              f"name='killed', progress=False)\n")
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
        handle.write(b'{"key": "coins/k1/s0/apt train.st')
    run_sweep(plan(mvtec_root), out=tmp_path, name="killed", progress=False)
    resumed = read_cells(killed)
    assert len((killed / CELLS_FILE).read_text().splitlines()) == N_CELLS  # no lost and no duplicated cell
    assert _metrics(resumed) == _metrics(cells)
    assert write_tables(killed)[2].split("\n", 1)[1] == write_tables(folder)[2].split("\n", 1)[1]


@pytest.mark.slow
def test_a_changed_config_is_refused_and_an_unread_one_is_not(uninterrupted, mvtec_root, capsys):
    folder, _ = uninterrupted
    before = (folder / CELLS_FILE).read_bytes(), (folder / RUN_FILE).read_bytes()
    with pytest.raises(RunMismatchError, match=r"config\.train\.pool_size: 4 → 5.*--overwrite"):
        run_sweep(plan(mvtec_root, small_config(train__pool_size=5)), out=folder.parent, name=folder.name,
                  progress=False)
    # the base train.steps is what every variant sets itself (vary train.steps=2,3): no cell computes it
    run_sweep(plan(mvtec_root, small_config(train__steps=4)), out=folder.parent, name=folder.name, progress=False)
    assert f"{N_CELLS} cells done, 0 to run" in capsys.readouterr().out
    assert ((folder / CELLS_FILE).read_bytes(), (folder / RUN_FILE).read_bytes()) == before


def test_unknown_method_fails_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'stripes'.*--plugin"):
        run_sweep(Plan("demo", small_config(), categories=("brick",), methods=("stripes",)), out=tmp_path,
                  progress=False)
    assert not any(tmp_path.iterdir())


def test_a_plugin_perturbation_becomes_a_method(tmp_path):
    from apt_lab.perturbations import unregister_perturbation
    from apt_lab.sweep import apply_settings, load_plugins, method_settings

    plugin = tmp_path / "stripes.py"
    plugin.write_text("import apt_lab\n\n@apt_lab.register_perturbation('test_stripes')\n"
                      "def stripes(image, region, rng):\n    out = image.clone()\n    out[:, ::4] = 1.0\n"
                      "    return out, region\n")
    try:
        load_plugins([str(plugin)])
        kind, settings = method_settings("test_stripes")
        assert kind == "apt" and apply_settings(small_config(), settings).perturb.generators == ("test_stripes",)
    finally:
        unregister_perturbation("test_stripes")


@pytest.mark.slow
def test_ray_executor_gives_the_local_cells(uninterrupted, mvtec_root, tmp_path):
    pytest.importorskip("ray", reason="the cluster extra: pip install 'apt-lab[cluster]'")
    folder, cells = uninterrupted
    ray_folder = run_sweep(plan(mvtec_root), out=tmp_path, name="ray", executor=Ray(workers=2), progress=False)
    assert _metrics(read_cells(ray_folder)) == _metrics(cells)
    assert len((ray_folder / CELLS_FILE).read_text().splitlines()) == N_CELLS
    # the table follows the plan, not the order Ray's tasks finished in (the old table followed the file)
    assert write_tables(ray_folder)[2].split("\n", 1)[1] == write_tables(folder)[2].split("\n", 1)[1]


@pytest.mark.slow
def test_cli_sweep_then_table_and_a_run_folder_too(mvtec_root, tmp_path, capsys):
    from apt_lab.cli import main

    args = ["sweep", "--dataset", "mvtec", "--root", str(mvtec_root), "--categories", "brick", "--shots", "1",
            "--seeds", "0", "--methods", "human", "apt", "--preset", "quick", "--steps", "2", "--out",
            str(tmp_path), "--name", "cli", "--no-progress"]
    assert main(args) == 0
    assert main(["table", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    cells = read_cells(tmp_path / "cli")
    value = cells["brick/k0/s0/human"]["metrics"]["image_auroc"]
    assert f"| human | 0 | brick | 1 | {value * 100:.1f} |" in out  # one seed: no "± 0.0"
    assert "RANDOM weights" in out and "224 px" in out
    page = (tmp_path / "cli" / "report.html").read_text()
    assert "RANDOM weights" in page and "plotly.min.js" in page and "class='mean'" in page
    assert (tmp_path / "cli" / "table.csv").read_text().splitlines()[0].startswith("variant,shots,category,n,")
    # a run folder is the same format: `apt-lab table` reads it (it raised [Errno 2] ... sweep.json before)
    run = ["run", "--dataset", "mvtec", "--root", str(mvtec_root), "--categories", "brick", "--preset", "quick",
           "--steps", "2", "--out", str(tmp_path), "--name", "one", "--no-progress"]
    assert main(run) == 0
    assert main(["table", str(tmp_path / "one")]) == 0
    assert "| apt | 2 | brick | 1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_vary_gives_one_table_row_per_value_and_a_plot_against_it(uninterrupted):
    from apt_lab.report import write_report

    folder, _ = uninterrupted
    markdown = write_tables(folder)[2]
    rows = [line for line in markdown.splitlines() if "**mean**" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| human", "| apt train.steps=2", "| apt train.steps=3"]
    page = write_report(folder).read_text()
    assert "against train.steps" in page


def test_vary_values_are_checked_by_the_config_before_anything_runs(tmp_path):
    from apt_lab.errors import ConfigError
    from apt_lab.sweep import parse_vary

    for bad in (["smgs.lam=-1"], ["smgs.nope=1"], ["train.steps=two"]):
        with pytest.raises((ConfigError, ValueError), match=r"smgs\.lam|nope|steps"):
            run_sweep(Plan("demo", small_config(), categories=("brick",), methods=("apt",), vary=parse_vary(bad)),
                      out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_vary(["smgs.lam"])
    assert not any(tmp_path.iterdir())


def test_the_paper_ablation_expands_to_its_documented_variants(tmp_path):
    from pathlib import Path

    from apt_lab.sweep import NAMED_VARIANTS, ablation_methods, resolve_variants

    methods = ablation_methods("paper")
    variants = resolve_variants(methods, small_config())
    assert {name: v["settings"] for name, v in variants.items()} == {
        "human": {}, "no-roi-no-smgs": {"perturb.region": "image", "smgs.lam": 0.0},
        "no-roi": {"perturb.region": "image"}, "no-smgs": {"smgs.lam": 0.0}, "apt": {}}
    assert variants["human"]["zero_shot"] and not variants["apt"]["zero_shot"]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "sweeps.md").read_text()
    for name, (_, settings) in NAMED_VARIANTS.items():  # the docs give the exact settings of every variant
        assert f"`{name}`" in docs and all(f"`{key}" in docs for key in settings), name


@pytest.mark.slow
def test_a_variant_with_another_resolution_gets_its_own_features(tmp_path):
    folder = run_sweep(Plan("demo", small_config(), categories=("brick",), shots=(1,), seeds=(0,),
                            methods=("human",), vary={"backbone.image_size": [224, 160]}), out=tmp_path, progress=False)
    cells = read_cells(folder)
    assert {c["variant"]: c["eval_resolution"] for c in cells.values()} == {
        "human backbone.image_size=224": 224, "human backbone.image_size=160": 160}
