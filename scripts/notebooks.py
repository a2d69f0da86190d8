"""Stamp and check the cells every notebook shares, and strip outputs (notebooks are committed clean).

Usage: python scripts/notebooks.py [--check] [NOTEBOOK ...]     (default: notebooks/*.ipynb)

The notebooks are the source: edit them in JupyterLab (or any editor) and commit them. This script owns only
what all of them share, written once below — the Colab badge line of the header (cell 0), the install cell
(cell 1), the setup cell (cell 3), the links to this repository's files, and the form of the exercises' solution
cells — and it strips outputs, execution counts and volatile metadata (outputs hold megabytes of plotly.js and
change on every run; nbval executes the notebooks from clean in ``make test``). Everything else in a notebook (its
text, its other cells, cell ids, JupyterLab's cell metadata) is left alone.

Without ``--check`` it fixes the notebooks in place; with ``--check`` it changes nothing and exits 1, naming
each notebook and what differs. ``--check`` looks for outputs in the copy git holds (the index: what the next
commit stores), not in the working tree, where JupyterLab's autosave writes them while you work; outside a git
checkout, or for an untracked notebook, it reads the file.

The published address — GitHub repository and git ref (a branch, or a release tag once it is pushed) — is read
from ``release.json`` at the repository root, the one place it is written. A release or a course fork edits that
file and runs this script; README.md ("Publishing a release") has the steps.

Solution cells (tagged ``solution``) start with the SOLUTION_HEADER comment, run their body only
``if session.solutions:`` (off for a reader's Run All, on under the tests: ``apt_lab.notebook.choose_solutions``),
and are stored with source and outputs collapsed; the script re-collapses them, and reports a solution cell
without the guard (it never rewrites someone's code).
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
RELEASE_FILE = ROOT / "release.json"
VERSION = re.search(r'__version__\s*=\s*"([^"]+)"', (ROOT / "apt_lab" / "_version.py").read_text()).group(1)


def read_release(path: Path = RELEASE_FILE) -> tuple[str, str]:
    """(repository "owner/name", ref) from ``release.json``; a clear error when the file is missing or wrong."""
    try:
        data = json.loads(path.read_text())
        repo, ref = data["repository"], data["ref"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{path}: cannot read the published address ({error!r}); it must be a JSON object with "
                         '"repository" (GitHub owner/name) and "ref" (a tag such as "v0.2.0", or a branch)')
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(repo)) or not re.fullmatch(r"[\w./-]+", str(ref)):
        raise SystemExit(f"{path}: repository={repo!r} must be GitHub's owner/name and ref={ref!r} a tag or branch")
    return repo, ref


REPO, REF = read_release()  # where the Colab badges, the install cell and the links to the docs point
SOLUTION_TAG = "solution"
SOLUTION_HEADER = ("# Solution (click to show). Run All skips it unless solutions=True in the setup cell (the tests "
                   "run it);\n# to run it now: session.solutions = True, then run this cell.")
SOLUTION_GUARD = "if session.solutions:"
SOLUTION_HIDDEN = {"source_hidden": True, "outputs_hidden": True}

BADGE_START = "[![Open In Colab]"
BADGE = (BADGE_START + "(https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/{repo}/blob/{ref}/notebooks/{name})")
# A link to a file of this repository at some ref, e.g. https://github.com/apt-lab/apt_lab/blob/v0.2.0/docs/method.md
REPO_LINK = re.compile(r"https://github\.com/([\w.-]+/[\w.-]+)/(blob|tree)/([\w.-]+)/([\w./-]+)")

# A visible `%pip install` pinned to the published ref. Colab imports some packages (ipywidgets, numpy, ...) when
# the kernel starts; if pip changed one of those, the new version is used only after a restart, and the cell says
# so. When pip fails (its message stays above), the cell stops with one line naming the ref and what to check.
INSTALL = f'''# Colab only: install apt_lab from github.com/{REPO} at {REF}, the version these notebooks belong to.
# Elsewhere nothing happens (in a clone: `make install`).
import sys

if "google.colab" in sys.modules:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    loaded = {{d: version(d) for m, ds in packages_distributions().items() if m in sys.modules for d in ds}}
    %pip install "apt-lab @ git+https://github.com/{REPO}@{REF}"
    try:
        installed = version("apt-lab")
    except PackageNotFoundError:  # pip failed; its error is above
        raise RuntimeError("pip could not install apt-lab from github.com/{REPO} at {REF}: check that "
                           "https://github.com/{REPO}/tree/{REF} exists and the runtime is online, "
                           "then run this cell again") from None
    changed = [f"{{d}} {{v}} → {{version(d)}}" for d, v in loaded.items() if version(d) != v]
    if changed:  # already imported at an older version: only a restart loads the new one
        print(f"RESTART NEEDED: pip changed {{', '.join(changed)}}. Runtime → Restart session, then run the next cells.")
    else:
        print(f"apt_lab {{installed}} is installed; no restart needed.")'''

SETUP = '''# The same imports in every notebook (hence the noqa: a notebook may leave one of them unused).
import torch  # noqa: F401

import apt_lab  # noqa: F401
from apt_lab import plots, widgets  # noqa: F401
from apt_lab.notebook import setup

# mode: None = quick on a CPU, full on a GPU (or "quick" / "full"); dataset: "demo" or e.g. "mvtec" with data_root=
# the folder that holds mvtec/ (in Colab: data_root=apt_lab.notebook.mount_drive("datasets")).
# solutions: True also runs the exercises' hidden solution cells on Run All (None: only when the tests run them).
session = setup(seed=0, mode=None, dataset=None, data_root=None, solutions=None)
config = session.config
backbone = session.backbone()
backbone'''

SHARED_CODE_CELLS = {1: ("install cell", "INSTALL", INSTALL), 3: ("setup cell", "SETUP", SETUP)}
VOLATILE_NOTEBOOK_METADATA = ("widgets", "execution", "varInspector")
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled")


def badge(name: str) -> str:
    """The Colab badge line of notebook file ``name`` (e.g. ``04_score.ipynb``)."""
    return BADGE.format(repo=REPO, ref=REF, name=name)


def _diff(found: str, expected: str) -> str:
    lines = difflib.unified_diff(found.splitlines(), expected.splitlines(), "in the notebook", "template",
                                 lineterm="", n=0)
    return "\n".join("      " + line for line in list(lines)[:12])


def _resembles(source: str, template: str) -> bool:
    """Whether ``source`` is a drifted copy of ``template`` (safe to overwrite) rather than some other cell.

    Other notebook cells score below 0.1 against the templates; an edited shared cell stays well above 0.5. A
    cell that starts with the template's opening words (an older version of the template) counts too.
    """
    opening = " ".join(template.split("\n", 1)[0].split()[:5])  # e.g. "# Colab only: install apt_lab"
    return source.startswith(opening) or difflib.SequenceMatcher(None, source, template).ratio() >= 0.5


def _stamp_badge(header: nbformat.NotebookNode, name: str) -> str | None:
    """Put the badge line into the header cell; returns what was wrong, or None."""
    expected = badge(name)
    lines = header.source.split("\n")
    found = [i for i, line in enumerate(lines) if line.startswith(BADGE_START)]
    if found and lines[found[0]] == expected:
        return None
    if found:
        problem = f"Colab badge line in the header (cell 0) differs:\n      found    {lines[found[0]]}\n" \
                  f"      expected {expected}"
        lines[found[0]] = expected
    else:
        problem = "no Colab badge line in the header (cell 0)"
        lines[1:1] = ["", expected]  # under the title line
    header.source = "\n".join(lines)
    return problem


def _stamp_links(cell: nbformat.NotebookNode) -> int:
    """Point every link to a file of this repository (``github.com/<owner>/<name>/blob/<ref>/<path>`` where
    ``<path>`` exists here) at REPO and REF; returns how many changed. Links to other projects are left alone."""
    changed = 0

    def fix(found: re.Match) -> str:
        nonlocal changed
        repo, kind, ref, path = found.groups()
        if not (ROOT / path.rstrip("/")).exists() or (repo, ref) == (REPO, REF):
            return found.group(0)
        changed += 1
        return f"https://github.com/{REPO}/{kind}/{REF}/{path}"

    cell.source = REPO_LINK.sub(fix, cell.source)
    return changed


def _tidy_solution(cell: nbformat.NotebookNode, index: int) -> tuple[list[str], list[str]]:
    """A solution cell: SOLUTION_HEADER, the body under SOLUTION_GUARD, source and outputs collapsed, not skipped by
    nbval. Collapsing and the tags are fixed; a missing header or guard is reported (the code is someone's)."""
    fixed, unfixable = [], []
    code = [line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")]
    if cell.cell_type != "code" or not cell.source.startswith(SOLUTION_HEADER) or not code \
            or code[0] != SOLUTION_GUARD:
        unfixable.append(f"cell {index} is tagged {SOLUTION_TAG!r} but does not start with SOLUTION_HEADER followed "
                         f"by {SOLUTION_GUARD!r} (scripts/notebooks.py): put its body under that guard, so Run All "
                         "does not print the answer and the tests still run it")
        return fixed, unfixable
    tags = cell.metadata.get("tags", [])
    if "nbval-skip" in tags:
        cell.metadata["tags"] = [tag for tag in tags if tag != "nbval-skip"]
        fixed.append(f"cell {index}: solution tagged nbval-skip (the tests run every solution)")
    hidden = cell.metadata.get("jupyter", {})
    if any(hidden.get(key) is not True for key in SOLUTION_HIDDEN):
        cell.metadata["jupyter"] = {**hidden, **SOLUTION_HIDDEN}
        fixed.append(f"cell {index}: solution not collapsed (source and outputs are stored hidden)")
    return fixed, unfixable


def tidy(nb: nbformat.NotebookNode, name: str) -> tuple[list[str], list[str]]:
    """Stamp the shared cells of ``nb`` in place (``strip`` removes outputs).

    Returns (fixed, unfixable): what was wrong and has been fixed in ``nb``, and what needs a person (a shared
    cell missing, or a cell in its place that is not like it: inserting or overwriting a cell could destroy
    someone's work, so the script never does).
    """
    fixed, unfixable = [], []
    cells = nb.cells
    if not cells or cells[0].cell_type != "markdown":
        unfixable.append("cell 0 should be the markdown header (title, Colab badge, what you will learn)")
    else:
        problem = _stamp_badge(cells[0], name)
        if problem:
            fixed.append(problem)
    for index, (what, constant, template) in SHARED_CODE_CELLS.items():
        if index >= len(cells) or cells[index].cell_type != "code":
            kind = cells[index].cell_type if index < len(cells) else "no"
            unfixable.append(f"cell {index} should be the {what} (code, {constant} in scripts/notebooks.py), found "
                             f"a {kind} cell; was a cell inserted or deleted above it? Put the {what} back at "
                             f"position {index} in JupyterLab, then run this script")
        elif not _resembles(cells[index].source, template):
            unfixable.append(f"cell {index} should be the {what} ({constant} in scripts/notebooks.py), found a code "
                             f"cell that is not like it (left alone: it may be someone's code); was a cell inserted "
                             f"or deleted above it? Put the {what} back at position {index}, then run this script")
        elif cells[index].source != template:
            fixed.append(f"{what} (cell {index}) differs from {constant} in scripts/notebooks.py:\n"
                         f"{_diff(cells[index].source, template)}")
            cells[index].source = template
    links = sum(_stamp_links(cell) for cell in cells if cell.cell_type == "markdown")
    if links:
        fixed.append(f"{links} link(s) to this repository's files not at {REPO}@{REF} (release.json)")
    for index, cell in enumerate(cells):
        if SOLUTION_TAG in cell.metadata.get("tags", []):
            done, needs_person = _tidy_solution(cell, index)
            fixed += done
            unfixable += needs_person
    return fixed, unfixable


def strip(nb: nbformat.NotebookNode) -> list[str]:
    """Remove what running a notebook leaves in it (outputs, execution counts, volatile metadata) from ``nb`` in
    place; returns what was removed."""
    fixed = []
    for key in VOLATILE_NOTEBOOK_METADATA:
        if nb.metadata.pop(key, None) is not None:
            fixed.append(f"notebook metadata {key!r}")
    outputs, counts, metadata = [], [], {key: [] for key in VOLATILE_CELL_METADATA}
    for index, cell in enumerate(nb.cells):
        for key in VOLATILE_CELL_METADATA:
            if cell.metadata.pop(key, None) is not None:
                metadata[key].append(index)
        if cell.cell_type == "code":
            if cell.outputs:
                outputs.append(index)
            if cell.execution_count is not None:
                counts.append(index)
            cell.outputs, cell.execution_count = [], None
    if outputs:
        fixed.append(f"outputs in cells {', '.join(map(str, outputs))} (notebooks are committed without outputs)")
    if counts:
        fixed.append(f"execution counts in cells {', '.join(map(str, counts))}")
    for key, where in metadata.items():
        if where:
            fixed.append(f"cell metadata {key!r} in cells {', '.join(map(str, where))}")
    return fixed


def committed_copy(path: Path) -> nbformat.NotebookNode | None:
    """``path`` as git's index holds it (what the next commit stores), or None outside a git checkout or for a file
    git does not track."""
    done = subprocess.run(["git", "-C", str(path.parent), "show", f":./{path.name}"], capture_output=True)
    if done.returncode != 0:
        return None
    return nbformat.reads(done.stdout.decode(), as_version=4)


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--check", action="store_true", help="report what differs and exit 1; change nothing")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if re.fullmatch(r"v\d+(\.\d+)*", REF) and REF != f"v{VERSION}":
        print(f"release.json: ref {REF} is a release tag but apt_lab/_version.py says {VERSION}; set ref to "
              f"v{VERSION} (or bump the version) so the notebooks install the library they were written for",
              file=sys.stderr)
        return 1
    if not paths:
        print(f"no notebooks found in {NOTEBOOK_DIR}", file=sys.stderr)
        return 1
    failed, changed = False, 0
    for path in paths:
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as error:  # missing file, not JSON, not a notebook
            print(f"{_shown(path)}: cannot read it as a notebook: {error}", file=sys.stderr)
            failed = True
            continue
        fixed, unfixable = tidy(nb, path.name)
        committed = committed_copy(path) if args.check else None
        if committed is None:
            fixed += strip(nb)
        else:  # outputs JupyterLab saves into the working tree are fine; what git holds must be clean
            fixed += [f"{problem}, in git's index (run this script, then `git add` the notebook)"
                      for problem in strip(committed)]
        for problem in unfixable:
            print(f"{_shown(path)}: {problem}", file=sys.stderr)
        failed |= bool(unfixable)
        if fixed and args.check:
            for problem in fixed:
                print(f"{_shown(path)}: {problem}", file=sys.stderr)
            failed = True
        elif fixed:
            nbformat.write(nb, path)
            changed += 1
            print(f"fixed {_shown(path)}: " + "; ".join(problem.splitlines()[0].rstrip(":") for problem in fixed))
    if failed and args.check:
        print("run `python scripts/notebooks.py` to stamp the shared cells and strip outputs in place",
              file=sys.stderr)
    elif not args.check:
        print(f"{changed} of {len(paths)} notebooks changed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
