"""Build the bundled demo set apt_lab/data/demo/ from scikit-image's real photographs.

Usage: python scripts/build_demo.py [--category NAME ...] [--out DIR]

Four categories in the MVTec layout, 128 x 128 PNG crops:
  brick, grass, gravel  textures (512 x 512 grey photographs): train crops tile the top half of the
                        photo, test crops are drawn from the bottom half (disjoint from train);
  coins                 an object category: one coin centred per image (64 x 64 box around a coin of
                        skimage.data.coins(), upscaled 2x, bicubic); every image shows a different coin.
Per category: 8 train/good, 6 test/good, and 8 anomalies: 2 x scratch, stain, paste, hole. These are
deliberately unlike the noise blobs apt_lab.perturb trains on:
  scratch  thin 1-2 px polyline, bright or dark;       stain  soft colour blotch (alpha blend);
  paste    polygon cut from another texture;           hole   dark ellipse with soft shading.
Every mask pixel differs from the clean crop (by >= 12 grey levels in some channel) and every pixel
outside the mask is unchanged; manifest.json records each crop box so tests can re-derive the clean
crop. Fixed seeds and PIL's deterministic PNG writer make rebuilds byte-identical.
"""
from __future__ import annotations

import argparse
import json
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
DEMO_DIR = Path(__file__).resolve().parents[1] / "apt_lab" / "data" / "demo"
CATEGORIES = ("brick", "grass", "gravel", "coins")
DEFECTS = ("scratch", "scratch", "stain", "stain", "paste", "paste", "hole", "hole")
N_TRAIN, N_TEST_GOOD = 8, 6
DONOR = {"brick": "gravel", "grass": "brick", "gravel": "grass", "coins": "gravel"}
STAIN_COLOURS = ((150, 90, 30), (180, 40, 40), (60, 90, 170), (200, 180, 40))
MIN_DELTA = 12
# Centres (row, col) of 22 single coins in skimage.data.coins() (from an Otsu segmentation).
COIN_CENTRES = ((43, 334), (50, 154), (51, 215), (52, 275), (119, 270), (124, 44), (123, 205),
                (124, 336), (125, 102), (127, 153), (186, 347), (193, 212), (193, 273), (195, 101),
                (197, 43), (197, 154), (259, 45), (261, 172), (263, 300), (263, 244), (265, 113),
                (267, 358))


@lru_cache(maxsize=None)
def source_image(name: str) -> np.ndarray:
    """The scikit-image photograph ``name`` as uint8 RGB ``(H, W, 3)`` (cached, read-only)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3].copy()
    img.flags.writeable = False
    return img


def clean_crop(source: str, box: list[int]) -> np.ndarray:
    """Crop ``box = [y0, x0, h, w]`` of photo ``source``, resized to SIZE x SIZE: uint8 (S, S, 3)."""
    y0, x0, h, w = box
    crop = source_image(source)[y0:y0 + h, x0:x0 + w].copy()          # (h, w, 3)
    if (h, w) != (SIZE, SIZE):
        crop = np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.BICUBIC))
    return crop


def _seed(category: str, index: int) -> int:
    return (zlib.crc32(category.encode()) ^ 2508) * 100 + index


def plan(category: str) -> list[dict]:
    """Every file of one category: path, crop box, defect type and seed (the manifest entries)."""
    rng = np.random.default_rng(_seed(category, 99))
    n_test = N_TEST_GOOD + len(DEFECTS)
    if category == "coins":
        order = rng.permutation(len(COIN_CENTRES))
        boxes = []
        for i in order:
            cy, cx = COIN_CENTRES[i]
            y0, x0 = int(np.clip(cy - 32, 0, 303 - 64)), int(np.clip(cx - 32, 0, 384 - 64))
            boxes.append([y0, x0, 64, 64])
        train_boxes, test_boxes = boxes[:N_TRAIN], boxes[N_TRAIN:N_TRAIN + n_test]
    else:
        train_boxes = [[r * SIZE, c * SIZE, SIZE, SIZE] for r in range(2) for c in range(4)]
        test_boxes = [[int(256 + rng.integers(0, 129)), int(rng.integers(0, 385)), SIZE, SIZE]
                      for _ in range(n_test)]
    items = [{"file": f"train/good/{i:03d}.png", "mask": None, "defect": "good", "box": b}
             for i, b in enumerate(train_boxes)]
    items += [{"file": f"test/good/{i:03d}.png", "mask": None, "defect": "good", "box": b}
              for i, b in enumerate(test_boxes[:N_TEST_GOOD])]
    count: dict[str, int] = {}
    for defect, b in zip(DEFECTS, test_boxes[N_TEST_GOOD:]):
        j = count[defect] = count.get(defect, -1) + 1
        items.append({"file": f"test/{defect}/{j:03d}.png",
                      "mask": f"ground_truth/{defect}/{j:03d}_mask.png", "defect": defect, "box": b})
    for n, item in enumerate(items):
        item.update(category=category, source=category, seed=_seed(category, n))
    return items


# --- anomaly generators: (clean float (S, S, 3), rng, category) -> (out float, region bool) ------
def _centre(rng, category: str, margin: int) -> np.ndarray:
    spread = 22 if category == "coins" else SIZE // 2 - margin               # objects: on the coin
    return SIZE / 2 + rng.uniform(-spread, spread, size=2)


def _scratch(clean, rng, category):
    canvas = Image.new("L", (SIZE, SIZE))
    p = _centre(rng, category, 24)
    points, angle = [tuple(p)], rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(3, 5))):
        angle += rng.uniform(-0.4, 0.4)
        p = p + rng.uniform(10, 18) * np.array([np.cos(angle), np.sin(angle)])
        points.append(tuple(p))
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(rng.integers(1, 3)))
    region = np.asarray(canvas) > 0                                          # (S, S)
    colour = rng.uniform(225, 255) if clean[region].mean() < 128 else rng.uniform(5, 35)
    return clean * 0.1 + colour * 0.9, region


def _stain(clean, rng, category):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)                          # (S, S)
    field = np.zeros((SIZE, SIZE))
    c0 = _centre(rng, category, 28)
    for _ in range(3):
        cy, cx = c0 + rng.uniform(-8, 8, size=2)
        sy, sx = rng.uniform(4, 10, size=2)
        field += np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    alpha = np.clip(field, 0, 1) * rng.uniform(0.6, 0.85)                  # (S, S) soft edge
    region = alpha > 0.15
    colour = np.array(STAIN_COLOURS[int(rng.integers(len(STAIN_COLOURS)))], dtype=float)
    a = (alpha * region)[..., None]                                          # (S, S, 1)
    return clean * (1 - a) + colour * a, region


def _paste(clean, rng, category):
    donor = source_image(DONOR[category]).astype(float)
    y0, x0 = rng.integers(0, donor.shape[0] - SIZE), rng.integers(0, donor.shape[1] - SIZE)
    patch = donor[y0:y0 + SIZE, x0:x0 + SIZE]                                # (S, S, 3)
    c = _centre(rng, category, 30)
    n = int(rng.integers(6, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(9, 20, n)
    poly = [(c[0] + r * np.cos(t), c[1] + r * np.sin(t)) for r, t in zip(radii, angles)]
    canvas = Image.new("L", (SIZE, SIZE))
    ImageDraw.Draw(canvas).polygon(poly, fill=255)
    return patch, np.asarray(canvas) > 0


def _hole(clean, rng, category):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    cx, cy = _centre(rng, category, 20)
    ry, rx = rng.uniform(6, 13, size=2)
    t = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / rx
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / ry
    r = np.sqrt(u ** 2 + v ** 2)                                              # (S, S), 1 on the rim
    region = r < 1
    light = np.clip(0.5 + 0.5 * (u * 0.6 - v * 0.8) / np.maximum(r, 1e-6), 0, 1)
    shade = 12 + 55 * r * light                                               # darker at the centre
    rim = np.clip((1 - r) / 0.25, 0, 1)[..., None]                            # soft edge
    dark = shade[..., None] + 0.1 * clean
    return clean * (1 - rim) + dark * rim, region


GENERATORS = {"scratch": _scratch, "stain": _stain, "paste": _paste, "hole": _hole}


def _finish(clean: np.ndarray, out: np.ndarray, region: np.ndarray) -> np.ndarray:
    """uint8 result equal to ``clean`` outside ``region`` and >= MIN_DELTA away inside it."""
    res = np.where(region[..., None], np.clip(np.round(out), 0, 255), clean).astype(np.int16)
    weak = region & (np.abs(res - clean).max(axis=2) < MIN_DELTA)            # (S, S)
    push = np.where(clean.mean(axis=2, keepdims=True) < 128, MIN_DELTA, -MIN_DELTA)
    res = np.where(weak[..., None], clean + push, res)
    return np.clip(res, 0, 255).astype(np.uint8)


def build_item(spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean uint8 (S,S,3), anomalous/normal uint8 (S,S,3), mask bool (S,S)) for a plan entry."""
    clean = clean_crop(spec["source"], spec["box"])
    if spec["defect"] == "good":
        return clean, clean.copy(), np.zeros((SIZE, SIZE), dtype=bool)
    rng = np.random.default_rng(spec["seed"])
    for _ in range(20):                                   # redraw tiny regions (deterministic)
        out, region = GENERATORS[spec["defect"]](clean.astype(float), rng, spec["category"])
        if region.sum() >= 25:
            break
    return clean, _finish(clean.astype(np.int16), out, region), region


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = arr.ndim == 3 and (arr == arr[..., :1]).all()
    Image.fromarray(arr[..., 0] if grey else arr).save(path, format="PNG", optimize=True)


def build(out: Path = DEMO_DIR, categories=CATEGORIES) -> None:
    """Write the demo categories under ``out`` and merge their entries into ``out/manifest.json``."""
    out = Path(out)
    manifest_path = out / "manifest.json"
    entries = json.loads(manifest_path.read_text())["items"] if manifest_path.is_file() else []
    entries = [e for e in entries if e["category"] not in categories]
    for category in categories:
        for spec in plan(category):
            _, image, mask = build_item(spec)
            _save_png(image, out / category / spec["file"])
            if spec["mask"]:
                _save_png((mask * 255).astype(np.uint8), out / category / spec["mask"])
            entries.append(spec)
    entries.sort(key=lambda e: (e["category"], e["file"]))
    doc = {"description": "apt_lab demo set; crops of scikit-image photographs (see "
                          "scripts/build_demo.py). box = [y0, x0, h, w] in the source photo; "
                          f"crops are resized to {SIZE}x{SIZE}.", "size": SIZE, "items": entries}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", nargs="*", choices=CATEGORIES, default=list(CATEGORIES))
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    args = parser.parse_args(argv)
    build(args.out, tuple(args.category))
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {', '.join(args.category)} to {args.out} ({size / 1e6:.2f} MB in total)")


if __name__ == "__main__":
    main()
