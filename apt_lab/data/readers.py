"""Dataset readers: MVTec layout (MVTec AD, BTAD, MPDD, the bundled demo), VisA 1cls, a plain folder.

`load_dataset` only *lists* files (and checks that every defective image has its mask); pixels are
read when an item or a batch is requested, so loading is fast even for the full benchmarks.

The ``"folder"`` format is data as you have it (docs/data.md, "The folder format")::

    root/good/*.png                 normal images (train/test alternate unless train/ exists)
    root/train/*.png                optional: normal train images; good/ is then all test
    root/bad/*.png                  anomalous images, defect type "bad"
    root/bad/<defect>/*.png         anomalous images, defect type <defect> (mixing with the line above is fine)
    root/masks/<name>.png           optional mask of bad/<name>.png (or <name>_mask.png)
    root/masks/<defect>/<name>.png  optional mask of bad/<defect>/<name>.png

A root holding ``good/`` or ``train/`` is one category, named after the folder's real name. A root whose
subfolders hold that layout (``root/<category>/good/`` ...) is a dataset of several categories, one per
subfolder. A root that is both is refused (the message says how to split it).
"""
from __future__ import annotations

import csv
import hashlib
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..env import env_text
from ..errors import DatasetCheckError
from .files import check_inside, check_name
from .images import (
    IMAGE_EXTENSIONS,
    image_size,
    is_image_file,
    read_image,
    read_mask,
    resize_masks,
)

if TYPE_CHECKING:  # annotations only: listing a dataset never imports torch
    import torch

DATASET_NAMES = ("mvtec", "visa", "btad", "mpdd", "folder", "demo")
DEMO_ROOT = Path(__file__).resolve().parent / "demo"
# Folder names that hold normal images in the MVTec layout (BTAD calls them "ok").
_NORMAL_DIRS = {"mvtec": ("good",), "mpdd": ("good",), "demo": ("good",), "btad": ("ok", "good")}


@dataclass
class Item:
    """One image of a split.

    Attributes:
        image: float32 ``(3, H, W)`` in [0, 1], RGB.
        mask: bool ``(H, W)``; all False for normal images (and for defective images without mask).
        label: 0 normal, 1 anomalous.
        defect: defect type, ``"good"`` for normal images.
        path: image file path.
        category: category name.
        has_mask: False only for a defective image of the folder format that has no mask file.
    """

    image: torch.Tensor
    mask: torch.Tensor
    label: int
    defect: str
    path: str
    category: str
    has_mask: bool = True


@dataclass(frozen=True)
class _Record:
    path: str
    mask_path: str | None
    label: int
    defect: str


class Split(Sequence):
    """A list of images (train or test) of one category, read lazily.

    Attributes:
        name: dataset name (``"mvtec"``, ``"demo"``, ...).
        category: category name.
        kind: ``"train"`` or ``"test"``.
    """

    def __init__(self, records: list[_Record], *, name: str, category: str, kind: str):
        self._records = list(records)
        self.name, self.category, self.kind = name, category, kind

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        n_bad = sum(r.label for r in self._records)
        return (f"Split({self.name}/{self.category}/{self.kind}: {len(self)} images, "
                f"{len(self) - n_bad} normal, {n_bad} anomalous)")

    def __getitem__(self, i: int) -> Item:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        try:
            i = operator.index(i)                      # int, numpy integer, 0-d integer tensor
        except TypeError:
            raise TypeError(f"Split indices must be integers; got {type(i).__name__}. "
                            f"Use split.images(size, indices) for a batch.") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {self!r}")
        import torch

        rec = self._records[i]
        image = read_image(rec.path)                                  # (3, H, W)
        h, w = image.shape[-2:]
        if rec.mask_path is None:
            mask = torch.zeros(h, w, dtype=torch.bool)                # (H, W)
        else:
            mask = read_mask(rec.mask_path)                           # (H, W)
            _check_mask_size(rec, (w, h), (mask.shape[1], mask.shape[0]))
        has_mask = rec.label == 0 or rec.mask_path is not None
        return Item(image, mask, rec.label, rec.defect, rec.path, self.category, has_mask)

    # --- whole-split views -------------------------------------------------------------------
    @property
    def labels(self) -> torch.Tensor:
        """Image labels, ``torch.long (N,)``: 0 normal, 1 anomalous."""
        import torch

        return torch.tensor([r.label for r in self._records], dtype=torch.long)

    @property
    def defects(self) -> list[str]:
        return [r.defect for r in self._records]

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self._records]

    @property
    def mask_paths(self) -> list[str | None]:
        return [r.mask_path for r in self._records]

    @property
    def has_masks(self) -> bool:
        """True when every anomalous image has a pixel mask (pixel metrics are possible)."""
        return all(r.label == 0 or r.mask_path is not None for r in self._records)

    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(len(self)))
        out = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        bad = [i for i in out if not -len(self) <= i < len(self)]
        if bad:
            raise IndexError(f"indices {bad[:5]} out of range for {self!r}")
        return out

    def images(self, size: int, indices=None) -> torch.Tensor:
        """Whole images resized to ``size`` x ``size`` (bicubic, antialiased, never cropped).

        Returns:
            float32 ``(B, 3, size, size)`` in [0, 1].
        """
        import torch

        idx = self._indices(indices)
        out = torch.empty(len(idx), 3, size, size)                    # (B, 3, size, size)
        for j, i in enumerate(idx):
            out[j] = read_image(self._records[i].path, size)           # (3, size, size)
        return out

    def masks(self, size: int, indices=None) -> torch.Tensor | None:
        """Masks resized to ``size`` x ``size`` with nearest neighbour; image pixels are not read.

        Returns:
            bool ``(B, size, size)``, or ``None`` when some anomalous image has no mask
            (folder format without ``masks/``): pixel metrics are then skipped by
            `apt_lab.metrics.evaluate`.
        """
        if not self.has_masks:
            # once per process: a run asks once per cell
            from ..metrics import warn_pixel_metrics_skipped

            missing = [r.path for r in self._records if r.label == 1 and r.mask_path is None]
            warn_pixel_metrics_skipped(f"{self.name}/{self.category}: pixel metrics skipped — {len(missing)} of "
                                       f"{int(self.labels.sum())} anomalous test images have no mask (e.g. "
                                       f"{missing[0]}); add masks for all of them to get pixel AUROC, AP, F1-max "
                                       "and AUPRO.")
            return None
        import torch

        idx = self._indices(indices)
        out = torch.zeros(len(idx), size, size, dtype=torch.bool)      # (B, size, size)
        for j, i in enumerate(idx):
            rec = self._records[i]
            if rec.mask_path is None:
                continue                                               # normal: all False
            mask = read_mask(rec.mask_path)                            # (H, W)
            _check_mask_size(rec, image_size(rec.path), (mask.shape[1], mask.shape[0]))
            out[j] = resize_masks(mask[None], size)[0]
        return out


_DIGESTS: dict[tuple[str, int, int], bytes] = {}  # (path, size, mtime_ns) → SHA-256 of the bytes, this process


def file_digest(path: str | os.PathLike) -> bytes:
    """SHA-256 of a file's bytes, read once per process while its size and modification time stay the same: the
    run store's fingerprint and the feature cache's key both hash every image, and a sweep asks for both."""
    info = os.stat(path)
    key = (str(path), info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(Path(path).read_bytes()).digest()
    return _DIGESTS[key]


@dataclass
class Dataset:
    """One category of a dataset: ``train`` (normal images only) and ``test`` splits.

    ``root`` is the folder the file paths are relative to (in `fingerprint`): the dataset's root, or for the
    ``"folder"`` format the category's own folder, so that a category reads the same alone or beside others.
    """

    name: str
    root: Path
    category: str
    train: Split
    test: Split

    def check(self, k: int | None = None) -> Dataset:
        """Find, before any tuning, what would make the metrics fail or lie: a test set without both normal and
        anomalous images, a mask whose size differs from its image (headers only; no pixel is decoded), fewer
        train images than ``k`` shots. Raises DatasetCheckError naming the category and the file.

        Example:
            >>> load_dataset("demo", category="brick").check(k=4).category
            'brick'
        """
        where = f"{self.name}/{self.category} at {self.root}"
        labels = [r.label for r in self.test._records]
        if 0 not in labels or 1 not in labels:
            kind = "no test images" if not labels else f"only {'anomalous' if 0 not in labels else 'normal'} test images"
            raise DatasetCheckError(f"{where} has {kind}; image AUROC, AP and F1-max need both normal and anomalous "
                                    "test images. Add the missing kind (test/good/ and test/<defect>/) or leave this "
                                    "category out (--categories).")
        if k is not None and k > len(self.train):
            raise DatasetCheckError(f"{where}: k={k} shots requested but its train split has {len(self.train)} "
                                    f"image(s). Use k <= {len(self.train)} or add normal train images.")
        for rec in self.test._records:
            if rec.mask_path is not None:
                mask_wh = image_size(rec.mask_path)
                try:
                    _check_mask_size(rec, image_size(rec.path), mask_wh)
                except ValueError as err:
                    raise DatasetCheckError(f"{where}: {err}") from None
        return self

    def fingerprint(self) -> str:
        """SHA-256 over every file of the category: path relative to the root, label, and the file's bytes. The
        same files give the same fingerprint wherever they lie (moved, copied, reached through a link); a
        replaced, edited, added or removed file changes it.

        Example:
            >>> a = load_dataset("demo", category="brick")
            >>> a.fingerprint() == load_dataset("demo", root=a.root, category="brick").fingerprint()
            True
        """
        digest = hashlib.sha256()
        for kind, split in (("train", self.train), ("test", self.test)):
            for rec in split._records:
                for path in (rec.path, rec.mask_path):
                    if path is None:
                        digest.update(b"-\n")
                        continue
                    rel = os.path.relpath(path, self.root).replace(os.sep, "/")
                    digest.update(f"{kind}|{rel}|{rec.label}|".encode())
                    digest.update(file_digest(path))
        return digest.hexdigest()

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, category={self.category!r}, root='{self.root}', "
                f"train={len(self.train)}, test={len(self.test)} "
                f"({int(self.test.labels.sum())} anomalous))")


def _check_mask_size(rec: _Record, image_wh: tuple[int, int], mask_wh: tuple[int, int]) -> None:
    if tuple(image_wh) != tuple(mask_wh):
        raise ValueError(
            f"Mask {rec.mask_path} has size {mask_wh[0]}x{mask_wh[1]} (WxH) but its image "
            f"{rec.path} is {image_wh[0]}x{image_wh[1]}. A mask must have exactly its image's size: "
            f"re-download the dataset, or resize the mask with nearest neighbour to "
            f"{image_wh[0]}x{image_wh[1]}.")


# --- listing helpers -----------------------------------------------------------------------------
def dataset_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """The one resolver of where a dataset lives.

    ``root`` when given; the packaged photos for ``"demo"``; else under ``$APT_LAB_DATA`` (default
    ``~/.cache/apt_lab``): ``<APT_LAB_DATA>/<name>``, or ``$APT_LAB_DATA`` itself when it already is that dataset's
    folder (it holds ``<category>/train/``, or VisA's ``split_csv/``).
    """
    if root is not None:
        return Path(root).expanduser()
    if name == "demo":
        return DEMO_ROOT
    base = Path(env_text("APT_LAB_DATA", os.path.join("~", ".cache", "apt_lab"))).expanduser()
    if not (base / name).is_dir() and _is_dataset_folder(name, base):
        return base
    return base / name


def _is_dataset_folder(name: str, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if name == "visa":
        return (folder / "split_csv").is_dir()
    return any((child / "train").is_dir() for child in folder.iterdir() if child.is_dir())


def _check_name(name: str) -> str:
    key = str(name).lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset name {name!r}. Known names: {', '.join(DATASET_NAMES)} "
                         f"(use 'folder' for your own good/ bad/ [masks/] images).")
    return key


def _check_root(name: str, root: Path) -> Path:
    if not root.is_dir():
        hint = (f"download it with `apt-lab download {name} {root}` (Python: apt_lab.data.download({name!r}, "
                f"'{root}'))" if name != "folder"
                else "create <root>/good/ (normal images), <root>/bad/ and optionally <root>/masks/ (or one such "
                     "folder per category: <root>/<category>/good/ ...)")
        raise FileNotFoundError(f"Dataset root {root} does not exist or is not a folder. "
                                f"Pass root= the folder that holds the data, or {hint}.")
    return root


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))


def _nonempty_images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        parent = folder.parent
        found = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        raise FileNotFoundError(f"{what}: folder {folder} not found (found in {parent}: "
                                f"{found or 'nothing'}). Check the dataset layout in docs/data.md.")
    files = _images_in(folder)
    if not files:
        others = sorted(p.name for p in folder.iterdir())[:10]
        exts = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise ValueError(f"{what}: no images ({exts}) in {folder}; "
                         f"found {others or 'nothing'}. Re-download or fill this folder.")
    return files



def _mask_index(folder: Path) -> dict[str, Path]:
    """Map image stem -> mask path for files named ``<stem>_mask.<ext>`` or ``<stem>.<ext>``."""
    index: dict[str, Path] = {}
    if folder.is_dir():
        for p in _images_in(folder):
            stem = p.stem
            if stem.endswith("_mask"):
                index[stem[: -len("_mask")]] = p                       # preferred naming wins
            else:
                index.setdefault(stem, p)
    return index


def _mvtec_categories(name: str, root: Path) -> list[str]:
    cats = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
    if not cats:
        found = sorted(p.name for p in root.iterdir())[:20]
        raise ValueError(f"No {name} categories in {root}: expected <root>/<category>/train/ and "
                         f"test/ folders; found {found or 'nothing'}. Pass the folder that directly "
                         f"contains the category folders, or download with `apt-lab download {name} {root}` "
                         f"(Python: apt_lab.data.download({name!r}, root)).")
    return cats


def _list_mvtec(name: str, root: Path, category: str) -> tuple[list[_Record], list[_Record]]:
    normal = _NORMAL_DIRS[name]
    cat_dir = root / category
    train_dir = next((cat_dir / "train" / n for n in normal if (cat_dir / "train" / n).is_dir()),
                     cat_dir / "train" / normal[0])
    train = [_Record(str(p), None, 0, "good")
             for p in _nonempty_images(train_dir, f"{name}/{category} train")]
    test_dir = cat_dir / "test"
    defect_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    if not defect_dirs:
        raise FileNotFoundError(f"{name}/{category}: no test/<defect>/ folders in {test_dir}. "
                                f"Expected test/good/ and one folder per defect type.")
    test: list[_Record] = []
    for d in defect_dirs:
        files = _images_in(d)
        if d.name in normal:
            test += [_Record(str(p), None, 0, "good") for p in files]
            continue
        gt_dir = cat_dir / "ground_truth" / d.name
        masks = _mask_index(gt_dir)
        for p in files:
            if p.stem not in masks:
                raise FileNotFoundError(
                    f"Missing ground-truth mask for defective image {p}: expected "
                    f"{gt_dir / (p.stem + '_mask.png')} (or {p.stem}.png / another image "
                    f"extension). Re-download the dataset or add the mask.")
            test.append(_Record(str(p), str(masks[p.stem]), 1, d.name))
    return train, test


def _visa_rows(root: Path) -> list[dict[str, str]]:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"VisA split file {csv_path} not found. VisA uses the standard "
                                f"1cls split: run `apt-lab download visa {root}`, or put "
                                f"split_csv/1cls.csv from github.com/amazon-science/spot-diff there.")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{csv_path} must have columns {sorted(needed)}; "
                         f"got {sorted(rows[0]) if rows else 'no rows'}.")
    return rows


def _list_visa(root: Path, category: str) -> tuple[list[_Record], list[_Record]]:
    train: list[_Record] = []
    test: list[_Record] = []
    for n, row in enumerate(_visa_rows(root), start=2):                # line 1 is the header
        if row["object"] != category:
            continue
        label = {"normal": 0, "anomaly": 1}.get(row["label"].strip().lower())
        if label is None:
            raise ValueError(f"split_csv/1cls.csv line {n}: label {row['label']!r} is not "
                             f"'normal' or 'anomaly'.")
        image = check_inside(row["image"], root, f"split_csv/1cls.csv line {n}")
        if not image.is_file():
            raise FileNotFoundError(f"split_csv/1cls.csv line {n}: image {image} not found. "
                                    f"Re-download/extract VisA under {root}.")
        mask = None
        if label == 1:
            where = f"split_csv/1cls.csv line {n}"
            mask = check_inside(row["mask"], root, where) if row["mask"].strip() else None
            if mask is None or not mask.is_file():
                raise FileNotFoundError(
                    f"Missing ground-truth mask for defective image {image} (split_csv line {n}): "
                    f"expected {mask if mask else '<mask column is empty>'}. Re-download VisA.")
        rec = _Record(str(image), None if mask is None else str(mask), label,
                      "anomaly" if label else "good")
        (train if row["split"].strip().lower() == "train" else test).append(rec)
    train.sort(key=lambda r: r.path)
    test.sort(key=lambda r: r.path)
    if not train:
        raise ValueError(f"VisA category {category!r} has no train rows in split_csv/1cls.csv.")
    return train, test


_FOLDER_PARTS = ("good", "bad", "masks", "train")  # the folder format's own folder names, never categories


def _holds_folder_format(folder: Path) -> bool:
    """A folder is one category of the folder format when it holds ``good/`` or ``train/``."""
    return (folder / "good").is_dir() or (folder / "train").is_dir()


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_categories(root: Path) -> dict[str, Path]:
    """Category name -> its folder: ``{real name of root: root}`` when the root is one category, else one entry
    per subfolder that holds the format. A root that is both, or neither, raises an error that names it."""
    found = [p for p in _subfolders(root) if p.name not in _FOLDER_PARTS and _holds_folder_format(p)]
    if _holds_folder_format(root):
        if found:
            names = ", ".join(f"{p.name}/" for p in found)
            raise ValueError(
                f"Folder dataset {root} is ambiguous: it holds good/ or train/ (so it is one category) and also "
                f"category folders {names} (each with good/ or train/). Pass root={found[0]} to use one category, "
                f"or move good/, bad/, masks/, train/ into a folder of their own (e.g. "
                f"{root / Path(os.path.realpath(root)).name}/) so that {root} holds categories only.")
        return {Path(os.path.realpath(root)).name: root}  # the folder's own name, not a link's
    if not found:
        seen = sorted(p.name for p in root.iterdir())[:20]
        raise FileNotFoundError(
            f"Folder dataset {root} holds neither good/ (one category: good/, bad/, optional masks/ and train/) nor "
            f"category folders that each hold good/ or train/ (several categories); found {seen or 'nothing'}. "
            "See the folder format in docs/data.md.")
    return {check_name(p.name): p for p in found}


def _folder_defects(folder: Path) -> list[tuple[str, list[Path], Path]]:
    """(defect type, its images, the folder of its masks): ``bad/*`` is type "bad" with masks in ``masks/``;
    each ``bad/<defect>/`` is type <defect> with masks in ``masks/<defect>/``."""
    bad = folder / "bad"
    if not bad.is_dir():
        return []
    out = [("bad", _images_in(bad), folder / "masks")]
    for sub in _subfolders(bad):
        defect = check_name(sub.name, "defect type")
        if defect == "good":
            raise ValueError(f"{sub}: 'good' names the normal images, not a defect type. Move these images to "
                             f"{folder / 'good'}/ if they are normal, or rename the folder after the defect.")
        nested = _subfolders(sub)
        if nested:
            raise ValueError(f"{nested[0]}: defect folders hold images only (bad/<defect>/<image>); move its images "
                             f"up into {sub}/ or make it a defect folder of its own ({bad / nested[0].name}/).")
        out.append((defect, _images_in(sub), folder / "masks" / defect))
    return out


def _list_folder(folder: Path, category: str) -> tuple[list[_Record], list[_Record]]:
    if not (folder / "good").is_dir() and (folder / "test").is_dir():
        raise FileNotFoundError(f"{folder} holds test/ but no good/: that is the MVTec layout (train/good/, "
                                f"test/<defect>/, ground_truth/); read it as dataset 'mvtec' (--dataset mvtec).")
    good = _nonempty_images(folder / "good", f"folder dataset {folder}")
    if (folder / "train").is_dir():
        train_files, test_good = _nonempty_images(folder / "train", f"folder dataset {folder}"), good
    else:                                     # alternate: even positions train, odd ones test
        if len(good) < 2:
            raise ValueError(f"{folder / 'good'} holds {len(good)} image; the folder format needs at "
                             f"least 2 (half train, half test) or a separate {folder / 'train'}/.")
        train_files, test_good = good[0::2], good[1::2]
    train = [_Record(str(p), None, 0, "good") for p in train_files]
    test = [_Record(str(p), None, 0, "good") for p in test_good]
    for defect, images, mask_dir in _folder_defects(folder):
        masks = _mask_index(mask_dir)                                  # a missing mask: has_mask=False, allowed
        test += [_Record(str(p), str(masks[p.stem]) if p.stem in masks else None, 1, defect) for p in images]
    return train, test


# --- public entry points -------------------------------------------------------------------------
def list_categories(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """Category names available for dataset ``name`` under ``root`` (sorted; for ``"folder"``: the root's real
    name when it is one category, else its subfolders that hold ``good/`` or ``train/``).

    Example:
        >>> list_categories("demo")
        ['brick', 'coins', 'grass', 'gravel']
    """
    name = _check_name(name)
    root = _check_root(name, dataset_root(name, root))
    if name == "visa":
        rows = _visa_rows(root)
        for n, row in enumerate(rows, start=2):
            try:
                check_name(row["object"])
            except ValueError as err:
                raise type(err)(f"{root / 'split_csv' / '1cls.csv'} line {n}: {err}") from None
        return sorted({row["object"] for row in rows})
    if name == "folder":
        return list(_folder_categories(root))
    return _mvtec_categories(name, root)


def load_dataset(name: str, root: str | os.PathLike | None = None,
                 category: str | None = None) -> Dataset:
    """List one category of a dataset (lazily: no pixels are read here).

    Args:
        name: one of ``"mvtec", "visa", "btad", "mpdd", "folder", "demo"``.
        root: dataset folder; default: the packaged demo for ``"demo"``, else
            ``$APT_LAB_DATA/<name>`` (``~/.cache/apt_lab/<name>``).
        category: category name; may be omitted when the dataset has a single category.
            A ``"folder"`` root that is itself one category: it only names the items (default: the
            folder's real name); a folder root of several categories: one of its subfolders.

    Returns:
        A `Dataset` with ``train`` and ``test`` `Split`s.
    """
    name = _check_name(name)
    root = _check_root(name, dataset_root(name, root))
    folders = _folder_categories(root) if name == "folder" else {}
    if list(folders.values()) == [root]:     # a folder root that is itself one category: category= only names it
        category = check_name(category or next(iter(folders)))
        train, test = _list_folder(root, category)
        return Dataset(name, root, category, Split(train, name=name, category=category, kind="train"),
                       Split(test, name=name, category=category, kind="test"))
    cats = list(folders) if name == "folder" else list_categories(name, root)
    if category is None:
        if len(cats) != 1:
            raise ValueError(f"{name} at {root} has {len(cats)} categories; pass category= one of: "
                             f"{', '.join(cats)}.")
        category = cats[0]
    category = check_name(category)
    if category not in cats:
        raise ValueError(f"Unknown category {category!r} for {name} at {root}. Available: "
                         f"{', '.join(cats)}.")
    if name == "folder":                     # a category folder is its own root: the same files, one fingerprint
        root = folders[category]
        train, test = _list_folder(root, category)
    else:
        train, test = _list_visa(root, category) if name == "visa" else _list_mvtec(name, root, category)
    return Dataset(name, root, category, Split(train, name=name, category=category, kind="train"),
                   Split(test, name=name, category=category, kind="test"))
