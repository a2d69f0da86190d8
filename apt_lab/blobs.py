"""Random blob shapes for synthetic anomalies: thresholded Perlin noise, ellipses, and a never-empty fallback.

Blobs are drawn a batch at a time on the device of the data (:func:`draw_blobs`): the random shape parameters —
a few dozen numbers per blob and try, all tries drawn up front — come from an explicit ``torch.Generator``, so the
same seed gives the same blobs; the pixel work (fields, the connected piece around the centre, areas) runs as
batched tensor operations, with one host synchronisation per round of redraws, never one per image. Areas are
fractions of the image area, as in :class:`apt_lab.config.PerturbConfig` (``min_area``, ``max_area``).

Example:
    >>> import torch
    >>> blob = random_blob((64, 64), torch.Generator().manual_seed(0), kind="ellipse", min_area=0.05, max_area=0.1)
    >>> blob.dtype, 0.05 * 64 * 64 <= int(blob.sum()) <= 0.1 * 64 * 64
    (torch.bool, True)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import BLOB_SHAPES as BLOB_KINDS  # the shapes config.perturb.blob allows, listed there

MAX_TRIES = 8  # draws per blob before falling back to a disc of exactly the minimum area
LATTICE = 8  # Perlin lattice corners per axis drawn for every blob (2–7 cells use up to 8)
_CHECK_EVERY = 16  # flood steps between two convergence checks (each check is one host synchronisation)


def perlin_noise(size: tuple[int, int], cells: tuple[int, int], rng: torch.Generator) -> torch.Tensor:
    """2-D gradient (Perlin) noise with ``cells`` lattice cells along (height, width); values roughly in [-0.7, 0.7].

    Example:
        >>> n = perlin_noise((32, 48), (2, 3), torch.Generator().manual_seed(0))
        >>> n.shape, bool(n.abs().max() < 1)
        (torch.Size([32, 48]), True)
    """
    (gh, gw) = cells
    angles = torch.rand(gh + 1, gw + 1, generator=rng, device=rng.device).cpu() * 2 * math.pi
    return _perlin_fields(size, torch.tensor([[gh, gw]]), angles[None])[0]


def _perlin_fields(size: tuple[int, int], cells: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(n, 2) lattice cells and (n, R, C) gradient angles at the lattice corners (R > cells_h, C > cells_w) →
    (n, H, W) Perlin noise, on the device of ``angles``."""
    (height, width), device = size, angles.device
    n, _, corners = angles.shape
    cells = cells.to(device)
    grads = torch.stack([angles.cos(), angles.sin()], dim=-1).reshape(n, -1, 2)  # (n, R*C, 2) unit gradients
    y = (torch.arange(height, device=device) + 0.5) / height * cells[:, :1]  # (n, H) position in lattice units
    x = (torch.arange(width, device=device) + 0.5) / width * cells[:, 1:]  # (n, W)
    iy = torch.minimum(y.floor().long(), cells[:, :1] - 1)
    ix = torch.minimum(x.floor().long(), cells[:, 1:] - 1)
    fy, fx = (y - iy)[:, :, None], (x - ix)[:, None, :]  # (n, H, 1), (n, 1, W) offset inside the cell

    def corner(dy: int, dx: int) -> torch.Tensor:  # (n, H, W) dot(gradient at corner, offset from corner)
        index = ((iy + dy)[:, :, None] * corners + (ix + dx)[:, None, :]).reshape(n, -1)  # (n, H*W)
        g = torch.gather(grads, 1, index[..., None].expand(-1, -1, 2)).reshape(n, height, width, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731 — Perlin's smoothstep 6t⁵ − 15t⁴ + 10t³
    wy, wx = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx  # (n, H, W)
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
    centers = torch.tensor([center], device=allowed.device)
    return nearest_pixels_batch(allowed[None], centers, torch.tensor([count], device=allowed.device))[0]


def nearest_pixels_batch(allowed: torch.Tensor, centers: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(n, H, W) bool allowed pixels, (n, 2) centres, (n,) counts → (n, H, W) bool: per image the ``count`` allowed
    pixels nearest to its centre (all of them when fewer), ties in raster order; no host synchronisation."""
    n, height, width = allowed.shape
    device = allowed.device
    rows = torch.arange(height, device=device)[None, :, None] - centers[:, 0, None, None].to(device)
    cols = torch.arange(width, device=device)[None, None, :] - centers[:, 1, None, None].to(device)
    index = torch.arange(height * width, device=device)
    key = (rows**2 + cols**2).reshape(n, -1) * (height * width) + index  # (n, H*W) distinct: distance, then raster
    key = key.masked_fill(~allowed.reshape(n, -1), torch.iinfo(torch.long).max)
    ordered = key.sort(dim=1).values  # (n, H*W)
    available = allowed.reshape(n, -1).sum(1)  # (n,)
    take = torch.minimum(counts.to(device).long(), available).clamp(min=1)
    last = ordered.gather(1, (take - 1)[:, None])  # (n, 1) largest key kept
    return ((key <= last) & allowed.reshape(n, -1)).reshape(n, height, width)


def random_blob(size: tuple[int, int], rng: torch.Generator, kind: str = "mixed", min_area: float = 0.01,
                max_area: float = 0.12, center: tuple[int, int] | None = None) -> torch.Tensor:
    """One random connected anomaly shape, (H, W) bool on the CPU, never empty, area within [min_area, max_area].

    One image of :func:`draw_blobs` (which documents the shapes); ``center`` (row, col) is a pixel the blob must
    contain, None = a uniformly drawn pixel.
    """
    centers = None if center is None else torch.tensor([center])
    return draw_blobs(1, size, rng, kind, min_area, max_area, centers=centers, device="cpu")[0]


def draw_blobs(count: int, size: tuple[int, int], rng: torch.Generator, kind: str = "mixed", min_area: float = 0.01,
               max_area: float = 0.12, centers: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """``count`` random connected anomaly shapes, (count, H, W) bool on ``device``, never empty, areas within
    [min_area, max_area] of the image.

    Args:
        count: how many blobs.
        size: (H, W) in pixels.
        rng: every random draw comes from it (same seed → same blobs on the same device type).
        kind: ``"perlin"`` — the 4-connected piece around the centre of thresholded Perlin noise (random lattice
            of 2–7 cells per axis, plus a Gaussian bump at the centre so the piece is where we want it), the
            threshold set so the piece's area is as close as possible to a random target area; ``"ellipse"`` —
            random axes (aspect 0.25–1), rotation and centre; ``"mixed"`` — one of the two, drawn per try.
        min_area, max_area: fractions of H*W.
        centers: (count, 2) long (row, col) each blob must contain; None = uniformly drawn pixels.
        device: where the pixel work runs and the blobs live; None = the generator's device.

    A draw whose area falls outside the range (an ellipse clipped by the border, a Perlin piece whose area jumps
    past the range where two pieces merge) is redrawn, up to ``MAX_TRIES`` draws (every try's parameters are
    drawn at once, so the random stream consumed does not depend on the data); then the blob is the disc of
    exactly the minimum pixel count around the centre (the image centre when ``centers`` is None).
    """
    if kind not in BLOB_KINDS:
        raise ValueError(f"unknown blob kind {kind!r}; choose one of {BLOB_KINDS} (config.perturb.blob)")
    low, high = area_bounds(size, min_area, max_area)
    device = torch.device(device) if device is not None else rng.device
    height, width = size
    params = torch.rand(count, MAX_TRIES, 8 + LATTICE * LATTICE, generator=rng, device=rng.device)  # (B, T, P)
    host = params[..., :1].cpu()  # (B, T, 1) the kind draws: which shape, decided on the host
    params = params.to(device)
    perlin = (host[..., 0] < 0.5) if kind == "mixed" else torch.full(host.shape[:2], kind == "perlin")  # (B, T)
    if centers is not None:
        centers = centers.to(device).long()
    blobs = torch.zeros(count, height, width, dtype=torch.bool, device=device)
    pending = list(range(count))
    for attempt in range(MAX_TRIES):
        p = params[pending, attempt]  # (n, P)
        target = low + p[:, 1] * (high - low)  # (n,) pixels
        if centers is not None:
            c = centers[pending]  # (n, 2)
        else:
            c = torch.stack([(p[:, 2] * height).long().clamp(max=height - 1),
                             (p[:, 3] * width).long().clamp(max=width - 1)], dim=1)
        shape = torch.zeros(len(pending), height, width, dtype=torch.bool, device=device)
        chosen = perlin[pending, attempt]
        for is_perlin, make in ((True, _perlin_blobs), (False, _ellipses)):
            rows = (chosen == is_perlin).nonzero().flatten().tolist()  # a host tensor: no synchronisation
            if rows:
                shape[rows] = make(size, p[rows], target[rows], c[rows])
        area = shape.flatten(1).sum(1)  # (n,)
        valid = (area >= low) & (area <= high)
        rows = torch.tensor(pending, device=device)
        blobs[rows] = torch.where(valid[:, None, None], shape, blobs[rows])
        pending = [i for i, ok in zip(pending, valid.tolist()) if not ok]  # one synchronisation per round
        if not pending:
            return blobs
    rows = torch.tensor(pending, device=device)
    c = centers[rows] if centers is not None else torch.tensor([[height // 2, width // 2]], device=device)
    everywhere = torch.ones(len(pending), height, width, dtype=torch.bool, device=device)
    blobs[rows] = nearest_pixels_batch(everywhere, c.expand(len(pending), 2), torch.full((len(pending),), low))
    return blobs


# --------------------------------------------------------------------------------------------------- shapes
def _grid(size, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(size[0], device=device, dtype=torch.float32)[None, :, None]  # (1, H, 1)
    cols = torch.arange(size[1], device=device, dtype=torch.float32)[None, None, :]  # (1, 1, W)
    return rows, cols


def _ellipses(size, p: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, P) parameters, (n,) target areas, (n, 2) centres → (n, H, W) filled ellipses of that area (unclipped)."""
    ratio = 0.25 + 0.75 * p[:, 4]  # minor / major axis
    major = torch.sqrt(target / (math.pi * ratio))
    minor, angle = major * ratio, p[:, 5] * math.pi
    rows, cols = _grid(size, p.device)
    dy, dx = rows - c[:, 0, None, None], cols - c[:, 1, None, None]  # (n, H, W)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u, v = dy * cos + dx * sin, -dy * sin + dx * cos
    return (u / major[:, None, None]) ** 2 + (v / minor[:, None, None]) ** 2 <= 1


def _perlin_blobs(size, p: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, P) parameters, (n,) target areas, (n, 2) centres → (n, H, W): the piece of Perlin noise + a bump around
    the centre whose area is closest to the target, found without a threshold search.

    The piece at threshold t (the 4-connected component of {field >= t} holding the centre) is {b >= t}, where
    b(x) is the best, over paths from the centre to x, of the lowest field value on the path (:func:`_bottleneck`);
    the two candidate pieces are {b >= t} and {b > t} with t the target-th largest b.
    """
    n, (height, width), device = p.shape[0], size, p.device
    cells = 2 + (p[:, 6:8] * 6).long().clamp(max=5)  # (n, 2) 2–7 lattice cells per axis
    angles = p[:, 8:].reshape(n, LATTICE, LATTICE) * 2 * math.pi
    rows, cols = _grid(size, device)
    radius = torch.sqrt(target / math.pi)[:, None, None]
    bump = torch.exp(-((rows - c[:, 0, None, None]) ** 2 + (cols - c[:, 1, None, None]) ** 2) / (2 * radius**2))
    field = _perlin_fields(size, cells, angles) + bump  # (n, H, W), the largest values near the centre
    rank = target.ceil().long().clamp(1, height * width)[:, None]  # (n, 1)
    best = _bottleneck(field, c, target)  # (n, H, W)
    threshold = best.reshape(n, -1).topk(int(rank.max()), dim=1).values.gather(1, rank - 1)[:, :, None]  # (n, 1, 1)
    large, small = best >= threshold, best > threshold  # (n, H, W)
    gap_large = (large.flatten(1).sum(1) - target).abs()
    gap_small = (small.flatten(1).sum(1) - target).abs()
    return torch.where((gap_small <= gap_large)[:, None, None], small, large)


def _bottleneck(field: torch.Tensor, centres: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, H, W) field, (n, 2) centres, (n,) target areas → (n, H, W) b, where b(x) is the best over 4-connected
    paths from the centre of the lowest field value on the path — exact where :func:`_perlin_blobs` reads it.

    Coarse to fine: b on a 2x2-min-pooled field is a lower bound of b on the finer field (a path through pooled
    cells runs through their pixels, none below the cell's minimum), so each level starts from the coarser
    answer and floods only the rest (:func:`_flood`).
    """
    fields = [field]
    while min(fields[-1].shape[-2:]) > 48:
        fields.append(-F.max_pool2d(-fields[-1][:, None], 2, ceil_mode=True)[:, 0])  # (n, ⌈H/2⌉, ⌈W/2⌉) minima
    best = None
    for level in range(len(fields) - 1, -1, -1):
        f = fields[level]
        n, height, width = f.shape
        start = torch.full_like(f, -math.inf) if best is None else \
            torch.minimum(best.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :height, :width], f)
        centre = ((centres[:, 0] >> level) * width + (centres[:, 1] >> level))[:, None]  # (n, 1) flat index
        start = start.reshape(n, -1).scatter(1, centre, f.reshape(n, -1).gather(1, centre)).reshape(n, height, width)
        best = _flood(f, start, target / 4**level)  # the piece's area at this level
    return best


def _flood(field: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Iterate b ← min(field, max of b over each pixel and its 4 neighbours) from ``start`` (a lower bound of b)
    until what :func:`_perlin_blobs` reads is final.

    With t the target-th largest b: when one more step changes nothing strictly above t, nothing ever will (a
    pixel can only climb above t through a neighbour already above it), so t and the small piece {b > t} are
    final. The large piece {b >= t} only grows; flooding stops once it is complete, or once it already holds so
    many pixels that the small piece is certainly closer to the target.
    """
    n, height, width = field.shape
    padded = torch.full((n, height + 2, width + 2), -math.inf, device=field.device)  # a -inf border
    inner = padded[:, 1:-1, 1:-1]
    inner.copy_(start)
    rank = target.ceil().long().clamp(1, height * width)[:, None]  # (n, 1)
    top_k = int(rank.max())

    def step() -> torch.Tensor:
        reach = torch.maximum(torch.maximum(padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]),
                              torch.maximum(padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]))
        torch.maximum(reach, inner, out=reach)
        return torch.minimum(reach, field, out=reach)

    while True:
        for _ in range(_CHECK_EVERY):
            inner.copy_(step())
        after = step()
        threshold = inner.reshape(n, -1).topk(top_k, dim=1).values.gather(1, rank - 1)[:, :, None]  # (n, 1, 1)
        above, above_after = inner > threshold, after > threshold
        small_final = (above == above_after).flatten(1).all(1) & \
            (torch.where(above, inner, 0.0) == torch.where(above, after, 0.0)).flatten(1).all(1)  # (n,)
        large, large_after = inner >= threshold, after >= threshold
        large_final = (large == large_after).flatten(1).all(1)
        small_wins = large_after.flatten(1).sum(1) - target >= target - above.flatten(1).sum(1)
        inner.copy_(after)
        if bool((small_final & (large_final | small_wins)).all()):  # one synchronisation per check
            return inner.clone()
