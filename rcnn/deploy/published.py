"""Published weights by name: torchvision's COCO detectors and ImageNet backbones, downloaded once.

``rcnn train --pretrained NAME`` (``train.pretrained``; from Python :func:`pretrained_config`, then
``rcnn.training.run.run_training``) takes NAME as torchvision names its model builders:

- a detection checkpoint (:data:`DETECTORS`, every architecture :mod:`rcnn.deploy.torchvision`
  converts, e.g. ``fasterrcnn_resnet50_fpn_v2``): the ``model`` section becomes that
  architecture's (as ``rcnn convert torchvision`` writes it; ``--set model.*`` applied on top), the
  COCO weights are converted and loaded, and the class-specific layers (box and mask predictors)
  are newly initialised for the data's classes, as ``train.init_from`` does
  (``rcnn.build.initialize_from``);
- an ImageNet backbone (:data:`BACKBONE_WEIGHTS`, e.g. ``resnet50``): loaded into the config's
  backbone before training (``model.pretrained_backbone``), which must be one that the weights fit.

The URL and its SHA-256 prefix (in the file name: ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``) are
what the installed torchvision's weight enums publish (each builder's ``DEFAULT`` weights); no
model is built from ``torchvision.models.detection``. A file is downloaded once into
``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``, where torchvision keeps
it too) by ``torch.hub.download_url_to_file``, which writes a temporary file beside it and moves
it to its name only after the hash matched: the cache never holds a partial or foreign file. A
transfer cut short (caught by the hash) or broken off is tried once more, then refused with nothing
kept. A file found in the cache, or given as a local path under its published name, is hash
checked and used without any network access.

``RCNN_WEIGHTS_URL`` (a mirror, for machines behind a proxy) replaces the base of every URL; the
file name stays. Offline, the error says in one line which URL was needed and how to pass the
file instead.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from torch import nn

from rcnn.build import initialize_from
from rcnn.config import Config, apply_overrides, config_from_dict
from rcnn.deploy.torchvision import TORCHVISION_ARCHS, convert_torchvision

__all__ = [
    "BACKBONE_WEIGHTS",
    "DETECTORS",
    "MIRROR_ENV",
    "FetchedWeights",
    "PublishedWeights",
    "WeightsUnavailable",
    "apply_pretrained",
    "fetch_weights",
    "prepare_pretrained",
    "pretrained_config",
    "published_weights",
]

MIRROR_ENV = "RCNN_WEIGHTS_URL"
DETECTORS: tuple[str, ...] = tuple(TORCHVISION_ARCHS)
# torchvision's ImageNet classifiers -> the backbones of ours they load into (the first: the usual one)
BACKBONE_WEIGHTS: dict[str, tuple[str, ...]] = {
    "resnet50": ("resnet50_fpn", "resnet50_fpn_v2", "resnet50"),
    "mobilenet_v3_large": ("mobilenet_v3_fpn",),
    "vgg16": ("vgg16",),
    "alexnet": ("alexnet",),
}
_HASH = re.compile(r"-([0-9a-f]{6,})\.")  # torch.hub's convention: the SHA-256 prefix before the extension
_LOCAL_SUFFIXES = (".pth", ".pt", ".safetensors")


class WeightsUnavailable(FileNotFoundError):
    """The weights are not in the cache and could not be downloaded (offline, or not on the server)."""


@dataclass(frozen=True)
class PublishedWeights:
    """One published weights file: its builder's name, what it holds and where torchvision serves it."""

    name: str  # torchvision's builder, e.g. "fasterrcnn_resnet50_fpn"
    kind: Literal["detector", "backbone"]  # a COCO detection checkpoint or ImageNet classification weights
    url: str  # torchvision's URL (its weight enum's DEFAULT)

    def __post_init__(self) -> None:
        if _HASH.search(self.file_name) is None:  # refused before any download, not after
            raise ValueError(f"{self.url}: the file name carries no SHA-256 prefix (NAME-HASH.pth)")

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        """The leading hex digits of the file's SHA-256, as its name carries them."""
        return _HASH.search(self.file_name).group(1)  # type: ignore[union-attr]

    def download_url(self) -> str:
        """``url``, or the same file name under the mirror that ``RCNN_WEIGHTS_URL`` names."""
        mirror = os.environ.get(MIRROR_ENV, "").strip()
        if not mirror:
            return self.url
        if not re.match(r"(https?|file)://", mirror):
            raise ValueError(f"{MIRROR_ENV}={mirror}: not a URL; give the mirror's base, e.g. http://HOST/models/")
        return f"{mirror.rstrip('/')}/{self.file_name}"

    def cache_path(self) -> Path:
        """Where the file is kept: ``torch.hub.get_dir()/checkpoints/FILE`` (torchvision's place too)."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file_name


@dataclass(frozen=True)
class FetchedWeights:
    """Published weights on disk, their hash checked."""

    weights: PublishedWeights
    path: Path
    sha256: str  # of the whole file
    source: str  # the URL it was downloaded from, "cache", or "local file"

    def record(self) -> dict[str, Any]:
        """What a run folder records of them (``RUN/pretrained.json``)."""
        return {"name": self.weights.name, "kind": self.weights.kind, "url": self.weights.url,
                "file": self.weights.file_name, "sha256": self.sha256, "source": self.source,
                "path": str(self.path)}  # fmt: skip


def _published_url(name: str) -> str:
    """The URL of the ``DEFAULT`` weights of torchvision's builder ``name``, read from its weight enum."""
    return torchvision.models.get_model_weights(name).DEFAULT.url


def _choices() -> str:
    return (f"a COCO detector ({', '.join(DETECTORS)}) or an ImageNet backbone ({', '.join(BACKBONE_WEIGHTS)}), "
            "or the path of such a file under its published name")  # fmt: skip


def published_weights(name: str) -> PublishedWeights:
    """The published weights of torchvision's builder ``name`` (no download); ``ValueError`` for
    a name that is neither in :data:`DETECTORS` nor in :data:`BACKBONE_WEIGHTS`."""
    if name in DETECTORS:
        kind: Literal["detector", "backbone"] = "detector"
    elif name in BACKBONE_WEIGHTS:
        kind = "backbone"
    else:
        raise ValueError(f"unknown pretrained weights {name!r}; choose {_choices()}")
    return PublishedWeights(name, kind, _published_url(name))


def _is_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.endswith(_LOCAL_SUFFIXES)


def _weights_of(value: str) -> PublishedWeights:
    """The published weights ``value`` names: a builder's name, or a local file's published name."""
    if not _is_path(value):
        return published_weights(value)
    file_name = Path(value).name
    for name in (*DETECTORS, *BACKBONE_WEIGHTS):
        weights = published_weights(name)
        if weights.file_name == file_name:
            return weights
    raise ValueError(
        f"{value}: not a file name torchvision publishes ({_choices()}); for another torchvision detection "
        "checkpoint use `rcnn convert torchvision FILE --arch NAME --out RUN` and `rcnn train --init-from RUN`, "
        "for another backbone checkpoint model.pretrained_backbone=FILE"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked(weights: PublishedWeights, path: Path, source: str, remedy: str) -> FetchedWeights:
    sha256 = _sha256(path)
    if not sha256.startswith(weights.hash_prefix):
        raise ValueError(
            f"{path}: its SHA-256 starts with {sha256[:len(weights.hash_prefix)]}, not {weights.hash_prefix} as "
            f"published for {weights.name}: the file is damaged or another one; {remedy}"
        )
    return FetchedWeights(weights, path, sha256, source)


def _how_to_pass(weights: PublishedWeights) -> str:
    return (f"put {weights.file_name} at {weights.cache_path()}, or pass its path (--pretrained "
            f"/path/to/{weights.file_name}), or set {MIRROR_ENV} to a mirror that serves it")  # fmt: skip


def _reason(error: urllib.error.URLError) -> str:
    reason = error.reason
    return getattr(reason, "strerror", None) or str(reason)


def _download(weights: PublishedWeights, path: Path, progress: bool, log: Callable[[str], None]) -> str:
    """Download ``weights`` to ``path`` (hash checked; tried twice); the URL used."""
    url = weights.download_url()
    path.parent.mkdir(parents=True, exist_ok=True)
    problem = ""
    for attempt in (1, 2):
        try:  # a temporary file beside `path`, moved there only once the hash matched, removed otherwise
            torch.hub.download_url_to_file(url, str(path), hash_prefix=weights.hash_prefix, progress=progress)
            return url
        except urllib.error.HTTPError as exc:
            raise WeightsUnavailable(f"cannot download {url} (HTTP {exc.code} {exc.reason}); {_how_to_pass(weights)}") from None
        except urllib.error.URLError as exc:  # no connection: offline, a wrong mirror, a proxy in the way
            raise WeightsUnavailable(f"cannot download {url} ({_reason(exc)}); {_how_to_pass(weights)}") from None
        except RuntimeError as exc:  # torch.hub's hash check: a file cut short (the server closed early) or another one
            if "invalid hash value" not in str(exc):
                raise
            got = re.search(r'got "([0-9a-f]+)"', str(exc))
            problem = (f"the downloaded file's SHA-256 starts with {got.group(1)[:len(weights.hash_prefix)] if got else '?'}, "
                       f"not {weights.hash_prefix} (a transfer cut short, or another file)")  # fmt: skip
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:  # the transfer broke off
            problem = f"the transfer broke off ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
        if attempt == 1:
            log(f"{url}: {problem}; trying once more")
    raise ValueError(f"{url}: {problem}, twice; nothing was kept; try again later, or {_how_to_pass(weights)}")


def fetch_weights(name: str, *, progress: bool = True, log: Callable[[str], None] = print) -> FetchedWeights:
    """The published weights ``name`` (a builder's name, or a local file under its published name)
    on disk: from the local path, from the cache, or downloaded into the cache; hash checked."""
    weights = _weights_of(name)
    if _is_path(name):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        return _checked(weights, path, "local file", "download it again")
    path = weights.cache_path()
    if path.is_file():
        return _checked(weights, path, "cache", "delete it (it is downloaded again) or put the published file there")
    log(f"downloading {weights.name} weights into {path}")
    url = _download(weights, path, progress, log)
    return FetchedWeights(weights, path, _sha256(path), url)


def _model_overrides(overrides: Sequence[str]) -> list[str]:
    return [item for item in overrides if item.partition("=")[0].strip().startswith("model.")]


def _check_fits(config: Config, weights: PublishedWeights, name: str) -> None:
    """``ValueError`` unless the config's model is one that the weights ``name`` load into."""
    model = config.model
    if weights.kind == "detector":
        arch = TORCHVISION_ARCHS[weights.name].model
        if (model.name, model.backbone) != (arch["name"], arch["backbone"]):
            raise ValueError(
                f"train.pretrained: {name} is a {arch['name']} with backbone {arch['backbone']}, but the config's "
                f"model is a {model.name} with backbone {model.backbone}; `rcnn train --pretrained` (in Python "
                "rcnn.deploy.published.pretrained_config) takes the model section from the checkpoint"
            )
        if model.pretrained_backbone is not None:
            raise ValueError(
                f"model.pretrained_backbone: not used with train.pretrained={name}, a detection checkpoint that "
                "holds the backbone's weights too; leave one of them out"
            )
        return
    fits = BACKBONE_WEIGHTS[weights.name]
    if model.backbone not in fits:
        raise ValueError(
            f"train.pretrained: the ImageNet weights {name} fit the backbones {', '.join(fits)}, not "
            f"model.backbone={model.backbone}; add --set model.backbone={fits[0]}"
        )
    if model.pretrained_backbone is not None and Path(model.pretrained_backbone).name != weights.file_name:
        raise ValueError(
            f"model.pretrained_backbone: {model.pretrained_backbone} and train.pretrained={name} both give the "
            "backbone's weights; leave one of them out"
        )


def pretrained_config(config: Config, name: str, overrides: Sequence[str] = ()) -> Config:
    """``config`` set up to start from the published weights ``name`` (``rcnn train --pretrained NAME``).

    A detection checkpoint: the ``model`` section becomes its architecture's (sizes and settings
    as torchvision runs it; the number of classes from the data), with the ``model.*`` entries of
    ``overrides`` (the ``--set`` list that built ``config``) applied on top; the ``data`` and
    ``train`` sections stay. An ImageNet backbone: ``config`` as it is, whose backbone must be one
    that the weights fit. ``train.pretrained`` records ``name``. Nothing is downloaded here.
    """
    weights = _weights_of(name)
    data = config.model_dump(mode="json")
    data["train"]["pretrained"] = name
    source = f"--pretrained {name}"
    if weights.kind == "detector":
        data["model"] = copy.deepcopy(TORCHVISION_ARCHS[weights.name].model)
        model_overrides = _model_overrides(overrides)
        if model_overrides:
            data = apply_overrides(data, model_overrides)
            source += " (with --set model overrides)"
    result = config_from_dict(data, source)
    _check_fits(result, weights, name)
    return result


def prepare_pretrained(
    config: Config, *, progress: bool = True, log: Callable[[str], None] = print
) -> tuple[Config, FetchedWeights]:
    """Fetch ``config.train.pretrained`` (:func:`fetch_weights`) and check that the model takes it;
    for an ImageNet backbone, the config then names the file in ``model.pretrained_backbone``
    (the model is built with it loaded)."""
    name = config.train.pretrained
    if not name:
        raise ValueError("train.pretrained is not set")
    _check_fits(config, _weights_of(name), name)
    fetched = fetch_weights(name, progress=progress, log=log)
    if fetched.weights.kind == "backbone":
        model = config.model.model_copy(update={"pretrained_backbone": str(fetched.path)})
        config = config.model_copy(update={"model": model})
    return config, fetched


def apply_pretrained(model: nn.Module, fetched: FetchedWeights, class_names: list[str] | None = None) -> str:
    """Load fetched detection weights into ``model`` (built from :func:`prepare_pretrained`'s
    config): converted (:func:`rcnn.deploy.torchvision.convert_torchvision`), then loaded by
    name and shape with the class-specific layers newly initialised when ``class_names`` (the
    data's, background first) differ from COCO's (:func:`rcnn.build.initialize_from`). Backbone
    weights were loaded when the model was built. Returns one line saying what was loaded."""
    weights = fetched.weights
    if weights.kind == "backbone":
        return f"ImageNet weights {weights.name} ({fetched.path}) loaded into backbone {model.backbone.name}"
    with tempfile.TemporaryDirectory(prefix="rcnn-pretrained-") as tmp:
        converted = Path(tmp) / "converted"
        with torch.random.fork_rng(devices=[]):  # building the converted model draws no numbers from training's stream
            convert_torchvision(fetched.path, weights.name, converted, log=lambda line: None)
        try:
            report = initialize_from(model, converted, class_names)
        except ValueError as exc:  # name the published file, not the temporary conversion
            raise ValueError(str(exc).replace(str(converted), f"{weights.name} ({fetched.path})")) from None
    return str(dataclasses.replace(report, source=fetched.path))
