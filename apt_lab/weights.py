"""Where a backbone's weights come from: an open_clip tag (cached or downloaded), a checkpoint file, or none.

``resolve_weights`` answers before any model is built, so an offline machine learns within seconds (not after
download retries) that a tag is missing, with a message that says how to supply it. ``create_model`` builds the
open_clip model with the seeded random initialisation apt_lab promises (same random weights in every process).

Example:
    >>> resolve_weights("apt-tiny", None)
    WeightSource(file=None, tag_config={}, quick_gelu=False)
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch

from .env import hub_offline
from .errors import UnknownBackboneError, WeightsUnavailableError

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)  # registers "apt-tiny" next to open_clip's own architectures


@dataclass
class WeightSource:
    """What ``create_model`` loads: a local file (or None: random weights / download by tag), the tag's open_clip
    config (mean, std, hub), and whether the weights need QuickGELU (OpenAI's CLIP was trained with it)."""

    file: str | None = None
    tag_config: dict = field(default_factory=dict)
    quick_gelu: bool = False


def resolve_weights(name: str, pretrained: str | None, cache_dir: str | None = None) -> WeightSource:
    """A pretrained tag or file → where the weights are. Raises at once when they cannot be had.

    Raises:
        UnknownBackboneError: an unknown tag (the message lists the known ones).
        FileNotFoundError: ``pretrained`` looks like a path but no such file exists.
        WeightsUnavailableError: a tag that is not cached while downloads are impossible (offline).
    """
    if pretrained is None:
        return WeightSource()
    if Path(pretrained).expanduser().is_file():
        return WeightSource(str(Path(pretrained).expanduser()))
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        if any(s in pretrained for s in ("/", "\\", ".pt", ".bin", ".safetensors")):
            raise FileNotFoundError(f"pretrained={pretrained!r}: no such checkpoint file. Give the path of a "
                                    f"{name} checkpoint, a tag from open_clip.list_pretrained_tags_by_model("
                                    f"{name!r}), or pretrained=None for random weights.")
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UnknownBackboneError(f"{name!r} has no pretrained tag {pretrained!r}; known tags: {tags}. "
                                   "Or pass a checkpoint file, or pretrained=None for random weights.")
    source = WeightSource(_cached_file(tag_cfg, cache_dir), tag_cfg, bool(tag_cfg.get("quick_gelu", False)))
    if source.file is None:  # must be downloaded first
        url = "https://huggingface.co" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "https://huggingface.co")
        if hub_offline() or not _host_reachable(url):
            raise WeightsUnavailableError(offline_message(name, pretrained, url))
    return source


def create_model(name: str, pretrained: str | None, source: WeightSource, init_seed: int = 0, **kwargs):
    """``open_clip.create_model`` with the random initialisation seeded by ``init_seed`` (the caller's RNG is left
    as it was) and open_clip's "no pretrained weights" root-logger warning silenced (apt_lab reports that itself)."""
    downloading = pretrained is not None and source.file is None
    try:
        with torch.random.fork_rng(devices=[]), _quiet_root_logger(pretrained is None):
            torch.manual_seed(init_seed)
            return open_clip.create_model(name, pretrained=source.file or pretrained,
                                          force_quick_gelu=source.quick_gelu, **kwargs)
    except RuntimeError as error:
        if downloading:
            raise WeightsUnavailableError(offline_message(name, pretrained, "the model hub") +
                                          f" (download failed: {str(error)[:200]})") from None
        raise


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
