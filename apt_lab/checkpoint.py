"""Save and load tuned prompts: ``<path>.safetensors`` (tensors) + ``<path>.json`` (everything else).

Only tensors go into the safetensors file (context vectors, deep prompts, meta-prompt embeddings); the JSON
beside it records the configuration, the backbone the prompts were tuned on, categories, seed, apt_lab version
and creation time. Loading uses ``safetensors.torch.load_file`` only — never pickle — so a downloaded prompt
file cannot run code. Prompts are tied to the text tower they were tuned on: loading them onto another
backbone is refused with a message that names both.

Example:
    >>> import tempfile, apt_lab
    >>> backbone = apt_lab.load_backbone("apt-tiny")
    >>> learner = PromptLearner(backbone, PromptConfig(), seed=1)
    >>> folder = tempfile.mkdtemp()
    >>> save_prompts(learner, f"{folder}/brick").name
    'brick.safetensors'
    >>> again = load_prompts(f"{folder}/brick", backbone)
    >>> bool(torch.equal(again.text_features(), learner.text_features()))
    True
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ._version import __version__
from .config import APTConfig, PromptConfig, SMGSConfig, section_from_dict
from .data.files import Folder
from .errors import CorruptFileError
from .prompts import PromptLearner
from .smgs import MetaPrompt

FORMAT = "apt_lab.prompts"
FORMAT_VERSION = 1
_SUFFIXES = (".safetensors", ".json")


def prompt_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """``path`` (with or without ``.safetensors`` / ``.json``) → (tensor file, metadata file)."""
    base = Path(path).expanduser()
    if base.suffix in _SUFFIXES:
        base = base.with_suffix("")
    return base.parent / (base.name + ".safetensors"), base.parent / (base.name + ".json")


def backbone_info(backbone) -> dict[str, Any]:
    """What identifies a text tower for prompts: name, pretrained tag, widths, context length (+ image facts)."""
    return {"name": backbone.name, "pretrained": backbone.pretrained, "embed_dim": int(backbone.embed_dim),
            "text_width": int(backbone.model.token_embedding.weight.shape[1]),
            "context_length": int(backbone.context_length), "image_size": int(backbone.image_size),
            "layers": list(backbone.layers)}


def save_prompts(result_or_learner, path: str | os.PathLike, config: APTConfig | None = None, backbone=None,
                 extra: dict | None = None) -> Path:
    """Write a :class:`~apt_lab.tuning.TuneResult` (prompts + meta-prompt) or a bare PromptLearner.

    Args:
        result_or_learner: what :func:`~apt_lab.tuning.tune_prompts` returned, or a PromptLearner.
        path: base path; ``<path>.safetensors`` and ``<path>.json`` are written (folders are created).
        config: recorded in the JSON; default the result's config.
        backbone: default the learner's own backbone.
        extra: any JSON-serialisable dict stored under ``"extra"`` (metrics, notes, dataset, shot indices).

    Returns:
        The path of the ``.safetensors`` file.
    """
    tensors, text = prompt_bytes(result_or_learner, config, backbone, extra)  # fails before any file is touched
    tensor_file, json_file = prompt_files(path)
    with Folder(tensor_file.parent, create=True, link=True) as folder:  # each file atomically, never through a link
        folder.write(tensor_file.name, tensors)
        folder.write(json_file.name, text)
    return tensor_file


def prompt_bytes(result_or_learner, config: APTConfig | None = None, backbone=None,
                 extra: dict | None = None) -> tuple[bytes, str]:
    """What :func:`save_prompts` writes, as (safetensors bytes, JSON text): a run folder stores them itself."""
    if isinstance(result_or_learner, PromptLearner):
        learner, meta, result_config = result_or_learner, None, None
    elif isinstance(getattr(result_or_learner, "prompts", None), PromptLearner):  # a TuneResult
        learner, meta = result_or_learner.prompts, result_or_learner.meta
        result_config = result_or_learner.config
    else:
        raise TypeError(f"save_prompts: expected a TuneResult or PromptLearner, got {type(result_or_learner).__name__}")
    config = config if config is not None else result_config
    backbone = backbone if backbone is not None else learner.backbone
    tensors = {f"ctx.{i}": p.detach() for i, p in enumerate(learner.ctx)}
    tensors.update({f"deep.{i}": p.detach() for i, p in enumerate(learner.deep)})
    meta_info = None
    if meta is not None:
        tensors["meta.current"], tensors["meta.initial"] = meta.current, meta.initial
        meta_info = {"smgs_config": dataclasses.asdict(meta.config),
                     "best_loss": meta.best_loss if math.isfinite(meta.best_loss) else None, "anchors": meta.anchors}
    tensors = {name: t.detach().float().cpu().contiguous().clone() for name, t in tensors.items()}
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "apt_lab_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backbone": backbone_info(backbone), **learner.state(), "meta": meta_info,
            "config": config.to_dict() if config is not None else None, "extra": extra,
            "tensors": sorted(tensors)}
    return save(tensors, metadata={"format": FORMAT}), json.dumps(info, indent=2)


def read_prompt_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of saved prompts (config, backbone, categories, seed, version, created, extra)."""
    tensor_file, json_file = prompt_files(path)
    missing = [str(f) for f in (tensor_file, json_file) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"saved prompts incomplete: missing {missing}. save_prompts(result, "
                                f"{str(tensor_file.with_suffix(''))!r}) writes both files; copy them together.")
    try:
        info = json.loads(json_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{json_file} is not valid JSON ({err}); the prompt file is corrupt or truncated. "
                               "Copy it again, or re-save the prompts with save_prompts.") from None
    if not isinstance(info, dict):
        raise CorruptFileError(f"{json_file} holds JSON {type(info).__name__}, not an apt_lab prompt record.")
    if info.get("format") != FORMAT:
        raise ValueError(f"{json_file} is not an apt_lab prompt file (format={info.get('format')!r})")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{json_file} has format version {info['format_version']}; this apt_lab reads up to "
                         f"{FORMAT_VERSION}. Upgrade apt_lab (saved by {info.get('apt_lab_version')}).")
    return info


def load_prompts(path: str | os.PathLike, backbone, with_meta: bool = False):
    """Rebuild a PromptLearner on ``backbone`` from :func:`save_prompts` files.

    Args:
        path: base path (or either file's path).
        backbone: must be the text tower the prompts were tuned on (same name, pretrained tag, widths).
        with_meta: also return the saved MetaPrompt (None when the file holds none).

    Returns:
        The learner (eval mode), or ``(learner, meta)`` when ``with_meta``.

    Raises:
        FileNotFoundError: a file is missing (named). ValueError: a different backbone (both sides named).
    """
    tensor_file, json_file = prompt_files(path)
    info = read_prompt_info(path)
    missing = [key for key in ("backbone", "prompt_config") if not isinstance(info.get(key), dict)]
    if missing:
        raise CorruptFileError(f"{json_file} lacks {missing}; the prompt record is incomplete. Copy it again, or "
                               "re-save the prompts with save_prompts.")
    _check_backbone(info["backbone"], backbone_info(backbone), tensor_file)
    try:
        tensors = load_file(str(tensor_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{tensor_file} cannot be read as safetensors ({err}); the file is corrupt or "
                               "truncated. Copy it again, or re-save the prompts with save_prompts.") from None
    prompt_config = section_from_dict(PromptConfig, info["prompt_config"], f"{tensor_file}: prompt_config")
    learner = PromptLearner(backbone, prompt_config, categories=info.get("categories"), seed=info.get("seed", 0))
    expected = {f"ctx.{i}": p for i, p in enumerate(learner.ctx)}
    expected.update({f"deep.{i}": p for i, p in enumerate(learner.deep)})
    with torch.no_grad():
        for name, parameter in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != tuple(parameter.shape):
                found = tuple(tensors[name].shape) if name in tensors else "nothing"
                raise ValueError(f"{tensor_file}: tensor {name!r} should be {tuple(parameter.shape)}, found {found}; "
                                 "the file does not match its JSON (re-save both files together)")
            parameter.copy_(tensors[name].to(parameter))
    learner.eval()
    if not with_meta:
        return learner
    meta = None
    if info.get("meta") is not None and "meta.initial" in tensors:
        if not isinstance(info["meta"], dict) or "smgs_config" not in info["meta"] or "meta.current" not in tensors:
            raise CorruptFileError(f"{json_file}: the meta-prompt record is incomplete (needs meta.smgs_config and "
                                   f"both meta tensors in {tensor_file.name}); re-save the prompts.")
        smgs = section_from_dict(SMGSConfig, info["meta"]["smgs_config"], f"{tensor_file}: smgs_config")
        meta = MetaPrompt(None, smgs, features=tensors["meta.initial"]).to(backbone.device)
        meta.initial.copy_(tensors["meta.initial"].to(meta.initial))  # bit for bit, not normalised once more
        meta.current.copy_(tensors["meta.current"].to(meta.current))
        best = info["meta"].get("best_loss")
        meta.best_loss = math.inf if best is None else float(best)
        meta.anchors = int(info["meta"].get("anchors", 0))
    return learner, meta


def _check_backbone(saved: dict, current: dict, where: Path) -> None:
    keys = ("name", "pretrained", "embed_dim", "text_width", "context_length")
    differ = [k for k in keys if saved.get(k) != current.get(k)]
    if differ:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs given {current.get(k)!r}" for k in differ)
        raise ValueError(f"prompts in {where} were tuned on backbone {saved.get('name')!r} (pretrained="
                         f"{saved.get('pretrained')!r}) but the given backbone is {current.get('name')!r} (pretrained="
                         f"{current.get('pretrained')!r}) — {detail}. Prompts only work on the text tower they were "
                         f"tuned on: load that backbone (apt_lab.load_backbone({saved.get('name')!r}, pretrained="
                         f"{saved.get('pretrained')!r})) or tune new prompts for this one.")
    if saved.get("image_size") != current.get("image_size") or saved.get("layers") != current.get("layers"):
        warnings.warn(f"prompts in {where} were tuned at image_size={saved.get('image_size')}, layers="
                      f"{saved.get('layers')}; this backbone runs image_size={current.get('image_size')}, layers="
                      f"{current.get('layers')}. The prompts load, but scores may differ from the tuned setting.",
                      UserWarning, stacklevel=3)
