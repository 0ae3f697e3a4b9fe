"""Arguments and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse

from rcnn.config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--config", required=required, help="config YAML file, or the name of a packaged config (see configs/)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=0.01 (repeatable)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def load_detector(weights: str, device: str | None = None):  # noqa: ANN201 - rcnn.build.LoadedModel
    """The trained model that ``predict`` and ``evaluate`` run, with its class names and config:
    the one place where a command turns ``--weights`` into a model object (called like the eager
    model: ``model(images) -> [{"boxes", "labels", "scores"}]``)."""
    from rcnn.build import load_model

    return load_model(weights, device or "cpu")
