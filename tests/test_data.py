"""apt_lab.data: readers, image/mask conversion, resizing, few-shot draws and the demo set."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from apt_lab.data import (Dataset, Item, Split, few_shot, list_categories, load_dataset,
                          resize_images, resize_masks)
from apt_lab.data.draws import FEWSHOT_DIR, TRAIN_COUNTS, fixed_draw, fixed_table
from apt_lab.data.images import pil_to_tensor, read_image, read_mask
from apt_lab.data.readers import DEMO_ROOT

REPO = Path(__file__).resolve().parents[1]


# --- fixtures ------------------------------------------------------------------------------------
def _rgb(seed: int, w: int = 8, h: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(arr: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(path)
    return path


def _mask(h: int = 6, w: int = 8, box=(1, 3, 2, 5)) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = 255
    return m


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """<root>/widget: 3 train, 1 test good, 2 test crack with masks; <root>/gadget: 1 train."""
    root = tmp_path / "mvtec"
    cat = root / "widget"
    for i in range(3):
        _save(_rgb(i), cat / "train" / "good" / f"{i:03d}.png")
    _save(_rgb(10), cat / "test" / "good" / "000.png")
    for i in range(2):
        _save(_rgb(20 + i), cat / "test" / "crack" / f"{i:03d}.png")
        _save(_mask(box=(i, i + 2, 2, 5)), cat / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    _save(_rgb(30), root / "gadget" / "train" / "good" / "000.png")
    _save(_rgb(31), root / "gadget" / "test" / "good" / "000.png")
    return root


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        _save(_rgb(i), root / "candle/Data/Images/Normal" / f"{i:04d}.JPG".replace("JPG", "png"))
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.png,")
    _save(_rgb(5), root / "candle/Data/Images/Normal/0005.png")
    rows.append("candle,test,normal,candle/Data/Images/Normal/0005.png,")
    _save(_rgb(6), root / "candle/Data/Images/Anomaly/000.png")
    label_mask = np.zeros((6, 8), np.uint8)
    label_mask[2:4, 1:3] = 1                               # VisA masks hold small label values
    _save(label_mask, root / "candle/Data/Masks/Anomaly/000.png")
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/000.png,"
                "candle/Data/Masks/Anomaly/000.png")
    _save(_rgb(7), root / "pcb1/Data/Images/Normal/0000.png")
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.png,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


# --- MVTec layout --------------------------------------------------------------------------------
def test_mvtec_layout_items_and_values(mvtec_root):
    assert list_categories("mvtec", mvtec_root) == ["gadget", "widget"]
    ds = load_dataset("mvtec", mvtec_root, "widget")
    assert isinstance(ds, Dataset) and isinstance(ds.train, Split)
    assert (ds.name, ds.category, len(ds.train), len(ds.test)) == ("mvtec", "widget", 3, 3)
    assert ds.test.defects == ["crack", "crack", "good"]
    assert ds.test.labels.tolist() == [1, 1, 0] and ds.test.labels.dtype == torch.long
    item = ds.test[0]
    assert isinstance(item, Item)
    assert item.image.dtype == torch.float32 and item.image.shape == (3, 6, 8)
    expected = torch.from_numpy(_rgb(20)).permute(2, 0, 1).float() / 255
    assert torch.equal(item.image, expected)
    assert item.mask.dtype == torch.bool and item.mask.shape == (6, 8)
    assert item.mask.sum() == 6 and item.mask[0, 2:5].all() and not item.mask[2:].any()
    assert (item.label, item.defect, item.category, item.has_mask) == (1, "crack", "widget", True)
    good = ds.test[-1]
    assert good.label == 0 and good.defect == "good" and not good.mask.any()
    assert ds.train[1].path.endswith("train/good/001.png")
    assert [it.label for it in ds.test] == [1, 1, 0]


def test_single_category_default_and_multi_category_error(mvtec_root):
    import shutil

    with pytest.raises(ValueError, match="has 2 categories; pass category= one of: gadget, widget"):
        load_dataset("mvtec", mvtec_root)
    shutil.rmtree(mvtec_root / "gadget")  # one category left: it is the default
    ds = load_dataset("mvtec", mvtec_root)
    assert (ds.category, len(ds.train), len(ds.test)) == ("widget", 3, 3)
    assert all(Path(p).parent.parent.parent.name == "widget" for p in ds.train.paths + ds.test.paths)


def test_batch_helpers_resize_whole_image(mvtec_root):
    ds = load_dataset("mvtec", mvtec_root, "widget")
    x = ds.test.images(4)
    assert x.shape == (3, 3, 4, 4) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    ref = resize_images(read_image(ds.test.paths[1])[None], 4)
    assert torch.allclose(x[1], ref[0])
    m = ds.test.masks(12, indices=[0, 2])
    assert m.shape == (2, 12, 12) and m.dtype == torch.bool
    assert torch.equal(m[0], resize_masks(read_mask(ds.test.mask_paths[0])[None], 12)[0])
    assert not m[1].any()
    assert ds.train.images(5, torch.tensor([2])).shape == (1, 3, 5, 5)


def test_images_are_not_centre_cropped(tmp_path):
    arr = np.zeros((4, 12, 3), np.uint8)      # wide image: red left third, blue right third
    arr[:, :4, 0] = 255
    arr[:, 8:, 2] = 255
    x = resize_images(pil_to_tensor(Image.fromarray(arr))[None], 6)[0]     # (3, 6, 6)
    assert x[0, :, 0].min() > 0.9 and x[2, :, -1].min() > 0.9   # both borders survive


def test_resize_masks_nearest_never_soft():
    m = torch.tensor([[[True, False], [False, False]]])
    out = resize_masks(m, 4)
    assert out.dtype == torch.bool
    assert out.int()[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    down = resize_masks(torch.ones(1, 7, 7, dtype=torch.bool), 3)
    assert down.all() and down.shape == (1, 3, 3)
    with pytest.raises(ValueError, match=r"expects \(B, H, W\)"):
        resize_masks(m[0], 4)
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        resize_images(torch.rand(3, 4, 4), 2)


def test_btad_ok_ko_bmp_and_plain_mask_names(tmp_path):
    root = tmp_path / "btad"
    _save(_rgb(1), root / "01/train/ok/0000.bmp")
    _save(_rgb(2), root / "01/test/ok/0000.bmp")
    _save(_rgb(3), root / "01/test/ko/0000.bmp")
    _save(_rgb(4), root / "01/test/ko/0001.bmp")
    _save(_mask(), root / "01/ground_truth/ko/0000.png")            # <id>.png
    _save(_mask(box=(0, 1, 0, 1)), root / "01/ground_truth/ko/0001_mask.png")  # <id>_mask.png
    ds = load_dataset("btad", root, "01")
    assert ds.test.defects == ["ko", "ko", "good"] and ds.test.labels.tolist() == [1, 1, 0]
    assert ds.test[0].mask.sum() == 6 and ds.test[1].mask.sum() == 1
    assert torch.equal(ds.train[0].image, torch.from_numpy(_rgb(1)).permute(2, 0, 1) / 255)


def test_visa_1cls_split(visa_root):
    assert list_categories("visa", visa_root) == ["candle", "pcb1"]
    ds = load_dataset("visa", visa_root, "candle")
    assert len(ds.train) == 3 and ds.train.labels.tolist() == [0, 0, 0]
    assert ds.test.labels.tolist() == [1, 0] and ds.test.defects == ["anomaly", "good"]
    item = ds.test[0]
    assert item.mask.sum() == 4 and item.mask[2:4, 1:3].all()    # label value 1 counts (> 0)
    assert ds.train.paths == sorted(ds.train.paths)


def test_visa_missing_mask_and_csv(visa_root, tmp_path):
    (visa_root / "candle/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"Missing ground-truth mask.*Anomaly/000.png"):
        load_dataset("visa", visa_root, "candle")
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        load_dataset("visa", tmp_path, "candle")


def test_folder_format_with_and_without_masks(tmp_path):
    root = tmp_path / "parts"
    for i in range(4):
        _save(_rgb(i), root / "good" / f"g{i}.png")
    _save(_rgb(9), root / "bad" / "b0.png")
    _save(_rgb(8), root / "bad" / "b1.jpg")
    _save(_mask(), root / "masks" / "b0.png")
    ds = load_dataset("folder", root)
    assert ds.category == "parts" and list_categories("folder", root) == ["parts"]
    assert [Path(p).name for p in ds.train.paths] == ["g0.png", "g2.png"]
    assert ds.test.labels.tolist() == [0, 0, 1, 1]
    assert ds.test[2].has_mask and ds.test[2].mask.sum() == 6
    assert not ds.test[3].has_mask and not ds.test[3].mask.any()
    with pytest.warns(UserWarning, match=r"pixel metrics skipped — 1 of 2 anomalous test images have no mask"):
        assert not ds.test.has_masks and ds.test.masks(8) is None
    (root / "masks" / "b1.png").write_bytes((root / "masks" / "b0.png").read_bytes())
    ds = load_dataset("folder", root)
    assert ds.test.has_masks and ds.test.masks(8).shape == (4, 8, 8)


# --- bad inputs ----------------------------------------------------------------------------------
def test_corrupt_and_truncated_images(mvtec_root):
    bad = mvtec_root / "widget/train/good/001.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    ds = load_dataset("mvtec", mvtec_root, "widget")
    with pytest.raises(ValueError, match=r"001\.png.*corrupt or truncated; re-download"):
        ds.train[1]
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = _save(big, mvtec_root / "widget/train/good/002.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])                        # truncated mid-IDAT
    with pytest.raises(ValueError, match=r"002\.png.*truncated"):
        ds.train[2]
    with pytest.raises(ValueError, match="002.png"):
        ds.train.images(8, indices=[0, 2])


def test_mask_of_wrong_size(mvtec_root):
    _save(_mask(h=5, w=8), mvtec_root / "widget/ground_truth/crack/001_mask.png")
    ds = load_dataset("mvtec", mvtec_root, "widget")
    msg = r"001_mask\.png has size 8x5.*crack/001\.png is 8x6.*nearest neighbour"
    with pytest.raises(ValueError, match=msg):
        ds.test[1]
    with pytest.raises(ValueError, match=msg):
        ds.test.masks(4)


def test_missing_mask_is_an_error(mvtec_root):
    (mvtec_root / "widget/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"defective image .*crack/001\.png: expected .*crack/001_mask\.png"):
        load_dataset("mvtec", mvtec_root, "widget")


def test_layout_errors(mvtec_root, tmp_path):
    for p in (mvtec_root / "widget/train/good").iterdir():
        p.unlink()
    (mvtec_root / "widget/train/good/readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images .* in .*widget/train/good; found \['readme"):
        load_dataset("mvtec", mvtec_root, "widget")
    for p in (mvtec_root / "widget/train/good").iterdir():
        p.unlink()
    (mvtec_root / "widget/train/good").rmdir()
    (mvtec_root / "widget/train/other").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train/good not found \(found in .*: \['other'\]"):
        load_dataset("mvtec", mvtec_root, "widget")
    with pytest.raises(ValueError, match=r"Unknown category 'widgit'.*Available: gadget, widget"):
        load_dataset("mvtec", mvtec_root, "widgit")
    with pytest.raises(ValueError, match=r"Unknown dataset name 'mvtecad'.*mvtec, visa, btad"):
        load_dataset("mvtecad", mvtec_root, "widget")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*download\('mvtec'"):
        load_dataset("mvtec", tmp_path / "nowhere", "widget")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No mvtec categories in .*empty"):
        list_categories("mvtec", tmp_path / "empty")
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "emptyfolder" / "good").mkdir(parents=True)
        load_dataset("folder", tmp_path / "emptyfolder")


# --- image modes ---------------------------------------------------------------------------------
def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    x = read_image(path)
    assert x.shape == (3, 1, 4)
    assert torch.allclose(x[0, 0], torch.tensor([0, 1000 / 65535, 32768 / 65535, 1.0]), atol=1e-7)
    assert torch.equal(x[0], x[2])
    i32 = pil_to_tensor(Image.fromarray(arr.astype(np.int32), "I"))
    assert torch.allclose(i32[1, 0, 1], torch.tensor(1000 / 65535))


def test_palette_rgba_la_grey_cmyk(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    x = read_image(tmp_path / "p.png")
    assert x[:, 0, 0].tolist() == [1, 0, 0] and x[:, 0, 1].tolist() == [0, 0, 1]

    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png")                                  # alpha dropped
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255)

    Image.fromarray(np.array([[[77, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert torch.allclose(read_image(tmp_path / "la.png")[:, 0, 0], torch.full((3,), 77 / 255))
    Image.fromarray(np.array([[0, 128]], np.uint8), "L").save(tmp_path / "l.png")
    x = read_image(tmp_path / "l.png")
    assert x.shape == (3, 1, 2) and torch.allclose(x[:, 0, 1], torch.full((3,), 128 / 255))

    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    cmyk.save(tmp_path / "c.tif")
    x = read_image(tmp_path / "c.tif")
    assert x[:, 0, 0].tolist() == [1, 1, 1] and x[:, 0, 1].tolist() == [0, 1, 1]


def test_mask_modes_binarise_above_zero(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0, 0] = 255                                                   # red defect
    rgb[1, 1, 2] = 1
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[True, False], [False, True]]
    Image.fromarray(np.array([[0, 1], [127, 255]], np.uint8)).save(tmp_path / "g.png")
    assert read_mask(tmp_path / "g.png").tolist() == [[False, True], [True, True]]


# --- laziness, few-shot --------------------------------------------------------------------------
def test_load_dataset_reads_no_pixels(mvtec_root, monkeypatch):
    calls = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: calls.append(a) or real_open(*a, **k))
    ds = load_dataset("mvtec", mvtec_root, "widget")
    load_dataset("demo", category="brick")
    assert calls == []
    ds.test[0]
    assert len(calls) == 2                                               # image + mask, on demand


def test_few_shot_fixed_draws_are_nested_and_shipped():
    ds = load_dataset("demo", category="grass")
    d1, d2, d4 = few_shot(ds, 1), few_shot(ds, 2), few_shot(ds.train, 4)
    assert d2[:1] == d1 and d4[:2] == d2 and len(set(d4)) == 4
    shipped = json.loads((FEWSHOT_DIR / "demo.json").read_text())["categories"]["grass"]
    assert shipped["4"] == d4 and shipped["train_count"] == len(ds.train)
    assert d4 == fixed_draw("demo", "grass", 8, 4)
    assert few_shot(ds, 3) == fixed_draw("demo", "grass", 8, 3)


def test_shipped_lists_match_the_documented_procedure():
    for name, counts in TRAIN_COUNTS.items():
        shipped = json.loads((FEWSHOT_DIR / f"{name}.json").read_text())
        assert shipped == fixed_table(name, counts)
    assert len(TRAIN_COUNTS["mvtec"]) == 15 and len(TRAIN_COUNTS["visa"]) == 12
    assert sum(TRAIN_COUNTS["visa"].values()) == 8659
    assert sorted(TRAIN_COUNTS["btad"]) == ["01", "02", "03"] and len(TRAIN_COUNTS["mpdd"]) == 6
    bottle = json.loads((FEWSHOT_DIR / "mvtec.json").read_text())["categories"]["bottle"]
    assert bottle["train_count"] == 209 and all(0 <= i < 209 for i in bottle["4"])


def test_few_shot_seeded_and_errors(mvtec_root, tmp_path):
    ds = load_dataset("mvtec", mvtec_root, "widget")
    assert few_shot(ds, 2, seed=1) == few_shot(ds, 2, seed=1)
    assert few_shot(ds, 2, seed=1) == few_shot(ds, 3, seed=1)[:2]
    draws = {tuple(few_shot(ds, 3, seed=s)) for s in range(10)}
    assert len(draws) > 1 and all(sorted(d) == [0, 1, 2] for d in draws)
    with pytest.raises(ValueError, match=r"k=4 shots requested but .*mvtec/widget has only 3"):
        few_shot(ds, 4)
    with pytest.raises(ValueError, match="positive integer"):
        few_shot(ds, 0)
    with pytest.raises(ValueError, match="train split"):
        few_shot(ds.test, 1)
    bottle = tmp_path / "m2" / "bottle"
    for i in range(5):
        _save(_rgb(i), bottle / "train/good" / f"{i:03d}.png")
    _save(_rgb(9), bottle / "test/good/000.png")
    with pytest.warns(UserWarning, match="assume 209 train images but this copy has 5"):
        draw = few_shot(load_dataset("mvtec", tmp_path / "m2", "bottle"), 2)
    assert draw == fixed_draw("mvtec", "bottle", 5, 2)


# --- the bundled demo set ------------------------------------------------------------------------
def _build_demo_module():
    spec = importlib.util.spec_from_file_location("build_demo", REPO / "scripts" / "build_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_set_contents():
    start = time.perf_counter()
    cats = list_categories("demo")
    sets = {c: load_dataset("demo", category=c) for c in cats}
    print(f"demo: listed {len(cats)} categories in {time.perf_counter() - start:.4f} s")
    assert cats == ["brick", "coins", "grass", "gravel"]
    types = {}
    for c, ds in sets.items():
        assert len(ds.train) == 8 and ds.test.labels.tolist().count(0) == 6
        assert "scratch" in ds.test.defects
        for d in ds.test.defects:
            types[d] = types.get(d, 0) + 1
    assert {k: v for k, v in types.items() if k != "good"} == {
        "scratch": 8, "stain": 8, "paste": 8, "hole": 8}
    item = sets["coins"].test[-1]
    assert item.image.shape == (3, 128, 128) and item.mask.any() and item.label == 1
    size = sum(p.stat().st_size for p in DEMO_ROOT.rglob("*") if p.is_file())
    assert size <= 4_000_000


def test_demo_masks_mark_exactly_the_changed_pixels():
    pytest.importorskip("skimage")
    builder = _build_demo_module()
    manifest = json.loads((DEMO_ROOT / "manifest.json").read_text())
    n_anomalous = 0
    for entry in manifest["items"]:
        path = DEMO_ROOT / entry["category"] / entry["file"]
        image = (read_image(path) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        clean = builder.clean_crop(entry["source"], entry["box"])          # (128, 128, 3)
        if entry["mask"] is None:
            assert np.array_equal(image, clean), path
            continue
        mask = read_mask(DEMO_ROOT / entry["category"] / entry["mask"]).numpy()
        changed = (image != clean).any(axis=2)
        assert mask.sum() >= 25, path
        assert np.array_equal(changed, mask), path                        # inside: all differ
        n_anomalous += 1
    assert n_anomalous == 32


def test_demo_builder_is_deterministic(tmp_path):
    pytest.importorskip("skimage")
    builder = _build_demo_module()
    builder.build(tmp_path, ("grass",))
    new = sorted(p.relative_to(tmp_path / "grass") for p in (tmp_path / "grass").rglob("*.png"))
    old = sorted(p.relative_to(DEMO_ROOT / "grass") for p in (DEMO_ROOT / "grass").rglob("*.png"))
    assert new == old and len(new) == 8 + 14 + 8

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    for rel in new:
        assert digest(tmp_path / "grass" / rel) == digest(DEMO_ROOT / "grass" / rel), rel
    manifest = json.loads((tmp_path / "manifest.json").read_text())["items"]
    packaged = json.loads((DEMO_ROOT / "manifest.json").read_text())["items"]
    assert manifest == [e for e in packaged if e["category"] == "grass"]


# --- hostile names and paths (issue 11, defect 5) ---------------------------------------------------
def test_split_file_names_and_paths_stay_inside_the_root(visa_root, tmp_path):
    from apt_lab.errors import UnsafeNameError

    csv_path = visa_root / "split_csv" / "1cls.csv"
    good = csv_path.read_text()
    csv_path.write_text(good + "../../../../somewhere,train,normal,candle/Data/Images/Normal/0000.png,\n")
    with pytest.raises(UnsafeNameError, match=r"1cls\.csv line 8: category '\.\./\.\./\.\./\.\./somewhere' is not"):
        list_categories("visa", visa_root)
    _save(_rgb(9), tmp_path / "outside.png")
    (visa_root / "candle" / "link.png").symlink_to(tmp_path / "outside.png")
    for path, why in (("../outside.png", "resolves outside the dataset root"),
                      (str(tmp_path / "outside.png"), "is absolute"),
                      ("candle/link.png", "resolves outside the dataset root")):
        csv_path.write_text(good + f"candle,train,normal,{path},\n")
        with pytest.raises(UnsafeNameError, match=rf"1cls\.csv line 8: path .* {why}"):
            load_dataset("visa", visa_root, "candle")
    csv_path.write_text(good + "candle,test,anomaly,candle/Data/Images/Anomaly/000.png,../outside.png\n")
    with pytest.raises(UnsafeNameError, match="resolves outside"):
        load_dataset("visa", visa_root, "candle")


def test_category_names_are_single_path_components(mvtec_root):
    from apt_lab.errors import UnsafeNameError

    for name in ("../widget", "widget/../gadget", "..", "a\\b", "/etc", ""):
        with pytest.raises(UnsafeNameError):
            load_dataset("mvtec", mvtec_root, name)
    with pytest.raises(UnsafeNameError, match="not a plain name"):
        load_dataset("folder", mvtec_root / "widget" / "train", category="../../x")


# --- huge images (issue 11, defect 6) -------------------------------------------------------------
def test_a_120_megapixel_png_is_refused_before_decoding(tmp_path, monkeypatch):
    from apt_lab.data import images
    from apt_lab.errors import ImageTooLargeError

    big = Image.new("L", (12_000, 10_000), 128)  # 120 MB in memory, ~120 KB as a PNG
    big.putpixel((5, 5), 0)
    path = tmp_path / "good" / "000.png"
    path.parent.mkdir()
    big.save(path, optimize=False)
    del big
    assert path.stat().st_size < 1 << 20
    message = r"000\.png is 12000x10000 = 120\.0 megapixels, above the decoding limit of 100\.0 .*MAX_IMAGE_PIXELS"
    with pytest.raises(ImageTooLargeError, match=message):
        read_image(path)
    with pytest.raises(ImageTooLargeError, match="--max-image-pixels 120000000"):
        read_image(path, 224)
    _save(_rgb(0), tmp_path / "good" / "001.png")
    ds = load_dataset("folder", tmp_path)
    with pytest.raises(ImageTooLargeError):
        ds.train.images(224)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 40)  # the limit is a setting: 8x6 = 48 pixels is now too many
    with pytest.raises(ImageTooLargeError, match="above the decoding limit"):
        ds.test.images(4)
    assert read_image(tmp_path / "good" / "001.png", max_pixels=48).shape == (3, 6, 8)


def _smooth(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w, y / h, 0.5 + 0.4 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    return (rgb * 255).astype(np.uint8)  # (h, w, 3)


def test_large_images_resize_without_a_full_float_copy(tmp_path):
    """A 24-megapixel JPEG and PNG resized to 224: the peak memory of doing so, measured in a fresh process."""
    import subprocess
    import sys

    arr = _smooth(6000, 4000)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(arr).save(tmp_path / "b.png", compress_level=1)
    (tmp_path / "good").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).rename(tmp_path / "good" / name)
    del arr
    script = (
        "import resource, numpy as np, torch\n"
        "from PIL import Image\n"
        "from apt_lab.data import load_dataset\n"
        f"root = {str(tmp_path)!r}\n"
        "Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root + '/warm.png')\n"
        "from apt_lab.data.images import read_image, resize_images\n"
        "resize_images(read_image(root + '/warm.png')[None], 224)\n"  # every library loaded and warm
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "ds = load_dataset('folder', root)\n"
        "x = torch.cat([ds.train.images(224), ds.test.images(224)])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) / 1024, float(x.mean()))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    peak_mb, mean = (float(v) for v in out.stdout.split())
    assert 0.2 < mean < 0.8
    assert peak_mb < 250, f"resizing two 24-megapixel images raised the peak memory by {peak_mb:.0f} MB"


def test_pre_shrunk_resize_matches_the_exact_one(tmp_path):
    big, usual = tmp_path / "big.png", tmp_path / "usual.png"
    Image.fromarray(_smooth(2000, 1800)).save(big)   # ≥ 8x the target: pre-shrunk by 2 in PIL, then bicubic
    Image.fromarray(_smooth(1024, 1024)).save(usual)  # < 8x: read exactly as before
    exact = resize_images(read_image(big)[None], 224)[0]
    fast = read_image(big, 224)
    assert fast.shape == exact.shape == (3, 224, 224)
    assert (fast - exact).abs().max() < 0.01
    assert torch.equal(read_image(usual, 224), resize_images(read_image(usual)[None], 224)[0])
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = pil_to_tensor(Image.fromarray(np.stack([every] * 3, -1)))  # float32 path == the float64 reference
    assert torch.equal(x[0], torch.from_numpy((every / 255.0).astype(np.float32)))
