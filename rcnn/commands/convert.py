"""``rcnn convert``: other libraries' detection checkpoints as rcnn run folders.

    rcnn convert torchvision fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --arch fasterrcnn_resnet50_fpn --out runs/coco
"""

from __future__ import annotations

import argparse


def _run_torchvision(args: argparse.Namespace) -> int:
    from rcnn.deploy.torchvision import convert_torchvision

    convert_torchvision(args.file, args.arch, args.out, class_names=args.classes)
    print(f"run folder: {args.out} (rcnn predict / evaluate / export --weights {args.out}; "
          f"fine-tune: rcnn train --init-from {args.out} ...)")  # fmt: skip
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from rcnn.deploy.torchvision import TORCHVISION_ARCHS

    parser = subparsers.add_parser(
        "convert",
        help="convert another library's detection checkpoint into a run folder",
        description="Convert a detection checkpoint of another library into an rcnn run folder that predict, "
        "evaluate, export and train (--resume, --init-from) take.",
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")
    tv = sources.add_parser(
        "torchvision",
        help="a torchvision Faster / Mask R-CNN state dict (.pth)",
        description="Read a torchvision detection state dict (torch.save, read without running pickled code), "
        "match every tensor by name and shape, and write a run folder whose model reproduces torchvision's "
        "outputs. 91-class files get COCO's class names and category ids.",
    )
    tv.add_argument("file", help="the .pth file (e.g. from the torch hub cache)")
    tv.add_argument("--arch", required=True, choices=list(TORCHVISION_ARCHS), help="the torchvision builder it comes from")
    tv.add_argument("--out", required=True, help="run folder to write")
    tv.add_argument("--classes", help="class names, .txt (one per line) or .json list (default: COCO's for 91 classes)")
    tv.set_defaults(func=_run_torchvision)
