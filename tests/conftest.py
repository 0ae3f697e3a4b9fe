"""Shared fixtures: a tiny synthetic shapes data set, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from rcnn.data.shapes import make_shapes


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes data set (12 train + 8 val images of 128x128, seed 0) in a session temp folder."""
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=8, seed=0, image_size=128)


def pytest_configure(config: pytest.Config) -> None:
    """One compute thread per test process when pytest-xdist runs several: no oversubscription."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
