"""tune_prompts_batched — several prompt sets of one category trained together, one text-tower pass per step.

A sweep tunes one prompt set per (shots, seed) cell of a category, and every step of
:func:`~apt_lab.tuning.tune_prompts` runs the frozen text tower forward and back on one (2, L, W) prompt pair.
Here S sets take each step together::

    every set:  its own seeded data (pool, batches), prompts, optimiser state and meta-prompt
    one pass:   (2·S, L, W) prompt embeddings ──text tower──► (S, 1, 2, D) text features
    every set:  its task, meta and anchor losses on its own batch
    one backward per kind of loss: ∇ Σ_s loss_s
    every set:  SMGS's rule on its own gradients, its optimiser step, its meta-prompt update

The sets' parameters are disjoint and the tower treats every row on its own, so ∇ Σ_s loss_s with respect to
set s's parameters is exactly ∇ loss_s: each set gets its own gradient, its own SMGS decision (the rule is per
parameter tensor, and every tensor belongs to one set) and its own update. Every set ends where
``tune_prompts`` would take it, to float tolerance (the tower's matrix products run on a larger batch);
``tests/test_batched.py`` checks it and ``benchmarks/bench_batched.py`` measures the time per step.

Scope: one shared prompt pair per set (``config.prompts.per_category=False``), ``config.smgs.update`` "ema" or
"static", the same ``config.train.steps`` and prompt template for every set.

Example (two sets, k = 1 and k = 2, seeds 0 and 1; each equals its own ``tune_prompts`` run):
    >>> import apt_lab, torch
    >>> from apt_lab.config import APTConfig
    >>> from apt_lab.tuning import tune_prompts
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> shots = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    >>> configs = [APTConfig.preset("quick", train__steps=3, train__pool_size=4, train__seed=s) for s in (0, 1)]
    >>> together = tune_prompts_batched(b, [shots[:1], shots], configs)
    >>> alone = tune_prompts(b, shots[:1], configs[0], progress=False)
    >>> [len(r.history) for r in together]
    [3, 3]
    >>> torch.allclose(together[0].prompts.ctx[0], alone.prompts.ctx[0], atol=1e-5)
    True
    >>> torch.allclose(together[1].prompts.ctx[0], alone.prompts.ctx[0], atol=1e-5)   # the other set: its own
    False
"""
from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch

from .config import APTConfig
from .prompts import PromptLearner
from .smgs import cosine_distance
from .tuning import (TuneResult, _check_finite, _losses, _new_result, _optimizer, _progress_bar, _record, _update,
                     training_data)

UPDATES = ("ema", "static")  # meta-prompt rules a batched step supports ("periodic" needs per-set held-out passes)


def batched_text_features(learners: Sequence[PromptLearner]) -> torch.Tensor:
    """(S, 1, 2, D) text features of S shared prompt pairs from one pass of the text tower.

    Row s equals ``learners[s].all_text_features()`` to float tolerance (same template for every learner).

    Example:
        >>> import apt_lab
        >>> from apt_lab.config import PromptConfig
        >>> b = apt_lab.load_backbone("apt-tiny")
        >>> learners = [PromptLearner(b, PromptConfig(n_ctx=4), seed=s) for s in range(3)]
        >>> text = batched_text_features(learners)
        >>> tuple(text.shape), torch.allclose(text[2], learners[2].all_text_features(), atol=1e-6)
        ((3, 1, 2, 128), True)
    """
    first = learners[0]
    embeddings = torch.cat([learner.embeddings() for learner in learners])  # (2S, L, W)
    eot = torch.cat([learner.eot_index for learner in learners])  # (2S,)
    deep = None
    if first.config.deep_layers > 0:
        deep = list(torch.cat([learner.deep[0] for learner in learners], dim=1).unbind(0))  # layers × (2S, n, W)
    text = first.backbone.encode_prompt_embeddings(embeddings, eot, normalize=True, deep_prompts=deep,
                                                   deep_start=1).float()  # (2S, D)
    return text.view(len(learners), 1, 2, -1)  # (S, 1, 2, D)


def _check(shots_list: list, configs: list[APTConfig]) -> None:
    if not configs or len(shots_list) != len(configs):
        raise ValueError(f"shots_list has {len(shots_list)} entries and configs {len(configs)}: pass one config per "
                         "prompt set (at least one)")
    first = configs[0]
    template = ("n_ctx", "suffix", "deep_layers", "truncate")
    for i, config in enumerate(configs):
        if config.prompts.per_category:
            raise ValueError(f"configs[{i}].prompts.per_category=True: batched tuning trains one shared prompt pair "
                             "per set; set it False or use tune_prompts")
        if config.smgs.update not in UPDATES:
            raise ValueError(f"configs[{i}].smgs.update={config.smgs.update!r}: batched tuning supports {UPDATES}; "
                             "use tune_prompts for 'periodic'")
        if config.train.steps != first.train.steps:
            raise ValueError(f"configs[{i}].train.steps={config.train.steps} differs from configs[0].train.steps="
                             f"{first.train.steps}: every set must take the same number of steps")
        for name in template:
            if getattr(config.prompts, name) != getattr(first.prompts, name):
                raise ValueError(f"configs[{i}].prompts.{name}={getattr(config.prompts, name)!r} differs from "
                                 f"configs[0]'s {getattr(first.prompts, name)!r}: the sets share one text-tower pass, "
                                 f"so {template} must match")


def _linear(params: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Σ ⟨p, g⟩: a stand-in loss whose gradient w.r.t. each p is exactly g (no grad → a constant 0)."""
    terms = [(p * g).sum() for p, g in zip(params, grads) if g is not None]
    return torch.stack(terms).sum() if terms else torch.zeros((), device=params[0].device)


def _grads(losses: list[torch.Tensor | None], params: list[list[torch.Tensor]]) -> list[list]:
    """Per set, the gradients of Σ losses (None entries skipped) w.r.t. its own parameters (None where unused)."""
    present = [loss for loss in losses if loss is not None]
    if not present:
        return [[None] * len(group) for group in params]
    flat = [p for group in params for p in group]
    grads = list(torch.autograd.grad(torch.stack(present).sum(), flat, retain_graph=True, allow_unused=True))
    out = []
    for group in params:
        out.append(grads[:len(group)])
        grads = grads[len(group):]
    return out


def _batched_step(results: list[TuneResult], optimizers: list, batches: list, configs: list[APTConfig],
                  step: int) -> list[dict]:
    """One step of every set: one text pass, one backward per kind of loss, then each set's rule and optimiser."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    texts = batched_text_features([r.prompts for r in results])  # (S, 1, 2, D)
    losses = [_losses(r.prompts, r.meta, batch, config, with_meta=True, text=text)
              for r, batch, config, text in zip(results, batches, configs, texts)]
    for (total, _, _, _), config, result in zip(losses, configs, results):
        _check_finite(total, config, step, result)
    guided = [config.smgs.lam > 0 for config in configs]
    anchors = [cosine_distance(text, r.meta.initial) if g else None for text, r, g in zip(texts, results, guided)]
    params = [[p for p in r.prompts.parameters() if p.requires_grad] for r in results]
    task_grads = _grads([total for total, _, _, _ in losses], params)  # one backward through the tower each
    meta_grads = iter(_grads([m for (_, _, m, _), g in zip(losses, guided) if g],
                             [p for p, g in zip(params, guided) if g]))  # guided sets only, in order
    held = [bool(g and c.smgs.anchor_weight != 0) for g, c in zip(guided, configs)]  # sets guarding the anchor
    anchor_grads = iter(_grads([a for a, h in zip(anchors, held) if h], [p for p, h in zip(params, held) if h]))
    records = []
    for s, (total, parts, m_loss, text) in enumerate(losses):
        task = task_grads[s]
        g_meta = next(meta_grads) if guided[s] else None
        g_anchor = next(anchor_grads) if held[s] else None
        conflict_rate = _update(params[s], optimizers[s], _linear(params[s], task),
                                _linear(params[s], g_meta) if g_meta is not None else None,
                                _linear(params[s], g_anchor) if g_anchor is not None else None, configs[s].smgs)
        records.append(_record(total, parts, m_loss, conflict_rate, text, results[s].meta))
    return records


def tune_prompts_batched(backbone, shots_list: Sequence, configs: Sequence[APTConfig], progress: bool = False
                         ) -> list[TuneResult]:
    """Train one prompt set per ``(shots_list[s], configs[s])`` together; each as :func:`~apt_lab.tuning.tune_prompts`.

    Args:
        backbone: the frozen backbone (shared by every set).
        shots_list: per set, (K, 3, S, S) normal pixels in [0, 1] (e.g. one category's k = 1, 2, 4 draws).
        configs: per set, its configuration (``train.seed`` seeds its prompts, pool and batches).
        progress: show a tqdm bar.

    Returns:
        One :class:`~apt_lab.tuning.TuneResult` per set, in order. History records hold the same keys as
        ``tune_prompts``'; ``seconds`` is the set's share (1/S) of the batched step, and ``timings`` sums those.
        A KeyboardInterrupt returns every set's steps so far with ``interrupted=True``.

    Raises:
        ValueError: the lists differ in length, a set has per-category prompts, ``smgs.update="periodic"``, a
            different ``train.steps`` or a different prompt template from ``configs[0]``.
        TrainingDivergedError: a set's loss became NaN/inf (its result is in ``.result``).
    """
    shots_list, configs = list(shots_list), list(configs)
    _check(shots_list, configs)
    start_all = time.perf_counter()
    results = [_new_result(backbone, shots, config, None) for shots, config in zip(shots_list, configs)]
    datas = [training_data(backbone, shots, config, timings=result.timings)  # seeded like tune_prompts
             for shots, config, result in zip(shots_list, configs, results)]
    optimizers = [_optimizer(result.prompts.parameters(), config.train) for result, config in zip(results, configs)]
    steps = configs[0].train.steps
    bar = _progress_bar(steps, progress)
    try:
        for step in range(steps):
            t_step = time.perf_counter()
            records = _batched_step(results, optimizers, [data.batch(step) for data in datas], configs, step)
            seconds = (time.perf_counter() - t_step) / len(results)
            for result, record in zip(results, records):
                text = record.pop("text")  # (1, 2, D) the features this step started from
                result.meta.update(text.mean(0), step)
                result.history.append({"step": step, **record, "meta_drift": float(result.meta.drift().mean()),
                                       "held_out_loss": None, "seconds": seconds})
                result.timings["steps_s"] += seconds
            bar.update(1)
    except KeyboardInterrupt:
        for result in results:
            result.interrupted = True
        warnings.warn(f"batched tuning interrupted after {len(results[0].history)} of {steps} steps; returning "
                      "the prompts and histories so far (interrupted is True)", RuntimeWarning, stacklevel=2)
    finally:
        bar.close()
        for result in results:
            result.timings["step_s"] = result.timings["steps_s"] / max(1, len(result.history))
            result.timings["total_s"] = time.perf_counter() - start_all
    for result in results:
        result.prompts.eval()
    return results
