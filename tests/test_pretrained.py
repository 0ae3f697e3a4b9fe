"""Published weights by name (``rcnn train --pretrained NAME``): resolved from torchvision's weight
enums, downloaded once into the torch hub cache with the hash checked, converted and fine-tuned.

No test reaches the internet: a mirror on 127.0.0.1 (``RCNN_WEIGHTS_URL``) serves small generated
files. Their SHA-256 cannot match the published prefixes, so the tests that must get past the
hash check publish each file under its own hash (the file name torchvision would give it); the
others serve files under the real published names, and their hash check fails as it must.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from rcnn.build import load_model
from rcnn.cli import main
from rcnn.config import load_config
from rcnn.deploy import published
from rcnn.deploy.published import (
    BACKBONE_WEIGHTS,
    DETECTORS,
    WeightsUnavailable,
    fetch_weights,
    pretrained_config,
    published_weights,
)
from rcnn.training.run import run_training

QUIET = dict(progress=False, log=lambda s: None)
ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the smallest detection checkpoint (19 M parameters)
SMALL = ["train.iterations=1", "train.batch_size=2", "train.warmup_iterations=0", "train.checkpoint_every=100",
         "data.workers=0", "model.min_size=128", "model.max_size=128"]  # fmt: skip


class Mirror:
    """An HTTP server on 127.0.0.1, in a thread, serving ``files`` by file name; it records each
    request and cuts the next ``cut_short`` transfers off halfway (the full length announced)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[str] = []
        self.cut_short = 0
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                body = mirror.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mirror.cut_short > 0:
                    mirror.cut_short -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/models/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Mirror:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """A torch hub cache of the test's own (``TORCH_HOME``), and no proxy between us and 127.0.0.1."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub" / "checkpoints"


def publish(monkeypatch, name: str, payload: bytes) -> str:
    """Make ``payload`` torchvision's published weights ``name``: the file name it would have."""
    file_name = f"{name}-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    real = published._published_url
    monkeypatch.setattr(published, "_published_url",
                        lambda n: f"https://download.pytorch.org/models/{file_name}" if n == name else real(n))  # fmt: skip
    return file_name


def saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_names_resolve_to_torchvisions_urls_and_hashes(monkeypatch):
    weights = published_weights("fasterrcnn_resnet50_fpn")
    assert weights.url == "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert (weights.kind, weights.hash_prefix) == ("detector", "258fb6c6")
    assert published_weights("alexnet").hash_prefix == "7be5be79"  # alexnet-owt-7be5be79.pth
    for name in (*DETECTORS, *BACKBONE_WEIGHTS):
        weights = published_weights(name)
        assert weights.url == torchvision.models.get_model_weights(name).DEFAULT.url
        assert len(weights.hash_prefix) >= 8 and weights.file_name.startswith(name)
    resnet = published_weights("resnet50")
    monkeypatch.setenv("RCNN_WEIGHTS_URL", "http://mirror.example/torch/")
    assert resnet.download_url() == f"http://mirror.example/torch/{resnet.file_name}"
    monkeypatch.setenv("RCNN_WEIGHTS_URL", "mirror.example/torch")
    with pytest.raises(ValueError, match="RCNN_WEIGHTS_URL=mirror.example/torch: not a URL"):
        published_weights("resnet50").download_url()
    with pytest.raises(ValueError, match="unknown pretrained weights 'resnet18'; choose a COCO detector"):
        published_weights("resnet18")


def test_every_name_is_listed_in_the_train_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert [name for name in (*DETECTORS, *BACKBONE_WEIGHTS) if name not in text] == []


def test_download_once_then_from_the_cache(hub, monkeypatch):
    payload = b"weights " * 1000
    file_name = publish(monkeypatch, "resnet50", payload)
    with Mirror({file_name: payload}) as mirror:
        monkeypatch.setenv("RCNN_WEIGHTS_URL", mirror.url)
        fetched = fetch_weights("resnet50", **QUIET)
        assert fetched.path == hub / file_name and fetched.path.read_bytes() == payload
        assert fetched.source == mirror.url + file_name and fetched.sha256 == hashlib.sha256(payload).hexdigest()
        assert mirror.requests == [f"/models/{file_name}"]
        again = fetch_weights("resnet50", **QUIET)
        assert (again.path, again.source) == (fetched.path, "cache") and len(mirror.requests) == 1
    assert sorted(p.name for p in hub.iterdir()) == [file_name]  # no temporary file left beside it
    # a local file under its published name: used in place, hash checked, no network
    local = hub.parent.parent / "elsewhere" / file_name
    local.parent.mkdir()
    local.write_bytes(payload)
    assert fetch_weights(str(local), **QUIET).source == "local file"
    local.write_bytes(payload + b"!")
    with pytest.raises(ValueError, match=f"{file_name}: its SHA-256 starts with .* not {file_name[9:17]}"):
        fetch_weights(str(local), **QUIET)
    with pytest.raises(ValueError, match="renamed.pth: not a file name torchvision publishes"):
        fetch_weights(str(local.with_name("renamed.pth")), **QUIET)


def test_hash_mismatch_is_refused_and_nothing_is_kept(hub, monkeypatch):
    weights = published_weights(ARCH)  # the real published name; the file served is another one
    with Mirror({weights.file_name: b"not the published file" * 100}) as mirror:
        monkeypatch.setenv("RCNN_WEIGHTS_URL", mirror.url)
        lines: list[str] = []
        with pytest.raises(ValueError) as error:
            fetch_weights(ARCH, progress=False, log=lines.append)
    message = str(error.value)
    assert f"{mirror.url}{weights.file_name}: the downloaded file's SHA-256 starts with" in message
    assert f"not {weights.hash_prefix}" in message and "twice; nothing was kept" in message and "\n" not in message
    assert len(mirror.requests) == 2 and "trying once more" in lines[-1]
    assert list(hub.iterdir()) == []  # neither the file nor a partial one


def test_an_interrupted_transfer_is_retried_or_refused_cleanly(hub, monkeypatch):
    payload = bytes(range(256)) * 400
    file_name = publish(monkeypatch, "mobilenet_v3_large", payload)
    with Mirror({file_name: payload}) as mirror:
        monkeypatch.setenv("RCNN_WEIGHTS_URL", mirror.url)
        mirror.cut_short = 2  # both tries cut off halfway
        with pytest.raises(ValueError, match="twice; nothing was kept"):
            fetch_weights("mobilenet_v3_large", **QUIET)
        assert len(mirror.requests) == 2 and list(hub.iterdir()) == []
        mirror.cut_short = 1  # the second try gets it all
        lines: list[str] = []
        fetched = fetch_weights("mobilenet_v3_large", progress=False, log=lines.append)
        assert len(mirror.requests) == 4 and any("trying once more" in line for line in lines)
        assert fetched.path.read_bytes() == payload and sorted(p.name for p in hub.iterdir()) == [file_name]


def test_offline_says_in_one_line_which_url_and_how_to_pass_the_file(hub, monkeypatch, tmp_path, capsys):
    mirror = f"http://127.0.0.1:{free_port()}/models"  # nothing listens there
    monkeypatch.setenv("RCNN_WEIGHTS_URL", mirror)
    weights = published_weights(ARCH)
    code = main(["train", "--config", "faster_rcnn_tiny_shapes", "--pretrained", ARCH, "--out", str(tmp_path / "run"),
                 "--set", f"data.root={tmp_path / 'no-data'}", "--set", "data.shapes=null"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"cannot download {mirror}/{weights.file_name} (" in err
    assert f"put {weights.file_name} at {hub / weights.file_name}" in err
    assert f"--pretrained /path/to/{weights.file_name}" in err
    assert not hub.exists() or list(hub.iterdir()) == []
    with pytest.raises(WeightsUnavailable):
        fetch_weights(ARCH, **QUIET)


def test_the_model_section_follows_a_detection_checkpoint(shapes_root, tmp_path):
    overrides = [f"data.root={shapes_root}", "data.shapes=null", "train.lr=0.001", "model.min_size=160"]
    config = pretrained_config(load_config("faster_rcnn_tiny_shapes", overrides), ARCH, overrides)
    model = config.model
    assert (model.name, model.backbone, model.min_size, model.max_size) == ("faster_rcnn", "mobilenet_v3_fpn", 160, 640)
    assert model.torchvision_compat and model.rpn.score_thresh == 0.05 and model.anchor_sizes is None  # not the file's
    assert config.train.lr == 0.001 and config.train.pretrained == ARCH and config.data.root == str(shapes_root)
    # ImageNet weights go into the config's backbone, which must fit them
    with pytest.raises(ValueError, match="fit the backbones resnet50_fpn, resnet50_fpn_v2, resnet50, not "
                                         "model.backbone=tiny; add --set model.backbone=resnet50_fpn"):  # fmt: skip
        pretrained_config(load_config("faster_rcnn_tiny_shapes"), "resnet50")
    with pytest.raises(ValueError, match="train.pretrained: train.init_from gives the starting weights too"):
        pretrained_config(load_config("faster_rcnn_tiny_shapes", ["train.init_from=runs/x"]), ARCH)
    with pytest.raises(ValueError, match="train.pretrained: maskrcnn_resnet50_fpn is a mask_rcnn with backbone"):
        run_training(load_config("faster_rcnn_tiny_shapes", ["train.pretrained=maskrcnn_resnet50_fpn"]),
                     tmp_path / "run", **QUIET)  # fmt: skip


def test_fine_tune_a_downloaded_coco_detector_from_the_cli(hub, monkeypatch, shapes_root, tmp_path, capsys):
    torch.manual_seed(0)
    peer = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    state = peer.state_dict()
    payload = saved(state)
    file_name = publish(monkeypatch, ARCH, payload)
    run = tmp_path / "run"
    with Mirror({file_name: payload}) as mirror:
        monkeypatch.setenv("RCNN_WEIGHTS_URL", mirror.url)
        args = ["train", "--config", "faster_rcnn_tiny_shapes", "--pretrained", ARCH, "--out", str(run), "--no-eval",
                "--set", f"data.root={shapes_root}", "--set", "data.shapes=null"]  # fmt: skip
        for item in SMALL:
            args += ["--set", item]
        assert main(args) == 0
        assert len(mirror.requests) == 1
    out = capsys.readouterr().out
    assert f"initialised from {hub / file_name}" in out
    assert "roi_heads.predictor newly initialised (5 classes instead of the source's)" in out
    record = json.loads((run / "pretrained.json").read_text())
    assert record["url"] == f"https://download.pytorch.org/models/{file_name}"
    assert record["source"] == mirror.url + file_name and record["sha256"] == hashlib.sha256(payload).hexdigest()
    recorded = yaml.safe_load((run / "last" / "config.yaml").read_text())
    assert recorded["train"]["pretrained"] == ARCH
    assert (recorded["model"]["backbone"], recorded["model"]["min_size"], recorded["model"]["trainable_stages"]) == (
        "mobilenet_v3_fpn", 128, 3)
    tuned = load_model(run, for_inference=False)
    assert tuned.model.num_classes == 6 and tuned.class_names[0] == "__background__"
    weights = tuned.model.state_dict()
    for key in ("backbone.body.0.0.weight", "backbone.body.3.block.0.0.weight"):  # frozen stages: as downloaded
        assert torch.equal(weights[key], state[key]), key
    assert not torch.equal(weights["roi_heads.predictor.cls_score.weight"][:1], state["roi_heads.box_predictor.cls_score.weight"][:1])


def test_imagenet_backbone_from_python(hub, monkeypatch, shapes_root, tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    payload = saved(state)
    file_name = publish(monkeypatch, "mobilenet_v3_large", payload)
    overrides = [f"data.root={shapes_root}", "data.shapes=null", "model.backbone=mobilenet_v3_fpn",
                 "model.anchor_sizes=null", "model.trainable_stages=3", *SMALL]  # fmt: skip
    config = pretrained_config(load_config("faster_rcnn_tiny_shapes", overrides), "mobilenet_v3_large", overrides)
    assert config.model.backbone == "mobilenet_v3_fpn" and config.model.pretrained_backbone is None
    with Mirror({file_name: payload}) as mirror:
        monkeypatch.setenv("RCNN_WEIGHTS_URL", mirror.url)
        summary = run_training(config, tmp_path / "run", evaluate=False, **QUIET)
        assert len(mirror.requests) == 1
    assert summary["pretrained"]["kind"] == "backbone" and summary["pretrained"]["path"] == str(hub / file_name)
    recorded = yaml.safe_load((tmp_path / "run" / "last" / "config.yaml").read_text())
    assert recorded["model"]["pretrained_backbone"] == str(hub / file_name) and recorded["model"]["backbone_norm"] == "frozen"
    weights = load_model(tmp_path / "run", for_inference=False).model.state_dict()
    assert torch.equal(weights["backbone.body.0.0.weight"], state["features.0.0.weight"])  # a frozen stage
