"""The human-prompt baseline: WinCLIP's compositional prompt ensemble, scored exactly like learned prompts.

22 templates × state phrases ("flawless {}", "{} with defect", ...), the category name filled in, each sentence
embedded and normalised, then averaged per class and re-normalised (CLIP's own ensembling). anomalib 2.7's list
repeats "a jpeg corrupted photo of the {}." and lacks "a cropped photo of a {}." and "a jpeg corrupted photo of
a {}."; apt_lab keeps the 22-template list of the WinCLIP paper.

Example:
    >>> normal, anomalous = human_prompt_sentences("bottle")
    >>> len(TEMPLATES), len(normal), len(anomalous)
    (22, 154, 88)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import Backbone

# WinCLIP's compositional prompt ensemble (public prompt text): state words × templates, "{}" = the category.
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def human_prompt_sentences(category: str = "object") -> tuple[list[str], list[str]]:
    """WinCLIP's sentences: (7 normal states × 22 templates, 4 anomalous states × 22 templates).

    Example:
        >>> normal, anomalous = human_prompt_sentences("bottle")
        >>> len(normal), len(anomalous), anomalous[0]
        (154, 88, 'a cropped photo of the damaged bottle.')
    """
    def expand(states):
        return [t.format(s.format(category)) for s in states for t in TEMPLATES]

    return expand(NORMAL_STATES), expand(ANOMALOUS_STATES)


def human_prompt_features(backbone: Backbone, category: str = "object") -> torch.Tensor:
    """The human-prompt baseline: (2, D) [normal, anomalous], each the re-normalised mean of its sentences'
    normalised embeddings. Score it like learned prompts: ``score(backbone, features, images, config)``."""
    normal, anomalous = human_prompt_sentences(category)
    embeddings = backbone.encode_texts(normal + anomalous)  # (154 + 88, D) normalised
    pair = torch.stack([embeddings[:len(normal)].mean(0), embeddings[len(normal):].mean(0)])  # (2, D)
    return F.normalize(pair, dim=-1)
