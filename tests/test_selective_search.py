"""Selective search: boxes in the image, capped, deduplicated; the proposals file as a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rcnn.components.proposals.selective_search as ss_module
from rcnn.core.boxes import box_iou
from rcnn.components.proposals.io import load_proposals
from rcnn.components.proposals.selective_search import SelectiveSearch, compute_proposals, selective_search

# Two flat coloured rectangles on a grey, slightly noisy background: (x1, y1, x2, y2)
RED_BOX = (20, 30, 70, 60)
BLUE_BOX = (80, 70, 120, 120)


def make_image(height: int = 128, width: int = 128, scale: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height * scale, width * scale, 3), 128, dtype=np.int16)
    image += rng.integers(-6, 7, size=image.shape, dtype=np.int16)
    x1, y1, x2, y2 = (v * scale for v in RED_BOX)
    image[y1:y2, x1:x2] = (220, 30, 30)
    x1, y1, x2, y2 = (v * scale for v in BLUE_BOX)
    image[y1:y2, x1:x2] = (30, 40, 200)
    return image.clip(0, 255).astype(np.uint8)


def best_iou(gt: tuple[int, ...], boxes: torch.Tensor) -> float:
    return float(box_iou(torch.tensor([gt], dtype=torch.float32), boxes).max())


def test_boxes_inside_image_capped_unique_and_objects_found() -> None:
    image = make_image(128, 96 + 32)
    boxes = selective_search(image, mode="fast", min_size=4)
    assert boxes.dtype == torch.float32 and boxes.dim() == 2 and boxes.shape[1] == 4
    assert 2 < boxes.shape[0] <= 2000
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all())
    assert bool((boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 128).all())
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((widths >= 4).all() and (heights >= 4).all())
    assert torch.unique(boxes, dim=0).shape[0] == boxes.shape[0]
    # flat rectangles are single segments: found exactly (continuous box = pixel extent)
    assert best_iou(RED_BOX, boxes) == pytest.approx(1.0)
    assert best_iou(BLUE_BOX, boxes) == pytest.approx(1.0)
    # deterministic, and the cap keeps the best-ranked boxes
    assert torch.equal(selective_search(image, min_size=4), boxes)
    assert torch.equal(selective_search(image, min_size=4, max_proposals=3), boxes[:3])
    # min_size removes the boxes below it
    big = selective_search(image, min_size=45)
    assert bool(((big[:, 2:] - big[:, :2]) >= 45).all()) and big.shape[0] < boxes.shape[0]


def test_quality_mode_and_resize_maps_boxes_back() -> None:
    image = make_image(scale=4)  # 512 x 512
    quality = selective_search(image, mode="quality", max_side=128)
    fast = selective_search(image, mode="fast", max_side=128)
    assert quality.shape[0] > fast.shape[0]
    for boxes in (quality, fast):  # searched at 128 px, boxes in the 512 px frame
        assert bool((boxes >= 0).all() and (boxes <= 512).all())
        assert best_iou(tuple(4 * v for v in RED_BOX), boxes) > 0.95
        assert best_iou(tuple(4 * v for v in BLUE_BOX), boxes) > 0.95


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"uint8 RGB"):
        selective_search(make_image().astype(np.float32))
    with pytest.raises(ValueError, match=r"uint8 RGB"):
        selective_search(make_image()[:, :, 0])
    with pytest.raises(ValueError, match="mode"):
        SelectiveSearch(mode="slow")
    with pytest.raises(ValueError, match="max_proposals"):
        SelectiveSearch(max_proposals=0)
    with pytest.raises(ValueError, match="no images"):
        compute_proposals([], "unused.safetensors", progress=False)
    with pytest.raises(ValueError, match="image id 3 appears twice"):
        compute_proposals([(3, "a.png"), (3, "b.png")], "unused.safetensors", progress=False)


@pytest.fixture()
def image_items(tmp_path: Path) -> list[tuple[int, Path]]:
    items = []
    for i, image_id in enumerate((5, 17, 23, 40)):
        path = tmp_path / f"im{image_id}.png"
        Image.fromarray(make_image(seed=i)).save(path)
        items.append((image_id, path))
    return items


def test_compute_writes_file_and_second_run_reads_it(tmp_path: Path, image_items, monkeypatch) -> None:
    out = tmp_path / "props.safetensors"
    search = SelectiveSearch(max_proposals=50)
    first = compute_proposals(image_items, out, search, workers=0, progress=False)
    assert first.image_ids == [5, 17, 23, 40]
    assert first.settings["method"] == "selective_search" and first.settings["max_proposals"] == 50
    expected = search(np.asarray(Image.open(image_items[1][1])))
    assert torch.equal(first[17], expected)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached file should have been read instead")

    monkeypatch.setattr(ss_module, "_propose_one", must_not_run)
    second = compute_proposals(image_items, out, SelectiveSearch(max_proposals=50), workers=0, progress=False)
    assert all(torch.equal(first[i], second[i]) for i in first.image_ids)

    # other settings never mix with the file's
    with pytest.raises(ValueError, match=r"props.safetensors.*max_proposals: file 50 vs asked 2000"):
        compute_proposals(image_items, out, SelectiveSearch(), workers=0, progress=False)


def test_interrupted_run_resumes(tmp_path: Path, image_items, monkeypatch) -> None:
    out = tmp_path / "props.safetensors"
    real = ss_module._propose_one
    calls: list[int] = []

    def crash_after_two(search, image_id, path):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        calls.append(image_id)
        return real(search, image_id, path)

    monkeypatch.setattr(ss_module, "_propose_one", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        compute_proposals(image_items, out, workers=0, progress=False, save_every_s=3600)
    partial = load_proposals(out)
    assert partial.image_ids == sorted(calls) and len(calls) == 2

    resumed: list[int] = []

    def count(search, image_id, path):
        resumed.append(image_id)
        return real(search, image_id, path)

    monkeypatch.setattr(ss_module, "_propose_one", count)
    final = compute_proposals(image_items, out, workers=0, progress=False)
    assert sorted(resumed) == sorted({5, 17, 23, 40} - set(calls))  # only the missing images
    assert final.image_ids == [5, 17, 23, 40]
    assert torch.equal(final[calls[0]], partial[calls[0]])


def test_worker_processes_give_the_same_boxes(tmp_path: Path, image_items) -> None:
    search = SelectiveSearch(max_proposals=30)
    parallel = compute_proposals(image_items[:2], tmp_path / "a.safetensors", search, workers=2, progress=False)
    serial = compute_proposals(image_items[:2], tmp_path / "b.safetensors", search, workers=0, progress=False)
    assert parallel.image_ids == serial.image_ids == [5, 17]
    assert all(torch.equal(parallel[i], serial[i]) for i in serial.image_ids)


def test_unreadable_image_is_named(tmp_path: Path, image_items) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        compute_proposals([*image_items[:1], (99, broken)], tmp_path / "p.safetensors", workers=0, progress=False)
    # the image done before the failure was kept
    assert load_proposals(tmp_path / "p.safetensors").image_ids == [5]


def test_stats_recall_by_hand(tmp_path: Path, shapes_root: Path) -> None:
    from rcnn.data import build_dataset
    from rcnn.components.proposals.io import proposal_stats, save_proposals

    dataset = build_dataset(shapes_root, "val")
    gt = {image_id: dataset.annotation(i)["boxes"] for i, image_id in enumerate(dataset.image_ids)}
    total = sum(len(b) for b in gt.values())
    # proposals = the gt boxes exactly, except for the first image, which has none
    first = dataset.image_ids[0]
    boxes = {**gt, first: torch.zeros(0, 4)}
    stats = proposal_stats(load_proposals(save_proposals(tmp_path / "p.safetensors", boxes)), dataset)
    assert stats["gt_boxes"] == total and stats["images"] == len(dataset)
    assert stats["recall"] == pytest.approx({0.5: (total - len(gt[first])) / total, 0.7: (total - len(gt[first])) / total})
    assert stats["mean_best_iou"] == pytest.approx((total - len(gt[first])) / total)
    assert stats["boxes_per_image"]["max"] == max(len(b) for b in gt.values())
    # a file lacking one of the data set's images is refused, naming the file
    missing = save_proposals(tmp_path / "short.safetensors", {i: b for i, b in gt.items() if i != first})
    with pytest.raises(ValueError, match=rf"short.safetensors.*ids {first}"):
        proposal_stats(load_proposals(missing), dataset)


def test_command_line(tmp_path: Path, shapes_root: Path, capsys) -> None:
    from rcnn.cli import main

    out = tmp_path / "val.safetensors"
    args = ["proposals", "selective-search", str(shapes_root), "--split", "val", "--out", str(out)]
    assert main([*args, "--workers", "0", "--quiet", "--max-proposals", "100"]) == 0
    assert main(["proposals", "stats", str(out), "--dataset", str(shapes_root), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "8 images" in printed and "recall@0.5" in printed and "recall@0.7" in printed
    assert load_proposals(out).settings["max_proposals"] == 100
    # other settings into the same file: one clear error line, status 2
    assert main([*args, "--workers", "0", "--quiet", "--mode", "quality", "--max-proposals", "100"]) == 2
    assert "other settings" in capsys.readouterr().err
    plain = tmp_path / "mine.json"
    plain.write_text('{"1": [[0, 0, 5, 5]]}')
    assert main(["proposals", "convert", str(plain), "--out", str(tmp_path / "mine.safetensors"), "--method", "mine"]) == 0
    assert load_proposals(tmp_path / "mine.safetensors").settings == {"method": "mine"}
