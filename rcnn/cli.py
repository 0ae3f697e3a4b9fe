"""The ``rcnn`` command line.

Each sub-command lives in ``rcnn/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order ``rcnn --help`` lists them.
COMMAND_MODULES = (
    "demo",
    "train",
    "evaluate",
    "predict",
    "explain",
    "serve",
    "convert",
    "export",
    "data",
    "proposals",
    "pretrain",
    "benchmark",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcnn",
        description="R-CNN, Fast R-CNN, Faster R-CNN and Mask R-CNN: train, evaluate, predict.",
    )
    from rcnn import __version__

    parser.add_argument("--version", action="version", version=f"rcnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"rcnn.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet is simply not offered
            if exc.name == f"rcnn.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input is reported as one clear line, not a traceback.
        print(f"rcnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    _end_process_group()
    return int(result or 0)


def _end_process_group() -> None:
    """Under ``torchrun`` training starts a process group; each process ends it before exiting.
    Left to interpreter shutdown, gloo's threads can abort a process ("terminate called without an
    active exception") and torchrun then reports the run as failed. Only after success: a process
    that failed must not wait for the others in the shutdown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
