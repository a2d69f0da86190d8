"""tune_prompts — few-shot prompt tuning on self-generated anomalies, guided by SMGS.

One call does the whole of APT's training::

    clean shots ──encode once──────────────────────────────► clean features (label 0, no anomalous patch)
    shots ──perturb (ROI, seeded)──encode once per refresh──► pool features  (label 1, patch target = mask)
    each step: a batch mixed from both → task loss (CE + focal + dice), meta and anchor loss → SMGS's rule →
               the optimiser (Adam or SGD) → the rule again on the optimiser's update

The encoder is frozen, so features of a fixed image never change: encoding the pool once and re-using it
makes a step cost one text-tower pass instead of a vision pass over the batch (``benchmarks/bench_tuning.py``
measures the ratio). ``config.train.encode_each_step=True`` is the re-encode-every-step baseline.

The test data is never seen: only ``shots`` (normal images) go in.

Example:
    >>> import apt_lab, torch
    >>> from apt_lab.config import APTConfig
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> cfg = APTConfig.preset("quick", train__steps=5, train__pool_size=8)
    >>> result = tune_prompts(b, torch.rand(2, 3, 224, 224), cfg, progress=False)
    >>> [r["step"] for r in result.history], tuple(result.prompts.text_features().shape)
    ([0, 1, 2, 3, 4], (2, 128))
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .backbone import ImageFeatures
from .config import APTConfig
from .errors import StopTraining, TrainingDivergedError
from .losses import task_loss
from .perturbations import perturb, perturb_features
from .roi import region_of_interest
from .prompts import PromptLearner
from .scoring import patch_logits
from .smgs import MetaPrompt, anchor_similarity, apply_smgs, cosine_distance, guide_update, meta_loss

HISTORY_KEYS = ("step", "loss", "image_loss", "focal", "dice", "meta_loss", "conflict_rate", "anchor_similarity",
                "meta_drift", "held_out_loss", "seconds")


@dataclass
class TuneResult:
    """What :func:`tune_prompts` returns.

    Attributes:
        prompts: the tuned :class:`~apt_lab.prompts.PromptLearner` (pass it to ``apt_lab.scoring.score``).
        meta: the (self-optimised) :class:`~apt_lab.smgs.MetaPrompt`.
        history: one dict per finished step, keys :data:`HISTORY_KEYS`.
        timings: seconds — ``encode_shots_s``, ``roi_s``, ``pool_s`` (perturb + encode, all builds),
            ``pool_builds``, ``steps_s`` (sum over steps), ``step_s`` (mean per step), ``total_s``.
        interrupted: True when a KeyboardInterrupt or a callback's :class:`StopTraining` ended it early.
        config: the configuration it ran with; categories: the shot groups (None for one unnamed group).
        initial_prompts: a frozen copy of the prompts before the first step ("before tuning", no rebuild).
    """

    prompts: PromptLearner
    meta: MetaPrompt
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    config: APTConfig | None = None
    categories: list[str] | None = None
    initial_prompts: PromptLearner | None = None
    roi_coverage: float | None = None  # fraction of the image the shots' regions of interest cover (1 = everywhere)

    def curve(self, key: str = "loss") -> list[float | None]:
        """One history key as a list, e.g. ``result.curve("meta_drift")``."""
        return [record.get(key) for record in self.history]


# ----------------------------------------------------------------------------------------- the data
@dataclass
class Examples:
    """Encoded training examples: features, image labels, patch targets, image-loss weights, shot group."""

    features: ImageFeatures  # cls (P, D), patches (L, P, N, D)
    labels: torch.Tensor  # (P,) long, 0 normal / 1 anomalous
    targets: torch.Tensor  # (P, N) float, 1 = anomalous patch
    weights: torch.Tensor  # (P,) float, 0 = no image-level CE (feature-space anomaly)
    groups: torch.Tensor  # (P,) long, index into the shot groups

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: torch.Tensor) -> "Examples":
        return Examples(self.features[index], self.labels[index], self.targets[index], self.weights[index],
                        self.groups[index])

    @staticmethod
    def cat(items: Sequence["Examples"]) -> "Examples":
        return Examples(ImageFeatures.cat([s.features for s in items]), torch.cat([s.labels for s in items]),
                        torch.cat([s.targets for s in items]), torch.cat([s.weights for s in items]),
                        torch.cat([s.groups for s in items]))


def _encode(backbone, images: torch.Tensor, config: APTConfig) -> ImageFeatures:
    """Encode with the same encoder settings as scoring."""
    return backbone.encode_batched(images, config.score.batch_size, config.score.locality_radius)


def _shot_groups(shots, categories) -> tuple[list[str | None], list[torch.Tensor]]:
    if isinstance(shots, Mapping):
        if not shots:
            raise ValueError("shots: empty dict; pass {category: (K, 3, S, S) tensor of normal images}")
        names = list(shots)
        if categories is not None and set(categories) != set(names):
            raise ValueError(f"categories={list(categories)} differ from the shots' keys {names}")
        return names, [shots[n] for n in names]
    if not isinstance(shots, torch.Tensor) or shots.dim() != 4:
        raise ValueError("shots: expected a (K, 3, S, S) tensor of normal images in [0, 1], or a dict "
                         f"{{category: tensor}}; got {type(shots).__name__}")
    if categories is not None and len(categories) != 1:
        raise ValueError(f"one tensor of shots is one category, but categories={list(categories)}; pass a dict "
                         "{category: shots} for several")
    return [categories[0] if categories else None], [shots]


def _clean_examples(features: ImageFeatures, group: int) -> Examples:
    count, n = features.cls.shape[0], features.patches.shape[2]
    device = features.cls.device
    return Examples(features, torch.zeros(count, dtype=torch.long, device=device),
                    torch.zeros(count, n, device=device), torch.ones(count, device=device),
                    torch.full((count,), group, dtype=torch.long, device=device))


def _perturbed_examples(backbone, shots: torch.Tensor, clean: ImageFeatures, roi: torch.Tensor | None, size: int,
                        group: int, config: APTConfig, rng: torch.Generator, feature_fraction: float) -> Examples:
    """``size`` perturbed copies of the shots (cycled), encoded; a share made in feature space instead."""
    index = torch.arange(size) % shots.shape[0]  # (size,) every shot equally often
    out = perturb(shots[index.to(shots.device)], config, rng, roi=None if roi is None else roi[index.to(roi.device)],
                  backbone=backbone)
    n_feature = int(round(size * feature_fraction))
    n_pixel = size - n_feature
    targets = out.patch_masks.flatten(1).float().to(backbone.device)  # (size, N)
    parts, weights = [], []
    if n_pixel:
        parts.append(_encode(backbone, out.images[:n_pixel], config))
        weights.append(torch.ones(n_pixel))
    if n_feature:  # noise on cached clean patch tokens inside the mask: no encoder pass, CLS untouched
        chosen = clean[index[n_pixel:].to(clean.cls.device)]
        parts.append(perturb_features(chosen, out.patch_masks[n_pixel:].to(clean.cls.device), rng,
                                      config.perturb.feature_strength))
        weights.append(torch.zeros(n_feature))
    device = targets.device
    return Examples(ImageFeatures.cat(parts), torch.ones(size, dtype=torch.long, device=device), targets,
                    torch.cat(weights).to(device), torch.full((size,), group, dtype=torch.long, device=device))


def _draw_indices(count: int, total: int, rng: torch.Generator) -> torch.Tensor:
    """``count`` indices into ``total`` entries: without replacement when possible."""
    if count <= total:
        return torch.randperm(total, generator=rng)[:count]
    return torch.randint(total, (count,), generator=rng)


class _Data:
    """Everything the loop draws batches from: the clean shots and the pool of synthetic anomalies.

    Clean shots are encoded once and their regions of interest computed once; the pool is perturbed and encoded
    once per (re)build. Timings accumulate into ``timings``.
    """

    def __init__(self, backbone, groups: list[torch.Tensor], names: list, roi, config: APTConfig,
                 rng: torch.Generator, timings: dict, shot_features: list | None = None):
        self.backbone, self.groups, self.config, self.rng, self.timings = backbone, groups, config, rng, timings
        train = config.train
        t0 = time.perf_counter()
        self.clean_features = shot_features or [_encode(backbone, g, config) for g in groups]
        self.clean = Examples.cat([_clean_examples(f, i) for i, f in enumerate(self.clean_features)])
        timings["encode_shots_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.rois = self._regions(roi, names)
        timings["roi_s"] = time.perf_counter() - t0
        self.n_anomalous = int(round(train.batch_size * train.anomaly_fraction))
        self.n_clean = train.batch_size - self.n_anomalous
        self.pool_size = math.ceil(self.n_anomalous / len(groups)) if train.encode_each_step else train.pool_size
        if self.n_anomalous and self.pool_size < 1:
            raise ValueError(f"config.train.pool_size={train.pool_size}: need at least 1 perturbed image per shot "
                             "group")
        self.pool = self.build_pool(self.pool_size) if self.n_anomalous and not train.encode_each_step else None

    def _regions(self, roi, names) -> list:
        if roi is not None:
            return [roi[n] for n in names] if isinstance(roi, Mapping) else [roi]
        if self.config.perturb.region == "image":
            return [None] * len(self.groups)
        reuse = self.config.score.locality_radius == 0  # the cached clean features are plain encoder outputs then
        return [region_of_interest(self.backbone, g, self.config, features=f if reuse else None)
                for g, f in zip(self.groups, self.clean_features)]

    def coverage(self) -> float:
        """The fraction of the image the regions of interest cover, mean over the shots the pool draws from (its
        expectation: pool images draw their shots uniformly); 1.0 where CFG may go anywhere.

        A texture's region covers the whole image, so there ROI on and off compute the same thing."""
        covered = [1.0 if r is None else float(r.float().mean()) for r in self.rois]  # one per shot group
        return round(sum(covered) / len(covered), 6)

    def build_pool(self, size: int) -> Examples:
        t0 = time.perf_counter()
        pool = Examples.cat([_perturbed_examples(self.backbone, g, f, r, size, i, self.config, self.rng,
                                                 self.config.train.feature_pool_fraction)
                             for i, (g, f, r) in enumerate(zip(self.groups, self.clean_features, self.rois))])
        self.timings["pool_s"] += time.perf_counter() - t0
        self.timings["pool_builds"] += 1
        return pool

    def batch(self, step: int) -> Examples:
        """The step's batch: ``n_anomalous`` pool entries (re-drawn pool when due) and ``n_clean`` clean shots."""
        train, device, parts = self.config.train, self.backbone.device, []
        if self.n_anomalous:
            if train.encode_each_step or (train.pool_refresh > 0 and step > 0 and step % train.pool_refresh == 0):
                self.pool = self.build_pool(self.pool_size)
            parts.append(self.pool[_draw_indices(self.n_anomalous, len(self.pool), self.rng).to(device)])
        if self.n_clean:
            parts.append(self.clean[torch.randint(len(self.clean), (self.n_clean,), generator=self.rng).to(device)])
        return Examples.cat(parts)


def training_data(backbone, shots, config: APTConfig, roi=None, categories: Sequence[str] | None = None,
                  timings: dict | None = None, shot_features=None) -> _Data:
    """The data :func:`tune_prompts` trains on, built exactly as it builds it (same seed → the same batches).

    The clean shots are encoded, their regions of interest found and the pool of synthetic anomalies perturbed
    and encoded, all seeded by ``config.train.seed``; ``.batch(step)`` then returns step ``step``'s
    :class:`Examples` (call it for steps 0, 1, … in order: every call draws from the same generator). This is the
    hook for taking a training step by hand (notebook 03); arguments as in :func:`tune_prompts`.

    Example (batch 4, half of it anomalies: 2 drawn from the pool, 2 clean shots):
        >>> import apt_lab
        >>> b = apt_lab.load_backbone("apt-tiny")
        >>> cfg = APTConfig.preset("quick", train__batch_size=4, train__pool_size=4)
        >>> data = training_data(b, torch.rand(2, 3, 224, 224), cfg)
        >>> len(data.pool), data.batch(0).labels.tolist()
        (4, [1, 1, 0, 0])
    """
    names, groups = _shot_groups(shots, categories)
    rng = torch.Generator().manual_seed(config.train.seed)  # perturbations and batch order; CPU, device-independent
    timings = timings if timings is not None else {"encode_shots_s": 0.0, "roi_s": 0.0, "pool_s": 0.0,
                                                   "pool_builds": 0}
    features = _shot_features(shot_features, names, groups, config)
    return _Data(backbone, [g.to(backbone.device) for g in groups], names, roi, config, rng, timings, features)


def _shot_features(shot_features, names: list, groups: list[torch.Tensor], config: APTConfig) -> list | None:
    """The caller's features of the clean shots, one per shot group (None: tuning encodes them itself)."""
    if shot_features is None:
        return None
    given = [shot_features[n] for n in names] if isinstance(shot_features, Mapping) else [shot_features]
    for features, group in zip(given, groups):
        if features.cls.shape[0] != group.shape[0] or features.locality_radius != config.score.locality_radius:
            raise ValueError(f"shot_features: {features.cls.shape[0]} images at locality radius "
                             f"{features.locality_radius} for {group.shape[0]} shots at radius "
                             f"{config.score.locality_radius}; pass the features of exactly these shots, encoded "
                             "with config.score.locality_radius (e.g. backbone.encode_batched(shots, ...))")
    return given


# ----------------------------------------------------------------------------------------- the loop
def _logits(learner: PromptLearner, batch: Examples, temperature: float):
    """Learned [normal, anomalous] logits for every entry (batch order), each with its category's prompt pair."""
    text = learner.all_text_features()  # (P, 2, D)
    if text.shape[0] == 1:
        cls, patches = patch_logits(batch.features, text[0], temperature)  # (B, 2), (L, B, N, 2)
        return cls, patches, text
    cls, patches, order = [], [], []
    for pair in range(text.shape[0]):
        rows = (batch.groups == pair).nonzero()[:, 0]  # (b,) entries of this category
        if rows.numel():
            c, p = patch_logits(batch.features[rows], text[pair], temperature)
            cls.append(c)
            patches.append(p)
            order.append(rows)
    back = torch.argsort(torch.cat(order))  # (B,) from pair-grouped order back to batch order
    return torch.cat(cls)[back], torch.cat(patches, dim=1)[:, back], text


def _losses(learner, meta, batch: Examples, config: APTConfig, with_meta: bool):
    cls, patches, text = _logits(learner, batch, config.score.temperature)
    total, parts = task_loss(cls, patches, batch.labels, batch.targets, config.train, batch.weights)
    m_loss = None
    if with_meta:
        m_loss = meta_loss(config.smgs, text, meta.text_features(), batch.features, config.score.temperature,
                           learned_logits=(cls, patches))
    return total, parts, m_loss, text


def _optimizer(params, train) -> torch.optim.Optimizer:
    """``train.optimizer``: Adam, or SGD with momentum (ProGrad's setting)."""
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)  # "sgd"


def _step(learner, meta, optimizer, batch: Examples, config: APTConfig, step: int, result: "TuneResult") -> dict:
    """One optimiser step: task and meta loss, SMGS's gradient rule (λ > 0), the optimiser, the rule again on the
    optimiser's update (:func:`~apt_lab.smgs.guide_update`: Adam and momentum must not undo the guarantee)."""
    optimizer.zero_grad(set_to_none=True)
    total, parts, m_loss, text = _losses(learner, meta, batch, config, with_meta=True)
    _check_finite(total, config, step, result)
    params = [p for p in learner.parameters() if p.requires_grad]
    # the anchor: 1 − cos to the initial meta-prompt, guarded like the meta loss
    anchor = cosine_distance(text, meta.initial) if config.smgs.lam > 0 else None
    conflict_rate = _update(params, optimizer, total, m_loss, anchor, config.smgs)
    return _record(total, parts, m_loss, conflict_rate, text, meta)


def _check_finite(total: torch.Tensor, config: APTConfig, step: int, result: "TuneResult") -> None:
    if not torch.isfinite(total):
        lr = config.train.lr
        raise TrainingDivergedError(
            f"the task loss became {_number(total)} at step {step} (lr={lr:g}); lower config.train.lr (e.g. "
            f"{lr / 10:g}). The prompts from before this step are in error.result.", result)


def _update(params: list, optimizer, total: torch.Tensor, m_loss: torch.Tensor, anchor: torch.Tensor | None,
            smgs) -> float | None:
    """SMGS's rule (λ > 0) on the gradient and/or the optimiser's update, and the optimiser step; returns the
    conflict rate (None when λ = 0: SMGS off, no meta gradient)."""
    if not smgs.lam > 0:
        total.backward()
        optimizer.step()
        return None
    on_update = smgs.apply_to in ("update", "both")
    guided = apply_smgs(params, total, m_loss, smgs.lam, anchor, smgs.anchor_weight,
                        guide=smgs.apply_to in ("gradient", "both"))
    conflict_rate = guided["conflict_rate"]
    if on_update:  # the rule on the step the optimiser takes: its guarantee then holds for Adam too
        before = [p.detach().clone() for p in params]
        optimizer.step()
        projected = guide_update(params, before, guided["meta_grads"], smgs.lam, guided["anchor_grads"],
                                 smgs.anchor_weight)
        if smgs.apply_to == "update":  # where the rule acted: on the update
            conflict_rate = projected / guided["tensors"] if guided["tensors"] else 0.0
    else:
        optimizer.step()
    return conflict_rate


def _record(total, parts: dict, m_loss, conflict_rate, text: torch.Tensor, meta: MetaPrompt) -> dict:
    """A step's history entries (and the detached text features, popped by the loop)."""
    return {"loss": _number(total), "image_loss": _number(parts["image_loss"]), "focal": _number(parts["focal"]),
            "dice": _number(parts["dice"]), "meta_loss": _number(m_loss), "conflict_rate": conflict_rate,
            "anchor_similarity": anchor_similarity(text, meta.initial), "text": text.detach()}


def _new_result(backbone, shots, config: APTConfig, categories) -> TuneResult:
    """A result before the first step: prompts seeded by ``config.train.seed``, their frozen copy, the meta-prompt."""
    names, _ = _shot_groups(shots, categories)
    named = [n for n in names if n is not None]
    learner = PromptLearner(backbone, config.prompts, categories=named or None, seed=config.train.seed)
    initial = PromptLearner(backbone, config.prompts, categories=named or None, seed=config.train.seed)
    initial.load_state_dict(learner.state_dict())
    initial.requires_grad_(False).eval()
    meta = MetaPrompt(backbone, config.smgs, categories=named).to(backbone.device)
    timings = {"encode_shots_s": 0.0, "roi_s": 0.0, "pool_s": 0.0, "pool_builds": 0, "steps_s": 0.0,
               "step_s": 0.0, "total_s": 0.0}
    return TuneResult(learner, meta, [], timings, False, config, named or None, initial)


def tune_prompts(backbone, shots, config: APTConfig, callbacks: Sequence[Callable[[dict], None]] = (),
                 progress: bool = True, roi=None, categories: Sequence[str] | None = None,
                 shot_features=None) -> TuneResult:
    """Learn prompts from normal shots: APT's CFG + prompt tuning + SMGS, in one call.

    Args:
        backbone: the frozen backbone.
        shots: (K, 3, S, S) normal pixels in [0, 1], or ``{category: (K, 3, S, S)}`` (several categories: one
            prompt pair each when ``config.prompts.per_category``, else one shared pair trained on all).
        config: every knob (``train``, ``perturb``, ``prompts``, ``smgs``; ``score.temperature`` for logits).
        callbacks: each gets every step's history record right after the step (live plots, early stopping by
            raising :class:`~apt_lab.errors.StopTraining`).
        progress: show a tqdm bar.
        roi: optional (K, S, S) bool region of interest (a dict of them for dict shots); None = computed once
            per shot with ``region_of_interest`` (or the whole image when ``config.perturb.region == "image"``).
        categories: names for a tensor of shots (one name), needed with ``per_category`` prompts.
        shot_features: the shots' :class:`~apt_lab.backbone.ImageFeatures` when the caller already holds them
            (``{category: features}`` for dict shots), encoded with ``config.score.locality_radius``; None =
            encoded here. Data flows in arguments: nothing is cached on the backbone.

    Returns:
        :class:`TuneResult`. A KeyboardInterrupt (or ``StopTraining``) returns the steps done so far
        with ``interrupted=True`` — the last step may be half-applied if it struck inside the optimiser.

    Raises:
        TrainingDivergedError: the loss became NaN/inf; names the step, suggests a lower lr, and holds the
            result of the steps before it in ``.result``.

    History records hold :data:`HISTORY_KEYS`; ``meta_loss`` is computed (detached) even when λ = 0, while
    ``conflict_rate`` (the share of prompt tensors where the rule acted: on the update with ``smgs.apply_to`` =
    "update", else on the gradient) is None then (SMGS off: no meta gradient); ``meta_loss`` is measured against the *moving*
    meta-prompt, ``anchor_similarity`` (cosine to the *initial* one, :func:`~apt_lab.smgs.anchor_similarity`)
    for the prompts the step started from, in every arm; ``held_out_loss`` is None except at
    ``periodic`` re-anchoring steps. Batches: ``round(batch_size · anomaly_fraction)`` anomalies drawn from
    the pool (all shot groups), the rest clean shots; pool_size perturbed images *per shot group*.
    """
    train, start_all = config.train, time.perf_counter()
    result = _new_result(backbone, shots, config, categories)  # seeded prompts, their frozen copy, meta-prompt
    learner, meta, timings = result.prompts, result.meta, result.timings
    data = training_data(backbone, shots, config, roi, categories, timings, shot_features)  # clean shots + pool, seeded
    result.roi_coverage = data.coverage()
    held_out = None
    if config.smgs.update == "periodic":  # anomalies never trained on, for the re-anchoring decision
        held_out = Examples.cat([data.build_pool(max(1, config.smgs.heldout_size)), data.clean])
    optimizer = _optimizer(learner.parameters(), train)
    bar = _progress_bar(train.steps, progress)
    try:
        for step in range(train.steps):
            t_step = time.perf_counter()
            record = _step(learner, meta, optimizer, data.batch(step), config, step, result)
            text = record.pop("text")
            held_out_loss = None
            if meta.wants_held_out(step):
                with torch.no_grad():
                    held_out_total, _, _, text = _losses(learner, meta, held_out, config, with_meta=False)
                held_out_loss = float(held_out_total)
            # ema: the features this step started from (no extra pass); periodic: the post-step ones just scored
            meta.update(text.mean(0), step, held_out_loss)  # mean over categories' pairs
            seconds = time.perf_counter() - t_step
            record = {"step": step, **record, "meta_drift": float(meta.drift().mean()),
                      "held_out_loss": held_out_loss, "seconds": seconds}
            result.history.append(record)
            timings["steps_s"] += seconds
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            for callback in callbacks:
                callback(record)
    except (KeyboardInterrupt, StopTraining) as stop:
        result.interrupted = True
        if isinstance(stop, KeyboardInterrupt):
            warnings.warn(f"tuning interrupted after {len(result.history)} of {train.steps} steps; returning the "
                          "prompts and history so far (result.interrupted is True)", RuntimeWarning, stacklevel=2)
    finally:
        bar.close()
        timings["step_s"] = timings["steps_s"] / max(1, len(result.history))
        timings["total_s"] = time.perf_counter() - start_all
    learner.eval()
    return result


def _number(value: torch.Tensor) -> float:
    return float(value.detach())


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tuning prompts", disable=not enabled, leave=False)
