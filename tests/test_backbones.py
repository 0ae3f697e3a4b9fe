"""Backbones: output strides, heads, loading local checkpoints, freezing, BN folding, foreign modules."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.ops import FrozenBatchNorm2d

from rcnn.components.backbones import (
    BACKBONES,
    build_backbone,
    feature_strides,
    fold_batchnorm,
    load_pretrained,
    parts_state_dict,
)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_shapes_and_strides(name):
    backbone, box_head = build_backbone(name)
    backbone.eval()
    with torch.no_grad():
        feats = backbone(torch.rand(1, 3, 128, 160))
        assert len(feats) == len(backbone.strides)
        for f, s in zip(feats, backbone.strides):
            assert f.shape[1] == backbone.out_channels
            assert abs(f.shape[-1] - 160 / s) <= 1 and abs(f.shape[-2] - 128 / s) <= 1
        pooled = torch.rand(3, backbone.out_channels, box_head.pool_size, box_head.pool_size)
        assert box_head(pooled).shape == (3, box_head.out_features)
    assert backbone.pool_strides == backbone.strides[: len(backbone.pool_strides)]
    # the two parts share no tensor: each is registered once in a detector
    head_ids = {id(t) for t in box_head.state_dict(keep_vars=True).values()}
    assert not head_ids & {id(t) for t in backbone.state_dict(keep_vars=True).values()}


def test_strides_of_foreign_backbones_are_measured():
    """A user's module with out_channels: a tensor, a list or torchvision's dict with an RPN-only 'pool'."""

    class Plain(torch.nn.Module):
        out_channels = 8

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)

        def forward(self, x):
            return self.conv(x)

    assert feature_strides(Plain()) == ((4,), (4,))
    fpn = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=5
    )
    assert feature_strides(fpn) == ((4, 8, 16, 32, 64), (4, 8, 16, 32))

    class Dict(Plain):
        def forward(self, x):
            return OrderedDict(a=self.conv(x), b=self.conv(x)[..., ::2, ::2])

    assert feature_strides(Dict()) == ((4, 8), (4, 8))
    with pytest.raises(ValueError, match="out_channels"):
        feature_strides(torch.nn.ReLU())

    class Odd(Plain):
        out_channels = 5

    with pytest.raises(ValueError, match="expected \\[N, 5, H, W\\]"):
        feature_strides(Odd())


@pytest.mark.parametrize(
    "name, factory",
    [("vgg16", torchvision.models.vgg16), ("resnet50_fpn", torchvision.models.resnet50),
     ("resnet50", torchvision.models.resnet50), ("mobilenet_v3_fpn", torchvision.models.mobilenet_v3_large),
     ("alexnet", torchvision.models.alexnet)],
)
def test_load_torchvision_checkpoint(tmp_path, name, factory):
    reference = factory(weights=None)
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    parts = build_backbone(name, pretrained=path)
    backbone, box_head = parts
    report = load_pretrained(parts, path)
    body_missing = [k for k in report.missing if k.startswith("body.")]
    assert body_missing == []
    assert all(k.startswith(("fc.", "classifier.")) for k in report.unexpected)
    first_key = next(iter(reference.state_dict()))
    own = dict(backbone.named_parameters()) | dict(backbone.named_buffers())
    mapped = [k for k in own if k.endswith(first_key.split(".", 1)[1]) and k.startswith("body.")][0]
    torch.testing.assert_close(own[mapped], reference.state_dict()[first_key])
    if name == "vgg16":  # fc6/fc7 go to the box head
        torch.testing.assert_close(box_head.classifier[0].weight, reference.classifier[0].weight)
    if name in ("resnet50", "resnet50_fpn", "mobilenet_v3_fpn"):  # pretrained -> frozen BN
        assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())


def test_load_own_layout_safetensors_and_errors(tmp_path):
    source = build_backbone("tiny")
    for part in source:
        for p in part.parameters():
            p.data.normal_()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in parts_state_dict(source).items()}, str(path))
    target = build_backbone("tiny")
    report = load_pretrained(target, path)
    assert report.missing == [] and report.unexpected == []
    for part_a, part_b in zip(source, target):
        for a, b in zip(part_a.parameters(), part_b.parameters()):
            torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("tiny", pretrained=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_pretrained(target, bad)
    with pytest.raises(ValueError, match="shares no tensor"):
        load_pretrained(build_backbone("vgg16"), path)
    torch.save({"body.0.0.weight": torch.zeros(1, 1, 1, 1)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape"):
        load_pretrained(target, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet1000")


def test_freeze_stages():
    backbone, box_head = build_backbone("vgg16", trainable_stages=3)
    frozen = [p.requires_grad for p in backbone.body[:10].parameters()]
    trainable = [p.requires_grad for p in backbone.body[10:].parameters()]
    assert not any(frozen) and all(trainable)
    assert all(p.requires_grad for p in box_head.parameters())
    with pytest.raises(ValueError, match="trainable_stages"):
        build_backbone("tiny", trainable_stages=9)


@pytest.mark.parametrize("norm", ["frozen", "bn"])
def test_fold_batchnorm_keeps_outputs(norm):
    backbone = build_backbone("mobilenet_v3_fpn", norm=norm).backbone.eval()
    g = torch.Generator().manual_seed(0)
    for m in backbone.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    x = torch.rand(1, 3, 96, 96, generator=g)
    with torch.no_grad():
        before = backbone(x)
        assert fold_batchnorm(backbone) > 40
        after = backbone(x)
    assert not any(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in backbone.modules())
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet50_fpn", "mobilenet_v3_fpn"])
def test_the_pyramid_upsamples_by_a_fixed_factor_only_where_exact(name):
    """Padded inputs: the strides' ratio (2; 1 for MobileNetV3's two stride-32 maps), as
    torchvision's size-read upsampling gives; other sizes and other padding: by size."""
    from rcnn.components.backbones import PyramidNetwork

    backbone, _ = build_backbone(name)
    fpn = backbone.fpn
    assert isinstance(fpn, PyramidNetwork) and fpn.factors is None  # a bare backbone knows no padding
    peer = torchvision.ops.FeaturePyramidNetwork(
        [b[0].in_channels for b in fpn.inner_blocks], 256, extra_blocks=torchvision.ops.feature_pyramid_network.LastLevelMaxPool()
    )
    peer.load_state_dict(fpn.state_dict())
    inputs = backbone.strides[: len(fpn.inner_blocks)]  # P6 is made by the pyramid
    fpn.fix_factors(32, inputs)
    assert fpn.factors == {"resnet50_fpn": (2, 2, 2), "mobilenet_v3_fpn": (1,)}[name]
    backbone.eval()
    with torch.no_grad():
        for size in ((128, 160), (97, 131)):  # padded; and a size no padding made (falls back)
            body = backbone._body_forward(backbone.body, torch.rand(1, 3, *size))
            maps = {str(i): f for i, f in enumerate(body)}
            ours, theirs = fpn(maps), peer(maps)
            assert list(ours) == list(theirs)
            for a, b in zip(ours.values(), theirs.values()):
                assert torch.equal(a, b)
    fpn.fix_factors(1, inputs)
    assert fpn.factors is None
    with pytest.raises(ValueError, match="strides for"):
        fpn.fix_factors(32, backbone.strides)


def test_a_detector_fixes_its_pyramid_factors_from_its_padding():
    from rcnn.models import faster_rcnn

    model = faster_rcnn("resnet50_fpn", 3)
    assert model.transform.size_divisible == 32 and model.backbone.fpn.factors == (2, 2, 2)
