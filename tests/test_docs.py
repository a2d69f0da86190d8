"""The docs site builds strictly, the notebooks are committed clean and follow the header/Colab conventions."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["00_tour", "01_perturb", "02_prompts", "03_smgs", "04_score", "05_benchmark", "06_your_perturbation",
            "07_your_data"]


def test_eight_numbered_notebooks():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


def test_notebooks_match_their_generator_and_have_no_outputs():
    for script in ("make_notebooks.py", "clean_notebooks.py"):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--check"], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_header_colab_and_device_conventions(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    header = "".join(cells[0]["source"])
    assert header.startswith("# ") and "What you will learn" in header and "Time and hardware" in header
    badge = f"https://colab.research.google.com/github/apt-lab/apt_lab/blob/main/notebooks/{path.name}"
    assert badge in header
    install = "".join(cells[1]["source"])
    assert cells[1]["cell_type"] == "code" and '"google.colab" in sys.modules' in install and "pip" in install
    setup = "".join(cells[3]["source"])
    assert "setup(seed=0)" in setup
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert not re.search(r"\.cuda\(|device=[\"']cuda|\.half\(|float16", code), "never hard-code CUDA or fp16"
    assert any(c["cell_type"] == "code" and "assert " in "".join(c["source"]) for c in cells)


def test_strict_docs_build(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for page in ("index.html", "installation/index.html", "method/index.html", "widgets/index.html",
                 "data/index.html", "api/index.html", "api/backbone/index.html", "api/widgets/index.html",
                 "notebooks/00_tour/index.html", "notebooks/07_your_data/index.html"):
        assert (site / page).is_file(), page
    assert "load_backbone" in (site / "api/backbone/index.html").read_text()
    assert "perturbation_explorer" in (site / "api/widgets/index.html").read_text()
    tour = (site / "notebooks/00_tour/index.html").read_text()
    assert "tune_prompts" in tour and "colab-badge" in tour
    assert (site / "images/01_perturb_widget.png").is_file()
