"""A config that exists is a valid config (issue 18): every section checks each field against one rule when it is
made — from a JSON file, from ``replace(...)``, from Python — and refuses with one ConfigError naming the field,
the value and what is allowed. Each case below was accepted silently before (or failed ~10 s into a run)."""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import apt_lab.config as config_module
from apt_lab.config import APTConfig, PerturbConfig, ScoreConfig, TrainConfig
from apt_lab.errors import ConfigError

PACKAGE = Path(config_module.__file__).parent


def write(tmp_path, data, name="config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


# -------------------------------------------------------------------------------------- wrong types from JSON
@pytest.mark.parametrize("section, field, value", [
    ("score", "memory", "no"),  # was truthy: switched the visual memory ON
    ("train", "encode_each_step", "false"),  # was truthy: encoded every step
    ("prompts", "per_category", 1),
    ("prompts", "truncate", None)])
def test_a_string_or_number_is_not_a_boolean(tmp_path, section, field, value):
    path = write(tmp_path, {section: {field: value}})
    with pytest.raises(ConfigError) as error:
        APTConfig.from_json(path)
    message = str(error.value)
    assert str(path) in message and f"{section}.{field}={value!r}" in message
    assert "must be true or false (a boolean, not a string)" in message


def test_a_bare_string_is_never_a_list_of_names(tmp_path):
    with pytest.raises(ConfigError, match=r"perturb\.generators='gaussian': must be a non-empty list \(not a bare "
                                          r"string\) of registered perturbations \[.*'gaussian'"):
        APTConfig.from_json(write(tmp_path, {"perturb": {"generators": "gaussian"}}))  # was: "unknown perturbation 'g'"
    assert APTConfig.from_json(write(tmp_path, {"perturb": {"generators": ["gaussian"]}})).perturb.generators == \
        ("gaussian",)


@pytest.mark.parametrize("override, expected", [
    ({"perturb__generators": ("gaussian", "nope")}, r"perturb\.generators=\('gaussian', 'nope'\): .*registered"),
    ({"perturb__blob": "star"}, r"perturb\.blob='star': must be one of 'perlin', 'ellipse', 'mixed'"),
    ({"perturb__roi_method": "saliency"}, r"perturb\.roi_method='saliency': must be one of 'text', 'attention'"),
    ({"prompts__suffix": 123}, r"prompts\.suffix=123: must be a string"),  # was a TypeError 10 s in
    ({"backbone__image_size": 3}, r"backbone\.image_size=3: must be None .* or an int from 32 to 4096"),  # RuntimeError
    ({"backbone__precision": "fp8"}, r"backbone\.precision='fp8': .*one of 'fp32', 'tf32', 'bf16', 'fp16'"),
    ({"score__temperature": float("nan")}, r"score\.temperature=nan: must be a number in \(0, 10\]"),
    ({"score__blur_sigma": float("inf")}, r"score\.blur_sigma=inf: must be a number in \[0, 1024\]"),
    ({"train__loss_weights": (float("nan"), 1.0, 1.0)}, r"train\.loss_weights=\(nan, 1\.0, 1\.0\): must be three"),
    ({"train__steps": 2.5}, r"train\.steps=2\.5: must be an int from 0 to 10,000,000"),
    ({"train__k_shot": True}, r"train\.k_shot=True: must be an int from 1 to 4096"),
    ({"train__optimizer": "lbfgs"}, r"train\.optimizer='lbfgs': must be one of 'adam', 'sgd'; the default is 'adam'"),
    ({"perturb__strength": (0.6, 0.2)}, r"perturb\.strength=\(0\.6, 0\.2\): must be \[low, high\]"),
    ({"smgs__meta_normal": ""}, r"smgs\.meta_normal='': must be a non-empty string")])
def test_each_wrong_value_is_one_error_naming_field_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError, match=expected):
        APTConfig.preset("quick", **override)


def test_every_way_of_making_a_config_checks_it(tmp_path):
    with pytest.raises(ConfigError, match=r"score\.memory='no'"):
        ScoreConfig(memory="no")  # Python
    with pytest.raises(ConfigError, match=r"score\.memory='no'"):
        APTConfig().replace(score__memory="no")  # replace
    with pytest.raises(ConfigError, match=r"train\.steps=-1"):
        dataclasses.replace(TrainConfig(), steps=-1)  # dataclasses.replace
    with pytest.raises(ConfigError, match=r"score\.memory='no'"):
        APTConfig.from_dict({"score": {"memory": "no"}})
    with pytest.raises(ConfigError, match=r"score\.memory='no'"):
        APTConfig.from_json('{"score": {"memory": "no"}}')
    config = APTConfig.preset("quick")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.steps = -1  # and it stays valid: sections are frozen
    with pytest.raises(ConfigError, match="must be a TrainConfig"):
        APTConfig(train={"steps": 3})


def test_accepted_spellings_are_stored_one_way():
    config = APTConfig.preset("quick", train__lr=1, perturb__strength=[0, 1], backbone__layers=[1, 2])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.perturb.strength == (0.0, 1.0) and config.backbone.layers == (1, 2)
    assert APTConfig.from_json(config.to_json()) == config and hash(config) == hash(APTConfig.from_dict(
        config.to_dict()))


def test_unknown_keys_and_bad_json_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*typo\.json: config\.train: unknown field\(s\) \['stepz'\]"):
        APTConfig.from_json(write(tmp_path, {"train": {"stepz": 3}}, "typo.json"))
    with pytest.raises(ConfigError, match=r"config: unknown field\(s\) \['trian'\]"):
        APTConfig.from_json(write(tmp_path, {"trian": {}}))
    with pytest.raises(ConfigError, match=r"config\.train: expected a JSON object"):
        APTConfig.from_json(write(tmp_path, {"train": [1]}))
    with pytest.raises(ConfigError, match=r"config file .*broken\.json is not valid JSON: .* line 1, column 2"):
        APTConfig.from_json(write(tmp_path, "{train: 1}", "broken.json"))  # was a bare JSONDecodeError
    with pytest.raises(ConfigError, match=r"config file .*missing\.json cannot be read"):
        APTConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"unknown config field 'train__stepz'"):
        APTConfig().replace(train__stepz=3)
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; presets: \[.*'quick'"):
        APTConfig.preset("nope")


def test_a_key_given_twice_is_refused_naming_it(tmp_path):
    """JSON keeps the last of two equal keys silently: {"steps": 3, "steps": 500} ran 500 steps."""
    with pytest.raises(ConfigError, match=r"^duplicate key 'steps' in one JSON object .*keep one of them$"):
        APTConfig.from_json('{"train": {"steps": 3, "lr": 0.1, "steps": 500}}')
    path = write(tmp_path, '{"train": {"steps": 3}, "score": {}, "train": {"lr": 0.1}}', "twice.json")
    with pytest.raises(ConfigError, match=r"^config file .*twice\.json: duplicate key 'train' in one JSON object"):
        APTConfig.from_json(path)


HUGE = (10**30, 1e300, (10**30,), (0, 1e300), (1, 1, 1e300))  # a number, a list of one, of two, of three


@pytest.mark.parametrize("section", [f.default_factory for f in dataclasses.fields(APTConfig)[1:]],
                         ids=lambda s: s.SECTION)
def test_every_number_has_an_upper_bound_named_in_its_message(section):
    """A huge value used to pass and then die in torch ("tried to allocate 3000000000768 bytes", OverflowError)."""
    for name, rule in section.RULES.items():
        accepted = [value for value in HUGE if rule(rule.convert(value))]
        assert not accepted, f"{section.SECTION}.{name} accepts {accepted}"


@pytest.mark.parametrize("section, field, value, expected", [
    ("prompts", "n_ctx", 10**30, r"an int from 1 to 75 \(CLIP reads 77 tokens"),
    ("backbone", "image_size", 10**6, r"or an int from 32 to 4096 \(pixels; .*ViT-L-14-336 336, the paper preset 518"),
    ("train", "pool_size", 10**9, r"an int from 1 to 4096 \(perturbed images per shot group"),
    ("train", "seed", 2**64, r"an int from 0 to 4,294,967,295"),  # was torch's "Overflow when unpacking long"
    ("score", "blur_sigma", 1e9, r"a number in \[0, 1024\] \(pixels")])
def test_a_value_too_large_is_one_error_naming_the_file_and_the_bound(tmp_path, section, field, value, expected):
    path = write(tmp_path, {section: {field: value}})
    with pytest.raises(ConfigError, match=rf"^config file {path}: config {section}\.{field}={value!r}: must be "
                                          rf".*{expected}.*; the default is"):
        APTConfig.from_json(path)


def test_the_largest_seed_seeds_torch_and_numpy():
    import numpy as np
    import torch

    config = APTConfig().replace(train__seed=config_module.MAX_SEED, backbone__init_seed=config_module.MAX_SEED)
    torch.Generator().manual_seed(config.train.seed)
    np.random.default_rng(config.backbone.init_seed), np.random.RandomState(config.train.seed)


def test_malformed_files_are_one_config_error_naming_the_file(tmp_path):
    deep = write(tmp_path, '{"train": ' + "[" * 100_000 + "]" * 100_000 + "}", "deep.json")
    with pytest.raises(ConfigError, match=r"^config file .*deep\.json is nested too deeply"):  # was RecursionError
        APTConfig.from_json(deep)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"name": "café"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^config file .*latin\.json is not UTF-8 text \(byte 13: .*save it as "
                                          r"UTF-8$"):  # was UnicodeDecodeError
        APTConfig.from_json(latin)
    long = write(tmp_path, '{"train": {"steps": ' + "9" * 5000 + "}}", "long.json")
    with pytest.raises(ConfigError, match=r"^config file .*long\.json is not a valid config"):  # was ValueError
        APTConfig.from_json(long)
    for error in (deep, latin, long):
        with pytest.raises(ConfigError) as caught:
            APTConfig.from_json(error)
        assert "\n" not in str(caught.value)


def test_a_byte_order_mark_is_read_as_nothing(tmp_path):
    """Windows editors start UTF-8 files with a BOM; it was "not valid JSON: Unexpected UTF-8 BOM"."""
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"train": {"steps": 3}}).encode())
    assert APTConfig.from_json(path).train.steps == 3
    assert APTConfig.from_json("\ufeff" + path.read_text(encoding="utf-8-sig")).train.steps == 3


def test_registered_perturbations_are_valid_names():
    from apt_lab.perturbations import register_perturbation, unregister_perturbation

    with pytest.raises(ConfigError, match="registered"):
        PerturbConfig(generators=("test_config_stripes",))

    @register_perturbation("test_config_stripes")
    def stripes(image, region, rng):
        return image, region

    try:
        assert PerturbConfig(generators=("test_config_stripes",)).generators == ("test_config_stripes",)
    finally:
        unregister_perturbation("test_config_stripes")


def test_the_built_in_names_are_those_the_registry_starts_with():
    code = ("import apt_lab.config as c, apt_lab.perturbations as p; "
            "print(sorted(p.list_perturbations()) == sorted(c.BUILTIN_PERTURBATIONS))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr


def test_every_preset_is_valid_and_making_configs_stays_torch_free():
    code = ("import sys; from apt_lab.config import APTConfig, list_presets; "
            "[APTConfig.preset(p).replace(train__steps=1) for p in list_presets()]; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _string_lists(tree: ast.AST):
    """Every tuple, list or set literal of two or more strings, and the string keys of every dict literal."""
    for node in ast.walk(tree):
        elements = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and elements and len(elements) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elements):
            yield node.lineno, {e.value for e in elements}


NOT_YET_MOVED = set()  # every module imports its allowed values from apt_lab.config


def test_the_config_module_is_the_only_place_listing_allowed_values():
    allowed = {name: set(value) for name, value in vars(config_module).items()
               if name.isupper() and isinstance(value, tuple) and all(isinstance(v, str) for v in value)}
    relisted = [f"{path.relative_to(PACKAGE)}:{line} relists config.{name}"
                for path in sorted(PACKAGE.rglob("*.py")) if path.name != "config.py"
                for line, values in _string_lists(ast.parse(path.read_text()))
                for name, members in allowed.items()
                if values == members and f"{path.name}:{name}" not in NOT_YET_MOVED]
    assert not relisted, "import these from apt_lab.config instead: " + "; ".join(relisted)
