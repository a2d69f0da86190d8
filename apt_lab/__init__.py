"""apt_lab — APT (adaptive prompt tuning with semantic alignment) for CLIP anomaly detection.

The four verbs, one module each:

- ``perturb`` (``apt_lab.perturbations``, regions of interest in ``apt_lab.roi``): CFG, noise anomalies on the object;
- ``tune_prompts`` (``apt_lab.prompts``, ``apt_lab.losses``, ``apt_lab.tuning``): learnable prompts from a few normal shots;
- SMGS alignment (``apt_lab.smgs``): the meta-prompt that keeps the prompts general;
- ``score`` (``apt_lab.scoring``; the human-prompt baseline in ``apt_lab.baselines``): image scores and anomaly maps.

Names are re-exported lazily: ``import apt_lab`` is instant, and ``import apt_lab.metrics`` or ``apt_lab.data``
never loads torch or open_clip; ``apt_lab.load_backbone`` imports the model code on first use.

Example:
    >>> import apt_lab
    >>> backbone = apt_lab.load_backbone("apt-tiny")
    >>> config = apt_lab.APTConfig.preset("quick")
    >>> backbone.name, config.backbone.name
    ('apt-tiny', 'apt-tiny')
"""
from __future__ import annotations

import importlib
import importlib.util

from ._version import __version__  # noqa: F401  (listed in __all__)

# public name → the module that defines it (one place each; the layer test checks the modules' imports)
_EXPORTS = {
    "APTConfig": "config", "list_presets": "config",
    "UnknownBackboneError": "errors", "WeightsUnavailableError": "errors", "StopTraining": "errors",
    "TrainingDivergedError": "errors", "ManualDownloadRequired": "errors",
    "Backbone": "backbone", "ImageFeatures": "backbone", "load_backbone": "backbone",
    "list_perturbations": "perturbations", "perturb": "perturbations", "register_perturbation": "perturbations",
    "region_of_interest": "roi",
    "PromptLearner": "prompts", "nearest_words": "prompts",
    "MetaPrompt": "smgs", "guide_gradient": "smgs",
    "TuneResult": "tuning", "tune_prompts": "tuning",
    "build_memory": "scoring", "score": "scoring",
    "human_prompt_features": "baselines",
    "load_prompts": "checkpoint", "save_prompts": "checkpoint",
}
_SUBMODULES = ("data", "metrics")  # listed in __all__; every other submodule also loads on first access

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # any submodule: apt_lab.scoring, apt_lab.roi, ...
    else:
        raise AttributeError(f"module 'apt_lab' has no attribute {name!r}")
    globals()[name] = value  # cached: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
