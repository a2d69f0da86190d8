"""The package map holds: layers import only downwards, light modules stay light, exceptions live in errors.py.

Layers, top to bottom (a module may import from its own layer and the layers below it, never above):

    faces     cli, report, plots, widgets, notebook          what a person runs or sees
    pipeline  pipeline, checkpoint, sweep, store, features,  running a method over a dataset, run folders
              severity, cluster
    method    perturbations, blobs, roi, prompts, smgs, losses, tuning, scoring, baselines, thresholds
    backbone  backbone, weights                              the frozen open_clip model
    ground    config, data, metrics, errors, env, _version   no model code
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "apt_lab"
LAYERS = {
    "faces": {"cli", "report", "plots", "widgets", "notebook"},
    "pipeline": {"pipeline", "checkpoint", "sweep", "features", "store", "severity", "cluster"},
    "method": {"perturbations", "blobs", "roi", "prompts", "smgs", "losses", "tuning", "scoring", "baselines",
               "thresholds"},
    "backbone": {"backbone", "weights"},
    "ground": {"config", "data", "metrics", "errors", "env", "_version"},
}
RANK = {module: rank for rank, layer in enumerate(reversed(list(LAYERS))) for module in LAYERS[layer]}


def _top_module(path: Path) -> str:
    """apt_lab/widgets/viewer.py → "widgets"; apt_lab/tuning.py → "tuning"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, top-level apt_lab module) of every import of apt_lab code in a file, at any depth (also inside
    functions: a lazy import is still a dependency)."""
    tree = ast.parse(path.read_text() if source is None else source)
    package_parts = path.relative_to(PACKAGE).parent.parts  # () for apt_lab/x.py, ("widgets",) for subpackages
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("apt_lab"):
                    continue
                target = (node.module or "").split(".")[1:]
            else:
                base = list(package_parts[:len(package_parts) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
            if target:
                found.append((node.lineno, target[0]))
            else:  # "from . import metrics" / "from .. import plots"
                found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("apt_lab.")]
    return found


def _modules():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py" or p.parent != PACKAGE]


def test_every_module_is_on_the_map():
    unmapped = sorted({_top_module(p) for p in _modules()} - set(RANK))
    assert not unmapped, f"modules missing from the layer map (add them to LAYERS and the README): {unmapped}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
    own = _top_module(path)
    upward = [(line, target) for line, target in _imported_modules(path)
              if target in RANK and RANK[target] > RANK[own]]
    assert not upward, f"{path.name} ({own}) imports a higher layer: {upward}"


def test_the_layer_check_catches_an_upward_import():
    metrics = PACKAGE / "metrics.py"
    planted = metrics.read_text() + "\n\ndef late():\n    from .pipeline import run_category\n"
    assert (None, "pipeline") not in _imported_modules(metrics)
    assert "pipeline" in [target for _, target in _imported_modules(metrics, planted)]
    assert RANK["pipeline"] > RANK["metrics"]  # so test_imports_only_go_down would fail on it


def test_exceptions_are_defined_only_in_errors_py():
    elsewhere = []
    for path in _modules():
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id in ("Exception",))
                    for b in node.bases):
                elsewhere.append(f"{path.name}:{node.lineno} {node.name}")
    assert not elsewhere, f"define exceptions in apt_lab/errors.py: {elsewhere}"


@pytest.mark.parametrize("statement", ["import apt_lab.metrics", "import apt_lab.data; "
                                       "apt_lab.data.load_dataset('demo', category='brick')",
                                       "import apt_lab, apt_lab.errors; apt_lab.__version__; apt_lab.StopTraining",
                                       "import apt_lab.store, apt_lab.report"])
def test_light_imports_do_not_load_torch_or_open_clip(statement):
    code = f"import sys; {statement}; print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{statement!r} loaded {done.stdout.strip()}"


def test_lazy_package_still_exports_the_api():
    done = subprocess.run([sys.executable, "-c", "import apt_lab; print(apt_lab.tune_prompts.__module__, "
                           "apt_lab.human_prompt_features.__module__, sorted(apt_lab.__all__) == apt_lab.__all__)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["apt_lab.tuning", "apt_lab.baselines", "True"], done.stderr
