"""The run store (issue 17): one record, one folder, cells validated on read, files written only through the safe
file layer, tables in plan order and one unit. No model here: identities and cells are built by hand, so every
expected value is checkable by eye."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from apt_lab.data.files import LOCK_NAME, append_line, atomic_write, folder_lock, remove_files
from apt_lab.errors import CorruptFileError, RunMismatchError, UnsafeNameError
from apt_lab.store import (CELLS_FILE, REJECTED_FILE, RUN_FILE, RunStore, format_cell, plan, plan_of, run_id,
                           table_csv, table_markdown, table_rows, write_tables)


def _identity(categories=("brick", "grass"), shots=(1, 2), seeds=(0, 1), methods=("apt", "human")) -> dict:
    return {"dataset": "demo", "root": "/data", "categories": list(categories), "shots": list(shots),
            "seeds": list(seeds), "apt_lab": "test", "files": {}, "draws": {},
            "variants": {m: {"kind": m if m == "human" else "apt", "settings": {}, "zero_shot": m == "human"}
                         for m in methods},
            "config": {"backbone": {"name": "apt-tiny", "pretrained": None}}}


def _record(identity: dict, category: str, shots: int, seed: int, method: str, auroc: float, **extra) -> dict:
    record = {"run": run_id(identity), "key": f"{category}/k{shots}/s{seed}/{method}", "category": category,
              "shots": shots, "seed": seed, "method": method, "metrics": {"image_auroc": auroc}, "timings": {},
              "artefacts": [], "pretrained": False, "eval_resolution": 224, "n_test": 14}
    record.update(extra)
    return record


@pytest.fixture
def store(tmp_path):
    """A claimed run folder (brick, grass × shots 1, 2 × seeds 0, 1 × apt + zero-shot human) with every cell."""
    folder = tmp_path / "run"
    folder.mkdir()
    store = RunStore(folder)
    store.claim(_identity())
    identity = store.identity()
    value = iter(range(100))
    for cell in plan_of(identity):
        store.append(_record(identity, cell.category, cell.shots, cell.seed, cell.method, 0.5 + next(value) / 100))
    return store


def test_zero_shot_methods_are_planned_once_per_category():
    keys = [c.key for c in plan(["a"], (1, 4), (0, 1), ("apt", "human"), zero_shot=("human",))]
    assert keys == ["a/k0/s0/human", "a/k1/s0/apt", "a/k1/s1/apt", "a/k4/s0/apt", "a/k4/s1/apt"]


def test_table_rows_follow_the_plan_whatever_order_cells_finished_in(store):
    """Ray appends cells in completion order: the table must not care (the old table followed the file)."""
    identity = store.identity()
    cells = list(store.cells().values())
    shuffled = cells[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != cells
    expected = [(r["category"], r["shots"], r["method"]) for r in table_rows(identity, cells)]
    assert [(r["category"], r["shots"], r["method"]) for r in table_rows(identity, shuffled)] == expected
    assert expected == [("brick", 0, "human"), ("brick", 1, "apt"), ("brick", 2, "apt"), ("grass", 0, "human"),
                        ("grass", 1, "apt"), ("grass", 2, "apt"), ("mean", 0, "human"), ("mean", 1, "apt"),
                        ("mean", 2, "apt")]


def test_one_seed_shows_no_std_and_human_appears_once(store):
    """Old tables printed "± 0.0" for one seed and repeated the zero-shot human row for every k."""
    markdown = table_markdown(store.identity(), store.cells())
    human = [line for line in markdown.splitlines() if "| human |" in line]
    assert len(human) == 3  # brick, grass, mean — not once per shot count
    assert "| human | 0 | brick | 1 | 50.0 |" in markdown  # n = 1: no "± 0.0"
    # brick k1 apt: seeds 0, 1 → 0.51, 0.52: mean 51.5, sample std 0.71 (in percent)
    assert "| apt | 1 | brick | 2 | 51.5 ± 0.7 |" in markdown
    assert format_cell((0.5, None)) == "50.0" and "± 0.0" not in markdown


def test_table_csv_is_in_percent_like_the_markdown(store):
    rows = table_csv(store.identity(), store.cells()).splitlines()
    assert rows[0].startswith("method,shots,category,n,image_auroc_pct,image_auroc_std_pct")
    assert "apt,1,brick,2,51.50,0.71" + ",," * 4 in rows


def test_a_foreign_cell_is_refused_naming_the_file_and_line(store):
    """A planted cell for a category not in the run changed the old table silently."""
    identity = store.identity()
    store.append(_record(identity, "gravel", 1, 0, "apt", 0.1))
    with pytest.raises(CorruptFileError, match=rf"{CELLS_FILE}, line 11: cell gravel/k1/s0/apt is not in this run"):
        store.cells()
    with pytest.raises(CorruptFileError, match="line 11"):
        write_tables(store.folder)


def test_a_conflicting_duplicate_and_another_runs_line_are_refused(store, tmp_path):
    identity = store.identity()
    store.append(_record(identity, "brick", 1, 0, "apt", 0.99))  # the same cell, another result
    with pytest.raises(CorruptFileError, match="line 11: a second, different result for cell brick/k1/s0/apt"):
        store.cells()
    other = _record(identity, "brick", 1, 0, "apt", 0.51)
    other["run"] = "0123456789abcdef"
    lines = (store.folder / CELLS_FILE).read_text().splitlines(keepends=True)
    (store.folder / CELLS_FILE).write_text("".join(lines[:-1]) + json.dumps(other) + "\n")
    with pytest.raises(CorruptFileError, match="line 11: written by another run"):
        store.cells()


def test_an_exact_duplicate_line_is_the_same_cell(store):
    first = (store.folder / CELLS_FILE).read_text().splitlines()[0]
    append_line(store.folder / CELLS_FILE, first)
    assert len(store.cells()) == 10


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    ('["a list"]', "not a JSON object"),
    ('{"key": "brick/k1/s0/apt"}', "missing or mistyped field"),
])
def test_malformed_lines_name_the_line_and_repair_moves_them_aside(store, line, problem):
    """The old reader raised a bare KeyError: 'key'."""
    append_line(store.folder / CELLS_FILE, line)
    with pytest.raises(CorruptFileError, match=rf"cells.jsonl, line 11: {problem}.*--repair"):
        store.cells()
    assert len(store.cells(repair=True)) == 10
    rejected = [json.loads(x) for x in (store.folder / REJECTED_FILE).read_text().splitlines()]
    assert rejected[0]["line"].strip() == line and problem in rejected[0]["problem"]
    assert len(store.cells()) == 10  # the file is clean again


def test_a_cut_off_last_line_is_no_cell_and_is_cut_before_appending(store):
    with open(store.folder / CELLS_FILE, "ab") as handle:
        handle.write(b'{"key": "brick/k1/s0/ap')
    assert len(store.cells()) == 10
    assert store.cut_partial_line() == len(b'{"key": "brick/k1/s0/ap')
    assert (store.folder / CELLS_FILE).read_bytes().endswith(b"\n")


def test_another_run_is_refused_unless_nothing_finished(store, tmp_path):
    with pytest.raises(RunMismatchError, match=r"holds another run \(shots: \[1, 2\] → \[4\].*--overwrite"):
        store.claim(_identity(shots=(4,)))
    fresh = RunStore(tmp_path / "fresh")
    fresh.folder.mkdir()
    fresh.claim(_identity())  # a run killed before its first cell leaves only run.json (and its lock) ...
    fresh.claim(_identity(shots=(4,)))  # ... which the next run claims without --overwrite
    assert fresh.identity()["shots"] == [4]


def test_overwrite_deletes_only_the_manifest(store):
    (store.folder / "cells" / "brick").mkdir(parents=True)
    (store.folder / "notes.txt").write_text("mine")
    identity = store.identity()
    store.claim(_identity(shots=(4,)), overwrite=True)
    assert sorted(p.name for p in store.folder.iterdir()) == ["cells", "notes.txt", RUN_FILE]
    assert store.identity()["shots"] == [4] and identity["shots"] == [1, 2]


def test_overwrite_on_a_folder_that_is_not_a_run_is_refused(tmp_path):
    """--overwrite once deleted a user's prompts/ and examples/ files in a folder that held no run."""
    folder = tmp_path / "mine"
    (folder / "prompts").mkdir(parents=True)
    (folder / "prompts" / "brick.json").write_text("{}")
    (folder / "examples.txt").write_text("keep me")
    with pytest.raises(RunMismatchError, match="is not an apt_lab run folder.*--overwrite deletes only a run's own"):
        RunStore(folder).claim(_identity(), overwrite=True)
    assert (folder / "prompts" / "brick.json").read_text() == "{}" and (folder / "examples.txt").exists()


def test_a_folder_in_the_old_format_is_refused_in_one_line(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(CorruptFileError, match=r"apt_lab 0.2's format \(results.json\).*another --name") as error:
        RunStore(tmp_path).identity()
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------ the safe file layer
@pytest.mark.parametrize("name", [CELLS_FILE, LOCK_NAME])
def test_a_link_planted_as_cells_or_lock_is_refused_and_the_target_untouched(store, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (store.folder / name).unlink(missing_ok=True)
    (store.folder / name).symlink_to(victim)
    with pytest.raises(UnsafeNameError, match="is a symbolic link"):
        if name == LOCK_NAME:
            with folder_lock(store.folder):
                pass
        else:
            store.append({"key": "x"})
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["table.md", "report.html", "run.json"])
def test_a_link_planted_as_an_output_is_replaced_never_followed(store, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (store.folder / name).unlink(missing_ok=True)
    (store.folder / name).symlink_to(victim)
    atomic_write(name, lambda tmp: tmp.write_text("new"), store.folder)
    assert victim.read_text() == "precious"
    assert not (store.folder / name).is_symlink() and (store.folder / name).read_text() == "new"


def test_temporary_files_are_fresh_so_a_planted_tmp_link_is_never_written(store, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("table.md.tmp", "table.csv.tmp", "results.json.tmp", "report.html.tmp"):
        (store.folder / name).symlink_to(victim)
    write_tables(store.folder)
    assert victim.read_text() == "precious" and (store.folder / "table.md").is_file()


def test_a_link_planted_as_an_artefact_folder_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.folder / "cells").symlink_to(outside)
    with pytest.raises(UnsafeNameError, match="cells is a symbolic link"):
        atomic_write("cells/brick.safetensors", lambda tmp: tmp.write_text("x"), store.folder)
    assert not any(outside.iterdir())
    assert remove_files(store.folder, ["cells"]) == ["cells"]  # the link itself goes, never what it points at
    assert outside.is_dir()


def test_the_store_reader_imports_no_torch(store):
    code = (f"import sys; import apt_lab.store as s; s.write_tables({str(store.folder)!r}); "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
