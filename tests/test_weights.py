"""QuickGELU from the weights, not the tag: OpenAI checkpoints given as files are recognised and loaded exactly."""
import json
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

import apt_lab
from apt_lab.weights import OPENAI_KEYS, checkpoint_layout, detect_quick_gelu, resolve_weights


def _activation(backbone):
    return type(backbone.model.visual.transformer.resblocks[0].mlp.gelu), \
        type(backbone.model.transformer.resblocks[0].mlp.gelu)


@pytest.fixture(scope="module")
def source():
    """apt-tiny with weights no default-seeded build has (init_seed 1), as open_clip builds it (GELU)."""
    return apt_lab.load_backbone("apt-tiny", device="cpu", init_seed=1).model


def _same_weights(model, reference):
    state = model.state_dict()
    return all(torch.equal(value, state[key]) for key, value in reference.state_dict().items())


def test_openai_state_dict_file_loads_with_quick_gelu(source, tmp_path):
    # the layout OpenAI's clip.load keeps: open_clip's keys plus input_resolution / context_length / vocab_size
    state = dict(source.state_dict(), input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-tiny.pt"
    torch.save(state, path)
    assert checkpoint_layout(path) == "openai"
    backbone = apt_lab.load_backbone("apt-tiny", pretrained=str(path), device="cpu")
    assert _activation(backbone) == (QuickGELU, QuickGELU)
    assert _same_weights(backbone.model, source)
    assert resolve_weights("apt-tiny", str(path)).reason.startswith("an OpenAI checkpoint")


def test_torchscript_archive_loads_with_quick_gelu(source, tmp_path):
    path = tmp_path / "ViT-tiny-jit.pt"  # how OpenAI released CLIP: a TorchScript archive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(source), str(path))
    assert checkpoint_layout(path) == "torchscript"
    backbone = apt_lab.load_backbone("apt-tiny", pretrained=str(path), device="cpu")
    assert _activation(backbone) == (QuickGELU, QuickGELU)
    assert _same_weights(backbone.model, source)


def test_open_clip_state_dict_keeps_gelu_and_quick_gelu_changes_the_output(source, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    plain = apt_lab.load_backbone("apt-tiny", pretrained=str(path), device="cpu")
    assert _activation(plain) == (torch.nn.GELU, torch.nn.GELU)
    source_quick = resolve_weights("apt-tiny", str(path), quick_gelu=True)  # the explicit option
    assert source_quick.quick_gelu and source_quick.reason == "given"
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    forced = apt_lab.weights.create_model("apt-tiny", str(path), source_quick)
    assert not torch.allclose(forced.encode_image(x), plain.model.encode_image(x))  # the activation matters


def test_detection_from_sidecar_config_hub_cache_and_name(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"not read: the layout is given")
    assert detect_quick_gelu("ViT-B-16", file, "open_clip") == (False, "")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    assert detect_quick_gelu("ViT-B-16", file, "open_clip")[0]
    snapshot = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    cached = snapshot / "open_clip_pytorch_model.bin"  # where the 'openai' tag's download lands
    cached.write_bytes(b"x")
    quick, reason = detect_quick_gelu("ViT-B-16", cached, "open_clip")
    assert quick and "'openai'" in reason
    assert detect_quick_gelu("ViT-B-16-quickgelu", file, "open_clip")[0]
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"]  # the table the hub check reads


def test_an_unmarked_file_for_an_architecture_with_openai_weights_warns(tmp_path):
    path = tmp_path / "ViT-B-16.bin"
    torch.save({"visual.proj": torch.zeros(1)}, path)
    with pytest.warns(UserWarning, match="ViT-B-16-quickgelu"):
        assert not resolve_weights("ViT-B-16", str(path)).quick_gelu
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_weights("ViT-B-16", str(path), quick_gelu=False).quick_gelu is False  # explicit: no warning
    assert set(OPENAI_KEYS) == {"input_resolution", "context_length", "vocab_size"}
