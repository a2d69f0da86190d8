"""mkdocs hooks (see mkdocs.yml ``hooks:``): executed notebooks, offline math and plots, docstring examples as code.

1. **Notebook pages show their outputs.** The notebooks are committed without outputs; before the pages are
   rendered, each is executed in quick mode (``APT_LAB_QUICK=1``, offline) into
   ``.cache/docs-notebooks/<key>/notebooks/`` and the page is rendered from that copy. ``<key>`` hashes the
   notebook, the apt_lab sources and this file, so a rebuild executes only what changed. A cell that raises
   fails the build, naming the notebook. Plotly figures become ``<div>`` + ``Plotly.newPlot`` HTML; widgets
   keep the static copy of their first picture (``text/html`` of their display bundle) since a static page has
   no kernel. Cells tagged ``solution`` (the exercises' hidden answers) are neither executed nor shown.
   ``APT_LAB_DOCS_EXECUTE=0 mkdocs build`` skips the execution (pages without outputs; a quick look at text).
   Copies JupyterLab leaves in ``.ipynb_checkpoints/`` are neither executed nor published (``exclude_docs``).
2. **Offline math and plots.** MathJax 3 (the ``tex-svg.js`` bundle of the ``django-static-mathjax`` wheel: one
   file, no fonts to fetch) and ``plotly.min.js`` (from the plotly package) are copied into ``site/assets/``
   and loaded in the ``<head>`` of the pages that need them; mkdocs-jupyter's own MathJax 2 tag (a CDN URL) is
   removed. Math is typeset inside ``arithmatex`` elements (``\\(…\\)`` in markdown pages) and notebook
   markdown cells (``$…$``).
3. **Docstring examples render as code.** apt_lab's docstrings title their doctest sections ``Example:`` or
   ``Example (what is checked by hand):``. Griffe's Google parser knows only ``Examples:`` and would render the
   others as plain paragraphs, where ``>>>`` lines become block quotes. The parser is taught both forms; the
   parenthesis stays in the section's title.
4. **One published address.** ``repo_url`` and ``repo_name`` (the repository link in the header) are read from
   ``release.json``, the file the notebooks' badges and install cells are stamped from.
5. **Sphinx roles become links.** Docstrings write ``:func:`tune_prompts``` (Sphinx's roles), which markdown
   would print as is. :class:`RolesAsLinks`, a griffe extension (``extensions:`` in mkdocs.yml), rewrites each
   role before the docstring is rendered into an autorefs cross-reference to the object's full path, resolving the
   name as Python would from where the docstring stands (its class, its module, the package). A name that resolves
   to nothing, or to an object on no page (private, or an attribute without a docstring), stays plain code, so the
   strict build never fails on a role.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from griffe import Extension

log = logging.getLogger("mkdocs.hooks.apt_lab")

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = ROOT / ".cache" / "docs-notebooks"  # gitignored (.cache/)
HOOK_VERSION = "2"  # bump to re-execute every notebook after changing how outputs are processed
KERNEL_ENV = {"APT_LAB_QUICK": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "APT_LAB_SOLUTIONS": "0",
              "PLOTLY_RENDERER": "plotly_mimetype"}  # figures as JSON only: this hook writes their HTML
RELEASE_FILE = ROOT / "release.json"  # {"repository": "owner/name", "ref": "main", ...}
SOLUTION_TAG = "solution"
CELL_TIMEOUT_S = 600
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MATHJAX_ASSET = "assets/mathjax/tex-svg.js"
PLOTLY_ASSET = "assets/javascripts/plotly.min.js"
MATHJAX_CONFIG = """<script>
window.MathJax = {
  tex: {inlineMath: [["\\\\(", "\\\\)"], ["$", "$"]], displayMath: [["\\\\[", "\\\\]"], ["$$", "$$"]],
        processEscapes: true},
  // every element with a class is skipped, with all inside it, except these two (and all inside them)
  options: {ignoreHtmlClass: "[^ ]+", processHtmlClass: "arithmatex|jp-MarkdownOutput"},
  svg: {fontCache: "global"}
};
</script>"""
# mkdocs-jupyter's MathJax 2 tags (a CDN URL and its text/x-mathjax-config block): replaced by ours
_NBCONVERT_MATHJAX = re.compile(r'<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->', re.S)
_MATH_IN_NOTEBOOK = re.compile(r'class="[^"]*jp-MarkdownOutput[^"]*"[^>]*>(?:(?!</div>).)*?(\$[^$\n]+\$|\\\()',
                               re.S)


# ---------------------------------------------------------------------------------------- 3. docstrings
class _ExampleTitles:
    """Stands in for griffe's admonition regex: also reads ``Example (note):`` as an examples section."""

    _EXAMPLE = re.compile(r"^(?P<type>Examples?)\s+(?P<note>\(.*\))\s*:\s*$")

    def __init__(self, original):
        self.original = original

    def match(self, line: str):
        found = self._EXAMPLE.match(line)
        if found is None:
            return self.original.match(line)
        groups = {"type": found["type"], "title": f"{found['type']} {found['note']}"}
        return type("Match", (), {"groupdict": lambda self: groups})()


def on_config(config):
    """The repository link of every page, from release.json (the one place the published address is written)."""
    repo = json.loads(RELEASE_FILE.read_text())["repository"]
    config["repo_url"], config["repo_name"] = f"https://github.com/{repo}", repo
    return config


def on_startup(command, dirty):  # noqa: ARG001 - mkdocs hook signature
    try:
        from griffe import DocstringSectionKind
        from griffe._internal.docstrings import google
    except ImportError:  # a griffe without this layout: leave the default behaviour
        log.warning("griffe internals moved; 'Example:' sections render as plain text")
        return
    google._section_kind.setdefault("example", DocstringSectionKind.examples)
    if not isinstance(google._RE_ADMONITION, _ExampleTitles):
        google._RE_ADMONITION = _ExampleTitles(google._RE_ADMONITION)


# ---------------------------------------------------------------------------------------- 5. roles
ROLE = re.compile(r":(?:func|mod|meth|class|data|attr|exc|obj):`(?P<short>~?)(?P<name>[\w.]+)`")


def role_target(obj, name: str) -> str | None:
    """The full path of ``name`` as a docstring of ``obj`` means it, or None: ``name`` relative to ``obj``, then to
    each object around it up to its package, then as a full path (``apt_lab.tuning.tune_prompts``)."""
    scopes = []
    while obj is not None:
        scopes.append(obj)
        obj = obj.parent
    for scope in [*scopes, scopes[-1].modules_collection]:
        try:
            found = scope[name]
        except Exception:  # noqa: BLE001 - griffe raises KeyError, ValueError or an alias error for a miss
            continue
        try:
            return found.canonical_path  # an imported name: where it is defined (and documented)
        except Exception:  # noqa: BLE001 - an alias to a package griffe did not load
            return found.target_path if found.is_alias else found.path
    return None


def roles_as_links(obj, text: str) -> str:
    """``text`` (a docstring of ``obj``) with each Sphinx role replaced by a cross-reference, or by plain code when
    the name resolves to nothing. ``optional``: autorefs shows an object that has no anchor on any page (a private
    function, an attribute without a docstring) as plain code instead of failing the build."""
    def link(found: re.Match) -> str:
        name = found["name"]
        shown = f"`{name.rsplit('.', 1)[-1] if found['short'] else name}`"
        target = role_target(obj, name)
        if target is None:
            return shown
        return f'<autoref identifier="{target}" optional>{shown}</autoref>'

    return ROLE.sub(link, text)


class RolesAsLinks(Extension):
    """Griffe extension: every docstring of a loaded package with its Sphinx roles as cross-references."""

    def on_package(self, *, pkg, **kwargs) -> None:  # noqa: ARG002 - griffe's hook signature
        pending = [pkg]
        while pending:
            obj = pending.pop()
            if obj.docstring is not None:
                obj.docstring.value = roles_as_links(obj, obj.docstring.value)
            pending += [member for member in obj.members.values() if not member.is_alias]

    on_package_loaded = on_package  # griffe 1 calls it so


# ---------------------------------------------------------------------------------------- 1. notebooks
def _fingerprint() -> str:
    """What an executed notebook depends on besides itself: apt_lab's sources and data files, and this hook."""
    digest = hashlib.sha256(HOOK_VERSION.encode())
    for path in sorted((ROOT / "apt_lab").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def docs_outputs(nb) -> None:
    """Make ``nb``'s outputs renderable on a static page (in place): plotly JSON → HTML, no widget views."""
    import plotly.io as pio

    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data")
            if not data:
                continue
            if PLOTLY_MIME in data:
                figure = pio.from_json(json.dumps(data.pop(PLOTLY_MIME)), skip_invalid=True)
                if figure.data and all(trace.type == "table" for trace in figure.data):
                    data["text/html"] = table_html(figure)
                else:
                    data["text/html"] = pio.to_html(figure, include_plotlyjs=False, full_html=False,
                                                    config={"responsive": True})
            if WIDGET_VIEW in data and "text/html" in data:  # no kernel on the page: show the static copy
                del data[WIDGET_VIEW]
    nb.metadata.pop("widgets", None)


def table_html(figure) -> str:
    """A plotly table figure as an HTML table, its title above and its note (an annotation) under it. A plotly
    table has the height its figure was given, sized for one line per cell; in the docs' narrow column cells wrap,
    and the last rows were cut off. An HTML table grows with its rows."""
    title = figure.layout.title.text
    parts = [f"<p><b>{title}</b></p>"] if title else []
    for trace in figure.data:
        header = "".join(f"<th>{value}</th>" for value in trace.header.values)
        fills = trace.cells.fill.color  # one list per column (of one colour per row), or one colour
        fills = fills[0] if isinstance(fills, (list, tuple)) and fills else fills
        rows = []
        for index, row in enumerate(zip(*trace.cells.values)):
            fill = fills[index] if isinstance(fills, (list, tuple)) else fills
            style = f' style="background-color: {fill}"' if fill and fill != "white" else ""
            rows.append(f"<tr{style}>" + "".join(f"<td>{value}</td>" for value in row) + "</tr>")
        parts.append(f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    parts += [f"<p><small>{note.text.replace('<br>', ' ')}</small></p>" for note in figure.layout.annotations]
    return '<div class="apt-lab-table">' + "\n".join(parts) + "</div>"


def executed_copy(source: Path, fingerprint: str) -> Path:
    """``source`` executed in quick mode and made static (:func:`docs_outputs`); cached by content."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    key = hashlib.sha256(source.read_bytes() + fingerprint.encode()).hexdigest()[:16]
    target = EXECUTED / key / "notebooks" / source.name
    if target.is_file():
        return target
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:  # the exercises' answers stay in the notebook, not on the page
        if SOLUTION_TAG in cell.metadata.get("tags", []):
            cell.metadata["tags"] = [*cell.metadata["tags"], "skip-execution"]
    log.info("executing %s in quick mode for its docs page (cached in %s)", source.name, target.parent.parent)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(source.parent)}})
    try:
        client.execute(env={**os.environ, **KERNEL_ENV})
    except CellExecutionError as error:
        from mkdocs.exceptions import PluginError

        message = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # no terminal colours in the build log
        raise PluginError(f"{source.relative_to(ROOT)} failed while executing it for the docs:\n{message}") from error
    docs_outputs(nb)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    nbformat.write(nb, partial)
    partial.replace(target)
    for stale in EXECUTED.glob(f"*/notebooks/{source.name}"):  # older executions of this notebook
        if stale != target:
            shutil.rmtree(stale.parent.parent, ignore_errors=True)
    return target


def on_files(files, config):  # noqa: ARG001 - mkdocs hook signature
    if os.environ.get("APT_LAB_DOCS_EXECUTE", "").strip() == "0":
        log.info("APT_LAB_DOCS_EXECUTE=0: notebook pages are rendered without outputs")
        return files
    fingerprint = None
    for file in files:
        if not (file.src_uri.startswith("notebooks/") and file.src_uri.endswith(".ipynb")) or _excluded(file):
            continue
        fingerprint = fingerprint or _fingerprint()
        executed = str(executed_copy(Path(file.abs_src_path).resolve(), fingerprint))
        file.abs_src_path = executed  # mkdocs-jupyter's wrapper and the file it wraps both read this
        inner = file.__dict__.get("file")
        if inner is not None:
            inner.abs_src_path = executed
    return files


def _excluded(file) -> bool:
    """A file mkdocs leaves out (``exclude_docs``: JupyterLab's ``.ipynb_checkpoints/``), or any file in a hidden
    folder: never executed for a page."""
    inclusion = getattr(file, "inclusion", None)
    hidden = any(part.startswith(".") for part in Path(file.src_uri).parts)
    return hidden or (inclusion is not None and inclusion.is_excluded())


# ---------------------------------------------------------------------------------------- 2. math and plots
def _asset(page, path: str) -> str:
    from mkdocs.utils import get_relative_url

    return get_relative_url(path, page.url)


def has_math(html: str) -> bool:
    """Whether a page holds math MathJax must typeset (arithmatex elements, or $…$ / \\(…\\) in notebook text)."""
    return 'class="arithmatex"' in html or _MATH_IN_NOTEBOOK.search(html) is not None


def on_post_page(output, page, config):  # noqa: ARG001 - mkdocs hook signature
    output = _NBCONVERT_MATHJAX.sub("", output)
    head = []
    if "Plotly.newPlot" in output:  # inline figure scripts run while the page loads: plotly.js goes first
        head.append(f'<script src="{_asset(page, PLOTLY_ASSET)}"></script>')
    if has_math(output):
        head.append(MATHJAX_CONFIG + f'\n<script defer src="{_asset(page, MATHJAX_ASSET)}"></script>')
    if head:
        output = output.replace("</head>", "\n".join(head) + "\n</head>", 1)
    return output


def on_post_build(config):
    import mathjax
    import plotly

    site = Path(config["site_dir"])
    for source, target in ((Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / "tex-svg.js", MATHJAX_ASSET),
                           (Path(plotly.__file__).parent / "package_data" / "plotly.min.js", PLOTLY_ASSET)):
        (site / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, site / target)
