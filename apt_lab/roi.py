"""Regions of interest: where CFG may put synthetic anomalies — on the object, or anywhere on a texture.

``region_of_interest`` returns a (B, S, S) bool mask per image; ``perturb`` intersects it with a random blob.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .backbone import Backbone, ImageFeatures, check_pixels
from .config import APTConfig, PerturbConfig, config_section

ROI_PROMPTS = ("a photo of an object.", "a photo of the background.")  # foreground vs background texts
ROI_MIN_FRACTION = 0.05  # a foreground smaller than this share of the grid is degenerate → whole image


def otsu_threshold(values: torch.Tensor) -> float:
    """Otsu's threshold on samples: the cut maximising between-class variance w0·w1·(μ0 − μ1)².

    Exact over the sorted samples (no histogram); the threshold is the midpoint of the best gap, so
    ``values > threshold`` is the upper class. All values equal → +inf (empty upper class).

    Example:
        >>> otsu_threshold(torch.tensor([0., 0, 1, 1, 5, 5, 6, 6]))
        3.0
    """
    v = values.flatten().double().sort().values  # (n,)
    n = v.numel()
    k = torch.arange(1, n, dtype=torch.float64)  # size of the lower class for each cut
    head = v.cumsum(0)[:-1]  # (n-1,) sum of the lower class
    mu0, mu1 = head / k, (v.sum() - head) / (n - k)
    between = (k / n) * (1 - k / n) * (mu0 - mu1) ** 2  # (n-1,)
    between[v[1:] == v[:-1]] = -1  # cutting between equal values is not a cut
    if n < 2 or between.max() < 0:
        return math.inf
    best = int(between.argmax())
    return float((v[best] + v[best + 1]) / 2)


def foreground_from_similarity(similarity: torch.Tensor, dilation: int = 1, texture_fraction: float = 0.7,
                               min_fraction: float = ROI_MIN_FRACTION) -> torch.Tensor:
    """(B, h, w) foreground score on the patch grid → (B, h, w) bool region of interest.

    Per image: Otsu threshold, dilate by ``dilation`` patches (a square (2d+1)² neighbourhood), then the texture
    fallback: if the dilated foreground covers more than ``texture_fraction`` of the grid (a texture, or a map
    with no clear object: scattered foreground patches dilate to nearly everything) or less than
    ``min_fraction`` (degenerate), the whole grid is the region.

    Example:
        >>> s = torch.zeros(1, 4, 4); s[0, :2, :2] = 1.0            # an object in the top-left corner
        >>> foreground_from_similarity(s, dilation=0)[0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
        >>> foreground_from_similarity(s, dilation=1)[0].int().tolist()   # 9/16 ≤ 0.7: still an object
        [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
        >>> bool(foreground_from_similarity(s, dilation=2).all())        # 16/16 > 0.7: texture → everything
        True
    """
    fg = torch.stack([s > otsu_threshold(s) for s in similarity])  # (B, h, w)
    if dilation > 0:
        fg = F.max_pool2d(fg[:, None].float(), 2 * dilation + 1, stride=1, padding=dilation)[:, 0] > 0
    fraction = fg.flatten(1).float().mean(1)  # (B,)
    whole = (fraction > texture_fraction) | (fraction < min_fraction)  # (B,)
    return fg | whole[:, None, None]


@torch.no_grad()
def region_of_interest(backbone: Backbone, images: torch.Tensor, config: APTConfig | PerturbConfig,
                       batch_size: int = 32, features: ImageFeatures | None = None) -> torch.Tensor:
    """(B, 3, S, S) pixels → (B, S, S) bool: where synthetic anomalies may go.

    ``config.perturb.region == "image"`` → everywhere. Otherwise ``roi_method`` "text" (the only method so far):
    last tapped layer's patch tokens, cos to "a photo of an object." minus cos to "a photo of the background.",
    then :func:`foreground_from_similarity` (Otsu, dilation, texture fallback), up-sampled nearest to pixels.
    ``features``: the images' features from ``backbone.encode_images`` when already computed (no second pass).
    """
    cfg = config_section(config, PerturbConfig)
    check_pixels(images, "images", size=backbone.image_size)
    size = backbone.image_size
    if cfg.region == "image":
        return torch.ones(images.shape[0], size, size, dtype=torch.bool, device=images.device)
    if cfg.region != "roi":
        raise ValueError(f"config.perturb.region must be 'roi' or 'image', got {cfg.region!r}")
    if cfg.roi_method != "text":
        raise ValueError(f"config.perturb.roi_method {cfg.roi_method!r} is not implemented; use 'text'")
    texts = backbone.encode_texts(ROI_PROMPTS)  # (2, D)
    if features is not None and features.cls.shape[0] != images.shape[0]:
        raise ValueError(f"features are for {features.cls.shape[0]} images, images has {images.shape[0]}")
    if features is None:
        features = backbone.encode_batched(images, batch_size)
    sim = features.patches[-1] @ texts.T  # (B, N, 2): last tapped layer against [object, background]
    scores = (sim[..., 0] - sim[..., 1]).reshape(-1, *backbone.grid).cpu()  # (B, h, w)
    grid_roi = foreground_from_similarity(scores, cfg.roi_dilation, cfg.roi_texture_fraction)
    roi = F.interpolate(grid_roi[:, None].float(), size=(size, size), mode="nearest")[:, 0] > 0  # (B, S, S)
    return roi.to(images.device)
