"""Experiment trackers (`--report-to tensorboard,mlflow,wandb`), through Accelerate's trackers.

TensorBoard, the default, writes where it always has, the run folder's `tb/`: it is Accelerate's
TensorBoardTracker given that folder. MLflow and W&B are Accelerate's own trackers, configured as those
libraries are (MLFLOW_TRACKING_URI, WANDB_MODE, ...); each gets the run's options as its parameters
and the run folder's name as its run name. What is logged: train/loss and train/penalty per batch
(step = 10,000 x stage index + batch), accuracy/<task> after each stage (step = the stage's number;
W&B, whose steps may only grow, gets it against a `stage` axis of its own instead).

Which trackers a run reports to does not change what it computes, so it is run control (a resume may
change it).
"""
from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from .errors import UserError

_AVAILABLE = {"tensorboard": is_tensorboard_available, "mlflow": is_mlflow_available, "wandb": is_wandb_available}
_INSTALL = {"tensorboard": "pip install tensorboard", "mlflow": "pip install 'clora[mlflow]'",
            "wandb": "pip install 'clora[wandb]'"}


def names(report_to: str) -> list[str]:
    """The trackers of a --report-to value ("none": no tracker), each checked to be installed."""
    words = [w.strip().lower() for w in report_to.split(",") if w.strip()]
    if words == ["none"]:
        return []
    if not words:
        raise UserError("--report-to is empty; give tensorboard, mlflow, wandb (comma-separated) or none")
    for word in words:
        if word not in _AVAILABLE:
            raise UserError(f"--report-to: unknown tracker {word!r}; choose from tensorboard, mlflow, wandb "
                            "(comma-separated) or none")
        if not _AVAILABLE[word]():
            raise UserError(f"--report-to {word} needs the {word} package, which is not installed: {_INSTALL[word]}")
    return list(dict.fromkeys(words))


def log_with(report_to: str, run_dir: str | Path) -> list:
    """`Accelerator(log_with=...)` for these trackers. Nothing is written until `start`."""
    return [TensorBoardTracker("tb", str(run_dir)) if name == "tensorboard" else name for name in names(report_to)]


def start(accelerator: Accelerator, config: dict, run_dir: Path) -> None:
    """Open every tracker's run, with the run's options as its parameters (once the folder is the run's)."""
    if not accelerator.log_with:
        return
    params = {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
              for k, v in config.items() if not isinstance(v, dict)}  # trackers take scalars only
    accelerator.init_trackers("clora", config=params,
                              init_kwargs={"mlflow": {"run_name": run_dir.name},
                                           "wandb": {"name": run_dir.name, "dir": str(run_dir)}})
    if accelerator.is_main_process and any(t.name == "wandb" for t in accelerator.trackers):
        accelerator.get_tracker("wandb", unwrap=True).define_metric("accuracy/*", step_metric="stage")


def scalar_logger(accelerator: Accelerator):
    """`log(name, value, step)` for the trainer, or None without a tracker (the trainer then logs nothing)."""
    if not accelerator.trackers:
        return None
    return lambda name, value, step: accelerator.log({name: value}, step=step)


def log_accuracy(accelerator: Accelerator, accuracy: dict[str, float], stage_number: int) -> None:
    values = {f"accuracy/{name}": value for name, value in accuracy.items()}
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({**values, "stage": stage_number})  # W&B drops a step below its last one
        else:
            tracker.log(values, step=stage_number)


def finish(accelerator: Accelerator) -> None:
    """Close the trackers' runs, also when a run stops early: an MLflow run left open in this process
    would refuse the next one. (Not `end_training`, which also ends the process group.)"""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
