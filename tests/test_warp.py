"""Region warping: each mode on hand-made images gives the crop worked out by hand."""

from __future__ import annotations

import pytest
import torch

from rcnn.components.warp import to_warp_frame, warp_regions, warp_windows

RED = torch.tensor([1.0, 0.0, 0.0])
GREEN = torch.tensor([0.0, 1.0, 0.0])
BLUE = torch.tensor([0.0, 0.0, 1.0])
FILL = torch.tensor([0.25, 0.5, 0.75])


def colour_image(height: int = 100, width: int = 120) -> torch.Tensor:
    """Blue background, a green band x in [10, 30), a red square [30, 40, 50, 60]."""
    image = BLUE[:, None, None].repeat(1, height, width)
    image[:, :, 10:30] = GREEN[:, None, None]
    image[:, 40:60, 30:50] = RED[:, None, None]
    return image


def is_colour(pixels: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """``pixels [3, ...]`` -> bool mask of where they equal ``colour``."""
    return torch.isclose(pixels, colour.view(3, *([1] * (pixels.dim() - 1))), atol=1e-5).all(dim=0)


PALETTE = {"red": RED, "green": GREEN, "blue": BLUE, "fill": FILL}


def runs(line: torch.Tensor, names: tuple[str, ...] = tuple(PALETTE)) -> list[tuple[str, int, int]]:
    """``line [3, L]`` -> runs ``(colour, start, end)`` of the nearest palette colour per pixel.

    Bilinear resampling blends two colours across an edge; the nearest colour switches where
    the blend is half-way, i.e. at the geometric edge.
    """
    colours = torch.stack([PALETTE[n] for n in names])  # [4, 3]
    nearest = torch.cdist(line.T, colours).argmin(dim=1).tolist()  # [L]
    found: list[tuple[str, int, int]] = []
    for i, c in enumerate(nearest):
        if found and found[-1][0] == names[c]:
            found[-1] = (names[c], found[-1][1], i + 1)
        else:
            found.append((names[c], i, i + 1))
    return found


def assert_runs(
    line: torch.Tensor,
    expected: list[tuple[str, int, int]],
    tolerance: int = 1,
    names: tuple[str, ...] = tuple(PALETTE),
) -> None:
    got = runs(line, names)
    assert [r[0] for r in got] == [e[0] for e in expected], got
    for (_, start, end), (_, want_start, want_end) in zip(got, expected):
        assert abs(start - want_start) <= tolerance and abs(end - want_end) <= tolerance, (got, expected)


def test_anisotropic_without_padding_fills_output_with_the_square() -> None:
    image = colour_image()
    # the square itself, and a tall box inside it: both stretched to fill all 227 x 227 pixels
    boxes = torch.tensor([[30.0, 40.0, 50.0, 60.0], [35.0, 41.0, 40.0, 59.0]])
    out = warp_regions(image, boxes, size=227, mode="anisotropic", padding=0, fill=FILL)
    assert out.shape == (2, 3, 227, 227)
    # exactly red everywhere: only pixels inside the box are read, none bleeds in from outside
    assert bool(is_colour(out[0], RED).all()) and bool(is_colour(out[1], RED).all())


def test_anisotropic_context_padding_leaves_p_pixels_of_context() -> None:
    image = colour_image()
    box = torch.tensor([[30.0, 40.0, 50.0, 60.0]])
    out = warp_regions(image, box, size=227, mode="anisotropic", padding=16)[0]
    # geometry: the box lands on [16, 211] of the output
    source = warp_windows(box, 227, "anisotropic", 16).source
    assert to_warp_frame(box, source, 227)[0].tolist() == pytest.approx([16.0, 16.0, 211.0, 211.0])
    # 16 px of context (green on the left, blue above and below), 195 px of box, 16 px of context
    colours = ("red", "green", "blue")
    assert_runs(out[:, 113, :], [("green", 0, 16), ("red", 16, 211), ("blue", 211, 227)], names=colours)
    assert_runs(out[:, :, 113], [("blue", 0, 16), ("red", 16, 211), ("blue", 211, 227)], names=colours)


def test_isotropic_context_shows_the_surrounding_pixels() -> None:
    image = colour_image()
    tall = torch.tensor([[30.0, 40.0, 40.0, 60.0]])  # left half of the red square, 10 x 20
    out = warp_regions(image, tall, size=100, mode="isotropic_context", padding=0, fill=FILL)[0]
    # the square window is x in [25, 45) at 5 output px per image px: 5 px of green band left of
    # the box, then red (the box and, right of it, the rest of the red square)
    assert_runs(out[:, 50, :], [("green", 0, 25), ("red", 25, 100)])
    assert_runs(out[:, :, 50], [("red", 0, 100)])
    # anisotropic stretches the same box: all red
    assert bool(is_colour(warp_regions(image, tall, 100, "anisotropic", 0, FILL)[0], RED).all())


def test_isotropic_pad_fills_outside_the_box_with_the_mean() -> None:
    image = colour_image()
    tall = torch.tensor([[30.0, 40.0, 40.0, 60.0]])
    out = warp_regions(image, tall, size=100, mode="isotropic_pad", padding=0, fill=FILL)[0]
    # the box occupies output columns [25, 75): red; the rest is the fill, not image context
    assert bool(is_colour(out[:, :, 25:75], RED).all())
    assert bool(is_colour(out[:, :, :25], FILL).all()) and bool(is_colour(out[:, :, 75:], FILL).all())
    # with padding p = 10: (100 - 20) / 20 = 4 output px per image px, the box on [30, 70) and
    # 10 px of context around it (2.5 image px: green on the left, red on the right), then fill
    padded = warp_regions(image, tall, size=100, mode="isotropic_pad", padding=10, fill=FILL)[0]
    assert_runs(padded[:, 50, :], [("fill", 0, 20), ("green", 20, 30), ("red", 30, 80), ("fill", 80, 100)], 0)
    assert_runs(padded[:, :, 50], [("blue", 0, 10), ("red", 10, 90), ("blue", 90, 100)])


def test_outside_the_image_is_filled_with_the_mean_by_default() -> None:
    image = colour_image()
    corner = torch.tensor([[-20.0, -20.0, 20.0, 20.0]])  # half outside, to the top-left
    out = warp_regions(image, corner, size=40, mode="anisotropic", padding=0)[0]
    mean = image.mean(dim=(1, 2))
    assert bool(is_colour(out[:, :20, :], mean).all()) and bool(is_colour(out[:, :, :20], mean).all())
    assert bool(is_colour(out[:, 20:, 20:30], BLUE).all())  # image x in [0, 10)
    assert bool(is_colour(out[:, 20:, 30:], GREEN).all())  # image x in [10, 20)


def test_many_boxes_at_once_match_one_at_a_time_and_bad_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 60, 80, generator=generator)
    xy = torch.rand(50, 2, generator=generator) * 70
    boxes = torch.cat((xy, xy + 2 + torch.rand(50, 2, generator=generator) * 30), dim=1)
    for mode in ("anisotropic", "isotropic_context", "isotropic_pad"):
        together = warp_regions(image, boxes, size=32, mode=mode, padding=4)
        single = torch.cat([warp_regions(image, b[None], size=32, mode=mode, padding=4) for b in boxes])
        assert torch.allclose(together, single, atol=1e-6)
    assert warp_regions(image, torch.zeros(0, 4), size=8, padding=2).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="mode"):
        warp_regions(image, boxes, mode="stretch")
    with pytest.raises(ValueError, match="padding"):
        warp_regions(image, boxes, size=32, padding=16)
    with pytest.raises(ValueError, match="x2 < x1"):
        warp_regions(image, torch.tensor([[10.0, 0, 5, 5]]))
