"""Random blob shapes for synthetic anomalies: thresholded Perlin noise, ellipses, and a never-empty fallback.

Every draw comes from an explicit ``torch.Generator``, so the same seed gives the same blob. Areas are fractions
of the image area, as in :class:`apt_lab.config.PerturbConfig` (``min_area``, ``max_area``).

Example:
    >>> import torch
    >>> blob = random_blob((64, 64), torch.Generator().manual_seed(0), kind="ellipse", min_area=0.05, max_area=0.1)
    >>> blob.dtype, 0.05 * 64 * 64 <= int(blob.sum()) <= 0.1 * 64 * 64
    (torch.bool, True)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

BLOB_KINDS = ("perlin", "ellipse", "mixed")
MAX_TRIES = 8  # fresh draws before falling back to a disc of exactly the minimum area
_BISECTION_STEPS = 16  # threshold search steps for a Perlin blob (area resolution ~ 2⁻¹⁶ of the value range)


def perlin_noise(size: tuple[int, int], cells: tuple[int, int], rng: torch.Generator) -> torch.Tensor:
    """2-D gradient (Perlin) noise with ``cells`` lattice cells along (height, width); values roughly in [-0.7, 0.7].

    Example:
        >>> n = perlin_noise((32, 48), (2, 3), torch.Generator().manual_seed(0))
        >>> n.shape, bool(n.abs().max() < 1)
        (torch.Size([32, 48]), True)
    """
    (height, width), (gh, gw) = size, cells
    angles = torch.rand(gh + 1, gw + 1, generator=rng, device=rng.device).cpu() * 2 * math.pi
    grads = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (gh+1, gw+1, 2) unit gradients at lattice corners
    y = (torch.arange(height) + 0.5) / height * gh  # (H,) position in lattice units
    x = (torch.arange(width) + 0.5) / width * gw  # (W,)
    iy, ix = y.floor().long().clamp(max=gh - 1), x.floor().long().clamp(max=gw - 1)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]  # (H, 1), (1, W) offset inside the cell

    def corner(dy: int, dx: int) -> torch.Tensor:  # (H, W) dot(gradient at corner, offset from corner)
        g = grads[iy[:, None] + dy, ix[None, :] + dx]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731 — Perlin's smoothstep 6t⁵ − 15t⁴ + 10t³
    wy, wx = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx  # (H, W)
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return top * (1 - wy) + bottom * wy


def area_bounds(size: tuple[int, int], min_area: float, max_area: float) -> tuple[int, int]:
    """Fractions of the image → (smallest, largest) pixel counts, at least 1 pixel.

    Example:
        >>> area_bounds((10, 10), 0.05, 0.2)
        (5, 20)
    """
    if not 0 < min_area <= max_area <= 1:
        raise ValueError(f"blob areas must satisfy 0 < min_area <= max_area <= 1 (fractions of the image), got "
                         f"min_area={min_area}, max_area={max_area}")
    n = size[0] * size[1]
    low = max(1, math.ceil(min_area * n - 1e-9))
    return low, max(low, math.floor(max_area * n + 1e-9))


def nearest_pixels(allowed: torch.Tensor, center: tuple[int, int], count: int) -> torch.Tensor:
    """The ``count`` pixels of ``allowed`` (H, W) bool closest to ``center`` (a disc clipped to ``allowed``).

    Fewer when ``allowed`` has fewer pixels. Ties break in raster order, so the result is deterministic.

    Example:
        >>> nearest_pixels(torch.ones(3, 3, dtype=torch.bool), (1, 1), 5).int().tolist()
        [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    """
    height, width = allowed.shape
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    dist = ((rows - center[0]) ** 2 + (cols - center[1]) ** 2).flatten().double()  # (H*W,)
    dist[~allowed.cpu().flatten()] = math.inf
    keep = torch.argsort(dist, stable=True)[: min(count, int(allowed.sum()))]
    out = torch.zeros(height * width, dtype=torch.bool)
    out[keep] = True
    return out.view(height, width)


def random_blob(size: tuple[int, int], rng: torch.Generator, kind: str = "mixed", min_area: float = 0.01,
                max_area: float = 0.12, center: tuple[int, int] | None = None) -> torch.Tensor:
    """One random connected anomaly shape, (H, W) bool on the CPU, never empty, area within [min_area, max_area].

    Args:
        size: (H, W) in pixels.
        rng: every random draw comes from it.
        kind: ``"perlin"`` — the connected piece around a centre of thresholded Perlin noise (random lattice scale
            of 2–7 cells, plus a Gaussian bump at the centre so the piece is where we want it), threshold chosen
            by bisection for a random target area; ``"ellipse"`` — random axes (aspect 0.25–1), rotation and
            centre; ``"mixed"`` — one of the two, drawn with equal probability on every try.
        min_area, max_area: fractions of H*W.
        center: (row, col) the blob must contain; None = a uniformly drawn pixel.

    A draw whose area falls outside the range (an ellipse clipped by the border, a Perlin piece whose area jumps
    past the range when two pieces merge) is redrawn up to ``MAX_TRIES`` times; then the result is the disc of
    exactly the minimum pixel count around the centre.
    """
    if kind not in BLOB_KINDS:
        raise ValueError(f"unknown blob kind {kind!r}; choose one of {BLOB_KINDS} (config.perturb.blob)")
    low, high = area_bounds(size, min_area, max_area)
    height, width = size
    for _ in range(MAX_TRIES):
        shape = kind if kind != "mixed" else BLOB_KINDS[_randint(2, rng)]
        target = low + float(_rand(rng)) * (high - low)  # pixels
        c = center if center is not None else (_randint(height, rng), _randint(width, rng))
        blob = _perlin_blob(size, rng, target, c) if shape == "perlin" else _ellipse(size, rng, target, c)
        if low <= int(blob.sum()) <= high:
            return blob
    c = center if center is not None else (height // 2, width // 2)
    return nearest_pixels(torch.ones(size, dtype=torch.bool), c, low)


# --------------------------------------------------------------------------------------------------- shapes
def _ellipse(size, rng, target: float, c) -> torch.Tensor:
    ratio = 0.25 + 0.75 * float(_rand(rng))  # minor / major axis
    major = math.sqrt(target / (math.pi * ratio))
    minor, angle = major * ratio, float(_rand(rng)) * math.pi
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    dy, dx = (rows - c[0]).double(), (cols - c[1]).double()  # (H, W)
    u = dy * math.cos(angle) + dx * math.sin(angle)
    v = -dy * math.sin(angle) + dx * math.cos(angle)
    return (u / major) ** 2 + (v / minor) ** 2 <= 1


def _perlin_blob(size, rng, target: float, c) -> torch.Tensor:
    cells = (2 + _randint(6, rng), 2 + _randint(6, rng))
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    radius = math.sqrt(target / math.pi)
    bump = torch.exp(-((rows - c[0]) ** 2 + (cols - c[1]) ** 2) / (2 * radius**2))  # (H, W), 1 at the centre
    field = (perlin_noise(size, cells, rng) + bump).numpy()  # (H, W)

    def piece(threshold: float) -> np.ndarray:  # the connected piece of {field >= threshold} holding the centre
        labels, _ = ndimage.label(field >= threshold)
        return labels == labels[c[0], c[1]]

    low, high = float(field.min()), float(field[c[0], c[1]])  # piece(low) = whole image, piece(high) ∋ centre
    for _ in range(_BISECTION_STEPS):  # the piece shrinks as the threshold rises
        mid = (low + high) / 2
        if piece(mid).sum() > target:
            low = mid
        else:
            high = mid
    small, large = piece(high), piece(low)
    best = small if abs(small.sum() - target) <= abs(large.sum() - target) else large
    return torch.from_numpy(best)


def _rand(rng: torch.Generator) -> torch.Tensor:
    return torch.rand((), generator=rng, device=rng.device)


def _randint(n: int, rng: torch.Generator) -> int:
    return int(torch.randint(n, (), generator=rng, device=rng.device))
