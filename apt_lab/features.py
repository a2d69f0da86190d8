"""Encode once: a dataset's image features, computed once per backbone and resolution, reused by every run.

A sweep scores the same test images for every shot count, seed and method, and the nested few-shot draws
(k = 1 ⊂ 2 ⊂ 4) share their shots. A :class:`FeatureStore` encodes an image the first time it is asked for and
hands back the same features afterwards: in memory for the life of the store (one category of a sweep), and
optionally on disk (``cache_dir``). A disk file holds the features of one request (a test split, a few shots);
its name is a hash of the image files' bytes and of the backbone's :meth:`~apt_lab.backbone.Backbone.signature`
(architecture, weights fingerprint, input size, tapped blocks, precision) and the locality radius, so other
images or weights never read it, deleting it only costs a re-encode, and a damaged file (checksum, shapes) is
announced and rebuilt.

Example:
    >>> import apt_lab
    >>> b = apt_lab.load_backbone("apt-tiny")
    >>> store = FeatureStore(b)
    >>> data = apt_lab.data.load_dataset("demo", category="brick")
    >>> first = store.features(data.train, [0, 1])
    >>> again = store.features(data.train, [1, 0, 1])   # already encoded: no encoder pass
    >>> b.images_encoded, tuple(again.cls.shape), bool(torch.equal(again.cls[1], first.cls[0]))
    (2, (3, 128), True)
"""
from __future__ import annotations

import hashlib
import json
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import torch

from .backbone import Backbone, ImageFeatures
from .data.files import Folder
from .data.readers import file_digest

FORMAT = "apt_lab.features/1"


class FeatureStore:
    """Features (and decoded pixels) of a dataset's images, encoded once. Build one per category of a sweep.

    Args:
        backbone: the frozen backbone every feature comes from.
        batch_size: images per encoder pass.
        cache_dir: a folder for the on-disk cache; None keeps features in memory only.

    Attributes:
        encoded: images this store sent through the encoder; ``loaded``: images it read from the disk cache.
    """

    def __init__(self, backbone: Backbone, batch_size: int = 16, cache_dir: str | Path | None = None):
        self.backbone, self.batch_size = backbone, max(1, int(batch_size))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.encoded = self.loaded = 0
        self._features: dict[tuple[str, int], tuple[ImageFeatures, int]] = {}  # (path, radius) → (batch, row)
        self._pixels: dict[str, torch.Tensor] = {}  # path → (3, S, S) on the CPU
        self._signature: dict | None = None

    def __repr__(self) -> str:
        return (f"FeatureStore({len(self._features)} images, encoded {self.encoded}, loaded {self.loaded}, "
                f"cache_dir={self.cache_dir})")

    # ------------------------------------------------------------------------------------------------ pixels
    def images(self, split, indices: Sequence[int] | None = None) -> torch.Tensor:
        """(B, 3, S, S) pixels of ``split`` at the backbone's input size, on the CPU; each image decoded once."""
        paths = _paths(split, indices)
        missing = [i for i, p in zip(_indices(split, indices), paths) if p not in self._pixels]
        if missing:
            for index, pixels in zip(missing, split.images(self.backbone.image_size, missing)):
                self._pixels[split.paths[index]] = pixels
        return torch.stack([self._pixels[p] for p in paths])  # (B, 3, S, S)

    # ---------------------------------------------------------------------------------------------- features
    def features(self, split, indices: Sequence[int] | None = None, locality_radius: int = 0) -> ImageFeatures:
        """Features of ``split[indices]`` (all of it for None), on the backbone's device, in request order.

        Images not seen before are encoded together (or read from ``cache_dir``); the rest cost nothing.
        """
        paths = _paths(split, indices)
        wanted = list(dict.fromkeys(p for p in paths if (p, locality_radius) not in self._features))
        if wanted:
            index = {p: i for i, p in enumerate(split.paths)}
            batch = self._load_or_encode(split, [index[p] for p in wanted], wanted, locality_radius)
            for row, path in enumerate(wanted):
                self._features[(path, locality_radius)] = (batch, row)
        entries = [self._features[(p, locality_radius)] for p in paths]
        first = entries[0][0]
        rows = [row for _, row in entries]
        if all(batch is first for batch, _ in entries) and rows == list(range(rows[0], rows[0] + len(rows))):
            return first[rows[0]:rows[0] + len(rows)]  # one contiguous run of one batch: a view, no copy
        return ImageFeatures.cat([batch[row:row + 1] for batch, row in entries])

    def _load_or_encode(self, split, indices: list[int], paths: list[str], radius: int) -> ImageFeatures:
        key = self._cache_key(paths, radius) if self.cache_dir is not None else None
        file = self.cache_dir / f"{key[:32]}.safetensors" if key is not None else None
        if file is not None and file.is_file():
            features = self._read(file, key, len(paths), radius)
            if features is not None:
                self.loaded += len(paths)
                return features
        pixels = self.images(split, indices)  # (B, 3, S, S)
        features = self.backbone.encode_batched(pixels, self.batch_size, locality_radius=radius)
        self.encoded += len(paths)
        if file is not None:
            self._write(file, key, features, paths)
        return features

    # ----------------------------------------------------------------------------------------------- on disk
    def signature(self) -> dict:
        if self._signature is None:
            self._signature = self.backbone.signature()
        return self._signature

    def _cache_key(self, paths: list[str], radius: int) -> str:
        """What the features depend on, hashed: backbone signature, radius, every image's bytes (in order). The
        file is named by it and carries it inside, so a file copied or renamed over another is caught on load."""
        digest = hashlib.sha256(json.dumps({"format": FORMAT, "backbone": self.signature(), "radius": radius},
                                           sort_keys=True).encode())
        for path in paths:
            digest.update(file_digest(path))  # the image's content, not its name
        return digest.hexdigest()

    def _write(self, file: Path, key: str, features: ImageFeatures, paths: list[str]) -> None:
        from safetensors.torch import save

        tensors = {"cls": features.cls.detach().cpu().contiguous(),
                   "patches": features.patches.detach().cpu().contiguous()}
        metadata = {"format": FORMAT, "key": key, "grid": json.dumps(list(features.grid)), "count": str(len(paths)),
                    "checksum": str(_checksum(tensors)), "backbone": json.dumps(self.signature())}
        with Folder(file.parent, create=True, link=True) as folder:
            folder.write(file.name, save(tensors, metadata))

    def _read(self, file: Path, key: str, count: int, radius: int) -> ImageFeatures | None:
        """The cached features, or None (with a warning) when the file is damaged or does not fit."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in ("cls", "patches")}
            if meta.get("key") != key:
                raise ValueError("its key is not this request's (a file of other images, weights or settings was "
                                 "copied or renamed over it)")
            grid = tuple(json.loads(meta["grid"]))
            fits = (meta.get("format") == FORMAT and int(meta["count"]) == count == tensors["cls"].shape[0]
                    and tensors["patches"].shape[1] == count and grid == tuple(self.backbone.grid))
            if fits and int(meta["checksum"]) == _checksum(tensors):
                return ImageFeatures(tensors["cls"], tensors["patches"], grid, radius).to(self.backbone.device)
            problem = "its checksum or shapes do not match"
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            problem = f"it cannot be read ({type(error).__name__}: {error})"
        warnings.warn(f"feature cache {file}: {problem}; re-encoding and rewriting it", RuntimeWarning, stacklevel=4)
        return None


def _checksum(tensors: dict[str, torch.Tensor]) -> int:
    """CRC-32 over the tensors' bytes (in key order)."""
    value = 0
    for key in sorted(tensors):
        value = zlib.crc32(tensors[key].contiguous().view(torch.uint8).cpu().numpy(), value)
    return value


def _indices(split, indices) -> list[int]:
    return list(range(len(split))) if indices is None else [int(i) for i in indices]


def _paths(split, indices) -> list[str]:
    paths = split.paths
    chosen = _indices(split, indices)
    if not chosen:
        raise ValueError(f"no images requested from {split!r}; pass at least one index")
    bad = [i for i in chosen if not 0 <= i < len(paths)]
    if bad:
        raise IndexError(f"indices {bad[:5]} out of range for {split!r}")
    return [paths[i] for i in chosen]
