"""Learnable prompts: exact injected text path, parameters, per-category pairs, inspection helpers."""
import pytest
import torch

from apt_lab.config import PromptConfig
from apt_lab.prompts import PromptLearner, nearest_words, similarity_to

NORMAL, ANOMALOUS = "a photo of a", "a picture of some"  # 4 tokens each


@pytest.mark.parametrize("truncate", [True, False])
def test_real_token_embeddings_reproduce_encode_texts(tiny_backbone, truncate):
    learner = PromptLearner(tiny_backbone, PromptConfig(n_ctx=4, truncate=truncate))
    learner.set_context_words(NORMAL, ANOMALOUS)
    got = learner.text_features().detach()
    want = tiny_backbone.encode_texts([f"{NORMAL} object.", f"{ANOMALOUS} object."])
    diff = (got - want).abs().max().item()
    if truncate:
        assert diff <= 1e-6
        assert learner.positions == 1 + 4 + 2 + 1  # SOT, 4 context, "object", ".", EOT
    else:
        assert diff == 0.0
        assert learner.positions == tiny_backbone.context_length


def test_default_template_is_neutral_and_shape(tiny_backbone):
    learner = PromptLearner(tiny_backbone)
    assert learner.template == " ".join(["X"] * 12) + " object."
    features = learner.text_features()
    assert features.shape == (2, tiny_backbone.embed_dim)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(features[0], features[1])  # separate context vectors per class


def test_only_context_vectors_are_parameters_and_init_std(tiny_backbone):
    learner = PromptLearner(tiny_backbone, PromptConfig(init_std=0.02), seed=0)
    params = list(learner.parameters())
    assert [tuple(p.shape) for p in params] == [(2, 12, 128)]
    assert 0.015 < params[0].std().item() < 0.025
    assert all(not b.requires_grad for b in learner.buffers())


def test_gradients_reach_only_prompt_parameters(tiny_backbone):
    learner = PromptLearner(tiny_backbone, PromptConfig(deep_layers=2))
    learner.text_features()[1].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())


def test_same_seed_same_init_different_seed_differs(tiny_backbone):
    a, b, c = (PromptLearner(tiny_backbone, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.ctx[0], b.ctx[0])
    assert not torch.equal(a.ctx[0], c.ctx[0])


def test_deep_prompts_change_features(tiny_backbone):
    learner = PromptLearner(tiny_backbone, PromptConfig(deep_layers=1), seed=0)
    shallow = PromptLearner(tiny_backbone, PromptConfig(deep_layers=0), seed=0)
    assert torch.equal(learner.ctx[0], shallow.ctx[0])  # context drawn first, deep prompts after
    assert learner.deep[0].shape == (1, 2, 12, 128)
    assert not torch.allclose(learner.text_features(), shallow.text_features())
    with pytest.raises(ValueError, match="deep_layers"):
        PromptLearner(tiny_backbone, PromptConfig(deep_layers=4))  # apt-tiny has 4 text blocks


def test_per_category_pairs(tiny_backbone):
    learner = PromptLearner(tiny_backbone, PromptConfig(per_category=True), categories=["brick", "grass"])
    assert len(learner.ctx) == 2
    brick, grass = learner.text_features("brick"), learner.text_features("grass")
    assert not torch.allclose(brick, grass)
    assert torch.equal(learner.all_text_features()[1], grass)
    assert torch.equal(learner.text_features(1), grass)
    with pytest.raises(ValueError, match="brick"):
        learner.text_features("metal")
    with pytest.raises(ValueError, match="category"):
        learner.text_features()
    with pytest.raises(ValueError, match="categories"):
        PromptLearner(tiny_backbone, PromptConfig(per_category=True))


def test_shared_pair_ignores_category(tiny_backbone):
    learner = PromptLearner(tiny_backbone, categories=["brick"])
    assert torch.equal(learner.text_features("anything"), learner.text_features())


def test_set_context_words_checks_length(tiny_backbone):
    learner = PromptLearner(tiny_backbone, PromptConfig(n_ctx=4))
    with pytest.raises(ValueError, match="n_ctx=4"):
        learner.set_context_words("a photo")


def test_nearest_words_recover_injected_words(tiny_backbone):
    learner = PromptLearner(tiny_backbone, PromptConfig(n_ctx=4))
    learner.set_context_words(NORMAL, ANOMALOUS)
    rows = nearest_words(learner, k=3)
    assert len(rows) == 2 * 4
    normal = [r["words"][0] for r in rows if r["prompt"] == "normal"]
    anomalous = [r["words"][0] for r in rows if r["prompt"] == "anomalous"]
    assert normal == NORMAL.split() and anomalous == ANOMALOUS.split()
    assert rows[0]["distances"][0] == pytest.approx(0.0, abs=1e-4)
    assert rows[0]["distances"] == sorted(rows[0]["distances"])
    cosine = nearest_words(learner, k=1, metric="cosine")
    assert [r["words"][0] for r in cosine if r["prompt"] == "normal"] == NORMAL.split()


def test_similarity_to(tiny_backbone):
    learner = PromptLearner(tiny_backbone, PromptConfig(n_ctx=4))
    learner.set_context_words(NORMAL, ANOMALOUS)
    sim = similarity_to(learner, [f"{NORMAL} object.", f"{ANOMALOUS} object.", "a dog."])
    assert sim.shape == (2, 3)
    assert sim[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert sim[1, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 2] < 0.999
