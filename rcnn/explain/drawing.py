"""The pictures of an explanation: boxes, heat maps, grids and tiles, drawn with PIL.

Every picture is drawn on a :class:`View`: an image (the model's input, in its own pixel frame)
enlarged so that small images stay legible, with helpers that take boxes in that frame.

Shape shorthand:
    B: boxes;  H, W: image size;  h, w: a feature map's size
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from rcnn.viz import class_colour, to_pil

__all__ = ["View", "blend", "colour_of", "heat_map", "label_tile", "side_by_side", "text_label", "tile_row", "upscale"]

FONT = ImageFont.load_default()
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
GREEN, RED, ORANGE, CYAN, YELLOW = (40, 200, 70), (230, 40, 40), (255, 150, 0), (0, 200, 230), (255, 230, 0)


class View:
    """An image ``[3, H, W]`` (0..1) drawn at ``scale``, with its own pixel frame for boxes.

    ``target`` is the longer side the picture gets (small images are enlarged, large ones shrunk).
    """

    def __init__(self, image: Tensor | Image.Image, target: int = 420) -> None:
        base = to_pil(image)
        self.size = base.size  # (W, H) of the frame the boxes refer to
        self.scale = target / max(base.size)
        shown = (max(1, round(base.size[0] * self.scale)), max(1, round(base.size[1] * self.scale)))
        self.base = base.resize(shown, Image.BILINEAR if self.scale < 1 else Image.NEAREST)

    def canvas(self, dim: float = 0.0) -> Image.Image:
        """A copy of the image to draw on, darkened by ``dim`` (0..1) so that drawings stand out."""
        image = self.base.copy()
        if dim > 0:
            image = Image.blend(image, Image.new("RGB", image.size, BLACK), dim)
        return image

    def xy(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A box of the frame in the picture's pixels."""
        x1, y1, x2, y2 = (float(v) * self.scale for v in box)
        return x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)

    def boxes(
        self,
        picture: Image.Image,
        boxes: Tensor | Sequence[Sequence[float]],
        colours: Sequence[tuple[int, int, int]] | tuple[int, int, int],
        width: int = 2,
        texts: Sequence[str] | None = None,
        dashed: bool = False,
    ) -> Image.Image:
        """Outline ``boxes [B, 4]`` on ``picture`` (one colour or one per box), with optional labels."""
        draw = ImageDraw.Draw(picture)
        rows = boxes.tolist() if isinstance(boxes, Tensor) else [list(b) for b in boxes]
        for i, box in enumerate(rows):
            colour = colours[i] if isinstance(colours, list) else colours  # type: ignore[index]
            x1, y1, x2, y2 = self.xy(box)
            if dashed:
                _dashed_rectangle(draw, (x1, y1, x2, y2), colour, width)
            else:
                draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            if texts is not None and texts[i]:
                text_label(draw, (x1, y1), texts[i], colour)
        return picture

    def grid(self, picture: Image.Image, stride: float, colour: tuple[int, int, int] = GREY, box: Sequence[float] | None = None) -> None:
        """Feature-cell boundaries (every ``stride`` frame pixels), within ``box`` if given."""
        draw = ImageDraw.Draw(picture)
        width, height = self.size
        x_lo, y_lo, x_hi, y_hi = box if box is not None else (0, 0, width, height)
        for k in range(int(x_lo // stride), int(np.ceil(x_hi / stride)) + 1):
            x = k * stride * self.scale
            draw.line((x, y_lo * self.scale, x, y_hi * self.scale), fill=colour, width=1)
        for k in range(int(y_lo // stride), int(np.ceil(y_hi / stride)) + 1):
            y = k * stride * self.scale
            draw.line((x_lo * self.scale, y, x_hi * self.scale, y), fill=colour, width=1)

    def points(self, picture: Image.Image, xy: Tensor, colour: tuple[int, int, int], radius: float = 2.0) -> None:
        """Dots at ``xy [B, 2]`` (frame pixels)."""
        draw = ImageDraw.Draw(picture)
        for x, y in (xy * self.scale).tolist():
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)

    def lines(self, picture: Image.Image, starts: Tensor, ends: Tensor, colour: tuple[int, int, int]) -> None:
        """Segments from ``starts [B, 2]`` to ``ends [B, 2]`` (frame pixels)."""
        draw = ImageDraw.Draw(picture)
        for (x1, y1), (x2, y2) in zip((starts * self.scale).tolist(), (ends * self.scale).tolist()):
            draw.line((x1, y1, x2, y2), fill=colour, width=2)
            draw.ellipse((x2 - 3, y2 - 3, x2 + 3, y2 + 3), fill=colour)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], colour, width: int) -> None:
    x1, y1, x2, y2 = box
    dash = 6
    for start, stop, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True), (y1, y2, x1, False), (y1, y2, x2, False)):
        t = start
        while t < stop:
            end = min(t + dash, stop)
            segment = (t, fixed, end, fixed) if horizontal else (fixed, t, fixed, end)
            draw.line(segment, fill=colour, width=width)
            t += 2 * dash


def text_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int]) -> None:
    """A filled label with ``text`` just above ``xy`` (or below it at the top edge)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=FONT)
    w, h = right - left + 4, bottom - top + 4
    x, y = xy
    y = y - h if y - h >= 0 else y
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + 2 - left, y + 2 - top), text, fill=BLACK if luminance > 140 else WHITE, font=FONT)


def heat_map(values: Tensor, size: tuple[int, int], colormap: str = "magma", lo: float | None = None, hi: float | None = None) -> Image.Image:
    """``values [h, w]`` as a colour picture of ``size (W, H)`` (nearest: one block per cell)."""
    array = values.detach().float().cpu().numpy()
    lo = float(array.min()) if lo is None else lo
    hi = float(array.max()) if hi is None else hi
    scaled = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    rgb = (colormaps[colormap](np.clip(scaled, 0, 1))[..., :3] * 255).round().astype(np.uint8)
    return Image.fromarray(rgb, "RGB").resize(size, Image.NEAREST)


def label_tile(image: Image.Image, text: str, width: int | None = None) -> Image.Image:
    """``image`` with a line of ``text`` under it (on white)."""
    width = max(width or image.size[0], image.size[0])
    tile = Image.new("RGB", (width, image.size[1] + 16), WHITE)
    tile.paste(image, ((width - image.size[0]) // 2, 0))
    ImageDraw.Draw(tile).text((4, image.size[1] + 2), text, fill=BLACK, font=FONT)
    return tile


def side_by_side(images: Sequence[Image.Image], pad: int = 8) -> Image.Image:
    """Pictures in one row, top-aligned, on white."""
    width = sum(im.size[0] for im in images) + pad * (len(images) + 1)
    height = max(im.size[1] for im in images) + 2 * pad
    row = Image.new("RGB", (width, height), WHITE)
    x = pad
    for im in images:
        row.paste(im, (x, pad))
        x += im.size[0] + pad
    return row


def tile_row(rows: Sequence[Sequence[Image.Image]], pad: int = 6) -> Image.Image:
    """Rows of pictures stacked vertically (each row :func:`side_by_side`)."""
    lines = [side_by_side(r, pad) for r in rows]
    width = max(line.size[0] for line in lines)
    out = Image.new("RGB", (width, sum(line.size[1] for line in lines)), WHITE)
    y = 0
    for line in lines:
        out.paste(line, (0, y))
        y += line.size[1]
    return out


def colour_of(label: int) -> tuple[int, int, int]:
    """The class colour the library's drawings use."""
    return class_colour(label)


def upscale(image: Tensor | Image.Image, side: int) -> Image.Image:
    """A small image (a warped crop, an m x m mask) enlarged to ``side`` pixels (nearest)."""
    picture = to_pil(image) if not isinstance(image, Image.Image) else image
    return picture.resize((side, max(1, round(side * picture.size[1] / picture.size[0]))), Image.NEAREST)


def blend(a: Image.Image, b: Image.Image, alpha: float) -> Image.Image:
    """``a`` and ``b`` (same size) blended, ``alpha`` of ``b``."""
    return Image.blend(a, b.resize(a.size), alpha)
