"""Step checkpoints inside a stage: everything a stage's training needs to continue exactly where it
was killed.

    in_progress/<stage>/step-000040/
        trainable.safetensors     every trainable parameter of the model, by name
        optimizer.safetensors     the optimizer's tensors (moments, projector bases, step counts)
        rng.safetensors           torch's CPU (and CUDA) generator states
        state.json                position (batches done), loss sums, the optimizer's non-tensor
                                  structure, Python's and NumPy's generator states

A method's own state (shared spaces, Fisher, ...) is not in it: it changes only at a task's end, and
`on_task_start` rebuilds the stage from the last committed stage exactly as it was built the first time.
Tensors only in safetensors, plain values in JSON: a checkpoint never holds pickled Python objects.
A checkpoint is written in a hidden temporary folder and renamed into place, so a kill mid-write
leaves the previous checkpoint; only the newest complete one is kept.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import faults
from .atomic import write_json_atomic
from .errors import guard_disk


@dataclass
class Progress:
    """Where training stands inside a stage."""
    batches: int = 0  # micro-batches consumed on this process (all epochs)
    steps: int = 0  # optimizer steps taken
    skipped: int = 0  # batches skipped for a non-finite loss or gradient
    loss_sum: float = 0.0
    loss_count: int = 0


def flatten(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """Split a nested state (dicts with int or str keys, lists, tuples, tensors, numbers) into named
    tensors and a JSON skeleton that points at them."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path: str):
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().contiguous().cpu()
            return {"tensor": path}
        if isinstance(x, dict):
            return {"dict": [[k, walk(v, f"{path}/{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"tuple" if isinstance(x, tuple) else "list": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"value": x}
        raise TypeError(f"cannot checkpoint a {type(x).__name__} at {path}")

    return tensors, walk(obj, prefix)


def unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    kind, content = next(iter(skeleton.items()))
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {k: unflatten(v, tensors) for k, v in content}
    if kind in ("list", "tuple"):
        items = [unflatten(v, tensors) for v in content]
        return tuple(items) if kind == "tuple" else items
    return content


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save(directory: Path, model, optimizer, progress: Progress) -> Path:
    """Write a checkpoint of step `progress.steps` under `directory` and drop older ones."""
    final = directory / f"step-{progress.steps:06d}"
    staging = directory / f".{final.name}.tmp"
    with guard_disk(staging):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable_state(model).items()},
                  str(staging / "trainable.safetensors"))
        opt_tensors, opt_skeleton = flatten(optimizer.state_dict())
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        faults.point("checkpoint_write")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(staging / "rng.safetensors"))
        np_state = np.random.get_state()
        write_json_atomic(staging / "state.json", {
            "progress": vars(progress), "optimizer": opt_skeleton,
            "python_random": _to_lists(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]]})
        if final.exists():  # the same step written again (a resumed stage): keep one complete copy at all times
            final.rename(directory / f".{final.name}.old")
        staging.rename(final)
    for old in [*directory.glob("step-*"), *directory.glob(".step-*.old")]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path) -> Path | None:
    done = sorted(d for d in directory.glob("step-*") if (d / "state.json").is_file()) if directory.is_dir() else []
    return done[-1] if done else None


def position(path: Path) -> int:
    """The number of batches a checkpoint had consumed."""
    return json.loads((path / "state.json").read_text())["progress"]["batches"]


def load(path: Path, model, optimizer) -> Progress:
    """Restore a checkpoint into a model and optimizer built for the same stage; returns the progress."""
    state = json.loads((path / "state.json").read_text())
    params = trainable_state(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        raise RuntimeError(f"checkpoint {path} holds other trainable parameters than this stage builds")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(unflatten(state["optimizer"], load_file(str(path / "optimizer.safetensors"))))
    restore_rng(path, state)
    return Progress(**state["progress"])


def restore_rng(path: Path, state: dict) -> None:
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    random.setstate(_to_tuples(state["python_random"]))
    kind, keys, *rest = state["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
