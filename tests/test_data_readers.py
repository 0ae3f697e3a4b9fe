"""COCO and VOC readers round-trip the shapes set; format detection; transforms and batching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from rcnn.data import (
    SHAPES_CLASSES,
    CocoDetection,
    Compose,
    RandomHorizontalFlip,
    Resize,
    VOCDetection,
    build_dataset,
    collate_fn,
    shapes_paths,
)
from rcnn.core.images import resize_boxes, resized_shape


def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_coco_reader_items_match_the_annotation_file(shapes_root: Path) -> None:
    images_dir, ann_file = shapes_paths(shapes_root, "val")
    raw = json.loads(ann_file.read_text())
    dataset = CocoDetection(images_dir, ann_file, with_masks=True)
    assert len(dataset) == 8
    assert dataset.num_classes == 6
    assert dataset.class_names == ["__background__", *SHAPES_CLASSES]
    assert dataset.label_to_cat_id == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}
    assert dataset.image_ids == [img["id"] for img in raw["images"]]
    assert len(dataset.coco.getAnnIds()) == len(raw["annotations"])
    for i in (0, 5):
        image, target = dataset[i]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        anns = [a for a in raw["annotations"] if a["image_id"] == target["image_id"]]
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["boxes"].dtype == torch.float32 and target["boxes"].tolist() == expected
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["masks"].shape == (len(anns), 128, 128) and target["masks"].dtype == torch.uint8
        assert target["orig_size"] == (128, 128)
        assert dataset.image_path(i) == images_dir / raw["images"][i]["file_name"]
        for box, mask in zip(target["boxes"].tolist(), target["masks"]):
            assert _mask_box(mask) == box


def _shapes_to_voc(shapes_root: Path, root: Path, n_images: int, difficult_ann_id: int) -> None:
    """Write the first val images of a shapes set as a VOC layout (1-based inclusive boxes)."""
    images_dir, ann_file = shapes_paths(shapes_root, "val")
    raw = json.loads(ann_file.read_text())
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    names = []
    for img in raw["images"][:n_images]:
        name = f"shape_{img['id']:04d}"
        names.append(name)
        shutil.copy(images_dir / img["file_name"], root / "JPEGImages" / f"{name}.png")
        objects = ""
        for ann in (a for a in raw["annotations"] if a["image_id"] == img["id"]):
            x, y, w, h = ann["bbox"]
            objects += (
                f"<object><name>{SHAPES_CLASSES[ann['category_id'] - 1]}</name>"
                f"<difficult>{int(ann['id'] == difficult_ann_id)}</difficult><bndbox>"
                f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax>"
                "</bndbox></object>"
            )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.png</filename><size><width>{img['width']}</width>"
            f"<height>{img['height']}</height><depth>3</depth></size>{objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(names) + "\n")


def test_voc_reader_round_trips_shapes(shapes_root: Path, tmp_path: Path) -> None:
    coco = CocoDetection(*shapes_paths(shapes_root, "val"))
    difficult_id = coco.records[1].ann_ids[0]
    _shapes_to_voc(shapes_root, tmp_path, 3, difficult_id)
    voc = VOCDetection(tmp_path, "val", class_names=SHAPES_CLASSES)
    assert len(voc) == 3 and voc.class_names == coco.class_names
    assert voc.image_names == ["shape_0001", "shape_0002", "shape_0003"]
    for i in range(3):
        image_voc, target_voc = voc[i]
        image_coco, target_coco = coco[i]
        assert torch.equal(image_voc, image_coco)
        assert torch.equal(target_voc["boxes"], target_coco["boxes"])
        assert torch.equal(target_voc["labels"], target_coco["labels"])
        assert target_voc["difficult"].tolist() == [i == 1 and j == 0 for j in range(len(target_voc["labels"]))]
    # For training the difficult object is left out by default, but evaluation still sees it.
    train = VOCDetection(tmp_path, "val", class_names=SHAPES_CLASSES, train=True)
    assert len(train[1][1]["boxes"]) == len(coco[1][1]["boxes"]) - 1
    assert bool(train.annotation(1)["difficult"][0])
    kept = VOCDetection(tmp_path, "val", class_names=SHAPES_CLASSES, train=True, keep_difficult=True)
    assert len(kept[1][1]["boxes"]) == len(coco[1][1]["boxes"])
    # Without class_names, the names are discovered (sorted) and labels follow them.
    discovered = VOCDetection(tmp_path, "val")
    assert discovered.class_names[1:] == sorted(SHAPES_CLASSES)
    names = [discovered.class_names[label] for label in discovered[0][1]["labels"].tolist()]
    assert names == [coco.class_names[label] for label in coco[0][1]["labels"].tolist()]


def test_build_dataset_detects_the_format(shapes_root: Path, tmp_path: Path) -> None:
    images_dir, ann_file = shapes_paths(shapes_root, "val")
    assert isinstance(build_dataset(shapes_root, "val"), CocoDetection)
    from_json = build_dataset(ann_file, "val")
    assert isinstance(from_json, CocoDetection) and from_json.images_dir == images_dir
    spec = build_dataset({"format": "coco", "annotations": ann_file, "images": images_dir}, "val")
    assert len(spec) == 8
    _shapes_to_voc(shapes_root, tmp_path / "voc", 2, -1)
    voc = build_dataset({"format": "voc", "root": tmp_path / "voc", "class_names": SHAPES_CLASSES}, "val")
    assert isinstance(voc, VOCDetection) and voc.class_names[1:] == list(SHAPES_CLASSES)
    assert isinstance(build_dataset(tmp_path / "voc", "val"), VOCDetection)
    with pytest.raises(ValueError, match="no instance masks"):
        build_dataset(tmp_path / "voc", "val", with_masks=True)


def test_resized_shape_follows_the_fast_rcnn_rule() -> None:
    assert resized_shape(480, 640, 600, 1000) == (600, 800)
    assert resized_shape(300, 1500, 600, 1000) == (200, 1000)  # longer side capped
    assert resized_shape(128, 128, 64, 1000) == (64, 64)


def test_resize_moves_boxes_and_masks_with_the_image(shapes_root: Path) -> None:
    dataset = CocoDetection(*shapes_paths(shapes_root, "val"), with_masks=True, transforms=Resize(256, 1000))
    plain = CocoDetection(*shapes_paths(shapes_root, "val"), with_masks=True)
    image, target = dataset[0]
    _, original = plain[0]
    assert image.shape == (3, 256, 256)
    assert torch.equal(target["boxes"], original["boxes"] * 2)
    assert target["masks"].shape[1:] == (256, 256) and target["masks"].dtype == torch.uint8
    for box, mask in zip(target["boxes"].tolist(), target["masks"]):
        assert _mask_box(mask) == box  # nearest-neighbour x2 keeps masks tight in their boxes
    assert target["orig_size"] == (128, 128)
    back = resize_boxes(target["boxes"], image.shape[-2:], target["orig_size"])
    assert torch.equal(back, original["boxes"])


def test_horizontal_flip_moves_boxes_and_masks() -> None:
    image = torch.zeros(3, 24, 32)
    image[0, 3:11, 2:12] = 1.0
    masks = (image[0] > 0).to(torch.uint8)[None]  # [1, 24, 32]
    target = {"boxes": torch.tensor([[2.0, 3.0, 12.0, 11.0]]), "masks": masks, "labels": torch.tensor([1])}
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert out["boxes"].tolist() == [[20.0, 3.0, 30.0, 11.0]]
    assert _mask_box(out["masks"][0]) == [20.0, 3.0, 30.0, 11.0]
    assert bool(flipped[0, 3:11, 20:30].eq(1).all()) and float(flipped.sum()) == 80.0
    same, unchanged = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and unchanged is target
    composed, both = Compose([RandomHorizontalFlip(1.0), RandomHorizontalFlip(1.0)])(image, target)
    assert torch.equal(composed, image) and torch.equal(both["boxes"], target["boxes"])


def test_collate_keeps_per_image_sizes(shapes_root: Path) -> None:
    dataset = CocoDetection(*shapes_paths(shapes_root, "train"), train=True, transforms=Resize((96, 160), 1000))
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 4
    for image, target in zip(images, targets):
        assert image.shape[1] in (96, 160) and target["orig_size"] == (128, 128)
        assert float(target["boxes"].max()) <= image.shape[-1]
