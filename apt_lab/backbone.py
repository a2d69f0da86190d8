"""The frozen CLIP backbone: multi-layer patch features in the joint space, and a text path with injected vectors.

A backbone is named by two strings, as in open_clip: a model name (``"ViT-B-16"``) and a pretrained tag
(``"openai"``), a local checkpoint file, or ``None`` for random weights. ``"apt-tiny"`` is a small registered
configuration (9 M parameters, the real CLIP tokenizer) for CPU tests and quick-mode notebooks.

Every image tensor in apt_lab holds pixels in [0, 1], shape (B, 3, S, S) at the backbone's ``image_size``;
the backbone normalises with the model's mean/std itself, so perturbations never see normalised values.

Example:
    >>> import apt_lab
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> b.grid, b.embed_dim, b.layers
    ((14, 14), 128, (1, 2, 3, 4))
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from .config import PRECISIONS as PRECISION_NAMES
from .data.images import pil_to_tensor, read_image, resize_images
from .errors import UnknownBackboneError, WeightsUnavailableError
from .weights import create_model, resolve_weights

# CLIP's mean/std; every open_clip tag apt_lab presets use shares them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# backbone.precision → dtype of the image tower. The text tower stays float32 in every mode: prompt gradients flow
# through it (no half-precision op on the gradient path, so fp16 needs no loss scaling) and with prompts cut at the
# end token it costs little next to the image tower.
PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.float32, torch.bfloat16, torch.float16)))


def pick_precision(precision: str | None, device: torch.device) -> str:
    """None → "bf16" on CUDA, "fp32" elsewhere; a named precision is checked and returned.

    Example:
        >>> cpu, cuda = torch.device("cpu"), torch.device("cuda")
        >>> pick_precision(None, cpu), pick_precision(None, cuda), pick_precision("tf32", cpu)
        ('fp32', 'bf16', 'tf32')
    """
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {list(PRECISIONS)} (config.backbone.precision), "
                         "or None for bf16 on CUDA and fp32 on the CPU")
    return precision


def default_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced vision blocks to tap, 1-based, ending at the last block.

    Example:
        >>> default_layers(24), default_layers(12), default_layers(4)
        ((6, 12, 18, 24), (3, 6, 9, 12), (1, 2, 3, 4))
    """
    if depth < 4:
        return tuple(range(1, depth + 1))
    return tuple(depth * q // 4 for q in (1, 2, 3, 4))


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class ImageFeatures:
    """What the vision tower gives anomaly detection, all in the joint image-text space, L2-normalised.

    Attributes:
        cls: (B, D) the pooled image embedding (what ``encode_image`` returns, normalised).
        patches: (L, B, N, D) patch tokens of the L tapped blocks, each through ``ln_post`` and ``proj``.
        grid: (h, w) patch grid, h * w == N.
        locality_radius: the locality-aware attention radius they were encoded with (0 = plain attention).
    """

    cls: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]
    locality_radius: int = 0

    def to(self, device) -> "ImageFeatures":
        return ImageFeatures(self.cls.to(device), self.patches.to(device), self.grid, self.locality_radius)

    def __getitem__(self, index) -> "ImageFeatures":
        """Select images: ``features[2:5]`` or ``features[tensor_of_indices]``."""
        return ImageFeatures(self.cls[index], self.patches[:, index], self.grid, self.locality_radius)

    @staticmethod
    def cat(items: Sequence["ImageFeatures"]) -> "ImageFeatures":
        return ImageFeatures(torch.cat([f.cls for f in items]), torch.cat([f.patches for f in items], dim=1),
                             items[0].grid, items[0].locality_radius)


class Backbone:
    """A frozen open_clip model wrapped for anomaly detection. Build it with :func:`load_backbone`.

    Attributes:
        model: the open_clip ``CLIP`` module (eval mode, ``requires_grad=False`` everywhere).
        name, pretrained: what it was built from; ``pretrained_loaded`` is False for random weights.
        layers: 1-based vision blocks whose patch tokens ``encode_images`` returns.
        image_size: side S of the square input; ``grid`` = (S // patch, S // patch); ``embed_dim`` = D.
        context_length: text positions of the model (77 for CLIP).
        precision: "fp32", "tf32", "bf16" or "fp16" (:data:`PRECISIONS`); ``dtype`` is the image tower's dtype.
            Features, text embeddings and everything computed from them are float32 whatever the precision.
        images_encoded: how many images went through the image tower (encoder passes) since loading.
    """

    def __init__(self, model, name: str, pretrained: str | None, pretrained_loaded: bool,
                 layers: Sequence[int] | None, device: torch.device, mean=OPENAI_MEAN, std=OPENAI_STD,
                 precision: str | None = None):
        if not (hasattr(model, "token_embedding") and hasattr(model.visual, "conv1")
                and hasattr(model.visual, "transformer")):
            raise UnknownBackboneError(
                f"backbone {name!r} is not a ViT CLIP with open_clip's built-in text transformer; apt_lab "
                "needs both (patch tokens and injectable prompt embeddings). Use e.g. 'ViT-B-16', "
                "'ViT-L-14-336', 'ViT-B-16-plus-240' or 'apt-tiny'.")
        self.model = model.eval().requires_grad_(False)
        self.name, self.pretrained, self.pretrained_loaded = name, pretrained, pretrained_loaded
        self.fallback_reason: str | None = None  # set when load_backbone_from_config fell back to random weights
        self.device = device
        self.dtype = model.visual.conv1.weight.dtype  # the image tower's; open_clip keeps some parameters fp32
        self.precision = precision or {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        self.images_encoded = 0  # images through the image tower so far (encoder passes; benchmarks count them)
        visual = model.visual
        depth = len(visual.transformer.resblocks)
        self.layers = tuple(layers) if layers is not None else default_layers(depth)
        bad = [l for l in self.layers if not 1 <= l <= depth]
        if bad:
            raise ValueError(f"layers={list(self.layers)}: blocks {bad} do not exist; {name} has vision blocks "
                             f"1..{depth}. Pass 1-based block numbers, e.g. {list(default_layers(depth))}.")
        self.patch_size = visual.patch_size[0]
        self.image_size = visual.image_size[0]
        self.grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        self.embed_dim = int(model.text_projection.shape[-1] if not isinstance(model.text_projection, torch.nn.Linear)
                             else model.text_projection.out_features)
        self.context_length = int(model.positional_embedding.shape[0])
        self.tokenizer = open_clip.get_tokenizer(name)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        weights = self.pretrained if self.pretrained_loaded else "random weights"
        return (f"Backbone({self.name}, {weights}, image_size={self.image_size}, grid={self.grid}, "
                f"embed_dim={self.embed_dim}, layers={self.layers}, device={self.device}, precision={self.precision})")

    def signature(self) -> dict:
        """What the image features depend on, for cache keys: architecture, weights, input size, taps, precision.

        ``weights`` fingerprints the image tower's patch embedding and projection, so other weights under the same
        name (another checkpoint file, another random init) never share a key.
        """
        import hashlib

        visual = self.model.visual
        digest = hashlib.sha256()
        for tensor in (visual.conv1.weight, visual.proj):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return {"name": self.name, "pretrained": str(self.pretrained), "image_size": self.image_size,
                "layers": list(self.layers), "precision": self.precision, "weights": digest.hexdigest()[:16]}

    @contextlib.contextmanager
    def _fast_matmul(self):
        """TF32 for float32 matrix products inside the encoders, unless the precision is strict "fp32"."""
        if self.precision == "fp32" or self.device.type != "cuda":
            yield
            return
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)

    # ----------------------------------------------------------------------------------------- images
    def preprocess(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        """One PIL image or path → (3, S, S) float pixels in [0, 1].

        The whole image is resized to the square input (bicubic, antialiased); nothing is cropped, so image
        borders (where defects sit) survive and masks resized the same way stay aligned.
        """
        x = pil_to_tensor(image) if isinstance(image, Image.Image) else read_image(Path(image))  # (3, H, W)
        return self.resize(x[None])[0]

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels → (B, 3, S, S), bicubic with antialiasing, clamped to [0, 1]."""
        if tuple(x.shape[-2:]) == (self.image_size, self.image_size):
            return x
        return resize_images(x, self.image_size)

    def load_images(self, images) -> torch.Tensor:
        """Paths, PIL images, a (3, H, W) / (B, 3, H, W) tensor or a list of such → (B, 3, S, S) on the device."""
        if isinstance(images, torch.Tensor):
            x = images[None] if images.dim() == 3 else images
            check_pixels(x, "images")
            return self.resize(x).to(self.device)
        return torch.stack([self.preprocess(im) for im in images]).to(self.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels in [0, 1] → the model's normalised input, in the image tower's dtype."""
        return ((x.to(self.device, torch.float32) - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, locality_radius: int = 0, locality_blocks: int = 1) -> ImageFeatures:
        """One encoder pass: the pooled embedding and the tapped blocks' patch tokens, in the joint space.

        Args:
            x: (B, 3, S, S) pixels in [0, 1].
            locality_radius: r > 0 turns on locality-aware attention in the last ``locality_blocks`` blocks:
                each patch attends only to its (2r+1)² neighbourhood and the CLS token (no new weights).
        """
        check_pixels(x, "images", size=self.image_size)
        visual = self.model.visual
        hooks = []
        if locality_radius > 0:
            mask = self.locality_mask(locality_radius)  # (1+N, 1+N)

            def local_attention(module, args, kwargs):
                return args, {**kwargs, "attn_mask": mask}

            hooks = [block.register_forward_pre_hook(local_attention, with_kwargs=True)
                     for block in visual.transformer.resblocks[-locality_blocks:]]
        try:
            with self._fast_matmul():
                out = visual.forward_intermediates(self.normalize(x), indices=[layer - 1 for layer in self.layers],
                                                   normalize_intermediates=True, output_fmt="NLC")
                patches = torch.stack(out["image_intermediates"]) @ visual.proj  # (L, B, N, D): ln_post, then proj
        finally:
            for hook in hooks:
                hook.remove()
        self.images_encoded += x.shape[0]
        cls = out["image_features"]  # (B, D): ln_post on the CLS token, then proj
        return ImageFeatures(F.normalize(cls.float(), dim=-1), F.normalize(patches.float(), dim=-1), self.grid,
                             locality_radius)

    def encode_batched(self, images: torch.Tensor, batch_size: int = 16, locality_radius: int = 0) -> ImageFeatures:
        """The one chunked encoder: (B, 3, H, W) pixels → features, ``batch_size`` images per pass.

        Images of another size are resized first (bicubic); each chunk moves to the device just before its pass,
        so a large CPU tensor of pixels never lands on the GPU at once.
        """
        size = max(1, int(batch_size))
        chunks = [self.encode_images(self.resize(images[i:i + size]).to(self.device), locality_radius=locality_radius)
                  for i in range(0, images.shape[0], size)]
        if not chunks:
            raise ValueError("images: empty batch (0 images); pass at least one (B, 3, H, W) image")
        return ImageFeatures.cat(chunks)

    def locality_mask(self, radius: int) -> torch.Tensor:
        """(1+N, 1+N) additive mask: patches see their (2r+1)² neighbours and CLS; CLS sees everything."""
        h, w = self.grid
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()  # (N,)
        near = ((rows[:, None] - rows[None]).abs() <= radius) & ((cols[:, None] - cols[None]).abs() <= radius)
        allowed = torch.ones(h * w + 1, h * w + 1, dtype=torch.bool)
        allowed[1:, 1:] = near  # (N, N)
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        return mask.masked_fill_(~allowed, float("-inf")).to(self.device)

    # ------------------------------------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → (T, context_length) token ids on the device."""
        return self.tokenizer(list(texts)).to(self.device)

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, C) ids → (T,) position whose output is the text embedding (the end token)."""
        model = self.model
        if model.text_pool_type == "eos":
            return (tokens == model.text_eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # CLIP: the end token has the largest id

    def token_embeddings(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → ((T, C, W) input embeddings, (T,) end-token positions) for ``encode_prompt_embeddings``."""
        tokens = self.tokenize(texts)
        with torch.no_grad():
            embeddings = self.model.token_embedding(tokens)  # (T, C, W)
        return embeddings, self.eot_index(tokens)

    def encode_prompt_embeddings(self, embeddings: torch.Tensor, eot_index: torch.Tensor, normalize: bool = True,
                                 deep_prompts: Sequence[torch.Tensor] | None = None, deep_start: int = 1
                                 ) -> torch.Tensor:
        """The text tower on injected input embeddings; gradients flow to them, never to the model.

        Args:
            embeddings: (P, C', W) input embeddings, C' <= context_length. Under the causal mask a position
                never sees later ones, so C' = max(eot_index) + 1 gives the same result as 77 positions.
            eot_index: (P,) position of each prompt's end token.
            deep_prompts: optional list of (n, W) or (P, n, W) tensors; entry i replaces positions
                ``deep_start : deep_start + n`` at the input of text block i + 2 (deep prompt tuning).

        Returns:
            (P, D) text embeddings (L2-normalised when ``normalize``).
        """
        model = self.model
        length = embeddings.shape[1]
        if length > self.context_length:
            raise ValueError(f"embeddings have {length} positions; {self.name} takes at most {self.context_length}")
        cast = model.transformer.get_cast_dtype()
        x = embeddings.to(cast) + model.positional_embedding[:length].to(cast)  # (P, C', W)
        mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        with self._fast_matmul():
            if not deep_prompts:
                x = model.transformer(x, attn_mask=mask)
            else:
                for index, block in enumerate(model.transformer.resblocks):
                    if 1 <= index <= len(deep_prompts):
                        deep = deep_prompts[index - 1].to(cast)
                        deep = deep.expand(x.shape[0], -1, -1) if deep.dim() == 2 else deep  # (P, n, W)
                        x = torch.cat([x[:, :deep_start], deep, x[:, deep_start + deep.shape[1]:]], dim=1)
                    x = block(x, attn_mask=mask)
            x = model.ln_final(x)  # (P, C', W)
            x = x[torch.arange(x.shape[0], device=x.device), eot_index]  # (P, W)
            projection = model.text_projection
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection  # (P, D)
        x = x.float()
        return F.normalize(x, dim=-1) if normalize else x

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Texts → (T, D) embeddings, identical to open_clip's ``encode_text``."""
        with self._fast_matmul():
            return self.model.encode_text(self.tokenize(texts), normalize=normalize).float()


def check_pixels(x: torch.Tensor, name: str, size: int | None = None) -> None:
    """Raise a clear error unless ``x`` is a finite (B, 3, H, W) float tensor of pixels in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a (B, 3, H, W) tensor of pixels in [0, 1], got {shape}")
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 colour channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
                         "convert grayscale/RGBA images to RGB first (apt_lab.data does this when loading)")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"{name}: expected {size}x{size} pixels, got {tuple(x.shape[-2:])}; "
                         "use backbone.resize(x) or backbone.load_images(...)")
    low, high = (float(v) for v in torch.aminmax(x.detach()))  # one pass; NaN propagates into both
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name}: {int((~torch.isfinite(x)).sum())} values are NaN or infinite")
    if low < -1e-4 or high > 1 + 1e-4:
        raise ValueError(f"{name}: pixel values must lie in [0, 1], got [{low:.3g}, {high:.3g}]; apt_lab "
                         "normalises inside the backbone, pass un-normalised pixels")


def load_backbone(name: str = "apt-tiny", pretrained: str | None = None, device: str | torch.device | None = None,
                  image_size: int | None = None, layers: Sequence[int] | None = None,
                  precision: str | None = None, cache_dir: str | None = None, init_seed: int = 0) -> Backbone:
    """Build a frozen backbone from an open_clip name and pretrained tag (or checkpoint file, or None).

    Args:
        name: open_clip architecture, e.g. ``"ViT-L-14-336"``, ``"ViT-B-16"``, or ``"apt-tiny"``.
        pretrained: open_clip tag (``"openai"``), path of a checkpoint file, or None for random weights.
        device: None picks CUDA when available, else CPU.
        image_size: run at another input size (e.g. 518 for ViT-L-14-336); positional embeddings are
            resized when weights load, as open_clip does.
        layers: 1-based vision blocks to tap; None = four evenly spaced blocks (ViT-L: 6, 12, 18, 24).
        precision: the image tower's arithmetic: "fp32", "tf32" (float32 weights, TF32 matrix products on
            CUDA), "bf16" or "fp16" (weights cast); None = "bf16" on CUDA, "fp32" on the CPU (bf16 and fp16 also
            run on the CPU when asked for). The text tower, features, losses and scores stay float32.
        init_seed: seeds the random initialisation (what ``pretrained=None`` keeps), so random weights are the
            same in every process; the global torch RNG is left as it was.

    Raises:
        UnknownBackboneError: the name or tag is unknown (the message lists what exists).
        WeightsUnavailableError: weights are neither cached nor downloadable (offline); within seconds.
    """
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().split("-")[0] in m.lower()][:8]
        raise UnknownBackboneError(f"unknown backbone {name!r}. Try one of {close or ['ViT-B-16', 'ViT-L-14-336']}"
                                   " or see open_clip.list_models(); 'apt-tiny' is the small CPU test model.")
    _check_towers(name)
    device = pick_device(device)
    precision = pick_precision(precision, device)
    source = resolve_weights(name, pretrained, cache_dir)
    model = create_model(name, pretrained, source, init_seed, precision="fp32", device=device,
                         force_image_size=image_size, cache_dir=cache_dir)
    model.visual.to(PRECISIONS[precision])  # the whole image tower, positional embeddings included
    mean, std = source.tag_config.get("mean", OPENAI_MEAN), source.tag_config.get("std", OPENAI_STD)
    return Backbone(model, name, pretrained, pretrained is not None, layers, device, mean, std, precision)


def _check_towers(name: str) -> None:
    """Refuse, before building anything, an architecture without a ViT image tower and open_clip's text transformer
    (ResNet "RN50", timm towers such as ConvNeXt or SigLIP, Hugging Face text towers)."""
    cfg = open_clip.get_model_config(name) or {}
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if isinstance(vision.get("layers"), (list, tuple)) or vision.get("timm_model_name") or text.get("hf_model_name") \
            or cfg.get("custom_text"):
        raise UnknownBackboneError(
            f"backbone {name!r} is not a ViT CLIP with open_clip's built-in text transformer (it has a "
            f"{'ResNet' if isinstance(vision.get('layers'), (list, tuple)) else 'timm or custom'} tower); apt_lab needs "
            "patch tokens from a ViT and injectable prompt embeddings. Use e.g. 'ViT-B-16', 'ViT-L-14-336', "
            "'ViT-B-16-plus-240' or 'apt-tiny'.")


class RandomWeightsWarning(UserWarning):
    """Pretrained weights were unavailable and a backbone fell back to random weights."""


ANNOUNCED: set[tuple[str, str | None]] = set()  # (name, pretrained) fallbacks announced in this process


def random_weights_notice(name: str, pretrained: str | None, reason: str) -> str:
    """The loud notice of a fallback to random weights (what :func:`load_backbone_from_config` warns)."""
    line = "!" * 100
    return (f"{name}: pretrained weights {pretrained!r} unavailable, using random weights\n{line}\n"
            f"!! PRETRAINED WEIGHTS UNAVAILABLE — running {name} with RANDOM WEIGHTS.\n!! {reason}\n"
            f"!! Scores measure the pipeline, not APT's accuracy; every cell records \"pretrained\": false.\n{line}")


def load_backbone_from_config(config, device: str | torch.device | None = None,
                              fallback_to_random: bool = False) -> Backbone:
    """The backbone of ``config.backbone`` (an ``APTConfig`` or its ``BackboneConfig``); ``device`` overrides it.

    With ``fallback_to_random``, weights that cannot be had (offline) give the same architecture with random
    weights; ``backbone.pretrained_loaded`` is then False and ``backbone.fallback_reason`` says why. The fallback is
    announced loudly (:class:`RandomWeightsWarning`), once per process and backbone: a run loads its backbone in
    several places, and Python's own once-per-place filter forgets whenever code changes the warning filters (as
    loading a checkpoint does). What ``apt-lab demo`` and the notebooks use, so that an offline machine still runs
    everything end to end.
    """
    from .config import BackboneConfig, config_section

    b = config_section(config, BackboneConfig)
    kwargs = dict(device=device or b.device, image_size=b.image_size, layers=b.layers, precision=b.precision,
                  init_seed=b.init_seed)
    try:
        return load_backbone(b.name, b.pretrained, **kwargs)
    except WeightsUnavailableError as error:
        if not fallback_to_random:
            raise
        backbone = load_backbone(b.name, None, **kwargs)
        backbone.fallback_reason = f"{b.pretrained!r} weights unavailable: {error}"
        if (b.name, b.pretrained) not in ANNOUNCED:
            ANNOUNCED.add((b.name, b.pretrained))
            warnings.warn(random_weights_notice(b.name, b.pretrained, backbone.fallback_reason),
                          RandomWeightsWarning, stacklevel=2)
        return backbone
