"""R-CNN's SVMs: the IoU rules, hard negative mining on a crafted case, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.components.svm import ClassSVMs, ImageRegions, class_overlaps

GT_BOX = [0.0, 0.0, 10.0, 10.0]
EASY_BOX = [50.0, 50.0, 60.0, 60.0]  # IoU 0 with the gt: negative
HARD_BOX = [30.0, 30.0, 40.0, 40.0]  # IoU 0 with the gt: negative
GREY_BOX = [0.0, 0.0, 10.0, 14.0]  # IoU 100 / 140 = 0.71 with the gt: grey zone, ignored
NUM_EASY, HARD_REGIONS, GREY_REGION = 20, (21, 22), 23


def crafted_source(num_images: int = 8, seed: int = 0) -> list[ImageRegions]:
    """2-D features: positives near (2, 2), easy negatives near (-2, -2), and in images 2.. two
    hard negatives near (2, -0.5) that an SVM trained on the easy ones scores as positives.
    The grey-zone region sits at the hard spot too: if it were used, it would be a negative."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(num_images):
        features = [rng.normal((2, 2), 0.3)]
        boxes = [GT_BOX]
        features += list(rng.normal((-2, -2), 0.3, size=(NUM_EASY, 2)))
        boxes += [EASY_BOX] * NUM_EASY
        hard = rng.normal((2.0, -0.5), 0.2, size=(2, 2))
        features += list(hard) if i >= 2 else list(rng.normal((-2, -2), 0.3, size=(2, 2)))
        boxes += [HARD_BOX] * 2
        features.append(rng.normal((2.0, -0.5), 0.2))
        boxes.append(GREY_BOX)
        labels = np.zeros(len(boxes), dtype=np.int64)
        labels[0] = 1
        images.append(ImageRegions(np.asarray(features, dtype=np.float32), np.asarray(boxes, np.float32), labels))
    return images


def split(source: list[ImageRegions]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All positives, all negatives (grey zone excluded), and the hard negatives."""
    pos = np.stack([im.features[0] for im in source])
    neg = np.concatenate([im.features[1:GREY_REGION] for im in source])
    hard = np.concatenate([im.features[list(HARD_REGIONS)] for im in source[2:]])
    return pos, neg, hard


def test_class_overlaps_by_hand() -> None:
    boxes = torch.tensor([GT_BOX, GREY_BOX, EASY_BOX, [80.0, 80, 90, 90]])
    gt_boxes = torch.tensor([GT_BOX, [80.0, 80, 90, 90]])
    overlaps = class_overlaps(boxes, gt_boxes, torch.tensor([1, 3]), num_classes=4)  # K = 3
    expected = torch.tensor([[1.0, 0, 0], [100 / 140, 0, 0], [0, 0, 0], [0, 0, 1.0]])
    assert torch.allclose(overlaps, expected)
    assert class_overlaps(boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 4).shape == (4, 3)


def test_hard_negative_mining_adds_false_positives_and_improves_the_objective() -> None:
    source = crafted_source()
    pos, neg, hard = split(source)
    kwargs = {"initial_images": 1, "progress": False}
    baseline = ClassSVMs(num_classes=2, C=1.0).fit_with_hard_negatives(source, max_rounds=0, **kwargs)
    mined = ClassSVMs(num_classes=2, C=1.0).fit_with_hard_negatives(source, max_rounds=3, **kwargs)

    # without mining the hard negatives are false positives; mining adds them and fixes that
    assert (baseline.decision_function(hard)[:, 0] > 0).all()
    assert (mined.decision_function(hard)[:, 0] < 0).all()
    assert (mined.decision_function(pos)[:, 0] > 0).all() and (mined.decision_function(neg)[:, 0] < 0).all()
    assert mined.objective(1, pos, neg)["total"] < baseline.objective(1, pos, neg)["total"]

    # the history: round 0 on image 0's 22 easy negatives, round 1 adds the 12 hard negatives
    # (all scored above -1), later rounds add nothing new and mining stops
    first, *later = mined.history
    assert (first.round, first.class_id, first.hard_added, first.cache_size, first.positives) == (0, 1, 22, 22, 8)
    round1 = [r for r in later if r.round == 1]
    assert sum(r.hard_added for r in round1) >= len(hard)
    assert max(r.round for r in mined.history) <= 2 and mined.history[-1].objective > 0
    assert all(r.evicted >= 0 and r.cache_size >= r.evicted for r in mined.history)
    # the grey zone is never a negative; the easy negatives were evicted from the cache
    keys = mined.negative_keys[1]
    assert not (keys[:, 1] == GREY_REGION).any() and not (keys[:, 1] == 0).any()
    assert len(keys) < first.cache_size + len(hard)
    assert "hard negatives" in str(mined.history[-1])


def test_decision_function_save_and_load(tmp_path: Path) -> None:
    source = crafted_source()
    svms = ClassSVMs(num_classes=2, C=1.0).fit_with_hard_negatives(source, max_rounds=1, progress=False)
    features = np.concatenate([im.features for im in source])
    scores = svms.decision_function(features)
    assert scores.shape == (len(features), 1) and scores.dtype == np.float32
    as_tensor = svms.decision_function(torch.from_numpy(features))
    assert isinstance(as_tensor, torch.Tensor) and np.allclose(as_tensor.numpy(), scores, atol=1e-5)

    loaded = ClassSVMs.load(svms.save(tmp_path / "svms.safetensors"))
    assert np.array_equal(loaded.decision_function(features), scores)
    assert loaded.feature_scale == svms.feature_scale and loaded.C == 1.0
    assert loaded.history == svms.history

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ClassSVMs.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.safetensors"):
        ClassSVMs.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"features must be \[R, 2\]"):
        svms.decision_function(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="not trained"):
        ClassSVMs(num_classes=2).decision_function(features)


def test_memory_mapped_features_and_bad_regions(tmp_path: Path) -> None:
    source = crafted_source(num_images=4)
    mapped = []
    for i, image in enumerate(source):
        path = tmp_path / f"feat{i}.npy"
        np.save(path, image.features)
        mapped.append(ImageRegions(np.load(path, mmap_mode="r"), image.boxes, image.gt_labels))
    in_memory = ClassSVMs(num_classes=2, C=1.0).fit_with_hard_negatives(source, progress=False)
    on_disk = ClassSVMs(num_classes=2, C=1.0).fit_with_hard_negatives(mapped, progress=False)
    assert np.allclose(in_memory.weights, on_disk.weights) and np.allclose(in_memory.biases, on_disk.biases)

    broken = [*source[:2], ImageRegions(source[2].features, source[2].boxes[:5], source[2].gt_labels)]
    with pytest.raises(ValueError, match="SVM training image 2"):
        ClassSVMs(num_classes=2).fit_with_hard_negatives(broken, progress=False)
    wrong_label = [ImageRegions(source[0].features, source[0].boxes, np.full(24, 5))]
    with pytest.raises(ValueError, match=r"image 0: gt_labels must lie in 0..1"):
        ClassSVMs(num_classes=2).fit_with_hard_negatives(wrong_label, progress=False)
