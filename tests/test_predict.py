"""``rcnn predict`` on what users have: folders (nested, same-named files), globs, list files, videos;
outputs that never collide, COCO results, batched calls equal to one image at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from rcnn.build import load_model
from rcnn.cli import main
from rcnn.inference import predict_stream
from rcnn.io.images import read_image
from rcnn.io.sources import VideoWriter, expand_sources, read_video_frames, video_info
from tiny_runs import tiny_run


@pytest.fixture(scope="module")
def run(shapes_root: Path, tmp_path_factory) -> Path:
    return tiny_run("faster_rcnn", shapes_root, tmp_path_factory)


def _photos(shapes_root: Path, root: Path) -> dict[str, Path]:
    """Shapes images saved under nested folders with clashing names and stems."""
    val = sorted((shapes_root / "images" / "val").glob("*.png"))
    layout = {"d1/x.jpg": val[0], "d2/x.jpg": val[1], "d2/sub/x.png": val[2], "img.tiff": val[3], "img.webp": val[4]}
    for name, image in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(image).convert("RGB").save(root / name)
    return {name: root / name for name in layout}


def test_sources_from_folders_globs_and_lists(tmp_path: Path, shapes_root: Path) -> None:
    photos = _photos(shapes_root, tmp_path / "in")
    (tmp_path / "in" / "notes.md").write_text("not an image")
    (tmp_path / "in" / ".hidden").mkdir()
    shutil.copy(photos["img.tiff"], tmp_path / "in" / ".hidden" / "y.png")
    found = expand_sources([tmp_path / "in"])
    assert [s.name for s in found] == ["img.tiff", "img.webp", "d1/x.jpg", "d2/x.jpg", "d2/sub/x.png"]
    assert all(s.path.is_absolute() and s.kind == "image" for s in found)
    assert [s.name for s in expand_sources([str(tmp_path / "in" / "**" / "x.*")])] == ["d1/x.jpg", "d2/sub/x.png", "d2/x.jpg"]
    listing = tmp_path / "in" / "list.txt"
    listing.write_text("# photos\nd1/x.jpg\n\nimg.webp\nd1/x.jpg\n")
    assert [s.name for s in expand_sources([listing])] == ["d1/x.jpg", "img.webp"]  # each file once
    assert [s.name for s in expand_sources([photos["d1/x.jpg"], tmp_path / "in" / "d1"])] == ["x.jpg"]
    listing.write_text("d1/x.jpg\nnope.png\n")
    with pytest.raises(FileNotFoundError, match=r"list.txt, line 2: .*nope.png"):
        expand_sources([listing])
    with pytest.raises(FileNotFoundError, match="matches no image"):
        expand_sources([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image or video files"):
        expand_sources([tmp_path / "empty"])


def test_predict_folder_names_never_collide(run: Path, shapes_root: Path, tmp_path: Path, capsys) -> None:
    photos = _photos(shapes_root, tmp_path / "in")
    out = tmp_path / "in" / "out"  # inside the input folder: its files must not become inputs
    args = ["predict", "--weights", str(run), str(tmp_path / "in"), "--out", str(out), "--score-thresh", "0",
            "--coco-results", str(tmp_path / "results.json"), "--quiet"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 5 and summary["images_per_second"] > 0
    for name, path in photos.items():
        record = json.loads((out / f"{name}.json").read_text())
        assert record["image"] == name and record["source"] == str(path.resolve())
        assert record["size"] == [128, 128] and (out / f"{name}.png").is_file()
    assert len(list(out.rglob("*.png"))) == 5
    results = json.loads((tmp_path / "results.json").read_text())
    index = json.loads((out / "images.json").read_text())
    assert {im["file_name"]: im["id"] for im in index["images"]} == {
        name: json.loads((out / f"{name}.json").read_text())["image_id"] for name in photos}
    assert sorted(im["id"] for im in index["images"]) == [1, 2, 3, 4, 5]
    assert {r["image_id"] for r in results} <= {1, 2, 3, 4, 5} and all(len(r["bbox"]) == 4 for r in results)
    assert [c["name"] for c in index["categories"]] == ["circle", "square", "triangle", "star", "hexagon"]
    assert main(args) == 0  # a second run: the first run's pictures are not read
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 5


def test_predict_glob_and_list_file(run: Path, shapes_root: Path, tmp_path: Path) -> None:
    _photos(shapes_root, tmp_path / "in")
    assert main(["predict", "--weights", str(run), str(tmp_path / "in" / "**" / "*.jpg"), "--out", str(tmp_path / "g"),
                 "--quiet"]) == 0  # fmt: skip
    assert sorted(p.relative_to(tmp_path / "g").as_posix() for p in (tmp_path / "g").rglob("*.json")) == [
        "d1/x.jpg.json", "d2/x.jpg.json"]  # fmt: skip
    (tmp_path / "list.txt").write_text("in/img.tiff\nin/img.webp\n")
    assert main(["predict", "--weights", str(run), str(tmp_path / "list.txt"), "--out", str(tmp_path / "l"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "l").glob("*.json")) == ["img.tiff.json", "img.webp.json"]


def test_predict_bad_inputs_name_them(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["predict", "--weights", str(run), str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.png: no such file or folder" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["predict", "--weights", str(run), str(tmp_path / "bad.png"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "bad.png: cannot decode the image" in capsys.readouterr().err
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert main(["predict", "--weights", str(run), str(tmp_path / "bad.mp4"), "--out", str(tmp_path / "o")]) == 2
    assert "bad.mp4: cannot open the video" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a range error of the command line: argparse's exit 2
        main(["predict", "--weights", str(run), str(tmp_path), "--out", str(tmp_path / "o"), "--stride", "0"])
    assert exit_.value.code == 2 and "argument --stride: expected a whole number in 1..100000, got 0" in capsys.readouterr().err


def _video(shapes_root: Path, path: Path, frames: int) -> list[np.ndarray]:
    images = sorted((shapes_root / "images" / "val").glob("*.png"))
    pictures = [np.asarray(Image.open(images[i % len(images)]).convert("RGB")) for i in range(frames)]
    writer = VideoWriter(path, 10.0, (128, 128))
    for picture in pictures:
        writer.write(picture)
    writer.close()
    return pictures


def test_video_frames_round_trip(shapes_root: Path, tmp_path: Path) -> None:
    pictures = _video(shapes_root, tmp_path / "clip.mp4", 7)
    info = video_info(tmp_path / "clip.mp4")
    assert info.frames == 7 and info.size == (128, 128) and info.fps == pytest.approx(10.0)
    frames = list(read_video_frames(tmp_path / "clip.mp4", stride=3))
    assert [i for i, _ in frames] == [0, 3, 6]
    first = (frames[0][1].permute(1, 2, 0).numpy() * 255).astype(np.float32)
    assert np.abs(first - pictures[0]).mean() < 12  # lossy MPEG-4, but the same picture


def test_predict_video_every_nth_frame(run: Path, shapes_root: Path, tmp_path: Path) -> None:
    _video(shapes_root, tmp_path / "v" / "clip.mp4", 10)
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(run), str(tmp_path / "v" / "clip.mp4"), "--out", str(out), "--stride", "3",
                 "--score-thresh", "0", "--batch-size", "2", "--coco-results", str(out / "r.json"), "--quiet"]) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "clip.mp4.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 3, 6, 9]
    assert [r["time_s"] for r in records] == [0.0, 0.3, 0.6, 0.9] and all(r["video"] == "clip.mp4" for r in records)
    written = cv2.VideoCapture(str(out / "clip.mp4.detections.mp4"))
    count = 0
    while written.grab():
        count += 1
    written.release()
    assert count == 4
    names = [im["file_name"] for im in json.loads((out / "images.json").read_text())["images"]]
    assert names == [f"clip.mp4#frame={i}" for i in (0, 3, 6, 9)]


def test_batched_prediction_equals_one_at_a_time(run: Path, shapes_root: Path) -> None:
    model = load_model(run).model
    paths = sorted((shapes_root / "images" / "val").glob("*.png"))[:5]
    items = [(p, read_image(p)) for p in paths]
    single = list(predict_stream(model, items, batch_size=1, prefetch=0))
    batched = list(predict_stream(model, items, batch_size=3, prefetch=2))
    assert [p.key for p in batched] == paths
    for a, b in zip(single, batched):
        assert len(a.output["scores"]) == len(b.output["scores"])
        torch.testing.assert_close(a.output["boxes"], b.output["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(a.output["scores"], b.output["scores"], atol=1e-4, rtol=1e-4)
