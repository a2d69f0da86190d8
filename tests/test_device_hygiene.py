"""Device hygiene, read from the source: the two patterns that broke notebook 02 on a GPU (issue 9).

1. A tensor factory without ``device=`` (``torch.ones/zeros/tensor/arange/rand...``) used directly as an operand
   of arithmetic or a comparison, or as an argument of a function that combines tensors (``torch.allclose``,
   ``torch.where``, ``torch.cat``...), next to something not known to be on the CPU. It lands on the CPU and
   meets data on the GPU: "Expected all tensors to be on the same device". Give it ``device=`` (or ``.to(x)``).
2. ``.numpy()`` on a tensor not known to be on the CPU: known means the receiver is a ``.cpu()`` call (possibly
   followed by ``.detach()/.float()``-like calls or indexing), or a name that its scope assigns from such an
   expression or from a device-less factory.

Every code cell of every notebook (one scope per notebook) and every module of apt_lab (one scope per function)
is read. Simple on purpose: it catches the obvious, and a planted ``torch.ones(2)`` comparison must fail it.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = {"ones", "zeros", "tensor", "as_tensor", "arange", "rand", "randn", "randint", "randperm", "full",
             "empty", "eye", "linspace", "logspace"}
COMBINERS = {"allclose", "equal", "isclose", "where", "maximum", "minimum", "cat", "stack", "dist", "cdist",
             "matmul", "assert_close", "cosine_similarity", "lerp", "searchsorted", "bucketize"}
SCALAR_ROOTS = {"config", "cfg", "math"}  # attributes of these are numbers, not tensors
SCALAR_CALLS = {"len", "int", "float", "round", "min", "max", "abs", "sum"}


def is_factory(node) -> bool:
    """``torch.ones(...)`` and friends without a ``device=`` keyword."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and not any(k.arg == "device" for k in node.keywords))


def on_cpu(node, names: set[str], functions: set[str] = frozenset()) -> bool:
    """Known to be on the CPU (or a plain number): literals, device-less factories, sizes and config values, the
    result of ``.cpu()`` / ``.to("cpu")`` / numpy, and any tensor method chain starting from those (a method
    keeps the device; only ``.to(...)`` and ``.cuda()`` move it); ``names`` and ``functions`` are known ones."""
    while True:
        if isinstance(node, (ast.Constant, ast.List, ast.Tuple, ast.JoinedStr)) or is_factory(node):
            return True
        if isinstance(node, ast.UnaryOp):
            node = node.operand
        elif isinstance(node, ast.BinOp):
            return on_cpu(node.left, names, functions) and on_cpu(node.right, names, functions)
        elif isinstance(node, ast.Compare):
            return all(on_cpu(o, names, functions) for o in (node.left, *node.comparators))
        elif isinstance(node, ast.Name):
            return node.id in names
        elif isinstance(node, ast.Attribute):
            if node.attr in ("shape", "ndim", "dtype", "device"):
                return True
            root = node
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in SCALAR_ROOTS:
                return True
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                return func.id in SCALAR_CALLS or func.id in functions
            if not isinstance(func, ast.Attribute):
                return False
            if func.attr == "cpu" or (func.attr == "to" and node.args and isinstance(node.args[0], ast.Constant)
                                      and node.args[0].value == "cpu"):
                return True
            if func.attr in ("to", "cuda"):
                return False
            if func.attr == "from_numpy" or (isinstance(func.value, ast.Name) and func.value.id in ("np", "numpy")):
                return True
            node = func.value  # a method of a tensor keeps its device
        else:
            return False


def cpu_names(scope, functions: set[str]) -> set[str]:
    """Names a scope assigns (at least once) from an expression known to be on the CPU."""
    names: set[str] = set()
    for _ in range(3):  # repeated, so names assigned from such names count too
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and on_cpu(node.value, names, functions):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def cpu_functions(tree: ast.AST) -> set[str]:
    """Functions of this source whose every ``return`` gives something known to be on the CPU."""
    functions: set[str] = set()
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    for _ in range(3):
        for f in defs:
            returns = [r.value for r in ast.walk(f) if isinstance(r, ast.Return) and r.value is not None]
            names = cpu_names(f, functions)
            if returns and all(on_cpu(r, names, functions) for r in returns):
                functions.add(f.name)
    return functions


def problems(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, message) for every use of the two patterns, scope by scope (functions; the rest is one scope)."""
    found = []
    functions = cpu_functions(tree)
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for scope in [tree, *scopes]:
        known = cpu_names(scope, functions)
        for node in ast.walk(scope):
            groups = []
            if isinstance(node, ast.BinOp):
                groups.append([node.left, node.right])
            elif isinstance(node, ast.Compare):
                groups.append([node.left, *node.comparators])
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COMBINERS:
                groups.append(list(node.args))
            for operands in groups:
                if any(is_factory(o) for o in operands) and not all(on_cpu(o, known, functions) for o in operands):
                    found.append((node.lineno, f"{ast.unparse(node)[:90]}: a factory without device= meets data "
                                                "that may be on the GPU"))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy" \
                    and not node.args and not on_cpu(node.func.value, known, functions):
                found.append((node.lineno, f"{ast.unparse(node)[:90]}: .numpy() on a tensor not known to be on the "
                                            "CPU; call .cpu() first"))
    return sorted(set(found))


def notebook_source(path: Path) -> str:
    """The code cells of a notebook, one after another; IPython magics and shell lines become comments."""
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    lines = [("# " + line if line.lstrip().startswith(("%", "!")) else line) for cell in code for line in
             (cell + "\n").splitlines()]
    return "\n".join(lines)


SOURCES = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "apt_lab").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_device_less_factory_meets_gpu_data_and_no_numpy_without_cpu(path):
    source = notebook_source(path) if path.suffix == ".ipynb" else path.read_text()
    found = problems(ast.parse(source))
    assert not found, f"{path.name}:\n" + "\n".join(f"  line {line}: {message}" for line, message in found)


@pytest.mark.parametrize("planted", [
    "torch.allclose(human.norm(dim=-1), torch.ones(2), atol=1e-5)",  # notebook 02, cell 4 (issue 9)
    "assert (scores.anomaly_maps - torch.zeros(3, 4, 4)).abs().max() < 1",
    "mask = features.patches > torch.tensor(0.5)",
    "similarity = prompts.similarity_to(learner, texts)\nfigure(similarity.numpy())",  # notebook 02, cell 8
    "def f(x):\n    return x.detach().numpy()",
    "m = (shots.mean(1) > 0.5).numpy()",
])
def test_the_check_fails_on_the_patterns_that_broke_notebook_02(planted):
    assert problems(ast.parse(planted)), planted


@pytest.mark.parametrize("fine", [
    "torch.allclose(human.norm(dim=-1), torch.ones(2, device=human.device), atol=1e-5)",
    "torch.allclose(human.norm(dim=-1).cpu(), torch.ones(2))",
    "g = torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0])",
    "similarity = prompts.similarity_to(learner, texts).cpu()\nfigure(similarity.numpy())",
    "def f(x):\n    y = x.detach().cpu()\n    y = y.float()\n    return y.numpy()",
    "lum = shots.mean(1).cpu()\nb = lum[:, ring].median(1).values\nm = (lum > b[:, None, None] + 0.15).numpy()",
    "x = torch.arange(5).to(images.device) * images.mean()",
])
def test_the_check_accepts_device_aware_code(fine):
    assert not problems(ast.parse(fine)), fine
