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
- An image above :data:`MAX_IMAGE_PIXELS` (width × height) is refused from its header, before any pixel is decoded,
  with an `~apt_lab.errors.ImageTooLargeError` that says how to raise the limit.
- ``read_image(path, size=...)`` (what `Split.images` uses) first shrinks a very large image by an integer factor
  with PIL (JPEG: decoded at 1/2, 1/4 or 1/8 scale; others: a box average, in 8 bits), as long as the result stays at
  least :data:`REDUCING_GAP` times the target size; the exact antialiased bicubic resize then runs on that. Images
  below ``2 · REDUCING_GAP`` times the target (every benchmark at its usual sizes) are read exactly as before.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile

from ..errors import ImageTooLargeError

if TYPE_CHECKING:  # annotations only: listing a dataset never imports torch
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
MAX_IMAGE_PIXELS = 100_000_000  # decoding limit, width × height; set it (or --max-image-pixels) for larger images
REDUCING_GAP = 4  # a large image is pre-shrunk by an integer factor only while it stays ≥ this × the target size


def is_image_file(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _check_pixels(img: Image.Image, path, what: str, max_pixels: int | None) -> None:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    w, h = img.size
    if limit and w * h > limit:
        raise ImageTooLargeError(
            f"{what} file {path} is {w}x{h} = {w * h / 1e6:.1f} megapixels, above the decoding limit of "
            f"{limit / 1e6:.1f} megapixels (decoding it would take about {w * h * 3 / 2**30:.1f} GiB). Downscale the "
            f"file, or raise the limit: apt_lab.data.images.MAX_IMAGE_PIXELS = {w * h} (command line: "
            f"--max-image-pixels {w * h}).")


def _reduction(size_wh: tuple[int, int], target_hw: tuple[int, int] | None) -> int:
    """The integer shrink factor that keeps an image ≥ REDUCING_GAP × the target; 1 = read at full size.

    Example:
        >>> _reduction((8000, 6000), (224, 224)), _reduction((1024, 1024), (224, 224))
        (6, 1)
    """
    if target_hw is None:
        return 1
    ratio = min(size_wh[0] / target_hw[1], size_wh[1] / target_hw[0])
    return max(1, math.floor(ratio / REDUCING_GAP))


def _open_fully(path: str | os.PathLike, what: str, max_pixels: int | None = None,
                target_hw: tuple[int, int] | None = None) -> Image.Image:
    """Open and decode ``path`` completely, turning any PIL failure into a clear ValueError.

    The pixel limit is checked from the header before decoding; with ``target_hw`` a JPEG is decoded at a reduced
    scale when that still leaves ≥ REDUCING_GAP × the target (see the module doc)."""
    try:
        with _pil_settings():
            img = Image.open(path)
            try:
                _check_pixels(img, path, what, max_pixels)
                if img.format == "JPEG" and _reduction(img.size, target_hw) > 1:
                    th, tw = target_hw
                    img.draft(img.mode, (tw * REDUCING_GAP, th * REDUCING_GAP))  # DCT scaling, never below the request
                img.load()  # decodes every pixel now; also closes the file (single-frame formats)
            except BaseException:
                img.close()
                raise
        return img
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except ImageTooLargeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"Could not read {what} file {path}: {type(err).__name__}: {err}. The file is corrupt "
            f"or truncated; re-download the dataset (or replace this file) and try again."
        ) from None


@contextlib.contextmanager
def _pil_settings():
    """PIL as apt_lab reads: truncated files fail (never half-grey), and apt_lab's own pixel limit replaces PIL's
    warning and its 2× hard stop (restored afterwards)."""
    previous, previous_limit = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = previous, previous_limit


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only (no pixel decoding)."""
    try:
        with _pil_settings(), Image.open(path) as img:
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
    else:  # 8 bits: float32 division gives exactly the float64 quotient rounded to float32, without its copy
        arr = np.asarray(_as_rgb(img)).transpose(2, 0, 1).astype(np.float32)  # (3, H, W)
        return torch.from_numpy(np.divide(arr, np.float32(255.0), out=arr))
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))  # (3, H, W)


def _as_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("P", "PA") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")                                    # palette/transparency first
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy of an RGB image


def read_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None,
               max_pixels: int | None = None) -> torch.Tensor:
    """Read an image file as float32 RGB ``(3, H, W)`` in [0, 1]; with ``size``, resized to it.

    Args:
        size: None = full resolution; an int or (height, width) = the whole image resized to it (antialiased
            bicubic, never cropped), after PIL's integer pre-shrink of very large images (module doc).
        max_pixels: decoding limit; None = :data:`MAX_IMAGE_PIXELS`.

    Raises:
        ImageTooLargeError: width × height above the limit (checked before decoding).
    """
    target = None if size is None else _size_hw(size)
    img = _open_fully(path, "image", max_pixels, target)
    factor = _reduction(img.size, target)
    if factor > 1:  # in PIL's own modes: 8-bit images stay 8-bit, 16-bit ones become 32-bit integers
        img = (img.convert("I") if img.mode in _SIXTEEN_BIT_MODES else
               img if img.mode == "F" else _as_rgb(img)).reduce(factor)
    image = pil_to_tensor(img)  # (3, h, w)
    return image if target is None else resize_images(image[None], target)[0]


def read_mask(path: str | os.PathLike, max_pixels: int | None = None) -> torch.Tensor:
    """Read a ground-truth mask as bool ``(H, W)``; anomalous where any colour channel is > 0."""
    import torch

    img = _open_fully(path, "mask", max_pixels)
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
