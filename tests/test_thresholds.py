"""Thresholds chosen without the test set: hand-checked F1 and quantiles, then the whole procedure on apt-tiny."""
import pytest
import torch

from apt_lab.config import APTConfig
from apt_lab.thresholds import Thresholds, choose_thresholds, f1_at_threshold, image_threshold, pixel_threshold

NEGATIVES, POSITIVES = [0.1, 0.2], [0.3, 0.9]


@pytest.mark.parametrize("threshold, expected", [
    (0.25, 1.0),        # TP 2, FP 0, FN 0
    (0.15, 4 / 5),      # TP 2, FP 1, FN 0
    (0.5, 2 / 3),       # TP 1, FP 0, FN 1
    (0.3, 1.0),         # ≥: a score equal to the threshold counts as anomalous
    (1.0, 0.0),         # nothing predicted anomalous
])
def test_f1_at_threshold_by_hand(threshold, expected):
    assert f1_at_threshold(threshold, NEGATIVES, POSITIVES) == pytest.approx(expected)
    assert f1_at_threshold(threshold, torch.tensor(NEGATIVES), torch.tensor(POSITIVES)) == pytest.approx(expected)


def test_image_threshold_is_the_lowest_score_with_the_best_f1():
    # F1 at 0.1: 4/6, at 0.4: 4/5, at 0.5: 2/4, at 0.9: 2/3
    assert image_threshold([0.1, 0.5], [0.4, 0.9]) == 0.4
    assert image_threshold(NEGATIVES, POSITIVES) == 0.3           # F1 1 at 0.3; 0.9 misses the positive 0.3
    assert image_threshold([0.5], [0.5]) == 0.5                  # a tie of one normal and one anomalous score


def test_pixel_threshold_matches_torch_quantile():
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    for quantile in (0.0, 0.5, 0.9, 0.99, 1.0):
        expected = float(torch.quantile(maps.flatten(), quantile))    # its rank is float32, ours float64
        assert pixel_threshold(maps, quantile) == pytest.approx(expected, abs=1e-6)
    assert pixel_threshold(torch.arange(101.0)) == 99.0
    assert pixel_threshold(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), 0.5) == 1.5


def test_pixel_threshold_takes_more_values_than_torch_quantile():
    values = torch.zeros(2 ** 24 + 2)           # torch.quantile raises on this many values
    values[-1] = 1.0                            # one value of 1 at the very top
    assert pixel_threshold(values, 1.0) == 1.0 and pixel_threshold(values, 0.99) == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda: f1_at_threshold(0.5, [], [0.3]), "negatives is empty"),
    (lambda: image_threshold([0.1], [float("nan")]), "positives holds NaN"),
    (lambda: pixel_threshold(torch.rand(4), 1.5), "quantile=1.5"),
])
def test_bad_inputs_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_choose_thresholds_on_tiny_backbone(tiny_backbone):
    torch.manual_seed(0)
    config = APTConfig.preset("quick")
    prompts = torch.nn.functional.normalize(torch.randn(2, tiny_backbone.embed_dim), dim=-1)  # (2, D)
    images = torch.rand(3, 3, 224, 224)
    chosen = choose_thresholds(tiny_backbone, prompts, images, config, rng=torch.Generator().manual_seed(1))
    assert isinstance(chosen, Thresholds)
    normal, perturbed = chosen.normal_scores, chosen.perturbed_scores
    assert normal.anomaly_maps.shape == perturbed.anomaly_maps.shape == (3, 224, 224)
    # the normal scores are the clean images' scores; the perturbed ones differ (CFG changed the images)
    assert not torch.equal(normal.image_scores, perturbed.image_scores)
    assert chosen.pixel == pytest.approx(float(torch.quantile(normal.anomaly_maps.flatten(), 0.99)), abs=1e-6)
    candidates = torch.cat([normal.image_scores, perturbed.image_scores]).tolist()
    assert chosen.image in candidates
    best = max(f1_at_threshold(t, normal.image_scores, perturbed.image_scores) for t in candidates)
    assert f1_at_threshold(chosen.image, normal.image_scores, perturbed.image_scores) == best
    again = choose_thresholds(tiny_backbone, prompts, images, config, rng=torch.Generator().manual_seed(1))
    assert (again.pixel, again.image) == (chosen.pixel, chosen.image)      # same seed, same thresholds
    looser = choose_thresholds(tiny_backbone, prompts, images, config, rng=torch.Generator().manual_seed(1),
                               pixel_quantile=0.5)
    assert looser.pixel < chosen.pixel


def test_choose_thresholds_needs_held_out_images(tiny_backbone):
    prompts = torch.nn.functional.normalize(torch.randn(2, tiny_backbone.embed_dim), dim=-1)
    with pytest.raises(ValueError, match="hold out at least one normal"):
        choose_thresholds(tiny_backbone, prompts, torch.rand(0, 3, 224, 224), APTConfig.preset("quick"))
