"""The perturbation pool drawn in batches on the data's device: exact connected pieces without a threshold search,
no host synchronisation per image, same seed → same pool; on CUDA (when present) everything stays on the GPU."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from apt_lab.blobs import _bottleneck, area_bounds, draw_blobs, nearest_pixels, nearest_pixels_batch
from apt_lab.config import PerturbConfig
from apt_lab.perturbations import generator_on, perturb

FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


def component(mask: np.ndarray, centre) -> np.ndarray:
    labels, _ = ndimage.label(mask, structure=FOUR)
    return labels == labels[centre] if mask[centre] else np.zeros_like(mask)


def test_flood_gives_the_exact_connected_piece_at_the_target_rank():
    g = torch.Generator().manual_seed(0)
    field = torch.from_numpy(ndimage.gaussian_filter(torch.randn(4, 96, 80, generator=g).numpy(), (0, 4, 4)))
    centres = torch.tensor([[10, 10], [50, 40], [95, 0], [0, 79]])
    target = torch.tensor([30.0, 400.0, 900.0, 250.0])
    best = _bottleneck(field.float(), centres, target)
    for i in range(4):
        rank = int(math.ceil(target[i]))
        t = float(best[i].flatten().topk(rank).values[-1])
        c = tuple(centres[i].tolist())
        small = component(field[i].float().numpy() > t, c)  # the piece strictly above t
        assert np.array_equal(best[i].numpy() > t, small), i
        assert small.sum() < rank <= (best[i] >= t).sum()


@pytest.mark.parametrize("kind", ["perlin", "ellipse", "mixed"])
def test_batched_blobs_are_connected_within_bounds_and_hold_their_centres(kind):
    size, low_high = (72, 64), (0.02, 0.1)
    low, high = area_bounds(size, *low_high)
    centres = torch.tensor([[5, 5], [36, 32], [71, 63], [0, 40], [20, 60], [60, 2]])
    blobs = draw_blobs(6, size, torch.Generator().manual_seed(2), kind, *low_high, centers=centres)
    assert blobs.shape == (6, *size) and blobs.dtype == torch.bool
    for blob, c in zip(blobs.numpy(), centres.tolist()):
        assert low <= blob.sum() <= high and blob[tuple(c)]
        assert ndimage.label(blob, structure=np.ones((3, 3)))[1] == 1  # one piece (8-connected)
    again = draw_blobs(6, size, torch.Generator().manual_seed(2), kind, *low_high, centers=centres)
    assert torch.equal(blobs, again)


def test_nearest_pixels_batch_is_the_clipped_disc_in_raster_order():
    allowed = torch.ones(2, 3, 3, dtype=torch.bool)
    allowed[1, 1, 2] = False
    out = nearest_pixels_batch(allowed, torch.tensor([[1, 1], [1, 1]]), torch.tensor([5, 5]))
    assert out[0].int().tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert out[1].int().tolist() == [[1, 1, 0], [1, 1, 0], [0, 1, 0]]  # (1, 2) not allowed: next in raster order
    assert nearest_pixels(allowed[0], (0, 0), 100).all()  # more than there are: all of them


class SyncCounter:
    """Counts the calls that move a tensor's value to Python (a host synchronisation on a GPU)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.calls += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_host_synchronisations_do_not_grow_with_the_batch(monkeypatch):
    roi = torch.zeros(48, 64, 64, dtype=torch.bool)
    roi[:, 8:56, 12:40] = True
    cfg = PerturbConfig(min_area=0.02, max_area=0.1)
    images = torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    counter = SyncCounter(monkeypatch)
    counts = {}
    for batch in (4, 48):
        counter.calls = 0
        perturb(images[:batch], cfg, torch.Generator().manual_seed(1), roi=roi[:batch], patch_size=16)
        counts[batch] = counter.calls
    assert counts[48] < 48 and counts[48] <= counts[4] + 20, counts  # per round of redraws, never per image


def test_same_seed_same_pool_and_rng_left_in_a_known_state():
    images = torch.rand(8, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    cfg = PerturbConfig(region="image", min_area=0.02, max_area=0.1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = perturb(images, cfg, g1, patch_size=16), perturb(images, cfg, g2, patch_size=16)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and a.generators == b.generators
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert generator_on("cpu", g1) is g1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by scripts/gpu_check.py)")
def test_pool_on_cuda_stays_on_the_gpu_and_repeats_with_the_seed():
    images = torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()
    cfg = PerturbConfig(region="image")
    a = perturb(images, cfg, torch.Generator().manual_seed(3), patch_size=16)
    b = perturb(images, cfg, torch.Generator().manual_seed(3), patch_size=16)
    assert a.images.is_cuda and a.masks.is_cuda and a.patch_masks.is_cuda
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    changed = (a.images - images).abs().amax(1) > 0
    assert not (changed & ~a.masks).any()
