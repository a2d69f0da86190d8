"""score — image anomaly scores and pixel anomaly maps from a prompt pair, plus the human-prompt baseline.

Patch probability = softmax over [normal, anomalous] of cos/τ, per tapped layer; the map is the mean over
layers, bilinearly up-sampled to the input size and blurred; the image score is the CLS probability, optionally
fused with the map maximum. Optional few-shot visual memory adds each patch's distance to the nearest patch of
the normal shots. The pure functions (``patch_logits``, ``anomaly_probabilities``, ``anomaly_maps``) are also what
the tuning loop uses, so training and scoring compute the same thing.

Example:
    >>> import torch, apt_lab
    >>> from apt_lab.config import APTConfig
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> from apt_lab.baselines import human_prompt_features
    >>> out = score(b, human_prompt_features(b, "bottle"), torch.rand(2, 3, 224, 224), APTConfig())
    >>> out.image_scores.shape, out.anomaly_maps.shape
    (torch.Size([2]), torch.Size([2, 224, 224]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .backbone import Backbone, ImageFeatures, check_pixels
from .config import APTConfig, ScoreConfig, config_section

# ----------------------------------------------------------------------------------------------- pure functions
def patch_logits(features: ImageFeatures, text_features: torch.Tensor, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits cos/τ against [normal, anomalous]: ((B, 2) for CLS, (L, B, N, 2) for patch tokens).

    ``text_features`` (2, D) must be L2-normalised (image features are); gradients flow to it.
    """
    if text_features.dim() != 2 or text_features.shape[0] != 2:
        raise ValueError(f"text_features: expected (2, D) [normal, anomalous], got {tuple(text_features.shape)}")
    if text_features.shape[1] != features.cls.shape[-1]:
        raise ValueError(f"text_features have D={text_features.shape[1]}, image features D={features.cls.shape[-1]}"
                         "; were they made with the same backbone?")
    text = text_features.to(features.cls.device, features.cls.dtype)
    cls_logits = features.cls @ text.T / temperature  # (B, 2)
    patch = features.patches @ text.T / temperature  # (L, B, N, 2)
    return cls_logits, patch


def anomaly_probabilities(features: ImageFeatures, text_features: torch.Tensor, temperature: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomalous-class probabilities: ((B,) from CLS, (L, B, N) per layer and patch).

    Example:
        >>> f = ImageFeatures(torch.tensor([[1.0, 0.0]]), torch.tensor([[[[0.0, 1.0]]]]), (1, 1))
        >>> image, patch = anomaly_probabilities(f, torch.eye(2), temperature=1.0)
        >>> round(float(image[0]), 4), round(float(patch[0, 0, 0]), 4)    # 1/(1+e), e/(1+e)
        (0.2689, 0.7311)
    """
    cls_logits, patch = patch_logits(features, text_features, temperature)
    return cls_logits.softmax(-1)[:, 1], patch.softmax(-1)[..., 1]


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian kernel of radius ceil(4σ), summing to 1.

    Example:
        >>> gaussian_kernel(0.5).numel(), round(float(gaussian_kernel(0.5).sum()), 6)
        (5, 1.0)
    """
    radius = math.ceil(4 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) → (B, H, W): separable Gaussian blur (:func:`gaussian_kernel`), reflect padding (replicate when
    the map is not larger than the kernel radius); σ = 0 returns the input. A constant map stays constant."""
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    rows, cols = (_blur_operator(n, sigma).to(maps.device, maps.dtype) for n in (height, width))  # (H, H), (W, W)
    return rows.T @ maps @ cols  # (B, H, W)


def anomaly_maps(patch_prob: torch.Tensor, grid: tuple[int, int], size: int, blur_sigma: float) -> torch.Tensor:
    """(L, B, N) patch scores → (B, S, S) pixel map: mean over layers, bilinear up-sampling, Gaussian blur σ.

    Up-sampling (bilinear, ``align_corners=False``, as ``F.interpolate``) and the blur are both separable and
    linear, so they run as one (h, S) and one (w, S) matrix: map = Aₕᵀ · grid map · A_w, far cheaper than
    blurring S x S pixels with a convolution and equal to it up to float rounding.

    Example:
        >>> p = torch.tensor([[[0.0, 1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0, 0.0]]])     # 2 layers, 1 image, 2x2 grid
        >>> anomaly_maps(p, (2, 2), 2, blur_sigma=0)[0].tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    layers, batch, n = patch_prob.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches but patch_prob has N={n}")
    grid_map = patch_prob.mean(0).reshape(batch, *grid)  # (B, h, w)
    rows, cols = (_map_operator(g, size, blur_sigma).to(grid_map.device, grid_map.dtype) for g in grid)  # (g, S)
    return rows.T @ grid_map @ cols  # (S, h) @ (B, h, w) @ (w, S) → (B, S, S)


@lru_cache(maxsize=32)
def _blur_operator(size: int, sigma: float) -> torch.Tensor:
    """(size, size) matrix R with row i = the blurred unit impulse i, so a blurred row vector is v @ R."""
    kernel = gaussian_kernel(sigma)  # (K,)
    radius = kernel.numel() // 2
    impulses = torch.eye(size)[:, None]  # (size, 1, size)
    padded = F.pad(impulses, (radius, radius), mode="reflect" if radius < size else "replicate")
    return F.conv1d(padded, kernel.view(1, 1, -1))[:, 0]  # (size, size)


@lru_cache(maxsize=32)
def _map_operator(cells: int, size: int, sigma: float) -> torch.Tensor:
    """(cells, size): linear up-sampling (align_corners=False) of one grid axis, then the blur of that axis."""
    up = F.interpolate(torch.eye(cells)[:, None], size=size, mode="linear", align_corners=False)[:, 0]  # (cells, S)
    return up @ _blur_operator(size, sigma) if sigma > 0 else up


# ------------------------------------------------------------------------------------------------ visual memory
@dataclass
class VisualMemory:
    """Patch tokens of k normal shots, per tapped layer: patches (L, M, D) with M = k·N, normalised."""

    patches: torch.Tensor
    grid: tuple[int, int]
    n_shots: int
    locality_radius: int  # the locality radius the shots were encoded with (score uses the same)


@torch.no_grad()
def build_memory(backbone: Backbone, shots: torch.Tensor | ImageFeatures, config: APTConfig | ScoreConfig
                 ) -> VisualMemory:
    """(K, 3, S, S) normal shots, or their features → VisualMemory for ``score(..., memory=...)`` (WinCLIP+ style).

    Given features (e.g. from :class:`apt_lab.features.FeatureStore`) cost no encoder pass.
    """
    cfg = config_section(config, ScoreConfig)
    if isinstance(shots, ImageFeatures):
        _check_features(shots, backbone, cfg)
        feats = shots
    else:
        check_pixels(shots, "shots")
        feats = backbone.encode_batched(shots, cfg.batch_size, cfg.locality_radius)
    layers, k, n, dim = feats.patches.shape
    return VisualMemory(feats.patches.reshape(layers, k * n, dim), feats.grid, k, cfg.locality_radius)


def memory_distances(features: ImageFeatures, memory: VisualMemory, chunk: int = 4096) -> torch.Tensor:
    """(L, B, N) distance of every patch to its nearest memory patch of the same layer: (1 − max cos) / 2 ∈ [0, 1].

    A patch identical to a memory patch scores 0.
    """
    layers, batch, n, dim = features.patches.shape
    if memory.patches.shape[0] != layers or memory.patches.shape[-1] != dim:
        raise ValueError(f"memory has {tuple(memory.patches.shape)} (L, M, D) but features have L={layers}, "
                         f"D={dim}; build the memory with the same backbone and layers")
    bank = memory.patches.to(features.patches.device)  # (L, M, D)
    out = torch.empty(layers, batch * n, device=features.patches.device)
    for layer in range(layers):
        queries = features.patches[layer].reshape(batch * n, dim)  # (B*N, D)
        for start in range(0, batch * n, chunk):
            sim = queries[start:start + chunk] @ bank[layer].T  # (c, M)
            out[layer, start:start + chunk] = sim.max(dim=1).values
    return ((1 - out) / 2).clamp_(0, 1).reshape(layers, batch, n)


# ------------------------------------------------------------------------------------------------------- score
@dataclass
class Scores:
    """image_scores (B,) float32 and anomaly_maps (B, S, S) float32, on the CPU; higher = more anomalous."""

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor


@torch.no_grad()
def score(backbone: Backbone, prompts, images: torch.Tensor | ImageFeatures, config: APTConfig | ScoreConfig,
          memory: VisualMemory | None = None, category: str | None = None) -> Scores:
    """Score images with a prompt pair: one encoder pass per image (none for features), ``batch_size`` at a time.

    Args:
        backbone: the frozen backbone.
        prompts: a PromptLearner (anything with ``text_features(category=None) -> (2, D)``) or a (2, D) tensor
            [normal, anomalous], e.g. :func:`human_prompt_features`. Re-normalised here.
        images: (B, 3, H, W) pixels in [0, 1]; resized to the backbone's input when H, W differ. Paths or PIL
            images also work (``backbone.load_images``). Or their :class:`ImageFeatures`, already encoded with
            this backbone and ``config.score.locality_radius`` (``apt_lab.features.FeatureStore``): then scoring
            costs no encoder pass, so a second prompt pair or method on the same images is nearly free.
        config: APTConfig (its ``score`` section is used) or ScoreConfig.
        memory: from :func:`build_memory`; used when given. ``config.score.memory`` True requires it.
        category: passed to ``prompts.text_features`` (per-category prompt pairs).

    Image score = (1 − w)·CLS probability + w·max(map), w = ``fuse_map_max``. With memory, the patch score is
    (1 − m)·probability + m·memory distance, m = ``memory_weight``, before up-sampling.
    """
    cfg = config_section(config, ScoreConfig)
    if memory is None and cfg.memory:
        raise ValueError("config.score.memory is True but no memory was given: pass "
                         "memory=apt_lab.build_memory(backbone, normal_shots, config), or set score.memory=False")
    if memory is not None and memory.locality_radius != cfg.locality_radius:
        raise ValueError(f"memory was built with locality_radius={memory.locality_radius}, config has "
                         f"{cfg.locality_radius}; rebuild it with build_memory(backbone, shots, config)")
    text = _text_features(prompts, category, backbone)  # (2, D)
    if isinstance(images, ImageFeatures):
        _check_features(images, backbone, cfg)
        count = images.cls.shape[0]

        def features(start: int) -> ImageFeatures:
            return images[start:start + cfg.batch_size].to(backbone.device)
    else:
        if not isinstance(images, torch.Tensor):
            images = backbone.load_images(images)  # (B, 3, S, S)
        if tuple(images.shape[-2:]) != (backbone.image_size,) * 2 or images.dim() != 4:
            check_pixels(images, "images")  # before resizing; at input size the encoder checks every batch itself
        count = images.shape[0]

        def features(start: int) -> ImageFeatures:
            return backbone.encode_batched(images[start:start + cfg.batch_size], cfg.batch_size, cfg.locality_radius)
    size = backbone.image_size
    image_scores, maps = [torch.zeros(0)], [torch.zeros(0, size, size)]  # an empty batch gives empty Scores
    for start in range(0, count, cfg.batch_size):
        feats = features(start)
        image_prob, patch_prob = anomaly_probabilities(feats, text, cfg.temperature)  # (b,), (L, b, N)
        if memory is not None:
            patch_prob = (1 - cfg.memory_weight) * patch_prob + cfg.memory_weight * memory_distances(feats, memory)
        pixel = anomaly_maps(patch_prob, feats.grid, size, cfg.blur_sigma)  # (b, S, S)
        fused = (1 - cfg.fuse_map_max) * image_prob + cfg.fuse_map_max * pixel.flatten(1).amax(1)  # (b,)
        image_scores.append(fused.float().cpu())
        maps.append(pixel.float().cpu())
    return Scores(torch.cat(image_scores), torch.cat(maps))


# ---------------------------------------------------------------------------------------------------- helpers
def _check_features(features: ImageFeatures, backbone: Backbone, cfg: ScoreConfig) -> None:
    """Features must come from this backbone's grid and width, with the configured locality radius."""
    if tuple(features.grid) != tuple(backbone.grid) or features.cls.shape[-1] != backbone.embed_dim:
        raise ValueError(f"features have grid {tuple(features.grid)} and D={features.cls.shape[-1]}, but "
                         f"{backbone.name} gives grid {backbone.grid} and D={backbone.embed_dim}; encode them with "
                         "this backbone")
    if features.locality_radius != cfg.locality_radius:
        raise ValueError(f"features were encoded with locality_radius={features.locality_radius}, config.score has "
                         f"{cfg.locality_radius}; encode them again with the config's radius")


def _text_features(prompts, category: str | None, backbone: Backbone) -> torch.Tensor:
    if hasattr(prompts, "text_features"):
        text = prompts.text_features(category=category)
    elif isinstance(prompts, torch.Tensor):
        text = prompts
    else:
        raise TypeError(f"prompts: expected a PromptLearner (with .text_features()) or a (2, D) tensor, got "
                        f"{type(prompts).__name__}")
    text = text.detach().float().to(backbone.device)
    if tuple(text.shape) != (2, backbone.embed_dim):
        raise ValueError(f"prompts: expected (2, {backbone.embed_dim}) text features [normal, anomalous] for "
                         f"{backbone.name}, got {tuple(text.shape)}")
    if not torch.isfinite(text).all():
        raise ValueError("prompts: text features contain NaN or infinite values (did tuning diverge?)")
    return F.normalize(text, dim=-1)
