"""The docs site builds strictly; the notebooks are committed clean, share their common cells, pass ruff and follow
the header/Colab/device conventions."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["00_tour", "01_perturb", "02_prompts", "03_smgs", "04_score", "05_benchmark", "06_your_perturbation",
            "07_your_data"]
SCRIPT = ROOT / "scripts" / "notebooks.py"
HOOKS = ROOT / "scripts" / "mkdocs_hooks.py"
RAW_ROLE = re.compile(r":(func|mod|meth|class|data|attr|exc|obj):")  # Sphinx's, printed as is by markdown




def _load_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
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
    header = nb.cells[0]
    at = next(i for i, cell in enumerate(nb.cells) if "is cheating" in cell.source)
    header.source = header.source.replace("**What you will learn:**", "**What you will learn today:**")
    nb.cells[at].source = nb.cells[at].source.replace("is cheating", "is cheating (see the lecture notes)")
    nb.cells.insert(at + 1, nbformat.v4.new_markdown_cell("A note an instructor added.", id=uuid.uuid4().hex[:8]))
    for cell in nb.cells:  # what JupyterLab leaves behind when it saves (solutions stay collapsed: the convention)
        cell.id = uuid.uuid4().hex[:8]
        solution = "solution" in cell.metadata.get("tags", [])
        cell.metadata["jupyter"] = {"source_hidden": solution, "outputs_hidden": solution}
        cell.metadata["tags"] = [*cell.metadata.get("tags", []), "instructor"]
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
    nb.cells[3].source = nb.cells[3].source.replace("setup(seed=0,", "setup(seed=1,")


def _change_badge(nb):
    ref = _load_script().REF
    nb.cells[0].source = nb.cells[0].source.replace(f"apt_lab/blob/{ref}/", f"apt_lab/blob/old-{ref}/", 1)  # its ref


def _remove_badge(nb):
    badge = next(line for line in nb.cells[0].source.splitlines() if line.startswith("[![Open In Colab]"))
    nb.cells[0].source = nb.cells[0].source.replace("\n\n" + badge, "")


def _leave_an_output(nb):
    nb.cells[4].outputs = [nbformat.v4.new_output("stream", name="stdout", text="a run left this\n")]
    nb.cells[4].execution_count = 7


def _leave_widget_state(nb):
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}


def _solutions(nb):
    return [cell for cell in nb.cells if "solution" in cell.metadata.get("tags", [])]


def _expand_a_solution(nb):
    _solutions(nb)[0].metadata["jupyter"] = {"source_hidden": False, "outputs_hidden": False}


def _skip_a_solution(nb):
    _solutions(nb)[1].metadata["tags"].append("nbval-skip")


def _point_a_link_elsewhere(nb):
    ref, header = _load_script().REF, nb.cells[0]
    badge = next(line for line in header.source.splitlines() if line.startswith("[![Open In Colab]"))
    body = header.source.replace(badge, "\0").replace(f"apt_lab/blob/{ref}/", f"apt_lab/blob/old-{ref}/")
    assert body != header.source.replace(badge, "\0"), "the header links no file of this repository"
    header.source = body.replace("\0", badge)  # the links, not the badge


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
    (_expand_a_solution, "solution not collapsed"),
    (_skip_a_solution, "solution tagged nbval-skip"),
    (_point_a_link_elsewhere, "link(s) to this repository's files not at"),
], ids=["install", "setup", "badge", "no-badge", "output", "widget-state", "cell-metadata", "solution-expanded",
        "solution-skipped", "link"])
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
    assert all(cell.metadata["jupyter"] == {"source_hidden": True, "outputs_hidden": True}
               and "nbval-skip" not in cell.metadata["tags"] for cell in _solutions(nb))


def test_outputs_jupyterlab_saved_in_a_checkout_pass_until_they_are_staged(score_notebook, notebooks_script):
    """Issue 24: JupyterLab's autosave writes outputs into the working tree, and `make test` failed. In a git checkout
    the check reads outputs from git's index (what a commit stores); outputs staged for a commit still fail it."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=score_notebook.parent,
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", score_notebook.name)
    git("commit", "-q", "-m", "clean")
    nb = nbformat.read(score_notebook, as_version=4)
    _leave_an_output(nb)
    _leave_widget_state(nb)
    _leave_cell_metadata(nb)
    nbformat.write(nb, score_notebook)
    done = notebooks_script("--check", score_notebook)
    assert done.returncode == 0, done.stderr
    git("add", score_notebook.name)
    done = notebooks_script("--check", score_notebook)
    assert done.returncode == 1 and "outputs in cells 4" in done.stderr and "in git's index" in done.stderr, done.stderr


def test_a_solution_outside_the_guard_is_reported_not_rewritten(score_notebook, notebooks_script):
    nb = nbformat.read(score_notebook, as_version=4)
    solution = _solutions(nb)[0]
    solution.source = solution.source.replace("if session.solutions:\n", "if True:\n")
    nbformat.write(nb, score_notebook)
    saved = score_notebook.read_bytes()
    done = notebooks_script(score_notebook)
    assert done.returncode == 1 and "if session.solutions:" in done.stderr, done.stderr
    assert score_notebook.read_bytes() == saved


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
def test_notebook_teaches_with_paper_exercises_summary_and_next_link(path):
    """Every notebook: the paper and what it states vs our defaults in the header; 2-3 exercises, each with an
    expected outcome and a hidden solution nbval skips; "What you learned"; a link to the next notebook."""
    nb = nbformat.read(path, as_version=4)
    header = nb.cells[0].source
    assert "https://arxiv.org/abs/2508.16157" in header and "Paper vs our defaults" in header
    assert "states" in header and "our default" in header.lower()
    text = [c.source for c in nb.cells if c.cell_type == "markdown"]
    start = next(i for i, t in enumerate(text) if t.startswith("## Exercises"))
    exercises = [t for t in text[start:] if re.match(r"(## Exercises\n\n)?\*\*\d\. ", t)]
    assert 2 <= len(exercises) <= 3, f"{path.name}: {len(exercises)} exercises"
    assert all("*Expected:*" in t for t in exercises)
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert len(solutions) == len(exercises)
    for cell in solutions:  # Run All prints no answer; the tests (nbval) run every solution
        assert cell.cell_type == "code" and "nbval-skip" not in cell.metadata["tags"]
        assert cell.metadata.get("jupyter") == {"source_hidden": True, "outputs_hidden": True}, "stored collapsed"
        code = [line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")]
        assert code[0] == "if session.solutions:" and all(line.startswith("    ") for line in code[1:]), cell.source
    learned = next(t for t in text if t.startswith("## What you learned"))
    number = int(path.stem[:2])
    following = EXPECTED[number + 1] if number + 1 < len(EXPECTED) else EXPECTED[0]
    assert f"({following}.ipynb)" in learned.split("**Next:**", 1)[1]


def test_install_cell_pins_the_release_and_says_when_to_restart(monkeypatch, capsys):
    """The Colab install cell, run as IPython runs it, with pip simulated: a restart is asked for only when pip
    changed a package that was already imported; when pip fails, the cell stops with one line naming the ref."""
    import types
    from importlib.metadata import PackageNotFoundError

    from IPython.core.inputtransformer2 import TransformerManager

    script = _load_script()
    source = TransformerManager().transform_cell(script.INSTALL)
    version = script.VERSION
    assert f'__version__ = "{version}"' in (ROOT / "apt_lab" / "_version.py").read_text()
    installed = {"ipywidgets": "7.7.1", "numpy": "2.0.2"}  # apt-lab comes with the first pip call
    pip_calls = []

    def run_line_magic(name, line):
        pip_calls.append((name, line))
        installed.update(upgrade)

    shell = types.SimpleNamespace(run_line_magic=run_line_magic)
    monkeypatch.setattr("importlib.metadata.packages_distributions",
                        lambda: {"ipywidgets": ["ipywidgets"], "numpy": ["numpy"], "apt_lab": ["apt-lab"]})

    def version_of(name):
        if name not in installed:
            raise PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr("importlib.metadata.version", version_of)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    for module in ("ipywidgets", "numpy"):  # imported before the cell runs, as in Colab
        monkeypatch.setitem(sys.modules, module, sys.modules.get(module) or types.ModuleType(module))
    monkeypatch.delitem(sys.modules, "apt_lab", raising=False)
    upgrade = {}  # pip failed (a ref that does not exist, no network): not PackageNotFoundError but what to do
    with pytest.raises(RuntimeError) as failed:
        exec(source, {"get_ipython": lambda: shell})
    message = str(failed.value)
    assert "\n" not in message and failed.value.__suppress_context__, message
    assert f"github.com/{script.REPO} at {script.REF}:" in message and "run this cell again" in message, message
    for upgrade, expected in (({"apt-lab": version}, f"apt_lab {version} is installed; no restart needed."),
                              ({"ipywidgets": "8.1.5"}, "RESTART NEEDED: pip changed ipywidgets 7.7.1 → 8.1.5.")):
        exec(source, {"get_ipython": lambda: shell})
        assert capsys.readouterr().out.startswith(expected)
    assert pip_calls[0] == ("pip", f'install "apt-lab @ git+https://github.com/{script.REPO}@{script.REF}"')
    monkeypatch.delitem(sys.modules, "google.colab")
    exec(source, {"get_ipython": lambda: shell})  # outside Colab: nothing happens
    assert len(pip_calls) == 3 and capsys.readouterr().out == ""


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_published_ref_exists_in_this_repository():
    """Issue 24: every badge and install cell pointed at a tag that did not exist, so Colab's first cell failed. The
    ref of release.json resolves to a commit here, as a branch or tag (a fresh clone) or as a remote's branch (a
    checkout on another branch, or a detached one)."""
    ref = json.loads((ROOT / "release.json").read_text())["ref"]
    if _git("rev-parse", "--is-inside-work-tree").returncode != 0:
        pytest.skip("not a git checkout (an unpacked copy): no refs to resolve")
    names = [ref, *(f"{remote}/{ref}" for remote in _git("remote").stdout.split())]
    if any(_git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}").returncode == 0 for name in names):
        return
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip(f"a shallow checkout holds none of {names} (a CI run on a pull request); a clone of main checks it")
    pytest.fail(f"release.json: ref {ref!r} is neither a branch nor a tag of this repository (tried {names}), so every "
                "Colab badge and install cell fails; set it to a branch (\"main\") or push the tag "
                "(README.md, 'Publishing a release')")


def test_every_badge_install_cell_and_link_agrees_with_release_json():
    """Issue 19: the published address (repository, release tag) is written once, in release.json; every Colab badge,
    install cell and link to this repository's files in the notebooks, the docs' repository link and the install
    lines of the docs agree with it."""
    release = json.loads((ROOT / "release.json").read_text())
    repo, ref = release["repository"], release["ref"]
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "apt_lab" / "_version.py").read_text()).group(1)
    assert ref == f"v{version}" or not re.fullmatch(r"v\d+(\.\d+)*", ref), "a release tag names this version"
    addresses = re.compile(r"(colab\.research\.google\.com/github/|git\+https://github\.com/|https://github\.com/)"
                           r"([\w.-]+/[\w.-]+)(?:/(?:blob|tree)/|@)([\w.-]+)(/[\w./-]*)?")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        badge = f"(https://colab.research.google.com/github/{repo}/blob/{ref}/notebooks/{path.name})"
        assert badge in nb.cells[0].source, f"{path.name}: badge"
        assert f'%pip install "apt-lab @ git+https://github.com/{repo}@{ref}"' in nb.cells[1].source, path.name
        for cell in nb.cells:
            for _, found_repo, found_ref, rest in addresses.findall(cell.source):
                if found_repo.split("/")[1] == repo.split("/")[1] or (rest and (ROOT / rest.strip("/")).exists()):
                    assert (found_repo, found_ref) == (repo, ref), f"{path.name}: {found_repo}@{found_ref}{rest}"
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for _, found_repo, found_ref, _ in addresses.findall(page.read_text()):
            if found_repo == repo or found_repo.split("/")[1] == repo.split("/")[1]:
                assert found_repo == repo and (found_ref == ref or found_ref in ("main", "HEAD")), (page.name, found_ref)
    module = _load_script(HOOKS)
    assert module.on_config({}) == {"repo_url": f"https://github.com/{repo}", "repo_name": repo}
    assert not re.search(r"^repo_(url|name):", (ROOT / "mkdocs.yml").read_text(), re.M), "one place: release.json"


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


class _MathFinder(HTMLParser):
    """Raw TeX in a page's text (outside code, scripts and styles), split by whether MathJax would typeset it.

    Mirrors the MathJax options of scripts/mkdocs_hooks.py: an element with a class is skipped with all inside it,
    unless the class is ``arithmatex`` (markdown pages) or ``jp-MarkdownOutput`` (notebook markdown cells).
    """

    TEX = re.compile(r"\\\(|\\\[|\$[^$\n]{0,200}[\\_^][^$\n]{0,200}\$")
    SKIP = {"code", "pre", "script", "style", "textarea"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.processed, self.unprocessed = [], [], []  # stack: (tag, ignored)

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        classes = dict(attrs).get("class") or ""
        process = re.search(r"(^| )(arithmatex|jp-MarkdownOutput)( |$)", classes) is not None
        ignored = self.stack[-1][1] if self.stack else False
        self.stack.append((tag, (ignored or bool(classes.strip()) or tag in self.SKIP) and not process))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if any(tag in self.SKIP for tag, _ in self.stack):
            return
        ignored = self.stack[-1][1] if self.stack else False
        for found in self.TEX.finditer(data):
            (self.unprocessed if ignored else self.processed).append(found.group(0))


def _pre_blocks(html: str) -> list[str]:
    """The text of every <pre> block (highlighted code), tags stripped."""
    import html as html_lib

    return [html_lib.unescape(re.sub(r"<[^>]+>", "", block)) for block in re.findall(r"<pre[^>]*>(.*?)</pre>", html, re.S)]


def lists_in_paragraphs(html: str) -> list[str]:
    """List items a page prints as text inside a paragraph (" - …"): markdown needs a blank line before a list."""
    import html as html_lib

    found = []
    for body in re.findall(r"<p(?:\s[^>]*)?>(.*?)</p>", html, re.S):
        text = html_lib.unescape(re.sub(r"<[^>]+>", "", body))
        text = re.sub(r"\$\$.*?\$\$|\\\[.*?\\\]", "", text, flags=re.S)  # display math: "+ w_1 …" is a formula
        found += [line.strip()[:80] for line in text.split("\n")[1:] if re.match(r"\s*([-*+]|\d+\.)\s+\S", line)]
    return found


def plotly_figures(html: str) -> list:
    """Every figure a page draws (the arguments of its ``Plotly.newPlot`` calls) as ``go.Figure``."""
    import plotly.graph_objects as go

    decoder, figures = json.JSONDecoder(), []
    for call in re.finditer(r'Plotly\.newPlot\(\s*"[^"]*",\s*', html):
        data, end = decoder.raw_decode(html, call.end())
        layout, _ = decoder.raw_decode(html, end + re.match(r"\s*,\s*", html[end:]).end())
        figures.append(go.Figure(data=data, layout=layout, skip_invalid=True))
    return figures


def test_sphinx_roles_become_links_resolved_from_where_the_docstring_stands():
    """Issue 24: the API pages printed :func:`…` and the like literally, 101 times on 25 pages. The docs hook turns
    each role into an autorefs cross-reference to the full path, resolving the name as Python would from the
    docstring's object (its class, its module, the package); a name that resolves to nothing stays plain code."""
    import griffe

    hooks = _load_script(HOOKS)
    core = '''
class Thing:
    """Made by :func:`make`; :meth:`go` starts it."""

    def go(self):
        """Then :meth:`stop`, :func:`pkg.other.helper`, :data:`LIMIT` or :func:`nowhere`."""

    def stop(self):
        """Stops."""


def make():
    """A :class:`~pkg.core.Thing`; see :mod:`pkg` and :meth:`Thing.go`."""


LIMIT = 3
'''

    def ref(path, shown):
        return f'<autoref identifier="{path}" optional>`{shown}`</autoref>'

    with griffe.temporary_visited_package("pkg", {"__init__.py": "", "core.py": core,
                                                  "other.py": "from pkg.core import make as helper\n"}) as pkg:
        hooks.RolesAsLinks().on_package(pkg=pkg)
        docs = {path: pkg[path].docstring.value for path in ("core.Thing", "core.Thing.go", "core.make")}
    assert docs == {
        "core.Thing": f"Made by {ref('pkg.core.make', 'make')}; {ref('pkg.core.Thing.go', 'go')} starts it.",
        "core.Thing.go": f"Then {ref('pkg.core.Thing.stop', 'stop')}, {ref('pkg.core.make', 'pkg.other.helper')}, "
                         f"{ref('pkg.core.LIMIT', 'LIMIT')} or `nowhere`.",
        "core.make": f"A {ref('pkg.core.Thing', 'Thing')}; see {ref('pkg', 'pkg')} and "
                     f"{ref('pkg.core.Thing.go', 'Thing.go')}.",
    }
    assert not any(RAW_ROLE.search(text) for text in docs.values())


def test_a_table_figure_shows_every_row_on_a_docs_page():
    """Issue 24: the docs page of 03 cut off the last row of its metrics table (a plotly table is as high as its
    figure, sized for one line per cell, and the docs' narrow column wraps cells). On a page a table figure becomes
    an HTML table, which grows with its rows; other figures stay plotly."""
    from apt_lab import plots

    hooks = _load_script(HOOKS)
    rows = [{"run": f"λ=1, anchor on gradient and update, arm {i}", "image_auroc": i / 10} for i in range(6)]
    table = plots.metrics_table_figure([*rows, {"run": "mean", "image_auroc": 0.25}])
    table.update_layout(title="six arms")
    line = plots.go.Figure(plots.go.Scatter(y=[1, 2]))
    outputs = [nbformat.v4.new_output("display_data", data={hooks.PLOTLY_MIME: json.loads(figure.to_json())})
               for figure in (table, line)]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("", outputs=outputs)])
    hooks.docs_outputs(nb)
    html, plot = (output.data["text/html"] for output in nb.cells[0].outputs)
    head, body = html.split("<tbody>", 1)
    assert body.count("<tr") == 7 and "arm 5" in body and "<b>mean</b>" in body and "Plotly" not in html
    assert "six arms" in head and "image AUROC" in head and "AUROC" in body.split("</table>")[1]  # and a legend
    assert "Plotly.newPlot" in plot


def test_the_docs_checks_catch_what_issue_19_saw():
    """The page checks of test_strict_docs_build, on the faults the issue found on the published site."""
    paragraph = "<p>Textures keep the whole image.\n- <em>Which shape.</em> A random blob\n- <em>What.</em> One</p>"
    assert lists_in_paragraphs(paragraph) == ["- Which shape. A random blob", "- What. One"]
    assert lists_in_paragraphs("<p>one line</p><ul>\n<li>a list</li>\n</ul>") == []
    assert lists_in_paragraphs("<p>$$L = a\n+ w_1 b\n- w_2 c$$</p>") == []
    from plotly.subplots import make_subplots

    from apt_lab import plots

    old = make_subplots(rows=1, cols=3, subplot_titles=("losses", "gradient conflicts (SMGS acts)",
                                                        "meta-prompt drift, anchor similarity"))
    old.update_layout(title="prompt tuning — no steps yet", margin=dict(l=40, r=10, t=70, b=40))
    page = old.to_html(include_plotlyjs=False, full_html=False)
    (figure,) = plotly_figures(page)
    assert plots.title_overlaps(figure, DOCS_WIDTH) and "no steps yet" in figure.layout.title.text


DOCS_WIDTH = 700  # px: a figure's width in the docs site's content column
PLACEHOLDERS = ("no steps yet", "waiting for the first tuning step")  # a widget drawn before anything happened


def test_strict_docs_build(tmp_path):
    """The site builds strictly; notebook pages show executed outputs (plots, widgets' first picture); math is
    typeset offline by the bundled MathJax; docstring examples render as code; nothing loads from a CDN. Lists
    render as lists; no widget shows its empty placeholder; no figure's titles overlap; the training dashboard of 03
    shows finished curves; histograms of several classes share bins; JupyterLab's checkpoint copies are ignored."""
    site = tmp_path / "site"
    checkpoints = ROOT / "notebooks" / ".ipynb_checkpoints"  # what JupyterLab leaves: never executed nor published
    planted = checkpoints / "03_smgs-checkpoint.ipynb"
    made_folder = not checkpoints.exists()
    if not planted.exists():
        broken = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('a checkpoint ran')")])
        checkpoints.mkdir(exist_ok=True)
        nbformat.write(broken, planted)
    else:
        planted = None  # someone's real checkpoint: leave it alone
    try:
        done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                              cwd=ROOT, capture_output=True, text=True, timeout=3600)
    finally:
        if planted is not None:
            planted.unlink()
            if made_folder:
                checkpoints.rmdir()
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(site.rglob("*ipynb_checkpoints*")) + list(site.rglob("*-checkpoint*")), \
        "a .ipynb_checkpoints copy was published"
    for page in ("index.html", "installation/index.html", "method/index.html", "widgets/index.html",
                 "data/index.html", "api/index.html", "api/backbone/index.html", "api/widgets/index.html",
                 "notebooks/00_tour/index.html", "notebooks/07_your_data/index.html"):
        assert (site / page).is_file(), page
    assert "load_backbone" in (site / "api/backbone/index.html").read_text()
    assert "perturbation_explorer" in (site / "api/widgets/index.html").read_text()
    tour = (site / "notebooks/00_tour/index.html").read_text()
    assert "tune_prompts" in tour and "colab-badge" in tour
    assert (site / "images/01_perturb_widget.png").is_file()

    pages = {path.relative_to(site).as_posix(): path.read_text() for path in site.rglob("*.html")}
    for name, html in pages.items():
        assert not re.search(r'src="(https?:)?//[^"]*(mathjax|plotly|require)', html, re.I), f"{name} loads from a CDN"
        scripts = re.findall(r'<script[^>]*\ssrc="([^"]+)"', html)
        for src in scripts:
            if not src.startswith(("http:", "https:", "//")):  # every local script exists in the site
                local = site / src.lstrip("/") if src.startswith("/") else (site / name).parent / src
                assert local.resolve().with_name(local.name.split("?")[0]).is_file(), (name, src)
        finder = _MathFinder()
        finder.feed(html)
        assert not finder.unprocessed, f"{name}: TeX MathJax never sees: {finder.unprocessed[:3]}"
        if finder.processed:
            assert any(src.endswith("assets/mathjax/tex-svg.js") for src in scripts), f"{name}: math without MathJax"
    for name in ("method/index.html", "notebooks/03_smgs/index.html", "notebooks/04_score/index.html"):
        finder = _MathFinder()
        finder.feed(pages[name])
        assert finder.processed, f"{name}: expected formulas"

    for notebook in EXPECTED:
        html = pages[f"notebooks/{notebook}/index.html"]
        assert 'class="plotly-graph-div' in html and "Plotly.newPlot" in html, f"{notebook}: no plot output"
        assert "assets/javascripts/plotly.min.js" in html.split("</head>")[0], f"{notebook}: plotly.js not in <head>"
        assert "Traceback (most recent call last)" not in html, f"{notebook}: a cell raised"
        assert "# Solution (click to show)" not in html, f"{notebook}: an exercise's solution is on the page"
    for notebook in ("01_perturb", "03_smgs", "04_score"):  # widgets show their first picture on a static page
        assert 'class="apt-lab-static"' in pages[f"notebooks/{notebook}/index.html"], notebook

    from apt_lab import plots

    for name, html in pages.items():
        assert not lists_in_paragraphs(html), f"{name}: a markdown list rendered inside a paragraph"
        if name.startswith("notebooks/"):
            for placeholder in PLACEHOLDERS:
                assert placeholder not in html, f"{name}: a widget shows its empty placeholder {placeholder!r}"
            for figure in plotly_figures(html):
                assert not plots.title_overlaps(figure, DOCS_WIDTH), (name, plots.title_overlaps(figure, DOCS_WIDTH))
    dashboards = [f for f in plotly_figures(pages["notebooks/03_smgs/index.html"])
                  if (f.layout.title.text or "").startswith("prompt tuning")]
    assert dashboards and all(len(f.data) >= 3 and len(f.data[0].x) > 1 for f in dashboards), "03: dashboard empty"
    histograms = [f for f in plotly_figures(pages["notebooks/04_score/index.html"])
                  if f.data and all(t.type == "histogram" for t in f.data) and len(f.data) > 1]
    assert histograms, "04: no score histogram"
    for figure in histograms:
        assert len({(t.xbins.start, t.xbins.size) for t in figure.data}) == 1, "04: classes binned differently"

    for name, html in pages.items():  # Sphinx roles became links (or plain code), none printed as is
        assert not RAW_ROLE.search(html), f"{name}: {RAW_ROLE.search(html).group(0)} printed as is"
    api_links = sum(html.count('class="autorefs autorefs-internal"') for name, html in pages.items()
                    if name.startswith("api/"))
    assert api_links > 50, f"only {api_links} cross-references on the API pages"
    for name, html in pages.items():  # tables are HTML tables, whole however narrow the page (issue 24)
        assert not any(trace.type == "table" for figure in plotly_figures(html) for trace in figure.data), name
    tables = re.findall(r'<div class="apt-lab-table">(.*?)</div>', pages["notebooks/03_smgs/index.html"], re.S)
    metrics = [table for table in tables if "anchor similarity" in table]
    assert metrics and metrics[0].split("<tbody>")[1].count("<tr") >= 2, "03: the metrics table lost its rows"

    losses = _pre_blocks(pages["api/losses/index.html"])  # "Example (…):" sections render as code
    assert any(">>> round(float(focal_loss(torch.zeros(1, 1, 2, 2)" in block for block in losses)
    assert "Example (p_t = 0.5 everywhere" in pages["api/losses/index.html"]
