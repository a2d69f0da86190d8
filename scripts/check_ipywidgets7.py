"""Run the widget and plot tests again against Colab's widget stack: ipywidgets 7.7.1 and plotly 5.24.1.

Colab imports its own ipywidgets (7.x) when the kernel starts, so apt_lab must work with it (pyproject says
``ipywidgets>=7.6``), while ``make install`` brings ipywidgets 8. This script installs Colab's versions once into
a small folder, ``.cache/ipywidgets7/`` (gitignored; about 120 MB, mostly plotly 5's validators), puts that folder
first on ``PYTHONPATH`` and runs ``tests/test_widgets.py`` and ``tests/test_plots.py`` with this venv's
everything else. The tests check that the versions they run with are the ones pinned here.

Usage: python scripts/check_ipywidgets7.py [PYTEST ARGS...]        (part of ``make test``)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / ".cache" / "ipywidgets7"
PINS = ["ipywidgets==7.7.1", "ipython-genutils==0.2.0", "plotly==5.24.1"]  # Colab's, as of 2025
TESTS = ["tests/test_widgets.py", "tests/test_plots.py"]


def ensure_overlay() -> Path:
    """Install PINS into TARGET unless it already holds exactly them (a stamp file lists what is there)."""
    stamp = TARGET / "PINS.txt"
    if stamp.is_file() and stamp.read_text().split() == PINS:
        return TARGET
    shutil.rmtree(TARGET, ignore_errors=True)
    partial = TARGET.with_name(TARGET.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # --no-deps: everything else (ipykernel, traitlets, numpy, ...) comes from this venv, as in Colab
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                           "--target", str(partial), *PINS], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"check_ipywidgets7: could not install {' '.join(PINS)} into {partial} (is PyPI reachable?):\n"
                 f"{done.stderr[-2000:]}")
    (partial / "PINS.txt").write_text("\n".join(PINS) + "\n")
    partial.replace(TARGET)
    return TARGET


def main(argv: list[str]) -> int:
    overlay = ensure_overlay()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(overlay), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "APT_LAB_EXPECT_IPYWIDGETS": "7", "APT_LAB_EXPECT_PLOTLY": "5"}
    env.pop("APT_LAB_WIDGET_BACKEND", None)
    print(f"check_ipywidgets7: {' '.join(TESTS)} with {', '.join(PINS)} (from {overlay.relative_to(ROOT)})",
          flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", *TESTS, "-p", "no:cacheprovider", *argv],
                          cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
