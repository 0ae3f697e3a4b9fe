"""The package's structure: layers, imports, single registration of tensors, injectable parts.

The layers, lowest first; a module may import only from its own layer or lower ones, and the
import graph (imports inside functions included) has no cycle. See docs/architecture.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from rcnn.config import MODEL_NAMES
from rcnn.models import MODELS, FasterRCNN, MaskRCNN, fast_rcnn, faster_rcnn, mask_rcnn, rcnn

PACKAGE = Path(__file__).resolve().parent.parent / "rcnn"
LAYERS = {  # layer -> the packages and modules in it
    "io": ("rcnn.io",),
    "core": ("rcnn.core",),
    "data": ("rcnn.data", "rcnn.evaluation", "rcnn.viz"),
    "components": ("rcnn.components",),
    "models": ("rcnn.models",),
    "build": ("rcnn.config", "rcnn.build"),
    "deploy": ("rcnn.deploy",),
    "inference": ("rcnn.inference", "rcnn.explain"),
    "training": ("rcnn.training",),
    "commands": ("rcnn.commands", "rcnn.cli", "rcnn.serve"),
}
RANK = {layer: i for i, layer in enumerate(LAYERS)}


def modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def layer_of(module: str) -> str | None:
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None  # the package's own __init__


def imports_of(module: str, known: set[str]) -> set[str]:
    """The rcnn modules ``module`` imports anywhere in its file (functions included)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != module}
    return found


def test_every_module_belongs_to_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == ["rcnn"]


def test_imports_follow_the_layers_without_cycles():
    known = set(modules())
    graph = {m: imports_of(m, known) for m in known}
    wrong = [
        f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(m) is not None and layer_of(t) is not None and RANK[layer_of(t)] > RANK[layer_of(m)]
    ]
    assert wrong == [], "imports against the layering:\n" + "\n".join(sorted(wrong))
    assert graph["rcnn"] == set(), "the package's __init__ imports nothing of its own"
    # no cycle: a depth-first search that never meets a module on its own path
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_module_imports_alone():
    """Each module imported first, in a process where no rcnn module was imported before: an import
    that works only when another module happens to be loaded first (a hidden cycle) fails here.
    One interpreter loads the third-party libraries once, then forks a child per module."""
    script = r"""
import importlib, os, sys, traceback
import numpy, PIL.Image, cv2, pycocotools.coco, pydantic, safetensors.torch, sklearn.svm, sklearn.linear_model
import torch, torchvision, yaml, tqdm, matplotlib
assert not [m for m in sys.modules if m == "rcnn" or m.startswith("rcnn.")]
failed = []
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc(limit=4).encode())
            code = 1
        os._exit(code)
    os.close(write)
    message = b""
    while chunk := os.read(read, 65536):
        message += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(f"{name}:\n{message.decode()}")
print("\n".join(failed) if failed else "ok")
"""
    names = modules()
    out = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1:] == ["ok"], out.stdout[-5000:]


def _model_names_compared(path: Path) -> list[str]:
    """Comparisons of a ``name`` (``config.model.name``, ``model.name``) with a model name literal
    ("rcnn" ... "mask_rcnn") in a source file: dispatch on the model's kind by its name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if not any(isinstance(x, ast.Attribute) and x.attr == "name" or isinstance(x, ast.Name) and x.id == "name"
                       for x in sides):  # fmt: skip
                continue
            literals = list(sides)
            for item in list(literals):
                if isinstance(item, (ast.Tuple, ast.List, ast.Set)):
                    literals += item.elts
            if any(isinstance(x, ast.Constant) and x.value in MODEL_NAMES for x in literals):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_no_dispatch_on_model_name_strings():
    """What a model can do is read from its class (needs_proposals, predicts_masks, ...)."""
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _model_names_compared(path)]
    assert found == []
    assert [cls.name for cls in MODELS.values()] == list(MODEL_NAMES)
    assert [m.needs_proposals for m in MODELS.values()] == [True, True, False, False]
    assert [m.predicts_masks for m in MODELS.values()] == [False, False, False, True]
    assert [m.trains_in_stages for m in MODELS.values()] == [True, False, False, False]
    assert [m.has_rpn for m in MODELS.values()] == [False, False, True, True]


@pytest.mark.parametrize(
    "build",
    [
        lambda: rcnn("tiny", 4, warp_size=32, context_padding=2),
        lambda: rcnn("vgg16", 4),
        lambda: fast_rcnn("tiny", 4),
        lambda: fast_rcnn("resnet50", 4),
        lambda: faster_rcnn("tiny", 4),
        lambda: faster_rcnn("resnet50_fpn", 4),
        lambda: faster_rcnn("mobilenet_v3_fpn", 4),
        lambda: mask_rcnn("tiny", 4),
        lambda: mask_rcnn("resnet50_fpn", 4),
    ],
)
def test_no_tensor_is_registered_twice(build):
    model = build()
    state = model.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    for key, tensor in state.items():
        assert id(tensor) not in seen, f"{key} is {seen[id(tensor)]} again"
        seen[id(tensor)] = key
    storages = {}
    for key, tensor in state.items():
        if tensor.numel():
            ptr = tensor.untyped_storage().data_ptr()
            assert ptr not in storages, f"{key} shares its storage with {storages[ptr]}"
            storages[ptr] = key


def test_models_take_a_torchvision_backbone_module():
    """Injectable parts, as torchvision's: its FPN backbone (a dict of levels with an RPN-only
    'pool') goes into our Faster R-CNN, which trains and predicts with it."""
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=5
    )
    model = FasterRCNN(backbone, 3, min_size=96, max_size=96)
    assert model.strides == (4, 8, 16, 32, 64) and model.pool_strides == (4, 8, 16, 32)
    assert model.roi_heads.pooler.kind == "align" and model.num_classes == 3
    model.train()
    target = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([2])}
    losses = model([torch.rand(3, 96, 96)], [target])
    sum(losses.values()).backward()
    assert backbone.body.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 80, 100)])
    assert set(out) == {"boxes", "labels", "scores"}


def test_a_users_own_parts_are_used():
    class OneLevel(torch.nn.Module):
        out_channels = 16

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, stride=8, padding=1)

        def forward(self, x):
            return self.conv(x)

    base = faster_rcnn("tiny", 4)
    model = FasterRCNN(OneLevel(), rpn=base.rpn.__class__(base.rpn.anchor_generator, type(base.rpn.head)(16, 9),
                                                           (8,), base.rpn.settings),
                       roi_heads=None, num_classes=4, min_size=64, max_size=64)  # fmt: skip
    assert model.strides == (8,) and model.rpn.head.conv.in_channels == 16
    with pytest.raises(ValueError, match="configure the RPN the model builds"):
        FasterRCNN(OneLevel(), 4, rpn=model.rpn, anchor_sizes=[[16, 32]])
    with pytest.raises(ValueError, match="out_channels"):
        FasterRCNN(torch.nn.ReLU(), 4)
    with pytest.raises(ValueError, match="num_classes"):
        FasterRCNN(OneLevel())


def test_typed_settings_fail_at_construction_and_config_load(tmp_path, capsys):
    from rcnn.cli import main
    from rcnn.config import load_config

    with pytest.raises(ValueError, match=r"rpn\.nms_thresh: Input should be a valid number"):
        faster_rcnn("tiny", 3, rpn={"nms_thresh": "abc"})
    with pytest.raises(ValueError, match=r"rpn\.nms_thresh: Input should be less than or equal to 1"):
        faster_rcnn("tiny", 3, rpn={"nms_thresh": 7})
    with pytest.raises(ValueError, match=r"roi\.batch_size_per_image: Input should be greater than 0"):
        fast_rcnn("tiny", 3, roi={"batch_size_per_image": 0})
    with pytest.raises(ValueError, match=r"FasterRCNN: anchor_offset: Input should be less than or equal to 1"):
        faster_rcnn("tiny", 3, anchor_offset=2)
    with pytest.raises(ValueError, match=r"FastRCNN: rpn: unknown field"):
        fast_rcnn("tiny", 3, rpn={})
    for value in ("abc", "7", "'{fg_iou_thresh: 0.2}'"):
        with pytest.raises(ValueError, match=r"model\.rpn\.nms_thresh"):
            load_config("faster_rcnn_tiny_shapes", [f"model.rpn.nms_thresh={value}"])
    # constraints between fields are checked against the backbone's defaults, when the model is built
    with pytest.raises(ValueError, match=r"rpn: bg_iou_thresh \(0.5\) must not exceed fg_iou_thresh \(0.4\)"):
        faster_rcnn("tiny", 3, rpn={"fg_iou_thresh": 0.4, "bg_iou_thresh": 0.5})
    # the CLI refuses before any training starts, naming the field
    code = main(["train", "--config", "faster_rcnn_tiny_shapes", "--set", "model.rpn.nms_thresh=abc",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2 and "model.rpn.nms_thresh: Input should be a valid number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_mask_rcnn_is_faster_rcnn_with_mask_roi_heads():
    model = mask_rcnn("tiny", 4, mask={"num_convs": 1, "channels": 8})
    assert isinstance(model, FasterRCNN) and isinstance(model, MaskRCNN)
    assert {name for name, _ in model.roi_heads.named_children()} == {
        "pooler", "box_head", "predictor", "mask_pooler", "mask_head", "mask_predictor"
    }
    assert model.replace_predictor(3) == ["roi_heads.predictor", "roi_heads.mask_predictor"]
    assert model.num_classes == 3 and model.roi_heads.mask_predictor.num_classes == 3


def test_legacy_checkpoint_keys_load(tmp_path):
    """A checkpoint written with the box head under the backbone (rcnn 0.1) loads into today's model."""
    from safetensors.torch import save_file

    from rcnn.io.checkpoints import load_checkpoint

    source = mask_rcnn("tiny", 4, mask={"num_convs": 1, "channels": 8})
    legacy = OrderedDict()
    for key, value in source.state_dict().items():
        key = key.replace("roi_heads.box_head.", "backbone.box_head.")
        key = key.replace("roi_heads.mask_head.convs.", "roi_heads.mask_branch.head.convs.")
        key = key.replace("roi_heads.mask_predictor.deconv.", "roi_heads.mask_branch.head.deconv.")
        key = key.replace("roi_heads.mask_predictor.logits.", "roi_heads.mask_branch.head.predictor.")
        legacy[key] = value.contiguous()
    ckpt = tmp_path / "step_0000001"
    ckpt.mkdir()
    save_file(dict(legacy), str(ckpt / "model.safetensors"))
    (ckpt / "state.json").write_text('{"iteration": 1}')
    target = mask_rcnn("tiny", 4, mask={"num_convs": 1, "channels": 8})
    load_checkpoint(ckpt, target)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
