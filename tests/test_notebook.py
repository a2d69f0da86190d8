"""apt_lab.notebook.setup: mode choice, quick-mode config, data selection, loud fallback to random weights."""
import types

import pytest
import torch

import apt_lab
from apt_lab.config import APTConfig
from apt_lab.notebook import choose_mode, setup


def test_choose_mode(monkeypatch):
    monkeypatch.setenv("APT_LAB_QUICK", "1")
    assert choose_mode() == "quick"
    monkeypatch.setenv("APT_LAB_QUICK", "0")
    assert choose_mode() == "full"
    monkeypatch.delenv("APT_LAB_QUICK")
    assert choose_mode() == ("full" if torch.cuda.is_available() else "quick")
    assert choose_mode("full") == "full"
    with pytest.raises(ValueError, match="mode="):
        choose_mode("fast")


def test_quick_session_prints_and_loads(monkeypatch, capsys):
    monkeypatch.setenv("APT_LAB_QUICK", "1")
    session = setup(seed=3)
    out = capsys.readouterr().out
    assert "mode: quick" in out and "seed 3" in out and "torch" in out and "preset: quick" in out
    assert session.quick and session.config.train.seed == 3 and session.dataset_name == "demo"
    assert session.config == APTConfig.preset("quick", train__seed=3)  # quick mode is exactly the quick preset
    assert session.k == session.config.train.k_shot == 2
    backbone = session.backbone()
    assert backbone is session.backbone()  # cached
    assert "brick" in session.categories() and session.dataset("brick").category == "brick"


def test_full_mode_falls_back_loudly_to_random_weights(monkeypatch, capsys):
    monkeypatch.delenv("APT_LAB_DATASET", raising=False)
    session = setup(mode="full", preset="quick", verbose=False, backbone__pretrained="openai")
    calls = []
    random_backbone = types.SimpleNamespace(name="apt-tiny", fallback_reason=None)

    def fake_load(name, pretrained=None, **kwargs):
        calls.append(pretrained)
        if pretrained is not None:
            raise apt_lab.WeightsUnavailableError("offline (test)")
        return random_backbone

    monkeypatch.setattr(apt_lab.backbone, "load_backbone", fake_load)
    with pytest.warns(UserWarning, match="random weights"):
        assert session.backbone() is random_backbone
    assert calls == ["openai", None]
    assert "RANDOM WEIGHTS" in capsys.readouterr().err


def test_full_mode_uses_a_benchmark_when_present(monkeypatch, tmp_path, capsys):
    (tmp_path / "mvtec" / "bottle" / "train").mkdir(parents=True)
    (tmp_path / "mvtec" / "bottle" / "test").mkdir()
    monkeypatch.setenv("APT_LAB_DATA", str(tmp_path))
    monkeypatch.setenv("APT_LAB_DATASET", "mvtec")
    session = setup(mode="full")
    assert session.dataset_name == "mvtec" and session.data_root == tmp_path / "mvtec"
    assert session.config.backbone.name == "ViT-B-16"  # preset "fast"
    monkeypatch.setenv("APT_LAB_DATA", str(tmp_path / "nowhere"))
    session = setup(mode="full")
    assert session.dataset_name == "demo" and "not found" in capsys.readouterr().out
