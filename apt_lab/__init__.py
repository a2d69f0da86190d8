"""apt_lab — APT (adaptive prompt tuning with semantic alignment) for CLIP anomaly detection.

The four verbs, one module each:

- ``perturb`` (``apt_lab.perturbations``): CFG, noise anomalies on the region of interest;
- ``tune_prompts`` (``apt_lab.prompts``, ``apt_lab.tuning``): learnable prompts from a few normal shots;
- SMGS alignment (``apt_lab.smgs``): the meta-prompt that keeps the prompts general;
- ``score`` (``apt_lab.scoring``): image scores and anomaly maps.

Example:
    >>> import apt_lab
    >>> backbone = apt_lab.load_backbone("apt-tiny")
    >>> config = apt_lab.APTConfig.preset("quick")
"""
__version__ = "0.1.0"

from . import data, metrics
from .backbone import Backbone, ImageFeatures, load_backbone
from .checkpoint import load_prompts, save_prompts
from .smgs import MetaPrompt, guide_gradient
from .config import APTConfig, list_presets
from .errors import UnknownBackboneError, WeightsUnavailableError
from .perturbations import list_perturbations, perturb, region_of_interest, register_perturbation
from .prompts import PromptLearner, nearest_words
from .scoring import build_memory, human_prompt_features, score
from .tuning import StopTraining, TuneResult, tune_prompts

__all__ = [
    "APTConfig", "Backbone", "ImageFeatures", "MetaPrompt", "PromptLearner", "StopTraining", "TuneResult",
    "UnknownBackboneError", "WeightsUnavailableError", "build_memory", "data", "guide_gradient",
    "human_prompt_features", "list_perturbations", "list_presets", "load_backbone", "load_prompts", "metrics",
    "nearest_words", "perturb", "region_of_interest", "register_perturbation", "save_prompts", "score",
    "tune_prompts", "__version__",
]
