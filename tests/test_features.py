"""Encode once: FeatureStore (memory and disk), score on features, shots handed to tuning, a sweep's loop order.

Encoder passes are counted by ``backbone.images_encoded`` (every image through the image tower adds one)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import apt_lab
from apt_lab.config import APTConfig
from apt_lab.data import few_shot, load_dataset
from apt_lab.features import FeatureStore
from apt_lab.pipeline import run_category
from apt_lab.scoring import build_memory, score

CONFIG = APTConfig.preset("quick", train__steps=2, train__pool_size=4)


@pytest.fixture()
def backbone():
    return apt_lab.load_backbone("apt-tiny", device="cpu")  # a fresh one: its pass counter starts at 0


@pytest.fixture(scope="module")
def brick():
    return load_dataset("demo", category="brick")


def test_each_image_is_encoded_once_and_equals_a_fresh_encoding(backbone, brick):
    store = FeatureStore(backbone)
    first = store.features(brick.train, [0, 1])
    again = store.features(brick.train, [1, 0, 1])
    assert backbone.images_encoded == 2 and store.encoded == 2
    assert torch.equal(again.cls, first.cls[[1, 0, 1]]) and torch.equal(again.patches, first.patches[:, [1, 0, 1]])
    fresh = backbone.encode_batched(brick.train.images(224, [0, 1]))
    assert torch.allclose(first.patches, fresh.patches, atol=1e-6)
    test = store.features(brick.test)
    assert store.features(brick.test).cls.data_ptr() == test.cls.data_ptr()  # the same tensor, not a copy
    assert backbone.images_encoded == 4 + len(brick.test)
    assert torch.equal(store.images(brick.train, [1]), brick.train.images(224, [1]))


def test_score_on_features_equals_score_on_images_and_costs_no_pass(backbone, brick):
    text = F.normalize(torch.randn(2, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    images = brick.test.images(224)
    from_images = score(backbone, text, images, CONFIG)
    features = backbone.encode_batched(images)
    passes = backbone.images_encoded
    from_features = score(backbone, text, features, CONFIG)
    assert backbone.images_encoded == passes
    assert torch.equal(from_features.image_scores, from_images.image_scores)
    assert torch.equal(from_features.anomaly_maps, from_images.anomaly_maps)
    memory = build_memory(backbone, features[:2], CONFIG)
    assert backbone.images_encoded == passes and memory.n_shots == 2
    with pytest.raises(ValueError, match="locality_radius=0, config.score has 1"):
        score(backbone, text, features, CONFIG.replace(score__locality_radius=1))


def test_tuning_takes_shot_features_as_an_argument_and_encodes_nothing_else(backbone):
    """The old pipeline handed features through a cache on the backbone keyed on tensor identity and torch's
    private ``_version``; now they are an argument, checked against the shots."""
    assert not hasattr(backbone, "reuse_features") and not hasattr(backbone, "_known")
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    features = backbone.encode_batched(x)
    config = CONFIG.replace(perturb__region="image")
    given = apt_lab.tune_prompts(backbone, x, config, progress=False, shot_features=features)
    assert backbone.images_encoded == 2 + config.train.pool_size  # the pool only: no second pass over the shots
    plain = apt_lab.tune_prompts(backbone, x, config, progress=False)
    assert torch.equal(given.prompts.ctx[0], plain.prompts.ctx[0])
    with pytest.raises(ValueError, match="shot_features: 1 images at locality radius 0 for 2 shots"):
        apt_lab.tune_prompts(backbone, x, config, progress=False, shot_features=features[:1])


def test_runs_sharing_a_store_encode_test_images_and_shots_once(backbone, brick):
    """k = 1 and 2 (nested draws), two seeds, two methods: test set once, 2 shots once, one pool per APT run."""
    store = FeatureStore(backbone)
    results = [run_category(backbone, brick, CONFIG, k=k, seed=seed, method=method, store=store)
               for k in (1, 2) for seed in (0, 1) for method in ("apt", "human")]
    assert few_shot(brick, 1) == few_shot(brick, 2)[:1]  # nested, so the 2-shot run adds one image
    apt_runs = sum(r.method == "apt" for r in results)
    assert backbone.images_encoded == len(brick.test) + 2 + apt_runs * CONFIG.train.pool_size
    assert results[0].anomaly_maps.dtype == torch.float16  # kept at evaluation resolution in half precision
    assert store.encoded == len(brick.test) + 2 and all("encode_s" in r.timings for r in results)
    # the same numbers as tuning and scoring from pixels, without any store
    shots = brick.train.images(224, few_shot(brick, 2))
    tuned = apt_lab.tune_prompts(backbone, shots, CONFIG.replace(train__k_shot=2, train__seed=1), progress=False)
    direct = score(backbone, tuned.prompts, brick.test.images(224), CONFIG)
    again = results[6]  # k=2, seed=1, apt
    assert torch.allclose(again.image_scores, direct.image_scores, atol=1e-6)
    assert (again.anomaly_maps.float() - direct.anomaly_maps).abs().max() < 5e-4  # float16 rounding (≈ 2.4e-4 at 0.4)


def test_a_sweep_encodes_each_category_once_for_every_cell(backbone, tmp_path):
    from apt_lab.sweep import Plan, run_sweep

    plan = Plan("demo", CONFIG, categories=("brick", "grass"), shots=(1, 2), seeds=(0,), methods=("human", "apt"))
    run_sweep(plan, out=tmp_path, name="s", progress=False, backbone=backbone)
    tests = sum(len(load_dataset("demo", category=c).test) for c in ("brick", "grass"))
    assert backbone.images_encoded == tests + 2 * 2 + 2 * 2 * CONFIG.train.pool_size  # 4 APT cells, one pool each


def test_disk_cache_is_content_keyed_detects_damage_and_rebuilds(backbone, brick, tmp_path):
    first = FeatureStore(backbone, cache_dir=tmp_path).features(brick.test)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    second = FeatureStore(backbone, cache_dir=tmp_path)
    loaded = second.features(brick.test)
    assert second.loaded == len(brick.test) and second.encoded == 0
    assert torch.equal(loaded.patches, first.patches) and torch.equal(loaded.cls, first.cls)

    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    files[0].write_bytes(bytes(data))
    third = FeatureStore(backbone, cache_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="checksum"):
        rebuilt = third.features(brick.test)
    assert third.encoded == len(brick.test) and torch.equal(rebuilt.patches, first.patches)
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        FeatureStore(backbone, cache_dir=tmp_path).features(brick.test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: a clean read again
        assert FeatureStore(backbone, cache_dir=tmp_path).features(brick.test).cls.shape[0] == len(brick.test)

    other = apt_lab.load_backbone("apt-tiny", device="cpu", init_seed=1)  # other weights: another key
    store = FeatureStore(other, cache_dir=tmp_path)
    store.features(brick.test)
    assert store.loaded == 0 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_cache_file_copied_over_another_is_caught_and_rebuilt(backbone, brick, tmp_path):
    """The cache was keyed by content in its file name only: another category's file copied over it loaded
    silently and changed the metrics. The key is now inside the file."""
    grass = load_dataset("demo", category="grass")
    FeatureStore(backbone, cache_dir=tmp_path).features(brick.test)
    (brick_file,) = tmp_path.glob("*.safetensors")
    FeatureStore(backbone, cache_dir=tmp_path).features(grass.test)
    (grass_file,) = set(tmp_path.glob("*.safetensors")) - {brick_file}
    fresh = FeatureStore(backbone).features(brick.test)
    brick_file.write_bytes(grass_file.read_bytes())  # same shapes (14 test images each), other images
    store = FeatureStore(backbone, cache_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="its key is not this request's"):
        loaded = store.features(brick.test)
    assert store.loaded == 0 and torch.equal(loaded.cls, fresh.cls)
