"""The run store: a folder of cells, each keyed by what it computes; read without torch.

A **cell** is one independent computation: a category's files, a shot count and its few-shot draw, a seed, and a
variant's fully resolved config (plus the source of any plugin code it uses). Its **identity** is that dict
(``computes``) and its **id** a hash of it; where it ran — device, host, dataset path, versions, times — is recorded
beside it (``ran``) and never changes the id. A folder ``runs/<name>/`` holds any set of cells:

    run.json       the layout: dataset, experiment, and the categories, shots, seeds and variants asked for so far
                   (their order is the tables' order). Not an identity: a command that asks for more extends it.
    cells.jsonl    one JSON line per finished cell, appended the moment it finishes (a kill leaves at most a cut-off
                   last line, cut by the next writer).
    cells/<category>/k<k>/s<seed>/<variant>/   what a cell kept (prompts, example maps), listed on its line.
    table.md/.csv, report.html   drawn from the two files above, at any time.

A command's plan names cells; one already present with the same id is reused, the rest run. The same name with
another identity (other steps, an edited plugin, changed files) is refused naming what differs — never reused.
Every line is checked on read (schema, id against its identity, artefacts inside its own folder); a bad line is
one error naming ``cells.jsonl`` and the line (``repair=True`` moves such lines into ``cells.rejected.jsonl``).

Example:
    >>> cells = plan(["bottle", "cable"], shots=(1, 2), seeds=(0,), variants=("apt", "human"), zero_shot=("human",))
    >>> [c.key for c in cells]
    ['bottle/k0/s0/human', 'bottle/k1/s0/apt', 'bottle/k2/s0/apt', 'cable/k0/s0/human', 'cable/k1/s0/apt', 'cable/k2/s0/apt']
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from .data.files import Folder
from .errors import CorruptFileError, RunInUseError, RunMismatchError
from .metrics import format_metric

FORMAT = "apt_lab.store/2"
OLD_FORMATS = {"apt_lab.run/1": "0.2"}  # run.json formats of earlier versions: refused with what to do
RUN_FILE, CELLS_FILE, REJECTED_FILE = "run.json", "cells.jsonl", "cells.rejected.jsonl"
TABLE_METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "aupro")  # the columns papers print
SEVERITY_METRICS = ("image_auroc", "pixel_auroc", "fpr_at_threshold", "tpr_at_threshold")  # severity's columns
RATE_INTERVALS = {"fpr_at_threshold": ("fpr_low", "fpr_high"), "tpr_at_threshold": ("tpr_low", "tpr_high")}  # a rate
# → the metrics holding its 95 % Wilson bounds (apt_lab.severity); a table shows them for one seed of one category
ENVIRONMENT = ("device", "host", "apt_lab", "torch", "open_clip")  # what makes two cells' environments differ
_FIELDS = {"key": str, "id": str, "computes": dict, "category": str, "shots": int, "seed": int, "variant": str,
           "metrics": dict, "timings": dict, "artefacts": list, "pretrained": bool, "eval_resolution": int,
           "n_test": int, "ran": dict}


@dataclass(frozen=True)
class Cell:
    """One cell's name: a category, a shot count (0 = zero-shot), a seed, a variant and — for the severity
    experiment — a row: (perturbation, strength), or ("test:<defect>", None) for a real defect type."""

    category: str
    shots: int
    seed: int
    variant: str
    row: tuple | None = None

    @property
    def key(self) -> str:
        """The name a table and ``cells.jsonl`` know the cell by, e.g. ``brick/k2/s0/apt``."""
        kind, strength = self.row or (None, None)
        tail = "" if kind is None else f"/{kind}" + ("" if strength is None else f"@{strength}")
        return f"{self.category}/k{self.shots}/s{self.seed}/{self.variant}{tail}"

    @property
    def folder(self) -> str:
        """Where its artefacts live, relative to the run folder; a line may list files under it only."""
        return f"cells/{self.category}/k{self.shots}/s{self.seed}/{self.variant}"


def plan(categories: Sequence[str], shots: Sequence[int], seeds: Sequence[int], variants: Sequence[str],
         zero_shot: Iterable[str] = (), rows: Sequence[tuple] = ((None),)) -> list[Cell]:
    """Every cell in plan order: category, then shots, seeds, variants (and rows). A zero-shot variant (no tuning,
    no shots) has one cell per category, shots 0 and the first seed, first. Repeated values count once."""
    shots, seeds = sorted(set(shots)), sorted(set(seeds))
    zero = [v for v in dict.fromkeys(variants) if v in set(zero_shot)]
    tuned = [v for v in dict.fromkeys(variants) if v not in zero]
    return [cell for c in dict.fromkeys(categories) for cell in
            [Cell(c, 0, seeds[0], v, r) for v in zero for r in rows]
            + [Cell(c, k, s, v, r) for k in shots for s in seeds for v in tuned for r in rows]]


def cell_id(computes: dict) -> str:
    """A short hash of what a cell computes: the same computation gives the same id wherever it ran.

    Example:
        >>> cell_id({"category": "brick", "shots": 1}) == cell_id({"shots": 1, "category": "brick"})
        True
    """
    return hashlib.sha256(json.dumps(computes, sort_keys=True).encode()).hexdigest()[:16]


def differences(old, new, path: str = "") -> list[str]:
    """Human-readable leaf differences between two JSON values (two identities).

    Example:
        >>> differences({"shots": 1, "config": {"train": {"steps": 10}}}, {"shots": 1, "config": {"train": {"steps": 20}}})
        ['config.train.steps: 10 → 20']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in dict.fromkeys([*old, *new])
                for d in differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]
    return [] if old == new else [f"{path}: {old!r} → {new!r}"]


def _union(old: list, new: list, ordered: bool) -> list:
    merged = list(dict.fromkeys([*old, *new]))
    return sorted(merged) if ordered else merged


def merge_layouts(old: dict, new: dict) -> dict:
    """The layout after a command that asked for ``new`` in a folder laid out as ``old``: lists joined (shots,
    seeds and strengths sorted), variants added; a variant defined differently is refused (RunMismatchError).

    Example:
        >>> old = {"categories": ["b"], "shots": [2], "seeds": [0], "variants": {"apt": {"settings": {}}}, "vary": {}}
        >>> new = {"categories": ["a"], "shots": [1], "seeds": [1], "variants": {"apt": {"settings": {}}}, "vary": {}}
        >>> m = merge_layouts(old, new); m["categories"], m["shots"], m["seeds"]
        (['b', 'a'], [1, 2], [0, 1])
    """
    for key in ("dataset", "experiment"):
        if old.get(key) != new.get(key):
            raise RunMismatchError(f"this folder holds {old.get('experiment')} cells of dataset {old.get('dataset')!r}"
                                   f"; it cannot take {new.get('experiment')} cells of {new.get('dataset')!r}. "
                                   "Choose another --name.")
    for name in set(old["variants"]) & set(new["variants"]):
        differ = differences(old["variants"][name], new["variants"][name])
        if differ:
            raise RunMismatchError(f"variant {name!r} is defined differently in this folder ({'; '.join(differ)}); "
                                   "name the new one differently, or choose another --name.")
    merged = {**old, "categories": _union(old["categories"], new["categories"], False),
              "shots": _union(old["shots"], new["shots"], True), "seeds": _union(old["seeds"], new["seeds"], True),
              "variants": {**old["variants"], **new["variants"]},
              "vary": {k: _union(old["vary"].get(k, []), new["vary"].get(k, []), False)
                       for k in dict.fromkeys([*old["vary"], *new["vary"]])}}
    if "reference" in new:
        merged["reference"] = new["reference"]
    if "severity" in new:
        merged["severity"] = {k: _union(old["severity"][k], new["severity"][k], k == "strengths")
                              for k in ("perturbations", "strengths")}
    return merged


class RunStore:
    """An opened run folder: its layout and its cells. Writers hold ``self.folder.lock()`` around use."""

    def __init__(self, folder: Folder):
        self.folder = folder

    def layout(self) -> dict | None:
        """``run.json``, or None when the folder holds no run; another version's format is refused."""
        data = self.folder.read(RUN_FILE)
        if data is None:
            legacy = [n for n in ("results.json", "sweep.json") if self.folder.exists(n)]
            if legacy:
                raise CorruptFileError(f"{self.folder.path} holds a run of apt_lab 0.1 ({legacy[0]}), which this "
                                       "version does not read; rerun it into a new folder (another --name).")
            return None
        try:
            layout = json.loads(data.decode("utf-8"))
            old = OLD_FORMATS.get(layout.get("format")) if isinstance(layout, dict) else None
            if old:
                raise CorruptFileError(
                    f"{self.folder.path} holds a run of apt_lab {old}'s store, which keyed a whole folder by one hash "
                    "and so cannot say which of its cells may be reused; rerun the command into a new folder "
                    "(another --name) — its tables stay readable with apt_lab 0.2.")
            if layout.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT!r}")
            for key, kind in (("dataset", str), ("categories", list), ("shots", list), ("seeds", list),
                              ("variants", dict), ("vary", dict)):
                if not isinstance(layout.get(key), kind):
                    raise ValueError(f"{key} is missing or not a {kind.__name__}")
        except (ValueError, AttributeError) as error:
            if isinstance(error, CorruptFileError):
                raise
            raise CorruptFileError(f"{self.folder.path / RUN_FILE} cannot be read ({error}); it was edited or "
                                   "damaged. Choose another --name.") from None
        return layout

    def claim(self, layout: dict) -> dict:
        """Make this folder hold ``layout``'s cells too: a new folder gets ``run.json``; an existing one is
        extended (:func:`merge_layouts`). A folder with other files but no ``run.json`` is refused: apt_lab writes
        only into folders it made. Returns the layout now in force."""
        old = self.layout()
        if old is None:
            strangers = [n for n in self.folder.names() if not n.startswith(".apt_lab.lock")]
            if strangers:
                raise RunMismatchError(f"{self.folder.path} is not an apt_lab run folder (no {RUN_FILE}; it holds "
                                       f"{strangers[:5]}); apt_lab writes only into folders it made. Choose another "
                                       "--name or --out.")
        merged = {"format": FORMAT, **layout} if old is None else merge_layouts(old, layout)
        if merged != old:
            self.folder.write(RUN_FILE, json.dumps(merged, indent=2))
        return merged

    # ------------------------------------------------------------------------------------------------ cells
    def cells(self, repair: bool = False, strict: bool = True) -> dict[str, dict]:
        """Finished cells by key, in file order, each checked; a cut-off last line (a kill mid-write) is no cell.
        A bad line raises CorruptFileError naming the file and line, unless ``repair`` (moved into
        cells.rejected.jsonl: the caller holds the lock) or not ``strict`` (skipped)."""
        layout = self.layout()
        data = self.folder.read(CELLS_FILE)
        if layout is None or not data:
            return {}
        lines = data.split(b"\n")[:-1]  # the last piece: "" or a cut-off line without its newline
        cells, bad = {}, []
        for number, raw in enumerate(lines, 1):
            problem, record = _check_line(raw, layout["dataset"])
            if problem is None and record["key"] in cells and cells[record["key"]]["id"] != record["id"]:
                problem = f"a second, different result for cell {record['key']} (the first is kept)"
            if problem is None:
                cells.setdefault(record["key"], record)
            else:
                bad.append((number, raw, problem))
        if bad and repair:
            numbers = {number for number, _, _ in bad}
            self._rewrite([raw for number, raw in enumerate(lines, 1) if number not in numbers], bad)
        elif bad and strict:
            number, _, problem = bad[0]
            raise CorruptFileError(f"{self.folder.path / CELLS_FILE}, line {number}: {problem} ({len(bad)} bad "
                                   f"line(s) in all). Remove the line, or run `apt-lab table FOLDER --repair` to move "
                                   f"bad lines into {REJECTED_FILE}.")
        return cells

    def _rewrite(self, kept: list[bytes], rejected: Sequence[tuple] = ()) -> None:
        """``cells.jsonl`` as exactly the ``kept`` lines (an atomic rewrite); ``rejected`` lines (number, bytes,
        problem) go to cells.rejected.jsonl first, so no line is ever lost."""
        for _, raw, problem in rejected:
            self.folder.append(REJECTED_FILE, json.dumps({"problem": problem,
                                                          "line": raw.decode("utf-8", "backslashreplace")}))
        self.folder.write(CELLS_FILE, b"".join(line + b"\n" for line in kept))
        if rejected:
            print(f"moved {len(rejected)} bad line(s) of {self.folder.path / CELLS_FILE} into {REJECTED_FILE}",
                  flush=True)

    def drop(self, keys: Iterable[str]) -> None:
        """Remove these cells: their lines and the artefacts they own (under their own cell folder)."""
        keys = set(keys)
        cells = self.cells()
        owned = [path for key in keys if key in cells for path in cells[key]["artefacts"]]
        self.folder.remove(owned)  # checked whole before the first deletion
        lines = (self.folder.read(CELLS_FILE) or b"").split(b"\n")[:-1]
        self._rewrite([raw for raw in lines if _key_of(raw) not in keys])

    def append(self, record: dict) -> None:
        """Add one finished cell (one line, one write, fsynced)."""
        self.folder.append(CELLS_FILE, json.dumps(record, sort_keys=True))

    def cut_partial_line(self) -> int:
        """Cut a last line left without its newline by a kill, so the next append starts on a fresh line."""
        return self.folder.cut_partial_line(CELLS_FILE)


def _key_of(raw: bytes) -> str | None:
    try:
        return json.loads(raw.decode("utf-8")).get("key")
    except (ValueError, AttributeError):
        return None


def _check_line(raw: bytes, dataset: str) -> tuple[str | None, dict | None]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return f"not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})", None
    except ValueError as error:
        return f"not JSON ({error})", None
    if not isinstance(record, dict):
        return "not a JSON object", None
    wrong = [name for name, kind in _FIELDS.items()
             if not isinstance(record.get(name), kind) or (kind is int and isinstance(record.get(name), bool))]
    if wrong:
        return f"missing or mistyped field(s) {wrong}", None
    if any(v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool))
           for v in record["metrics"].values()):
        return "a metric is not a number", None
    computes = record["computes"]
    if record["id"] != cell_id(computes):
        return f"its id {record['id']!r} is not the hash of what it computes (the line was edited)", None
    if computes.get("dataset") != dataset:
        return f"a cell of dataset {computes.get('dataset')!r}, not this folder's {dataset!r}", None
    row = computes.get("row")
    cell = Cell(record["category"], record["shots"], record["seed"], record["variant"],
                tuple(row) if isinstance(row, list) else None)
    if record["key"] != cell.key or [computes.get(k) for k in ("category", "shots", "seed", "variant")] != \
            [cell.category, cell.shots, cell.seed, cell.variant]:
        return f"key {record['key']!r} does not match its fields ({cell.key!r})", None
    own = cell.folder + "/"
    if not all(isinstance(p, str) and p.startswith(own) and ".." not in p.split("/") and "//" not in p
               for p in record["artefacts"]):
        return f"an artefact lies outside the cell's own folder {own}", None
    return None, record


# ---------------------------------------------------------------------------------------------------- tables
def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1); the std is None for a single value.

    Example:
        >>> mean_std([0.8, 0.9, 1.0]), mean_std([0.7])
        ((0.9, 0.1), (0.7, None))
    """
    n = len(values)
    mean = sum(values) / n
    std = round(math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)), 12) if n > 1 else None
    return round(mean, 12), std


def columns(layout: dict) -> list[tuple]:
    """(shots, variant, row) in table order: zero-shot variants first (shots 0), then each shot count's variants,
    each severity row (perturbation, strength) in order; row None outside the severity experiment."""
    zero = [v for v, spec in layout["variants"].items() if spec.get("zero_shot")]
    severity = layout.get("severity")
    rows = [(p, s) for p in severity["perturbations"] for s in severity["strengths"]] if severity else [None]
    cells = plan(["_"], layout["shots"], layout["seeds"], list(layout["variants"]), zero, rows)
    return list(dict.fromkeys((c.shots, c.variant, c.row) for c in cells))


def metrics_of(layout: dict) -> tuple[str, ...]:
    return SEVERITY_METRICS if layout.get("experiment") == "severity" else TABLE_METRICS


def table_rows(layout: dict, cells: Iterable[dict], metrics: Sequence[str] | None = None) -> list[dict]:
    """The paper table: one row per (category, shots, variant[, row]) in layout order, then one ``mean`` row per
    (shots, variant[, row]). A row's metric is (mean, std) over seeds with ``n`` seeds; the mean row (``"mean":
    True``; labelled "(mean)" when a category is itself called "mean") is the macro mean over the categories
    computed per seed, then mean ± std over the seeds every category has. Test-defect rows of the severity
    experiment follow their category's perturbation rows.

    Example:
        >>> lay = {"categories": ["a", "b"], "shots": [1], "seeds": [0, 1], "variants": {"apt": {}}}
        >>> cells = [{"category": c, "shots": 1, "seed": s, "variant": "apt", "metrics": {"image_auroc": v}}
        ...          for c, s, v in [("b", 1, 0.8), ("a", 0, 0.8), ("a", 1, 1.0), ("b", 0, 0.6)]]
        >>> [(r["category"], r["n"], r["image_auroc"]) for r in table_rows(lay, cells, ["image_auroc"])]
        [('a', 2, (0.9, 0.141421356237)), ('b', 2, (0.7, 0.141421356237)), ('mean', 2, (0.8, 0.141421356237))]
    """
    metrics = metrics or metrics_of(layout)
    cells = list(cells)
    marks = same_computation(cells)
    found: dict[tuple, dict[int, dict]] = {}
    for cell in cells:
        row = tuple(cell["computes"]["row"]) if cell.get("computes", {}).get("row") else None
        found.setdefault((cell["category"], cell["shots"], cell["variant"], row), {})[cell["seed"]] = cell["metrics"]
    order = columns(layout)
    extra = [key[1:] for key in found if key[1:] not in order]  # test-defect rows, known from the cells
    order += list(dict.fromkeys(sorted(extra, key=lambda c: (c[0], c[1], str(c[2])))))
    rows = []
    for category in layout["categories"]:
        for shots, variant, row in order:
            by_seed = found.get((category, shots, variant, row))
            if by_seed:
                rows.append(_row(category, shots, variant, row, len(by_seed), metrics,
                                 lambda m: [v[m] for v in by_seed.values() if v.get(m) is not None], intervals=True))
                if (category, variant) in marks:
                    rows[-1]["same_as"] = marks[(category, variant)]
    label = "(mean)" if "mean" in layout["categories"] else "mean"  # a category may be called "mean"
    for shots, variant, row in order:
        if row is not None and row[1] is None:
            continue  # a real defect type belongs to one category: no mean over categories
        per_category = [found[key] for key in ((c, shots, variant, row) for c in layout["categories"]) if key in found]
        if not per_category:
            continue
        seeds = sorted(set.intersection(*(set(s) for s in per_category)))

        def per_seed(metric, per_category=per_category, seeds=seeds):
            values = [[by_seed[s].get(metric) for by_seed in per_category] for s in seeds]
            return [sum(v) / len(v) for v in values if all(x is not None for x in v)]
        rows.append({**_row(label, shots, variant, row, len(seeds), metrics, per_seed), "mean": True})
    return rows


def _row(category, shots, variant, row, n, metrics, values_of, intervals: bool = False) -> dict:
    """``intervals``: a rate of one seed also gets ``<rate>_interval`` = its cell's (low, high) (RATE_INTERVALS);
    never a mean over seeds or categories, which one binomial interval does not describe."""
    out = {"category": category, "shots": shots, "variant": variant, "n": n}
    if row is not None:
        out["perturbation"], out["strength"] = row
    for metric in metrics:
        values = values_of(metric)
        if values and len(values) == n:
            out[metric] = mean_std(values)
            bounds = [values_of(b) for b in RATE_INTERVALS.get(metric, ())] if intervals and n == 1 else []
            if bounds and all(len(b) == 1 for b in bounds):
                out[f"{metric}_interval"] = (bounds[0][0], bounds[1][0])
    return out


def format_cell(value: tuple[float, float | None] | None, scale: float = 100.0,
                interval: tuple[float, float] | None = None) -> str:
    """(mean, std) → "95.3 ± 0.4" in percent as papers print; "95.3" without a std; "" when missing; a rate with its
    95 % ``interval`` (low, high) → "5.0 [0.9, 23.6]".

    Example:
        >>> format_cell((0.9532, 0.004)), format_cell((0.9532, None)), format_cell(None)
        ('95.3 ± 0.4', '95.3', '')
        >>> format_cell((0.05, None), interval=(0.0089, 0.2361))
        '5.0 [0.9, 23.6]'
    """
    if value is None:
        return ""
    mean, std = value
    text = format_metric(mean * scale, 1)
    if interval is not None:
        text += f" [{format_metric(interval[0] * scale, 1)}, {format_metric(interval[1] * scale, 1)}]"
    return text if std is None else f"{text} ± {format_metric(std * scale, 1)}"


def environments(cells: dict) -> list[dict]:
    """The distinct environments (:data:`ENVIRONMENT` of each cell's ``ran``) the cells ran in."""
    return [dict(e) for e in dict.fromkeys(tuple((k, c["ran"].get(k)) for k in ENVIRONMENT) for c in cells.values())]


def caption(layout: dict, cells: dict) -> str:
    """What every table of a folder says about itself: dataset, backbone, weights, resolution, shots, seeds, unit,
    and in how many environments its cells ran when more than one."""
    backbones = list(dict.fromkeys(c["computes"]["config"]["backbone"]["name"] for c in cells.values())) or ["?"]
    resolution = sorted({c["eval_resolution"] for c in cells.values()}) or ["?"]
    weights = "pretrained weights" if cells and all(c["pretrained"] for c in cells.values()) else "RANDOM weights"
    where = environments(cells)
    ran = ""
    if len(where) > 1:
        varied = [k for k in ENVIRONMENT if len({str(e[k]) for e in where}) > 1]
        ran = (f" Cells ran in {len(where)} environments (" + "; ".join(
            f"{k} {', '.join(dict.fromkeys(str(e[k]) for e in where))}" for k in varied) + ").")
    return (f"{layout['dataset']}: {', '.join(backbones)} ({weights}), evaluated at "
            f"{', '.join(map(str, resolution))} px; shots {layout['shots']} (0 = zero-shot); mean ± std over seeds "
            f"{layout['seeds']} (n = seeds; std only where n ≥ 2); metrics in percent; {len(cells)} cells.{ran}")


# ------------------------------------------------------------------------------------------ paired differences
BOOTSTRAP = 2000  # resamples of a paired bootstrap (95 % percentile interval), seeded: the same table every time
COMPONENTS = {("apt", "no-roi"): "ROI", ("no-smgs", "no-roi-no-smgs"): "ROI", ("apt", "no-smgs"): "SMGS",
              ("no-roi", "no-roi-no-smgs"): "SMGS"}  # --ablation paper: each component on vs off, the other held


def reference_of(layout: dict) -> str | None:
    """The variant others are compared with: ``layout["reference"]``, else apt, else the first tuned variant."""
    variants = layout["variants"]
    if layout.get("reference") in variants:
        return layout["reference"]
    tuned = [v for v, spec in variants.items() if not spec.get("zero_shot")]
    return "apt" if "apt" in variants else (tuned[0] if tuned else None)


def bootstrap_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values``: :data:`BOOTSTRAP` resamples with replacement, drawn by
    ``numpy.random.default_rng(seed).integers(0, n, (BOOTSTRAP, n))``.

    Example:
        >>> low, high = bootstrap_interval([0.01, 0.02, 0.03, 0.06])
        >>> 0.01 <= low < 0.03 < high <= 0.06
        True
    """
    import numpy as np

    data = np.asarray(values, dtype=float)
    means = data[np.random.default_rng(seed).integers(0, len(data), (BOOTSTRAP, len(data)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return round(float(low), 12), round(float(high), 12)


def _auroc(scores, labels) -> float:
    from scipy.stats import rankdata

    positive = labels == 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((rankdata(scores)[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def image_bootstrap_interval(first: dict, second: dict, seed: int = 0) -> tuple[float, float] | None:
    """95 % interval of ``first``'s image AUROC minus ``second``'s over resampled test images (the same images for
    both: they are one category's test set), or None when the cells kept no scores or saw other test sets."""
    import numpy as np

    a, b = np.asarray(first.get("image_scores") or []), np.asarray(second.get("image_scores") or [])
    labels = np.asarray(first.get("labels") or [])
    if not len(a) or len(a) != len(b) or list(labels) != list(second.get("labels") or []):
        return None
    diffs = []
    for index in np.random.default_rng(seed).integers(0, len(a), (BOOTSTRAP, len(a))):
        y = labels[index]
        if 0 < y.sum() < len(y):  # both classes drawn
            diffs.append(_auroc(a[index], y) - _auroc(b[index], y))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return round(float(low), 12), round(float(high), 12)


def _pairs(cells: Iterable[dict], variant: str, shots: int, reference: str, ref_shots: int, metric: str) -> list:
    """(variant's cell, reference's cell) for every (category, seed) both have, in category then seed order."""
    by = {(c["category"], c["shots"], c["seed"], c["variant"]): c for c in cells}
    return [(cell, by[(c, ref_shots, s, reference)]) for (c, k, s, v), cell in sorted(by.items())
            if v == variant and k == shots and (c, ref_shots, s, reference) in by
            and cell["metrics"].get(metric) is not None
            and by[(c, ref_shots, s, reference)]["metrics"].get(metric) is not None]


def _difference(pairs: list, metric: str) -> dict:
    diffs = [a["metrics"][metric] - b["metrics"][metric] for a, b in pairs]
    out = {"n": len(pairs), "mean": round(sum(diffs) / len(diffs), 12), "low": None, "high": None, "over": None}
    if len(pairs) > 1:
        (out["low"], out["high"]), out["over"] = bootstrap_interval(diffs), "pairs"
    elif metric == "image_auroc":
        interval = image_bootstrap_interval(*pairs[0])
        if interval is not None:
            (out["low"], out["high"]), out["over"] = interval, "test images"
    return out


def paired_differences(layout: dict, cells: Iterable[dict], metric: str = "image_auroc") -> list[dict]:
    """Each other variant's difference to the reference (:func:`reference_of`) in ``metric``, paired by (category,
    shots, seed): the mean difference over the pairs with a 95 % bootstrap interval — over the pairs, or over the
    test images when there is one pair (``"over"`` says which). A zero-shot variant is paired with the reference at
    every shot count, on its one seed.

    Example:
        >>> lay = {"categories": ["a", "b"], "shots": [1], "seeds": [0], "variants": {"apt": {}, "x": {}}}
        >>> cells = [{"category": c, "shots": 1, "seed": 0, "variant": v, "metrics": {"image_auroc": m}}
        ...          for c, v, m in [("a", "apt", 0.9), ("a", "x", 0.8), ("b", "apt", 0.7), ("b", "x", 0.7)]]
        >>> [(d["variant"], d["n"], d["mean"], d["over"]) for d in paired_differences(lay, cells)]
        [('x', 2, -0.05, 'pairs')]
    """
    reference, cells = reference_of(layout), [c for c in cells if not c.get("computes", {}).get("row")]
    out = []
    for shots, variant, _ in columns(layout):
        for ref_shots in ([shots] if shots else layout["shots"]):
            pairs = _pairs(cells, variant, shots, reference, ref_shots, metric) if variant != reference else []
            if pairs:
                out.append({"variant": variant, "shots": ref_shots, "reference": reference,
                            **_difference(pairs, metric)})
    return out


def components(layout: dict, cells: Iterable[dict], metric: str = "image_auroc") -> list[dict]:
    """``--ablation paper``'s component view, per shot count: what switching ROI (CFG's region of interest) and
    SMGS on adds, each paired over (category, seed) and both states of the other component (:data:`COMPONENTS`),
    with a 95 % bootstrap interval over the pairs. Empty unless all four variants are in the folder."""
    if not all(v in layout["variants"] for pair in COMPONENTS for v in pair):
        return []
    cells = [c for c in cells if not c.get("computes", {}).get("row")]
    out = []
    for shots in layout["shots"]:
        for component in ("ROI", "SMGS"):
            pairs = [pair for (on, off), name in COMPONENTS.items() if name == component
                     for pair in _pairs(cells, on, shots, off, shots, metric)]
            if pairs:
                out.append({"component": component, "shots": shots, **_difference(pairs, metric)})
    return out


def same_computation(cells: Iterable[dict]) -> dict[tuple[str, str], str]:
    """(category, variant) → the variant it computes the same as there: every pair of their cells (same shots and
    seed) differs only in ``perturb.region`` while the region of interest covered the whole image (a texture) —
    so ROI on and off cannot differ on that category."""
    by = {}
    for cell in cells:
        by.setdefault((cell["category"], cell["shots"], cell["seed"]), []).append(cell)
    verdict: dict[tuple[str, str, str], bool] = {}
    for group in by.values():
        for roi in group:
            if roi.get("roi_coverage") is None:
                continue
            for other in group:
                only_region = differences(roi["computes"]["config"], other["computes"]["config"]) == \
                    ["perturb.region: 'roi' → 'image'"]
                if only_region:
                    key = (roi["category"], other["variant"], roi["variant"])
                    verdict[key] = verdict.get(key, True) and roi["roi_coverage"] >= 1.0
    return {(c, v): same for (c, v, same), ok in verdict.items() if ok}


def same_computation_note(cells: Iterable[dict]) -> str | None:
    """The words a run prints once, and a table prints under itself, when variants computed the same thing."""
    marks = same_computation(cells)
    if not marks:
        return None
    pairs: dict[tuple[str, str], list[str]] = {}
    for (category, variant), same in marks.items():
        pairs.setdefault((variant, same), []).append(category)
    return " ".join(f"≡ {same}: on {', '.join(cats)}, {variant} computes the same as {same} — the region of interest "
                    "covered the whole image (a texture), so switching ROI off changes nothing there."
                    for (variant, same), cats in pairs.items())


def _markdown_text(text) -> str:
    """A name as inert markdown: HTML and the column separator escaped.

    Example:
        >>> _markdown_text("<img onerror=x>|b")
        '&lt;img onerror=x&gt;\\\\|b'
    """
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _csv_text(text) -> str:
    """A name as an inert spreadsheet cell: a leading = + - @ (a formula) gets a quote in front.

    Example:
        >>> _csv_text('=HYPERLINK("x")'), _csv_text("brick")
        ('\\'=HYPERLINK("x")', 'brick')
    """
    text = str(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def row_labels(layout: dict, row: dict) -> list[str]:
    """A table row's label columns as text: variant, shots, [perturbation, strength,] category, n."""
    variant = row["variant"] + (f" (≡ {row['same_as']})" if row.get("same_as") else "")
    labels = [variant, str(row["shots"]), row["category"], str(row["n"])]
    if layout.get("experiment") == "severity":
        strength = row.get("strength")
        labels[2:2] = [row.get("perturbation", ""), "" if strength is None else f"{strength:g}"]
    return labels


def table_header(layout: dict, metrics) -> list[str]:
    """The table's column names: the label columns of :func:`row_labels`, then the metrics."""
    head = ["variant", "shots", "category", "n", *metrics]
    if layout.get("experiment") == "severity":
        head[2:2] = ["perturbation", "strength"]
    return head


def table_markdown(layout: dict, cells: dict, metrics: Sequence[str] | None = None) -> str:
    """The table as markdown, its caption above it; names escaped (no HTML, no stray column)."""
    metrics = metrics or metrics_of(layout)
    header = table_header(layout, metrics)
    lines = [f"*{_markdown_text(caption(layout, cells))}*", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for row in table_rows(layout, cells.values(), metrics):
        labels = [_markdown_text(text) for text in row_labels(layout, row)]
        labels[-2] = f"**{labels[-2]}**" if row.get("mean") else labels[-2]
        lines.append("| " + " | ".join([*labels, *[format_cell(row.get(m), interval=row.get(f"{m}_interval"))
                                                    for m in metrics]]) + " |")
    note = same_computation_note(cells.values())
    lines += ["", _markdown_text(note)] if note else []
    return "\n".join(lines + _comparison_markdown(layout, cells)) + "\n"


def _interval(d: dict) -> str:
    return "" if d["low"] is None else f"[{format_metric(d['low'] * 100, 1)}, {format_metric(d['high'] * 100, 1)}]"


def _comparison_markdown(layout: dict, cells: dict) -> list[str]:
    """The paired differences to the reference and, for the paper's ablation, the component view."""
    if layout.get("experiment") == "severity":
        return []
    differences_ = paired_differences(layout, cells.values())
    lines = []
    if differences_:
        lines += ["", f"**Paired differences to {_markdown_text(reference_of(layout))}** (image AUROC, percentage "
                  "points): mean over the (category, seed) pairs both variants ran, with a 95 % bootstrap interval "
                  "— over the pairs, or over the test images when there is one pair.", "",
                  "| variant | shots | pairs | Δ image AUROC | 95 % interval | resampled |", "|---" * 6 + "|"]
        lines += [f"| {_markdown_text(d['variant'])} | {d['shots']} | {d['n']} | {format_metric(d['mean'] * 100, 1)} "
                  f"| {_interval(d)} | {d['over'] or ''} |" for d in differences_]
    parts = components(layout, cells.values())
    if parts:
        lines += ["", "**Components** (image AUROC, percentage points): what switching each on adds, paired over "
                  "(category, seed) and both states of the other component.", "",
                  "| component | shots | pairs | Δ image AUROC | 95 % interval |", "|---|---|---|---|---|"]
        lines += [f"| {p['component']} | {p['shots']} | {p['n']} | {format_metric(p['mean'] * 100, 1)} | "
                  f"{_interval(p)} |" for p in parts]
    return lines


def table_csv(layout: dict, cells: dict, metrics: Sequence[str] | None = None) -> str:
    """The table as CSV, in percent like the markdown: a mean and a std column per metric (std empty for n = 1);
    names that a spreadsheet would run as a formula are made inert."""
    metrics = metrics or metrics_of(layout)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extra = [] if layout.get("experiment") == "severity" else ["diff_low_pct", "diff_high_pct", "resampled"]
    suffixes = {m: ("pct", "std_pct", *(("low_pct", "high_pct") if m in RATE_INTERVALS else ())) for m in metrics}
    writer.writerow([*table_header(layout, ()), *[f"{m}_{s}" for m in metrics for s in suffixes[m]], *extra])
    for row in table_rows(layout, cells.values(), metrics):
        values = []
        for metric in metrics:  # mean, std (and a rate's 95 % low, high: one seed of one category)
            numbers = [*row.get(metric, (None, None)), *row.get(f"{metric}_interval", (None, None))]
            values += [format_metric(None if v is None else v * 100, 1) for v in numbers[:len(suffixes[metric])]]
        writer.writerow([*map(_csv_text, row_labels(layout, row)), *values])
    if layout.get("experiment") != "severity":  # the paired differences: Δ in the mean column, the interval after
        for d in paired_differences(layout, cells.values()):
            writer.writerow([*map(_csv_text, [d["variant"], d["shots"], f"difference to {d['reference']}", d["n"]]),
                             format_metric(d["mean"] * 100, 1), "", *[""] * (2 * len(metrics) - 2),
                             *[format_metric(None if d[k] is None else d[k] * 100, 1) for k in ("low", "high")],
                             d["over"] or ""])
    return buffer.getvalue()


def read_run(folder, repair: bool = False) -> tuple[RunStore, dict, dict]:
    """(store, layout, checked cells) of a run folder (a path, or an opened :class:`Folder` the store then keeps
    using); FileNotFoundError when it holds no run."""
    if not isinstance(folder, Folder):
        with Folder(folder) as opened:
            return read_run(opened, repair)
    store = RunStore(folder)
    layout = store.layout()
    if layout is None:
        raise FileNotFoundError(f"{folder.path} holds no apt_lab run ({RUN_FILE} is missing); pass a folder written "
                                "by `apt-lab run`, `apt-lab demo`, `apt-lab sweep` or `apt-lab severity`.")
    return store, layout, store.cells(repair=repair)


def write_tables(path, repair: bool = False) -> tuple:
    """``table.md`` and ``table.csv`` of any run folder, written while holding its lock; returns (md path, csv
    path, markdown). While another process holds the lock (a live run) nothing is written — the paths are None —
    and ``repair`` is refused: it rewrites ``cells.jsonl``, which only the lock's holder may."""
    with Folder(path) as folder:
        try:
            with folder.lock():
                store, layout, cells = read_run(folder, repair)
                markdown = table_markdown(layout, cells)
                folder.write_if_changed("table.md", markdown)
                folder.write_if_changed("table.csv", table_csv(layout, cells))
                return folder.path / "table.md", folder.path / "table.csv", markdown
        except RunInUseError:
            if repair:
                raise
            store, layout, cells = read_run(folder, repair=False)
            return None, None, table_markdown(layout, cells)

