"""Training-step cost of DEAL at task 2 against plain PEFT LoRA, on the same model, batch and rank.

Time: one process holds both models (plain LoRA, and DEAL after a task-1 LoRA with its filters and
MLPs attached) and alternates their training steps (forward, loss + penalty, backward, clipping,
AdamW step); the ratio is taken round by round, so the load of the moment on a shared machine
cancels. Each step's CPU time is the measure, on one torch thread by default: on a loaded 2-core
machine two threads mostly measure their waiting for each other at every operation's barrier
(measured here: steps 2-5x slower than on one thread, swinging by ±50 % from one step to the next,
whichever the method), so a 10 % question cannot be answered with them. Wall times are reported too.
DEAL's own extra work (its filters, MLPs, penalty and optimizer) is also timed alone.
Memory: on CPU, the peak resident set size of a fresh subprocess per variant while it trains (the
kernel's high-water mark, reset after the model and batch are loaded), with glibc told to return
freed memory; on CUDA, torch's peak allocated bytes.
The results go to docs/benchmarks.md, section "deal-step-cost", with the command that produced them.

    CLORA_CACHE=/tmp/clora-cache python benchmarks/bench_deal.py
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from clora.methods import Settings, build_method
from clora.methods.deal import FactorGroup

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import update_section  # noqa: E402
from step_setup import bare_stage, model_and_batch  # noqa: E402

VARIANTS = ("lora", "deal")
# In the memory probes every allocation above 64 KiB is its own mmap, returned to the system when
# freed: otherwise glibc keeps freed activation memory resident and reuses it, and the peak RSS
# hides whatever fits into it (both variants then read the same peak to the kilobyte).
MALLOC_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=65536"}


def build(variant: str, args, device: torch.device):
    """(model, method, optimizer, batch) for one variant, ready to train."""
    loaded, batch = model_and_batch(args.model, args.task, args.batch, device)
    settings = Settings(rank=args.rank, lr=2e-3)
    method = build_method("deal" if variant == "deal" else "seq-lora", settings, args.option)
    model = method.attach(loaded.model).to(device)
    method.on_task_start(model, bare_stage(0))
    if variant == "deal":
        torch.manual_seed(0)
        with torch.no_grad():  # a task-1 LoRA: B is non-zero after training
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        method.on_task_start(model, bare_stage(1))
    model.train()
    optimizer = method.make_optimizer(model)
    return model, method, optimizer, batch


def train_step(model, method, optimizer, batch) -> tuple[float, float]:
    """One step as clora.trainer does it; returns its (wall, CPU) time in seconds."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    loss = model(**batch).loss
    penalty = method.penalty(model)
    (loss if penalty is None else loss + penalty).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def deal_extra_seconds(built: dict) -> float:
    """DEAL's own work in one step, timed alone (CPU time): its groups' forward and backward (with a
    fixed upstream gradient), the penalty, and clipping + AdamW over its parameters, minus clipping +
    AdamW over plain LoRA's parameters. Everything else in a step is the same model computation."""
    deal_model, method, deal_opt, _ = built["deal"]
    lora_model, _, lora_opt, _ = built["lora"]
    groups = list({id(m): m for m in deal_model.modules() if isinstance(m, FactorGroup)}.values())
    upstream = [torch.randn_like(y) for g in groups for y in g.output()]
    deal_params = [p for p in deal_model.parameters() if p.requires_grad]
    lora_params = [p for p in lora_model.parameters() if p.requires_grad]
    started = time.process_time()
    for g in groups:
        g.invalidate()
    outputs = [y for g in groups for y in g.output()]
    torch.autograd.backward(outputs + [method.penalty(deal_model)], upstream + [torch.ones(())])
    torch.nn.utils.clip_grad_norm_(deal_params, 1.0)
    deal_opt.step()
    deal_opt.zero_grad(set_to_none=True)
    deal_seconds = time.process_time() - started
    for p in lora_params:
        p.grad = torch.randn_like(p)
    started = time.process_time()
    torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
    lora_opt.step()
    lora_opt.zero_grad(set_to_none=True)
    return deal_seconds - (time.process_time() - started)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024  # kB


def memory_probe(variant: str, args) -> dict:
    """Run in a fresh process: peak memory while training one variant, its model and batch loaded."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, method, optimizer, batch = build(variant, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(args.memory_steps):
            train_step(model, method, optimizer, batch)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "increase_mb": (peak - base) / 2**20}
    # Reset the kernel's high-water mark: loading the benchmark's JSON and the model peaks higher than
    # training does, and would hide it.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mb("VmRSS")
    for _ in range(args.memory_steps):
        train_step(model, method, optimizer, batch)
    peak = _status_mb("VmHWM")
    return {"peak_mb": peak, "increase_mb": peak - before}


def _fmt(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _paired(times: dict[str, list[tuple[float, float]]], which: int) -> float:
    # Each round's two steps ran back to back: their ratio cancels the load of the moment.
    return statistics.median(d[which] / l[which] for d, l in zip(times["deal"], times["lora"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="dbpedia", help="benchmark task whose first training items form the batch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see the module docstring)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds")
    parser.add_argument("--steps", type=int, default=4, help="measured rounds (one step of each variant)")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--extra-reps", type=int, default=10, help="repetitions of the timing of DEAL's own work")
    parser.add_argument("-o", "--option", action="append", default=[], help="DEAL option key=value")
    parser.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--no-docs", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args)))
        return
    command = ("CLORA_CACHE=/tmp/clora-cache python benchmarks/bench_deal.py " + shlex.join(sys.argv[1:])).strip()
    torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()[0]
    built = {v: build(v, args, device) for v in VARIANTS}
    trainable = {v: sum(p.numel() for p in built[v][0].parameters() if p.requires_grad) for v in VARIANTS}
    seq_len = built["lora"][3]["input_ids"].shape[1]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.steps):
        for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):  # alternate who goes first
            wall, cpu = train_step(*built[v])
            if i >= args.warmup:
                times[v].append((wall, cpu))
            print(f"round {i + 1} {v}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    extra = [deal_extra_seconds(built) for _ in range(args.extra_reps)]
    print(f"DEAL's own work per step (CPU s): {_fmt(extra, 3)}", flush=True)
    load_after = os.getloadavg()[0]
    del built

    memory = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--probe", v, *sys.argv[1:]], check=True,
                             capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}).stdout
        memory[v] = json.loads(out.strip().splitlines()[-1])
        print(f"memory {v}: {memory[v]}", flush=True)

    wall = {v: statistics.median(w for w, _ in times[v]) for v in VARIANTS}
    cpu = {v: statistics.median(c for _, c in times[v]) for v in VARIANTS}
    cpu_ratio, wall_ratio = _paired(times, 1), _paired(times, 0)
    extra_ratio = 1 + statistics.median(extra) / cpu["lora"]
    state_mb = {v: 16 * trainable[v] / 2**20 for v in VARIANTS}  # fp32 parameter, gradient, 2 AdamW moments
    mem_ratio = memory["deal"]["peak_mb"] / memory["lora"]["peak_mb"]
    options = " ".join(args.option) or "defaults (factors=AB, kernel=heat, num_kernels=4, mlp_hidden=128)"
    rows = [f"| plain PEFT LoRA | {trainable['lora']:,} | {cpu['lora']:.2f} | {wall['lora']:.2f} | 1.00 | "
            f"{memory['lora']['peak_mb']:.0f} | {memory['lora']['increase_mb']:.0f} | 1.00 |",
            f"| DEAL at task 2 | {trainable['deal']:,} | {cpu['deal']:.2f} | {wall['deal']:.2f} | {cpu_ratio:.2f} | "
            f"{memory['deal']['peak_mb']:.0f} | {memory['deal']['increase_mb']:.0f} | {mem_ratio:.2f} |"]
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    peak_what = ("CUDA peak allocated bytes" if device.type == "cuda" else
                 "peak resident set size (the kernel's VmHWM, reset after the model and batch are loaded)")
    markdown = "\n".join([
        "## DEAL: training-step cost at task 2 vs plain LoRA",
        "",
        f"Model `{args.model}`, rank {args.rank}, one batch of {args.batch} `{args.task}` training items "
        f"({seq_len} tokens padded), fp32 on {device.type} with {args.threads} torch thread(s) "
        f"({os.cpu_count()} cores shared with other jobs, load average {load_before:.1f} → {load_after:.1f}; "
        f"torch {torch.__version__}). DEAL options: {options}; its task-1 LoRA is a random non-zero one "
        "(the cost does not depend on its values).",
        "",
        "| variant | trainable params | median step CPU (s) | median step wall (s) | time × | peak memory (MiB) "
        "| increase in training (MiB) | memory × |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Step = forward, loss + penalty, backward, gradient clipping, AdamW step. {args.steps} rounds after "
        f"{args.warmup} warm-up, each round one step of each variant back to back in one process (which goes "
        "first alternates). *time ×* = the median over rounds of DEAL's step CPU time / LoRA's in the same "
        f"round ({cpu_ratio:.2f}; by wall time {wall_ratio:.2f}). All steps, CPU s: LoRA "
        f"{_fmt([c for _, c in times['lora']], 2)}; DEAL {_fmt([c for _, c in times['deal']], 2)}; wall s: "
        f"LoRA {_fmt([w for w, _ in times['lora']], 2)}; DEAL {_fmt([w for w, _ in times['deal']], 2)}.",
        "",
        f"DEAL's own work per step, timed alone ({args.extra_reps} repetitions, CPU time: its batched filters "
        "and MLPs forward and backward, the penalty, clipping and AdamW over its parameters, minus clipping "
        f"and AdamW over LoRA's): median {statistics.median(extra):.3f} s, i.e. {extra_ratio:.3f}× LoRA's "
        "median step; the rest of a step is the same model computation for both.",
        "",
        f"Memory: {peak_what} of a fresh process per variant running {args.memory_steps} steps (model weights "
        "included; *increase* = peak − RSS before the first step: activations, gradients, optimizer state). "
        "In these processes allocations above 64 KiB are mmapped and returned when freed, so the RSS follows "
        "live memory rather than glibc's cache of freed blocks. The persistent training state (fp32 "
        f"parameters, gradients, two AdamW moments) is {state_mb['deal']:.0f} MiB for DEAL and "
        f"{state_mb['lora']:.0f} MiB for LoRA, small next to a batch's activations.",
        "",
        f"Goal ≤ 1.10× time, ≤ 1.15× memory: time {met(cpu_ratio <= 1.10)} ({cpu_ratio:.2f}), memory "
        f"{met(mem_ratio <= 1.15)} ({mem_ratio:.2f}). After each task DEAL writes its factors back into a "
        "plain rank-r LoRA, so inference and the saved adapter cost exactly what plain LoRA costs; these "
        "figures are the training overhead only.",
        "",
        f"Produced by: `{command}`",
    ])
    print(markdown)
    if not args.no_docs:
        update_section(ROOT / "docs" / "benchmarks.md", "deal-step-cost", markdown)


if __name__ == "__main__":
    main()
