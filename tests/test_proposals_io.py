"""The proposals file: round trip, the simple formats, and errors that name the file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rcnn.components.proposals.io import MissingProposalsError, convert_proposals, load_proposals, save_proposals

BOXES = {
    3: torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 6.0, 7.5, 20.0]]),
    11: torch.zeros((0, 4)),  # an image with no proposals is valid
    42: np.array([[1, 2, 3, 4]], dtype=np.float64),
}


def test_round_trip_boxes_scores_settings(tmp_path: Path) -> None:
    path = save_proposals(tmp_path / "p.safetensors", BOXES, {3: torch.tensor([0.9, 0.1])}, {"method": "x", "k": 2})
    proposals = load_proposals(path)
    assert proposals.image_ids == [3, 11, 42]
    assert proposals.settings == {"method": "x", "k": 2}
    assert torch.equal(proposals[3], BOXES[3])
    assert proposals[11].shape == (0, 4)
    assert proposals[42].dtype == torch.float32 and proposals[42].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert torch.allclose(proposals.scores(3), torch.tensor([0.9, 0.1]))
    assert proposals.scores(42) is None
    assert 3 in proposals and 4 not in proposals and "x" not in proposals
    assert len(proposals) == 3 and list(proposals) == [3, 11, 42]
    # the object travels to DataLoader workers
    clone = pickle.loads(pickle.dumps(proposals))
    assert torch.equal(clone[3], BOXES[3])


def test_missing_image_id_names_file(tmp_path: Path) -> None:
    path = save_proposals(tmp_path / "p.safetensors", BOXES)
    proposals = load_proposals(path)
    with pytest.raises(MissingProposalsError, match=r"p\.safetensors.*image id 7") as info:
        proposals[7]
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert proposals.missing([3, 7, 8]) == [7, 8]
    with pytest.raises(ValueError, match=r"p\.safetensors.*2 image\(s\).*ids 7, 8"):
        proposals.check_covers([3, 7, 8])
    proposals.check_covers([3, 42])


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_proposals(tmp_path / "nothere.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_proposals(garbage)
    # a file cut short by a crash
    good = save_proposals(tmp_path / "good.safetensors", BOXES)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_proposals(cut)[42]
    # a safetensors file that is not a proposals file
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match=r"weights.safetensors.*not a proposals file"):
        load_proposals(other)


def test_invalid_boxes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image id 5.*x2 < x1"):
        save_proposals(tmp_path / "p.safetensors", {5: torch.tensor([[10.0, 0.0, 5.0, 4.0]])})
    with pytest.raises(ValueError, match=r"image id 5.*shape \[N, 4\]"):
        save_proposals(tmp_path / "p.safetensors", {5: torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="2 scores for 1 boxes"):
        save_proposals(tmp_path / "p.safetensors", {5: torch.tensor([[0.0, 0, 1, 1]])}, {5: [0.1, 0.2]})
    assert not (tmp_path / "p.safetensors").exists()  # nothing half-written is left behind
    # a file written by other means with a NaN box: caught when the image is read
    path = tmp_path / "nan.safetensors"
    save_file(
        {"boxes/1": torch.tensor([[0.0, 0.0, float("nan"), 1.0]])},
        str(path),
        metadata={"format": "rcnn-proposals", "version": "1", "settings": "{}"},
    )
    with pytest.raises(ValueError, match=r"nan.safetensors: image id 1.*NaN"):
        load_proposals(path)[1]


def test_json_and_npz_are_accepted_and_converted(tmp_path: Path) -> None:
    plain = tmp_path / "p.json"
    plain.write_text(json.dumps({"3": [[0, 0, 10, 10]], "9": {"boxes": [[1, 1, 2, 2]], "scores": [0.5]}, "11": []}))
    proposals = load_proposals(plain)
    assert proposals.image_ids == [3, 9, 11]
    assert proposals[3].tolist() == [[0.0, 0.0, 10.0, 10.0]] and proposals[11].shape == (0, 4)
    assert proposals.scores(9).tolist() == [0.5]

    npz = tmp_path / "p.npz"
    np.savez(npz, **{"boxes/3": np.array([[0, 0, 10, 10]], np.float32), "scores/3": np.array([1.0])})
    assert load_proposals(npz)[3].tolist() == [[0.0, 0.0, 10.0, 10.0]]

    out = convert_proposals(plain, tmp_path / "p.safetensors", {"method": "mine"})
    converted = load_proposals(out)
    assert converted.settings == {"method": "mine"} and converted.image_ids == [3, 9, 11]
    assert converted.scores(9).tolist() == [0.5]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"4": [[0, 0, float("inf"), 1]]}))
    with pytest.raises(ValueError, match=r"bad.json: image id 4"):
        load_proposals(bad)
    bad.write_text(json.dumps({"cat.jpg": [[0, 0, 1, 1]]}))
    with pytest.raises(ValueError, match=r"bad.json: 'cat.jpg' is not an integer image id"):
        load_proposals(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_proposals(bad)


def test_file_written_from_plain_numpy_as_documented(tmp_path: Path) -> None:
    """docs/proposals.md: any program writing safetensors can produce a proposals file."""
    from safetensors.numpy import save_file as save_numpy

    my_boxes = {1: [[0, 0, 4, 4], [1, 1, 3, 5]], 2: []}
    tensors = {f"boxes/{i}": np.asarray(b, dtype=np.float32).reshape(-1, 4) for i, b in my_boxes.items()}
    path = tmp_path / "mine.safetensors"
    save_numpy(tensors, str(path), metadata={"format": "rcnn-proposals", "version": "1", "settings": json.dumps({"method": "mine"})})
    proposals = load_proposals(path)
    assert proposals.settings == {"method": "mine"} and proposals.image_ids == [1, 2]
    assert proposals[1].tolist() == [[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 5.0]] and proposals[2].shape == (0, 4)
