"""Few-shot draws: which k normal train images a k-shot run uses.

Fixed draws (``seed=None``) are positions in the **sorted** list of a category's train images
(sorted by path; for VisA, the sorted ``image`` column of the 1cls train rows). They are computed
once by `fixed_draw` and shipped in ``apt_lab/data/fewshot/<dataset>.json``
(regenerate with ``python scripts/make_fewshot_lists.py``)::

    rng = numpy.random.default_rng(FIXED_SEED ^ zlib.crc32(f"{dataset}/{category}".encode()))
    positions = rng.permutation(train_count)[:k]

with ``FIXED_SEED = 250816157`` (the APT arXiv id 2508.16157). Taking a prefix of one permutation
makes the draws nested: the 1-shot image is the first of the 2-shot pair, which are the first two of
the 4-shot set. If your copy of a dataset has a different number of train images than the shipped
list assumes, a warning is issued and the same procedure is applied to the actual count; categories
without a shipped list (your own data) use the procedure directly.
"""
from __future__ import annotations

import json
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

FIXED_SEED = 250816157
FIXED_K = (1, 2, 4)
FEWSHOT_DIR = Path(__file__).resolve().parent / "fewshot"

# Normal train images per category. MVTec AD: the official counts. VisA: the 1cls split (sums to
# 8659). BTAD (400 + 399 + 1000 = 1799) and MPDD: the counts published with the datasets.
TRAIN_COUNTS: dict[str, dict[str, int]] = {
    "mvtec": {"bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264,
              "hazelnut": 391, "leather": 245, "metal_nut": 220, "pill": 267, "screw": 320,
              "tile": 230, "toothbrush": 60, "transistor": 213, "wood": 247, "zipper": 240},
    "visa": {"candle": 900, "capsules": 542, "cashew": 450, "chewinggum": 453, "fryum": 450,
             "macaroni1": 900, "macaroni2": 900, "pcb1": 904, "pcb2": 901, "pcb3": 905,
             "pcb4": 904, "pipe_fryum": 450},
    "btad": {"01": 400, "02": 399, "03": 1000},
    "mpdd": {"bracket_black": 289, "bracket_brown": 185, "bracket_white": 110, "connector": 128,
             "metal_plate": 54, "tubes": 122},
}


def fixed_draw(name: str, category: str, train_count: int, k: int) -> list[int]:
    """The documented fixed draw: first ``k`` of a permutation seeded by dataset and category."""
    rng = np.random.default_rng(FIXED_SEED ^ zlib.crc32(f"{name}/{category}".encode("utf-8")))
    return [int(i) for i in rng.permutation(train_count)[:k]]


def fixed_table(name: str, counts: dict[str, int]) -> dict:
    """The JSON document shipped as ``fewshot/<name>.json`` for the given train counts."""
    return {
        "dataset": name,
        "procedure": "positions in the sorted train list: numpy.random.default_rng(250816157 ^ "
                     "zlib.crc32(f'{dataset}/{category}'.encode())).permutation(train_count)[:k]",
        "categories": {cat: {"train_count": n, **{str(k): fixed_draw(name, cat, n, k)
                                                 for k in FIXED_K if k <= n}}
                       for cat, n in sorted(counts.items())},
    }


@lru_cache(maxsize=None)
def _shipped(name: str) -> dict:
    path = FEWSHOT_DIR / f"{name}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["categories"]


def few_shot(dataset_or_train_split, k: int, seed: int | None = None) -> list[int]:
    """Indices into the train split of the ``k`` normal images a k-shot run uses.

    Args:
        dataset_or_train_split: a `Dataset` (its ``train`` is used) or a train `Split`.
        k: number of shots (the protocol uses 1, 2 and 4).
        seed: ``None`` for the fixed draws shipped with the package (nested: 1 ⊂ 2 ⊂ 4);
            an int for a seeded random draw (also nested across k for the same seed).

    Returns:
        ``k`` distinct indices into the train split.
    """
    split = getattr(dataset_or_train_split, "train", dataset_or_train_split)
    if getattr(split, "kind", "train") != "train":
        raise ValueError(f"few_shot draws from the train split; got the {split.kind!r} split. "
                         f"Pass the Dataset or dataset.train.")
    name, category, n = split.name, split.category, len(split)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}.")
    if k > n:
        raise ValueError(f"k={k} shots requested but the train split of {name}/{category} has only "
                         f"{n} image(s). Use k <= {n} or add normal train images.")
    if seed is not None:
        rng = np.random.default_rng([int(seed), zlib.crc32(f"{name}/{category}".encode("utf-8"))])
        return [int(i) for i in rng.permutation(n)[:k]]
    entry = _shipped(name).get(category)
    if entry is not None and entry["train_count"] != n:
        warnings.warn(f"{name}/{category}: the shipped fixed few-shot draws assume "
                      f"{entry['train_count']} train images but this copy has {n}; drawing with the "
                      f"same documented procedure on {n} images (results are not comparable with "
                      f"runs on the standard copy).", stacklevel=2)
    elif entry is not None and str(k) in entry:
        return list(entry[str(k)])
    return fixed_draw(name, category, n, int(k))
