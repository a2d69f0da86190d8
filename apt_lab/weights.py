"""Where a backbone's weights come from: an open_clip tag (cached or downloaded), a checkpoint file, or none.

``resolve_weights`` answers before any model is built, so an offline machine learns within seconds (not after
download retries) that a tag is missing, with a message that says how to supply it. ``create_model`` builds the
open_clip model with the seeded random initialisation apt_lab promises (same random weights in every process).

OpenAI's CLIP was trained with QuickGELU (x·σ(1.702x)) instead of GELU. For a tag, open_clip's table says so; for
a checkpoint *file* apt_lab decides from the file itself (:func:`detect_quick_gelu`): a TorchScript archive (how
OpenAI released CLIP), OpenAI's state-dict bookkeeping keys, an ``open_clip_config.json`` beside the file, or the
model-hub repository the file was cached from. ``quick_gelu=True/False`` overrides, and so does an architecture
name ending in ``-quickgelu`` (``"ViT-B-16-quickgelu"``).

Example:
    >>> resolve_weights("apt-tiny", None)
    WeightSource(file=None, tag_config={}, quick_gelu=False, layout='open_clip', reason='')
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch

from .env import hub_offline
from .errors import UnknownBackboneError, WeightsUnavailableError

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)  # registers "apt-tiny" next to open_clip's own architectures
OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")  # bookkeeping entries of OpenAI's state dicts


@dataclass
class WeightSource:
    """What ``create_model`` loads: a local file (or None: random weights / download by tag), the tag's open_clip
    config (mean, std, hub), whether the weights need QuickGELU (OpenAI's CLIP was trained with it), the file's
    ``layout`` ("open_clip", "openai" state dict, or "torchscript" archive) and the ``reason`` for QuickGELU."""

    file: str | None = None
    tag_config: dict = field(default_factory=dict)
    quick_gelu: bool = False
    layout: str = "open_clip"
    reason: str = ""


def resolve_weights(name: str, pretrained: str | None, cache_dir: str | None = None,
                    quick_gelu: bool | None = None) -> WeightSource:
    """A pretrained tag or file → where the weights are. Raises at once when they cannot be had.

    Args:
        quick_gelu: None = decide from the tag or the file (:func:`detect_quick_gelu`); True/False = as given.

    Raises:
        UnknownBackboneError: an unknown tag (the message lists the known ones).
        FileNotFoundError: ``pretrained`` looks like a path but no such file exists.
        WeightsUnavailableError: a tag that is not cached while downloads are impossible (offline).
    """
    if pretrained is None:
        return WeightSource(quick_gelu=bool(quick_gelu), reason="given" if quick_gelu else "")
    if Path(pretrained).expanduser().is_file():
        file = Path(pretrained).expanduser()
        layout = checkpoint_layout(file)
        if quick_gelu is None:
            quick_gelu, reason = detect_quick_gelu(name, file, layout)
            if not quick_gelu and "openai" in open_clip.list_pretrained_tags_by_model(name):
                warnings.warn(f"pretrained={str(file)!r}: nothing marks this file as OpenAI's weights (no TorchScript "
                              "archive, no OpenAI state-dict keys, no open_clip_config.json beside it, not in the model "
                              f"hub's cache), so {name} runs with GELU. If it holds OpenAI's weights, pass "
                              f"name={name + '-quickgelu'!r} (or quick_gelu=True), or OpenAI's original .pt file.",
                              stacklevel=2)
        else:
            reason = "given"
        return WeightSource(str(file), {}, bool(quick_gelu), layout, reason)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        if any(s in pretrained for s in ("/", "\\", ".pt", ".bin", ".safetensors")):
            raise FileNotFoundError(f"pretrained={pretrained!r}: no such checkpoint file. Give the path of a "
                                    f"{name} checkpoint, a tag from open_clip.list_pretrained_tags_by_model("
                                    f"{name!r}), or pretrained=None for random weights.")
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UnknownBackboneError(f"{name!r} has no pretrained tag {pretrained!r}; known tags: {tags}. "
                                   "Or pass a checkpoint file, or pretrained=None for random weights.")
    tag_quick = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else bool(quick_gelu)
    source = WeightSource(_cached_file(tag_cfg, cache_dir), tag_cfg, tag_quick, "open_clip",
                          f"the {pretrained!r} tag" if quick_gelu is None and tag_quick else "given" if tag_quick else "")
    if source.file is None:  # must be downloaded first
        url = "https://huggingface.co" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "https://huggingface.co")
        if hub_offline() or not _host_reachable(url):
            raise WeightsUnavailableError(offline_message(name, pretrained, url))
    return source


def create_model(name: str, pretrained: str | None, source: WeightSource, init_seed: int = 0, **kwargs):
    """``open_clip.create_model`` with the random initialisation seeded by ``init_seed`` (the caller's RNG is left
    as it was) and open_clip's "no pretrained weights" root-logger warning silenced (apt_lab reports that itself)."""
    downloading = pretrained is not None and source.file is None
    openai_file = source.layout in ("openai", "torchscript")  # open_clip's loader cannot read these: we do
    try:
        with torch.random.fork_rng(devices=[]), _quiet_root_logger(pretrained is None or openai_file):
            torch.manual_seed(init_seed)
            model = open_clip.create_model(name, pretrained=None if openai_file else source.file or pretrained,
                                           force_quick_gelu=source.quick_gelu, **kwargs)
        if openai_file:
            load_openai_checkpoint(model, source.file, source.layout)
        return model
    except RuntimeError as error:
        if downloading:
            raise WeightsUnavailableError(offline_message(name, pretrained, "the model hub") +
                                          f" (download failed: {str(error)[:200]})") from None
        raise


def checkpoint_layout(path: str | Path) -> str:
    """"torchscript" (a TorchScript archive, how OpenAI released CLIP), "openai" (a state dict with OpenAI's
    bookkeeping keys ``input_resolution``/``context_length``/``vocab_size``), or "open_clip" (anything else)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist()):
                return "torchscript"
    return "openai" if any(k in _state_dict_keys(path) for k in OPENAI_KEYS) else "open_clip"


def detect_quick_gelu(name: str, path: str | Path, layout: str | None = None) -> tuple[bool, str]:
    """Whether the weights in ``path`` need QuickGELU, and why: (True, reason) or (False, "").

    In order: an architecture name ending in ``-quickgelu``; an OpenAI layout (:func:`checkpoint_layout`); an
    ``open_clip_config.json`` beside the file (what hub repositories ship) with ``model_cfg.quick_gelu``; a file
    inside the model hub's cache of a repository that an open_clip tag with QuickGELU downloads from.
    """
    path = Path(path)
    if name.endswith("-quickgelu"):
        return True, f"the architecture name {name!r}"
    layout = layout or checkpoint_layout(path)
    if layout != "open_clip":
        return True, f"an OpenAI checkpoint ({'TorchScript archive' if layout == 'torchscript' else 'its state-dict keys'})"
    config = path.parent / "open_clip_config.json"
    if config.is_file():
        try:
            quick = bool(json.loads(config.read_text()).get("model_cfg", {}).get("quick_gelu", False))
        except (ValueError, AttributeError):
            quick = False
        if quick:
            return True, f"{config} (model_cfg.quick_gelu)"
    repo = next((p[len("models--"):].replace("--", "/") for p in path.parts if p.startswith("models--")), None)
    if repo is not None:
        for tag in open_clip.list_pretrained_tags_by_model(name):
            cfg = open_clip.get_pretrained_cfg(name, tag)
            if cfg.get("quick_gelu") and cfg.get("hf_hub", "").rstrip("/").split("/")[:2] == repo.split("/")[:2]:
                return True, f"the model hub repository {repo} (open_clip tag {tag!r})"
    return False, ""


def load_openai_checkpoint(model, path: str | Path, layout: str) -> None:
    """Load OpenAI's weights (TorchScript archive or state dict with bookkeeping keys) into an open_clip ``model``:
    the bookkeeping keys and the model's non-persistent buffers (``attn_mask``) are dropped, positional embeddings
    resized as open_clip does, and every other key must match (strict)."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    if layout == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is how OpenAI shipped CLIP
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    transient = {f"{prefix}.{b}" if prefix else b for prefix, module in model.named_modules()
                 for b in module._non_persistent_buffers_set}
    state = {k: v for k, v in state.items() if k not in OPENAI_KEYS and k not in transient}
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def _state_dict_keys(path: Path) -> set[str]:
    """The top-level keys of a checkpoint file (safetensors header, or a lazily memory-mapped torch file)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an old-format (non-zip) file cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # not a checkpoint we can read: open_clip's loader will say what is wrong
        return set()
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return set(state) if isinstance(state, dict) else set()


def offline_message(name: str, tag: str, where: str) -> str:
    """What to do when the ``tag`` weights of ``name`` cannot be fetched from ``where``."""
    return (f"cannot get the {tag!r} weights of {name!r}: they are not in the local cache and {where} cannot be "
            "reached (offline, or HF_HUB_OFFLINE=1). Either download them once on a machine with internet "
            f"(`open_clip.create_model({name!r}, pretrained={tag!r})` fills ~/.cache/huggingface), pass the "
            f"checkpoint file as pretrained='/path/to/{name}.bin', or use pretrained=None for random weights "
            "(same speed, no accuracy).")


def _cached_file(tag_cfg: dict, cache_dir: str | None) -> str | None:
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    import huggingface_hub

    repo, filename = os.path.split(hub)
    for candidate in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"):
        cached = huggingface_hub.try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
        if isinstance(cached, str):
            return cached
    return None


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((urlparse(url).hostname, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_root_logger(quiet: bool):
    root, level = logging.getLogger(), logging.getLogger().level
    if quiet:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
