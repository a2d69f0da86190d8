"""thresholds — choose a pixel and an image threshold without looking at the test set.

A deployed detector needs thresholds, and picking them on test labels is cheating. Instead, score normal
images that were never shots (held out) clean and perturbed with CFG, and take

- the **pixel threshold** as a high quantile (default the 99th percentile) of the held-out *normal* map
  values: about 1 % of normal pixels lie above it;
- the **image threshold** as the score that best separates held-out normal from held-out perturbed images
  (highest F1, perturbed = positive).

Example:
    >>> import torch, apt_lab
    >>> from apt_lab.config import APTConfig
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> prompts = torch.nn.functional.normalize(torch.randn(2, b.embed_dim), dim=-1)   # (2, D) any prompt pair
    >>> chosen = choose_thresholds(b, prompts, torch.rand(3, 3, 224, 224), APTConfig.preset("quick"))
    >>> chosen.normal_scores.anomaly_maps.shape, 0.0 <= chosen.pixel <= 1.0 and 0.0 <= chosen.image <= 1.0
    (torch.Size([3, 224, 224]), True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import APTConfig
from .perturbations import perturb
from .scoring import Scores, score


@dataclass
class Thresholds:
    """Thresholds chosen on held-out normal images and their CFG-perturbed copies.

    Attributes:
        pixel: anomaly-map value; a pixel whose map value is ≥ it counts as anomalous.
        image: image score; an image whose score is ≥ it counts as anomalous.
        normal_scores: scores and maps of the held-out normal images (on the CPU).
        perturbed_scores: scores and maps of their perturbed copies (on the CPU).
    """

    pixel: float
    image: float
    normal_scores: Scores
    perturbed_scores: Scores


def _values(x, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Scores as a flat tensor on the CPU (from tensors on any device, lists or numpy arrays)."""
    values = torch.as_tensor(x, dtype=dtype).detach().flatten().cpu()  # (n,); lists are read in dtype
    if values.numel() == 0:
        raise ValueError(f"{name} is empty; a threshold needs at least one score in it")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} holds NaN or infinite scores; check the images and prompts that produced them")
    return values


def f1_at_threshold(threshold: float, negatives, positives) -> float:
    """F1 of the rule "anomalous when score ≥ threshold", positives = anomalous, negatives = normal.

    Args:
        threshold: the decision threshold.
        negatives: scores of normal images (any shape; tensors, lists or arrays).
        positives: scores of anomalous images.

    Returns:
        2·TP / (2·TP + FP + FN); 0.0 when nothing is predicted or there is nothing to find.

    Example:
        >>> f1_at_threshold(0.25, [0.1, 0.2], [0.3, 0.9])    # TP 2, FP 0, FN 0
        1.0
        >>> f1_at_threshold(0.15, [0.1, 0.2], [0.3, 0.9])    # TP 2, FP 1, FN 0: 4 / 5
        0.8
        >>> round(f1_at_threshold(0.5, [0.1, 0.2], [0.3, 0.9]), 4)   # TP 1, FP 0, FN 1: 2 / 3
        0.6667
    """
    negatives, positives = _values(negatives, "negatives"), _values(positives, "positives")
    true_pos = int((positives >= threshold).sum())
    false_pos = int((negatives >= threshold).sum())
    false_neg = len(positives) - true_pos
    return 2 * true_pos / max(1, 2 * true_pos + false_pos + false_neg)


def image_threshold(negatives, positives) -> float:
    """The score with the best F1 separating ``negatives`` (normal) from ``positives`` (anomalous).

    Every observed score is a candidate; on ties the lowest candidate wins.

    Example:
        >>> image_threshold([0.1, 0.5], [0.4, 0.9])   # F1 at 0.1: 4/6, at 0.4: 4/5, at 0.5: 2/4, at 0.9: 2/3
        0.4
    """
    negatives, positives = _values(negatives, "negatives"), _values(positives, "positives")
    candidates = torch.cat([negatives, positives]).unique().tolist()  # sorted ascending
    f1 = [f1_at_threshold(t, negatives, positives) for t in candidates]
    return candidates[f1.index(max(f1))]


def pixel_threshold(normal_maps, quantile: float = 0.99) -> float:
    """The ``quantile`` of all values of ``normal_maps`` (linear interpolation, as ``torch.quantile``).

    Unlike ``torch.quantile`` it takes any number of values (that one refuses more than 2**24, about 330
    maps of 224 × 224).

    Example:
        >>> pixel_threshold(torch.arange(101.0))      # values 0, 1, …, 100: 99 of them lie below 99
        99.0
        >>> pixel_threshold(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), quantile=0.5)   # halfway between 1 and 2
        1.5
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile={quantile} must lie in [0, 1] (0.99 = the 99th percentile)")
    values = _values(normal_maps, "normal_maps", torch.float32)  # (n,) float32: maps can hold 10**8 values
    rank = quantile * (len(values) - 1)
    below = int(rank)
    above = min(below + 1, len(values) - 1)
    low = values.kthvalue(below + 1).values  # kthvalue counts from 1; no sort of every value
    high = values.kthvalue(above + 1).values
    return float(torch.lerp(low, high, torch.tensor(rank - below, dtype=values.dtype)))


def choose_thresholds(backbone, prompts, normal_images: torch.Tensor, config: APTConfig,
                      rng: torch.Generator | None = None, pixel_quantile: float = 0.99) -> Thresholds:
    """Pixel and image thresholds from held-out normal images and their CFG-perturbed copies.

    Args:
        backbone: the frozen backbone the prompts were tuned on.
        prompts: the tuned prompts (or a (2, D) tensor), as for :func:`apt_lab.scoring.score`.
        normal_images: (B, 3, S, S) normal images that were **not** shots, on the backbone's device.
        config: APTConfig; ``perturb`` makes the anomalies, ``score`` scores them.
        rng: draws the perturbations; None → seeded with ``config.train.seed``.
        pixel_quantile: the pixel threshold is this quantile of the normal maps' values.

    Returns:
        :class:`Thresholds` with both thresholds and the held-out scores they came from.
    """
    if len(normal_images) == 0:
        raise ValueError("normal_images is empty: hold out at least one normal training image that is not a "
                         "shot (use fewer shots, or a category with more training images)")
    if rng is None:
        rng = torch.Generator().manual_seed(config.train.seed)
    perturbed = perturb(normal_images, config, rng, backbone=backbone)  # (B, 3, S, S), same device
    normal_scores = score(backbone, prompts, normal_images, config)  # (B,), (B, S, S) on the CPU
    perturbed_scores = score(backbone, prompts, perturbed.images, config)
    return Thresholds(pixel=pixel_threshold(normal_scores.anomaly_maps, pixel_quantile),
                      image=image_threshold(normal_scores.image_scores, perturbed_scores.image_scores),
                      normal_scores=normal_scores, perturbed_scores=perturbed_scores)
