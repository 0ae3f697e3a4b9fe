"""The ``rcnn`` command line.

Each sub-command lives in ``rcnn/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import errno
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


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``argv`` naming one, of that command only: each command
    module is imported to register it, and some import the models (torch, torchvision: seconds and
    hundreds of megabytes) that a command such as `rcnn data check` never needs."""
    parser = argparse.ArgumentParser(
        prog="rcnn",
        description="R-CNN, Fast R-CNN, Faster R-CNN and Mask R-CNN: train, evaluate, predict.",
    )
    from rcnn import __version__

    parser.add_argument("--version", action="version", version=f"rcnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = next((a for a in argv if not a.startswith("-")), None) if argv else None
    for name in (named,) if named in COMMAND_MODULES else COMMAND_MODULES:
        try:
            module = importlib.import_module(f"rcnn.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet is simply not offered
            if exc.name == f"rcnn.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
    except OSError as exc:  # the file system refused: disk full, permissions, read-only, ...
        print(f"rcnn {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (a training says which checkpoint it saved)
        print(f"rcnn {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    _end_process_group()
    return int(result or 0)


# What to do about the file system errors a user can meet, by errno.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space on it, or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space, or write elsewhere",
    errno.EFBIG: "larger than the file system or the process's file size limit allows: write elsewhere",
    errno.EACCES: "write to a folder you own, or change its permissions",
    errno.EPERM: "write to a folder you own, or change its permissions",
    errno.EROFS: "write elsewhere, or remount it writable",
    errno.EISDIR: "a folder is in the way of a file of that name: remove it, or write elsewhere",
    errno.ENOTDIR: "a file is in the way of a folder of that name: remove it, or write elsewhere",
    errno.EIO: "the disk or network file system failed: check it and try again",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError``: the file, what went wrong, what to do."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = _OS_ADVICE.get(exc.errno or 0)
    line = f"{where}: {reason}" if where else reason
    return f"{line} ({advice})" if advice else line


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
