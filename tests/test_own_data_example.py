"""docs/own_data.md stays true: its commands and its Python snippet run as written (training shortened)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from rcnn.cli import main
from rcnn.build import load_model

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "own_data.md"


def _blocks(language: str, until: str) -> list[str]:
    """The code blocks of the worked example (from its heading) before the heading ``until``."""
    text = DOC.read_text(encoding="utf-8")
    text = text[text.index("# A worked example") : text.index(until)]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _commands() -> list[list[str]]:
    """The shell commands of the worked example (steps 1 to 4), continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks("sh", "## 5."):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("python", "rcnn"):
                commands.append(words)
    return commands


def test_worked_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = _commands()
    assert [c[:2] for c in commands] == [["python", "examples/make_fruit_voc.py"], ["rcnn", "data"], ["rcnn", "train"],
                                         ["rcnn", "evaluate"], ["rcnn", "predict"]]  # fmt: skip
    for words in commands:
        if words[0] == "python":
            subprocess.run([sys.executable, str(ROOT / words[1]), *words[2:]], check=True, capture_output=True)
            continue
        if words[1] == "train":  # the documented command, shortened for the test budget
            words += ["--set", "train.iterations=4", "--set", "train.eval_every=4"]
        assert main(words[1:]) == 0, words
        out = capsys.readouterr().out
        if words[1] == "data":
            assert "OK: 2 split(s) checked, 0 error(s)" in out and "banana" in out
        if words[1] == "evaluate":
            assert "VOC mAP@0.5" in out
    assert len(list((tmp_path / "runs" / "fruit" / "predictions").glob("fruit_0012*.png"))) == 2
    loaded = load_model(tmp_path / "runs" / "fruit")
    model, config, names = loaded.model, loaded.config, loaded.class_names
    assert names == ["__background__", "apple", "banana", "orange"] and config.model.min_size == 240

    (snippet,) = _blocks("python", "## 5.")
    exec(compile(snippet, str(DOC), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert all(line.startswith("fruit_00120.jpg ") for line in printed)
