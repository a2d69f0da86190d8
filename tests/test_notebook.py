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
    monkeypatch.setattr(apt_lab.backbone, "ANNOUNCED", set())
    with pytest.warns(apt_lab.backbone.RandomWeightsWarning, match="random weights") as caught:
        assert session.backbone() is random_backbone
    assert calls == ["openai", None]
    assert "RANDOM WEIGHTS" in str(caught[0].message) and len(caught) == 1
    assert "RANDOM WEIGHTS" not in capsys.readouterr().err  # the warning is the one notice (it printed twice)


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


def _benchmark(folder, name="mvtec"):
    (folder / name / "bottle" / "train").mkdir(parents=True)
    (folder / name / "bottle" / "test").mkdir()
    return folder / name


def test_setup_arguments_win_over_the_environment(monkeypatch, tmp_path, capsys):
    mvtec = _benchmark(tmp_path / "drive")
    monkeypatch.setenv("APT_LAB_DATA", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("APT_LAB_DATASET", "visa")
    monkeypatch.setenv("APT_LAB_QUICK", "1")
    session = setup(mode="full", dataset="mvtec", data_root=tmp_path / "drive", verbose=True)
    assert session.mode == "full" and session.dataset_name == "mvtec" and session.data_root == mvtec
    assert f"data: mvtec at {mvtec}" in capsys.readouterr().out
    # data_root may also be the dataset folder itself; an explicit dataset counts in quick mode too
    session = setup(mode="quick", dataset="MVTec", data_root=mvtec, verbose=False)
    assert session.quick and (session.dataset_name, session.data_root) == ("mvtec", mvtec)
    assert session.config == APTConfig.preset("quick", train__seed=0)  # the data never changes the preset
    # without arguments, quick mode ignores APT_LAB_DATASET: the demo set
    assert setup(verbose=False).dataset_name == "demo"


def test_setup_with_a_missing_dataset_folder_says_where_it_looked(tmp_path):
    (tmp_path / "datasets").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no folder at .*datasets/mvtec.*data_root="):
        setup(mode="full", dataset="mvtec", data_root=tmp_path / "datasets", verbose=False)
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        setup(mode="quick", dataset="imagenet", verbose=False)


def test_colab_helpers_refuse_outside_colab_and_use_drive_and_files_inside(monkeypatch, tmp_path):
    import io
    import sys
    import zipfile

    from apt_lab.notebook import DRIVE_MOUNT, mount_drive, upload_files

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    with pytest.raises(RuntimeError, match="only in Google Colab"):
        mount_drive()
    with pytest.raises(RuntimeError, match="only in Google Colab"):
        upload_files(tmp_path)

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("my_parts/good/a.png", b"png bytes")
        z.writestr("my_parts/bad/b.png", b"png bytes")
    mounted = []
    drive = types.ModuleType("google.colab.drive")
    drive.mount = mounted.append
    files = types.ModuleType("google.colab.files")
    files.upload = lambda: {"photo.png": b"\x89PNG", "../escape.jpg": b"jpg", "parts.zip": archive.getvalue()}
    colab = types.ModuleType("google.colab")
    colab.drive, colab.files = drive, files
    google = types.ModuleType("google")
    google.colab = colab
    for name, module in (("google", google), ("google.colab", colab), ("google.colab.drive", drive),
                         ("google.colab.files", files)):
        monkeypatch.setitem(sys.modules, name, module)

    assert mount_drive("datasets") == DRIVE_MOUNT / "MyDrive" / "datasets" and mounted == [str(DRIVE_MOUNT)]
    written = upload_files(tmp_path / "mine")
    assert sorted(p.name for p in written) == ["bad", "escape.jpg", "good", "photo.png"]  # zip: wrapper dropped
    assert (tmp_path / "mine" / "photo.png").read_bytes() == b"\x89PNG"
    assert (tmp_path / "mine" / "bad" / "b.png").is_file() and (tmp_path / "mine" / "good" / "a.png").is_file()
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "mine" / "parts.zip").exists()


def test_solutions_run_only_when_asked_or_under_the_tests(monkeypatch, capsys):
    """Issue 19: Run All printed every exercise's answer. Solution cells run ``if session.solutions:``: off for a
    reader, on under pytest/nbval (its kernels inherit PYTEST_CURRENT_TEST) or with APT_LAB_SOLUTIONS=1."""
    from apt_lab.notebook import choose_solutions

    monkeypatch.delenv("APT_LAB_SOLUTIONS", raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    assert choose_solutions() is False and choose_solutions(True) is True  # a reader's kernel
    assert setup(mode="quick", verbose=False).solutions is False
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "notebooks/03_smgs.ipynb::Cell 3 (call)")
    assert choose_solutions() is True and choose_solutions(False) is False  # nbval's kernel; the argument wins
    monkeypatch.setenv("APT_LAB_SOLUTIONS", "0")
    assert choose_solutions() is False
    monkeypatch.setenv("APT_LAB_SOLUTIONS", "1")
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    session = setup(mode="quick", seed=1)
    assert session.solutions and "exercise solutions: run with the notebook" in capsys.readouterr().out
