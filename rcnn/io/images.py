"""Reading image files: one function for every place the library reads an image.

:func:`load_image` returns a float32 RGB tensor ``[3, H, W]`` in 0..1; grayscale, palette, RGBA
(alpha discarded), CMYK and 16-bit images are converted. Errors name the file.

**EXIF orientation is applied** (the one rule of the library, see docs/data.md): annotation tools
(LabelImg, LabelMe, CVAT, VIA) and browsers show a JPEG turned by its EXIF ``Orientation`` tag,
so the boxes drawn on it refer to the displayed, turned image. :func:`load_image` returns those
pixels (the transposition of ``PIL.ImageOps.exif_transpose``) and :func:`image_size` their size,
from the header alone. Every reader, ``rcnn predict`` and the server go through these two.

Shape shorthand:
    H, W: image height and width (after EXIF orientation)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["EXIF_ORIENTATIONS", "exif_orientation", "image_size", "load_image"]

_ORIENTATION_TAG = 0x0112
# EXIF Orientation -> the transposition that shows the image upright (PIL.ImageOps.exif_transpose's table).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# What each orientation does to the stored pixels when shown, for messages.
EXIF_ORIENTATIONS = {
    1: "upright",
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped upside down",
    5: "mirrored and rotated 90°",
    6: "rotated 90°",
    7: "mirrored and rotated 270°",
    8: "rotated 270°",
}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image, from its header; 1 when absent or invalid.

    A PNG's ``eXIf`` chunk counts only when it precedes the pixel data: PIL would otherwise decode
    the whole image to look for it, and :func:`image_size` must stay header-only (and agree with
    :func:`load_image`).
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block: show the image as stored, as browsers do
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


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


def _open_image(path: Path, decode: bool) -> tuple[Image.Image, int]:
    """Open an image file and read its EXIF orientation, decoding every pixel when ``decode``.

    Returns ``(image, orientation)``; the image is as stored (not yet turned). Without ``decode``
    only the header is read: the returned (closed) image has a valid ``size`` and ``mode`` but no
    pixels. Errors name the file.
    """
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)
            if not decode:
                return img, orientation
            img.load()
            return img.copy(), orientation
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot decode the image ({exc}); re-save or remove it") from None


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as a float32 tensor ``[3, H, W]`` in 0..1, RGB, turned upright.

    Grayscale, palette, RGBA (alpha discarded), CMYK and 16-bit images are converted. The EXIF
    orientation is applied, as annotation tools apply it when they show the image (module
    docstring). Raises ``FileNotFoundError`` / ``ValueError`` naming the file.
    """
    path = Path(path)
    img, orientation = _open_image(path, decode=True)
    if orientation != 1:
        img = img.transpose(_TRANSPOSE[orientation])
    array = _to_rgb(img, path)  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # [3, H, W]


def image_size(path: str | os.PathLike, decode: bool = False) -> tuple[int, int]:
    """``(height, width)`` of an image file as :func:`load_image` returns it (EXIF orientation
    applied: orientations 5 to 8 swap the stored width and height); from the header alone unless
    ``decode``.

    ``decode=True`` reads every pixel, which also finds truncated or corrupt files.
    """
    image, orientation = _open_image(Path(path), decode)
    if orientation >= 5:
        return image.width, image.height
    return image.height, image.width


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag (1..8) of an image file, from its header; 1 when it has none."""
    return _open_image(Path(path), decode=False)[1]
