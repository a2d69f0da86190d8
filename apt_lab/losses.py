"""The task loss of prompt tuning: image cross-entropy + patch focal + patch Dice, on synthetic anomalies.

    task = w_image · CE(cls logits, image label) + w_focal · focal(patch logits, patch mask) + w_dice · Dice

The SMGS meta loss (KL to the meta-prompt's predictions) lives in :mod:`apt_lab.smgs`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TrainConfig

def image_loss(cls_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean cross-entropy of (B, 2) logits against (B,) labels {0 normal, 1 anomalous}.

    Entries with weight 0 are skipped (feature-space anomalies: their CLS token is the clean one, so calling
    it anomalous would teach a contradiction). Returns 0 when every weight is 0.

    Example:
        >>> logits, labels = torch.tensor([[0., 0.], [2., 0.]]), torch.tensor([1, 0])  # CE: ln 2, ln(1 + e⁻²)
        >>> round(float(image_loss(logits, labels)), 4)                             # mean of both
        0.41
        >>> round(float(image_loss(logits, labels, torch.tensor([0., 1.]))), 4)     # first entry skipped
        0.1269
    """
    ce = F.cross_entropy(cls_logits.float(), labels.long(), reduction="none")  # (B,)
    if weights is None:
        return ce.mean()
    weights = weights.to(ce)
    return (ce * weights).sum() / weights.sum().clamp_min(1e-12)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss −(1 − p_t)^γ log p_t over layers, images and patches.

    Args:
        logits: (L, B, N, 2) [normal, anomalous] patch logits.
        targets: (B, N) 1 for anomalous patches (the perturbation's patch mask), 0 otherwise.

    Example (p_t = 0.5 everywhere, γ = 2: 0.25 · ln 2):
        >>> round(float(focal_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[1., 0.]]))), 4)
        0.1733
    """
    log_p = F.log_softmax(logits.float(), dim=-1)  # (L, B, N, 2)
    target = targets.to(log_p.device).long().expand(log_p.shape[:-1])  # (L, B, N)
    log_pt = log_p.gather(-1, target[..., None])[..., 0]  # (L, B, N)
    return (-(1 - log_pt.exp()).pow(gamma) * log_pt).mean()


def dice_loss(anomalous_prob: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per tapped layer over the whole batch, averaged over layers: 1 − (2Σpt + s)/(Σp + Σt + s).

    Computed over the batch (not per image) so clean images, whose target is empty, still count: their
    anomalous probability only adds to Σp. ``smooth`` = 1 as in AnomalyCLIP/APRIL-GAN.

    Args:
        anomalous_prob: (L, B, N) probability of "anomalous" per patch.
        targets: (B, N) {0, 1}.

    Example (p = t: 1 − (2·2 + 1)/(2 + 2 + 1) = 0; p = 1 − t: 1 − 1/(1 + 2 + 1)):
        >>> t = torch.tensor([[1., 1., 0.]])
        >>> float(dice_loss(t[None], t)), round(float(dice_loss(1 - t[None], t)), 4)
        (0.0, 0.75)
    """
    targets = targets.to(anomalous_prob)[None]  # (1, B, N)
    dims = tuple(range(1, anomalous_prob.dim()))
    overlap = (anomalous_prob * targets).sum(dims)  # (L,)
    total = anomalous_prob.sum(dims) + targets.sum(dims).expand_as(overlap)  # (L,)
    return (1 - (2 * overlap + smooth) / (total + smooth)).mean()


def task_loss(cls_logits: torch.Tensor, patch_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
              config: TrainConfig, image_weights: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w0·CE(image) + w1·focal(patches) + w2·dice(patches), averaged over the tapped layers.

    Returns:
        (total, {"image_loss", "focal", "dice"}) — the parts unweighted.
    """
    w_image, w_focal, w_dice = config.loss_weights
    parts = {"image_loss": image_loss(cls_logits, labels, image_weights),
             "focal": focal_loss(patch_logits, targets, config.focal_gamma),
             "dice": dice_loss(patch_logits.float().softmax(-1)[..., 1], targets)}
    total = w_image * parts["image_loss"] + w_focal * parts["focal"] + w_dice * parts["dice"]
    return total, parts
