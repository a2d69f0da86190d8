"""Learnable prompts: CoOp-style context vectors, found by back-propagation, without human anomaly words.

Each prompt is the neutral template ``"X X ... X object."`` whose ``n_ctx`` ``X`` positions are replaced by
learnable vectors in the text tower's input space. A *pair* is one normal and one anomalous prompt: same
template, separate context vectors. One pair is shared by all categories, or (``per_category=True``) each
category gets its own. Only the context vectors (and optional deep prompts) are parameters; the template's
token embeddings are frozen buffers computed once.

Example:
    >>> import apt_lab
    >>> from apt_lab.config import PromptConfig
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> learner = PromptLearner(b, PromptConfig(n_ctx=12), seed=0)
    >>> learner.text_features().shape            # [normal, anomalous], L2-normalised
    torch.Size([2, 128])
    >>> [tuple(p.shape) for p in learner.parameters()]
    [(2, 12, 128)]
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import PromptConfig

CLASSES = ("normal", "anomalous")  # row order of every (2, D) text-feature tensor in apt_lab


class PromptLearner(nn.Module):
    """One (or one per category) pair of learnable prompts [normal, anomalous] for a frozen backbone.

    Args:
        backbone: the frozen :class:`~apt_lab.backbone.Backbone` whose text tower encodes the prompts.
        config: :class:`~apt_lab.config.PromptConfig` (n_ctx, init_std, suffix, per_category, deep_layers,
            truncate).
        categories: category names; required when ``config.per_category`` (one pair each), optional otherwise
            (then only recorded, e.g. in checkpoints).
        seed: seeds the N(0, init_std²) initialisation (its own ``torch.Generator``, never the global RNG).

    Attributes:
        ctx: ``nn.ParameterList`` with one (2, n_ctx, W) tensor per pair (row 0 normal, row 1 anomalous).
            One tensor per pair keeps SMGS's per-parameter-tensor gradient rule per category.
        deep: ``nn.ParameterList`` with one (deep_layers, 2, n_ctx, W) tensor per pair (empty when off).
        prefix, suffix_embeddings, eot_index: frozen buffers of the template, (1, 1, W), (1, C'-1-n_ctx, W), (2,).
    """

    def __init__(self, backbone, config: PromptConfig | None = None, categories: Sequence[str] | None = None,
                 seed: int = 0):
        super().__init__()
        config = config if config is not None else PromptConfig()
        self.config = config
        self.backbone = backbone  # a plain object, not an nn.Module: never registered, never trained
        self.seed = int(seed)
        self.categories = list(categories) if categories is not None else None
        if config.per_category and not self.categories:
            raise ValueError("PromptConfig.per_category=True needs the category names: "
                             "PromptLearner(backbone, config, categories=['bottle', 'cable', ...])")
        if self.categories is not None and len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories contain duplicates: {self.categories}")
        n_ctx = config.n_ctx
        if n_ctx < 1:
            raise ValueError(f"PromptConfig.n_ctx must be >= 1, got {n_ctx}")
        text_blocks = len(backbone.model.transformer.resblocks)
        if not 0 <= config.deep_layers <= text_blocks - 1:
            raise ValueError(f"PromptConfig.deep_layers={config.deep_layers}: {backbone.name} has {text_blocks} text "
                             f"blocks, so at most {text_blocks - 1} can take deep prompts (0 turns them off)")

        # ---- the template, tokenised once: [SOT] X * n_ctx <suffix words> [EOT] (pad ...)
        template = " ".join(["X"] * n_ctx) + " " + config.suffix
        tokens = backbone.tokenize([template])  # (1, 77)
        x_id = int(backbone.tokenize(["X"])[0, 1])
        if not bool((tokens[0, 1:1 + n_ctx] == x_id).all()):
            raise ValueError(f"template {template!r} does not tokenise to {n_ctx} placeholder tokens after the start "
                             "token; use a suffix that starts with a word")
        embeddings, eot = backbone.token_embeddings([template])  # (1, 77, W), (1,)
        length = int(eot.max()) + 1 if config.truncate else backbone.context_length
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)  # (1, 1, W) start token
        self.register_buffer("suffix_embeddings", embeddings[:, 1 + n_ctx:length].clone(),
                             persistent=False)  # (1, C' - 1 - n_ctx, W)
        self.register_buffer("eot_index", eot.expand(2).clone(), persistent=False)  # (2,) same template twice
        self.template = template
        self.width = embeddings.shape[-1]

        # ---- parameters: context vectors (and deep prompts), N(0, init_std²) from a seeded generator
        generator = torch.Generator().manual_seed(self.seed)
        n_pairs = len(self.categories) if config.per_category else 1
        device = backbone.device

        def draw(*shape) -> nn.Parameter:
            value = torch.randn(*shape, generator=generator) * config.init_std
            return nn.Parameter(value.to(device))

        self.ctx = nn.ParameterList([draw(2, n_ctx, self.width) for _ in range(n_pairs)])  # each (2, n_ctx, W)
        self.deep = nn.ParameterList([draw(config.deep_layers, 2, n_ctx, self.width)
                                      for _ in range(n_pairs)] if config.deep_layers > 0 else [])

    def extra_repr(self) -> str:
        pairs = f"per category: {self.categories}" if self.config.per_category else "shared"
        return (f"template={self.template!r}, n_ctx={self.config.n_ctx}, deep_layers={self.config.deep_layers}, "
                f"positions={self.positions}, pairs={pairs}")

    # ----------------------------------------------------------------------------------------- access
    @property
    def n_pairs(self) -> int:
        return len(self.ctx)

    @property
    def positions(self) -> int:
        """Text positions the tower runs on (max(eot)+1 when truncated, else the context length)."""
        return 1 + self.config.n_ctx + self.suffix_embeddings.shape[1]

    def pair_index(self, category: str | int | None = None) -> int:
        """Which pair serves ``category``: always 0 for shared prompts; the category's index otherwise."""
        if not self.config.per_category:
            return 0
        if isinstance(category, int) and not isinstance(category, bool):
            if not 0 <= category < self.n_pairs:
                raise IndexError(f"pair index {category} out of range; {self.n_pairs} categories: {self.categories}")
            return category
        if category is None or category not in self.categories:
            raise ValueError(f"these prompts are per category; pass category= one of {self.categories} "
                             f"(got {category!r})")
        return self.categories.index(category)

    def embeddings(self, category: str | int | None = None) -> torch.Tensor:
        """(2, C', W) input embeddings of one pair: [SOT] ctx <suffix> [EOT] (truncated or padded to 77)."""
        ctx = self.ctx[self.pair_index(category)]  # (2, n_ctx, W)
        return torch.cat([self.prefix.expand(2, -1, -1), ctx, self.suffix_embeddings.expand(2, -1, -1)], dim=1)

    def text_features(self, category: str | int | None = None) -> torch.Tensor:
        """(2, D) L2-normalised text features [normal, anomalous] of ``category``'s pair (shared: any/None)."""
        index = self.pair_index(category)
        deep = None
        if self.config.deep_layers > 0:
            deep = list(self.deep[index].unbind(0))  # deep_layers × (2, n_ctx, W)
        return self.backbone.encode_prompt_embeddings(self.embeddings(index), self.eot_index, normalize=True,
                                                      deep_prompts=deep, deep_start=1).float()

    def all_text_features(self) -> torch.Tensor:
        """(n_pairs, 2, D): every pair's text features, in ``categories`` order for per-category prompts."""
        return torch.stack([self.text_features(i if self.config.per_category else None)
                            for i in range(self.n_pairs)])

    # ------------------------------------------------------------------------------------ inspection
    @torch.no_grad()
    def set_context_words(self, normal: str, anomalous: str | None = None, category: str | int | None = None
                          ) -> None:
        """Overwrite a pair's context vectors with the real token embeddings of words (CoOp's ``ctx_init``).

        Each text must tokenise to exactly ``n_ctx`` tokens. Then ``text_features()`` equals
        ``backbone.encode_texts([text + " " + suffix])`` — the check that the injected path is exact.
        Not used by APT's default (random init, no words); useful for tests and for init ablations.
        """
        index = self.pair_index(category)
        for row, text in enumerate((normal, anomalous if anomalous is not None else normal)):
            embeddings, eot = self.backbone.token_embeddings([text])  # (1, 77, W)
            if int(eot[0]) - 1 != self.config.n_ctx:
                raise ValueError(f"{text!r} is {int(eot[0]) - 1} tokens; these prompts have n_ctx="
                                 f"{self.config.n_ctx} context vectors")
            self.ctx[index][row].copy_(embeddings[0, 1:1 + self.config.n_ctx])

    def state(self) -> dict[str, object]:
        """What a checkpoint needs to rebuild this learner (config, categories, seed)."""
        return {"prompt_config": dataclasses.asdict(self.config), "categories": self.categories, "seed": self.seed}


def _vocabulary(backbone) -> tuple[torch.Tensor, dict[int, str]]:
    weight = backbone.model.token_embedding.weight.detach()  # (V, W)
    return weight, backbone.tokenizer.decoder


def _word(decoder: dict[int, str], token: int) -> str:
    text = decoder.get(int(token), f"<{int(token)}>")
    return text.replace("</w>", "")


@torch.no_grad()
def nearest_words(learner: PromptLearner, k: int = 5, metric: str = "euclidean") -> list[dict]:
    """Map every context vector to its ``k`` nearest vocabulary tokens ("what did the prompts learn").

    Args:
        learner: the prompts.
        k: tokens per context vector.
        metric: ``"euclidean"`` (CoOp's choice) or ``"cosine"`` (distance = 1 − cos).

    Returns:
        One dict per (pair, class, position): ``category`` (None when shared), ``prompt`` ("normal" /
        "anomalous"), ``position`` (0-based among the context vectors), ``words`` (k strings, nearest first)
        and ``distances`` (k floats). Ready for ``pandas.DataFrame``.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    vocab, decoder = _vocabulary(learner.backbone)  # (V, W)
    vocab = vocab.float()
    rows = []
    for index, ctx in enumerate(learner.ctx):
        vectors = ctx.detach().float().reshape(-1, ctx.shape[-1])  # (2 * n_ctx, W)
        if metric == "euclidean":
            distance = torch.cdist(vectors, vocab, compute_mode="donot_use_mm_for_euclid_dist")  # (2 * n_ctx, V)
        else:
            distance = 1 - F.normalize(vectors, dim=-1) @ F.normalize(vocab, dim=-1).T  # (2 * n_ctx, V)
        values, tokens = distance.topk(k, dim=-1, largest=False)  # (2 * n_ctx, k)
        category = learner.categories[index] if learner.config.per_category else None
        for flat in range(vectors.shape[0]):
            row, position = divmod(flat, ctx.shape[1])
            rows.append({"category": category, "prompt": CLASSES[row], "position": position,
                         "words": [_word(decoder, t) for t in tokens[flat].tolist()],
                         "distances": [float(v) for v in values[flat]]})
    return rows


@torch.no_grad()
def similarity_to(learner: PromptLearner, texts: Sequence[str], category: str | int | None = None) -> torch.Tensor:
    """(2, T) cosine similarity of the learned [normal, anomalous] features to ``texts``' embeddings.

    E.g. ``similarity_to(learner, ["a photo of a flawless object.", "a photo of a damaged object."])``: a
    diagonal that dominates means the learned prompts moved towards the human words.
    """
    learned = learner.text_features(category)  # (2, D)
    return learned @ learner.backbone.encode_texts(list(texts)).to(learned).T  # (2, T)
