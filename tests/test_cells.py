"""Cells keyed by what they compute (issue 23): a folder resumes anywhere, extends, and never reuses stale work.

Each test runs the real pipeline (apt-tiny with random weights, one tuning step, the demo photos) through the
command line or ``run_sweep``, then reads the folder's files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from apt_lab.config import APTConfig
from apt_lab.data.files import Folder, folder_lock
from apt_lab.errors import CorruptFileError, RunInUseError, RunMismatchError, UnsafeNameError
from apt_lab.store import CELLS_FILE, REJECTED_FILE, RUN_FILE, RunStore, cell_id, write_tables
from apt_lab.sweep import Plan, Severity, run_sweep

DEMO = Path(__file__).resolve().parents[1] / "apt_lab" / "data" / "demo"
QUICK = ["--preset", "quick", "--steps", "1", "--no-progress"]
pytestmark = pytest.mark.slow


def main(argv) -> int:
    from apt_lab.cli import main as cli

    return cli(argv)


def sweep(tmp_path, *extra, name="r") -> int:
    return main(["sweep", "--dataset", "demo", "--categories", "brick", "--shots", "1", "--seeds", "0",
                 "--methods", "apt", *QUICK, "--out", str(tmp_path), "--name", name, *extra])


def lines(folder: Path) -> bytes:
    return (folder / CELLS_FILE).read_bytes()


def test_resume_with_the_device_given_reuses_every_cell(tmp_path, capsys):
    assert sweep(tmp_path) == 0
    before = lines(tmp_path / "r")
    assert sweep(tmp_path, "--device", "cpu") == 0  # the old store: "config.backbone.device: None → 'cpu'"
    assert "1 cells done, 0 to run" in capsys.readouterr().out
    assert lines(tmp_path / "r") == before


def test_resume_through_another_path_to_the_same_files(tmp_path, capsys):
    first, second = tmp_path / "data-a" / "mvtec", tmp_path / "data-b" / "mvtec"
    shutil.copytree(DEMO, first)
    shutil.copytree(DEMO, second, copy_function=shutil.copy)  # copied again: other modification times
    (tmp_path / "link").symlink_to(second)
    run = ["sweep", "--dataset", "mvtec", "--categories", "brick", "--shots", "1", "--seeds", "0", "--methods",
           "apt", *QUICK, "--out", str(tmp_path / "runs"), "--name", "r"]
    assert main([*run, "--root", str(first)]) == 0
    before = lines(tmp_path / "runs" / "r")
    assert main([*run, "--root", str(tmp_path / "link")]) == 0  # the old store: refused on root
    assert "1 cells done, 0 to run" in capsys.readouterr().out
    assert lines(tmp_path / "runs" / "r") == before
    record = json.loads(before)
    assert record["ran"]["root"] == str(first.resolve()) and record["ran"]["device"] == "cpu"


def test_a_folder_dataset_keeps_its_category_name_through_a_link(tmp_path):
    from apt_lab.data import list_categories

    root = tmp_path / "textile"
    (root / "good").mkdir(parents=True)
    (tmp_path / "my-link").symlink_to(root)
    assert list_categories("folder", tmp_path / "my-link") == ["textile"]


def test_one_more_seed_reuses_every_line_byte_for_byte_and_runs_only_the_new_cell(tmp_path, capsys):
    assert sweep(tmp_path) == 0
    before = lines(tmp_path / "r")
    capsys.readouterr()
    assert main(["sweep", "--dataset", "demo", "--categories", "brick", "--shots", "1", "--seeds", "0", "1",
                 "--methods", "apt", *QUICK, "--out", str(tmp_path), "--name", "r"]) == 0
    assert "1 cells done, 1 to run" in capsys.readouterr().out  # the old store: "seeds: [0] → [0, 1]"
    after = lines(tmp_path / "r")
    assert after.startswith(before) and after.count(b"\n") == 2
    assert json.loads(after.splitlines()[1])["seed"] == 1
    assert json.loads((tmp_path / "r" / RUN_FILE).read_text())["seeds"] == [0, 1]


@pytest.fixture
def unregister():
    """Perturbations a test's plugin registers leave the registry with the test (later tests list them all)."""
    from apt_lab.perturbations import list_perturbations, unregister_perturbation

    before = set(list_perturbations())
    yield
    for name in set(list_perturbations()) - before:
        unregister_perturbation(name)


def test_an_edited_plugin_is_refused_naming_it(tmp_path, capsys, unregister):
    plugin = tmp_path / "stripes_plugin.py"
    source = textwrap.dedent("""
        import apt_lab

        @apt_lab.register_perturbation("stripes_edit", replace=True)
        def stripes(image, region, rng, strength=0.5):
            out = image.clone()
            out[:, ::4] = STRENGTH
            return out, region.clone()
        """)
    plugin.write_text(source.replace("STRENGTH", "1.0"))
    run = ["--methods", "stripes_edit", "--plugin", str(plugin)]
    assert main(["sweep", "--dataset", "demo", "--categories", "brick", "--shots", "1", "--seeds", "0", *run,
                 *QUICK, "--out", str(tmp_path), "--name", "p"]) == 0
    plugin.write_text(source.replace("STRENGTH", "0.0"))  # the same name, other code
    capsys.readouterr()
    assert main(["sweep", "--dataset", "demo", "--categories", "brick", "--shots", "1", "--seeds", "0", *run,
                 *QUICK, "--out", str(tmp_path), "--name", "p"]) == 1  # the old store: "1 cells done, 0 to run"
    error = capsys.readouterr().err
    assert "code.stripes_edit" in error and "--overwrite" in error


def test_a_changed_step_count_is_refused_naming_it_and_overwrite_replaces_only_that_cell(tmp_path, capsys):
    assert main(["sweep", "--dataset", "demo", "--categories", "brick", "--shots", "1", "--seeds", "0",
                 "--methods", "apt", "human", *QUICK, "--out", str(tmp_path), "--name", "r"]) == 0
    human = [line for line in lines(tmp_path / "r").splitlines() if b'"variant": "human"' in line]
    changed = ["sweep", "--dataset", "demo", "--categories", "brick", "--shots", "1", "--seeds", "0", "--methods",
               "apt", "human", "--preset", "quick", "--steps", "2", "--no-progress", "--out", str(tmp_path),
               "--name", "r"]
    capsys.readouterr()
    assert main(changed) == 1
    assert "config.train.steps: 1 → 2" in capsys.readouterr().err
    assert main([*changed, "--overwrite"]) == 0
    assert "1 cells done, 1 to run" in capsys.readouterr().out  # human prompts never read train: kept
    after = lines(tmp_path / "r").splitlines()
    assert human[0] in after and len(after) == 2
    assert [json.loads(line)["computes"]["config"]["train"]["steps"] for line in after
            if b'"variant": "apt"' in line] == [2]


def test_repeated_shots_and_seeds_collapse_to_one_cell(tmp_path):
    assert main(["sweep", "--dataset", "demo", "--categories", "brick", "--shots", "1", "1", "--seeds", "0", "0",
                 "--methods", "apt", *QUICK, "--out", str(tmp_path), "--name", "r"]) == 0
    assert lines(tmp_path / "r").count(b"\n") == 1


@pytest.mark.parametrize("key", ["train.seed", "train.k_shot"])
def test_varying_what_each_cell_sets_is_refused_pointing_to_seeds_and_shots(tmp_path, key):
    plan = Plan("demo", APTConfig.preset("quick"), categories=("brick",), vary={key: [0, 1]})
    with pytest.raises(ValueError, match="--seeds|--shots"):
        run_sweep(plan, out=tmp_path)
    assert not (tmp_path / "sweep-demo-quick").exists()


# ------------------------------------------------------------------------------------------- severity
def _severity(tmp_path, strengths=(0.0, 0.5), **kw):
    spec = Severity(strengths, ("gaussian",), **kw)
    plan = Plan("demo", APTConfig.preset("quick", train__steps=1), categories=("brick",), shots=(2,), seeds=(0,),
                methods=("apt",), severity=spec)
    return run_sweep(plan, out=tmp_path, name="s", progress=False)


def test_severity_reruns_nothing_extends_with_other_strengths_and_refuses_another_threshold(tmp_path, capsys):
    folder = _severity(tmp_path)
    first = lines(folder)
    assert first.count(b"\n") == 6  # gaussian at 0 and 0.5, then the 4 real defect types of brick
    record = json.loads(first.splitlines()[0])
    assert len(record["shot_indices"]) == 2 and len(record["calibration"]) == 3 and len(record["evaluation"]) == 3
    _severity(tmp_path)
    assert "6 cells done, 0 to run" in capsys.readouterr().out and lines(folder) == first
    _severity(tmp_path, strengths=(0.0, 0.5, 1.0))
    assert "6 cells done, 1 to run" in capsys.readouterr().out and lines(folder).startswith(first)
    with pytest.raises(RunMismatchError, match="severity.target_fpr"):
        _severity(tmp_path, target_fpr=0.1)
    markdown = write_tables(folder)[2]
    assert "| apt | 2 | gaussian | 1 | brick | 1 | " in markdown and "test:hole" in markdown
    from apt_lab.report import write_report

    assert "gaussian" in write_report(folder).read_text()


def test_severity_interrupted_then_rerun_gives_the_uninterrupted_table(tmp_path, monkeypatch, capsys):
    import apt_lab.severity as sev

    whole = _severity(tmp_path / "whole")
    real = sev.severity_rows

    def two_then_ctrl_c(*args):
        for n, item in enumerate(real(*args)):
            if n == 2:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(sev, "severity_rows", two_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _severity(tmp_path / "cut")
    assert lines(tmp_path / "cut" / "s").count(b"\n") == 2
    monkeypatch.setattr(sev, "severity_rows", real)
    capsys.readouterr()
    _severity(tmp_path / "cut")
    assert "2 cells done, 4 to run" in capsys.readouterr().out
    assert write_tables(tmp_path / "cut" / "s")[2] == write_tables(whole)[2]


# ------------------------------------------------------------------------------------------- the files
def _layout() -> dict:
    return {"dataset": "demo", "experiment": "benchmark", "categories": ["brick"], "shots": [1], "seeds": [0],
            "variants": {"apt": {"method": "apt", "settings": {}, "zero_shot": False}}, "vary": {}}


def _record(seed: int, artefacts=()) -> dict:
    computes = {"dataset": "demo", "category": "brick", "shots": 1, "seed": seed, "variant": "apt",
                "config": {"backbone": {"name": "apt-tiny"}}}
    return {"key": f"brick/k1/s{seed}/apt", "id": cell_id(computes), "computes": computes, "category": "brick",
            "shots": 1, "seed": seed, "variant": "apt", "metrics": {"image_auroc": 0.5}, "timings": {},
            "artefacts": list(artefacts), "pretrained": False, "eval_resolution": 224, "n_test": 14,
            "ran": {"device": "cpu"}}


@pytest.fixture
def made(tmp_path):
    """A run folder with one valid cell, and a user's file beside it."""
    path = tmp_path / "run"
    with Folder(path, create=True) as folder:
        RunStore(folder).claim(_layout())
        RunStore(folder).append(_record(0))
    (path / "notes.txt").write_text("mine")
    return path


def test_repair_while_another_process_appends_keeps_every_line(made):
    n = 40
    records = [json.dumps(_record(seed), sort_keys=True) for seed in range(1, n + 1)]
    script = textwrap.dedent(f"""
        import sys, time
        from apt_lab.data.files import Folder
        lines = sys.stdin.read().splitlines()
        with Folder({str(made)!r}) as folder, folder.lock():
            print("locked", flush=True)
            for line in lines:
                folder.append("cells.jsonl", line)
                time.sleep(0.02)
        """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    writer.stdin.write("\n".join(records))
    writer.stdin.close()
    assert writer.stdout.readline().strip() == "locked"
    refused = 0
    while writer.poll() is None:
        try:
            write_tables(made, repair=True)  # the old code: read all, rewrite — lines appended meanwhile were lost
        except RunInUseError:
            refused += 1
    assert writer.wait() == 0 and refused > 0
    _, _, markdown = write_tables(made, repair=True)
    kept = (made / CELLS_FILE).read_text().splitlines()
    assert len(kept) == n + 1 and kept[1:] == records


def test_table_during_a_live_run_prints_but_writes_nothing(made):
    with folder_lock(made):
        out = subprocess.run([sys.executable, "-c", "from apt_lab.store import write_tables; "
                              f"print(write_tables({str(made)!r})[:2])"], capture_output=True, text=True)
    assert out.returncode == 0 and "(None, None)" in out.stdout and not (made / "table.md").exists()


@pytest.mark.parametrize("artefact", [".apt_lab.lock", "notes.txt", "run.json", "../notes.txt", "/etc/hostname",
                                      "cells/brick/k1/s0/apt/../../../../../notes.txt",
                                      "cells/brick/k1/s1/apt/prompts.json"])
def test_an_artefact_outside_the_cells_own_folder_makes_the_line_bad_and_deletes_nothing(made, artefact):
    with Folder(made) as folder:
        folder.append(CELLS_FILE, json.dumps(_record(0, [artefact]) | {"seed": 0}))
        store = RunStore(folder)
        with pytest.raises(CorruptFileError, match="line 2: an artefact lies outside"):
            store.cells()
        with folder.lock():
            assert list(store.cells(repair=True)) == ["brick/k1/s0/apt"]
            store.drop(["brick/k1/s0/apt"])
    assert (made / "notes.txt").read_text() == "mine" and (made / RUN_FILE).is_file()
    assert artefact in (made / REJECTED_FILE).read_text()


def test_a_linked_artefact_folder_is_refused_before_anything_is_deleted(made, tmp_path):
    outside = tmp_path / "outside" / "k1" / "s0" / "apt"
    outside.mkdir(parents=True)
    (outside / "prompts.json").write_text("keep")
    (made / "cells").mkdir()
    (made / "cells" / "brick").symlink_to(tmp_path / "outside")
    with Folder(made) as folder:
        folder.write(CELLS_FILE, json.dumps(_record(0, ["cells/brick/k1/s0/apt/prompts.json"]), sort_keys=True)
                     + "\n")
        with pytest.raises(UnsafeNameError, match="symbolic link"):
            RunStore(folder).drop(["brick/k1/s0/apt"])
    assert (outside / "prompts.json").read_text() == "keep"
    assert (made / RUN_FILE).is_file() and (made / CELLS_FILE).read_text().count("\n") == 1


def test_a_run_folder_swapped_for_a_link_mid_run_sends_nothing_outside(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = tmp_path / "runs" / "r"
    real_append = RunStore.append

    def append_then_swap(self, record):
        real_append(self, record)
        if not (tmp_path / "moved").exists():
            path.rename(tmp_path / "moved")
            path.symlink_to(outside)
    monkeypatch.setattr(RunStore, "append", append_then_swap)
    plan = Plan("demo", APTConfig.preset("quick", train__steps=1), categories=("brick", "grass"), shots=(1,),
                seeds=(0,), methods=("apt",), artefacts=True)
    run_sweep(plan, out=tmp_path / "runs", name="r", progress=False)
    assert list(outside.iterdir()) == []
    moved = (tmp_path / "moved" / CELLS_FILE).read_text().splitlines()
    assert [json.loads(line)["category"] for line in moved] == ["brick", "grass"]
    assert (tmp_path / "moved" / "cells" / "grass" / "k1" / "s0" / "apt" / "examples.safetensors").is_file()


def test_a_fifo_as_the_cells_file_is_one_named_error_not_a_hang(made):
    (made / CELLS_FILE).unlink()
    os.mkfifo(made / CELLS_FILE)
    with pytest.raises(CorruptFileError, match=r"cells\.jsonl is not a regular file"):
        write_tables(made)
    with pytest.raises(CorruptFileError, match=r"cells\.jsonl is not a regular file"):
        run_sweep(Plan("demo", APTConfig.preset("quick"), categories=("brick",), shots=(1,), seeds=(0,),
                       methods=("apt",)), out=made.parent, name=made.name, progress=False)


def test_a_non_utf8_line_is_named_and_repair_moves_it_aside(made):
    with open(made / CELLS_FILE, "ab") as file:
        file.write(b'{"key": "\xff"}\n')
    with pytest.raises(CorruptFileError, match=r"cells\.jsonl, line 2: not UTF-8 text \(byte 0xff"):
        write_tables(made)
    write_tables(made, repair=True)
    assert (made / CELLS_FILE).read_bytes().count(b"\n") == 1
    assert "\\xff" in (made / REJECTED_FILE).read_text()


def test_a_folder_of_the_0_2_store_is_refused_in_one_line(tmp_path):
    (tmp_path / RUN_FILE).write_text(json.dumps({"format": "apt_lab.run/1"}))
    with pytest.raises(CorruptFileError, match="apt_lab 0.2's store.*another --name"):
        write_tables(tmp_path)


# ------------------------------------------------------------------------------------------- issue 25
def test_coverage_on_every_tuned_cell_and_the_same_computation_mark_on_a_texture(tmp_path, capsys):
    """The old table read "ROI adds 0" on textures, with nothing recorded to say why."""
    assert main(["sweep", "--dataset", "demo", "--categories", "grass", "coins", "--shots", "1", "--seeds", "0",
                 "--methods", "apt", "no-roi", "human", *QUICK, "--out", str(tmp_path), "--name", "r"]) == 0
    out = capsys.readouterr().out
    records = {r["key"]: r for r in map(json.loads, lines(tmp_path / "r").splitlines())}
    tuned = [r for r in records.values() if r["variant"] != "human"]
    assert all(0 < r["roi_coverage"] <= 1 and r["loss_curve"] for r in tuned)
    assert records["grass/k1/s0/apt"]["roi_coverage"] == 1.0  # apt-tiny sees grass as a texture: whole image
    assert records["coins/k1/s0/apt"]["roi_coverage"] < 1.0 and records["coins/k1/s0/apt"]["effective"][
        "perturb.region"] == "roi"
    assert records["grass/k1/s0/no-roi"]["metrics"] == records["grass/k1/s0/apt"]["metrics"]
    assert out.count("note: ≡ apt: on grass, no-roi computes the same as apt") == 1  # the run says it once
    table = (tmp_path / "r" / "table.md").read_text()
    assert "| no-roi (≡ apt) | 1 | grass |" in table and "| no-roi | 1 | coins |" in table


def test_per_seed_draws_differ_by_seed_and_are_reused_on_resume(tmp_path, capsys):
    run = ["sweep", "--dataset", "demo", "--categories", "brick", "--shots", "2", "--seeds", "0", "1",
           "--methods", "apt", "--draw", "seed", *QUICK, "--out", str(tmp_path), "--name", "r"]
    assert main(run) == 0
    draws = {r["seed"]: r["computes"]["draw"] for r in map(json.loads, lines(tmp_path / "r").splitlines())}
    assert draws[0] != draws[1] and all(len(d) == 2 for d in draws.values())
    assert all(r["shot_indices"] == r["computes"]["draw"] for r in map(json.loads, lines(tmp_path / "r").splitlines()))
    capsys.readouterr()
    assert main(run) == 0 and "2 cells done, 0 to run" in capsys.readouterr().out
    assert main([*run[:-2], "--name", "fixed", "--draw", "fixed"]) == 0
    fixed = {r["seed"]: r["computes"]["draw"] for r in map(json.loads, lines(tmp_path / "fixed").splitlines())}
    assert fixed[0] == fixed[1]  # the paper's fixed draw: seeds vary training only


def test_a_cell_that_fell_back_to_random_weights_reruns_once_the_weights_can_be_had(tmp_path, capsys, monkeypatch):
    """Offline, a cell asking for ViT-B-32 / openai runs on random weights; the old store then reused it forever."""
    import apt_lab.weights

    plan = Plan("demo", APTConfig.preset("cpu", train__steps=1), categories=("brick",), shots=(1,), seeds=(0,),
                methods=("apt",))
    folder = run_sweep(plan, out=tmp_path, name="r", progress=False)
    assert json.loads(lines(folder))["pretrained"] is False
    run_sweep(plan, out=tmp_path, name="r", progress=False)  # still offline: the cell stands
    assert "1 cells done, 0 to run" in capsys.readouterr().out
    monkeypatch.setattr(apt_lab.weights, "resolve_weights", lambda name, pretrained: object())  # they can be had now
    run_sweep(plan, out=tmp_path, name="r", progress=False)
    out = capsys.readouterr().out
    assert "1 cell(s) ran on random weights" in out and "0 cells done, 1 to run" in out
    assert lines(folder).count(b"\n") == 1
