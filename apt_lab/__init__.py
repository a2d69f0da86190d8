"""apt_lab — APT (adaptive prompt tuning with semantic alignment) for CLIP anomaly detection.

The four verbs: ``perturb`` (CFG), ``tune_prompts`` (learnable prompts guided by SMGS), ``score``.
"""
from .backbone import Backbone, ImageFeatures, load_backbone
from .errors import UnknownBackboneError, WeightsUnavailableError

__version__ = "0.1.0"
__all__ = ["Backbone", "ImageFeatures", "load_backbone", "UnknownBackboneError", "WeightsUnavailableError",
           "__version__"]
