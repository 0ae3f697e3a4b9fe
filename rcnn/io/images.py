"""Reading image files: one function for every place the library reads an image.

:func:`load_image` returns a float32 RGB tensor ``[3, H, W]`` in 0..1; grayscale, palette, RGBA
(alpha discarded), CMYK and 16-bit images are converted. Errors name the file.

Shape shorthand:
    H, W: image height and width
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["image_size", "load_image"]


def _to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """``[H, W, 3]`` float32 RGB in 0..1 from any PIL mode we accept."""
    if img.mode.startswith("I;16") or img.mode == "I":
        gray = np.asarray(img, dtype=np.float64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise ValueError(
                f"{path}: 32-bit integer image with values outside 0..65535; convert it to 8 or 16 bit"
            )
        gray = (gray / 65535.0).astype(np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise ValueError(f"{path}: floating-point images (PIL mode F) are not supported; convert to 8 or 16 bit")
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, YCbCr, 1
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _open_image(path: Path, decode: bool) -> Image.Image:
    """Open an image file, decoding every pixel when ``decode``; errors name the file.

    Without ``decode`` only the header is read: the returned (closed) image has a valid
    ``size`` and ``mode`` but no pixels.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            if not decode:
                return img
            img.load()
            return img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot decode the image ({exc}); re-save or remove it") from None


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as a float32 tensor ``[3, H, W]`` in 0..1, RGB.

    Grayscale, palette, RGBA (alpha discarded), CMYK and 16-bit images are converted.
    EXIF orientation is *not* applied: annotations refer to the stored pixel grid, as in COCO.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file.
    """
    path = Path(path)
    array = _to_rgb(_open_image(path, decode=True), path)  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # [3, H, W]


def image_size(path: str | os.PathLike, decode: bool = False) -> tuple[int, int]:
    """``(height, width)`` of an image file; from the header alone unless ``decode``.

    ``decode=True`` reads every pixel, which also finds truncated or corrupt files.
    """
    image = _open_image(Path(path), decode)
    return image.height, image.width
