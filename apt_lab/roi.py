"""Regions of interest: where CFG may put synthetic anomalies — on the object, or anywhere on a texture.

``region_of_interest`` returns a (B, S, S) bool mask per image; ``perturb`` intersects it with a random blob.
Four sources, chosen by ``config.perturb.roi_method``:

* ``"text"`` — the frozen model's patch tokens (last tapped layer) against "a photo of an object." minus
  "a photo of the background." (needs real weights to mean anything);
* ``"attention"`` — the CLS token's attention to each patch in the last vision block, averaged over heads;
* ``"pixels"`` — a classical foreground estimate from the image itself: smoothed luminance and saturation,
  scored by their distance from the image border's median (works with random weights, and offline);
* ``"mask"`` — yours: pass ``roi=`` (B, S, S) bool to ``perturb`` / ``tune_prompts``.

The first three give a foreground *score* map; :func:`foreground_from_scores` turns any score map into the
region, the same way for all three: a border prior fixes the sign (an object rarely fills the image border,
and CLIP's similarity maps are known to favour the background), Otsu's threshold splits it, holes are filled,
and the texture-or-object decision is taken on that *undilated* foreground — a foreground covering most of
the image, touching the border about as often as the interior, or degenerate, means "texture: the whole
image". The object's outline is then drawn at pixel resolution (bilinear up-sampling of the score map,
thresholded at the same value), so a coarse patch grid does not grow the region past the object.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .backbone import Backbone, ImageFeatures, check_pixels
from .config import ROI_METHODS, APTConfig, PerturbConfig, config_section

ROI_PROMPTS = ("a photo of an object.", "a photo of the background.")  # foreground vs background texts
ROI_MIN_FRACTION = 0.05  # a foreground smaller than this share of the map is degenerate → whole image
BORDER_WIDTH = 0.05  # the border ring: cells within this fraction of the side from an edge (at least one cell)
TEXTURE_BORDER_RATIO = 1 / 3  # foreground as dense on the border ring as this share of the interior's → texture
PIXEL_CELL = 4  # "pixels": the score map is computed on cells of this many pixels (224 px → a 56 × 56 map)
PIXEL_BLUR = 1.0  # "pixels": Gaussian blur σ of the luminance / saturation maps, in cells


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


def border_ring(height: int, width: int) -> torch.Tensor:
    """(h, w) bool: the cells within ``BORDER_WIDTH`` of the side (at least one cell) from any edge.

    Example:
        >>> border_ring(4, 4).int().tolist()
        [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    """
    ring = torch.zeros(height, width, dtype=torch.bool)
    dy, dx = max(1, round(BORDER_WIDTH * height)), max(1, round(BORDER_WIDTH * width))
    ring[:dy], ring[-dy:], ring[:, :dx], ring[:, -dx:] = True, True, True, True
    return ring


def orient_by_border(scores: torch.Tensor) -> torch.Tensor:
    """(B, h, w) foreground scores with the sign fixed by the border prior: per image, when the border ring
    scores higher on average than the interior, the map is negated (the object rarely fills the border).

    Example:
        >>> s = torch.ones(1, 4, 4); s[0, 1:3, 1:3] = 0.0            # high on the border: inverted
        >>> orient_by_border(s)[0].tolist()[1]
        [-1.0, -0.0, -0.0, -1.0]
    """
    ring = border_ring(*scores.shape[-2:]).to(scores.device)
    flip = scores[:, ring].mean(1) > scores[:, ~ring].mean(1)  # (B,)
    return torch.where(flip[:, None, None], -scores, scores)


def foreground_from_scores(scores: torch.Tensor, size: int, texture_fraction: float = 0.7, dilation: int = 0,
                           min_fraction: float = ROI_MIN_FRACTION) -> torch.Tensor:
    """(B, h, w) foreground scores on any grid → (B, size, size) bool region of interest in pixels.

    Per image: orient the map with the border prior (:func:`orient_by_border`) and split it with Otsu's
    threshold. On that undilated foreground decide object or texture: the whole image is the region when the
    foreground covers more than ``texture_fraction`` or less than ``min_fraction`` of the map, or when it
    covers the border ring at least ``TEXTURE_BORDER_RATIO`` (1/3) as densely as the interior (a texture: no
    object stands out from a background; on the demo photos coins measure at most 0.26, textures at least 0.4). For an object the outline is drawn at pixel resolution — the oriented map up-sampled
    bilinearly to ``size`` and cut at the same threshold, holes filled — then grown by ``dilation`` pixels.

    Example (a 2×2 object in the middle of a 4×4 map, both signs):
        >>> s = torch.zeros(1, 4, 4); s[0, 1:3, 1:3] = 1.0
        >>> foreground_from_scores(s, size=8)[0].int().tolist()[3]
        [0, 0, 1, 1, 1, 1, 0, 0]
        >>> torch.equal(foreground_from_scores(-s, size=8), foreground_from_scores(s, size=8))
        True
        >>> bool(foreground_from_scores(torch.rand(1, 8, 8), size=8).all())   # no object: texture → everything
        True
    """
    oriented = orient_by_border(scores.detach().float().cpu())  # (B, h, w)
    ring = border_ring(*oriented.shape[-2:])
    fine = F.interpolate(oriented[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    out = torch.ones(oriented.shape[0], size, size, dtype=torch.bool)
    for i, s in enumerate(oriented):
        threshold = otsu_threshold(s)
        fg = s > threshold  # (h, w) the undilated, unfilled foreground the decision is taken on
        fraction = float(fg.float().mean())
        on_border, inside = float(fg[ring].float().mean()), float(fg[~ring].float().mean())
        if min_fraction <= fraction <= texture_fraction and on_border < TEXTURE_BORDER_RATIO * inside:
            out[i] = _fill_holes(fine[i] > threshold)  # (size, size) the object's outline in pixels
    if dilation > 0:
        out = F.max_pool2d(out[:, None].float(), 2 * dilation + 1, stride=1, padding=dilation)[:, 0] > 0
    return out


# ------------------------------------------------------------------------------------------- score maps
def text_scores(backbone: Backbone, features: ImageFeatures) -> torch.Tensor:
    """(B, h, w) cos(patch, "object") − cos(patch, "background") on the last tapped layer's patch tokens."""
    texts = backbone.encode_texts(ROI_PROMPTS).to(features.patches)  # (2, D)
    sim = features.patches[-1] @ texts.T  # (B, N, 2)
    return (sim[..., 0] - sim[..., 1]).reshape(-1, *features.grid)  # (B, h, w)


@torch.no_grad()
def attention_scores(backbone: Backbone, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(B, h, w) attention of the CLS token to every patch in the last vision block, averaged over heads."""
    block = backbone.model.visual.transformer.resblocks[-1]
    captured = []
    hook = block.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    maps = []
    try:
        for start in range(0, images.shape[0], batch_size):
            captured.clear()
            backbone.model.visual(backbone.normalize(backbone.resize(images[start:start + batch_size])))
            x = block.ln_1(captured[0])  # (b, 1+N, W) batch-first, or (1+N, b, W)
            _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=True)  # (b, 1+N, 1+N)
            maps.append(weights[:, 0, 1:].float())  # (b, N) CLS → patches
    finally:
        hook.remove()
    return torch.cat(maps).reshape(-1, *backbone.grid)  # (B, h, w)


def pixel_scores(images: torch.Tensor, cell: int = PIXEL_CELL, blur: float = PIXEL_BLUR) -> torch.Tensor:
    """(B, 3, S, S) pixels → (B, S/cell, S/cell) foreground score, no model needed.

    Luminance (Rec. 601) and saturation (max − min over RGB) are averaged over ``cell`` × ``cell`` cells and
    blurred; the score is each cell's distance in (luminance, saturation) from the median of the border ring —
    how unlike the background, as the image border shows it, a cell looks.

    Example (a bright square on a dark background):
        >>> x = torch.zeros(1, 3, 32, 32); x[:, :, 8:24, 8:24] = 0.8
        >>> s = pixel_scores(x, cell=4, blur=0.0)
        >>> tuple(s.shape), float(s[0, 0, 0]), round(float(s[0, 4, 4]), 3)
        ((1, 8, 8), 0.0, 0.8)
    """
    x = images.detach().float()
    luminance = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (B, S, S)
    saturation = x.amax(1) - x.amin(1)  # (B, S, S)
    maps = F.avg_pool2d(torch.stack([luminance, saturation], 1), cell)  # (B, 2, h, w)
    if blur > 0:
        maps = _gaussian_blur(maps, blur)
    ring = border_ring(*maps.shape[-2:]).to(maps.device)
    background = maps[:, :, ring].median(-1).values  # (B, 2)
    return (maps - background[:, :, None, None]).norm(dim=1)  # (B, h, w)


# ------------------------------------------------------------------------------------------- the entry point
@torch.no_grad()
def region_of_interest(backbone: Backbone, images: torch.Tensor, config: APTConfig | PerturbConfig,
                       batch_size: int = 32, features: ImageFeatures | None = None) -> torch.Tensor:
    """(B, 3, S, S) pixels → (B, S, S) bool: where synthetic anomalies may go.

    ``config.perturb.region == "image"`` → everywhere. Otherwise the score map of ``config.perturb.roi_method``
    (``"text"``, ``"attention"``, ``"pixels"``; see the module docstring) through :func:`foreground_from_scores`
    with ``roi_texture_fraction`` and ``roi_dilation`` (pixels). ``"mask"`` has no computed region: pass your
    own with ``roi=`` to ``perturb`` / ``tune_prompts``. ``features``: the images' features from
    ``backbone.encode_images`` when already computed ("text" then needs no second encoder pass).

    Example (the demo coin: the region covers the coin, not the dark background around it):
        >>> import apt_lab
        >>> b = apt_lab.load_backbone("apt-tiny")
        >>> data = apt_lab.data.load_dataset("demo", category="coins")
        >>> coin = data.train.images(224, [0])                      # (1, 3, 224, 224)
        >>> roi = region_of_interest(b, coin, PerturbConfig(roi_method="pixels"))
        >>> round(float(roi.float().mean()), 2), bool(roi[0, 112, 112]), bool(roi[0, 2, 2])
        (0.34, True, False)
    """
    cfg = config_section(config, PerturbConfig)
    check_pixels(images, "images", size=backbone.image_size)
    size = backbone.image_size
    if cfg.region == "image":
        return torch.ones(images.shape[0], size, size, dtype=torch.bool, device=images.device)
    if cfg.roi_method == "mask":
        raise ValueError("config.perturb.roi_method='mask' uses your own region of interest: pass roi=(B, S, S) bool "
                         f"to perturb(...) or tune_prompts(...), or choose another of {ROI_METHODS}")
    if features is not None and features.cls.shape[0] != images.shape[0]:
        raise ValueError(f"features are for {features.cls.shape[0]} images, images has {images.shape[0]}")
    if cfg.roi_method == "pixels":
        scores = pixel_scores(images)  # (B, S/4, S/4)
    elif cfg.roi_method == "attention":
        scores = attention_scores(backbone, images, batch_size)  # (B, h, w)
    else:
        features = features if features is not None else backbone.encode_batched(images, batch_size)
        scores = text_scores(backbone, features)  # (B, h, w)
    roi = foreground_from_scores(scores, size, cfg.roi_texture_fraction, cfg.roi_dilation)  # (B, S, S)
    return roi.to(images.device)


# ------------------------------------------------------------------------------------------- helpers
def _fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """(h, w) bool → the same with every background region not connected to the border filled."""
    return torch.from_numpy(ndimage.binary_fill_holes(mask.cpu().numpy()).astype(np.bool_))


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, h, w) → separable Gaussian blur with reflected borders (radius 3σ)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-t**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (2r+1,)
    channels = maps.shape[1]
    x = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
