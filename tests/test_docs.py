"""The docs site builds strictly; the notebooks are committed clean, share their common cells, pass ruff and follow
the header/Colab/device conventions."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["00_tour", "01_perturb", "02_prompts", "03_smgs", "04_score", "05_benchmark", "06_your_perturbation",
            "07_your_data"]
SCRIPT = ROOT / "scripts" / "notebooks.py"




def _load_script():
    spec = importlib.util.spec_from_file_location("notebooks_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def notebooks_script(capsys):
    """Run scripts/notebooks.py in this process (no interpreter start-up): ``notebooks_script(*args)``."""
    main = _load_script().main

    def run(*args) -> subprocess.CompletedProcess:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


def test_eight_numbered_notebooks():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


def test_notebooks_share_their_common_cells_and_have_no_outputs():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def score_notebook(tmp_path) -> Path:
    """A copy of notebook 04 (same file name: the badge line names it)."""
    return Path(shutil.copy(ROOT / "notebooks" / "04_score.ipynb", tmp_path / "04_score.ipynb"))


def test_an_edit_saved_by_jupyterlab_keeps_the_check_green(score_notebook, notebooks_script):
    nb = nbformat.read(score_notebook, as_version=4)
    header, threshold_text = nb.cells[0], nb.cells[9]
    header.source = header.source.replace("**What you will learn:**", "**What you will learn today:**")
    threshold_text.source = threshold_text.source.replace("is cheating", "is cheating (see the lecture notes)")
    nb.cells.insert(10, nbformat.v4.new_markdown_cell("A note an instructor added.", id=uuid.uuid4().hex[:8]))
    for cell in nb.cells:  # what JupyterLab leaves behind when it saves
        cell.id = uuid.uuid4().hex[:8]
        cell.metadata["jupyter"] = {"source_hidden": False, "outputs_hidden": False}
        cell.metadata["tags"] = ["instructor"]
        cell.metadata["editable"] = True
    nb.metadata["language_info"] = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                                    "mimetype": "text/x-python", "name": "python", "version": "3.11.9"}
    nbformat.write(nb, score_notebook)  # indent 1, sorted keys: JupyterLab's own writer
    saved = score_notebook.read_bytes()
    done = notebooks_script("--check", score_notebook)
    assert done.returncode == 0, done.stderr
    fixed = notebooks_script(score_notebook)
    assert fixed.returncode == 0 and "0 of 1 notebooks changed" in fixed.stdout, fixed.stdout + fixed.stderr
    assert score_notebook.read_bytes() == saved  # nothing the instructor wrote or JupyterLab added is touched


def _change_install(nb):
    nb.cells[1].source = nb.cells[1].source.replace("apt-lab/apt_lab", "someone/fork")


def _change_setup(nb):
    nb.cells[3].source = nb.cells[3].source.replace("setup(seed=0)", "setup(seed=1)")


def _change_badge(nb):
    nb.cells[0].source = nb.cells[0].source.replace("/blob/main/", "/blob/dev/")


def _remove_badge(nb):
    badge = next(line for line in nb.cells[0].source.splitlines() if line.startswith("[![Open In Colab]"))
    nb.cells[0].source = nb.cells[0].source.replace("\n\n" + badge, "")


def _leave_an_output(nb):
    nb.cells[4].outputs = [nbformat.v4.new_output("stream", name="stdout", text="a run left this\n")]
    nb.cells[4].execution_count = 7


def _leave_widget_state(nb):
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}


def _leave_cell_metadata(nb):
    nb.cells[6].metadata["collapsed"] = True
    nb.cells[6].metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00.000Z"}


@pytest.mark.parametrize("edit, message", [
    (_change_install, "install cell (cell 1) differs"),
    (_change_setup, "setup cell (cell 3) differs"),
    (_change_badge, "Colab badge line in the header (cell 0) differs"),
    (_remove_badge, "no Colab badge line in the header (cell 0)"),
    (_leave_an_output, "outputs in cells 4"),
    (_leave_widget_state, "notebook metadata 'widgets'"),
    (_leave_cell_metadata, "cell metadata 'collapsed' in cells 6"),
], ids=["install", "setup", "badge", "no-badge", "output", "widget-state", "cell-metadata"])
def test_the_check_fails_on_a_changed_shared_cell_or_a_left_output(score_notebook, notebooks_script, edit,
                                                                   message):
    nb = nbformat.read(score_notebook, as_version=4)
    original = [cell.source for cell in nb.cells]
    edit(nb)
    nbformat.write(nb, score_notebook)
    broken = score_notebook.read_bytes()
    done = notebooks_script("--check", score_notebook)
    assert done.returncode == 1 and "04_score.ipynb" in done.stderr and message in done.stderr, done.stderr
    assert score_notebook.read_bytes() == broken  # --check changes nothing
    fixed = notebooks_script(score_notebook)
    assert fixed.returncode == 0 and "fixed" in fixed.stdout, fixed.stdout + fixed.stderr
    assert notebooks_script("--check", score_notebook).returncode == 0
    nb = nbformat.read(score_notebook, as_version=4)
    assert [cell.source for cell in nb.cells] == original and not nb.cells[4].outputs


def test_a_missing_shared_cell_is_reported_and_no_cell_overwritten(score_notebook, notebooks_script):
    nb = nbformat.read(score_notebook, as_version=4)
    del nb.cells[1]  # the install cell: the setup cell moves to position 2, the first lesson cell to 3
    nbformat.write(nb, score_notebook)
    saved = score_notebook.read_bytes()
    for args in (("--check",), ()):  # reported, and not "fixed" by overwriting the lesson's first code cell
        done = notebooks_script(*args, score_notebook)
        assert done.returncode == 1, done.stdout
        assert "cell 1 should be the install cell" in done.stderr and "cell 3 should be the setup cell" in done.stderr
    assert score_notebook.read_bytes() == saved


def test_notebook_code_passes_ruff():
    """Pyflakes (undefined or unused names, …) and syntax errors, as for the library; ruff reads .ipynb itself."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E9",
                           "--output-format", "concise", "notebooks"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_header_and_device_conventions(path):
    """The header's text and the code's device habits (the shared cells are checked by scripts/notebooks.py)."""
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    header = "".join(cells[0]["source"])
    assert header.startswith("# ") and "What you will learn" in header and "Time and hardware" in header
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
