"""Drawing detections (boxes, class names, scores, translucent masks) and image grids.

Shape shorthand:
    D: number of detections
    H, W: image height and width
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from rcnn.core.masks import MASK_THRESHOLD
from rcnn.io.files import atomic_write

__all__ = ["PNG_MARK", "class_colour", "draw_detections", "image_pixels", "is_rcnn_png", "png_info", "save_grid", "save_png",
           "to_pil"]

# Distinct, saturated colours (Kelly's list of maximum contrast), indexed by label.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215), (193, 0, 32), (206, 162, 98),
    (129, 112, 102), (0, 125, 52), (246, 118, 142), (0, 83, 138), (255, 122, 92), (83, 55, 122),
    (255, 142, 0), (179, 40, 81), (244, 200, 0), (127, 24, 13), (147, 170, 0), (89, 51, 21),
    (241, 58, 19), (35, 44, 22),
)  # fmt: skip
MASK_ALPHA = 0.45
# The PNG text chunk that marks a picture as drawn by rcnn: a later run may overwrite such a file
# (rcnn.commands.options.guard_output), never a picture of the user's own that happens to be in the way.
PNG_MARK = ("Software", "rcnn")


def png_info() -> PngImagePlugin.PngInfo:
    """The PNG metadata of every picture rcnn saves (:data:`PNG_MARK`)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(*PNG_MARK)
    return info


def save_png(picture: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``picture`` as a PNG marked as rcnn's (:data:`PNG_MARK`), atomically."""
    return atomic_write(Path(path), lambda tmp: picture.save(tmp, format="PNG", pnginfo=png_info()))


def is_rcnn_png(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG that rcnn saved (it carries :data:`PNG_MARK`)."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(PNG_MARK[0]) == PNG_MARK[1]
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def class_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour used for ``label`` (cycles through 20 colours)."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def image_pixels(image: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` uint8 of an image tensor ``[3, H, W]`` (or ``[1, H, W]``): uint8 as it is, float
    0..1 to 0..255, rounded. The library's one conversion of a model's image back to pixels (what
    selective search, an ONNX graph of uint8 input, calibration and the pictures take)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image tensor must be [3, H, W] or [1, H, W], got {list(image.shape)}")
    image = image.detach()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255.0).round()
    return np.ascontiguousarray(image.to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).cpu().numpy())


def to_pil(image: Any) -> Image.Image:
    """An RGB ``PIL.Image`` from a tensor ``[3, H, W]`` (float 0..1 or uint8), an array ``[H, W, 3]`` or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = image_pixels(image)
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image array must be [H, W, 3], got {list(array.shape)}")
        if array.dtype != np.uint8:
            array = image_pixels(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1))
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def draw_detections(
    image: Any,
    output: Mapping[str, Any],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    *,
    scale: float = 1.0,
    frame: tuple[int, int] | None = None,
) -> Image.Image:
    """Draw ``output`` (``boxes [D, 4]``, ``labels [D]``, optional ``scores [D]`` and ``masks``
    ``[D, 1, H, W]`` / ``[D, H, W]``) on ``image``; return a new RGB ``PIL.Image``.

    Detections scoring below ``score_threshold`` are skipped; a ground-truth target (no
    ``scores``) is drawn whole. Masks are blended at 45% opacity in the class colour, boxes
    outlined, and each box labelled ``"name score"``. ``scale`` enlarges the picture first
    (nearest neighbour), which keeps the labels legible on small images. ``frame``: the ``(H, W)``
    whose pixels ``output`` is in when not the image's own (a predictor's detections are in the
    original's pixels; the picture may be the image as decoded, smaller): boxes are scaled and
    masks resampled (nearest) to the image.
    """
    canvas = to_pil(image)
    width, height = canvas.size
    boxes = _numpy(output["boxes"]).reshape(-1, 4).astype(np.float64)  # [D, 4]
    if frame is not None and tuple(frame) != (height, width):
        boxes = boxes * np.array([width / frame[1], height / frame[0]] * 2)
    labels = _numpy(output["labels"]).reshape(-1).astype(np.int64)  # [D]
    scores = _numpy(output["scores"]).reshape(-1) if output.get("scores") is not None else None  # [D]
    keep = np.ones(len(labels), dtype=bool) if scores is None else scores >= score_threshold
    order = np.flatnonzero(keep)
    if scores is not None:
        order = order[np.argsort(scores[order], kind="stable")]  # best drawn last, on top
    pixels = np.asarray(canvas, dtype=np.float32)  # [H, W, 3]
    if output.get("masks") is not None and len(order):
        masks = output["masks"]
        if frame is not None and tuple(masks.shape[-2:]) != (height, width):  # only the drawn ones, resampled
            chosen = torch.as_tensor(masks)[torch.as_tensor(order)].reshape(len(order), 1, *masks.shape[-2:])
            resampled = torch.nn.functional.interpolate(chosen.float(), size=(height, width), mode="nearest")
            masks = np.zeros((len(labels), height, width), dtype=np.float32 if chosen.is_floating_point() else np.uint8)
            masks[order] = resampled[:, 0].numpy().astype(masks.dtype)
        masks = _numpy(masks)
        masks = masks.reshape(masks.shape[0], *masks.shape[-2:])  # [D, H, W]
        if masks.shape[-2:] != (height, width):
            raise ValueError(f"masks are {masks.shape[-2]}x{masks.shape[-1]} but the image is {height}x{width}")
        binary = masks >= MASK_THRESHOLD if masks.dtype.kind == "f" else masks > 0
        for d in order:
            colour = np.array(class_colour(labels[d]), dtype=np.float32)
            region = binary[d]
            pixels[region] = (1 - MASK_ALPHA) * pixels[region] + MASK_ALPHA * colour
    canvas = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    if scale != 1.0:  # every side at least 1 px: a 10000 x 10 image drawn 420 px wide is 420 x 1
        canvas = canvas.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = max(1, round(min(canvas.size) / 200))
    for d in order:
        colour = class_colour(labels[d])
        x1, y1, x2, y2 = (boxes[d] * scale).tolist()
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
        name = class_names[labels[d]] if 0 <= labels[d] < len(class_names) else f"label {labels[d]}"
        text = name if scores is None else f"{name} {scores[d]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left + 2, bottom - top + 2
        ty = y1 - text_h if y1 - text_h >= 0 else y1  # above the box, or inside at the top edge
        tx = min(max(x1, 0), max(canvas.size[0] - text_w, 0))
        draw.rectangle((tx, ty, tx + text_w, ty + text_h), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return canvas


def save_grid(
    images: Sequence[Any],
    path: str | os.PathLike,
    ncols: int = 4,
    *,
    pad: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Path:
    """Tile ``images`` (PIL images or tensors ``[3, H, W]``) in rows of ``ncols`` and save them.

    Cells are as large as the largest image; the file (format from its suffix, e.g. ``.png``)
    is written atomically. Returns the path.
    """
    if not images:
        raise ValueError("save_grid: no images to save")
    if ncols < 1:
        raise ValueError(f"save_grid: ncols must be >= 1, got {ncols}")
    tiles = [to_pil(image) for image in images]
    cell_w = max(t.size[0] for t in tiles)
    cell_h = max(t.size[1] for t in tiles)
    ncols = min(ncols, len(tiles))
    nrows = -(-len(tiles) // ncols)
    grid = Image.new("RGB", (ncols * cell_w + (ncols + 1) * pad, nrows * cell_h + (nrows + 1) * pad), background)
    for k, tile in enumerate(tiles):
        row, col = divmod(k, ncols)
        grid.paste(tile, (pad + col * (cell_w + pad), pad + row * (cell_h + pad)))
    path = Path(path)
    file_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    extra = {"pnginfo": png_info()} if file_format == "PNG" else {}
    return atomic_write(path, lambda tmp: grid.save(tmp, format=file_format, **extra))
