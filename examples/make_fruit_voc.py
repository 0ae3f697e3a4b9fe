"""Write a small made-up data set in the Pascal VOC layout: the worked example of docs/own_data.md.

    python examples/make_fruit_voc.py data/fruit [--train 120] [--val 40] [--seed 0]

Three classes on a noisy grass-green background: red round ``apple``s, yellow elongated
``banana``s and orange ``orange``s. Images are 160x120 JPEGs, annotations VOC XML files with
1-based inclusive pixel boxes, split lists in ``ImageSets/Main/{train,val}.txt``. One object in
ten is marked ``difficult`` (VOC evaluation ignores those). Nothing here uses the library: it
stands for any tool that writes VOC annotations.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 160, 120
# name: (fill colour, width range, height/width ratio range)
CLASSES = {
    "apple": ((200, 30, 40), (14, 30), (0.9, 1.1)),
    "banana": ((235, 215, 60), (24, 44), (0.3, 0.45)),
    "orange": ((245, 140, 20), (12, 26), (0.95, 1.05)),
}


def _image(rng: random.Random) -> tuple[Image.Image, list[tuple[str, int, int, int, int, bool]]]:
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 18, (HEIGHT, WIDTH, 3))
    pixels = np.clip(noise + (70, 130, 60), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(list(CLASSES))
        colour, (w_lo, w_hi), (r_lo, r_hi) = CLASSES[name]
        w = rng.randint(w_lo, w_hi)
        h = max(6, round(w * rng.uniform(r_lo, r_hi)))
        x, y = rng.randint(0, WIDTH - w - 1), rng.randint(0, HEIGHT - h - 1)
        draw.ellipse((x, y, x + w - 1, y + h - 1), fill=colour, outline=(40, 40, 40))
        # VOC boxes: 1-based, inclusive pixel indices
        objects.append((name, x + 1, y + 1, x + w, y + h, rng.random() < 0.1))
    return image, objects


def _xml(filename: str, objects: list[tuple[str, int, int, int, int, bool]]) -> str:
    parts = [f"<annotation><folder>fruit</folder><filename>{escape(filename)}</filename>",
             f"<size><width>{WIDTH}</width><height>{HEIGHT}</height><depth>3</depth></size>"]  # fmt: skip
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin>"
                     f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")  # fmt: skip
    return "".join(parts) + "</annotation>\n"


def make_fruit_voc(root: str | Path, n_train: int = 120, n_val: int = 40, seed: int = 0) -> Path:
    """Write the data set under ``root`` and return it."""
    root = Path(root)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for k in range(n_train + n_val):
        split = "train" if k < n_train else "val"
        name = f"fruit_{k:05d}"
        image, objects = _image(rng)
        image.save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        (root / "Annotations" / f"{name}.xml").write_text(_xml(f"{name}.jpg", objects), encoding="utf-8")
        splits[split].append(name)
    for split, names in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_fruit_voc(args.root, args.train, args.val, args.seed))


if __name__ == "__main__":
    main()
