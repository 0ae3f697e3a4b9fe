"""R-CNN's ridge box regressors: the IoU >= 0.6 rule, recovery of known offsets, λ by CV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.components.ridge import BoxRegressors, select_regression_examples
from rcnn.core.boxes import BoxCoder, box_iou


def test_select_examples_by_hand() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    labels = torch.tensor([1, 2])
    proposals = torch.tensor(
        [
            [0.0, 0.0, 10.0, 14.0],  # IoU 0.714 with gt 0 -> class 1
            [20.0, 0.0, 30.0, 16.0],  # IoU 0.625 with gt 1 -> class 2
            [0.0, 0.0, 10.0, 20.0],  # IoU 0.5: too far
            [0.0, 0.0, 10.0, 10.0],  # the gt itself: IoU 1
            [2.0, 0.0, 2.0, 10.0],  # zero width: no targets
            [22.0, 0.0, 29.0, 10.0],  # IoU 0.7 with gt 1
        ]
    )
    index, matched, classes = select_regression_examples(proposals, gt, labels, min_iou=0.6)
    assert index.tolist() == [0, 1, 3, 5]
    assert classes.tolist() == [1, 2, 1, 2]
    assert torch.equal(matched, gt[[0, 1, 0, 1]])
    # the proposal goes to the gt of highest IoU, whichever class
    both = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])  # IoU 0.67 with each other
    _, matched, classes = select_regression_examples(torch.tensor([[1.5, 0.0, 11.5, 10.0]]), both, torch.tensor([1, 2]))
    assert classes.tolist() == [2] and matched.tolist() == [[2.0, 0.0, 12.0, 10.0]]


def synthetic(num: int, generator: torch.Generator, class_id: int, mixing: torch.Tensor, noise_dims: int = 6):
    """Proposals jittered around gt boxes; features that encode the t-targets linearly."""
    centres = torch.rand(num, 2, generator=generator) * 80 + 20
    sizes = torch.rand(num, 2, generator=generator) * 30 + 10
    gt = torch.cat((centres - sizes / 2, centres + sizes / 2), dim=1)
    t = torch.cat((torch.randn(num, 2, generator=generator) * 0.08, torch.randn(num, 2, generator=generator) * 0.1), 1)
    # proposal p such that encode(gt, p) = t: pw = gw / exp(tw), px = gx - tx * pw
    pw, ph = sizes[:, 0] / t[:, 2].exp(), sizes[:, 1] / t[:, 3].exp()
    px, py = centres[:, 0] - t[:, 0] * pw, centres[:, 1] - t[:, 1] * ph
    proposals = torch.stack((px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2), dim=1)
    extra = torch.randn(num, noise_dims, generator=generator)
    features = torch.cat((t @ mixing + 0.5, extra), dim=1)  # [N, 4 + noise_dims]
    return features, proposals, gt, torch.full((num,), class_id)


def test_ridge_recovers_known_offsets_per_class() -> None:
    generator = torch.Generator().manual_seed(0)
    mix1 = torch.randn(4, 4, generator=generator)
    mix2 = torch.randn(4, 4, generator=generator)  # class 2 encodes the targets differently
    f1, p1, g1, c1 = synthetic(400, generator, 1, mix1)
    f2, p2, g2, c2 = synthetic(400, generator, 2, mix2)
    regressors = BoxRegressors(num_classes=3, lambdas=(1e-4, 1e-2, 1.0, 100.0))
    regressors.fit_examples(torch.cat((f1, f2)), torch.cat((p1, p2)), torch.cat((g1, g2)), torch.cat((c1, c2)))
    assert regressors.num_examples.tolist() == [400, 400]

    t1, q1, h1, k1 = synthetic(50, generator, 1, mix1)
    t2, q2, h2, k2 = synthetic(50, generator, 2, mix2)
    refined = regressors.predict(torch.cat((t1, t2)), torch.cat((q1, q2)), torch.cat((k1, k2)))
    truth = torch.cat((h1, h2))
    assert (refined - truth).abs().max() < 0.05  # pixels: exact up to the noise-free fit
    before = box_iou(torch.cat((q1, q2)), truth).diag()
    after = box_iou(refined, truth).diag()
    assert after.min() > 0.999 and before.mean() < 0.9
    # with the wrong class's regressor the boxes do not come out right
    wrong = regressors.predict(t1, q1, torch.full((50,), 2))
    assert (wrong - h1).abs().max() > 1.0
    # numpy features give the same boxes
    assert torch.allclose(regressors.predict(t1.numpy(), q1, k1), refined[:50], atol=1e-4)


def test_lambda_is_chosen_by_cross_validation() -> None:
    generator = torch.Generator().manual_seed(1)
    grid = (1e-3, 1.0, 1e3, 1e6)
    features, proposals, gt, classes = synthetic(300, generator, 1, torch.randn(4, 4, generator=generator))
    clean = BoxRegressors(num_classes=2, lambdas=grid).fit_examples(features, proposals, gt, classes)
    # features unrelated to the targets: the heaviest penalty predicts best (the mean)
    noise = torch.randn(300, 10, generator=generator)
    noisy = BoxRegressors(num_classes=2, lambdas=grid).fit_examples(noise, proposals, gt, classes)
    assert clean.chosen_lambdas.tolist() == [1e-3]
    assert noisy.chosen_lambdas.tolist() == [1e6]
    # k-fold works as well, and agrees here
    folds = BoxRegressors(num_classes=2, lambdas=grid, cv_folds=3).fit_examples(features, proposals, gt, classes)
    assert folds.chosen_lambdas.tolist() == [1e-3]


def test_fit_uses_only_proposals_with_iou_at_least_0_6(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(4, 4, generator=generator)
    features, proposals, gt, _ = synthetic(200, generator, 1, mixing)
    iou = box_iou(proposals, gt).diag()
    # 20 "images" of 10 objects; each object also gets a proposal of IoU 0.48 whose features say
    # "move a lot": if those were used, the fit would be ruined
    per_image_features, per_image_proposals, per_image_gt, per_image_labels = [], [], [], []
    apart = (torch.arange(10.0) * 200)[:, None] * torch.tensor([1.0, 0.0, 1.0, 0.0])  # objects 200 px apart
    for rows in torch.arange(200).reshape(20, 10):
        shift = 0.35 * (gt[rows, 2] - gt[rows, 0])  # IoU 0.65 / 1.35 = 0.48 with its gt
        far = gt[rows] + apart + shift[:, None] * torch.tensor([1.0, 0.0, 1.0, 0.0])
        per_image_features.append(torch.cat((features[rows], torch.full_like(features[rows], 50.0))))
        per_image_proposals.append(torch.cat((proposals[rows] + apart, far)))
        per_image_gt.append(gt[rows] + apart)
        per_image_labels.append(torch.ones(10, dtype=torch.int64))
    regressors = BoxRegressors(num_classes=2, lambdas=(1e-4, 1e-2, 1.0))
    regressors.fit(per_image_features, per_image_proposals, per_image_gt, per_image_labels)
    assert regressors.num_examples.tolist() == [int((iou >= 0.6).sum())]
    test_f, test_p, test_g, test_c = synthetic(40, generator, 1, mixing)
    assert (regressors.predict(test_f, test_p, test_c) - test_g).abs().max() < 0.05

    # save / load round trip
    loaded = BoxRegressors.load(regressors.save(tmp_path / "bbox.safetensors"))
    assert torch.equal(loaded.predict(test_f, test_p, test_c), regressors.predict(test_f, test_p, test_c))
    assert loaded.chosen_lambdas.tolist() == regressors.chosen_lambdas.tolist()
    assert loaded.box_coder.weights == BoxCoder().weights
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        BoxRegressors.load(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="classes must lie in 1..1"):
        regressors.predict(test_f, test_p, torch.full((40,), 2))


def test_class_without_examples_leaves_boxes_unchanged() -> None:
    generator = torch.Generator().manual_seed(3)
    features, proposals, gt, classes = synthetic(50, generator, 1, torch.randn(4, 4, generator=generator))
    regressors = BoxRegressors(num_classes=3).fit_examples(features, proposals, gt, classes)
    assert np.isnan(regressors.chosen_lambdas[1]) and regressors.num_examples.tolist() == [50, 0]
    unchanged = regressors.predict(features[:5], proposals[:5], torch.full((5,), 2))
    assert torch.allclose(unchanged, proposals[:5], atol=1e-4)
