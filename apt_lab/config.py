"""One configuration tree for every knob of APT, with presets stored as data (``apt_lab/presets/*.json``).

Every default that ``method.md`` marks as *our choice* is a field here, so an ablation is a one-line change.
Each section checks itself when it is made — from JSON, from ``replace(...)`` or from Python alike — against one
:class:`Rule` per field (its ``RULES``), and sections are frozen: a config that exists is a valid config. This
module is the one place that lists the values a field allows (:data:`ROI_METHODS`, :data:`META_UPDATES`, ...);
the modules acting on a value import these constants and never check it again. Importing it never loads torch.

Example:
    >>> cfg = APTConfig.preset("quick")
    >>> cfg.backbone.name, cfg.smgs.lam
    ('apt-tiny', 1.0)
    >>> APTConfig.from_json(cfg.to_json()) == cfg
    True

A string is not a boolean (``"no"`` would be truthy, and switch the memory on):

    >>> ScoreConfig(memory="no")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    apt_lab.errors.ConfigError: config score.memory='no': must be true or false (a boolean, not a string); ...
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
BOM = "\ufeff"  # the UTF-8 byte-order mark some editors put before the text

# the values a field allows — the only place they are listed
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # backbone.precision (apt_lab.backbone maps them to dtypes)
REGIONS = ("roi", "image")  # perturb.region
ROI_METHODS = ("text", "attention", "pixels", "mask")  # perturb.roi_method (apt_lab.roi)
BLOB_SHAPES = ("perlin", "ellipse", "mixed")  # perturb.blob (apt_lab.blobs)
META_LOSSES = ("kl", "cosine")  # smgs.meta_loss (apt_lab.smgs)
META_UPDATES = ("ema", "periodic", "static")  # smgs.update (apt_lab.smgs)
SMGS_TARGETS = ("update", "gradient", "both")  # smgs.apply_to (apt_lab.tuning)
OPTIMIZERS = ("adam", "sgd")  # train.optimizer (apt_lab.tuning)
DRAWS = ("fixed", "seed")  # train.draw (apt_lab.data.few_shot)
BUILTIN_PERTURBATIONS = ("gaussian", "uniform", "salt_pepper", "feature")  # perturb.generators: apt_lab.perturbations
#   registers these; @register_perturbation adds more
MIN_IMAGE_SIZE = 32  # backbone.image_size: one patch of the coarsest CLIP ViT (32 px); smaller has no patch grid
# Upper bounds: generous, but below what exhausts memory or overflows torch (a 10⁶-pixel image side, 10⁹ pool images)
MAX_IMAGE_SIZE = 4096  # pixels per side: (4096/14)² patches already need GBs of attention per image
MAX_IMAGES = 4096  # images in one batch, pool or shot set: each holds a full set of patch features
MAX_STEPS = 10_000_000  # optimiser steps (and the periods counted in steps)
MAX_BLOCKS = 128  # transformer blocks (the largest CLIP ViT has 48)
MAX_SEED = 2**32 - 1  # numpy's seed range (torch's ends at 2⁶⁴ − 1)


# ---------------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """What one field accepts: ``check(value)`` is true for a valid value, ``allowed`` says which in words (or is a
    function giving them, for lists that change, like registered names); ``convert`` first turns an accepted
    spelling into the stored one (a JSON list into a tuple, an int into a float).

    Example:
        >>> integer(1, 9, "steps").allowed, integer(1, 9)(0), integer(1, 9)(10), number(0, 1)(float("nan")), FLAG(1)
        ('an int from 1 to 9 (steps)', False, False, False, False)
    """

    allowed: str | Callable[[], str]
    check: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.check(value))
        except (TypeError, ValueError):
            return False

    def describe(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _to_float(value):
    return float(value) if _is_int(value) else value


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def integer(low: int, high: int, note: str = "") -> Rule:
    """An int in [low, high]; ``note`` (the unit, what to choose) follows the range in the message. Every int has an
    upper bound: a huge one passes as a valid config and then dies in torch (allocating or overflowing)."""
    return Rule(f"an int from {low} to {high if high < 10**5 else f'{high:,}'}{_note(note)}",
                lambda v: _is_int(v) and low <= v <= high)


def number(low: float, high: float, above: bool = False, note: str = "") -> Rule:
    """A finite number in [low, high] (``above``: low itself excluded); ints are stored as floats."""
    allowed = f"a number in {'(' if above else '['}{low:g}, {high:g}]{_note(note)}"
    return Rule(allowed, lambda v: _is_number(v) and low <= v <= high and not (above and v == low), _to_float)


def one_of(values: tuple[str, ...]) -> Rule:
    return Rule("one of " + ", ".join(map(repr, values)), lambda v: isinstance(v, str) and v in values)


def optional(rule: Rule, meaning: str) -> Rule:
    return Rule(f"None ({meaning}) or {rule.describe()}", lambda v: v is None or rule(v),
                lambda v: v if v is None else rule.convert(v))


def items(item: Rule, allowed: str, length: int | None = None, extra=lambda v: True) -> Rule:
    """A list of values each passing ``item`` (``length`` of them, else at least one) — never a bare string."""
    def check(v):
        return (isinstance(v, tuple) and (len(v) == length if length else len(v) > 0) and all(map(item, v))
                and extra(v))

    def convert(v):
        return tuple(item.convert(x) for x in v) if isinstance(v, (list, tuple)) else v

    return Rule(allowed, check, convert)


def _perturbations() -> list[str]:
    """The perturbation names registered so far. Registering one imports :mod:`apt_lab.perturbations`, so while it
    is not imported only the built-ins exist: this module never imports it (it stays torch-free, below the method
    layer)."""
    registry = sys.modules.get("apt_lab.perturbations")
    names = getattr(registry, "list_perturbations", None)
    return names() if names is not None else list(BUILTIN_PERTURBATIONS)


FLAG = Rule("true or false (a boolean, not a string)", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
STRING = Rule("a string", lambda v: isinstance(v, str))
FRACTION = number(0, 1)
PERTURBATIONS = items(Rule("registered", lambda v: isinstance(v, str) and v in _perturbations()),
                      lambda: f"a non-empty list (not a bare string) of registered perturbations {_perturbations()}; "
                      "an unknown perturbation must be registered first (@apt_lab.register_perturbation, or "
                      "--plugin file.py)")
STRENGTH = items(number(0, 10), "[low, high] with 0 ≤ low ≤ high ≤ 10 (pixels lie in [0, 1]: 1 already saturates)",
                 2, lambda v: v[0] <= v[1])
SEED = integer(0, MAX_SEED, "numpy's seed range")
IMAGES = integer(1, MAX_IMAGES, "images; lower it when memory runs out")


# ------------------------------------------------------------------------------------------------- sections
class _Section:
    """A config section: every field checked against ``RULES`` when it is made (see :class:`Rule`)."""

    SECTION = ""  # its name in APTConfig, for messages
    RULES: dict[str, Rule] = {}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, rule = getattr(self, f.name), self.RULES[f.name]
            stored = rule.convert(value)
            if not rule(stored):
                raise ConfigError(f"config {self.SECTION}.{f.name}={value!r}: must be {rule.describe()}; the default "
                                  f"is {f.default!r}")
            object.__setattr__(self, f.name, stored)  # frozen: the one place a value is set


@dataclass(frozen=True)
class BackboneConfig(_Section):
    name: str = "apt-tiny"  # open_clip architecture ("ViT-B-16", "ViT-L-14-336", ...) or "apt-tiny"
    pretrained: str | None = None  # open_clip tag ("openai"), checkpoint file, or None for random weights
    image_size: int | None = None  # square input side in pixels; None = the architecture's native size
    layers: tuple[int, ...] | None = None  # 1-based vision blocks to tap; None = 4 evenly spaced (ViT-B: 3,6,9,12)
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None = CUDA when available, else CPU
    precision: str | None = None  # image tower: "fp32", "tf32", "bf16", "fp16"; None = bf16 on CUDA, fp32 on CPU
    init_seed: int = 0  # seeds the random initialisation, so random weights (pretrained None) match across runs

    SECTION = "backbone"
    RULES = {"name": TEXT, "pretrained": optional(TEXT, "random weights"),
             "image_size": optional(integer(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, "pixels; ViT-B-16 uses 224, ViT-L-14-336 "
                                            "336, the paper preset 518"), "the architecture's native size"),
             "layers": optional(items(integer(1, MAX_BLOCKS), f"a non-empty list of 1-based block numbers, each from 1 "
                                      f"to {MAX_BLOCKS} (ViT-B has 12 blocks, ViT-L 24)"), "4 evenly spaced"),
             "device": optional(TEXT, "CUDA when available"),
             "precision": optional(one_of(PRECISIONS), "bf16 on CUDA, fp32 on the CPU"), "init_seed": SEED}


@dataclass(frozen=True)
class PerturbConfig(_Section):
    generators: tuple[str, ...] = ("gaussian", "uniform", "salt_pepper")  # registered names, one drawn per image
    strength: tuple[float, float] = (0.2, 0.6)  # noise strength range (pixel std / amplitude), drawn per image
    region: str = "roi"  # where anomalies may go: "roi" (foreground of the frozen model) or "image" (anywhere)
    roi_method: str = "text"  # foreground source: "text" (patch vs object/background prompts), "attention" (CLS
    #   attention), "pixels" (luminance/saturation unlike the border; works with random weights), "mask" (roi=...)
    roi_texture_fraction: float = 0.7  # undilated foreground above this fraction of the image → texture: whole image
    roi_dilation: int = 0  # grow the object's region by this many pixels (after the object-or-texture decision)
    blob: str = "mixed"  # anomaly shape: "perlin" (thresholded Perlin noise), "ellipse", or "mixed"
    min_area: float = 0.01  # smallest anomaly, as a fraction of the image area
    max_area: float = 0.12  # largest anomaly, as a fraction of the image area (≥ min_area)
    feature_strength: float = 1.0  # std of noise added to patch tokens by the "feature" generator
    patch_threshold: float = 0.25  # a patch counts as anomalous when this fraction of its pixels is masked

    SECTION = "perturb"
    RULES = {"generators": PERTURBATIONS, "strength": STRENGTH, "region": one_of(REGIONS),
             "roi_method": one_of(ROI_METHODS), "roi_texture_fraction": FRACTION,
             "roi_dilation": integer(0, MAX_IMAGE_SIZE, "pixels"), "blob": one_of(BLOB_SHAPES),
             "min_area": number(0, 1, above=True), "max_area": number(0, 1, above=True),
             "feature_strength": number(0, 100, note="1 = noise as long as the token"), "patch_threshold": FRACTION}

    def __post_init__(self):
        super().__post_init__()
        if self.max_area < self.min_area:
            raise ConfigError(f"config perturb.max_area={self.max_area!r} is below perturb.min_area="
                              f"{self.min_area!r}; the largest anomaly cannot be smaller than the smallest")


@dataclass(frozen=True)
class PromptConfig(_Section):
    n_ctx: int = 12  # learnable context vectors per prompt
    init_std: float = 0.02  # context vectors start as N(0, init_std²)
    suffix: str = "object."  # words after the context vectors: "X X ... X object."
    per_category: bool = False  # one prompt pair per category instead of one shared pair
    deep_layers: int = 0  # text blocks (after the first) that also get learnable deep prompts; 0 = off
    truncate: bool = True  # run the text tower on max(eot)+1 positions instead of 77 (same result, cheaper)

    SECTION = "prompts"
    RULES = {"n_ctx": integer(1, 75, "CLIP reads 77 tokens: start, context, suffix and end"),
             "init_std": number(0, 10, note="CLIP's word embeddings have a std of about 0.02"), "suffix": STRING,
             "per_category": FLAG, "deep_layers": integer(0, MAX_BLOCKS, "at most the text tower's blocks − 1"),
             "truncate": FLAG}


@dataclass(frozen=True)
class SMGSConfig(_Section):
    lam: float = 1.0  # λ of the gradient rule; 0 turns SMGS off (plain prompt tuning)
    meta_normal: str = "a photo of a flawless object."  # generic meta-prompt, normal state (no category words)
    meta_anomalous: str = "a photo of a damaged object."  # generic meta-prompt, anomalous state
    meta_loss: str = "kl"  # "kl": KL(p_meta || p_learned) at image and patch level; "cosine": 1 - cos of texts
    patch_level: bool = True  # include patch-level KL in the meta loss (kl only)
    update: str = "ema"  # self-optimising meta-prompt: "ema", "periodic", or "static"
    ema_beta: float = 0.99  # ema: meta ← β·meta + (1−β)·learned after each step
    period: int = 50  # periodic: steps between re-anchoring attempts on a held-out synthetic loss
    heldout_size: int = 16  # periodic: perturbed images per shot group kept out of training for that held-out loss
    anchor_weight: float = 0.0  # the rule also guards 1 − cos to the *initial* meta-prompt (a fixed anchor); 0 = off;
    #   1 with apply_to="both" holds it; off until measured on real defects (docs/method.md, "An anchor that holds")
    apply_to: str = "update"  # where the rule acts: "update" (the optimiser's step: exact for Adam and momentum too),
    #   "gradient" (ProGrad: the gradient before the optimiser; exact for plain SGD only), or "both"

    SECTION = "smgs"
    RULES = {"lam": number(0, 100, note="1 removes the whole conflict"), "meta_normal": TEXT,
             "meta_anomalous": TEXT, "meta_loss": one_of(META_LOSSES), "patch_level": FLAG,
             "update": one_of(META_UPDATES), "ema_beta": FRACTION, "period": integer(1, MAX_STEPS, "steps"),
             "heldout_size": IMAGES, "anchor_weight": FRACTION, "apply_to": one_of(SMGS_TARGETS)}


@dataclass(frozen=True)
class TrainConfig(_Section):
    k_shot: int = 4  # normal images per category used for tuning
    steps: int = 200  # optimiser steps; 0 scores the initial prompts without tuning
    batch_size: int = 16  # images per step (clean shots and perturbed pool entries mixed)
    anomaly_fraction: float = 0.5  # share of each batch drawn from the perturbed pool
    pool_size: int = 64  # perturbed images encoded once per refresh and reused across steps
    pool_refresh: int = 0  # steps between pool re-draws (new noise, one encoder pass); 0 = never
    feature_pool_fraction: float = 0.0  # share of the pool made by the feature-space generator (no encoder pass)
    optimizer: str = "adam"  # "adam", or "sgd" (with momentum, ProGrad's setting); SMGS projects either's update
    lr: float = 2e-3  # learning rate for the prompt vectors (SGD needs a larger one than Adam)
    momentum: float = 0.9  # sgd: momentum
    weight_decay: float = 0.0  # the optimiser's weight decay
    focal_gamma: float = 2.0  # focal loss γ for the patch-level task loss
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # weights of (image CE, patch focal, patch dice)
    seed: int = 0  # seeds perturbations, prompt init and batch order; same seed → same scores on CPU
    encode_each_step: bool = False  # baseline/ablation: no pool, perturb and encode each step's anomalies afresh
    draw: str = "fixed"  # the k shots: "fixed" = the paper's nested lists shipped with apt_lab (seeds vary training
    #   only); "seed" = each seed draws its own shots (seeds vary the data too)

    SECTION = "train"
    RULES = {"k_shot": integer(1, MAX_IMAGES, "normal images per category; few-shot is 1, 2 or 4"),
             "steps": integer(0, MAX_STEPS, "the fast preset uses 200"), "batch_size": IMAGES,
             "anomaly_fraction": FRACTION,
             "pool_size": integer(1, MAX_IMAGES, "perturbed images per shot group, each with all its patch features; "
                                  "the fast preset uses 64"),
             "pool_refresh": integer(0, MAX_STEPS, "steps"), "feature_pool_fraction": FRACTION,
             "optimizer": one_of(OPTIMIZERS), "lr": number(0, 10, above=True, note="Adam takes about 0.002, SGD more"),
             "momentum": FRACTION, "weight_decay": number(0, 10), "focal_gamma": number(0, 10, note="2 is usual"),
             "loss_weights": items(number(0, 1000), "three weights from 0 to 1000 (image CE, patch focal, patch dice)",
                                   3),
             "seed": SEED, "encode_each_step": FLAG, "draw": one_of(DRAWS)}


@dataclass(frozen=True)
class ScoreConfig(_Section):
    temperature: float = 0.07  # τ in softmax(cos / τ) over [normal, anomalous]
    blur_sigma: float = 4.0  # Gaussian blur of the up-sampled map, in pixels; 0 = off
    fuse_map_max: float = 0.0  # image score = (1 − w)·CLS probability + w·map maximum; 0 = CLS only
    memory: bool = False  # few-shot visual memory: add min cosine distance of each patch to the shots' patches
    memory_weight: float = 0.5  # weight of the memory map when memory is on
    locality_radius: int = 0  # locality-aware attention radius r in the last block; 0 = off
    batch_size: int = 16  # images per encoder pass when scoring

    SECTION = "score"
    RULES = {"temperature": number(0, 10, above=True, note="CLIP's is 0.01"),
             "blur_sigma": number(0, 1024, note="pixels; the kernel spans 8σ"), "fuse_map_max": FRACTION,
             "memory": FLAG, "memory_weight": number(0, 100),
             "locality_radius": integer(0, MAX_IMAGE_SIZE, "patches; a radius of the grid's side sees everything"),
             "batch_size": IMAGES}


@dataclass(frozen=True)
class APTConfig:
    name: str = "default"  # preset or experiment name, used for run folders (presets set their own)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # the frozen CLIP
    perturb: PerturbConfig = field(default_factory=PerturbConfig)  # CFG: synthetic anomalies
    prompts: PromptConfig = field(default_factory=PromptConfig)  # learnable prompts
    smgs: SMGSConfig = field(default_factory=SMGSConfig)  # meta-prompt guidance
    train: TrainConfig = field(default_factory=TrainConfig)  # few-shot tuning loop
    score: ScoreConfig = field(default_factory=ScoreConfig)  # anomaly maps and image scores

    def __post_init__(self):
        if not TEXT(self.name):
            raise ConfigError(f"config name={self.name!r}: must be {TEXT.describe()}")
        for f in dataclasses.fields(self)[1:]:
            if not isinstance(getattr(self, f.name), f.default_factory):
                raise ConfigError(f"config {f.name}={getattr(self, f.name)!r}: must be a "
                                  f"{f.default_factory.__name__}")

    # ----------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "APTConfig":
        return section_from_dict(cls, data, "config")

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "APTConfig":
        """A config from JSON text or a JSON file; an unreadable or invalid file is a ConfigError naming it.

        Example:
            >>> APTConfig.from_json('{"train": {"steps": 3}}').train.steps
            3
            >>> APTConfig.from_json('{"train": {"stepz": 3}}')  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            apt_lab.errors.ConfigError: config.train: unknown field(s) ['stepz']; known: ['anomaly_fraction', ...]
        """
        text, source = str(text_or_path).removeprefix(BOM), None
        if not text.lstrip().startswith("{"):
            source = f"config file {text_or_path}"
            try:  # utf-8-sig: a byte-order mark (Windows editors write one) is read as nothing
                text = Path(text_or_path).expanduser().read_text(encoding="utf-8-sig")
            except OSError as error:
                raise ConfigError(f"{source} cannot be read ({error.strerror or error}); give a JSON file such as "
                                  f"{PRESET_DIR / 'fast.json'}") from None
            except UnicodeDecodeError as error:
                raise ConfigError(f"{source} is not UTF-8 text (byte {error.start}: {error.reason}); save it as "
                                  "UTF-8") from None
        try:
            return cls.from_dict(json.loads(text, object_pairs_hook=_unique_keys))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source or 'config text'} is not valid JSON: {error.msg} at line {error.lineno}, "
                              f"column {error.colno}") from None
        except RecursionError:
            raise ConfigError(f"{source or 'config text'} is nested too deeply to be a config (a config has two "
                              "levels: {\"section\": {\"field\": value}})") from None
        except ConfigError as error:
            if source is None:
                raise
            raise ConfigError(f"{source}: {error}") from None
        except ValueError as error:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"{source or 'config text'} is not a valid config: {error}") from None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "APTConfig":
        """A preset from ``apt_lab/presets/<name>.json`` (fields not in the file keep their defaults).

        ``overrides`` use ``section__field`` names: ``APTConfig.preset("quick", train__steps=50)``.
        """
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name!r}; presets: {list_presets()} (files in {PRESET_DIR})")
        config = cls.from_json(path)
        return config.replace(**overrides) if overrides else config

    def replace(self, **overrides: Any) -> "APTConfig":
        """A copy with ``section__field=value`` changes, checked like any config.

        Example:
            >>> APTConfig().replace(smgs__lam=0.0).smgs.lam
            0.0
            >>> APTConfig.preset("quick", score__temperature=0)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            apt_lab.errors.ConfigError: config score.temperature=0: must be a number in (0, 10] ...; the default is 0.07
        """
        data = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            if not name and section in data:
                data[section] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            elif not isinstance(data.get(section), dict) or name not in data[section]:
                raise ConfigError(f"unknown config field {key!r}; use section__field, e.g. train__steps")
            else:
                data[section][name] = value
        return APTConfig.from_dict(data)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs → dict, refusing a key given twice (``json`` would keep the last one silently)."""
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ConfigError(f"duplicate key {twice[0]!r} in one JSON object (JSON would silently keep the last "
                          "value); keep one of them")
    return dict(pairs)


def config_section(config, section_type):
    """The ``section_type`` part of an APTConfig, or ``config`` itself when it already is one.

    Example:
        >>> config_section(APTConfig(), ScoreConfig).temperature
        0.07
    """
    if isinstance(config, section_type):
        return config
    if isinstance(config, APTConfig):
        for f in dataclasses.fields(APTConfig):
            value = getattr(config, f.name)
            if isinstance(value, section_type):
                return value
    raise TypeError(f"config: expected APTConfig or {section_type.__name__}, got {type(config).__name__}")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def section_from_dict(cls, data: dict[str, Any], where: str):
    """Dataclass ``cls`` from a dict, recursing into sections; unknown keys are a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object ({{...}}), got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        factory = fields[name].default_factory
        is_section = factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory)
        values[name] = section_from_dict(factory, value, f"{where}.{name}") if is_section else value
    return cls(**values)
