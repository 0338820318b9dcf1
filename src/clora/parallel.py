"""`clora compare --jobs N`: the runs of a comparison grid, N at a time, each an ordinary (resumable)
run in a process of its own (`python -m clora.parallel CONFIG RUN_DIR ZERO_SHOT`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .compare import run_dir_of, zero_shot_file
from .config import RunConfig
from .errors import UserError


def next_runnable(pending: list, running_methods: list[str], one_at_a_time: frozenset[str]) -> int | None:
    """The position in `pending` of the first run that may start now: a run of a method in
    `one_at_a_time` waits while another run of that method is running (two OSF runs of the default
    model hold more memory than a 24 GiB machine has); None if every pending run must wait."""
    for position, (_, (method, *_)) in enumerate(pending):
        if method not in one_at_a_time or method not in running_methods:
            return position
    return None


def run_parallel(grid, output: Path, jobs: int, one_at_a_time: frozenset[str] = frozenset()) -> list[str]:
    """Run the grid `jobs` runs at a time, each an ordinary (resumable) run in a process of its own with
    its output in `<output>/logs/`, in grid order except that a method of `one_at_a_time` never has two
    runs going at once. Small models leave a GPU mostly idle between one process's kernel
    launches, so several runs share one GPU well; with several GPUs visible, the runs are spread over
    them round-robin. Returns the runs that failed, each with its log. Killing the comparison kills its
    runs; rerunning it resumes them."""
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gpus = _visible_gpus()
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    pending = list(enumerate(grid))
    running: dict[subprocess.Popen, tuple[str, Path, str]] = {}
    failed: list[str] = []
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                position = next_runnable(pending, [m for _, _, m in running.values()], one_at_a_time)
                if position is None:
                    break
                slot, (method, order, seed, config) = pending.pop(position)
                run_dir = run_dir_of(output, method, order, seed)
                name = f"{method}-order{order}-seed{seed}"
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
                       "PYTHONUNBUFFERED": "1"}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                log = (logs / f"{name}.log").open("a")
                process = subprocess.Popen(
                    [sys.executable, "-m", "clora.parallel", json.dumps(config.to_dict()), str(run_dir),
                     str(zero_shot_file(output, order, seed))], stdout=log, stderr=subprocess.STDOUT, env=env)
                log.close()
                running[process] = (name, logs / f"{name}.log", method)
                print(f"clora compare: started {name} ({len(grid) - len(pending)}/{len(grid)})", flush=True)
            time.sleep(0.5)
            for process in [p for p in running if p.poll() is not None]:
                name, log, _ = running.pop(process)
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode}, log {log})"
                print(f"clora compare: {name} {status}", flush=True)
                if process.returncode != 0:
                    failed.append(f"{name} (log {log})")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        for process in running:
            process.terminate()
        for process in running:
            process.wait()
    return failed


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g for g in visible.split(",") if g] if visible else [str(i) for i in range(torch.cuda.device_count())]


def _worker(argv: list[str]) -> int:
    """One run of a parallel comparison, in its own process: `python -m clora.parallel CONFIG RUN_DIR ZERO_SHOT`."""
    from .continual import run

    config_json, run_dir, zero_shot = argv
    config = RunConfig(**json.loads(config_json))
    try:
        run(config, run_dir, resume=(Path(run_dir) / "config.json").is_file(), shared_zero_shot=Path(zero_shot))
    except UserError as exc:
        print(f"clora: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
