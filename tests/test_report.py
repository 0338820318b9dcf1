import csv
import json
import os

import pytest

from clora.atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic
from clora.report import format_matrix_text, write_results

TASKS = ["dbpedia", "amazon", "yahoo", "agnews"]
R = [[21.9], [15.6, 15.6], [21.9, 15.6, 21.9], [18.8, 40.6, 18.8, 59.4]]
Z = [0.0, 0.0, 1.5, 0.0]
FILES = {"metrics.json", "accuracy_matrix.csv", "report.md", "accuracy_matrix.png", "accuracy_curves.png"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], [(r[0], [None if c == "" else float(c) for c in r[1:]]) for r in rows[1:]]


def test_write_results_all_files(tmp_path):
    out = tmp_path / "run"
    metrics = write_results(
        out, TASKS, R, Z,
        extra={"method": "seq-lora", "notes": ["proxy too small: BWT > 0"]},
        rouge_last_row=[30.0, 50.0, 20.0, 60.0],
        title="SeqLoRA order 1",
    )
    assert set(os.listdir(out)) == FILES  # and no leftover temp files
    assert round(metrics["AA"], 1) == 34.4 and round(metrics["BWT"], 1) == 6.3

    data = json.loads((out / "metrics.json").read_text())
    assert data["tasks"] == TASKS
    assert data["metrics"] == metrics
    assert data["zero_shot"] == Z
    assert data["rouge1_mean"] == pytest.approx(40.0)
    assert data["method"] == "seq-lora"
    padded = [row + [None] * (4 - len(row)) for row in R]
    assert data["accuracy_matrix"] == padded

    header, rows = _read_csv(out / "accuracy_matrix.csv")
    assert header == ["after_task", *TASKS]
    assert rows[0] == ("zero_shot", Z)
    assert [label for label, _ in rows[1:]] == TASKS
    assert [values for _, values in rows[1:]] == padded

    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# SeqLoRA order 1")
    assert "| 34.4 |" in md and "| +6.3 |" in md and "| 40.0 |" in md
    assert "| FWT (forward transfer) | — |" in md  # lower-triangular R: FWT undefined
    assert "| dbpedia | 21.9 | — | — | — |" in md
    assert "proxy too small" in md

    for name in ("accuracy_matrix.png", "accuracy_curves.png"):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000


def test_write_results_joint_and_stage_names(tmp_path):
    joint = [[84.4, 21.9, 40.6, 93.8]]
    metrics = write_results(tmp_path, TASKS, joint, None, extra={"stage_names": ["MTL (all tasks)"]})
    assert round(metrics["AA"], 1) == 60.2 and metrics["learning_accuracy"] is None
    header, rows = _read_csv(tmp_path / "accuracy_matrix.csv")
    assert rows == [("MTL (all tasks)", joint[0])]
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["zero_shot"] is None and data["rouge1_mean"] is None
    assert data["stage_names"] == ["MTL (all tasks)"]
    assert set(os.listdir(tmp_path)) == FILES


def test_write_results_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        write_results(tmp_path, TASKS[:3], R, None, extra={})  # names vs matrix
    with pytest.raises(ValueError):
        write_results(tmp_path, TASKS, R, None, extra={"metrics": {}})  # would clobber a result key
    with pytest.raises(ValueError):
        write_results(tmp_path, TASKS, R, None, extra={"stage_names": ["a"]})
    assert os.listdir(tmp_path) == []  # validation happens before any file is written


def test_format_matrix_text():
    text = format_matrix_text(TASKS, R, Z=Z)
    lines = text.splitlines()
    assert len(lines) == 6 and len({len(line) for line in lines}) == 1  # fixed width
    assert lines[1].split() == ["zero_shot", "0.0", "0.0", "1.5", "0.0"]
    assert lines[2].split() == ["dbpedia", "21.9", "-", "-", "-"]


def test_atomic_path_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "adapter.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["adapter.bin"]


def test_atomic_path_absent_target_stays_absent_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.png"):
            raise RuntimeError
    assert os.listdir(tmp_path) == []


def test_atomic_writers_replace(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "héllo\n")
    write_text_atomic(tmp_path / "a.txt", "second\n")
    write_bytes_atomic(tmp_path / "sub" / "b.bin", b"\x00\x01")
    write_json_atomic(tmp_path / "c.json", {"z": 1, "a": [1.5, None]})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "second\n"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    text = (tmp_path / "c.json").read_text()
    assert text.index('"z"') < text.index('"a"')  # key order kept
    assert json.loads(text) == {"z": 1, "a": [1.5, None]}
    # An unserialisable value fails before the disk is touched.
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "c.json", {"x": float("nan")})
    assert json.loads((tmp_path / "c.json").read_text()) == {"z": 1, "a": [1.5, None]}
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "c.json", "sub"]
