"""Strip outputs, execution counts and widget state from notebooks (they are committed clean).

Usage: python scripts/clean_notebooks.py [--check] [NOTEBOOK ...]     (default: notebooks/*.ipynb)

Notebook outputs hold megabytes of plotly.js and change on every run; nbval executes the notebooks from clean
in ``make test``. ``--check`` changes nothing and exits 1 when a notebook has outputs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
VOLATILE_METADATA = ("widgets", "execution", "varInspector")


def clean(nb: nbformat.NotebookNode) -> bool:
    """Strip ``nb`` in place; returns whether anything changed."""
    changed = False
    for key in VOLATILE_METADATA:
        changed |= nb.metadata.pop(key, None) is not None
    for cell in nb.cells:
        for key in ("execution", "collapsed", "scrolled"):
            changed |= cell.metadata.pop(key, None) is not None
        if cell.cell_type == "code":
            changed |= bool(cell.outputs) or cell.execution_count is not None
            cell.outputs, cell.execution_count = [], None
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true", help="report notebooks with outputs; change nothing")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if clean(nb):
            dirty.append(str(path))
            if not args.check:
                nbformat.write(nb, path)
    if args.check and dirty:
        print("notebooks with outputs (run python scripts/clean_notebooks.py):", ", ".join(dirty), file=sys.stderr)
        return 1
    if not args.check:
        print(f"cleaned {len(dirty)} of {len(paths)} notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
