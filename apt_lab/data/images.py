"""Reading images and masks from disk, and resizing batches of them.

Conventions (used by every reader in `apt_lab.data`):

- An image becomes ``torch.float32`` of shape ``(3, H, W)`` in ``[0, 1]``, RGB.
  8-bit modes (L, LA, RGB, RGBA, P, CMYK, YCbCr, 1) go through PIL's own conversion and are divided
  by 255; alpha is *dropped*, not composited (anomaly datasets have no meaningful transparency).
  16-bit modes (``I;16``, ``I;16B``, ``I;16L`` and ``I``, which is how PIL opens 16-bit PNG/TIFF)
  are divided by 65535 and replicated to three channels; ``F`` (float) is clipped to ``[0, 1]``.
- A mask becomes ``torch.bool`` of shape ``(H, W)``: a pixel is anomalous when **any colour channel
  is > 0** (alpha ignored). This is the rule of the VisA reference preparation (``mask != 0``; VisA
  masks hold small label values) and is exact for MVTec-style 0/255 masks.
- A corrupt or truncated file raises ``ValueError`` naming the file. Truncated files are detected
  because ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off while reading.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile

if TYPE_CHECKING:  # annotations only: listing a dataset never imports torch
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def is_image_file(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open_fully(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and decode ``path`` completely, turning any PIL failure into a clear ValueError."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, not load half-grey
    try:
        img = Image.open(path)
        try:
            img.load()  # decodes every pixel now; also closes the file (single-frame formats)
        except BaseException:
            img.close()
            raise
        return img
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"Could not read {what} file {path}: {type(err).__name__}: {err}. The file is corrupt "
            f"or truncated; re-download the dataset (or replace this file) and try again."
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only (no pixel decoding)."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Could not read image file {path}: {err}. The file is corrupt; "
                         f"re-download the dataset (or replace this file).") from None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert a PIL image of any mode to float32 RGB ``(3, H, W)`` in [0, 1] (rules: module doc)."""
    import torch

    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64) / 65535.0            # (H, W)
        arr = np.repeat(arr[None], 3, axis=0)                        # (3, H, W)
    elif img.mode == "F":
        arr = np.repeat(np.asarray(img, dtype=np.float64)[None], 3, axis=0)  # (3, H, W)
    else:
        if img.mode in ("P", "PA") or (img.mode == "L" and "transparency" in img.info):
            img = img.convert("RGBA")                                # palette/transparency first
        arr = np.asarray(img.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))  # (3, H, W)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as float32 RGB ``(3, H, W)`` in [0, 1]."""
    return pil_to_tensor(_open_fully(path, "image"))


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a ground-truth mask as bool ``(H, W)``; anomalous where any colour channel is > 0."""
    import torch

    img = _open_fully(path, "mask")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    arr = np.asarray(img)
    if arr.ndim == 3:                                   # (H, W, C): drop alpha, any channel > 0
        n_colour = 3 if arr.shape[2] >= 3 else 1
        arr = arr[..., :n_colour].max(axis=2)
    return torch.from_numpy(np.ascontiguousarray(arr > 0))  # (H, W) bool


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) == 2:
        return (int(size[0]), int(size[1]))
    raise ValueError(f"size must be an int or (height, width); got {size!r}")


def resize_images(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a batch of images: whole image to ``size`` (never cropped), bicubic with antialias.

    Args:
        x: float images ``(B, 3, H, W)`` in [0, 1].
        size: output side (square) or ``(height, width)``.

    Returns:
        float32 ``(B, 3, size, size)``, clamped to [0, 1] (bicubic overshoots at edges).
    """
    import torch.nn.functional as F

    if x.ndim != 4:
        raise ValueError(f"resize_images expects (B, 3, H, W); got shape {tuple(x.shape)}. "
                         f"Add a batch dimension with x[None] for a single image.")
    h, w = _size_hw(size)
    x = x.float()
    if x.shape[-2:] == (h, w):
        return x.clamp(0.0, 1.0)
    out = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)                                        # (B, 3, h, w)


def resize_masks(m: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a batch of boolean masks with nearest neighbour (pixel-centre aligned, never soft).

    Args:
        m: masks ``(B, H, W)``, bool (or 0/1 values).
        size: output side (square) or ``(height, width)``.

    Returns:
        bool ``(B, size, size)``.

    Example:
        >>> import torch
        >>> m = torch.tensor([[[True, False], [False, False]]])
        >>> resize_masks(m, 4).int()[0].tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    """
    import torch.nn.functional as F

    if m.ndim != 3:
        raise ValueError(f"resize_masks expects (B, H, W); got shape {tuple(m.shape)}. "
                         f"Add a batch dimension with m[None] for a single mask.")
    h, w = _size_hw(size)
    if m.shape[-2:] == (h, w):
        return m.bool()
    out = F.interpolate(m[:, None].float(), size=(h, w), mode="nearest-exact")  # (B, 1, h, w)
    return out[:, 0] > 0.5                                            # (B, h, w) bool
