"""Data-parallel runs through torch.distributed (gloo on the CPU, the backend Accelerate forms there):
two processes with the same global batch and seed compute what one process computes. The tolerance:
accuracies, predictions, step counts identical; the first loss equal to 1e-6 and stage mean losses to
1e-4 (relative); every adapter, full-weight delta, GORP shared space and EWC Fisher within 1e-3 of its
norm (‖two − one‖ ≤ 1e-3 ‖one‖). The all-reduce adds the two halves' gradients in another order than
one process does; Adam divides by the root of tiny second moments, so 24 steps at a high learning
rate grow that 1e-7 rounding to ~1e-4 of the weights.
Every multi-process run also checks, after each stage, that all processes hold the same weights and
method state (`continual._check_ranks_agree`), so a run that finishes had agreeing ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--tasks", "alpha,beta", "--batch-size", "4", "--eval-batch-size", "4", "--lr", "5e-3", "--rank", "4",
        "--epochs", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# GaLore rank 2 for GORP: the top-8 subspace of the tiny model's 64 x 32 gate-projection gradient has
# near-equal singular values at the cut, where any change of rounding (a BLAS, a summation order) picks
# another direction: a property of GaLore's truncated SVD on such a matrix, not of data parallelism.
OPTIONS = {"seq-lora": [], "deal": [], "gorp": ["-o", "rank=2"], "ewc": []}


def _run(processes: int, method: str, model: str, bench: Path, out: Path) -> None:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] if processes > 1
              else [sys.executable])
    cmd = [*launch, "-m", "clora.cli", "run", "--method", method, "--model", model, "--data-dir", str(bench),
           "--output", str(out), *ARGS, *OPTIONS[method]]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted(out.glob("stages/*/*.safetensors")) + sorted(out.glob("stages/*/adapter/*.safetensors")):
        found.update({f"{f.relative_to(out)}:{k}": v for k, v in load_file(str(f)).items()})
    return found


def _first_loss(out: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return events.Scalars("train/loss")[0].value


@pytest.mark.parametrize("method", ["seq-lora", "deal", "gorp", "ewc"])
def test_two_processes_compute_what_one_does(method, tiny_llama, tiny_bench, tmp_path):
    _run(1, method, tiny_llama, tiny_bench, tmp_path / "one")
    _run(2, method, tiny_llama, tiny_bench, tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["accuracy_matrix"] == one["accuracy_matrix"]
    for stage in ("01-alpha", "02-beta"):
        r1, r2 = (json.loads((tmp_path / d / "stages" / stage / "stage.json").read_text()) for d in ("one", "two"))
        assert (r2["optimizer_steps"], r2["train_batches"]) == (r1["optimizer_steps"], r1["train_batches"]) == (12, 12)
        assert r2["mean_train_loss"] == pytest.approx(r1["mean_train_loss"], rel=1e-4)
        for task in r1["accuracy"]:
            p1, p2 = ((tmp_path / d / "stages" / stage / "predictions" / f"{task}.jsonl").read_text() for d in ("one", "two"))
            assert p2 == p1
    first = [_first_loss(tmp_path / d) for d in ("one", "two")]
    assert first[1] == pytest.approx(first[0], rel=1e-6)
    t1, t2 = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert set(t1) == set(t2) and t1
    if method in ("gorp", "ewc"):  # GORP's shared spaces, EWC's Fisher are among what is compared
        assert any(("space|" if method == "gorp" else "fisher|") in k for k in t1)
    for key in t1:
        assert (t2[key] - t1[key]).norm() <= 1e-3 * t1[key].norm() + 1e-8, key
    # Only the main process writes: one set of results, no second process's files.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_global_batch_must_split_evenly(tiny_llama, tiny_bench, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "clora.cli", "run", "--model", tiny_llama, "--data-dir",
           str(tiny_bench), "--tasks", "alpha,beta", "--batch-size", "3", "--output", str(tmp_path / "run")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "clora: error: --batch-size 3 is the global batch: it must be divisible by the 2 processes" in done.stderr


@pytest.mark.parametrize("method,allowed", [("seq-lora", True), ("o-lora", True), ("deal", False), ("gorp", False),
                                            ("galore", False)])
def test_sharded_engines_are_refused_for_methods_that_need_whole_gradients(method, allowed):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from clora.continual import check_distributed
    from clora.errors import UserError
    from clora.methods import Settings, build_method

    m = build_method(method, Settings())
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        fake = SimpleNamespace(distributed_type=kind)
        if allowed:
            check_distributed(m, fake)
        else:
            with pytest.raises(UserError, match=f"method {method} cannot train under {kind.value}"):
                check_distributed(m, fake)
    check_distributed(m, SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


@pytest.mark.parametrize("name,kind", [("multi_gpu", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_documented_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(Path(__file__).parent.parent / "docs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == 8
