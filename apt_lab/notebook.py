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
    >>> session = setup(seed=0, mode="quick", verbose=False)
    >>> session.config.name, session.k, session.dataset("brick").category
    ('quick', 2, 'brick')
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbone import pick_device
from .config import APTConfig
from .data.readers import dataset_root
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
    """

    mode: str
    device: torch.device
    config: APTConfig
    seed: int
    preset: str
    dataset_name: str = "demo"
    data_root: Path | None = None
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

        In full mode, when the pretrained weights cannot be fetched, it warns loudly and falls back to the same
        architecture with random weights (``backbone.pretrained_loaded`` is then False).
        """
        if self._backbone is None:
            from .backbone import load_backbone_from_config
            from .report import random_weights_banner

            self._backbone = load_backbone_from_config(self.config, device=self.device, fallback_to_random=True)
            banner = random_weights_banner(self._backbone)
            if banner:
                print(banner, file=sys.stderr, flush=True)
        return self._backbone

    def categories(self) -> list[str]:
        from .data import list_categories

        return list_categories(self.dataset_name, self.data_root)

    def dataset(self, category: str | None = None):
        """One category of this session's dataset (default: the first category)."""
        from .data import load_dataset

        category = category or self.categories()[0]
        return load_dataset(self.dataset_name, root=self.data_root, category=category)


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
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    else:
        preset = preset or env_text("APT_LAB_PRESET", "fast")
    config = APTConfig.preset(preset).replace(train__seed=seed, **overrides)
    device = pick_device(config.backbone.device)
    dataset_name, data_root, note = "demo", None, ""
    wanted = (env_text("APT_LAB_DATASET") or "").lower()
    if mode == "full" and wanted:
        if wanted not in DATASETS_WITH_ROOT:
            raise ValueError(f"APT_LAB_DATASET={wanted!r}: use one of {DATASETS_WITH_ROOT} (or unset it for the demo)")
        root = dataset_root(wanted)
        if root.is_dir():
            dataset_name, data_root = wanted, root
        else:
            note = f" ({wanted} not found at {root}; see docs/data.md to download it)"
    session = Session(mode, device, config, seed, preset, dataset_name, data_root)
    if verbose:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        weights = config.backbone.pretrained or "random weights"
        print(f"apt_lab setup — mode: {mode} | device: {device} (GPU: {gpu}) | torch {torch.__version__} | seed {seed}")
        print(f"  preset: {preset} → backbone {config.backbone.name} / {weights}, {config.train.steps} tuning steps, "
              f"k = {config.train.k_shot} shots")
        print(f"  data: {dataset_name} at {data_root or 'the packaged demo set'}{note}")
    return session


__all__ = ["setup", "Session", "choose_mode", "seed_everything"]
