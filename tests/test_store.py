"""The run store (issues 17, 23): a folder of cells keyed by what they compute, checked on read, written only
through the opened folder, tables in layout order and one unit. No model here: layouts and cells are built by hand,
so every expected value is checkable by eye."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from apt_lab.data.files import LOCK_NAME, Folder, folder_lock
from apt_lab.errors import CorruptFileError, RunMismatchError, UnsafeNameError
from apt_lab.store import (CELLS_FILE, REJECTED_FILE, RunStore, cell_id, format_cell, plan, table_csv,
                           table_markdown, table_rows, write_tables)


def _layout(categories=("brick", "grass"), shots=(1, 2), seeds=(0, 1), methods=("apt", "human")) -> dict:
    return {"dataset": "demo", "experiment": "benchmark", "categories": list(categories), "shots": list(shots),
            "seeds": list(seeds), "vary": {},
            "variants": {m: {"method": m if m == "human" else "apt", "settings": {}, "zero_shot": m == "human"}
                         for m in methods}}


def _record(category: str, shots: int, seed: int, variant: str, auroc: float, **extra) -> dict:
    computes = {"dataset": "demo", "category": category, "shots": shots, "seed": seed, "variant": variant,
                "config": {"backbone": {"name": "apt-tiny", "pretrained": None}}}
    record = {"key": f"{category}/k{shots}/s{seed}/{variant}", "id": cell_id(computes), "computes": computes,
              "category": category, "shots": shots, "seed": seed, "variant": variant,
              "metrics": {"image_auroc": auroc}, "timings": {}, "artefacts": [], "pretrained": False,
              "eval_resolution": 224, "n_test": 14, "ran": {"device": "cpu"}}
    record.update(extra)
    return record


@pytest.fixture
def store(tmp_path):
    """A run folder (brick, grass × shots 1, 2 × seeds 0, 1 × apt + zero-shot human) with every cell."""
    folder = Folder(tmp_path / "run", create=True)
    store = RunStore(folder)
    layout = store.claim(_layout())
    value = iter(range(100))
    for cell in plan(layout["categories"], layout["shots"], layout["seeds"], list(layout["variants"]), ["human"]):
        store.append(_record(cell.category, cell.shots, cell.seed, cell.variant, 0.5 + next(value) / 100))
    yield store
    folder.close()


def test_zero_shot_methods_are_planned_once_per_category():
    keys = [c.key for c in plan(["a"], (1, 4), (0, 1), ("apt", "human"), zero_shot=("human",))]
    assert keys == ["a/k0/s0/human", "a/k1/s0/apt", "a/k1/s1/apt", "a/k4/s0/apt", "a/k4/s1/apt"]


def test_table_rows_follow_the_plan_whatever_order_cells_finished_in(store):
    """Ray appends cells in completion order: the table must not care (the old table followed the file)."""
    layout = store.layout()
    cells = list(store.cells().values())
    shuffled = cells[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != cells
    expected = [(r["category"], r["shots"], r["variant"]) for r in table_rows(layout, cells)]
    assert [(r["category"], r["shots"], r["variant"]) for r in table_rows(layout, shuffled)] == expected
    assert expected == [("brick", 0, "human"), ("brick", 1, "apt"), ("brick", 2, "apt"), ("grass", 0, "human"),
                        ("grass", 1, "apt"), ("grass", 2, "apt"), ("mean", 0, "human"), ("mean", 1, "apt"),
                        ("mean", 2, "apt")]


def test_one_seed_shows_no_std_and_human_appears_once(store):
    """Old tables printed "± 0.0" for one seed and repeated the zero-shot human row for every k."""
    markdown = table_markdown(store.layout(), store.cells())
    human = [line for line in markdown.split("**Paired")[0].splitlines() if "| human |" in line]
    assert len(human) == 3  # brick, grass, mean — not once per shot count
    assert "| human | 0 | brick | 1 | 50.0 |" in markdown  # n = 1: no "± 0.0"
    # brick k1 apt: seeds 0, 1 → 0.51, 0.52: mean 51.5, sample std 0.71 (in percent)
    assert "| apt | 1 | brick | 2 | 51.5 ± 0.7 |" in markdown
    assert format_cell((0.5, None)) == "50.0" and "± 0.0" not in markdown


def test_table_csv_is_in_percent_like_the_markdown(store):
    rows = table_csv(store.layout(), store.cells()).splitlines()
    assert rows[0].startswith("variant,shots,category,n,image_auroc_pct,image_auroc_std_pct")
    assert "apt,1,brick,2,51.5,0.7" + ",," * 4 in rows


def test_an_edited_line_and_a_second_computation_of_a_cell_are_refused(store, tmp_path):
    edited = _record("brick", 1, 0, "apt", 0.51)
    edited["computes"]["config"]["train"] = {"steps": 5}  # its identity edited, its id not
    store.append(edited)
    with pytest.raises(CorruptFileError, match="line 11: its id .* is not the hash of what it computes"):
        store.cells()
    (store.folder.path / CELLS_FILE).write_text("".join((store.folder.path / CELLS_FILE).read_text()
                                                        .splitlines(keepends=True)[:-1]))
    other = _record("brick", 1, 0, "apt", 0.51)
    other["computes"]["config"]["train"] = {"steps": 5}
    other["id"] = cell_id(other["computes"])  # the same name, another computation
    store.append(other)
    with pytest.raises(CorruptFileError, match="line 11: a second, different result for cell brick/k1/s0/apt"):
        store.cells()


def test_an_exact_duplicate_line_is_the_same_cell(store):
    first = (store.folder.path / CELLS_FILE).read_text().splitlines()[0]
    store.folder.append(CELLS_FILE, first)
    assert len(store.cells()) == 10


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    ('["a list"]', "not a JSON object"),
    ('{"key": "brick/k1/s0/apt"}', "missing or mistyped field"),
])
def test_malformed_lines_name_the_line_and_repair_moves_them_aside(store, line, problem):
    """The old reader raised a bare KeyError: 'key'."""
    store.folder.append(CELLS_FILE, line)
    with pytest.raises(CorruptFileError, match=rf"cells.jsonl, line 11: {problem}.*--repair"):
        store.cells()
    assert len(store.cells(repair=True)) == 10
    rejected = [json.loads(x) for x in (store.folder.path / REJECTED_FILE).read_text().splitlines()]
    assert rejected[0]["line"].strip() == line and problem in rejected[0]["problem"]
    assert len(store.cells()) == 10  # the file is clean again


def test_a_cut_off_last_line_is_no_cell_and_is_cut_before_appending(store):
    with open(store.folder.path / CELLS_FILE, "ab") as handle:
        handle.write(b'{"key": "brick/k1/s0/ap')
    assert len(store.cells()) == 10
    assert store.cut_partial_line() == len(b'{"key": "brick/k1/s0/ap')
    assert (store.folder.path / CELLS_FILE).read_bytes().endswith(b"\n")


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    """--overwrite once deleted a user's prompts/ and examples/ files in a folder that held no run."""
    folder = tmp_path / "mine"
    (folder / "prompts").mkdir(parents=True)
    (folder / "prompts" / "brick.json").write_text("{}")
    (folder / "examples.txt").write_text("keep me")
    with pytest.raises(RunMismatchError, match="is not an apt_lab run folder.*writes only into folders it made"), \
            Folder(folder) as opened:
        RunStore(opened).claim(_layout())
    assert (folder / "prompts" / "brick.json").read_text() == "{}" and (folder / "examples.txt").exists()


# ------------------------------------------------------------------------------ the safe file layer
@pytest.mark.parametrize("name", [CELLS_FILE, LOCK_NAME])
def test_a_link_planted_as_cells_or_lock_is_refused_and_the_target_untouched(store, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (store.folder.path / name).unlink(missing_ok=True)
    (store.folder.path / name).symlink_to(victim)
    with pytest.raises(UnsafeNameError, match="is a symbolic link"):
        if name == LOCK_NAME:
            with folder_lock(store.folder.path):
                pass
        else:
            store.append({"key": "x"})
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["table.md", "report.html", "run.json"])
def test_a_link_planted_as_an_output_is_replaced_never_followed(store, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (store.folder.path / name).unlink(missing_ok=True)
    (store.folder.path / name).symlink_to(victim)
    store.folder.write(name, "new")
    assert victim.read_text() == "precious"
    assert not (store.folder.path / name).is_symlink() and (store.folder.path / name).read_text() == "new"


def test_temporary_files_are_fresh_so_a_planted_tmp_link_is_never_written(store, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("table.md.tmp", "table.csv.tmp", "results.json.tmp", "report.html.tmp"):
        (store.folder.path / name).symlink_to(victim)
    write_tables(store.folder.path)
    assert victim.read_text() == "precious" and (store.folder.path / "table.md").is_file()


def test_the_store_reader_imports_no_torch(store):
    code = (f"import sys; import apt_lab.store as s; s.write_tables({str(store.folder.path)!r}); "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------ paired differences (issue 25)
def test_paired_differences_of_a_two_seed_ablation_match_a_hand_computation(tmp_path):
    """The old table printed means and stds side by side: no paired difference, no interval."""
    import numpy as np

    from apt_lab.store import BOOTSTRAP, components, paired_differences

    methods = ("apt", "no-smgs", "no-roi", "no-roi-no-smgs")
    auroc = {("brick", 0): (0.90, 0.85, 0.88, 0.80), ("brick", 1): (0.92, 0.86, 0.90, 0.84),
             ("grass", 0): (0.70, 0.71, 0.69, 0.66), ("grass", 1): (0.74, 0.70, 0.73, 0.70)}
    with Folder(tmp_path / "run", create=True) as folder:
        store = RunStore(folder)
        layout = store.claim(_layout(shots=(1,), methods=methods))
        for (category, seed), values in auroc.items():
            for variant, value in zip(methods, values):
                store.append(_record(category, 1, seed, variant, value))
        cells = store.cells()
    by_variant = {d["variant"]: d for d in paired_differences(layout, cells.values())}
    # no-smgs − apt over the pairs (brick, 0), (brick, 1), (grass, 0), (grass, 1), by hand:
    diffs = [0.85 - 0.90, 0.86 - 0.92, 0.71 - 0.70, 0.70 - 0.74]
    assert by_variant["no-smgs"]["n"] == 4 and by_variant["no-smgs"]["mean"] == pytest.approx(-0.035)
    resampled = np.array(diffs)[np.random.default_rng(0).integers(0, 4, (BOOTSTRAP, 4))].mean(1)
    assert (by_variant["no-smgs"]["low"], by_variant["no-smgs"]["high"]) == pytest.approx(
        tuple(np.percentile(resampled, [2.5, 97.5])))
    assert by_variant["no-smgs"]["over"] == "pairs" and -0.06 <= by_variant["no-smgs"]["low"] < -0.035
    roi = [c for c in components(layout, cells.values()) if c["component"] == "ROI"][0]
    # ROI on − off, paired over (category, seed) and both SMGS states: (apt − no-roi) and (no-smgs − no-roi-no-smgs)
    hand = [0.90 - 0.88, 0.92 - 0.90, 0.70 - 0.69, 0.74 - 0.73, 0.85 - 0.80, 0.86 - 0.84, 0.71 - 0.66, 0.70 - 0.70]
    assert roi["n"] == 8 and roi["mean"] == pytest.approx(sum(hand) / 8)
    markdown = table_markdown(layout, cells)
    assert "**Paired differences to apt**" in markdown and "| no-smgs | 1 | 4 | -3.5 | [" in markdown
    assert "| ROI | 1 | 8 | 2.2 |" in markdown
    csv_rows = table_csv(layout, cells).splitlines()
    assert csv_rows[0].endswith("diff_low_pct,diff_high_pct,resampled")
    assert any(r.startswith("no-smgs,1,difference to apt,4,-3.5,") and r.endswith(",pairs") for r in csv_rows)
    from apt_lab.report import write_report

    page = write_report(tmp_path / "run").read_text()
    assert "Paired differences to apt" in page and "<td>no-smgs</td><td>1</td><td>4</td><td>-3.5</td>" in page
    assert "<h2>Components</h2>" in page and "<td>ROI</td><td>1</td><td>8</td><td>2.2</td>" in page


def test_one_pair_is_resampled_over_test_images(tmp_path):
    scores = {"apt": [0.1, 0.2, 0.3, 0.8, 0.9, 0.7], "x": [0.1, 0.5, 0.3, 0.4, 0.9, 0.2]}
    labels = [0, 0, 0, 1, 1, 1]
    with Folder(tmp_path / "run", create=True) as folder:
        store = RunStore(folder)
        layout = store.claim(_layout(categories=("brick",), shots=(1,), seeds=(0,), methods=("apt", "x")))
        for variant, value in (("apt", 1.0), ("x", 0.5555555555555556)):
            store.append(_record("brick", 1, 0, variant, value, image_scores=scores[variant], labels=labels))
        cells = store.cells()
    from apt_lab.store import paired_differences

    (d,) = paired_differences(layout, cells.values())
    assert d["n"] == 1 and d["over"] == "test images" and d["low"] < d["mean"] < d["high"] <= 0
