"""The backbone layer: exact text injection, patch features equal to open_clip's own, shapes, errors."""
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

import apt_lab
from apt_lab.backbone import default_layers


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(1)
    return apt_lab.load_backbone("ViT-B-16", pretrained=None, device="cpu")


SENTENCES = ["a photo of a flawless object.", "a close-up photo of a damaged bottle with a scratch."]


@pytest.mark.parametrize("which", ["tiny", "b16"])
def test_injected_token_embeddings_reproduce_encode_text_exactly(which, tiny_backbone, request):
    backbone = tiny_backbone if which == "tiny" else request.getfixturevalue("vit_b16")
    embeddings, eot = backbone.token_embeddings(SENTENCES)  # (2, 77, W), (2,)
    assert embeddings.shape[:2] == (2, 77)
    with torch.no_grad():
        ours = backbone.encode_prompt_embeddings(embeddings, eot, normalize=False)
        reference = backbone.model.encode_text(open_clip.tokenize(SENTENCES), normalize=False)
    assert ours.shape == (2, backbone.embed_dim)
    assert (ours - reference).abs().max().item() == 0.0
    assert torch.equal(backbone.encode_texts(SENTENCES), F.normalize(reference, dim=-1))


def test_truncated_text_sequence_gives_the_same_embedding(tiny_backbone):
    embeddings, eot = tiny_backbone.token_embeddings(SENTENCES)
    length = int(eot.max()) + 1
    with torch.no_grad():
        full = tiny_backbone.encode_prompt_embeddings(embeddings, eot)
        short = tiny_backbone.encode_prompt_embeddings(embeddings[:, :length], eot)
    assert length < 20
    assert torch.allclose(full, short, atol=1e-6)


def test_gradients_reach_only_the_injected_vectors(tiny_backbone):
    embeddings, eot = tiny_backbone.token_embeddings(SENTENCES)
    context = torch.zeros(2, 4, embeddings.shape[-1], requires_grad=True)  # (P, n_ctx, W)
    injected = torch.cat([embeddings[:, :1], context, embeddings[:, 5:]], dim=1)
    tiny_backbone.encode_prompt_embeddings(injected, eot).sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())


def test_deep_prompts_change_the_output_and_receive_gradients(tiny_backbone):
    embeddings, eot = tiny_backbone.token_embeddings(SENTENCES)
    deep = [torch.zeros(3, embeddings.shape[-1], requires_grad=True) for _ in range(2)]
    with torch.no_grad():
        plain = tiny_backbone.encode_prompt_embeddings(embeddings, eot)
    out = tiny_backbone.encode_prompt_embeddings(embeddings, eot, deep_prompts=deep)
    assert (out - plain).abs().max() > 1e-4
    out.sum().backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deep)


@pytest.mark.parametrize("which", ["tiny", "b16"])
def test_patch_features_equal_open_clips_intermediate_api(which, tiny_backbone, request):
    backbone = tiny_backbone if which == "tiny" else request.getfixturevalue("vit_b16")
    x = torch.rand(2, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    features = backbone.encode_images(x)
    visual = backbone.model.visual
    with torch.no_grad():
        normalised = (x - backbone.mean) / backbone.std
        out = visual.forward_intermediates(normalised, indices=[l - 1 for l in backbone.layers],
                                           normalize_intermediates=True, output_fmt="NLC")
        reference = F.normalize(torch.stack(out["image_intermediates"]) @ visual.proj, dim=-1)  # (L, B, N, D)
        cls = backbone.model.encode_image(normalised, normalize=True)
    assert features.patches.shape == reference.shape
    assert torch.allclose(features.patches, reference, atol=1e-5)
    assert torch.allclose(features.cls, cls, atol=1e-5)
    assert torch.allclose(features.patches.norm(dim=-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("name,size,grid,layers", [
    ("apt-tiny", 224, (14, 14), (1, 2, 3, 4)),
    ("ViT-B-16-plus-240", 240, (15, 15), (3, 6, 9, 12)),
    ("ViT-L-14-336", 518, (37, 37), (6, 12, 18, 24)),
])
def test_shapes_for_224_240_and_518_inputs(name, size, grid, layers):
    backbone = apt_lab.load_backbone(name, pretrained=None, image_size=size if name != "apt-tiny" else None,
                                     device="cpu")
    assert (backbone.image_size, backbone.grid, backbone.layers) == (size, grid, layers)
    if name == "ViT-L-14-336":
        return  # a 518-px ViT-L forward pass costs ~10 s on 2 cores; its geometry is what varies here
    features = backbone.encode_images(torch.rand(1, 3, size, size))
    assert features.cls.shape == (1, backbone.embed_dim)
    assert features.patches.shape == (len(layers), 1, grid[0] * grid[1], backbone.embed_dim)


def test_default_layers_follow_method_md():
    assert default_layers(24) == (6, 12, 18, 24)
    assert default_layers(12) == (3, 6, 9, 12)
    assert default_layers(4) == (1, 2, 3, 4)


def test_locality_mask_lets_patches_see_only_neighbours(tiny_backbone):
    mask = tiny_backbone.locality_mask(1)  # (1+N, 1+N)
    assert mask.shape == (197, 197)
    assert torch.isfinite(mask[0]).all() and torch.isfinite(mask[:, 0]).all()  # CLS sees and is seen by all
    # patch (0, 0) is index 1: it sees (0,0), (0,1), (1,0), (1,1) and CLS — five finite entries
    assert int(torch.isfinite(mask[1]).sum()) == 5
    features = tiny_backbone.encode_images(torch.rand(1, 3, 224, 224), locality_radius=1)
    assert torch.isfinite(features.patches).all()


def test_encode_images_is_deterministic_and_gradient_free(tiny_backbone):
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    a, b = tiny_backbone.encode_images(x), tiny_backbone.encode_images(x)
    assert torch.equal(a.patches, b.patches) and not a.patches.requires_grad


def test_preprocess_resizes_the_whole_image_without_cropping(tiny_backbone, tmp_path):
    from PIL import Image

    wide = Image.new("RGB", (400, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 40, 100))  # a blue band at the left border
    x = tiny_backbone.preprocess(wide)
    assert x.shape == (3, 224, 224) and 0 <= x.min() and x.max() <= 1
    assert x[2, 112, 5] > 0.9  # the left border survived (a centre crop would drop it)
    path = tmp_path / "img.png"
    wide.save(path)
    assert torch.allclose(tiny_backbone.load_images([path])[0], x)


@pytest.mark.parametrize("bad,match", [
    (torch.rand(1, 1, 224, 224), "3 colour channels"),
    (torch.full((1, 3, 224, 224), float("nan")), "NaN"),
    (torch.rand(1, 3, 100, 224), "224x224"),
    (torch.rand(1, 3, 224, 224) * 255, r"\[0, 1\]"),
])
def test_bad_image_tensors_get_clear_errors(tiny_backbone, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_backbone.encode_images(bad)


def test_corrupt_image_file_names_the_file(tiny_backbone, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        tiny_backbone.load_images([path])


def test_unknown_backbone_and_tag_are_clear_errors():
    with pytest.raises(apt_lab.UnknownBackboneError, match="ViT-Q-99"):
        apt_lab.load_backbone("ViT-Q-99")
    with pytest.raises(apt_lab.UnknownBackboneError, match="known tags"):
        apt_lab.load_backbone("ViT-B-16", pretrained="not-a-tag")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        apt_lab.load_backbone("apt-tiny", pretrained="/nonexistent/weights.bin")
    with pytest.raises(ValueError, match="blocks \\[9\\] do not exist"):
        apt_lab.load_backbone("apt-tiny", layers=(1, 9))


def test_local_checkpoint_file_loads_the_same_weights(tiny_backbone, tmp_path):
    # weights of another init seed: the default-seeded random init that load_backbone starts from cannot match them
    saved = apt_lab.load_backbone("apt-tiny", device="cpu", init_seed=1)
    path = tmp_path / "tiny.pt"
    torch.save(saved.model.state_dict(), path)
    loaded = apt_lab.load_backbone("apt-tiny", pretrained=str(path), device="cpu")
    assert loaded.pretrained_loaded
    x = torch.rand(1, 3, 224, 224)
    assert torch.equal(loaded.encode_images(x).cls, saved.encode_images(x).cls)
    assert not torch.equal(loaded.encode_images(x).cls, tiny_backbone.encode_images(x).cls)


def test_offline_weights_error_opens_no_connection_and_says_what_to_do(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1: fail before any network attempt (no connect, no download, so no retries)."""
    import socket

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("test: network forbidden")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(open_clip, "create_model", no_network)  # the download happens inside it
    with pytest.raises(apt_lab.WeightsUnavailableError) as error:  # an empty cache: the weights are not there
        apt_lab.load_backbone("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert attempts == []
    message = str(error.value)
    assert "'ViT-B-16'" in message and "'openai'" in message and "pretrained=None" in message


def test_random_weights_are_the_same_in_every_process_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = apt_lab.load_backbone("apt-tiny", device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(999)
    b = apt_lab.load_backbone("apt-tiny", device="cpu")
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name
    c = apt_lab.load_backbone("apt-tiny", device="cpu", init_seed=1)
    assert not torch.equal(a.model.visual.proj, c.model.visual.proj)
    code = ("import apt_lab, torch\nb = apt_lab.load_backbone('apt-tiny', device='cpu')\n"
            "print(repr(float(b.model.visual.proj.double().sum())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONHASHSEED="7"))
    assert float(out.stdout.strip()) == float(a.model.visual.proj.double().sum()), out.stderr


def test_a_fallback_to_random_weights_is_said_once_per_backbone(monkeypatch):
    """Issue 24: a run printed the random-weights notice twice (a warning, then the command line's banner)."""
    import types
    import warnings

    from apt_lab import backbone as module
    from apt_lab.config import APTConfig

    def fake_load(name, pretrained=None, **kwargs):
        if pretrained is not None:
            raise apt_lab.WeightsUnavailableError("offline (test)")
        return types.SimpleNamespace(name=name, fallback_reason=None)

    monkeypatch.setattr(module, "load_backbone", fake_load)
    monkeypatch.setattr(module, "ANNOUNCED", set(), raising=False)
    config = APTConfig.preset("quick", backbone__pretrained="openai")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # even so: once per process and backbone
        for _ in range(3):  # a run loads its backbone in several places (command line, sweep, severity)
            assert module.load_backbone_from_config(config, fallback_to_random=True).fallback_reason
        module.load_backbone_from_config(config.replace(backbone__pretrained="laion2b"), fallback_to_random=True)
    said = [str(w.message) for w in caught if "random weights" in str(w.message).lower()]
    assert len(said) == 2, said
    assert all(issubclass(w.category, module.RandomWeightsWarning) for w in caught)
    assert "'openai'" in said[0] and "RANDOM WEIGHTS" in said[0] and "offline (test)" in said[0]
    assert "'laion2b'" in said[1]
