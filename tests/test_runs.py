"""Run folders that never lie and never lose (issue 11, defects 1-3 and 5): Ctrl-C mid-tuning records nothing half
done and a rerun redoes it; a cell computed differently (other settings, other files) is refused, and --overwrite
replaces it; two processes never share a run folder; a rerun of a finished run changes no byte; SIGKILL while the
report is written leaves the old one; category names never leave the run folder.

The subprocess tests slow tuning down with a callback (a real Ctrl-C must land mid-tuning, not by luck of timing);
every wait is for a line the child prints, never a fixed sleep.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from apt_lab.cli import main
from apt_lab.data.files import Folder
from apt_lab.data.readers import DEMO_ROOT
from apt_lab.store import read_run

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO),
       "OMP_NUM_THREADS": "1"}

# A child running `apt-lab <argv>` whose tuning steps each print "STEP <n>" and then sleep.
SLOW_CHILD = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job's children inherit an ignored SIGINT
    import apt_lab.pipeline as pipeline
    tune = pipeline.tune_prompts
    def announce(record):
        print("STEP", record["step"], flush=True)
        time.sleep(0.2)
    def slow_tune(*args, callbacks=(), **kwargs):
        return tune(*args, callbacks=[*callbacks, announce], **kwargs)
    pipeline.tune_prompts = slow_tune
    from apt_lab.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _args(out: Path, *extra: str, name: str = "t", steps: int = 8, categories=("brick",)) -> list[str]:
    return ["demo", "--preset", "quick", "--categories", *categories, "--steps", str(steps), "--out", str(out),
            "--name", name, "--no-progress", *extra]


class _Child:
    """A slowed-down `apt-lab` subprocess whose stdout lines can be awaited."""

    def __init__(self, argv: list[str], cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *argv], cwd=cwd, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # end of output
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 300) -> list[str]:
        """Block until ``predicate(lines)`` holds (or the child ended / a generous timeout: then fail)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate(self.lines) or (self.lines and self.lines[-1] is None), timeout)
        if not (ok and predicate(self.lines)):
            self.proc.kill()
            raise AssertionError(f"child never printed what was awaited; output: {self.lines[-20:]}, "
                                 f"stderr: {self.proc.stderr.read()[-2000:]}")
        return self.lines

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self.stderr = self.proc.stderr.read()
        return rc


def _step_of(category_line: str, step: int):
    """Predicate: the child started ``category_line`` and then printed "STEP <step>"."""
    def predicate(lines):
        starts = [i for i, line in enumerate(lines) if line is not None and line.startswith(category_line)]
        return bool(starts) and f"STEP {step}" in lines[starts[-1]:]
    return predicate


def _cells(folder: Path) -> dict[str, dict]:
    """The run folder's finished cells by key, checked."""
    with Folder(folder) as opened:
        return read_run(opened)[2]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- defect 1: Ctrl-C during tuning ---------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_mid_tuning_records_nothing_half_done_and_a_rerun_redoes_it(tmp_path, capsys):
    argv = _args(tmp_path, categories=("grass", "brick"))
    child = _Child(argv, tmp_path)
    child.wait_for(_step_of("[brick]", 2))  # grass finished; brick is mid-tuning
    child.proc.send_signal(signal.SIGINT)
    assert child.finish() == 130, child.stderr[-2000:]
    assert "interrupted" in child.stderr and "run the same command again to resume" in child.stderr
    folder = tmp_path / "t"
    cells = _cells(folder)
    assert list(cells) == ["grass/k2/s0/apt"]  # brick is not recorded as done
    assert not (folder / "cells" / "brick").exists()

    assert main(argv) == 0  # the same command resumes: grass kept, brick tuned from scratch (all 8 steps)
    out = capsys.readouterr().out
    assert "1 cells done, 1 to run" in out and "[brick]" in out and "[grass]" not in out
    resumed = _cells(folder)
    assert resumed["grass/k2/s0/apt"] == cells["grass/k2/s0/apt"]
    assert main(_args(tmp_path, categories=("brick",), name="clean")) == 0  # never interrupted
    clean = _cells(tmp_path / "clean")
    assert resumed["brick/k2/s0/apt"]["metrics"] == clean["brick/k2/s0/apt"]["metrics"]


# --- defect 2: what a cell computes, and concurrent runs -----------------------------------------
@pytest.mark.slow
def test_a_cell_computed_differently_is_refused_until_overwrite(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(DEMO_ROOT / "brick", data / "brick")
    common = ["run", "--dataset", "mvtec", "--root", str(data), "--preset", "quick", "--categories", "brick",
              "--out", str(tmp_path), "--name", "t", "--no-progress"]
    base = [*common, "--steps", "1"]
    assert main(base) == 0
    folder = tmp_path / "t"
    before = _files(folder)
    capsys.readouterr()
    assert main([*common, "--steps", "2"]) == 1  # the same cell name, another computation
    err = capsys.readouterr().err
    assert "brick/k2/s0/apt: config.train.steps: 1 → 2" in err, err
    assert "--overwrite" in err and "--name" in err and err.count("\n") == 1, err
    image = data / "brick" / "test" / "good" / "000.png"
    image.write_bytes((data / "brick" / "test" / "good" / "001.png").read_bytes())  # same name, other picture
    assert main(base) == 1
    assert "brick/k2/s0/apt: files: " in capsys.readouterr().err
    assert _files(folder) == before  # nothing was touched by the refused commands
    assert main(base + ["--overwrite"]) == 0  # replacing the stale cell is one flag away
    assert "0 cells done, 1 to run" in capsys.readouterr().out
    after = _files(folder)
    assert after["cells.jsonl"] != before["cells.jsonl"] and after["cells.jsonl"].count(b"\n") == 1


@pytest.mark.slow
def test_two_concurrent_runs_in_one_folder_one_is_refused(tmp_path, capsys):
    argv = _args(tmp_path, steps=6)
    child = _Child(argv, tmp_path)
    child.wait_for(lambda lines: "STEP 1" in lines)
    assert main(argv) == 1  # refused at once, before loading anything
    err = capsys.readouterr().err
    assert f"in use by another apt_lab process (pid {child.proc.pid}" in err
    assert child.finish() == 0, child.stderr[-2000:]
    cells = _cells(tmp_path / "t")
    assert list(cells) == ["brick/k2/s0/apt"] and cells["brick/k2/s0/apt"]["computes"]["config"]["train"]["steps"] == 6


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path, capsys):
    from apt_lab.data.files import LOCK_NAME, folder_lock

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2 ** 22 + 7, "host": "gone", "started": "yesterday"}))
    with folder_lock(tmp_path):  # the file is there, but no process holds it: stale
        assert f"pid {2 ** 22 + 7} is no longer running" in capsys.readouterr().out
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with folder_lock(tmp_path):  # re-entrant in one process
            pass
        holder = subprocess.run([sys.executable, "-c", "from apt_lab.data.files import folder_lock\n"
                                 f"with folder_lock({str(tmp_path)!r}): pass"], env=ENV, capture_output=True, text=True)
        assert holder.returncode == 1 and "RunInUseError" in holder.stderr
        assert f"pid {os.getpid()}" in holder.stderr
    assert not (tmp_path / LOCK_NAME).exists()  # released (and removed) at the end of the block


# --- defect 3: reruns and reports -----------------------------------------------------------------
@pytest.mark.slow
def test_rerun_of_a_finished_run_changes_no_byte(tmp_path, capsys):
    argv = _args(tmp_path, steps=2)
    assert main(argv) == 0
    folder = tmp_path / "t"
    before = _files(folder)
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    cell = "cells/brick/k2/s0/apt/"
    assert {"run.json", "cells.jsonl", "table.md", "table.csv", "report.html", cell + "prompts.json",
            cell + "prompts.safetensors", cell + "examples.safetensors"} == set(before)
    assert (tmp_path / "plotly.min.js").is_file()  # one copy for every run folder beside it
    assert json.loads(before["cells.jsonl"])["timings"]["cell_s"] > 0
    assert main(argv) == 0
    assert "1 cells done, 0 to run" in capsys.readouterr().out
    assert _files(folder) == before  # every byte, report maps included
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps  # not even rewritten
    assert b'id="figure-0"' in before["report.html"] and b"white outline" in before["report.html"].lower()


@pytest.mark.slow
def test_sigkill_while_the_report_is_written_leaves_the_old_report(tmp_path):
    assert main(_args(tmp_path, "--method", "human")) == 0
    folder = tmp_path / "t"
    old = (folder / "report.html").read_bytes()
    script = textwrap.dedent(f"""
        import os, time
        opened = os.fdopen
        class Half:  # a file whose first write stops half-way, then hangs until the kill
            def __init__(self, file):
                self.file = file
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                self.file.close()
            def write(self, data):
                self.file.write(data[: len(data) // 2])
                self.file.flush()
                print("HALF", flush=True)
                time.sleep(600)
        os.fdopen = lambda fd, mode="r", *args, **kwargs: (Half if "w" in mode else lambda f: f)(
            opened(fd, mode, *args, **kwargs))  # what apt_lab.data.files.Folder.write writes through
        import apt_lab.report as report
        report.caption = lambda layout, cells: "renamed"  # the redrawn page differs, so it must be written
        report.write_report({str(folder)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "HALF"
    child.send_signal(signal.SIGKILL)
    child.wait(60)
    assert (folder / "report.html").read_bytes() == old
    assert main(["report", str(folder)]) == 0  # redrawn from the folder alone: the same page
    assert (folder / "report.html").read_bytes() == old


# --- defect 5: names that would leave the run folder ----------------------------------------------
def test_traversal_category_and_run_names_write_nothing_outside(tmp_path, capsys):
    data = tmp_path / "deep" / "er" / "data"
    for kind, source in (("good", "good"), ("bad", "hole")):
        shutil.copytree(DEMO_ROOT / "brick" / "test" / source, data / kind)
    outside = tmp_path / "deep" / "x"
    # a category is found in the data (exit 1, one line); a run name is an argument (exit 2, with the usage)
    for argv, code in ((["--categories", "../../../x"], 1), (["--name", "../../x"], 2)):
        assert main(["run", "--dataset", "folder", "--root", str(data), "--preset", "quick", "--steps", "1",
                     "--out", str(tmp_path / "deep" / "er" / "runs"), "--no-progress", *argv]) == code
        err = capsys.readouterr().err
        assert "is not a plain name" in err.splitlines()[-1] and (code == 2 or err.count("\n") == 1), err
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["er"] and not outside.exists()
    assert sorted(p.name for p in (tmp_path / "deep" / "er").iterdir()) == ["data"]  # no run folder left either
