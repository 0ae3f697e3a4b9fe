"""The CUDA path: every generation trains and predicts on a GPU, and agrees with the CPU.

Skipped where no CUDA device is present (CI has none). The Faster and Mask R-CNN overfit tests
(tests/test_faster_rcnn.py, tests/test_mask_rcnn.py) also run on CUDA, with and without mixed
precision, and on a GPU machine the rest of the suite trains there too (``train.device: auto``).
"""

import numpy as np
import pytest
import torch

from rcnn.components.ridge import BoxRegressors
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import shapes_paths
from rcnn.models import fast_rcnn, faster_rcnn, mask_rcnn, rcnn
from rcnn.core.ops import roi_align
from rcnn.components.svm import ClassSVMs

pytestmark = pytest.mark.cuda
SMALL = dict(
    min_size=128, max_size=128,
    rpn={"pre_nms_top_n_train": 1000, "post_nms_top_n_train": 300, "pre_nms_top_n_test": 500, "post_nms_top_n_test": 100},
    roi={"batch_size_per_image": 64, "bg_iou_thresh_lo": 0.0, "nms_thresh": 0.5, "box_loss_beta": 1 / 9},
)  # fmt: skip


@pytest.fixture(scope="module")
def shapes_train(shapes_root):
    return CocoDetection(*shapes_paths(shapes_root, "train"), train=True)


def same_detections(cpu_out, gpu_out, top=5):
    """The highest-scoring detections agree (floating-point order differs between devices, so
    detections near a threshold may come or go; the top ones may not)."""
    for a, b in zip(cpu_out, gpu_out):
        assert all(v.device.type == "cuda" for v in b.values())
        n = min(top, len(a["scores"]), len(b["scores"]))
        assert n > 0
        torch.testing.assert_close(b["scores"][:n].cpu(), a["scores"][:n], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(b["boxes"][:n].cpu(), a["boxes"][:n], atol=0.1, rtol=1e-3)
        assert b["labels"][:n].cpu().tolist() == a["labels"][:n].tolist()


def test_roi_align_gradient_on_cuda_equals_cpu():
    """The CPU backward is ours (``rcnn.core.fastpaths.roi_align_grad``), CUDA's is torchvision's: equal."""
    torch.manual_seed(0)
    features = torch.randn(2, 8, 20, 24, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 15.5, 12.0], [1, -3.0, 4.0, 30.0, 25.0], [0, 5.2, 5.2, 5.9, 6.1]], dtype=torch.float64)
    grads = []
    for device in ("cpu", "cuda"):
        x = features.to(device).detach().requires_grad_()
        out = roi_align(x, rois.to(device), (7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)
        (out * torch.arange(out.numel(), device=device, dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("builder", [faster_rcnn, mask_rcnn])
def test_eval_on_cuda_matches_cpu(builder, shapes_train):
    torch.manual_seed(0)
    model = builder("tiny", shapes_train.num_classes, **SMALL).eval()
    model.roi_heads.settings.score_thresh = 0.0
    images = [shapes_train[i][0] for i in range(2)]
    with torch.inference_mode():
        cpu_out = model(images)
        model.cuda()
        gpu_out = model([im.cuda() for im in images])
    same_detections(cpu_out, gpu_out)
    if builder is mask_rcnn:
        for a, b in zip(cpu_out, gpu_out):
            n = min(5, len(a["scores"]))
            assert b["masks"].shape[1:] == a["masks"].shape[1:] and b["masks"].device.type == "cuda"
            agree = (b["masks"][:n].cpu() > 0.5) == (a["masks"][:n] > 0.5)
            assert agree.float().mean() > 0.999


def test_fast_rcnn_and_rcnn_take_proposals_on_cuda(shapes_train):
    torch.manual_seed(0)
    image, target = shapes_train[0]
    gt = target["boxes"]
    proposals = torch.cat((gt, gt.repeat(8, 1) + torch.randn(8 * len(gt), 4) * 3, torch.tensor([[0.0, 0.0, 127.0, 127.0]])))
    fast = fast_rcnn("tiny", shapes_train.num_classes, min_size=128, max_size=128).cuda()
    losses = fast([image.cuda()], [{k: v.cuda() for k, v in target.items() if torch.is_tensor(v)}], proposals=[proposals.cuda()])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is None or p.grad.device.type == "cuda" for p in fast.parameters())
    fast.eval()
    fast.roi_heads.settings.score_thresh = 0.0
    with torch.inference_mode():
        gpu_out = fast([image.cuda()], proposals=[proposals.cuda()])
        fast.cpu()
        cpu_out = fast([image], proposals=[proposals])
    same_detections(cpu_out, gpu_out, top=3)

    model = rcnn("tiny", shapes_train.num_classes, warp_size=32, context_padding=2, regression_features="fc7").eval()
    rng = np.random.default_rng(0)
    svms, regressors = ClassSVMs(shapes_train.num_classes), BoxRegressors(shapes_train.num_classes)
    k = shapes_train.num_classes - 1
    svms.weights = rng.normal(size=(256, k)).astype(np.float32) * 0.1
    svms.biases = np.full(k, 2.0, dtype=np.float32)
    regressors.weights = rng.normal(size=(k, 256, 4)).astype(np.float32) * 1e-3
    model.set_svms(svms)
    model.set_box_regressors(regressors)
    with torch.inference_mode():
        cpu_out = model([image], proposals=[proposals])
        model.cuda()
        gpu_out = model([image.cuda()], proposals=[proposals.cuda()])
    same_detections(cpu_out, gpu_out, top=3)


def test_cli_trains_and_predicts_on_cuda(shapes_root, tmp_path):
    from rcnn.cli import main

    run = tmp_path / "run"
    args = ["--config", "mask_rcnn_tiny_shapes", "--set", f"data.root={shapes_root}", "--set", "data.shapes=null",
            "--set", "train.iterations=4", "--set", "train.batch_size=2", "--set", "train.device=cuda"]  # fmt: skip
    assert main(["train", *args, "--out", str(run)]) == 0
    images = sorted((shapes_root / "images" / "val").glob("*.png"))[:1]
    assert main(["predict", "--weights", str(run), *map(str, images), "--out", str(tmp_path / "pred"), "--score-thresh", "0.0"]) == 0
    assert (tmp_path / "pred" / f"{images[0].name}.json").is_file()
