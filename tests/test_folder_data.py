"""The folder format as researchers have it (issue 25, point 5): defect types as subfolders of bad/, with or
without masks, and a root of several categories. Every fixture is a handful of 64x64 PNGs written here."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apt_lab.config import APTConfig
from apt_lab.data import list_categories, load_dataset


def _png(path: Path, seed: int, mask: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mask:
        arr = np.zeros((64, 64), np.uint8)
        arr[8:8 + 4 * (seed % 4 + 1), 16:32] = 255                 # 4, 8, 12 or 16 rows of 16 pixels
    else:
        arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _category(root: Path, defects: dict[str, int], masks: tuple[str, ...] = (), train: int = 6, good: int = 3,
              seed: int = 0) -> Path:
    """``train`` normal train images, ``good`` normal test images and ``defects[name]`` images per defect type:
    name "bad" lies directly in bad/, any other in bad/<name>/; defect types in ``masks`` get a mirrored mask."""
    for i in range(train):
        _png(root / "train" / f"t{i}.png", seed + i)
    for i in range(good):
        _png(root / "good" / f"g{i}.png", seed + 100 + i)
    for n, (defect, count) in enumerate(defects.items()):
        sub = Path() if defect == "bad" else Path(defect)
        for i in range(count):
            _png(root / "bad" / sub / f"d{i}.png", seed + 200 + 10 * n + i)
            if defect in masks:
                _png(root / "masks" / sub / f"d{i}.png", i, mask=True)
    return root


# --- defect types ---------------------------------------------------------------------------------------------
def test_defect_subfolders_name_defect_types_with_and_without_masks(tmp_path):
    root = _category(tmp_path / "pcb", {"bad": 1, "scratch": 2, "stain": 2}, masks=("bad", "scratch"))
    ds = load_dataset("folder", root)
    assert ds.category == "pcb" and len(ds.train) == 6
    assert ds.test.defects == ["good"] * 3 + ["bad", "scratch", "scratch", "stain", "stain"]
    assert ds.test.labels.tolist() == [0] * 3 + [1] * 5
    relative = [Path(p).relative_to(root).as_posix() if p else None for p in ds.test.mask_paths]
    assert relative == [None] * 3 + ["masks/d0.png", "masks/scratch/d0.png", "masks/scratch/d1.png", None, None]
    scratch = ds.test[4]
    assert scratch.defect == "scratch" and scratch.has_mask and int(scratch.mask.sum()) == 4 * 16
    assert not ds.test[6].has_mask and ds.test[6].defect == "stain"
    with pytest.warns(UserWarning, match="2 of 5 anomalous test images have no mask"):
        assert ds.test.masks(32) is None                             # the stains have none: no pixel metrics
    for i in range(2):
        _png(root / "masks" / "stain" / f"d{i}_mask.png", 3, mask=True)  # the <stem>_mask naming works here too
    assert load_dataset("folder", root).test.masks(32).shape == (8, 32, 32)


def test_a_defect_folder_called_good_or_nested_folders_are_refused(tmp_path):
    root = _category(tmp_path / "pcb", {"scratch": 1})
    _png(root / "bad" / "good" / "x.png", 1)
    with pytest.raises(ValueError, match=r"bad/good: 'good' names the normal images"):
        load_dataset("folder", root)
    (root / "bad" / "good" / "x.png").unlink()
    (root / "bad" / "good").rmdir()
    _png(root / "bad" / "scratch" / "deep" / "y.png", 2)
    with pytest.raises(ValueError, match=r"scratch/deep: defect folders hold images only"):
        load_dataset("folder", root)


def test_severity_shows_one_test_row_per_defect_type(tiny_backbone, tmp_path):
    from apt_lab.severity import severity

    root = _category(tmp_path / "pcb", {"scratch": 2, "stain": 2}, masks=("scratch",))
    config = APTConfig.preset("quick", train__steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                              # few normals, no stain masks: said elsewhere
        rows = severity(tiny_backbone, load_dataset("folder", root), config, strengths=[0.5], kinds=["gaussian"])
    assert [r["row"] for r in rows] == [("gaussian", 0.5), ("test:scratch", None), ("test:stain", None)]
    assert [r["n_anomalous"] for r in rows[1:]] == [2, 2]


# --- a root of categories -------------------------------------------------------------------------------------
def _two_categories(root: Path) -> Path:
    _category(root / "screw", {"scratch": 2}, masks=("scratch",), seed=0)
    _category(root / "nut", {"bad": 2}, seed=50)
    (root / "notes").mkdir()                                         # a folder without good/ or train/: not a category
    return root


def test_a_root_of_categories_lists_and_loads_each(tmp_path):
    root = _two_categories(tmp_path / "parts")
    assert list_categories("folder", root) == ["nut", "screw"]
    screw = load_dataset("folder", root, category="screw")
    assert screw.category == "screw" and screw.root == root / "screw"
    assert screw.test.defects == ["good"] * 3 + ["scratch"] * 2 and screw.test.has_masks
    assert load_dataset("folder", root, category="nut").test.defects == ["good"] * 3 + ["bad"] * 2
    # the same files alone or beside others: one fingerprint
    assert screw.fingerprint() == load_dataset("folder", root / "screw").fingerprint()
    with pytest.raises(ValueError, match=r"folder at .*parts has 2 categories; pass category= one of: nut, screw"):
        load_dataset("folder", root)
    with pytest.raises(ValueError, match=r"Unknown category 'bolt' for folder at .*parts\. Available: nut, screw"):
        load_dataset("folder", root, category="bolt")


def test_a_sweep_of_a_root_of_categories_has_one_row_per_category_and_a_mean(tmp_path):
    from apt_lab.store import write_tables
    from apt_lab.sweep import Plan, run_sweep

    root = _two_categories(tmp_path / "parts")
    plan = Plan("folder", APTConfig.preset("quick", train__steps=1), root=str(root), shots=(1,), seeds=(0,),
                methods=("apt",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                              # random weights, nut has no masks
        folder = run_sweep(plan, out=tmp_path / "runs", name="t", progress=False)
    markdown = write_tables(folder)[2]
    categories = [line.split("|")[3].strip() for line in markdown.splitlines() if line.startswith("| apt ")]
    assert categories == ["nut", "screw", "**mean**"], markdown  # one folder, one table, the mean over both


# --- layouts that are refused ---------------------------------------------------------------------------------
def test_a_root_that_is_one_category_and_holds_categories_is_refused(tmp_path):
    root = _two_categories(tmp_path / "parts")
    _png(root / "good" / "g.png", 1)
    for call in (lambda: list_categories("folder", root), lambda: load_dataset("folder", root, category="nut")):
        with pytest.raises(ValueError, match=r"parts is ambiguous: it holds good/ or train/ .* category folders "
                                             r"nut/, screw/ .*Pass root=.*nut"):
            call()


def test_a_root_with_neither_layout_names_the_folder_and_what_was_expected(tmp_path):
    root = tmp_path / "photos"
    _png(root / "bad" / "x.png", 1)
    (root / "misc").mkdir()
    for call in (lambda: list_categories("folder", root), lambda: load_dataset("folder", root)):
        with pytest.raises(FileNotFoundError, match=r"photos holds neither good/ .* nor category folders that each "
                                                    r"hold good/ or train/ .*found \['bad', 'misc'\]"):
            call()
