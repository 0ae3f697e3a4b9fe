"""The RPN: anchor labels on crafted cases, sampling statistics, the proposal layer, overfitting."""

import torch

from rcnn.core.anchors import AnchorGenerator
from rcnn.core.boxes import box_iou
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import shapes_paths
from rcnn.components.proposals.rpn import RegionProposalNetwork, RPNHead, RPNSettings


def make_rpn(sizes=(16.0, 32.0), ratios=(1.0,), **settings):
    anchors = AnchorGenerator((sizes,), (ratios,))
    head = RPNHead(8, anchors.num_anchors_per_location[0])
    return RegionProposalNetwork(anchors, head, (8,), RPNSettings(**settings))


def test_anchor_labels_crafted():
    rpn = make_rpn()
    (anchors,) = rpn.anchor_generator.grid_anchors([(8, 8)], [8])  # 64 x 64 image, 128 anchors
    gt = torch.tensor([[4.0, 4.0, 36.0, 36.0], [44.0, 46.0, 54.0, 56.0]])  # 32x32 exact anchor; 10x10 small
    labels, matched = rpn.anchor_labels(anchors, (64, 64), gt)
    iou = box_iou(gt, anchors)
    inside = (anchors[:, :2] >= 0).all(1) & (anchors[:, 2:] <= 64).all(1)
    exact = int((iou[0] == 1).nonzero())
    assert labels[exact] == 1 and matched[exact] == 0
    # the 10x10 object overlaps no anchor above 0.7, but its best anchor is positive anyway
    best_small = iou[1].argmax()
    assert iou[1].max() < 0.7 and labels[best_small] == 1 and matched[best_small] == 1
    # negatives: inside the image, IoU < 0.3 with every gt; cross-border anchors ignored
    expected_neg = inside & (iou.max(0).values < 0.3)
    assert torch.equal(labels == 0, expected_neg)
    assert bool((labels[~inside] == -1).all())
    # the modern convention keeps cross-border anchors
    rpn_all = make_rpn(allowed_border=None)
    labels_all, _ = rpn_all.anchor_labels(anchors, (64, 64), gt)
    assert int((labels_all == 0).sum()) > int((labels == 0).sum())


def test_sampling_statistics_and_empty_image():
    rpn = make_rpn(batch_size_per_image=32, positive_fraction=0.5)
    rpn.train()
    features = [torch.randn(2, 8, 8, 8)]
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects: all negatives
    ]
    proposals, losses = rpn(features, [(64, 64), (64, 64)], targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert len(proposals) == 2 and all(p.shape[1] == 4 for p in proposals)
    (anchors,) = rpn.anchor_generator.grid_anchors([(8, 8)], [8])
    labels, _ = rpn.anchor_labels(anchors, (64, 64), targets[0]["boxes"])
    pos, neg = rpn.sampler(labels)
    assert 1 <= len(pos) <= 16 and len(pos) + len(neg) == 32


def test_proposal_layer_clips_sorts_and_limits():
    rpn = make_rpn(post_nms_top_n_test=5, pre_nms_top_n_test=50)
    rpn.eval()
    with torch.no_grad():
        proposals, losses = rpn([torch.randn(1, 8, 8, 8)], [(60, 50)])
    (props,) = proposals
    assert losses == {} and len(props) <= 5
    assert bool((props[:, 0] >= 0).all() and (props[:, 2] <= 50).all() and (props[:, 3] <= 60).all())
    assert bool(((props[:, 2] - props[:, 0]) > 0).all())


def test_rpn_alone_overfits_to_high_recall(shapes_root):
    torch.manual_seed(0)
    from rcnn.models import faster_rcnn

    images_dir, ann = shapes_paths(shapes_root, "train")
    data = CocoDetection(images_dir, ann, train=True)
    items = [data[i] for i in range(4)]
    model = faster_rcnn("tiny", data.num_classes, min_size=128, max_size=128, rpn={"post_nms_top_n_test": 50})
    model.set_train_mode("rpn")
    model.train()
    params = [p for n, p in model.named_parameters() if not n.startswith("roi_heads")]
    opt = torch.optim.SGD(params, lr=0.02, momentum=0.9)
    for _ in range(120):
        losses = model([im for im, _ in items], [t for _, t in items])
        assert set(losses) == {"loss_objectness", "loss_rpn_box"}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    model.eval()
    hits = total = 0
    with torch.no_grad():
        batch, _, _ = model.transform([im for im, _ in items])
        proposals, _ = model.rpn(model.backbone(batch.tensors), batch.image_sizes)
    for props, (_, target) in zip(proposals, items):
        best = box_iou(target["boxes"], props).max(dim=1).values
        hits += int((best >= 0.5).sum())
        total += len(best)
    assert hits / total >= 0.9, f"recall@0.5 of 50 proposals: {hits}/{total}"
