"""One configuration tree for every knob of APT, with presets stored as data (``apt_lab/presets/*.json``).

Every default that ``method.md`` marks as *our choice* is a field here, so an ablation is a one-line change.

Example:
    >>> cfg = APTConfig.preset("quick")
    >>> cfg.backbone.name, cfg.smgs.lam
    ('apt-tiny', 1.0)
    >>> APTConfig.from_json(cfg.to_json()) == cfg
    True
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class BackboneConfig:
    name: str = "apt-tiny"  # open_clip architecture ("ViT-B-16", "ViT-L-14-336", ...) or "apt-tiny"
    pretrained: str | None = None  # open_clip tag ("openai"), checkpoint file, or None for random weights
    image_size: int | None = None  # square input side in pixels; None = the architecture's native size
    layers: tuple[int, ...] | None = None  # 1-based vision blocks to tap; None = 4 evenly spaced (ViT-B: 3,6,9,12)
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None = CUDA when available, else CPU
    precision: str | None = None  # image tower: "fp32", "tf32", "bf16", "fp16"; None = bf16 on CUDA, fp32 on CPU
    init_seed: int = 0  # seeds the random initialisation, so random weights (pretrained None) match across runs


@dataclass
class PerturbConfig:
    generators: tuple[str, ...] = ("gaussian", "uniform", "salt_pepper")  # registered names, one drawn per image
    strength: tuple[float, float] = (0.2, 0.6)  # noise strength range (pixel std / amplitude), drawn per image
    region: str = "roi"  # where anomalies may go: "roi" (foreground of the frozen model) or "image" (anywhere)
    roi_method: str = "text"  # foreground source: "text" (patch vs object/background prompts), "attention" (CLS
    #   attention), "pixels" (luminance/saturation unlike the border; works with random weights), "mask" (roi=...)
    roi_texture_fraction: float = 0.7  # undilated foreground above this fraction of the image → texture: whole image
    roi_dilation: int = 0  # grow the object's region by this many pixels (after the object-or-texture decision)
    blob: str = "mixed"  # anomaly shape: "perlin" (thresholded Perlin noise), "ellipse", or "mixed"
    min_area: float = 0.01  # smallest anomaly, as a fraction of the image area
    max_area: float = 0.12  # largest anomaly, as a fraction of the image area
    feature_strength: float = 1.0  # std of noise added to patch tokens by the "feature" generator
    patch_threshold: float = 0.25  # a patch counts as anomalous when this fraction of its pixels is masked


@dataclass
class PromptConfig:
    n_ctx: int = 12  # learnable context vectors per prompt
    init_std: float = 0.02  # context vectors start as N(0, init_std²)
    suffix: str = "object."  # words after the context vectors: "X X ... X object."
    per_category: bool = False  # one prompt pair per category instead of one shared pair
    deep_layers: int = 0  # text blocks (after the first) that also get learnable deep prompts; 0 = off
    truncate: bool = True  # run the text tower on max(eot)+1 positions instead of 77 (same result, cheaper)


@dataclass
class SMGSConfig:
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


@dataclass
class TrainConfig:
    k_shot: int = 4  # normal images per category used for tuning
    steps: int = 200  # optimiser steps
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


@dataclass
class ScoreConfig:
    temperature: float = 0.07  # τ in softmax(cos / τ) over [normal, anomalous]
    blur_sigma: float = 4.0  # Gaussian blur of the up-sampled map, in pixels; 0 = off
    fuse_map_max: float = 0.0  # image score = (1 − w)·CLS probability + w·map maximum; 0 = CLS only
    memory: bool = False  # few-shot visual memory: add min cosine distance of each patch to the shots' patches
    memory_weight: float = 0.5  # weight of the memory map when memory is on
    locality_radius: int = 0  # locality-aware attention radius r in the last block; 0 = off
    batch_size: int = 16  # images per encoder pass when scoring


@dataclass
class APTConfig:
    name: str = "default"  # preset or experiment name, used for run folders (presets set their own)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # the frozen CLIP
    perturb: PerturbConfig = field(default_factory=PerturbConfig)  # CFG: synthetic anomalies
    prompts: PromptConfig = field(default_factory=PromptConfig)  # learnable prompts
    smgs: SMGSConfig = field(default_factory=SMGSConfig)  # meta-prompt guidance
    train: TrainConfig = field(default_factory=TrainConfig)  # few-shot tuning loop
    score: ScoreConfig = field(default_factory=ScoreConfig)  # anomaly maps and image scores

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
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "APTConfig":
        """A preset from ``apt_lab/presets/<name>.json`` (fields not in the file keep their defaults).

        ``overrides`` use ``section__field`` names: ``APTConfig.preset("quick", train__steps=50)``.
        """
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown preset {name!r}; presets: {list_presets()} (files in {PRESET_DIR})")
        config = cls.from_dict(json.loads(path.read_text()))
        return config.replace(**overrides) if overrides else config

    def replace(self, **overrides: Any) -> "APTConfig":
        """A copy with ``section__field=value`` changes, e.g. ``cfg.replace(smgs__lam=0.0)``."""
        data = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            if not name:
                data[section] = value
            elif section not in data or not isinstance(data[section], dict) or name not in data[section]:
                raise ValueError(f"unknown config field {key!r}; use section__field, e.g. train__steps")
            else:
                data[section][name] = value
        return APTConfig.from_dict(data)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "APTConfig":
        """Check every value against its range (runs on construction); raises ConfigError naming the field.

        Example:
            >>> APTConfig.preset("quick", score__temperature=0)
            Traceback (most recent call last):
            ...
            apt_lab.errors.ConfigError: config score.temperature=0: must be > 0 (the softmax temperature τ; the default is 0.07)
        """
        for (section, name), (check, rule) in _RULES.items():
            part = getattr(self, section)
            value = getattr(part, name) if dataclasses.is_dataclass(part) else None
            try:
                ok = check(value)
            except TypeError:
                ok = False
            if not ok:
                raise ConfigError(f"config {section}.{name}={value!r}: {rule}")
        if self.perturb.max_area < self.perturb.min_area:
            raise ConfigError(f"config perturb.max_area={self.perturb.max_area!r} is below perturb.min_area="
                              f"{self.perturb.min_area!r}; the largest anomaly cannot be smaller than the smallest")
        return self


def _int(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _num(low: float, high: float = float("inf"), open_low: bool = False):
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and low <= v <= high and not (open_low and v == low))


_RULES = {  # (section, field) → (check, what a valid value is)
    ("backbone", "image_size"): (lambda v: v is None or _int(1)(v), "must be None (native size) or an int ≥ 1"),
    ("backbone", "layers"): (lambda v: v is None or (len(v) > 0 and all(_int(1)(x) for x in v)),
                             "must be None or a non-empty list of 1-based block numbers"),
    ("perturb", "generators"): (lambda v: len(v) > 0, "must name at least one registered perturbation"),
    ("perturb", "strength"): (lambda v: len(v) == 2 and _num(0)(v[0]) and _num(v[0])(v[1]),
                              "must be (low, high) with 0 ≤ low ≤ high"),
    ("perturb", "region"): (lambda v: v in ("roi", "image"), "must be 'roi' or 'image'"),
    ("perturb", "roi_texture_fraction"): (_num(0, 1), "must be a fraction in [0, 1]"),
    ("perturb", "roi_method"): (lambda v: v in ("text", "attention", "pixels", "mask"),
                                "must be 'text', 'attention', 'pixels' or 'mask'"),
    ("perturb", "roi_dilation"): (_int(0), "must be an int ≥ 0 (pixels)"),
    ("perturb", "min_area"): (_num(0, 1, open_low=True), "must be a fraction in (0, 1]"),
    ("perturb", "max_area"): (_num(0, 1, open_low=True), "must be a fraction in (0, 1] (and ≥ perturb.min_area)"),
    ("perturb", "feature_strength"): (_num(0), "must be ≥ 0"),
    ("perturb", "patch_threshold"): (_num(0, 1), "must be a fraction in [0, 1]"),
    ("prompts", "n_ctx"): (_int(1), "must be an int ≥ 1"),
    ("prompts", "init_std"): (_num(0), "must be ≥ 0"),
    ("prompts", "deep_layers"): (_int(0), "must be an int ≥ 0"),
    ("smgs", "lam"): (_num(0), "must be ≥ 0 (0 turns SMGS off)"),
    ("smgs", "meta_loss"): (lambda v: v in ("kl", "cosine"), "must be 'kl' or 'cosine'"),
    ("smgs", "update"): (lambda v: v in ("ema", "periodic", "static"), "must be 'ema', 'periodic' or 'static'"),
    ("smgs", "ema_beta"): (_num(0, 1), "must be in [0, 1]"),
    ("smgs", "period"): (_int(1), "must be an int ≥ 1"),
    ("smgs", "heldout_size"): (_int(1), "must be an int ≥ 1"),
    ("smgs", "anchor_weight"): (_num(0, 1), "must be in [0, 1] (0 = no anchor to the initial meta-prompt)"),
    ("smgs", "apply_to"): (lambda v: v in ("update", "gradient", "both"),
                           "must be 'update', 'gradient' or 'both'"),
    ("train", "k_shot"): (_int(1), "must be an int ≥ 1"),
    ("train", "steps"): (_int(0), "must be an int ≥ 0 (0 scores the initial prompts without tuning)"),
    ("train", "batch_size"): (_int(1), "must be an int ≥ 1"),
    ("train", "anomaly_fraction"): (_num(0, 1), "must be a fraction in [0, 1]"),
    ("train", "pool_size"): (_int(1), "must be an int ≥ 1"),
    ("train", "pool_refresh"): (_int(0), "must be an int ≥ 0 (0 = never)"),
    ("train", "feature_pool_fraction"): (_num(0, 1), "must be a fraction in [0, 1]"),
    ("train", "optimizer"): (lambda v: v in ("adam", "sgd"), "must be 'adam' or 'sgd'"),
    ("train", "lr"): (_num(0, float("inf"), open_low=True), "must be > 0 and finite"),
    ("train", "momentum"): (_num(0, 1), "must be in [0, 1]"),
    ("train", "weight_decay"): (_num(0), "must be ≥ 0"),
    ("train", "focal_gamma"): (_num(0), "must be ≥ 0"),
    ("train", "loss_weights"): (lambda v: len(v) == 3 and not any(x < 0 for x in v),  # NaN passes: tests force
                                "must be three weights ≥ 0 (image CE, patch focal, patch dice)"),  # divergence
    ("train", "seed"): (_int(0), "must be an int ≥ 0"),
    ("score", "temperature"): (_num(0, float("inf"), open_low=True),
                               "must be > 0 (the softmax temperature τ; the default is 0.07)"),
    ("score", "blur_sigma"): (_num(0), "must be ≥ 0 (0 = no blur)"),
    ("score", "fuse_map_max"): (_num(0, 1), "must be a weight in [0, 1]"),
    ("score", "memory_weight"): (_num(0), "must be ≥ 0"),
    ("score", "locality_radius"): (_int(0), "must be an int ≥ 0 (0 = off)"),
    ("score", "batch_size"): (_int(1), "must be an int ≥ 1"),
}


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
    """Dataclass ``cls`` from a dict, recursing into sections; unknown keys are errors, lists become tuples."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING \
            else fields[name].default
        if dataclasses.is_dataclass(default):
            values[name] = section_from_dict(type(default), value, f"{where}.{name}")
        else:
            values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
