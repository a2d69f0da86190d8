"""SMGS: the gradient rule with hand-made numbers, apply_smgs, meta losses, the self-optimising meta-prompt."""
import math

import pytest
import torch

from apt_lab.backbone import ImageFeatures
from apt_lab.config import SMGSConfig
from apt_lab.smgs import (MetaPrompt, anchor_similarity, apply_smgs, cosine_distance, gradients_conflict,
                          guide_gradient, guide_update, kl_divergence, meta_loss, project_to_cone)

T = torch.tensor


# ------------------------------------------------------------------------------------- guide_gradient
def test_conflicting_pair_projects_by_hand():
    # ĝ = (−1, 1)/√2, ⟨g, ĝ⟩ = −1/√2 → g − λ⟨g, ĝ⟩ĝ = (1, 0) − λ·(1/2, −1/2)
    assert torch.allclose(guide_gradient(T([1., 0.]), T([-1., 1.]), 1.0), T([0.5, 0.5]))
    assert torch.allclose(guide_gradient(T([1., 0.]), T([-1., 1.]), 0.5), T([0.75, 0.25]))
    assert torch.allclose(guide_gradient(T([1., 0.]), T([-1., 1.]), 2.0), T([0.0, 1.0]), atol=1e-6)
    # g_meta = (−3, 0): opposite, λ = 1 removes all of it
    assert torch.allclose(guide_gradient(T([2., 1.]), T([-3., 0.]), 1.0), T([0., 1.]))


def test_orthogonal_and_agreeing_pairs_unchanged():
    g = T([1., 0.])
    assert torch.equal(guide_gradient(g, T([0., 2.]), 1.0), g)
    assert torch.equal(guide_gradient(g, T([1., 1.]), 1.0), g)
    assert not gradients_conflict(g, T([0., 2.]))
    assert not gradients_conflict(g, T([1., 1.]))
    assert gradients_conflict(g, T([-1., 1.]))


def test_lambda_zero_and_zero_meta_return_task_gradient_exactly():
    g = T([1., 0.])
    assert guide_gradient(g, T([-1., 1.]), 0.0) is g
    assert guide_gradient(g, T([0., 0.]), 1.0) is g


def test_any_shape_flattened_and_result_orthogonal_to_meta():
    gen = torch.Generator().manual_seed(0)
    g_task = torch.randn(2, 3, 5, generator=gen)
    g_meta = -g_task + 0.3 * torch.randn(2, 3, 5, generator=gen)  # clearly conflicting
    assert gradients_conflict(g_task, g_meta)
    g = guide_gradient(g_task, g_meta, 1.0)
    assert g.shape == g_task.shape
    assert abs(float((g * g_meta).sum())) < 1e-4
    with pytest.raises(ValueError, match="same shape"):
        guide_gradient(g_task, g_meta.flatten(), 1.0)


def test_apply_smgs_per_tensor_rule_by_hand():
    a = torch.zeros(2, requires_grad=True)  # task grad (1, 0), meta grad (−1, 1): conflict → (0.5, 0.5)
    b = torch.zeros(2, requires_grad=True)  # task grad (0, 2), meta grad (0, 1): agree → unchanged
    unused = torch.zeros(2, requires_grad=True)
    task = (a * T([1., 0.])).sum() + (b * T([0., 2.])).sum()
    meta = (a * T([-1., 1.])).sum() + (b * T([0., 1.])).sum()
    stats = apply_smgs([a, b, unused], task, meta, lam=1.0)
    assert torch.allclose(a.grad, T([0.5, 0.5]))
    assert torch.allclose(b.grad, T([0., 2.]))
    assert unused.grad is None
    assert {k: stats[k] for k in ("conflict_rate", "conflicts", "tensors")} == \
        {"conflict_rate": 0.5, "conflicts": 1, "tensors": 2}
    assert torch.equal(stats["meta_grads"][0], T([-1., 1.])) and stats["meta_grads"][2] is None


def test_apply_smgs_overwrites_grad():
    a = torch.zeros(2, requires_grad=True)
    a.grad = T([100., 100.])
    apply_smgs([a], (a * T([1., 0.])).sum(), (a * T([1., 1.])).sum(), lam=1.0)
    assert torch.equal(a.grad, T([1., 0.]))


# ------------------------------------------------------------------------------------------ the anchor
def test_project_to_cone_by_hand():
    g = T([1., 1., 1.])
    # one conflict: ProGrad's rule; two: the projection onto both hyperplanes; none: g itself
    assert torch.allclose(project_to_cone(g, [T([-1., 0., 0.])]), T([0., 1., 1.]))
    assert torch.allclose(project_to_cone(g, [T([-1., 0., 0.]), T([0., -1., 0.])]), T([0., 0., 1.]))
    assert torch.equal(project_to_cone(g, [T([1., 0., 0.]), T([0., 0., 0.])]), g)
    # the nearest point: projecting on the first plane alone already satisfies the second (no second cut)
    assert torch.allclose(project_to_cone(T([1., 0.]), [T([-1., 1.]), T([0., 1.])]), T([0.5, 0.5]))


def test_anchor_joins_the_rule_and_both_guarantees_hold():
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        g_task, g_meta, g_anchor = (torch.randn(7, generator=gen) for _ in range(3))
        g = guide_gradient(g_task, g_meta, 1.0, g_anchor, anchor_weight=1.0)
        assert float(g @ g_meta) >= -1e-6 and float(g @ g_anchor) >= -1e-6
        without = guide_gradient(g_task, g_meta, 1.0, g_anchor, anchor_weight=0.0)
        assert torch.equal(without, guide_gradient(g_task, g_meta, 1.0))  # weight 0: the anchor-free rule
    # meta agrees, anchor conflicts: only the anchor's component goes
    assert torch.allclose(guide_gradient(T([1., 1.]), T([1., 0.]), 1.0, T([-1., 0.])), T([0., 1.]))
    assert torch.allclose(guide_gradient(T([1., 1.]), T([1., 0.]), 1.0, T([-1., 0.]), anchor_weight=0.5),
                          T([0.5, 1.]))


def test_guide_update_removes_what_adam_adds_against_the_meta_gradient():
    p, before = T([1., 1.]), T([0., 0.])
    assert guide_update([p], [before], [T([1., 0.])], 1.0) == 1 and torch.allclose(p, T([0., 1.]))
    q = T([-1., 1.])  # a step down the meta loss: untouched
    assert guide_update([q], [T([0., 0.])], [T([1., 0.])], 1.0) == 0 and torch.equal(q, T([-1., 1.]))
    r = T([1., 1.])  # no meta conflict, but up the anchor loss
    assert guide_update([r], [T([0., 0.])], [T([-1., 0.])], 1.0, [T([0., 1.])]) == 1 and torch.allclose(r, T([1., 0.]))


def test_anchor_similarity_and_cosine_distance():
    learned, anchor = _unit([1., 0.], [0., 1.]), _unit([1., 0.], [1., 1.])
    assert anchor_similarity(learned, anchor) == pytest.approx((1 + 2 ** -0.5) / 2)
    assert float(cosine_distance(learned, anchor)) == pytest.approx(1 - (1 + 2 ** -0.5) / 2)
    assert anchor_similarity(torch.stack([learned, learned]), anchor) == pytest.approx((1 + 2 ** -0.5) / 2)


def test_apply_smgs_with_anchor_loss_counts_anchor_conflicts():
    a = torch.zeros(2, requires_grad=True)  # task (1, 1), meta (1, 0) agrees, anchor (−1, 0) conflicts
    task, meta, anchor = (a * T([1., 1.])).sum(), (a * T([1., 0.])).sum(), (a * T([-1., 0.])).sum()
    stats = apply_smgs([a], task, meta, 1.0, anchor_loss=anchor, anchor_weight=1.0)
    assert torch.allclose(a.grad, T([0., 1.])) and stats["conflicts"] == 1
    assert torch.equal(stats["anchor_grads"][0], T([-1., 0.]))


# ------------------------------------------------------------------------------------------ meta losses
def test_kl_divergence_by_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ ln 2 + ½ ln(2/3)
    want = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert float(kl_divergence(T([[0., 0.]]), T([[0., math.log(3)]]))) == pytest.approx(want, abs=1e-6)
    assert float(kl_divergence(T([[1., 2.], [0., 5.]]), T([[1., 2.], [0., 5.]]))) == pytest.approx(0.0, abs=1e-7)


def _unit(*rows):
    return torch.nn.functional.normalize(T(rows), dim=-1)


def test_cosine_meta_loss_by_hand():
    meta = _unit([1., 0.], [0., 1.])
    learned = _unit([1., 0.], [1., 1.])  # cos 1 and 1/√2 → mean(0, 1 − 1/√2)
    loss = meta_loss(SMGSConfig(meta_loss="cosine"), learned, meta)
    assert float(loss) == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-6)


def _features(gen, b=3, layers=2, n=4, d=8):
    cls = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1)
    patches = torch.nn.functional.normalize(torch.randn(layers, b, n, d, generator=gen), dim=-1)
    return ImageFeatures(cls, patches, (2, 2))


def test_kl_meta_loss_zero_at_meta_and_gradient_only_to_learned():
    gen = torch.Generator().manual_seed(0)
    features = _features(gen)
    meta = torch.nn.functional.normalize(torch.randn(2, 8, generator=gen), dim=-1)
    config = SMGSConfig(meta_loss="kl")
    assert float(meta_loss(config, meta.clone(), meta, features)) == pytest.approx(0.0, abs=1e-6)
    learned = torch.nn.functional.normalize(torch.randn(2, 8, generator=gen), dim=-1).requires_grad_(True)
    meta_param = meta.clone().requires_grad_(True)
    loss = meta_loss(config, learned, meta_param, features)
    image_only = meta_loss(SMGSConfig(meta_loss="kl", patch_level=False), learned, meta, features)
    assert float(loss.detach()) > float(image_only.detach()) > 0
    loss.backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    assert meta_param.grad is None


def test_kl_meta_loss_needs_features():
    with pytest.raises(ValueError, match="features"):
        meta_loss(SMGSConfig(meta_loss="kl"), _unit([1., 0.], [0., 1.]), _unit([1., 0.], [0., 1.]))


# ----------------------------------------------------------------------------------------- MetaPrompt
def test_ema_update_by_hand():
    meta = MetaPrompt.from_features(T([[1., 0.], [0., 1.]]), SMGSConfig(update="ema", ema_beta=0.5))
    assert meta.update(T([[0., 1.], [0., 1.]]), step=0)
    r = 1 / math.sqrt(2)
    assert torch.allclose(meta.text_features(), T([[r, r], [0., 1.]]), atol=1e-6)
    assert torch.allclose(meta.drift(), T([1 - r, 0.]), atol=1e-6)
    meta = MetaPrompt.from_features(T([[1., 0.], [0., 1.]]), SMGSConfig(update="ema", ema_beta=0.99))
    meta.update(T([[0., 1.], [0., 1.]]), step=0)  # normalise((0.99, 0.01))
    want = T([0.99, 0.01]) / math.hypot(0.99, 0.01)
    assert torch.allclose(meta.current[0], want, atol=1e-6)


def test_static_never_changes():
    meta = MetaPrompt.from_features(T([[1., 0.], [0., 1.]]), SMGSConfig(update="static"))
    for step in range(5):
        assert not meta.update(T([[0., 1.], [1., 0.]]), step=step, held_out_loss=0.0)
    assert torch.equal(meta.current, meta.initial)
    assert torch.equal(meta.drift(), torch.zeros(2))


def test_periodic_reanchors_only_on_improvement_at_period():
    meta = MetaPrompt.from_features(T([[1., 0.], [0., 1.]]), SMGSConfig(update="periodic", period=3))
    a, b, c = T([[0., 1.], [1., 0.]]), T([[-1., 0.], [0., -1.]]), T([[0., -1.], [-1., 0.]])
    assert [meta.wants_held_out(s) for s in range(6)] == [False, False, True, False, False, True]
    assert not meta.update(a, step=0, held_out_loss=0.1)  # not a period step: ignored
    assert torch.equal(meta.current, meta.initial)
    assert meta.update(a, step=2, held_out_loss=1.0)  # first check: best = inf → re-anchor to a
    assert torch.equal(meta.current, a) and meta.best_loss == 1.0
    assert torch.allclose(meta.drift(), T([1., 1.]))
    assert not meta.update(b, step=5, held_out_loss=2.0)  # worse: keep a
    assert torch.equal(meta.current, a)
    assert meta.update(c, step=8, held_out_loss=0.5)  # better: re-anchor to c
    assert torch.equal(meta.current, c) and meta.anchors == 2
    with pytest.raises(ValueError, match="held_out_loss"):
        meta.update(a, step=11)


def test_meta_prompt_encodes_generic_texts_and_rejects_category_words(tiny_backbone):
    config = SMGSConfig()
    meta = MetaPrompt(tiny_backbone, config, categories=["brick", "metal_nut"])
    want = tiny_backbone.encode_texts([config.meta_normal, config.meta_anomalous])
    assert torch.allclose(meta.text_features(), want, atol=1e-6)
    with pytest.raises(ValueError, match="brick"):
        MetaPrompt(tiny_backbone, SMGSConfig(meta_normal="a photo of a flawless brick."), categories=["brick"])
    with pytest.raises(ValueError, match="update"):
        MetaPrompt(tiny_backbone, SMGSConfig(update="sometimes"))
