"""save_prompts / load_prompts: safetensors + JSON round trip, no pickle, clear errors."""
import json

import pytest
import torch

import apt_lab
from apt_lab.checkpoint import load_prompts, prompt_files, read_prompt_info, save_prompts
from apt_lab.config import APTConfig, PromptConfig
from apt_lab.prompts import PromptLearner
from apt_lab.scoring import score
from apt_lab.tuning import tune_prompts


@pytest.fixture(scope="module")
def tuned(tiny_backbone):
    shots = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cfg = APTConfig.preset("quick", train__steps=4, train__pool_size=4, train__batch_size=4,
                           perturb__region="image")
    return tune_prompts(tiny_backbone, shots, cfg, progress=False)


def test_round_trip_gives_identical_scores(tiny_backbone, tuned, tmp_path):
    written = save_prompts(tuned, tmp_path / "prompts" / "brick", extra={"note": "demo"})
    tensor_file, json_file = prompt_files(tmp_path / "prompts" / "brick")
    assert written == tensor_file and tensor_file.is_file() and json_file.is_file()
    learner, meta = load_prompts(tmp_path / "prompts" / "brick.safetensors", tiny_backbone, with_meta=True)
    assert torch.equal(learner.text_features(), tuned.prompts.text_features())
    assert torch.equal(meta.current, tuned.meta.current) and torch.equal(meta.initial, tuned.meta.initial)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    before, after = score(tiny_backbone, tuned.prompts, images, tuned.config), score(tiny_backbone, learner, images,
                                                                                     tuned.config)
    assert torch.equal(before.image_scores, after.image_scores)
    assert torch.equal(before.anomaly_maps, after.anomaly_maps)


def test_json_records_what_was_run(tiny_backbone, tuned, tmp_path):
    save_prompts(tuned, tmp_path / "p", extra={"shots": [0, 1]})
    info = read_prompt_info(tmp_path / "p.json")
    assert info["backbone"]["name"] == "apt-tiny" and info["backbone"]["embed_dim"] == 128
    assert info["backbone"]["image_size"] == 224 and info["backbone"]["pretrained"] is None
    assert info["apt_lab_version"] == apt_lab.__version__ and info["created"]
    assert info["seed"] == tuned.config.train.seed and info["categories"] is None
    assert APTConfig.from_dict(info["config"]) == tuned.config
    assert info["extra"] == {"shots": [0, 1]}
    assert set(info["tensors"]) == {"ctx.0", "meta.current", "meta.initial"}


def test_per_category_deep_learner_round_trip(tiny_backbone, tmp_path):
    config = PromptConfig(per_category=True, deep_layers=2, n_ctx=6)
    learner = PromptLearner(tiny_backbone, config, categories=["brick", "grass"], seed=5)
    with torch.no_grad():  # move the vectors off their seeded start: only the file's values can reproduce them now
        for parameter in learner.parameters():
            parameter.add_(0.5)
    save_prompts(learner, tmp_path / "bare")
    loaded = load_prompts(tmp_path / "bare", tiny_backbone)
    assert loaded.categories == ["brick", "grass"] and loaded.config == config
    for category in ("brick", "grass"):
        assert torch.equal(loaded.text_features(category), learner.text_features(category))
    _, meta = load_prompts(tmp_path / "bare", tiny_backbone, with_meta=True)
    assert meta is None


def test_loading_never_unpickles(tiny_backbone, tuned, tmp_path, monkeypatch):
    import pickle

    save_prompts(tuned, tmp_path / "p")
    unpickled = []

    def forbidden(*args, **kwargs):
        unpickled.append(args[:1])
        raise AssertionError("loading prompts must not unpickle (torch.load / pickle)")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, forbidden)
    learner, meta = load_prompts(tmp_path / "p", tiny_backbone, with_meta=True)
    assert unpickled == []  # also when a caller swallowed the AssertionError
    assert torch.equal(learner.text_features(), tuned.prompts.text_features())  # and it still loaded everything
    assert torch.equal(meta.current, tuned.meta.current)


def test_other_backbone_is_a_clear_error(tiny_backbone, tuned, tmp_path):
    save_prompts(tuned, tmp_path / "p")
    json_file = tmp_path / "p.json"
    info = json.loads(json_file.read_text())
    info["backbone"].update(name="ViT-B-16", pretrained="openai", embed_dim=512, text_width=512)
    json_file.write_text(json.dumps(info))
    with pytest.raises(ValueError) as error:
        load_prompts(tmp_path / "p", tiny_backbone)
    message = str(error.value)
    for part in ("ViT-B-16", "apt-tiny", "embed_dim: saved 512 vs given 128", "load_backbone"):
        assert part in message


def test_other_image_size_only_warns(tiny_backbone, tuned, tmp_path):
    save_prompts(tuned, tmp_path / "p")
    info = json.loads((tmp_path / "p.json").read_text())
    info["backbone"]["image_size"] = 336
    (tmp_path / "p.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="image_size=336"):
        load_prompts(tmp_path / "p", tiny_backbone)


def test_missing_file_is_named(tiny_backbone, tuned, tmp_path):
    save_prompts(tuned, tmp_path / "p")
    (tmp_path / "p.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="p.safetensors"):
        load_prompts(tmp_path / "p", tiny_backbone)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_prompts(tmp_path / "nowhere", tiny_backbone)


def test_tensor_shape_mismatch_is_an_error(tiny_backbone, tuned, tmp_path):
    save_prompts(tuned, tmp_path / "p")
    info = json.loads((tmp_path / "p.json").read_text())
    info["prompt_config"]["n_ctx"] = 8
    (tmp_path / "p.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="ctx.0"):
        load_prompts(tmp_path / "p", tiny_backbone)


def test_corrupt_prompt_files_name_the_path(tiny_backbone, tuned, tmp_path):
    from apt_lab.errors import CorruptFileError

    save_prompts(tuned, tmp_path / "p")
    good_json, good_tensors = (tmp_path / "p.json").read_text(), (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "p.json").write_text(good_json[: len(good_json) // 2])  # truncated JSON
    with pytest.raises(CorruptFileError, match=r"p\.json is not valid JSON"):
        load_prompts(tmp_path / "p", tiny_backbone)
    info = json.loads(good_json)
    del info["backbone"]
    (tmp_path / "p.json").write_text(json.dumps(info))
    with pytest.raises(CorruptFileError, match=r"p\.json lacks \['backbone'\]"):
        load_prompts(tmp_path / "p", tiny_backbone)
    (tmp_path / "p.json").write_text(good_json)
    (tmp_path / "p.safetensors").write_bytes(good_tensors[: len(good_tensors) // 2])  # truncated tensors
    with pytest.raises(CorruptFileError, match=r"p\.safetensors cannot be read as safetensors"):
        load_prompts(tmp_path / "p", tiny_backbone)
    (tmp_path / "p.safetensors").write_bytes(b"\x00" * 64)  # garbage
    with pytest.raises(CorruptFileError, match=r"p\.safetensors cannot be read"):
        load_prompts(tmp_path / "p", tiny_backbone, with_meta=True)
    (tmp_path / "p.safetensors").write_bytes(good_tensors)
    info = json.loads(good_json)
    info["meta"] = {"best_loss": None}  # the meta record lost its config
    (tmp_path / "p.json").write_text(json.dumps(info))
    with pytest.raises(CorruptFileError, match=r"p\.json: the meta-prompt record is incomplete"):
        load_prompts(tmp_path / "p", tiny_backbone, with_meta=True)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import os

    from apt_lab.data.files import Folder

    (tmp_path / "results.json").write_text("old")

    def full(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", full)
    with Folder(tmp_path) as folder, pytest.raises(OSError, match="disk full"):
        folder.write("results.json", "half of the n")
    assert (tmp_path / "results.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
