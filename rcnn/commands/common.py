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
