"""The run store: one folder format for a run and a sweep, read without torch.

A run is a sweep of one (shots, seed, method) over its categories. Either is a folder ``runs/<name>/`` holding

    run.json       what it is (its identity): dataset, root, each category's file fingerprint, categories, shots,
                   seeds, variants (method kind and the settings each changes), config, apt_lab version, few-shot
                   draws. A rerun with anything different is refused; its hash is the run id every cell carries.
    cells.jsonl    one JSON line per finished cell (dataset category × shots × seed × variant), appended the moment
                   the cell finishes; a killed process leaves at most a cut-off last line, which the next writer cuts.
    artefacts      what a cell saved beside its line (prompts, example maps), listed in the line.
    table.md/.csv, report.html   drawn from the two files above, at any time.

Every line is checked on read — schema, key in the plan, run id — so a malformed, foreign or conflicting line is
one error naming ``cells.jsonl`` and the line (``repair=True`` / ``--repair`` moves such lines aside into
``cells.rejected.jsonl`` instead). Files are written and deleted only through :mod:`apt_lab.data.files`, and only
those the manifest (:meth:`RunStore.manifest`) names. Tables follow the plan's order whatever order cells finished
in, show ``n`` and a standard deviation only where n ≥ 2, and print zero-shot methods once (shots 0).

Example:
    >>> cells = plan(["bottle", "cable"], shots=(1, 2), seeds=(0,), methods=("apt", "human"), zero_shot=("human",))
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
from pathlib import Path
from typing import Iterable, Sequence

from .data.files import append_line, atomic_write, cut_partial_line, inside, remove_files, write_if_changed
from .errors import CorruptFileError, RunMismatchError
from .metrics import format_metric

FORMAT = "apt_lab.run/1"
RUN_FILE, CELLS_FILE, REJECTED_FILE = "run.json", "cells.jsonl", "cells.rejected.jsonl"
PLOTLY_JS = "plotly.min.js"  # beside report.html: the page opens offline without embedding 4.7 MB of script
DRAWN = ("table.md", "table.csv", "report.html", PLOTLY_JS)  # redrawn from run.json and cells.jsonl at any time
LEGACY_FILES = ("results.json", "sweep.json")  # apt_lab 0.2's two folder formats
TABLE_METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "aupro")  # the columns papers print
_FIELDS = {"run": str, "key": str, "category": str, "shots": int, "seed": int, "method": str, "metrics": dict,
           "timings": dict, "artefacts": list, "pretrained": bool, "eval_resolution": int, "n_test": int}


@dataclass(frozen=True)
class Cell:
    """One independent unit of a run: a category, a shot count (0 = zero-shot), a seed and a variant."""

    category: str
    shots: int
    seed: int
    method: str

    @property
    def key(self) -> str:
        return f"{self.category}/k{self.shots}/s{self.seed}/{self.method}"


def plan(categories: Sequence[str], shots: Sequence[int], seeds: Sequence[int], methods: Sequence[str],
         zero_shot: Iterable[str] = ()) -> list[Cell]:
    """Every cell in plan order: category, then shots, seeds, methods. A zero-shot method (no tuning, no shots)
    has one cell per category, shots 0 and the first seed, first."""
    zero = [m for m in methods if m in set(zero_shot)]
    tuned = [m for m in methods if m not in zero]
    return [cell for c in categories for cell in
            [Cell(c, 0, seeds[0], m) for m in zero] + [Cell(c, k, s, m) for k in shots for s in seeds for m in tuned]]


def plan_of(identity: dict) -> list[Cell]:
    """The plan a run's identity describes."""
    variants = identity["variants"]
    return plan(identity["categories"], identity["shots"], identity["seeds"], list(variants),
                [name for name, v in variants.items() if v.get("zero_shot")])


def run_id(identity: dict) -> str:
    """A short hash of the identity: every cell line carries it, so a line from another run is recognised."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def differences(old, new, path: str = "") -> list[str]:
    """Human-readable leaf differences between two JSON values (two identities).

    Example:
        >>> differences({"shots": [1], "config": {"train": {"steps": 10}}}, {"shots": [1], "config": {"train": {"steps": 20}}})
        ['config.train.steps: 10 → 20']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in dict.fromkeys([*old, *new])
                for d in differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]
    return [] if old == new else [f"{path}: {old!r} → {new!r}"]


class RunStore:
    """A run folder: its identity, its cells, its manifest. Writers hold ``folder_lock(folder)`` around use."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    # ------------------------------------------------------------------------------------------------ identity
    def identity(self) -> dict | None:
        """``run.json``, or None when the folder holds no run; a folder in apt_lab 0.2's format is refused."""
        path = inside(self.folder, RUN_FILE)
        if not path.is_file():
            legacy = [name for name in LEGACY_FILES if (self.folder / name).exists()]
            if legacy:
                raise CorruptFileError(f"{self.folder} holds a run in apt_lab 0.2's format ({legacy[0]}), which this "
                                       "version does not read; rerun it into a new folder (another --name), or "
                                       "delete the folder.")
            return None
        try:
            identity = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(identity, dict) or identity.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT!r}")
            plan_of(identity)  # the keys a plan needs are there
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            raise CorruptFileError(f"{path} cannot be read ({error}); it was edited or damaged. Start the run afresh "
                                   "with --overwrite, or choose another --name.") from None
        return identity

    def claim(self, identity: dict, overwrite: bool = False) -> None:
        """Make this folder ``identity``'s run: a new folder gets ``run.json``; the same run resumes; another run
        is refused (RunMismatchError naming what differs) unless it has no finished cell yet (then it is replaced)
        or ``overwrite`` (its manifest's files are deleted first). ``overwrite`` on a folder with files but no run
        identity is refused: apt_lab deletes only what it wrote."""
        identity = json.loads(json.dumps({"format": FORMAT, **identity}))  # as it reads back from run.json
        try:
            previous = self.identity()
        except CorruptFileError:
            if not overwrite:
                raise
            previous = {}
        if overwrite:
            self.clear(previous)
            previous = None
        if previous is not None and previous != identity:
            if self.cells(previous):
                differ = differences(previous, identity)
                more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
                raise RunMismatchError(
                    f"{self.folder} holds another run ({'; '.join(differ[:6])}{more}); resuming it would mix two "
                    "runs' results. Run the same command as before to resume it, pass --overwrite to replace it, or "
                    "choose another --name.")
            self.clear(previous)  # begun but nothing finished (e.g. killed before its first cell): claim it
            previous = None
        if previous is None:
            atomic_write(RUN_FILE, lambda tmp: tmp.write_text(json.dumps(identity, indent=2)), self.folder)

    def manifest(self, identity: dict | None = None) -> list[str]:
        """Every file of this run that apt_lab wrote and may delete: run.json, cells, drawn files, artefacts."""
        artefacts = []
        if identity:
            cells = self.cells(identity, repair=False, strict=False)
            artefacts = [path for record in cells.values() for path in record["artefacts"]]
        return [RUN_FILE, CELLS_FILE, REJECTED_FILE, *DRAWN, *artefacts]

    def clear(self, identity: dict | None) -> None:
        """Delete the manifest's files (``identity`` None: the folder holds no run → refused unless empty)."""
        if identity is None:
            strangers = [p.name for p in self.folder.iterdir() if p.name != ".apt_lab.lock"] \
                if self.folder.is_dir() else []
            if strangers:
                raise RunMismatchError(f"{self.folder} is not an apt_lab run folder (no {RUN_FILE}; it holds "
                                       f"{sorted(strangers)[:5]}); --overwrite deletes only a run's own files. "
                                       "Choose another --name or --out.")
            return
        remove_files(self.folder, self.manifest(identity))

    # ------------------------------------------------------------------------------------------------ cells
    def cells(self, identity: dict | None = None, repair: bool = False, strict: bool = True) -> dict[str, dict]:
        """Finished cells by key, in file order, each checked (schema, key in the plan, run id); a cut-off last
        line (a kill mid-write) is no cell. A bad line raises CorruptFileError naming the file and line, unless
        ``repair`` (moved into cells.rejected.jsonl) or not ``strict`` (skipped)."""
        identity = identity if identity is not None else self.identity()
        path = inside(self.folder, CELLS_FILE)
        if identity is None or not path.is_file():
            return {}
        keys, expected = {c.key for c in plan_of(identity)}, run_id(identity)
        cells, bad = {}, []
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for number, line in enumerate(lines, 1):
            if not line.endswith("\n"):
                continue  # cut off by a kill: never a finished cell
            problem, record = _check_line(line, keys, expected)
            if problem is None and record["key"] in cells and cells[record["key"]] != record:
                problem = f"a second, different result for cell {record['key']} (the first is kept)"
            if problem is None:
                cells[record["key"]] = record
            else:
                bad.append((number, line, problem))
        if bad and repair:
            self._reject(lines, bad)
        elif bad and strict:
            number, _, problem = bad[0]
            raise CorruptFileError(f"{path}, line {number}: {problem} ({len(bad)} bad line(s) in all). Remove the "
                                   "line, or run `apt-lab table FOLDER --repair` to move bad lines into "
                                   f"{REJECTED_FILE}.")
        return cells

    def _reject(self, lines: list[str], bad: list) -> None:
        for _, line, problem in bad:
            append_line(inside(self.folder, REJECTED_FILE), json.dumps({"problem": problem, "line": line}))
        numbers = {number for number, _, _ in bad}
        kept = "".join(line for number, line in enumerate(lines, 1) if number not in numbers and line.endswith("\n"))
        atomic_write(CELLS_FILE, lambda tmp: tmp.write_text(kept, encoding="utf-8"), self.folder)
        print(f"moved {len(bad)} bad line(s) of {self.folder / CELLS_FILE} into {REJECTED_FILE}", flush=True)

    def append(self, record: dict) -> None:
        """Add one finished cell (one line, one write, fsynced)."""
        append_line(inside(self.folder, CELLS_FILE), json.dumps(record, sort_keys=True))

    def cut_partial_line(self) -> int:
        """Cut a last line left without its newline by a kill, so the next append starts on a fresh line."""
        return cut_partial_line(inside(self.folder, CELLS_FILE))


def _check_line(line: str, keys: set, expected_run: str) -> tuple[str | None, dict | None]:
    try:
        record = json.loads(line)
    except ValueError as error:
        return f"not JSON ({error})", None
    if not isinstance(record, dict):
        return "not a JSON object", None
    wrong = [name for name, kind in _FIELDS.items()
             if not isinstance(record.get(name), kind) or (kind is int and isinstance(record.get(name), bool))]
    if wrong:
        return f"missing or mistyped field(s) {wrong}", None
    bad_metrics = [k for k, v in record["metrics"].items()
                   if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool))]
    if bad_metrics:
        return f"metrics {bad_metrics} are not numbers", None
    if any(Path(p).is_absolute() or ".." in Path(p).parts for p in record["artefacts"] if isinstance(p, str)) \
            or not all(isinstance(p, str) for p in record["artefacts"]):
        return "an artefact path leaves the run folder", None
    if record["run"] != expected_run:
        return f"written by another run (run id {record['run']!r}, this run is {expected_run!r})", None
    key = Cell(record["category"], record["shots"], record["seed"], record["method"]).key
    if record["key"] != key:
        return f"key {record['key']!r} does not match its fields ({key!r})", None
    if key not in keys:
        return f"cell {key} is not in this run's plan (categories, shots, seeds, methods of run.json)", None
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


def table_rows(identity: dict, cells: Iterable[dict], metrics: Sequence[str] = TABLE_METRICS) -> list[dict]:
    """The paper table: one row per (category, shots, method) in plan order, then one ``mean`` row per (shots,
    method). A row's metric is (mean, std) over seeds with ``n`` seeds; the mean row (``"mean": True``; labelled
    "(mean)" when a category is itself called "mean") is the macro mean over the categories computed per seed, then
    mean ± std over the seeds every category has.

    Example:
        >>> ident = {"categories": ["a", "b"], "shots": [1], "seeds": [0, 1], "variants": {"apt": {}}}
        >>> cells = [{"category": c, "shots": 1, "seed": s, "method": "apt", "metrics": {"image_auroc": v}}
        ...          for c, s, v in [("b", 1, 0.8), ("a", 0, 0.8), ("a", 1, 1.0), ("b", 0, 0.6)]]
        >>> [(r["category"], r["n"], r["image_auroc"]) for r in table_rows(ident, cells, ["image_auroc"])]
        [('a', 2, (0.9, 0.141421356237)), ('b', 2, (0.7, 0.141421356237)), ('mean', 2, (0.8, 0.141421356237))]
    """
    found: dict[tuple, dict[int, dict]] = {}
    for cell in cells:
        found.setdefault((cell["category"], cell["shots"], cell["method"]), {})[cell["seed"]] = cell["metrics"]
    columns = list(dict.fromkeys((c.shots, c.method) for c in plan_of(identity)))  # (shots, method) in plan order
    rows = []
    for category in identity["categories"]:
        for shots, method in columns:
            by_seed = found.get((category, shots, method))
            if by_seed:
                rows.append(_row(category, shots, method, len(by_seed), metrics,
                                 lambda m: [v[m] for v in by_seed.values() if v.get(m) is not None],
                                 len(by_seed)))
    label = "(mean)" if "mean" in identity["categories"] else "mean"  # a category may be called "mean"
    for shots, method in columns:
        per_category = [found[key] for key in ((c, shots, method) for c in identity["categories"]) if key in found]
        if not per_category:
            continue
        seeds = sorted(set.intersection(*(set(s) for s in per_category)))

        def per_seed(metric, per_category=per_category, seeds=seeds):
            values = [[by_seed[s].get(metric) for by_seed in per_category] for s in seeds]
            return [sum(v) / len(v) for v in values if all(x is not None for x in v)]
        rows.append({**_row(label, shots, method, len(seeds), metrics, per_seed, len(seeds)), "mean": True})
    return rows


def _row(category, shots, method, n, metrics, values_of, expected) -> dict:
    row = {"category": category, "shots": shots, "method": method, "n": n}
    for metric in metrics:
        values = values_of(metric)
        if values and len(values) == expected:
            row[metric] = mean_std(values)
    return row


def format_cell(value: tuple[float, float | None] | None, scale: float = 100.0) -> str:
    """(mean, std) → "95.3 ± 0.4" in percent as papers print; "95.3" without a std; "" when missing.

    Example:
        >>> format_cell((0.9532, 0.004)), format_cell((0.9532, None)), format_cell(None)
        ('95.3 ± 0.4', '95.3', '')
    """
    if value is None:
        return ""
    mean, std = value
    text = format_metric(mean * scale, 1)
    return text if std is None else f"{text} ± {format_metric(std * scale, 1)}"


def caption(identity: dict, cells: dict) -> str:
    """What every table of a run says about itself: dataset, backbone, weights, resolution, shots, seeds, unit."""
    backbone = identity["config"]["backbone"]
    resolution = sorted({c["eval_resolution"] for c in cells.values()}) or ["?"]
    weights = "pretrained weights" if cells and all(c["pretrained"] for c in cells.values()) else "RANDOM weights"
    tag = f" / {backbone['pretrained']}" if backbone.get("pretrained") else ""
    done = f"{len(cells)} of {len(plan_of(identity))} cells done"
    return (f"{identity['dataset']}: {backbone['name']}{tag} ({weights}), evaluated at "
            f"{', '.join(map(str, resolution))} px; shots {identity['shots']} (0 = zero-shot); mean ± std over seeds "
            f"{identity['seeds']} (n = seeds; std only where n ≥ 2); metrics in percent; apt_lab "
            f"{identity['apt_lab']}; {done}.")


def table_markdown(identity: dict, cells: dict, metrics: Sequence[str] = TABLE_METRICS) -> str:
    """The table as markdown, its caption above it."""
    header = ["method", "shots", "category", "n", *metrics]
    lines = [f"*{caption(identity, cells)}*", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table_rows(identity, cells.values(), metrics):
        label = f"**{row['category']}**" if row.get("mean") else row["category"]
        lines.append("| " + " | ".join([row["method"], str(row["shots"]), label, str(row["n"]),
                                        *[format_cell(row.get(m)) for m in metrics]]) + " |")
    return "\n".join(lines) + "\n"


def table_csv(identity: dict, cells: dict, metrics: Sequence[str] = TABLE_METRICS) -> str:
    """The table as CSV, in percent like the markdown: a mean and a std column per metric (std empty for n = 1)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "shots", "category", "n", *[f"{m}_{s}" for m in metrics for s in ("pct", "std_pct")]])
    for row in table_rows(identity, cells.values(), metrics):
        values = []
        for metric in metrics:
            mean, std = row.get(metric, (None, None))
            values += [format_metric(None if mean is None else mean * 100, 2),
                       format_metric(None if std is None else std * 100, 2)]
        writer.writerow([row["method"], row["shots"], row["category"], row["n"], *values])
    return buffer.getvalue()


def read_run(folder: str | Path, repair: bool = False) -> tuple[RunStore, dict, dict]:
    """(store, identity, checked cells) of any run folder; FileNotFoundError when it holds no run."""
    store = RunStore(folder)
    identity = store.identity()
    if identity is None:
        raise FileNotFoundError(f"{folder} holds no apt_lab run ({RUN_FILE} is missing); pass a folder written by "
                                "`apt-lab run`, `apt-lab demo` or `apt-lab sweep`.")
    return store, identity, store.cells(identity, repair=repair)


def write_tables(folder: str | Path, repair: bool = False) -> tuple[Path, Path, str]:
    """Write ``table.md`` and ``table.csv`` of any run folder; returns their paths and the markdown."""
    store, identity, cells = read_run(folder, repair)
    markdown = table_markdown(identity, cells)
    write_if_changed("table.md", markdown, store.folder)
    write_if_changed("table.csv", table_csv(identity, cells), store.folder)
    return store.folder / "table.md", store.folder / "table.csv", markdown
