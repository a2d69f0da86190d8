"""score: pure functions on hand-made features, score() on apt-tiny random weights, memory, human prompts."""
import math

import pytest
import torch
import torch.nn.functional as F

import apt_lab
from apt_lab.backbone import ImageFeatures
from apt_lab.config import APTConfig
from apt_lab.baselines import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, human_prompt_features, human_prompt_sentences
from apt_lab.scoring import (Scores, anomaly_maps, anomaly_probabilities, build_memory, gaussian_blur, gaussian_kernel,
                             memory_distances, patch_logits, score)


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def backbone():
    return apt_lab.load_backbone("apt-tiny", device="cpu")


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 224, 224, generator=rng(1))


@pytest.fixture(scope="module")
def text(backbone):
    return F.normalize(torch.randn(2, backbone.embed_dim, generator=rng(2)), dim=-1)


def config(**score_fields):
    return APTConfig().replace(**{f"score__{k}": v for k, v in score_fields.items()})


# ------------------------------------------------------------------------------------------ pure functions
def test_anomaly_probabilities_by_hand():
    g = rng()
    cls = F.normalize(torch.randn(2, 3, generator=g), dim=-1)  # 2 images, D = 3
    patches = F.normalize(torch.randn(2, 2, 4, 3, generator=g), dim=-1)  # 2 layers, 2 images, 4 patches
    text = F.normalize(torch.randn(2, 3, generator=g), dim=-1).requires_grad_()
    tau = 0.07
    image_prob, patch_prob = anomaly_probabilities(ImageFeatures(cls, patches, (2, 2)), text, tau)
    t, image_p, patch_p = text.detach(), image_prob.detach(), patch_prob.detach()
    for b in range(2):
        cn, ca = float(cls[b] @ t[0]), float(cls[b] @ t[1])
        assert math.isclose(float(image_p[b]), math.exp(ca / tau) / (math.exp(cn / tau) + math.exp(ca / tau)),
                            rel_tol=1e-5)
        for layer in range(2):
            for n in range(4):
                pn, pa = float(patches[layer, b, n] @ t[0]), float(patches[layer, b, n] @ t[1])
                assert math.isclose(float(patch_p[layer, b, n]), 1 / (1 + math.exp((pn - pa) / tau)), rel_tol=1e-5)
    cls_logits, logits = patch_logits(ImageFeatures(cls, patches, (2, 2)), text, tau)
    assert cls_logits.shape == (2, 2) and logits.shape == (2, 2, 4, 2)
    (image_prob.sum() + patch_prob.sum()).backward()
    assert text.grad is not None and text.grad.abs().sum() > 0  # differentiable w.r.t. the prompts


def test_anomaly_maps_is_torch_bilinear_without_blur():
    p = torch.rand(2, 3, 4, generator=rng())  # 2 layers, 3 images, 2x2 grid
    expected = F.interpolate(p.mean(0).reshape(3, 1, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(anomaly_maps(p, (2, 2), 4, blur_sigma=0), expected)


def test_maps_equal_interpolate_then_reflect_padded_convolution():
    p = torch.rand(1, 2, 49, generator=rng())  # 1 layer, 2 images, 7x7 grid
    sigma = 1.5
    kernel = gaussian_kernel(sigma)
    r = kernel.numel() // 2
    up = F.interpolate(p[0].reshape(2, 1, 7, 7), size=(28, 28), mode="bilinear", align_corners=False)
    x = F.pad(up, (r, r, r, r), mode="reflect")
    x = F.conv2d(F.conv2d(x, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))[:, 0]  # (2, 28, 28)
    assert torch.allclose(anomaly_maps(p, (7, 7), 28, sigma), x, atol=1e-6)
    assert torch.allclose(gaussian_blur(up[:, 0], sigma), x, atol=1e-6)


def test_blur_preserves_constant_map_and_smooths():
    assert torch.allclose(gaussian_blur(torch.full((2, 40, 40), 0.3), 4.0), torch.full((2, 40, 40), 0.3))
    assert torch.allclose(gaussian_blur(torch.full((1, 4, 4), 0.3), 2.0), torch.full((1, 4, 4), 0.3))  # replicate
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1
    blurred = gaussian_blur(spike, 2.0)
    assert math.isclose(float(blurred.sum()), 1.0, rel_tol=1e-5) and blurred.max() < 0.05
    assert torch.allclose(blurred[0], blurred[0].T, atol=1e-7)  # isotropic


# --------------------------------------------------------------------------------------------------- score
def test_score_shapes_and_swapped_pair(backbone, images, text):
    out = score(backbone, text, images, config(fuse_map_max=0.0))
    assert isinstance(out, Scores)
    assert out.image_scores.shape == (3,) and out.anomaly_maps.shape == (3, 224, 224)
    assert out.image_scores.dtype == torch.float32 and out.anomaly_maps.device.type == "cpu"
    swapped = score(backbone, text.flip(0), images, config(fuse_map_max=0.0))
    assert torch.allclose(swapped.image_scores, 1 - out.image_scores, atol=1e-6)
    assert torch.allclose(swapped.anomaly_maps, 1 - out.anomaly_maps, atol=1e-5)


def test_score_accepts_prompt_learner_and_other_sizes(backbone, images, text):
    class Learner:
        def text_features(self, category=None):
            return text * 3  # score re-normalises

    a = score(backbone, Learner(), images, config())
    b = score(backbone, text, images, config())
    assert torch.allclose(a.image_scores, b.image_scores, atol=1e-6)
    small = score(backbone, text, torch.rand(1, 3, 100, 120, generator=rng()), config())
    assert small.anomaly_maps.shape == (1, 224, 224)
    empty = score(backbone, text, torch.rand(0, 3, 224, 224), config())
    assert empty.image_scores.shape == (0,) and empty.anomaly_maps.shape == (0, 224, 224)


def test_fuse_map_max(backbone, images, text):
    plain = score(backbone, text, images, config(fuse_map_max=0.0))
    fused = score(backbone, text, images, config(fuse_map_max=0.5))
    expected = 0.5 * plain.image_scores + 0.5 * plain.anomaly_maps.flatten(1).amax(1)
    assert torch.allclose(fused.image_scores, expected, atol=1e-6)


def test_batch_size_does_not_change_scores(backbone, images, text):
    one = score(backbone, text, images, config(batch_size=1))
    many = score(backbone, text, images, config(batch_size=16))
    assert torch.allclose(one.image_scores, many.image_scores, atol=1e-6)
    assert torch.allclose(one.anomaly_maps, many.anomaly_maps, atol=1e-6)


def test_locality_radius_changes_maps(backbone, images, text):
    plain = score(backbone, text, images[:1], config(locality_radius=0))
    local = score(backbone, text, images[:1], config(locality_radius=1))
    assert not torch.allclose(plain.anomaly_maps, local.anomaly_maps, atol=1e-4)


# --------------------------------------------------------------------------------------------------- memory
def test_memory_distance_is_zero_for_the_shot_itself(backbone, images, text):
    shots = images[:2]
    memory = build_memory(backbone, shots, config())
    assert memory.patches.shape == (len(backbone.layers), 2 * 196, backbone.embed_dim)
    feats = backbone.encode_images(shots)
    assert memory_distances(feats, memory).abs().max() < 1e-6
    out = score(backbone, text, shots, config(memory=True, memory_weight=1.0, blur_sigma=0.0), memory=memory)
    assert out.anomaly_maps.abs().max() < 1e-6
    other = score(backbone, text, images[2:], config(memory=True, memory_weight=1.0, blur_sigma=0.0), memory=memory)
    assert other.anomaly_maps.max() > 1e-3


def test_memory_on_without_memory_is_a_clear_error(backbone, images, text):
    with pytest.raises(ValueError, match=r"pass memory=apt_lab.build_memory"):
        score(backbone, text, images, config(memory=True))


# -------------------------------------------------------------------------------------------- human prompts
def test_human_prompt_features(backbone):
    normal, anomalous = human_prompt_sentences("bottle")
    assert (len(NORMAL_STATES), len(ANOMALOUS_STATES), len(TEMPLATES)) == (7, 4, 22)
    assert len(normal) == 7 * 22 and len(anomalous) == 4 * 22 and len(set(normal + anomalous)) == 11 * 22
    assert "a photo of a flawless bottle for anomaly detection." in normal
    assert "a close-up photo of a bottle with defect." in anomalous
    pair = human_prompt_features(backbone, "bottle")
    assert pair.shape == (2, backbone.embed_dim)
    assert torch.allclose(pair.norm(dim=-1), torch.ones(2), atol=1e-5)
    emb = backbone.encode_texts(anomalous)
    assert torch.allclose(pair[1], F.normalize(emb.mean(0), dim=-1), atol=1e-5)


# --------------------------------------------------------------------------------------------------- errors
def test_errors(backbone, images, text):
    with pytest.raises(ValueError, match="expected 3 colour channels, got 4"):
        score(backbone, text, torch.rand(1, 4, 224, 224), config())
    bad = images[:1].clone()
    bad[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        score(backbone, text, bad, config())
    with pytest.raises(ValueError, match=r"expected \(2, 128\) text features"):
        score(backbone, torch.randn(3, 128), images, config())
    with pytest.raises(ValueError, match="NaN or infinite"):
        score(backbone, torch.full((2, 128), float("nan")), images, config())
