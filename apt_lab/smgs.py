"""align — SMGS, the Self-optimizing Meta-prompt Guiding Scheme (ProGrad-style gradient guidance).

A *meta-prompt* made of generic state words ("a photo of a flawless object." / "... damaged object.") carries
general anomaly semantics. Each tuning step computes two gradients for every prompt parameter tensor:

    g_task = ∇ task loss (synthetic-anomaly CE + focal + dice)
    g_meta = ∇ meta loss (KL(p_meta || p_learned), or 1 − cos(learned, meta))

and when they conflict (negative dot product) removes λ times the part of g_task that points against the
meta-prompt (:func:`guide_gradient`). So the prompts fit the synthetic anomalies only in directions that do
not contradict general anomaly semantics. λ = 0 is plain prompt tuning (the key ablation).

The meta-prompt is *self-optimising* (:class:`MetaPrompt`): after each step it follows the learned prompts
by an exponential moving average (default), re-anchors periodically when a held-out synthetic loss improves,
or stays fixed (the predecessor's behaviour). A moving target forgets where it started (an EMA keeps β^k of
its initial, hand-written semantics after k steps), so the rule also guards a fixed *anchor*: the gradient of
1 − cos(learned, initial meta-prompt) (``SMGSConfig.anchor_weight``). A step then conflicts with neither
gradient (:func:`project_to_cone`), and :func:`anchor_similarity` — logged every step — measures what is kept.

The guarantee (no step goes up the meta or anchor loss to first order) holds for plain SGD on the guided
gradient (ProGrad's setting, ``SMGSConfig.apply_to="gradient"``); Adam's per-coordinate scaling and momentum
break it. So by default (``apply_to="update"``) the optimiser steps on the plain task gradient and the rule acts
on the step it took (:func:`guide_update`): exact for any optimiser, and for plain SGD the same as ProGrad's.
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import SMGSConfig
from .scoring import patch_logits


# ------------------------------------------------------------------------------------ the gradient rule
def gradients_conflict(g_task: torch.Tensor, g_meta: torch.Tensor) -> bool:
    """True when ⟨g_task, g_meta⟩ < 0 (tensors of any shape, flattened for the dot product).

    Example:
        >>> gradients_conflict(torch.tensor([1., 0.]), torch.tensor([-1., 1.]))
        True
        >>> gradients_conflict(torch.tensor([1., 0.]), torch.tensor([0., 1.]))   # orthogonal: no conflict
        False
    """
    return bool((g_task.flatten().double() @ g_meta.flatten().double()) < 0)


def guide_gradient(g_task: torch.Tensor, g_meta: torch.Tensor, lam: float = 1.0,
                   g_anchor: torch.Tensor | None = None, anchor_weight: float = 1.0) -> torch.Tensor:
    """The SMGS rule for one parameter tensor.

    ``if ⟨g_task, g_meta⟩ < 0: g = g_task − λ·⟨g_task, ĝ_meta⟩·ĝ_meta`` with ĝ = g / |g|, else ``g = g_task``.
    With λ = 1 the result is orthogonal to g_meta: the component that would move against the meta-prompt is
    removed, the rest of the task gradient is kept. λ = 0, a zero g_meta, or agreeing gradients return
    ``g_task`` itself.

    With ``g_anchor`` (the gradient of the anchor loss, 1 − cos to the *initial* meta-prompt) the step may conflict
    with neither: the target is the closest direction to g_task that agrees with both (:func:`project_to_cone`;
    with one conflict that is the rule above, with two the projection onto both hyperplanes), blended with the
    anchor-free target by ``anchor_weight`` (1 = both guarantees exact, 0 = the anchor ignored); λ scales the
    whole correction.

    Example (conflicting, by hand: ĝ = (−1, 1)/√2, ⟨g_task, ĝ⟩ = −1/√2, g = (1, 0) − (−1/√2)(−1, 1)/√2):
        >>> guide_gradient(torch.tensor([1., 0.]), torch.tensor([-1., 1.]), lam=1.0)
        tensor([0.5000, 0.5000])
        >>> guide_gradient(torch.tensor([1., 0.]), torch.tensor([-1., 1.]), lam=0.5)
        tensor([0.7500, 0.2500])
        >>> guide_gradient(torch.tensor([1., 0.]), torch.tensor([1., 1.]))    # agreeing: unchanged
        tensor([1., 0.])
        >>> guide_gradient(torch.tensor([1., 0.]), torch.tensor([0., 2.]))    # orthogonal: unchanged
        tensor([1., 0.])
        >>> guide_gradient(torch.tensor([1., 1.]), torch.tensor([1., 0.]), g_anchor=torch.tensor([-1., 0.]))
        tensor([0., 1.])
    """
    for name, other in (("g_meta", g_meta), ("g_anchor", g_anchor)):
        if other is not None and g_task.shape != other.shape:
            raise ValueError(f"g_task {tuple(g_task.shape)} and {name} {tuple(other.shape)} must have the same shape")
    if lam == 0:
        return g_task
    use_anchor = g_anchor is not None and anchor_weight != 0
    if not (gradients_conflict(g_task, g_meta) or (use_anchor and gradients_conflict(g_task, g_anchor))):
        return g_task  # no conflict: the task gradient itself
    target = project_to_cone(g_task, [g_meta])
    if use_anchor:
        target = target + anchor_weight * (project_to_cone(g_task, [g_meta, g_anchor]) - target)
    return g_task + lam * (target - g_task)


def project_to_cone(g: torch.Tensor, normals: Sequence[torch.Tensor]) -> torch.Tensor:
    """The closest x to ``g`` with ⟨x, n⟩ ≥ 0 for every ``n`` (zero normals impose nothing).

    Exact for a handful of normals: every set of active constraints is tried (x = g minus its projection onto
    their span), the feasible candidate nearest to g wins. One normal: ProGrad's ``g − ⟨g, n̂⟩n̂`` when in conflict.

    Example:
        >>> project_to_cone(torch.tensor([1., 0.]), [torch.tensor([-1., 1.])])
        tensor([0.5000, 0.5000])
        >>> project_to_cone(torch.tensor([1., 1., 1.]), [torch.tensor([-1., 0., 0.]), torch.tensor([0., -1., 0.])])
        tensor([0., 0., 1.])
    """
    x0 = g.flatten().double()  # (n,)
    rows = [n.flatten().double().to(x0.device) for n in normals]
    rows = [n for n in rows if n.norm() > 0]
    tol = 1e-9 * float(x0.norm())

    def feasible(x):
        return all(float(x @ n) >= -tol * float(n.norm()) for n in rows)

    best, best_dist = torch.zeros_like(x0), float(x0.norm())  # x = 0 always satisfies every constraint
    for size in range(len(rows) + 1):
        for active in itertools.combinations(rows, size):
            x = x0
            if active:
                m = torch.stack(active)  # (k, n)
                x = x0 - m.T @ (torch.linalg.pinv(m @ m.T) @ (m @ x0))  # remove the part in span(active)
            dist = float((x0 - x).norm())
            if dist < best_dist and feasible(x):
                best, best_dist = x, dist
    return best.to(g.dtype).view_as(g)


def apply_smgs(params: Iterable[torch.Tensor], task_loss: torch.Tensor, meta_loss: torch.Tensor, lam: float,
               anchor_loss: torch.Tensor | None = None, anchor_weight: float = 1.0, guide: bool = True) -> dict:
    """Write SMGS-guided gradients into ``p.grad`` of every parameter tensor (the per-tensor rule).

    The gradients come from ``torch.autograd.grad`` (the task graph is retained for the meta gradients);
    ``p.grad`` is *overwritten*, not accumulated. Parameters no loss reaches (e.g. the prompts of a category
    absent from the batch) keep ``grad = None`` and are not counted. ``anchor_loss`` (1 − cos to the initial
    meta-prompt) adds the anchor's gradient to the rule (:func:`guide_gradient`). ``guide=False`` writes the plain
    task gradient (the rule then acts on the optimiser's update instead, :func:`guide_update`) and only counts.

    Returns:
        ``conflict_rate`` (fraction of counted tensors whose task gradient conflicted with the meta or the anchor
        gradient), ``conflicts``, ``tensors``, and ``meta_grads`` / ``anchor_grads`` (one tensor or None per
        parameter, for :func:`guide_update` after the optimiser step).
    """
    params = [p for p in params if p.requires_grad]
    use_anchor = anchor_loss is not None and anchor_weight != 0 and anchor_loss.requires_grad
    task_grads = torch.autograd.grad(task_loss, params, retain_graph=True, allow_unused=True)
    meta_grads = torch.autograd.grad(meta_loss, params, retain_graph=use_anchor, allow_unused=True) \
        if meta_loss.requires_grad else [None] * len(params)
    anchor_grads = torch.autograd.grad(anchor_loss, params, allow_unused=True) if use_anchor \
        else [None] * len(params)
    conflicts = counted = 0
    for p, g_task, g_meta, g_anchor in zip(params, task_grads, meta_grads, anchor_grads):
        if g_task is None and g_meta is None:
            continue
        counted += 1
        g_task = g_task if g_task is not None else torch.zeros_like(p)
        g_meta = g_meta if g_meta is not None else torch.zeros_like(p)
        guided = guide_gradient(g_task, g_meta, lam, g_anchor, anchor_weight)
        conflicts += guided is not g_task
        p.grad = (guided if guide else g_task).detach()
    return {"conflict_rate": conflicts / counted if counted else 0.0, "conflicts": conflicts, "tensors": counted,
            "meta_grads": list(meta_grads), "anchor_grads": list(anchor_grads)}


@torch.no_grad()
def guide_update(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor],
                 meta_grads: Sequence[torch.Tensor | None], lam: float,
                 anchor_grads: Sequence[torch.Tensor | None] | None = None, anchor_weight: float = 1.0) -> int:
    """The SMGS rule on the optimiser's *update*, so its guarantee holds whatever the optimiser.

    ProGrad's guarantee — the step never increases the meta loss to first order, ⟨Δp, g_meta⟩ ≤ 0 — holds for
    plain SGD on guided gradients, but Adam rescales each coordinate (and momentum adds past gradients), so
    the update Δp = p − before can point up the meta loss even when the gradient did not. Per tensor the rule
    of :func:`guide_gradient` is applied to −Δp (the direction the step went down) against the meta and anchor
    gradients; λ = 1 (and ``anchor_weight`` 1) makes the step agree with both to first order. For plain SGD on
    guided gradients this never fires.

    Returns:
        how many tensors were projected.

    Example (an Adam-like step (1, 1) while the meta gradient is (1, 0): the part going up the meta loss goes):
        >>> p = torch.tensor([1., 1.]); guide_update([p], [torch.zeros(2)], [torch.tensor([1., 0.])], 1.0)
        1
        >>> p
        tensor([0., 1.])
    """
    projected = 0
    anchor_grads = anchor_grads if anchor_grads is not None else [None] * len(params)
    for p, start, g_meta, g_anchor in zip(params, before, meta_grads, anchor_grads):
        if (g_meta is None and g_anchor is None) or lam == 0:
            continue
        descent = start - p  # −Δp: the direction the step went down, in the place of g_task
        g_meta = g_meta.to(descent) if g_meta is not None else torch.zeros_like(descent)
        g_anchor = g_anchor.to(descent) if g_anchor is not None else None
        guided = guide_gradient(descent, g_meta, lam, g_anchor, anchor_weight)
        if guided is not descent:  # the step went up the meta (or anchor) loss
            p.copy_(start - guided)
            projected += 1
    return projected


def anchor_similarity(learned_text: torch.Tensor, anchor_text: torch.Tensor) -> float:
    """Mean cosine of the learned [normal, anomalous] features to the anchor's (the *initial* meta-prompt),
    class by class, over every prompt pair: how much of the hand-written generic semantics the prompts keep.

    Example:
        >>> anchor_similarity(torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[1., 0.], [1., 0.]]))
        0.5
    """
    return 1 - float(cosine_distance(learned_text.detach().float(), anchor_text))


# ------------------------------------------------------------------------------------ the meta loss
def kl_divergence(meta_logits: torch.Tensor, learned_logits: torch.Tensor) -> torch.Tensor:
    """Mean over all leading positions of KL(softmax(meta) || softmax(learned)) over the last dim.

    Example:
        >>> kl_divergence(torch.zeros(3, 2), torch.zeros(3, 2))           # identical: 0
        tensor(0.)
        >>> round(float(kl_divergence(torch.tensor([[0., 0.]]), torch.tensor([[0., math.log(3)]]))), 4)
        0.1438
    """
    log_p = F.log_softmax(meta_logits.float(), dim=-1)
    log_q = F.log_softmax(learned_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def meta_loss(config: SMGSConfig, learned_text: torch.Tensor, meta_text: torch.Tensor, features=None,
              temperature: float = 0.07, learned_logits: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """How far the learned prompts are from the meta-prompt; gradients flow to ``learned_text`` only.

    Args:
        config: ``meta_loss`` ("kl" or "cosine") and ``patch_level``.
        learned_text: (2, D) or (P, 2, D) learned text features [normal, anomalous].
        meta_text: (2, D) meta-prompt features (treated as constants).
        features: :class:`~apt_lab.backbone.ImageFeatures` of the batch (needed by "kl").
        temperature: τ of softmax(cos / τ).
        learned_logits: optional ``(cls (B, 2), patches (L, B, N, 2))`` already computed with the learned
            prompts on ``features`` (saves a pass; how per-category prompts supply image-wise text features).

    "kl": KL(p_meta || p_learned) of the [normal, anomalous] probabilities on the CLS tokens, plus (when
    ``config.patch_level``) on every patch of every tapped layer. "cosine": mean over classes (and pairs) of
    1 − cos(learned, meta) — no images needed.
    """
    meta_text = meta_text.detach()
    if config.meta_loss == "cosine":
        return cosine_distance(learned_text, meta_text)
    if features is None:
        raise ValueError("meta_loss='kl' compares probabilities on images: pass features=ImageFeatures of the batch")
    if learned_logits is None:
        if learned_text.dim() != 2:
            raise ValueError("per-pair learned_text (P, 2, D) needs learned_logits computed per image")
        learned_logits = patch_logits(features, learned_text, temperature)
    with torch.no_grad():
        meta_cls, meta_patches = patch_logits(features, meta_text, temperature)  # (B, 2), (L, B, N, 2)
    loss = kl_divergence(meta_cls, learned_logits[0])
    if config.patch_level:
        loss = loss + kl_divergence(meta_patches, learned_logits[1])
    return loss


def cosine_distance(learned_text: torch.Tensor, target_text: torch.Tensor) -> torch.Tensor:
    """Mean over classes (and pairs) of 1 − cos(learned, target); the target is a constant.

    Example:
        >>> cosine_distance(torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[1., 0.], [1., 0.]]))
        tensor(0.5000)
    """
    target = F.normalize(target_text.detach().float(), dim=-1).to(learned_text.device)  # (2, D)
    return (1 - (F.normalize(learned_text, dim=-1) * target).sum(-1)).mean()


# ------------------------------------------------------------------------------------ the meta-prompt
class MetaPrompt(nn.Module):
    """The self-optimising meta-prompt: (2, D) text features [normal, anomalous] that guide the prompts.

    Built from ``config.meta_normal`` / ``config.meta_anomalous`` — generic state words only. Passing the
    category names makes construction fail if any of them appears in the meta texts (a category word would
    turn the meta-prompt into human, category-specific prior knowledge).

    Args:
        backbone: encodes the meta texts once.
        config: :class:`~apt_lab.config.SMGSConfig` (texts, ``update`` rule, ``ema_beta``, ``period``).
        categories: optional names to check against the meta texts.

    Attributes:
        current, initial: (2, D) buffers; ``text_features()`` returns ``current``.
        best_loss: lowest held-out loss seen (``periodic``); ``anchors``: how many times it re-anchored.

    Example (EMA by hand, β = 0.5: meta (1, 0), learned (0, 1) → normalise((0.5, 0.5)) = (0.7071, 0.7071)):
        >>> meta = MetaPrompt.from_features(torch.tensor([[1., 0.], [0., 1.]]), SMGSConfig(ema_beta=0.5))
        >>> meta.update(torch.tensor([[0., 1.], [0., 1.]]), step=0)
        True
        >>> meta.text_features()
        tensor([[0.7071, 0.7071],
                [0.0000, 1.0000]])
    """

    def __init__(self, backbone=None, config: SMGSConfig | None = None, categories: Sequence[str] | None = None,
                 features: torch.Tensor | None = None):
        super().__init__()
        config = config if config is not None else SMGSConfig()
        self.config = config
        texts = [config.meta_normal, config.meta_anomalous]
        for category in categories or ():
            words = re.findall(r"[a-z0-9]+", category.lower().replace("_", " "))
            for text in texts:
                if words and all(re.search(rf"\b{re.escape(w)}\b", text.lower()) for w in words):
                    raise ValueError(f"meta-prompt {text!r} contains the category name {category!r}; the meta-prompt "
                                     "must carry generic state words only (set SMGSConfig.meta_normal/meta_anomalous)")
        if features is None:
            if backbone is None:
                raise ValueError("MetaPrompt needs a backbone to encode its texts (or features=(2, D))")
            features = backbone.encode_texts(texts)  # (2, D)
        features = F.normalize(features.detach().float(), dim=-1)
        self.register_buffer("initial", features.clone())  # (2, D)
        self.register_buffer("current", features.clone())  # (2, D)
        self.best_loss = math.inf
        self.anchors = 0

    @classmethod
    def from_features(cls, features: torch.Tensor, config: SMGSConfig | None = None) -> "MetaPrompt":
        """A meta-prompt starting from given (2, D) features instead of encoded texts (tests, ablations)."""
        return cls(None, config, features=features)

    def text_features(self, category=None) -> torch.Tensor:
        """(2, D) current meta features (``category`` is ignored: the meta-prompt is generic)."""
        return self.current

    def wants_held_out(self, step: int) -> bool:
        """True when ``update(..., step)`` needs a held-out loss (``periodic``, at every ``period``-th step)."""
        return self.config.update == "periodic" and (step + 1) % self.config.period == 0

    @torch.no_grad()
    def update(self, learned: torch.Tensor, step: int, held_out_loss: float | None = None) -> bool:
        """Self-optimise after optimiser step ``step`` (0-based); returns whether the meta-prompt changed.

        Args:
            learned: (2, D) learned text features (for per-category prompts, the mean over categories).
            step: 0-based index of the step just taken.
            held_out_loss: the task loss on held-out synthetic anomalies; required by ``periodic`` when
                :meth:`wants_held_out` (it re-anchors ``current = learned`` if the loss beats the best so far).

        ``ema``: current ← normalise(β·current + (1 − β)·learned). ``static``: never changes.
        """
        learned = F.normalize(learned.detach().float(), dim=-1).to(self.current)
        rule = self.config.update
        if rule == "static":
            return False
        if rule == "ema":
            beta = self.config.ema_beta
            self.current.copy_(F.normalize(beta * self.current + (1 - beta) * learned, dim=-1))
            return beta != 1
        if not self.wants_held_out(step):
            return False
        if held_out_loss is None:
            raise ValueError(f"periodic meta update at step {step} needs held_out_loss (see wants_held_out)")
        if held_out_loss < self.best_loss:
            self.best_loss = float(held_out_loss)
            self.current.copy_(learned)
            self.anchors += 1
            return True
        return False

    def drift(self) -> torch.Tensor:
        """(2,) 1 − cos(current, initial) per class [normal, anomalous]: how far the meta-prompt has moved."""
        return 1 - (self.current * self.initial).sum(-1)

    def extra_repr(self) -> str:
        return (f"update={self.config.update!r}, texts={[self.config.meta_normal, self.config.meta_anomalous]}, "
                f"drift={[round(float(d), 4) for d in self.drift()]}")
