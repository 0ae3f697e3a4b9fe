"""Images bounded before they are decoded at full size: the pixel limit from the header, decoding
reduced to the model's input size (JPEG by its decoder, other formats in blocks on 8-bit pixels),
boxes mapped back to the original's pixels, and the memory that saves."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcnn.core.images import resized_shape
from rcnn.inference import predict_stream
from rcnn.io.images import load_image, read_image
from test_tiling import BrightSquares


def _photo(path: Path, width: int, height: int) -> Path:
    """A smooth RGB picture with a bright square at (40%, 30%) .. (60%, 50%) of its size."""
    yy, xx = np.mgrid[0:height, 0:width]
    array = np.stack([xx * 90 // width, yy * 90 // height, np.full_like(xx, 40)], axis=2).astype(np.uint8)
    array[int(0.3 * height) : int(0.5 * height), int(0.4 * width) : int(0.6 * width)] = 240
    Image.fromarray(array).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_decoded_reduced_but_never_below_the_model_input(tmp_path: Path, suffix: str) -> None:
    path = _photo(tmp_path / f"big{suffix}", 3000, 2000)
    decoded = read_image(path, fit=(256, 384))
    h, w = decoded.image.shape[1:]
    target = resized_shape(2000, 3000, 256, 384)  # what the model resizes to: (256, 384)
    assert decoded.original_size == (2000, 3000)
    assert target[0] <= h < 2 * target[0] and target[1] <= w < 2 * target[1], (h, w)
    full = load_image(path)
    assert full.shape == (3, 2000, 3000)
    small = torch.nn.functional.interpolate(full[None], size=(h, w), mode="area")[0]
    assert (decoded.image - small).abs().mean() < 0.02  # the same picture, averaged down
    assert read_image(path, fit=(4000, 6000)).image.shape == (3, 2000, 3000)  # a model that enlarges: read whole


def test_uint8_and_grayscale_and_palette(tmp_path: Path) -> None:
    Image.fromarray(np.full((900, 1200), 77, dtype=np.uint8), "L").save(tmp_path / "g.png")
    Image.new("P", (1200, 900), 3).save(tmp_path / "p.png")
    for name in ("g.png", "p.png"):
        as_bytes = read_image(tmp_path / name, fit=(100, 150), dtype=torch.uint8)
        as_float = read_image(tmp_path / name, fit=(100, 150))
        assert as_bytes.image.dtype == torch.uint8 and as_bytes.image.shape[0] == 3
        assert torch.allclose(as_bytes.image.float() / 255, as_float.image, atol=1 / 255)
    assert int(read_image(tmp_path / "g.png", dtype=torch.uint8).image[0, 0, 0]) == 77


def test_pixel_limit_from_the_header(tmp_path: Path, monkeypatch) -> None:
    path = _photo(tmp_path / "x.png", 400, 300)
    with pytest.raises(ValueError, match=r"x.png: 400x300 image \(120,000 pixels\) exceeds the limit of 100,000 pixels.*--max-pixels"):
        read_image(path, max_pixels=100_000)
    with pytest.raises(ValueError, match="exceeds the limit"):
        load_image(path, max_pixels=1000)
    # the library's limit is the one that counts, above PIL's own refusal too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert read_image(path, max_pixels=200_000).original_size == (300, 400)
    assert read_image(path, max_pixels=None).image.shape == (3, 300, 400)


def test_boxes_come_back_in_original_pixels(tmp_path: Path) -> None:
    model = BrightSquares(size=256)
    model.transform.max_size = 384
    path = _photo(tmp_path / "photo.jpg", 3000, 2000)
    items = [(path, read_image(path, fit=(256, 384)))]
    (prediction,) = predict_stream(model, items, prefetch=0)
    assert prediction.original_size == (2000, 3000) and prediction.image.shape[1] < 2000
    (box,) = prediction.output["boxes"]
    torch.testing.assert_close(box, torch.tensor([1200.0, 600, 1800, 1000]), atol=16.0, rtol=0)  # within a cell
    assert set(prediction.output) == {"boxes", "labels", "scores"}  # one frame: nothing left in the decoded image's


PEAK = """
import sys
from pathlib import Path
from rcnn.io.images import load_image, read_image

def peak_mb():  # VmHWM since the last reset (as rcnn.inference.peak_memory_mb)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

def reset():
    Path("/proc/self/clear_refs").write_text("5")

path = sys.argv[1]
reset(); start = peak_mb()
read_image(path, fit=(256, 384))
reduced = peak_mb() - start
reset(); start = peak_mb()
load_image(path)
print(reduced, peak_mb() - start)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak-memory reset needs Linux /proc")
def test_memory_of_a_large_png_stays_near_its_8_bit_pixels(tmp_path: Path) -> None:
    side = 4000  # 16 MP: 46 MB of 8-bit RGB, 183 MB as float32
    array = np.zeros((side, side, 3), dtype=np.uint8)
    array[1000:3000, 2000:3500] = 200
    Image.fromarray(array).save(tmp_path / "large.png", compress_level=1)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK), str(tmp_path / "large.png")], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent)  # fmt: skip
    reduced, whole = (float(v) for v in result.stdout.split())
    pixels_mb = side * side * 3 / 2**20
    assert reduced < 1.5 * pixels_mb, (reduced, whole)  # the 8-bit decode and little else
    assert whole > 4 * pixels_mb  # read whole as float32, as before: what the bound avoids
