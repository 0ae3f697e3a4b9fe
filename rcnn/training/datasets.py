"""What the training loop reads: a data set with optional proposals attached, then augmentation.

Shape shorthand:
    P: proposals of an image
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from rcnn.components.proposals.io import ProposalSource
from rcnn.data.records import DetectionDataset

__all__ = ["TrainingSet"]


class TrainingSet(Dataset):
    """A data set for the training loop: optional proposals attached, then augmentation.

    ``target["proposals"]`` (original image coordinates) is added before the transforms so that
    a flip moves the proposals with the boxes.
    """

    def __init__(
        self,
        dataset: DetectionDataset,
        transforms: Callable | None = None,
        proposals: ProposalSource | None = None,
    ) -> None:
        self.dataset = dataset
        self.transforms = transforms
        self.proposals = proposals

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.dataset[index]
        if self.proposals is not None:
            target["proposals"] = self.proposals(int(target["image_id"]))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

