"""tune_prompts on apt-tiny (random weights) with the demo brick shots: losses, determinism, control flow."""
import math
from pathlib import Path

import pytest
import torch

from apt_lab.config import APTConfig, TrainConfig
from apt_lab.perturbations import perturb
from apt_lab.scoring import anomaly_probabilities
from apt_lab.errors import StopTraining, TrainingDivergedError
from apt_lab.losses import dice_loss, focal_loss, image_loss, task_loss
from apt_lab import tuning
from apt_lab.tuning import HISTORY_KEYS, tune_prompts

DEMO = Path(__file__).resolve().parents[1] / "apt_lab" / "data" / "demo"


@pytest.fixture(scope="module")
def shots(tiny_backbone):
    paths = sorted((DEMO / "brick" / "train" / "good").glob("*.png"))[:4]
    return tiny_backbone.load_images(paths)  # (4, 3, 224, 224)


def config(**overrides):
    """Library defaults (apt-tiny, lr 2e-3), pinned here so that tuning a preset never moves these tests."""
    base = dict(backbone__name="apt-tiny", train__steps=30, train__pool_size=32, train__batch_size=16,
                train__lr=2e-3, train__seed=0)
    base.update(overrides)
    return APTConfig().replace(**base)


def small(**overrides):
    """For control-flow tests: a small pool, no ROI pass."""
    return config(**{"train__pool_size": 8, "perturb__region": "image", **overrides})


@pytest.fixture(scope="module")
def run(tiny_backbone, shots):
    records = []
    result = tune_prompts(tiny_backbone, shots, config(), callbacks=[records.append], progress=False)
    return result, records


def mean(values):
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- losses
def test_image_loss_by_hand_and_zero_weight_skips():
    logits, labels = torch.tensor([[0., 0.], [2., 0.]]), torch.tensor([1, 0])
    ce1 = math.log(1 + math.exp(-2))
    assert float(image_loss(logits, labels)) == pytest.approx((math.log(2) + ce1) / 2, abs=1e-6)
    assert float(image_loss(logits, labels, torch.tensor([0., 1.]))) == pytest.approx(ce1, abs=1e-6)
    assert float(image_loss(logits, labels, torch.zeros(2))) == 0.0


def test_focal_loss_by_hand_and_uses_targets():
    # p(anomalous) = e²/(1+e²) for both patches; patch 0 anomalous, patch 1 normal
    logits = torch.tensor([[[[0., 2.], [0., 2.]]]])  # (L=1, B=1, N=2, 2)
    p = math.exp(2) / (1 + math.exp(2))
    want = (-(1 - p) ** 2 * math.log(p) - p ** 2 * math.log(1 - p)) / 2
    assert float(focal_loss(logits, torch.tensor([[1., 0.]]), gamma=2.0)) == pytest.approx(want, abs=1e-6)
    assert float(focal_loss(logits, torch.tensor([[1., 1.]]))) < float(focal_loss(logits, torch.tensor([[0., 0.]])))
    # γ = 0 is plain cross-entropy
    assert float(focal_loss(logits, torch.tensor([[1., 0.]]), gamma=0.0)) == pytest.approx(
        (-math.log(p) - math.log(1 - p)) / 2, abs=1e-6)


def test_dice_loss_by_hand():
    t = torch.tensor([[1., 1., 0.]])
    assert float(dice_loss(t[None], t)) == 0.0
    assert float(dice_loss(1 - t[None], t)) == pytest.approx(0.75)  # 1 − 1/(1 + 2 + 1)
    # p = 0.5 everywhere: 1 − (2·1 + 1)/(1.5 + 2 + 1)
    assert float(dice_loss(torch.full((2, 1, 3), 0.5), t)) == pytest.approx(1 - 3 / 4.5)


def test_task_loss_weights():
    gen = torch.Generator().manual_seed(0)
    cls, patches = torch.randn(2, 2, generator=gen), torch.randn(3, 2, 4, 2, generator=gen)
    labels, targets = torch.tensor([1, 0]), torch.tensor([[1., 0., 0., 0.], [0., 0., 0., 0.]])
    total, parts = task_loss(cls, patches, labels, targets, TrainConfig(loss_weights=(1.0, 2.0, 3.0)))
    assert float(total) == pytest.approx(float(parts["image_loss"] + 2 * parts["focal"] + 3 * parts["dice"]))


# ------------------------------------------------------------------------------------------- training
def test_history_records_and_callbacks(run):
    result, records = run
    assert len(result.history) == 30 and records == result.history
    assert [r["step"] for r in records] == list(range(30))
    assert all(tuple(r) == HISTORY_KEYS for r in records)
    assert all(0.0 <= r["conflict_rate"] <= 1.0 for r in records)
    assert records[-1]["meta_drift"] > 0  # EMA moved the meta-prompt
    assert not result.interrupted
    assert result.timings["pool_builds"] == 1 and result.timings["step_s"] > 0
    assert set(result.timings) >= {"encode_shots_s", "roi_s", "pool_s", "steps_s", "total_s"}


def test_training_touches_only_the_prompts(tiny_backbone, run):
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())
    assert all(p.grad is not None for p in run[0].prompts.parameters())
    assert not torch.equal(run[0].meta.current, run[0].meta.initial)


def test_task_loss_decreases(run):
    losses = run[0].curve("loss")
    assert mean(losses[-5:]) < mean(losses[:5]) - 0.1


def test_tuned_prompts_find_the_perturbed_patches(tiny_backbone, shots, run):
    """Fresh perturbations (another seed): trained prompts rank patches inside the patch mask higher."""
    from sklearn.metrics import roc_auc_score

    from apt_lab.prompts import PromptLearner

    cfg = config()
    out = perturb(shots.repeat(2, 1, 1, 1), cfg, torch.Generator().manual_seed(99), backbone=tiny_backbone)
    features = tiny_backbone.encode_images(out.images)
    inside = out.patch_masks.flatten(1)  # (B, N)

    def gap_and_auroc(text):
        _, patch_prob = anomaly_probabilities(features, text.detach(), cfg.score.temperature)
        prob = patch_prob.mean(0)  # (B, N)
        return float(prob[inside].mean() - prob[~inside].mean()), roc_auc_score(inside.flatten(), prob.flatten())

    untrained = gap_and_auroc(PromptLearner(tiny_backbone, cfg.prompts, seed=0).text_features())  # the run's init
    trained = gap_and_auroc(run[0].prompts.text_features())
    assert trained[0] > 0.1 and trained[1] > untrained[1] + 0.04  # measured: gap 0.14, AUROC 0.70 vs 0.63


def test_pool_targets_are_the_patch_masks_and_feature_entries_keep_cls(tiny_backbone, shots):
    from apt_lab.tuning import _perturbed_examples

    cfg = config(perturb__region="image")
    clean = tiny_backbone.encode_images(shots)
    pool = _perturbed_examples(tiny_backbone, shots, clean, None, 6, 0, cfg, torch.Generator().manual_seed(3), 0.5)
    out = perturb(shots[torch.arange(6) % 4], cfg, torch.Generator().manual_seed(3), backbone=tiny_backbone)
    assert torch.equal(pool.targets, out.patch_masks.flatten(1).float())  # same draws → the same masks
    assert pool.labels.tolist() == [1] * 6 and pool.weights.tolist() == [1, 1, 1, 0, 0, 0]
    pixel = tiny_backbone.encode_images(out.images[:3])
    assert torch.allclose(pool.features.cls[:3], pixel.cls, atol=1e-5)
    feature = pool.features[torch.arange(3, 6)]
    source = clean[torch.tensor([3, 0, 1])]  # entries 3, 4, 5 are copies of shots 3, 0, 1
    assert torch.equal(feature.cls, source.cls)  # CLS untouched: why their image-level CE is skipped
    outside = ~out.patch_masks[3:].flatten(1)  # (3, N)
    assert torch.equal(feature.patches[:, outside], source.patches[:, outside])
    assert not torch.allclose(feature.patches[:, ~outside], source.patches[:, ~outside])


def test_same_seed_same_result_different_seed_differs(tiny_backbone, shots):
    first, again = (tune_prompts(tiny_backbone, shots, small(train__steps=8), progress=False) for _ in range(2))
    assert again.curve("loss") == first.curve("loss") and again.curve("meta_loss") == first.curve("meta_loss")
    assert torch.equal(again.prompts.text_features(), first.prompts.text_features())
    other = tune_prompts(tiny_backbone, shots, small(train__seed=1, train__steps=3), progress=False)
    assert other.curve("loss") != first.curve("loss")[:3]
    assert not torch.equal(other.prompts.ctx[0], first.prompts.ctx[0])


def test_lambda_zero_is_plain_tuning(tiny_backbone, shots, run):
    plain = tune_prompts(tiny_backbone, shots, config(smgs__lam=0.0), progress=False)
    assert all(r["conflict_rate"] is None for r in plain.history)
    assert all(isinstance(r["meta_loss"], float) for r in plain.history)
    assert plain.history[0]["loss"] == run[0].history[0]["loss"]  # same start
    first_conflict = next(r["step"] for r in run[0].history if r["conflict_rate"] > 0)
    # SMGS changes the gradient only from the first conflict on: identical before it, different after
    assert plain.curve("loss")[:first_conflict + 1] == run[0].curve("loss")[:first_conflict + 1]
    assert not torch.allclose(plain.prompts.text_features(), run[0].prompts.text_features())


def test_keyboard_interrupt_returns_partial_result(tiny_backbone, shots):
    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.warns(RuntimeWarning, match="interrupted after 4 of 30"):
        result = tune_prompts(tiny_backbone, shots, small(), callbacks=[interrupt], progress=False)
    assert result.interrupted and len(result.history) == 4
    assert result.prompts.text_features().shape == (2, 128)


def test_stop_training_from_callback(tiny_backbone, shots):
    def stop(record):
        if record["step"] == 1:
            raise StopTraining

    result = tune_prompts(tiny_backbone, shots, small(), callbacks=[stop], progress=False)
    assert result.interrupted and len(result.history) == 2


def test_nan_loss_names_step_and_lr(tiny_backbone, shots, monkeypatch):
    real = tuning.task_loss  # a NaN loss weight is refused by the config now: make the loss itself NaN
    monkeypatch.setattr(tuning, "task_loss", lambda *a, **k: (lambda t, p: (t * float("nan"), p))(*real(*a, **k)))
    with pytest.raises(TrainingDivergedError, match=r"step 0 .*lr") as error:
        tune_prompts(tiny_backbone, shots, small(), progress=False)
    assert error.value.result.history == []


def test_per_category_shots_dict(tiny_backbone, shots):
    grass = tiny_backbone.load_images(sorted((DEMO / "grass" / "train" / "good").glob("*.png"))[:2])
    cfg = config(train__steps=6, prompts__per_category=True, train__pool_size=8)
    result = tune_prompts(tiny_backbone, {"brick": shots[:2], "grass": grass}, cfg, progress=False)
    assert result.categories == ["brick", "grass"] and result.prompts.categories == ["brick", "grass"]
    assert not torch.allclose(result.prompts.text_features("brick"), result.prompts.text_features("grass"))
    with pytest.raises(ValueError, match="categories"):
        tune_prompts(tiny_backbone, shots, cfg, progress=False)  # per-category prompts need a name
    periodic = cfg.replace(smgs__update="periodic", smgs__period=3, smgs__heldout_size=2, train__steps=3,
                           perturb__region="image")
    result = tune_prompts(tiny_backbone, {"brick": shots[:2], "grass": grass}, periodic, progress=False)
    assert result.history[2]["held_out_loss"] > 0


def test_per_category_logits_keep_batch_order(tiny_backbone, shots):
    from apt_lab.config import PromptConfig
    from apt_lab.prompts import PromptLearner
    from apt_lab.scoring import patch_logits
    from apt_lab.tuning import Examples, _clean_examples, _logits

    learner = PromptLearner(tiny_backbone, PromptConfig(per_category=True), categories=["a", "b"])
    features = tiny_backbone.encode_images(shots)
    batch = Examples.cat([_clean_examples(features[i:i + 1], group) for i, group in enumerate([1, 0, 1, 0])])
    cls, patches, _ = _logits(learner, batch, 0.07)
    for i, group in enumerate([1, 0, 1, 0]):
        want_cls, want_patches = patch_logits(features[i:i + 1], learner.text_features(group), 0.07)
        assert torch.allclose(cls[i:i + 1], want_cls) and torch.allclose(patches[:, i:i + 1], want_patches)


def test_feature_space_pool_skips_image_loss(tiny_backbone, shots):
    cfg = small(train__steps=3, train__feature_pool_fraction=1.0, train__anomaly_fraction=1.0)
    result = tune_prompts(tiny_backbone, shots, cfg, progress=False)
    assert all(r["image_loss"] == 0.0 and r["focal"] > 0 for r in result.history)


def test_encode_each_step_and_pool_refresh(tiny_backbone, shots):
    fresh = tune_prompts(tiny_backbone, shots, small(train__steps=3, train__encode_each_step=True), progress=False)
    assert fresh.timings["pool_builds"] == 3
    refreshed = tune_prompts(tiny_backbone, shots, small(train__steps=5, train__pool_refresh=2), progress=False)
    assert refreshed.timings["pool_builds"] == 3  # steps 0, 2, 4


def test_periodic_meta_records_held_out_loss(tiny_backbone, shots):
    cfg = small(train__steps=4, smgs__update="periodic", smgs__period=2, smgs__heldout_size=4)
    result = tune_prompts(tiny_backbone, shots, cfg, progress=False)
    held = [r["held_out_loss"] for r in result.history]
    assert held[0] is None and held[2] is None and held[1] > 0 and held[3] > 0
    assert result.meta.anchors >= 1 and result.history[1]["meta_drift"] > 0


def test_cosine_meta_loss_is_one_minus_cos_of_learned_and_meta_prompts(tiny_backbone, shots):
    from apt_lab.prompts import PromptLearner

    cfg = small(train__steps=3, smgs__meta_loss="cosine")
    result = tune_prompts(tiny_backbone, shots, cfg, progress=False)
    # step 0 scores the untouched prompts (the run's seeded init) against the initial meta-prompt
    with torch.no_grad():
        learned = PromptLearner(tiny_backbone, cfg.prompts, seed=cfg.train.seed).text_features()  # (2, D)
        cos = torch.nn.functional.cosine_similarity(learned, result.meta.initial, dim=-1)  # (2,) normal, anomalous
    assert result.history[0]["meta_loss"] == pytest.approx(float((1 - cos).mean()), abs=1e-6)
