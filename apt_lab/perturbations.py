"""CFG — Contextual anomaly Feature Generation: synthetic anomalies made from normal images.

APT tunes prompts on anomalies it makes itself: noise put into a random blob inside the object (the region of
interest, found by the frozen model). ``perturb`` does that for a batch and returns the perturbed pixels with
the pixel mask and the patch-grid mask, so losses and plots can use both.

Noise schemes are a registry looked up by name from ``config.perturb.generators``; a researcher adds one with
a decorator and nothing else in the library changes::

    @register_perturbation("stripes")
    def stripes(image, region, rng):           # (3, H, W) in [0, 1], (H, W) bool, torch.Generator
        out = image.clone()
        out[:, ::4] = 1.0
        return torch.where(region, out, image), region   # pixels changed only inside region; their mask

    config = config.replace(perturb__generators=("gaussian", "stripes"))

A pixel generator is ``fn(image, region, rng, strength) -> (image, mask)`` (``strength`` may be left out). It may
change pixels only inside ``region``; ``perturb`` enforces that, and that pixels change only inside the returned
mask (which it intersects with ``region``). A feature-space generator (``space="feature"``, e.g. the built-in
``"feature"``) works on encoded patch tokens instead; ``perturb`` skips those and the tuning loop calls them.

Example:
    >>> import torch, apt_lab.config as c
    >>> cfg = c.PerturbConfig(region="image", generators=("gaussian",), min_area=0.05, max_area=0.1)
    >>> out = perturb(torch.full((2, 3, 32, 32), 0.5), cfg, torch.Generator().manual_seed(0), patch_size=8)
    >>> out.images.shape, out.masks.shape, out.patch_masks.shape, out.generators
    (torch.Size([2, 3, 32, 32]), torch.Size([2, 32, 32]), torch.Size([2, 4, 4]), ['gaussian', 'gaussian'])
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .backbone import Backbone, ImageFeatures, check_pixels
from .blobs import area_bounds, draw_blobs, nearest_pixels_batch
from .config import APTConfig, PerturbConfig, config_section
from .roi import region_of_interest

ROI_TRIES = 5  # blob redraws, centred inside the ROI, before the ROI-restricted disc fallback


# -------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Entry:
    fn: Callable
    space: str  # "pixel" or "feature"
    takes_strength: bool


_REGISTRY: dict[str, _Entry] = {}


def register_perturbation(name: str, space: str = "pixel", replace: bool = False) -> Callable:
    """Decorator that registers a noise scheme under ``name`` for ``config.perturb.generators``.

    Args:
        name: the name configs use.
        space: ``"pixel"`` — ``fn(image (3,H,W), region (H,W) bool, rng, strength) -> (image, mask)``; or
            ``"feature"`` — ``fn(features: ImageFeatures, patch_masks (B,h,w) bool, rng, strength) -> ImageFeatures``.
            A function without a ``strength`` parameter is called without one.
        replace: allow taking over a name registered by a different function (re-running the same definition,
            e.g. a notebook cell, always replaces).
    """
    if space not in ("pixel", "feature"):
        raise ValueError(f"space must be 'pixel' or 'feature', got {space!r}")

    def decorator(fn: Callable) -> Callable:
        old = _REGISTRY.get(name)
        same = old is not None and (old.fn.__module__, old.fn.__qualname__) == (fn.__module__, fn.__qualname__)
        if old is not None and not (replace or same):
            raise ValueError(f"perturbation {name!r} is already registered by {old.fn.__module__}."
                             f"{old.fn.__qualname__}; pick another name, or pass replace=True")
        params = inspect.signature(fn).parameters.values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes = any(p.name == "strength" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params) \
            or len(positional) >= 4
        _REGISTRY[name] = _Entry(fn, space, takes)
        return fn

    return decorator


def unregister_perturbation(name: str) -> None:
    """Remove a registered scheme (e.g. in a test's teardown)."""
    get_perturbation(name)
    del _REGISTRY[name]


def list_perturbations(space: str | None = None) -> list[str]:
    """Registered names, sorted; ``space="pixel"`` or ``"feature"`` filters."""
    return sorted(n for n, e in _REGISTRY.items() if space is None or e.space == space)


def get_perturbation(name: str) -> Callable:
    """The function registered under ``name``; an unknown name raises ValueError listing what exists."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown perturbation {name!r}; registered: {list_perturbations()}. Register a new one "
                         "with @apt_lab.register_perturbation('name') on a function (image, region, rng[, strength])"
                         " -> (image, mask), then list its name in config.perturb.generators.")
    return _REGISTRY[name].fn


def _call(name: str, *args, strength: float):
    entry = _REGISTRY[name]
    return entry.fn(*args, strength) if entry.takes_strength else entry.fn(*args)


# -------------------------------------------------------------------------------------------------- built-ins
def _draw(shape, rng: torch.Generator, like: torch.Tensor, uniform: bool = False) -> torch.Tensor:
    """Random numbers drawn on the generator's device, then moved next to ``like`` (same seed → same numbers)."""
    draw = torch.rand if uniform else torch.randn
    return draw(shape, generator=rng, device=rng.device).to(like.device, like.dtype)


@register_perturbation("gaussian")
def gaussian_noise(image: torch.Tensor, region: torch.Tensor, rng: torch.Generator, strength: float):
    """Additive N(0, strength²) noise inside ``region``, clamped to [0, 1]; mask = region. Strength 0 is a no-op."""
    noisy = (image + strength * _draw(image.shape, rng, image)).clamp(0, 1)  # (3, H, W)
    return torch.where(region, noisy, image), region


@register_perturbation("uniform")
def uniform_noise(image: torch.Tensor, region: torch.Tensor, rng: torch.Generator, strength: float):
    """Blend towards uniform noise: (1 − s)·image + s·U(0, 1) inside ``region``; mask = region."""
    noisy = (1 - strength) * image + strength * _draw(image.shape, rng, image, uniform=True)  # (3, H, W)
    return torch.where(region, noisy, image), region


@register_perturbation("salt_pepper")
def salt_pepper_noise(image: torch.Tensor, region: torch.Tensor, rng: torch.Generator, strength: float):
    """A fraction ≈ strength of the region's pixels set to 0 or 1 (all channels).

    The mask is the whole sprinkled region, by definition: a speckled area is one defect, outlined the way an
    annotator outlines a speckled stain, and about ``strength`` of its pixels (0.2–0.6 by default) change — none
    outside it. A mask of only the changed pixels would cover ≈ strength of each patch, below
    ``patch_threshold`` (0.25) for weak draws, and would teach the patches between the specks to look normal.
    """
    hit = (_draw(region.shape, rng, image, uniform=True) < strength) & region  # (H, W)
    value = (_draw(region.shape, rng, image, uniform=True) < 0.5).to(image.dtype).expand_as(image)  # (3, H, W)
    return torch.where(hit, value, image), region


# Built-ins whose body is elementwise: perturb calls them once per batch with images (b, 3, H, W), regions
# (b, 1, H, W) and strengths (b, 1, 1, 1), drawing their noise on the images' device.
_BATCHED = (gaussian_noise, uniform_noise, salt_pepper_noise)


@register_perturbation("feature", space="feature")
def perturb_features(features: ImageFeatures, patch_masks: torch.Tensor, rng: torch.Generator,
                     strength: float | torch.Tensor) -> ImageFeatures:
    """Noise on encoded patch tokens inside the patch mask, in every tapped layer; no encoder pass.

    Tokens are unit vectors in D dimensions, so the noise has per-coordinate std ``strength / sqrt(D)``: its
    norm is about ``strength`` times a token's norm (strength 1 → noise as long as the token). Noisy tokens are
    re-normalised; CLS and tokens outside the mask are returned unchanged.

    Args:
        features: ImageFeatures with patches (L, B, N, D).
        patch_masks: (B, h, w) bool, (h, w) == features.grid.
        strength: a float, or a (B,) tensor (one strength per image).
    """
    layers, batch, n, dim = features.patches.shape
    if tuple(patch_masks.shape) != (batch, *features.grid):
        raise ValueError(f"patch_masks: expected shape {(batch, *features.grid)}, got {tuple(patch_masks.shape)}")
    scale = torch.as_tensor(strength, dtype=torch.float32, device=features.patches.device).reshape(-1, 1, 1)
    rng = generator_on(features.patches.device, rng)  # noise drawn where the features are
    noise = _draw(features.patches.shape, rng, features.patches) * scale / math.sqrt(dim)  # (L, B, N, D)
    noisy = F.normalize(features.patches + noise, dim=-1)  # (L, B, N, D)
    inside = patch_masks.reshape(1, batch, n, 1).to(features.patches.device)  # (1, B, N, 1)
    return ImageFeatures(features.cls, torch.where(inside, noisy, features.patches), features.grid,
                         features.locality_radius)


# -------------------------------------------------------------------------------------------------- perturb
@dataclass
class Perturbation:
    """A batch of synthetic anomalies.

    Attributes:
        images: (B, 3, S, S) perturbed pixels in [0, 1]; equal to the input outside ``masks``.
        masks: (B, S, S) bool, pixels declared anomalous (never empty).
        patch_masks: (B, h, w) bool, patches with ≥ ``patch_threshold`` of their pixels masked (never empty:
            when no patch reaches the threshold, the patch with the most masked pixels counts).
        generators: the registered name used for each image.
        strengths: (B,) the strength drawn for each image.
        roi: (B, S, S) bool, the region of interest the anomalies were confined to.
    """

    images: torch.Tensor
    masks: torch.Tensor
    patch_masks: torch.Tensor
    generators: list[str]
    strengths: torch.Tensor
    roi: torch.Tensor


def patch_mask(masks: torch.Tensor, patch_size: int, threshold: float) -> torch.Tensor:
    """(B, H, W) bool pixel mask → (B, H//p, W//p) bool: a patch is anomalous when ≥ threshold of it is masked.

    Example:
        >>> m = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]], dtype=torch.bool)
        >>> patch_mask(m, 2, 0.5)[0].int().tolist()     # covered fractions [[0.75, 0], [0, 0.25]]
        [[1, 0], [0, 0]]
        >>> patch_mask(m, 2, 0.25)[0].int().tolist()
        [[1, 0], [0, 1]]
    """
    covered = F.avg_pool2d(masks[:, None].float(), patch_size, stride=patch_size)[:, 0]  # (B, h, w) fractions
    return covered >= threshold - 1e-6


def perturb(images: torch.Tensor, config: APTConfig | PerturbConfig, rng: torch.Generator,
            roi: torch.Tensor | None = None, backbone: Backbone | None = None,
            patch_size: int | None = None) -> Perturbation:
    """CFG: put one synthetic anomaly into each image, inside its region of interest — a batch at a time.

    Per image: a pixel-space generator drawn uniformly from ``config.perturb.generators`` (feature-space ones are
    skipped here), a strength uniformly in ``config.perturb.strength``, a blob (:func:`~apt_lab.blobs.draw_blobs`),
    and anomaly region = ROI ∩ blob. Where that is smaller than ``min_area``, the blob is redrawn centred on a
    random ROI pixel (``ROI_TRIES`` rounds), then the region falls back to the ``min_area`` ROI pixels nearest to a
    random ROI pixel (the whole ROI if it is smaller). Then each generator runs once on all its images.

    Everything stays on the images' device: blobs and built-in noise are drawn there in batches (the noise from a
    generator on that device seeded by one draw of ``rng``), with one host synchronisation per round of redraws
    and one for the final checks, never one per image. Generators a researcher registers are called image by
    image with ``rng`` itself, as documented in :func:`register_perturbation`.

    Args:
        images: (B, 3, S, S) pixels in [0, 1].
        config: APTConfig or its PerturbConfig.
        rng: every random draw comes from it (same seed → same output on CPU).
        roi: (B, S, S) bool; None → ``region_of_interest(backbone, images, config)`` when region == "roi"
            (needs ``backbone``), all-True when region == "image".
        backbone: gives the patch size (and the ROI when needed).
        patch_size: patch side for ``patch_masks`` when no backbone is given; default 16.
    """
    cfg = config_section(config, PerturbConfig)
    check_pixels(images, "images", size=backbone.image_size if backbone is not None else None)
    batch, _, height, width = images.shape
    if backbone is not None and patch_size not in (None, backbone.patch_size):
        raise ValueError(f"patch_size={patch_size} contradicts the backbone's patch size {backbone.patch_size}")
    patch = backbone.patch_size if backbone is not None else (patch_size or 16)
    for name in cfg.generators:
        get_perturbation(name)  # unknown names fail here, with the list of registered ones
    names = [n for n in cfg.generators if _REGISTRY[n].space == "pixel"]
    if not names:
        raise ValueError(f"config.perturb.generators={list(cfg.generators)} holds no pixel-space generator; "
                         f"pixel-space ones: {list_perturbations('pixel')}")
    roi = _resolve_roi(images, cfg, roi, backbone)  # (B, H, W) bool on the images' device
    low, high = cfg.strength
    used = [names[i] for i in torch.randint(len(names), (batch,), generator=rng, device=rng.device).tolist()]
    strengths = (low + (high - low) * torch.rand(batch, generator=rng, device=rng.device)).cpu()  # (B,)
    regions = _anomaly_regions(roi, cfg, rng)  # (B, H, W) bool
    noise_rng = generator_on(images.device, rng)
    out, masks = images.clone(), torch.zeros(batch, height, width, dtype=torch.bool, device=images.device)
    for name in dict.fromkeys(used):  # each generator once, in order of first use
        rows = [i for i, n in enumerate(used) if n == name]
        if _REGISTRY[name].fn in _BATCHED:  # built-ins: one call on all their images, noise drawn on the device
            strength = strengths[rows].to(images.device, images.dtype).view(-1, 1, 1, 1)
            new, mask = _REGISTRY[name].fn(images[rows], regions[rows][:, None], noise_rng, strength)
            mask = mask[:, 0]
        else:
            results = [_call(name, images[i], regions[i], rng, strength=float(strengths[i])) for i in rows]
            pairs = [r if isinstance(r, tuple) else (r, regions[i]) for r, i in zip(results, rows)]
            if any(tuple(n.shape) != tuple(images.shape[1:]) or tuple(m.shape) != (height, width) for n, m in pairs):
                shapes = [(tuple(n.shape), tuple(m.shape)) for n, m in pairs]
                raise ValueError(f"perturbation {name!r} returned (image, mask) shapes {shapes[:3]}; expected "
                                 f"{tuple(images.shape[1:])} and {(height, width)}")
            new = torch.stack([n.to(images.device, images.dtype) for n, _ in pairs])  # (b, 3, H, W)
            mask = torch.stack([m.to(images.device, torch.bool) for _, m in pairs])  # (b, H, W)
        mask = mask & regions[rows]  # (b, H, W)
        out[rows] = torch.where(mask[:, None], new.clamp(0, 1), images[rows])  # changes only inside the mask
        masks[rows] = mask
    empty = ~masks.flatten(1).any(1)  # (B,)
    if empty.any():  # one synchronisation for the whole batch
        where = empty.nonzero().flatten().tolist()
        raise ValueError(f"perturbation {used[where[0]]!r} returned a mask with no pixel inside its region (images "
                         f"{where[:5]}); a generator must return the (H, W) bool mask of the pixels it made anomalous")
    patches = patch_mask(masks, patch, cfg.patch_threshold)  # (B, h, w)
    covered = F.avg_pool2d(masks[:, None].float(), patch, stride=patch)[:, 0].flatten(1)  # (B, h*w)
    lonely = ~patches.flatten(1).any(1)  # (B,) no patch over the threshold (a small or scattered mask)
    most = F.one_hot(covered.argmax(1), covered.shape[1]).bool() & lonely[:, None]  # (B, h*w)
    patches = patches | most.view_as(patches)
    return Perturbation(out, masks, patches, used, strengths, roi)


def generator_on(device: torch.device | str, rng: torch.Generator) -> torch.Generator:
    """``rng`` itself when it lives on ``device``; otherwise a generator there, seeded by one draw of ``rng``.

    So random tensors for data on a GPU are drawn on the GPU (no host copy), and the same seed still gives the
    same numbers run after run.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> generator_on("cpu", g) is g
        True
    """
    device = torch.device(device)
    if rng.device.type == device.type and (device.index is None or rng.device.index == device.index):
        return rng
    seed = int(torch.randint(2**62, (), generator=rng, device=rng.device))
    return torch.Generator(device=device).manual_seed(seed)


def _resolve_roi(images, cfg: PerturbConfig, roi, backbone) -> torch.Tensor:
    batch, _, height, width = images.shape
    if roi is None:
        if cfg.region == "image":
            return torch.ones(batch, height, width, dtype=torch.bool, device=images.device)
        if backbone is None:
            raise ValueError("perturb: config.perturb.region == 'roi' needs the region of interest: pass "
                             "backbone=... (it is computed with region_of_interest), or roi=..., or set "
                             "config.perturb.region = 'image'")
        roi = region_of_interest(backbone, images, cfg)
    if tuple(roi.shape) != (batch, height, width):
        raise ValueError(f"roi: expected shape {(batch, height, width)} (B, S, S) bool, got {tuple(roi.shape)}")
    roi = roi.to(images.device, torch.bool)
    empty = ~roi.flatten(1).any(1)  # (B,)
    if empty.any():
        raise ValueError(f"roi is empty for image(s) {empty.nonzero().flatten().tolist()}; every image needs at "
                         "least one allowed pixel")
    return roi


def _anomaly_regions(roi: torch.Tensor, cfg: PerturbConfig, rng: torch.Generator) -> torch.Tensor:
    """(B, H, W) bool ROI → (B, H, W) bool anomaly regions = ROI ∩ blob, never empty, ≥ min_area when the ROI
    allows; a whole-image ROI takes the blob as it is. Batched on the ROI's device."""
    batch, height, width = roi.shape
    device = roi.device
    low, _ = area_bounds((height, width), cfg.min_area, cfg.max_area)
    picks = torch.rand(batch, ROI_TRIES + 1, generator=rng, device=rng.device).to(device)  # ROI pixels to centre on
    whole = roi.flatten(1).all(1)  # (B,)
    regions = draw_blobs(batch, (height, width), rng, cfg.blob, cfg.min_area, cfg.max_area, device=device)
    regions &= roi | whole[:, None, None]
    ok = whole | (regions.flatten(1).sum(1) >= low)  # (B,)
    for attempt in range(ROI_TRIES + 1):
        pending = (~ok).nonzero().flatten().tolist()  # one synchronisation per round
        if not pending:
            break
        rows = torch.tensor(pending, device=device)
        centres = _roi_pixels(roi[rows], picks[rows, attempt])  # (n, 2)
        if attempt == ROI_TRIES:  # the fallback: the min_area ROI pixels nearest to a random ROI pixel
            regions[rows] = nearest_pixels_batch(roi[rows], centres, torch.full((len(pending),), low))
            break
        blobs = draw_blobs(len(pending), (height, width), rng, cfg.blob, cfg.min_area, cfg.max_area,
                           centers=centres, device=device)
        regions[rows] = blobs & roi[rows]
        ok[rows] = regions[rows].flatten(1).sum(1) >= low
    return regions


def _roi_pixels(roi: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """(n, H, W) bool ROIs and (n,) uniforms in [0, 1) → (n, 2) (row, col) of a uniformly chosen ROI pixel each."""
    n, _, width = roi.shape
    counts = roi.reshape(n, -1).cumsum(1)  # (n, H*W) ROI pixels up to each position
    wanted = (picks * counts[:, -1]).long().clamp(max=counts[:, -1] - 1) + 1  # (n,) 1-based rank of the pixel
    flat = torch.searchsorted(counts, wanted[:, None]).flatten()  # first position holding that many ROI pixels
    return torch.stack([flat // width, flat % width], dim=1)
