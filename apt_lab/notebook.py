"""One setup call for every notebook: quick mode (CPU, apt-tiny, demo set) or full mode (GPU, real CLIP).

The same cells run in both modes; ``setup()`` picks the mode, the preset, the device and the data, and
prints what it chose so the reader sees it.

Mode:
    quick — CPU, the ``quick`` preset (apt-tiny with random weights, few tuning steps), the bundled demo set.
        Chosen when no GPU is present, or with ``APT_LAB_QUICK=1`` (what ``make test`` / nbval use).
    full — a real backbone (preset ``fast``: ViT-B-16 / openai; ``APT_LAB_PRESET=paper`` for ViT-L-14-336 at
        518 px), on the GPU when there is one. Chosen when a GPU is present, or with ``APT_LAB_QUICK=0``.
        Data: ``APT_LAB_DATASET=mvtec`` (or visa, btad, mpdd) and ``APT_LAB_DATA=<folder holding mvtec/>``
        when that folder exists, else the demo set. When the pretrained weights cannot be fetched (offline),
        full mode says so loudly and continues with random weights of the same architecture.

Example:
    >>> session = setup(seed=0)                                   # doctest: +SKIP
    >>> backbone = session.backbone(); demo = session.dataset("brick")   # doctest: +SKIP
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import APTConfig

# Quick mode: small enough that every notebook runs in well under a minute on 2 CPU cores.
QUICK_OVERRIDES = {"train__steps": 40, "train__pool_size": 16, "train__batch_size": 8}
QUICK_K = 2  # normal shots per category in quick mode (full mode: config.train.k_shot, 4)
DATASETS_WITH_ROOT = ("mvtec", "visa", "btad", "mpdd")


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def choose_mode(mode: str | None = None) -> str:
    """"quick" or "full": the argument, else ``APT_LAB_QUICK`` (1 → quick, 0 → full), else quick without a GPU."""
    if mode is not None:
        if mode not in ("quick", "full"):
            raise ValueError(f"mode={mode!r}: use 'quick' (CPU, apt-tiny, demo set), 'full' (real backbone) or None")
        return mode
    quick = _flag("APT_LAB_QUICK")
    if quick is not None:
        return "quick" if quick else "full"
    return "full" if torch.cuda.is_available() else "quick"


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
        config: the ``APTConfig`` for this mode (quick: ``quick`` preset with :data:`QUICK_OVERRIDES`).
        k: normal shots per category this mode uses.
        dataset_name, data_root: what :meth:`dataset` loads (root None = the packaged demo set).
    """

    mode: str
    device: torch.device
    config: APTConfig
    seed: int
    preset: str
    k: int
    dataset_name: str = "demo"
    data_root: Path | None = None
    _backbone: object = field(default=None, repr=False)

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    def backbone(self):
        """The frozen backbone of ``config.backbone`` (loaded once, then cached).

        In full mode, when the pretrained weights cannot be fetched, it warns loudly and falls back to the same
        architecture with random weights (``backbone.pretrained_loaded`` is then False).
        """
        if self._backbone is None:
            from .backbone import load_backbone_or_random

            self._backbone = load_backbone_or_random(self.config, device=self.device)
        return self._backbone

    def categories(self) -> list[str]:
        from .data import list_categories

        return list_categories(self.dataset_name, self.data_root)

    def dataset(self, category: str | None = None):
        """One category of this session's dataset (default: the first category)."""
        from .data import load_dataset

        category = category or self.categories()[0]
        return load_dataset(self.dataset_name, root=self.data_root, category=category)


def _benchmark_root(name: str) -> Path | None:
    """``$APT_LAB_DATA/<name>`` when it exists, or ``$APT_LAB_DATA`` itself when it is that dataset's folder."""
    base = os.environ.get("APT_LAB_DATA")
    if not base:
        return None
    base = Path(base).expanduser()
    for candidate in (base / name, base):
        if candidate.is_dir() and any(p.is_dir() for p in candidate.iterdir()):
            if candidate == base and not (any((p / "train").is_dir() for p in base.iterdir()) or name == "visa"):
                continue
            return candidate
    return None


def setup(seed: int = 0, mode: str | None = None, preset: str | None = None, verbose: bool = True,
          **overrides) -> Session:
    """Pick mode, device, preset and data; seed everything; print what was chosen.

    Args:
        seed: seeds Python, numpy and torch, and becomes ``config.train.seed``.
        mode: "quick", "full" or None (``APT_LAB_QUICK``, else quick without a GPU).
        preset: None = "quick" in quick mode, ``APT_LAB_PRESET`` or "fast" in full mode.
        overrides: ``section__field`` changes applied on top (e.g. ``train__steps=100``).
    """
    mode = choose_mode(mode)
    seed_everything(seed)
    if mode == "quick":
        preset = preset or "quick"
        config = APTConfig.preset(preset, **QUICK_OVERRIDES)
        k = QUICK_K
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    else:
        preset = preset or os.environ.get("APT_LAB_PRESET") or "fast"
        config = APTConfig.preset(preset)
        k = config.train.k_shot
    config = config.replace(train__seed=seed, **overrides)
    device = torch.device(config.backbone.device) if config.backbone.device else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset_name, data_root, note = "demo", None, ""
    wanted = (os.environ.get("APT_LAB_DATASET") or "").lower()
    if mode == "full" and wanted:
        if wanted not in DATASETS_WITH_ROOT:
            raise ValueError(f"APT_LAB_DATASET={wanted!r}: use one of {DATASETS_WITH_ROOT} (or unset it for the demo)")
        data_root = _benchmark_root(wanted)
        if data_root is not None:
            dataset_name = wanted
        else:
            note = (f" ({wanted} not found under APT_LAB_DATA={os.environ.get('APT_LAB_DATA')!r}; "
                    "see docs/data.md to download it)")
    session = Session(mode, device, config, seed, preset, k, dataset_name, data_root)
    if verbose:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        weights = config.backbone.pretrained or "random weights"
        print(f"apt_lab setup — mode: {mode} | device: {device} (GPU: {gpu}) | torch {torch.__version__} | seed {seed}")
        print(f"  preset: {preset} → backbone {config.backbone.name} / {weights}, {config.train.steps} tuning steps, "
              f"k = {k} shots")
        print(f"  data: {dataset_name} at {data_root or 'the packaged demo set'}{note}")
    return session


__all__ = ["setup", "Session", "choose_mode", "seed_everything", "QUICK_OVERRIDES", "QUICK_K"]
