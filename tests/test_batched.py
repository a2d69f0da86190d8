"""tune_prompts_batched equals tune_prompts run set by set (apt-tiny, random weights, demo brick shots)."""
from pathlib import Path

import pytest
import torch

from apt_lab.batched import tune_prompts_batched
from apt_lab.config import APTConfig
from apt_lab.tuning import tune_prompts

DEMO = Path(__file__).resolve().parents[1] / "apt_lab" / "data" / "demo"
CURVES = ("loss", "image_loss", "focal", "dice", "meta_loss", "anchor_similarity", "meta_drift")
SETS = ((1, 0), (2, 1), (4, 2))  # (k, seed) of the three prompt sets


@pytest.fixture(scope="module")
def shots(tiny_backbone):
    paths = sorted((DEMO / "brick" / "train" / "good").glob("*.png"))[:4]
    return tiny_backbone.load_images(paths)  # (4, 3, 224, 224); k = 1 ⊂ 2 ⊂ 4 like the sweep's draws


def configs(per_set=None, **overrides):
    """quick preset, 4 steps, a small pool; one config per set with its seed (per_set: extra overrides each)."""
    per_set = per_set or [{}] * len(SETS)
    base = {"train__steps": 4, "train__pool_size": 6}
    return [APTConfig.preset("quick", **{**base, "train__seed": seed, **overrides, **extra})
            for (_, seed), extra in zip(SETS, per_set)]


def compare(backbone, shots, cfgs):
    shots_list = [shots[:k] for k, _ in SETS]
    together = tune_prompts_batched(backbone, shots_list, cfgs)
    alone = [tune_prompts(backbone, s, c, progress=False) for s, c in zip(shots_list, cfgs)]
    for batched, sequential in zip(together, alone):
        for p, q in zip(batched.prompts.parameters(), sequential.prompts.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
        assert len(batched.history) == len(sequential.history) == cfgs[0].train.steps
        for key in CURVES:
            assert batched.curve(key) == pytest.approx(sequential.curve(key), abs=1e-5), key
        assert batched.curve("conflict_rate") == sequential.curve("conflict_rate")
        torch.testing.assert_close(batched.meta.current, sequential.meta.current, atol=1e-6, rtol=1e-5)
    # no leak: every set moved its own way (different seeds and shots), far beyond the tolerance above
    ctx = [r.prompts.ctx[0].detach() for r in together]
    assert all((ctx[i] - ctx[j]).abs().max() > 1e-3 for i in range(3) for j in range(i + 1, 3))
    assert len({round(r.history[-1]["loss"], 6) for r in together}) == 3
    return together


def test_batched_equals_sequential_default(tiny_backbone, shots):
    compare(tiny_backbone, shots, configs())


def test_batched_equals_sequential_without_smgs(tiny_backbone, shots):
    results = compare(tiny_backbone, shots, configs(smgs__lam=0.0))
    assert all(r.curve("conflict_rate") == [None] * 4 for r in results)


def test_batched_equals_sequential_with_smgs_and_anchor(tiny_backbone, shots):
    results = compare(tiny_backbone, shots, configs(smgs__lam=1.0, smgs__anchor_weight=1.0))
    rates = [rate for r in results for rate in r.curve("conflict_rate")]
    assert max(rates) > 0  # SMGS acted on some step: the comparison covered the projection


def test_each_set_keeps_its_own_smgs_decision_and_deep_prompts(tiny_backbone, shots):
    """Mixed arms in one batch: λ = 0; λ = 1 with the anchor on the gradient and the update; static meta-prompt."""
    per_set = [{"smgs__lam": 0.0},
               {"smgs__lam": 1.0, "smgs__anchor_weight": 1.0, "smgs__apply_to": "both"},
               {"smgs__update": "static", "train__optimizer": "sgd", "train__lr": 0.1}]
    results = compare(tiny_backbone, shots, configs(per_set, prompts__deep_layers=1))
    assert results[0].curve("conflict_rate") == [None] * 4
    assert all(rate is not None for rate in results[1].curve("conflict_rate"))
    assert results[2].curve("meta_drift") == pytest.approx([0.0] * 4, abs=1e-6)  # static: the meta-prompt never moves


@pytest.mark.parametrize("change, message", [
    ({"prompts__per_category": True}, r"configs\[1\]\.prompts\.per_category"),
    ({"smgs__update": "periodic"}, r"configs\[1\]\.smgs\.update='periodic'"),
    ({"train__steps": 5}, r"configs\[1\]\.train\.steps=5 differs"),
    ({"prompts__n_ctx": 3}, r"configs\[1\]\.prompts\.n_ctx=3 differs"),
])
def test_unsupported_settings_are_named(tiny_backbone, shots, change, message):
    cfgs = configs([{}, change, {}])
    with pytest.raises(ValueError, match=message):
        tune_prompts_batched(tiny_backbone, [shots[:1]] * 3, cfgs)


def test_one_config_per_set(tiny_backbone, shots):
    with pytest.raises(ValueError, match="shots_list has 2 entries and configs 3"):
        tune_prompts_batched(tiny_backbone, [shots, shots], configs())
