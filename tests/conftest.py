"""Shared fixtures: a tiny synthetic shapes data set, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from rcnn.data.shapes import make_shapes


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes data set (12 train + 8 val images of 128x128, seed 0) in a session temp folder."""
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=8, seed=0, image_size=128)


@pytest.fixture(scope="module")
def one_thread():
    """One compute thread for a test module: on small tensors, two threads mostly wait for each
    other, the more so on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def proposals(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Selective search proposals files of the train and val splits of ``shapes_root``."""
    from rcnn.data.reading import build_dataset
    from rcnn.components.proposals.selective_search import ensure_dataset_proposals

    out = tmp_path_factory.mktemp("proposals")
    return {
        split: ensure_dataset_proposals(
            build_dataset(shapes_root, split), out / f"{split}.safetensors", workers=0, progress=False
        ).path
        for split in ("train", "val")
    }


def pytest_configure(config: pytest.Config) -> None:
    """The eager backend by default; one compute thread per test process when pytest-xdist runs
    several: no oversubscription."""
    import os

    # the commands default to --backend auto (timing eager, ONNX Runtime and OpenVINO on first use of
    # a run); the suite compares the commands with the eager model, and auto's own tests unset this
    os.environ.setdefault("RCNN_BACKEND", "eager")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where no CUDA device is present (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
