"""The command line's one surface (issue 24): demo, run, sweep and severity share the data, method and output argument
groups, every flag says what it does, and every argument error — a range, a --vary value, a name, a backbone, an
unknown flag — exits 2 under the subcommand's usage before torch is imported."""
import argparse
import json
import subprocess
import sys

import pytest

from apt_lab import cli
from apt_lab.cli import main

SWEEP = ["sweep", "--dataset", "demo", "--preset", "quick"]
SEVERITY = ["severity", "--dataset", "demo", "--preset", "quick"]
SHARED = {"data": ["--dataset", "--root", "--categories"],
          "method": ["--preset", "--config", "--steps", "--device", "--plugin", "--max-image-pixels"],
          "output": ["--out", "--name", "--overwrite", "--repair", "--no-progress"]}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    top = cli.parser()
    (sub,) = [action for action in top._actions if isinstance(action, argparse._SubParsersAction)]
    return {"": top, **sub.choices}


# ------------------------------------------------------------------------------------------------- one surface
@pytest.mark.parametrize("command", ["demo", "run", "sweep", "severity"])
def test_help_of_each_run_command_lists_the_shared_groups(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for title, flags in SHARED.items():
        assert f"\n{title}:" in text, text  # a titled group
        for flag in flags:
            if command == "demo" and flag in ("--dataset", "--root"):  # the bundled demo photos
                assert flag not in text
            else:
                assert flag in text, f"{command} --help lacks {flag}"  # severity had no --no-progress, demo no --plugin


def test_every_flag_has_help():
    for command, p in _subparsers().items():
        for action in p._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and action.help.strip(), f"apt-lab {command} {action.option_strings or action.dest}"


# ------------------------------------------------------------------------------- bad arguments: exit 2, no torch
def _over_the_cap() -> list[str]:
    from apt_lab.sweep import MAX_VARIANTS

    half = MAX_VARIANTS // 2 + 1  # half × 2 > MAX_VARIANTS
    return ["--vary", "smgs.lam=" + ",".join(str(i / 1000) for i in range(half)), "--vary", "train.steps=1,2"]


BAD = [  # (argv, words of the last stderr line)
    (SEVERITY + ["--strengths", "-1"], "argument --strengths: must be a number from 0 to 10, got '-1'"),
    (SEVERITY + ["--strengths", "0.5", "nan"], "argument --strengths: must be a number from 0 to 10, got 'nan'"),
    (SEVERITY + ["--strengths", "0.5", "--target-fpr", "2"], "argument --target-fpr: must be a number in (0, 1)"),
    (SEVERITY + ["--strengths", "0.5", "--held-out", "1"], "argument --held-out: must be a whole number ≥ 2"),
    (SWEEP + ["--vary", "smgs.lam=abc"], "smgs.lam"),
    (SWEEP + ["--vary", "nosuch.x=1"], "nosuch.x"),
    (SWEEP + ["--vary", "smgs.lam=1e309"], "smgs.lam"),
    (SWEEP + ["--vary", "smgs.lam=nan"], "smgs.lam"),
    (SWEEP + ["--vary", "score.memory=yes"], "score.memory"),
    (SWEEP + ["--vary", "smgs.lam=0", "--vary", "smgs.lam=1"], "smgs.lam"),
    (SWEEP + ["--vary", "train.seed=0,1"], "train.seed"),
    (SWEEP + ["OVER THE CAP"], "more than MAX_VARIANTS"),
    (SWEEP + ["--name", "a/b"], "run name 'a/b' is not a plain name"),
    (["demo", "--preset", "quick", "--name", "a/b"], "run name 'a/b' is not a plain name"),
    (SWEEP + ["--vary", "backbone.name=apt-tiny,nosuch"], "unknown backbone 'nosuch'"),
    (SWEEP + ["--nosuch"], "unrecognized arguments: --nosuch"),
    (SEVERITY + ["--strengths", "1", "--method", "apt"], "unrecognized arguments: --method apt"),
]


@pytest.mark.parametrize("argv, complaint", BAD,
                         ids=[" ".join(argv[:1] + argv[3 if argv[0] == "demo" else 5:]) for argv, _ in BAD])
def test_bad_arguments_exit_2_under_the_subcommands_usage_without_torch(argv, complaint, tmp_path):
    if "OVER THE CAP" in argv:
        from apt_lab.sweep import MAX_VARIANTS

        argv, complaint = [*argv[:-1], *_over_the_cap()], f"more than {MAX_VARIANTS}"
    argv = [*argv, "--out", str(tmp_path / "runs")]
    code = ("import sys; from apt_lab.cli import main; "
            f"code = main({argv!r}); print('torch' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout.split() == ["False"], (done.stdout, done.stderr)
    assert f"usage: apt-lab {argv[0]}" in done.stderr  # was the top-level usage for an unknown argument
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"apt-lab {argv[0]}: error: ") and complaint in last, last
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_the_cap_says_its_figure_and_how_to_go_past_it(capsys):
    from apt_lab.sweep import MAX_VARIANTS

    assert main(SWEEP + _over_the_cap()) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"more than {MAX_VARIANTS}" in last and "several sweeps into one folder" in last, last
    assert len(cli.parse(SWEEP + _over_the_cap()[:2]).vary["smgs.lam"]) == MAX_VARIANTS // 2 + 1  # one key: under


def test_a_bad_config_file_is_a_usage_error_naming_the_file(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train": {"steps": -1}}))
    assert main(SWEEP[:3] + ["--config", str(path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("apt-lab sweep: error: ") and f"config file {path}" in last and "train.steps=-1" in last


def test_a_device_that_is_not_there_exits_2_before_any_work(tmp_path, capsys):
    import torch

    missing = f"cuda:{torch.cuda.device_count() + 6}"
    for extra in (["--device", missing], ["--vary", f"backbone.device=cpu,{missing}"]):
        assert main(SWEEP + extra + ["--out", str(tmp_path)]) == 2
        assert f"device '{missing}' does not exist" in capsys.readouterr().err
    assert main(SWEEP + ["--device", "nope:1", "--out", str(tmp_path)]) == 2
    assert "device 'nope:1'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_known_backbones_are_open_clips_list_without_importing_it():
    code = "import sys; from apt_lab.cli import known_backbones; print(sorted(known_backbones())); " \
           "print('open_clip' in sys.modules or 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    names, loaded = done.stdout.splitlines()
    import apt_lab.weights  # noqa: F401  registers apt-tiny with open_clip
    import open_clip

    assert eval(names) == sorted(open_clip.list_models()) and loaded == "False"


# ----------------------------------------------------------------------------------------- arguments → a Plan
def test_all_means_every_category_everywhere():
    for argv in (["demo", "--preset", "quick"], SWEEP, SEVERITY + ["--strengths", "1"]):
        assert cli.parse(argv + ["--categories", "all"]).categories is None
        assert cli.parse(argv + ["--categories", "brick", "grass"]).categories == ("brick", "grass")


def test_each_run_command_builds_its_plan():
    from apt_lab.sweep import Plan, Severity

    args = cli.parse(["demo", "--preset", "quick", "--k", "1", "--seed", "3", "--method", "human", "--plugin", "x.py"])
    plan = args.plan_of(args)
    assert isinstance(plan, Plan) and (plan.dataset, plan.shots, plan.seeds, plan.methods, plan.plugins,
                                       plan.artefacts) == ("demo", (1,), (3,), ("human",), ("x.py",), True)
    args = cli.parse(SWEEP + ["--shots", "1", "2", "--seeds", "0", "--methods", "apt", "--vary", "smgs.lam=0,1"])
    plan = args.plan_of(args)
    assert (plan.shots, plan.seeds, plan.methods, dict(plan.vary), plan.severity) == \
        ((1, 2), (0,), ("apt",), {"smgs.lam": [0, 1]}, None)
    args = cli.parse(SEVERITY + ["--strengths", "0", "0.5", "--kinds", "gaussian", "--k", "2", "--seed", "1",
                                 "--threshold", "f1", "--target-fpr", "0.1", "--held-out", "4"])
    plan = args.plan_of(args)
    assert (plan.methods, plan.shots, plan.seeds) == (("apt",), (2,), (1,))
    assert plan.severity == Severity((0.0, 0.5), ("gaussian",), "f1", 0.1, 4)
