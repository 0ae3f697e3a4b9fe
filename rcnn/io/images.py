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

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["EXIF_ORIENTATIONS", "MAX_PIXELS", "DecodedImage", "as_float", "exif_orientation", "image_size", "load_image", "read_image"]

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


MAX_PIXELS = 180_000_000
"""The default bound on an image's pixel count (width x height, from its header), checked before a
pixel is decoded: a 12000 x 12000 photograph (144 MP) is read, a decompression bomb is refused.
Every reader takes ``max_pixels`` to change it; ``None`` lifts it."""

# Modes that Image.reduce() cannot shrink directly: converted first (8-bit RGB, or 32-bit gray).
_REDUCE_AS = {"1": "L", "P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB",
              "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}  # fmt: skip


def _check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{path}: {width}x{height} image ({width * height:,} pixels) exceeds the limit of {max_pixels:,} "
            "pixels; raise it (max_pixels, rcnn predict --max-pixels) if the file is genuine"
        )


def _open_image(path: Path, decode: bool, max_pixels: int | None = MAX_PIXELS) -> tuple[Image.Image, int]:
    """Open an image file and read its EXIF orientation, decoding every pixel when ``decode``.

    Returns ``(image, orientation)``; the image is as stored (not yet turned). Without ``decode``
    only the header is read: the returned (closed) image has a valid ``size`` and ``mode`` but no
    pixels. Errors name the file.
    """
    with _opened(path, max_pixels) as (img, orientation):
        if not decode:
            return img, orientation
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{path}: cannot decode the image ({exc}); re-save or remove it") from None
        return img.copy(), orientation


@contextlib.contextmanager
def _opened(path: Path, max_pixels: int | None) -> Iterator[tuple[Image.Image, int]]:
    """The opened (not yet decoded) image and its EXIF orientation, its pixel count checked."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        # PIL refuses more than twice its own bound while opening; the library's bound is the one
        # that counts (raised, never lowered, so that concurrent readers see a consistent value)
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot decode the image ({exc}); re-save or remove it") from None
    with img:
        _check_pixels(path, img.width, img.height, max_pixels)
        yield img, _orientation(img)


@dataclass(frozen=True)
class DecodedImage:
    """An image as read for a model: ``image [3, h, w]`` and the size ``(H, W)`` of the full-resolution
    image it was read from (EXIF orientation applied to both). ``h, w`` are smaller than ``H, W``
    when the file was decoded reduced (:func:`read_image`'s ``fit``)."""

    image: Tensor  # [3, h, w]
    original_size: tuple[int, int]  # (H, W)

    @property
    def scale(self) -> tuple[float, float]:
        """``(h / H, w / W)``: multiply original coordinates by it to get this image's."""
        return self.image.shape[1] / self.original_size[0], self.image.shape[2] / self.original_size[1]


def _reduce_factor(width: int, height: int, fit: tuple[int, int] | None) -> float:
    """How much smaller than the stored image the model will look at (>= 1): the inverse of the
    scale of the model's resize rule (shorter side to ``min_size``, the longer at most ``max_size``,
    as :func:`rcnn.core.images.resized_shape`); 1 without ``fit`` or when the model enlarges."""
    if fit is None:
        return 1.0
    min_size, max_size = fit
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return 1.0 / scale if scale < 1.0 else 1.0


def read_image(
    path: str | os.PathLike,
    *,
    fit: tuple[int, int] | None = None,
    max_pixels: int | None = MAX_PIXELS,
    dtype: torch.dtype = torch.float32,
) -> DecodedImage:
    """Read an image file for a model whose resize rule is ``fit = (min_size, max_size)``.

    The pixel count is checked against ``max_pixels`` from the header, before anything is decoded.
    When the model would shrink the image, it is shrunk while it is decoded, by the largest whole
    factor that keeps it at least as large as the model's input (so the model's own resize still
    sets the final size): JPEGs are decoded at 1/2, 1/4 or 1/8 scale by the decoder itself
    (``PIL.Image.draft``), and the rest is averaged down in blocks (``Image.reduce``) on the 8-bit
    pixels, so a float copy exists only at about the model's input size. Without ``fit`` the image
    is read whole, as :func:`load_image`.

    ``dtype`` ``torch.float32`` gives values in 0..1, ``torch.uint8`` 0..255 (a quarter of the
    memory: for images kept whole at full resolution, e.g. to be cut into tiles).
    """
    path = Path(path)
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"read_image: dtype must be torch.float32 or torch.uint8, got {dtype}")
    with _opened(path, max_pixels) as (img, orientation):
        original = (img.height, img.width)
        factor = _reduce_factor(img.width, img.height, fit)
        try:
            if factor >= 2 and img.format == "JPEG":
                # the decoder picks 1/8, 1/4 or 1/2, never below the requested size
                img.draft(img.mode if img.mode in ("RGB", "L") else None,
                          (math.ceil(img.width / factor), math.ceil(img.height / factor)))  # fmt: skip
            img.load()
            remaining = int(img.width / (original[1] / factor) + 1e-9)  # whole factor still to apply
            if remaining >= 2:
                if img.mode in _REDUCE_AS:
                    img = img.convert(_REDUCE_AS[img.mode])
                img = img.reduce(remaining)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{path}: cannot decode the image ({exc}); re-save or remove it") from None
        if orientation != 1:
            img = img.transpose(_TRANSPOSE[orientation])
        if orientation >= 5:
            original = original[::-1]
        if dtype == torch.uint8 and img.mode in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1", "PA"):
            array = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # [h, w, 3] uint8
        else:
            array = _to_rgb(img, path)  # [h, w, 3] float32 in 0..1
            if dtype == torch.uint8:
                array = (array * 255.0).round().astype(np.uint8)
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # [3, h, w]
    return DecodedImage(tensor, original)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> Tensor:
    """Read an image file as a float32 tensor ``[3, H, W]`` in 0..1, RGB, turned upright.

    Grayscale, palette, RGBA (alpha discarded), CMYK and 16-bit images are converted. The EXIF
    orientation is applied, as annotation tools apply it when they show the image (module
    docstring). Images of more than ``max_pixels`` pixels are refused from their header. Raises
    ``FileNotFoundError`` / ``ValueError`` naming the file.
    """
    return read_image(path, max_pixels=max_pixels).image


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


def as_float(image: Tensor) -> Tensor:
    """A float image in 0..1 from a uint8 one (0..255); a float image as it is."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image
