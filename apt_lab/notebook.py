"""One setup call for every notebook: quick mode (CPU, apt-tiny, demo set) or full mode (GPU, real CLIP).

The same cells run in both modes; ``setup()`` picks the mode, the preset, the device and the data, and
prints what it chose so the reader sees it. Arguments win over environment variables (the variables are for
``make test`` and shells; in Colab, pass arguments).

Mode:
    quick — CPU, the ``quick`` preset (apt-tiny with random weights, few tuning steps), the bundled demo set.
        Chosen by ``mode="quick"``, when no GPU is present, or with ``APT_LAB_QUICK=1`` (what ``make test`` /
        nbval use).
    full — a real backbone (preset ``fast``: ViT-B-16 / openai; ``preset="paper"`` for ViT-L-14-336 at 518 px),
        on the GPU when there is one. Chosen by ``mode="full"``, when a GPU is present, or with
        ``APT_LAB_QUICK=0``. When the pretrained weights cannot be fetched (offline), full mode says so loudly
        and continues with random weights of the same architecture.

Data:
    ``dataset="mvtec"`` (or visa, btad, mpdd) with ``data_root=`` the folder that holds ``mvtec/`` (or the
    ``mvtec`` folder itself). Without arguments: ``APT_LAB_DATASET`` / ``APT_LAB_DATA`` in full mode, else the
    demo set. In Colab, :func:`mount_drive` gives a Google Drive folder to pass as ``data_root``, and
    :func:`upload_files` puts your own images into a folder.

Exercises:
    Each exercise's solution is a hidden cell (source and output collapsed) whose body runs only
    ``if session.solutions:``, so *Run All* does not print the answers. ``setup(solutions=True)`` runs them with the
    notebook (or set ``session.solutions = True`` and run one solution cell). Left at None: True when
    ``APT_LAB_SOLUTIONS=1``, or when pytest runs the notebook (nbval's kernel inherits ``PYTEST_CURRENT_TEST``), so
    the tests execute every solution; False otherwise.

Example:
    >>> session = setup(seed=0, mode="quick", verbose=False, solutions=False)
    >>> session.config.name, session.k, session.dataset("brick").category, session.solutions
    ('quick', 2, 'brick', False)
"""
from __future__ import annotations

import os
import random
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbone import pick_device
from .config import APTConfig
from .data.readers import _is_dataset_folder, dataset_root
from .env import env_flag, env_text

DATASETS_WITH_ROOT = ("mvtec", "visa", "btad", "mpdd")


def choose_mode(mode: str | None = None) -> str:
    """"quick" or "full": the argument, else ``APT_LAB_QUICK`` (1 → quick, 0 → full), else quick without a GPU."""
    if mode is not None:
        if mode not in ("quick", "full"):
            raise ValueError(f"mode={mode!r}: use 'quick' (CPU, apt-tiny, demo set), 'full' (real backbone) or None")
        return mode
    quick = env_flag("APT_LAB_QUICK")
    if quick is not None:
        return "quick" if quick else "full"
    return "full" if torch.cuda.is_available() else "quick"


def choose_solutions(solutions: bool | None = None) -> bool:
    """Whether the exercises' solution cells run: the argument, else ``APT_LAB_SOLUTIONS``, else whether pytest
    (nbval) runs this kernel — its kernels inherit ``PYTEST_CURRENT_TEST`` — so the tests execute every solution
    while a reader's *Run All* prints no answers."""
    if solutions is not None:
        return bool(solutions)
    flag = env_flag("APT_LAB_SOLUTIONS")
    if flag is not None:
        return flag
    return env_text("PYTEST_CURRENT_TEST") is not None


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Session:
    """What a notebook works with; built by :func:`setup`.

    Attributes:
        mode: "quick" or "full".
        device: where the backbone runs (CUDA when available, never hard-coded).
        config: the ``APTConfig`` for this mode (quick: the ``quick`` preset, ``apt_lab/presets/quick.json``).
        dataset_name, data_root: what :meth:`dataset` loads (root None = the packaged demo set).
        solutions: whether the exercises' solution cells run (``if session.solutions:``); see
            :func:`choose_solutions`. Set it to True to run one solution cell by hand.
    """

    mode: str
    device: torch.device
    config: APTConfig
    seed: int
    preset: str
    dataset_name: str = "demo"
    data_root: Path | None = None
    solutions: bool = False
    _backbone: object = field(default=None, repr=False)

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    @property
    def k(self) -> int:
        """Normal shots per category: ``config.train.k_shot``."""
        return self.config.train.k_shot

    def backbone(self):
        """The frozen backbone of ``config.backbone`` (loaded once, then cached).

        In full mode, when the pretrained weights cannot be fetched, it warns loudly (once per backbone) and falls
        back to the same architecture with random weights (``backbone.pretrained_loaded`` is then False).
        """
        if self._backbone is None:
            from .backbone import load_backbone_from_config

            self._backbone = load_backbone_from_config(self.config, device=self.device, fallback_to_random=True)
        return self._backbone

    def categories(self) -> list[str]:
        from .data import list_categories

        return list_categories(self.dataset_name, self.data_root)

    def dataset(self, category: str | None = None):
        """One category of this session's dataset (default: the first category)."""
        from .data import load_dataset

        category = category or self.categories()[0]
        return load_dataset(self.dataset_name, root=self.data_root, category=category)


def setup(seed: int = 0, mode: str | None = None, preset: str | None = None, dataset: str | None = None,
          data_root: str | os.PathLike | None = None, verbose: bool = True, solutions: bool | None = None,
          **overrides) -> Session:
    """Pick mode, device, preset and data; seed everything; print what was chosen.

    Args:
        seed: seeds Python, numpy and torch, and becomes ``config.train.seed``.
        mode: "quick", "full" or None (``APT_LAB_QUICK``, else quick without a GPU).
        preset: None = "quick" in quick mode, ``APT_LAB_PRESET`` or "fast" in full mode.
        dataset: "demo", "mvtec", "visa", "btad" or "mpdd"; None = ``APT_LAB_DATASET`` in full mode, else "demo".
            Given here, it is used in either mode, and a missing folder is an error (not a quiet fallback).
        data_root: the folder holding the dataset's folder (``<data_root>/mvtec/``) or that folder itself;
            None = ``APT_LAB_DATA`` (default ``~/.cache/apt_lab``).
        solutions: True runs the exercises' solution cells with the notebook; None = ``APT_LAB_SOLUTIONS``, else
            only under pytest (:func:`choose_solutions`).
        overrides: ``section__field`` changes applied on top (e.g. ``train__steps=100``).

    Raises:
        FileNotFoundError: ``dataset`` was given and its folder does not exist; the message says where it looked.
    """
    mode = choose_mode(mode)
    seed_everything(seed)
    if mode == "quick":
        preset = preset or "quick"
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    else:
        preset = preset or env_text("APT_LAB_PRESET", "fast")
    config = APTConfig.preset(preset).replace(train__seed=seed, **overrides)
    device = pick_device(config.backbone.device)
    dataset_name, root, note = choose_data(mode, dataset, data_root)
    session = Session(mode, device, config, seed, preset, dataset_name, root, choose_solutions(solutions))
    if verbose:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        weights = config.backbone.pretrained or "random weights"
        print(f"apt_lab setup — mode: {mode} | device: {device} (GPU: {gpu}) | torch {torch.__version__} | seed {seed}")
        print(f"  preset: {preset} → backbone {config.backbone.name} / {weights}, {config.train.steps} tuning steps, "
              f"k = {config.train.k_shot} shots")
        print(f"  data: {dataset_name} at {root or 'the packaged demo set'}{note}")
        if session.solutions:
            print("  exercise solutions: run with the notebook")
    return session


def choose_data(mode: str, dataset: str | None = None, data_root: str | os.PathLike | None = None
                ) -> tuple[str, Path | None, str]:
    """(dataset name, its folder or None for the demo set, a note for the reader) — see :func:`setup`.

    Example:
        >>> choose_data("quick")
        ('demo', None, '')
    """
    explicit = dataset is not None
    wanted = (dataset if explicit else env_text("APT_LAB_DATASET") if mode == "full" else None) or "demo"
    wanted = wanted.lower()
    if wanted == "demo":
        return "demo", None, ""
    if wanted not in DATASETS_WITH_ROOT:
        where = "dataset=" if explicit else "APT_LAB_DATASET="
        raise ValueError(f"{where}{wanted!r}: use 'demo' or one of {DATASETS_WITH_ROOT} (your own good/ bad/ "
                         "folders: apt_lab.data.load_dataset('folder', root), see notebook 07)")
    if data_root is not None:
        base = Path(data_root).expanduser()  # the folder holding mvtec/, or the mvtec folder itself
        root = base if not (base / wanted).is_dir() and _is_dataset_folder(wanted, base) else base / wanted
    else:
        root = dataset_root(wanted)
    if root.is_dir():
        return wanted, root, ""
    if explicit:
        raise FileNotFoundError(f"dataset={wanted!r}: no folder at {root}. Pass data_root= the folder that holds "
                                f"{wanted}/ (in Colab e.g. mount_drive() / 'datasets'), or download it first: "
                                f"`apt-lab download {wanted} <folder>` (docs/data.md says how)")
    return "demo", None, f" ({wanted} not found at {root}; see docs/data.md to download it)"


# ------------------------------------------------------------------------------------------------- Colab
def mount_drive(subfolder: str = "") -> Path:
    """Colab only: mount Google Drive (Colab asks for permission) and return ``MyDrive/<subfolder>``.

    Put MVTec AD once on your Drive (e.g. ``MyDrive/datasets/mvtec``), then in every session:
    ``setup(dataset="mvtec", data_root=mount_drive("datasets"))``.

    Raises:
        RuntimeError: outside Colab (there, pass a local folder as ``data_root``).
    """
    colab = _colab("mount_drive()")
    colab.drive.mount(str(DRIVE_MOUNT))
    return DRIVE_MOUNT / "MyDrive" / subfolder


def upload_files(target: str | os.PathLike) -> list[Path]:
    """Colab only: a file picker for images (or a .zip of folders); files are saved into ``target``.

    A ``.zip`` is extracted safely into ``target`` (``apt_lab.data.download.extract_archive``), so uploading
    ``my_parts.zip`` holding ``good/`` and ``bad/`` gives ``target/good`` and ``target/bad``.

    Returns:
        the paths written (extracted top-level entries for a zip).

    Raises:
        RuntimeError: outside Colab (there, copy the files into ``target`` yourself).
    """
    from .data.download import extract_archive

    colab = _colab("upload_files()")
    target = Path(target).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in colab.files.upload().items():
        path = target / Path(name).name  # no folders from the browser's name
        path.write_bytes(content)
        if path.suffix.lower() == ".zip":
            written += extract_archive(path, target)
            path.unlink()
        else:
            written.append(path)
    return written


DRIVE_MOUNT = Path("/content/drive")  # where Colab mounts Google Drive


def _colab(what: str):
    """The ``google.colab`` module (with ``drive`` and ``files``), or a RuntimeError saying what to do instead."""
    from .widgets import in_colab

    if not in_colab():
        raise RuntimeError(f"{what} works only in Google Colab; here, pass a local folder instead")
    import importlib

    return types.SimpleNamespace(drive=importlib.import_module("google.colab.drive"),
                                 files=importlib.import_module("google.colab.files"))


__all__ = ["setup", "Session", "choose_mode", "choose_data", "choose_solutions", "seed_everything", "mount_drive", "upload_files"]
