"""A run survives kills and bad numerics: killed at eight moments in turn (mid-training, mid-checkpoint,
mid-evaluation, mid-commit, mid-report) and resumed each time, it ends exactly as an uninterrupted
run; a NaN stops a stage and leaves its last step checkpoint loadable, or is skipped on request; a full
disk is reported before a stage starts, or as one line when a write fails."""
from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clora
from clora import trainer
from clora.cli import main
from clora.errors import UserError
from clora.loss import BatchLoss
from conftest import run_folder_files, tiny_config

# 24 train items, batch 4, 2 epochs: 12 steps a stage, checkpoints at steps 2, 4, ..., 10 and 12.
ARGS = ["--tasks", "alpha,beta", "--batch-size", "4", "--eval-batch-size", "4", "--lr", "2e-2", "--rank", "4",
        "--epochs", "2", "--checkpoint-every", "2"]


def _cli(model: str, bench: Path, out: Path, method: str, kill_at: str | None = None, resume: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLORA_KILL_AT": kill_at or ""}
    cmd = [sys.executable, "-m", "clora.cli", "run", "--method", method, "--model", model, "--data-dir", str(bench),
           "--output", str(out), *ARGS, *(["--resume"] if resume else [])]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _outcome(out: Path) -> dict:
    """Everything a run wrote, less wall-clock times (conftest.TIMING_FIELDS and TIMING_PATHS): metrics,
    matrix, report, plots, per-stage records, predictions, adapters (their adapter_config.json too, whose
    target_modules come out of PEFT in a set's order unless sorted), method state, config."""
    return run_folder_files(out)


def _assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, content in expected.items():
        assert got[name] == content, name


KILLS = [
    "train_backward:5",   # stage 1, between the checkpoints of steps 4 and 6
    "checkpoint_write:2",  # stage 1, inside the write of step 8's checkpoint (step 6's stays)
    "eval_batch:1",       # stage 1 evaluation, after the final checkpoint of its training
    "stage_commit:1",     # stage 1's folder half-written
    "results_write:1",    # stage 1 committed, its report not yet written
    "train_backward:3",   # stage 2, after its first checkpoint
    "eval_batch:2",       # stage 2 evaluation, its second batch
    "results_write:1",    # the last stage committed, the final report not yet written
]


def test_killed_eight_times_and_resumed_ends_identical(tiny_llama, tiny_bench, tmp_path):
    reference = tmp_path / "reference"
    done = _cli(tiny_llama, tiny_bench, reference, "seq-lora")
    assert done.returncode == 0, done.stderr[-2000:]

    out = tmp_path / "killed"
    for i, point in enumerate(KILLS):
        killed = _cli(tiny_llama, tiny_bench, out, "seq-lora", kill_at=point, resume=i > 0)
        assert killed.returncode == 137, f"{point} was not reached: {killed.stderr[-2000:]}"
    finished = _cli(tiny_llama, tiny_bench, out, "seq-lora", resume=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    _assert_same(_outcome(out), _outcome(reference))
    assert not (out / "in_progress").exists()


@pytest.mark.parametrize("method", ["deal", "gorp"])
def test_resume_inside_a_later_stage_restores_method_and_optimizer_state(method, tiny_llama, tiny_bench, tmp_path):
    """Mid stage 2: DEAL's filters and MLP, GORP's projected Adam state and GaLore bases come back."""
    reference = tmp_path / "reference"
    assert _cli(tiny_llama, tiny_bench, reference, method).returncode == 0
    out = tmp_path / "killed"
    assert _cli(tiny_llama, tiny_bench, out, method, kill_at="train_backward:19").returncode == 137
    assert list((out / "in_progress" / "02-beta").glob("step-*")), "no step checkpoint of stage 2"
    finished = _cli(tiny_llama, tiny_bench, out, method, resume=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    _assert_same(_outcome(out), _outcome(reference))


def _nan_at(monkeypatch, batch: int) -> None:
    real, calls = trainer.answer_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == batch:
            return BatchLoss(result.loss * float("nan"), float("nan"), False)
        return result
    monkeypatch.setattr(trainer, "answer_loss", poisoned)


def test_nan_stops_the_stage_and_its_last_checkpoint_resumes_exactly(tiny_llama, tiny_bench, tmp_path, monkeypatch):
    config = tiny_config(tiny_llama, tiny_bench, epochs=2, checkpoint_every=2)
    clean = clora.run(config, tmp_path / "clean")
    _nan_at(monkeypatch, 7)
    with pytest.raises(trainer.TrainingDiverged, match=r"non-finite loss nan at batch 7; its last step checkpoint is kept"):
        clora.run(config, tmp_path / "nan")
    kept = sorted((tmp_path / "nan" / "in_progress" / "01-alpha").glob("step-*"))
    assert [p.name for p in kept] == ["step-000006"]
    monkeypatch.undo()
    resumed = clora.run(config, tmp_path / "nan", resume=True)
    assert resumed["accuracy_matrix"] == clean["accuracy_matrix"]
    a = (tmp_path / "nan" / "stages" / "02-beta" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "clean" / "stages" / "02-beta" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b


def test_nan_batch_is_skipped_on_request(tiny_llama, tiny_bench, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 3)
    clora.run(tiny_config(tiny_llama, tiny_bench, epochs=1, on_nonfinite="skip"), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "stages" / "01-alpha" / "stage.json").read_text())
    assert record["skipped_batches"] == 1
    assert record["optimizer_steps"] == record["train_batches"] - 1
    assert math.isfinite(record["mean_train_loss"])  # the bad batch is left out of the mean


def test_nan_gradient_is_caught_too(tiny_llama, tiny_bench, tmp_path, monkeypatch):
    real = trainer._finite_gradients
    monkeypatch.setattr(trainer, "_finite_gradients", lambda params: False)
    with pytest.raises(trainer.TrainingDiverged, match="non-finite gradient at batch 1"):
        clora.run(tiny_config(tiny_llama, tiny_bench, epochs=1), tmp_path / "run")
    assert real([torch.nn.Parameter(torch.ones(2))]) is True
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("inf")])
    assert real([p]) is False


def test_too_little_disk_is_an_error_before_training(tiny_llama, tiny_bench, tmp_path, capsys, monkeypatch):
    from clora import rundir
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1 << 20))
    code = main(["run", "--model", tiny_llama, "--data-dir", str(tiny_bench), "--tasks", "alpha,beta",
                 "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model loader's progress bars
    assert code == 2
    assert err.startswith("clora: error: not enough disk space in") and "stage 1 (alpha)" in err
    assert not (tmp_path / "run" / "stages").exists()


def test_disk_full_while_committing_is_one_line_and_commits_nothing(tiny_llama, tiny_bench, tmp_path, monkeypatch):
    from clora import lora

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(lora, "save_adapter", full)
    with pytest.raises(UserError, match=r"disk full while writing .*01-alpha.tmp"):
        clora.run(tiny_config(tiny_llama, tiny_bench, epochs=1), tmp_path / "run")
    assert not (tmp_path / "run" / "stages" / "01-alpha").exists()


def test_a_folder_copied_without_its_weights_is_refused_with_one_line_and_left_as_it_was(tiny_llama, tiny_bench,
                                                                                       tmp_path):
    """Result folders are committed without weights: resuming an unfinished one cannot go on from stage 1
    and must say so (not a FileNotFoundError traceback from safetensors), leaving the folder untouched."""
    out = tmp_path / "run"
    killed = _cli(tiny_llama, tiny_bench, out, "seq-lora", kill_at="results_write:1")
    assert killed.returncode == 137, killed.stderr[-2000:]  # stage 1 committed, stage 2 not started
    for weights in out.rglob("*.safetensors"):
        weights.unlink()
    before = run_folder_files(out)
    refused = _cli(tiny_llama, tiny_bench, out, "seq-lora", resume=True)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.startswith("clora: error:")]
    assert len(lines) == 1 and "not its weights" in lines[0] and "01-alpha" in lines[0], refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert run_folder_files(out) == before
