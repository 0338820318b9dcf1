"""The run directory: resolved config, one folder per finished stage, results.

A stage folder is written under a temporary name and renamed into place only once complete (its
`stage.json` last), so a kill mid-write never leaves a stage that looks finished; resume continues
after the last complete stage.

    config.json                      the resolved RunConfig
    zero_shot.json                   accuracies of the base model (--zero-shot)
    stages/01-<task>/adapter/        plain PEFT adapter after the stage
    stages/01-<task>/predictions/    one JSONL per evaluated task
    stages/01-<task>/stage.json      the accuracy row, ROUGE-1, trainable parameters, losses, times
    .clora.lock                      held (flock) by the process writing the run, which it names
    in_progress/01-<task>/step-N/    the step checkpoint of the stage being trained (removed at commit)
    metrics.json, accuracy_matrix.csv, report.md, accuracy_matrix.png, accuracy_curves.png
    tb/                              TensorBoard logs
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from . import faults
from .atomic import write_json_atomic
from .errors import UserError, guard_disk


LOCK_NAME = ".clora.lock"
_held_locks: dict[Path, object] = {}  # run folder -> the open lock file, in this process


def _lock(path: Path) -> None:
    """Hold the run folder for this process: a second clora process resuming the same folder would
    train the same stages twice and overwrite its checkpoints. flock dies with its process, so a
    killed run never leaves the folder locked."""
    key = path.resolve()
    if key in _held_locks:
        return
    handle = open(path / LOCK_NAME, "a+")  # the folder was just checked writable
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{path} is in use by another clora process ({owner}); wait for it to end or stop it") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
    handle.flush()
    _held_locks[key] = handle


def _check_not_locked(path: Path) -> None:
    """Refuse a folder another process holds, without taking (or creating) its lock."""
    lock_file = path / LOCK_NAME
    if path.resolve() in _held_locks or not lock_file.is_file():
        return
    with open(lock_file) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = handle.read().strip() or "another process"
            raise UserError(f"{path} is in use by another clora process ({owner}); wait for it to end or stop it") from None
        fcntl.flock(handle, fcntl.LOCK_UN)


def _holds_something(path: Path) -> bool:
    return any(p.name != LOCK_NAME for p in path.iterdir())


def unlock(path: str | Path) -> None:
    handle = _held_locks.pop(Path(path).resolve(), None)
    if handle is not None:
        handle.close()


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.stages = self.path / "stages"

    @classmethod
    def check(cls, path: str | Path, config: dict, resume: bool, overwrite: bool,
              run_control: frozenset[str] = frozenset(), defaults: dict | None = None) -> None:
        """Every refusal of `open`, made without creating or changing anything: a command refused at
        start-up leaves its output folder exactly as it found it, so the corrected command just works.
        `run_control`: options that do not change results (a resume may change them); `defaults`:
        values of options an older run's config.json predates."""
        path = Path(path)
        config_file = path / "config.json"
        if path.exists() and not path.is_dir():
            raise UserError(f"output {path} exists and is not a directory")
        if not path.is_dir():
            if resume:
                raise UserError(f"cannot resume: {path} does not exist; run without --resume to start it")
            return
        _check_not_locked(path)
        if not config_file.is_file():
            if resume:
                raise UserError(f"cannot resume: {path} holds no clora run (no config.json); "
                                "run without --resume to start one")
            if not overwrite and _holds_something(path):
                raise UserError(f"output {path} already holds other files; pass --resume to continue it or "
                                "--overwrite to replace it")
            return
        if overwrite:
            return
        if not resume:
            raise UserError(f"output {path} already holds a different run; pass --resume to continue it or "
                            "--overwrite to replace it")
        previous = {**(defaults or {}), **json.loads(config_file.read_text())}
        changed = sorted(k for k in set(previous) | set(config)
                         if k not in run_control and previous.get(k) != config.get(k))
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise UserError(f"cannot resume {path}: options differ from the run there ({details})")

    @classmethod
    def open(cls, path: str | Path, config: dict, resume: bool, overwrite: bool,
             run_control: frozenset[str] = frozenset(), defaults: dict | None = None) -> "RunDir":
        """Create or take over the run folder (see `check`, whose refusals come first)."""
        run = cls(Path(path))
        config_file = run.path / "config.json"
        cls.check(run.path, config, resume, overwrite, run_control, defaults)
        created = not run.path.exists()
        with guard_disk(run.path):
            run.path.mkdir(parents=True, exist_ok=True)
        try:
            run._check_writable()
        except UserError:
            if created:
                run.path.rmdir()
            raise
        _lock(run.path)
        # Again under the lock: another process may have written the folder since the check.
        cls.check(run.path, config, resume, overwrite, run_control, defaults)
        if overwrite:
            for child in run.path.iterdir():
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if not config_file.is_file():
            with guard_disk(config_file):
                write_json_atomic(config_file, config)
        for stale in run.stages.glob(".*.tmp") if run.stages.is_dir() else []:
            shutil.rmtree(stale)
        return run

    def _check_writable(self) -> None:
        probe = self.path / ".write-probe.tmp"
        try:
            probe.write_bytes(b"x" * 4096)
        except OSError as exc:
            raise UserError(f"output {self.path} is not writable: {exc.strerror}") from None
        finally:
            probe.unlink(missing_ok=True)  # a disk that filled mid-write still leaves no probe behind

    def check_space(self, needed: int, what: str) -> None:
        # Checked before the folder is created too, so measured on the nearest folder that exists.
        where = next(p for p in (self.path, *self.path.absolute().parents) if p.exists())
        free = shutil.disk_usage(where).free
        if free < needed:
            again = "rerun with --resume" if (self.path / "config.json").is_file() else "rerun"
            raise UserError(f"not enough disk space in {self.path}: {free >> 20} MB free, {what} needs about "
                            f"{needed >> 20} MB; free some and {again}")

    def in_progress(self, index: int, name: str) -> Path:
        return self.path / "in_progress" / f"{index + 1:02d}-{name}"

    def drop_in_progress(self, index: int, name: str) -> None:
        stage = self.in_progress(index, name)
        shutil.rmtree(stage, ignore_errors=True)
        if stage.parent.is_dir() and not any(stage.parent.iterdir()):
            stage.parent.rmdir()  # a finished run leaves no empty in_progress/ behind

    def stage_dir(self, index: int, name: str) -> Path:
        return self.stages / f"{index + 1:02d}-{name}"

    def completed(self, stage_names: list[str]) -> list[dict]:
        """stage.json of the finished stages, in order, up to the first unfinished one."""
        done = []
        for index, name in enumerate(stage_names):
            record = self.stage_dir(index, name) / "stage.json"
            if not record.is_file():
                break
            done.append(json.loads(record.read_text()))
        return done

    def commit_stage(self, index: int, name: str, write: Callable[[Path], None], record: dict) -> Path:
        final = self.stage_dir(index, name)
        staging = self.stages / f".{final.name}.tmp"
        with guard_disk(staging):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            write(staging)
            faults.point("stage_commit")
            write_json_atomic(staging / "stage.json", record)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        return final

    def load_zero_shot(self) -> dict | None:
        path = self.path / "zero_shot.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_zero_shot(self, record: dict) -> None:
        write_json_atomic(self.path / "zero_shot.json", record)
