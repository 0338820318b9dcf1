"""Training-step cost of GORP (at task 2) and of the GaLore baseline against plain PEFT LoRA, on the
same model and batch of real benchmark prompts.

Time: one process holds the three variants and alternates their training steps (forward, backward,
the method's gradient hook -- GORP's projection away from the shared space --, clipping, optimizer
step), so a slower moment of the shared machine hits all of them alike. Every variant first takes
one unmeasured step (its gradient subspace is computed there), then one full update gap T is measured
(T steps, the next subspace refresh -- an SVD per full-rank matrix -- included), and the mean over
the gap is reported: the SVD's cost is spread over the steps it serves, as in training.
GORP is measured at task 2, its worst case: a task-1 LoRA folded in and frozen, a new LoRA, the
full-rank matrices, and a shared space S built from task 1 (one step, so S is small; the projection
costs the same matmuls whatever S holds, its width only grows the two thin matmuls).
Memory: the steady-state peak resident set size of a fresh subprocess per variant that loads the
model, builds the variant, takes one training step (every weight touched, optimizer state allocated)
and then two measured steps, the peak counted from just before them (freed heap returned to the OS and
the kernel's peak count reset, /proc/self/clear_refs): the model and the method's state are in it, the
one-off peak of loading the model is not. The increase over the RSS before the measured steps
(activations, gradients, temporaries) is shown too. On CUDA, torch's peak allocated bytes.
The results go to docs/benchmarks.md, section "gorp-step-cost", with the command that produced them.

    CLORA_CACHE=/tmp/clora-cache python benchmarks/bench_gorp.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from clora.methods import Settings, build_method

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import update_section  # noqa: E402
from step_setup import bare_stage, model_and_batch  # noqa: E402
from peak_memory import peak_rss_mb, probe, reset_peak_rss, rss_now_mb  # noqa: E402

VARIANTS = ("lora", "galore", "gorp")
LABELS = {"lora": "plain PEFT LoRA (q, v)", "galore": "GaLore (gate_proj, frozen no-op LoRA)",
          "gorp": "GORP at task 2 (new LoRA + gate_proj, S)"}


def build(variant: str, args, device: torch.device):
    """(model, method, optimizer, batch) for one variant, ready to train."""
    loaded, batch = model_and_batch(args.model, args.task, args.batch, device)
    settings = Settings(rank=args.rank, lr=2e-3)
    # The full-rank rate of the committed table (1e-5, the default then): the cost does not depend on it.
    options = [f"rank={args.k}", f"update_gap={args.gap}", "full_lr=1e-5"]
    method = build_method({"lora": "seq-lora"}.get(variant, variant), settings, [] if variant == "lora" else options)
    torch.manual_seed(0)
    model = method.attach(loaded.model).to(device)
    model.train()
    method.on_task_start(model, bare_stage(0))
    optimizer = method.make_optimizer(model)
    if variant == "gorp":  # task 1 (one step builds S from Adam's first moment), then task 2 starts
        train_step(model, method, optimizer, batch)
        method.on_task_end(model, bare_stage(0), optimizer)
        method.on_task_start(model, bare_stage(1))
        optimizer = method.make_optimizer(model)
    return model, method, optimizer, batch


def train_step(model, method, optimizer, batch) -> tuple[float, float]:
    """One step as clora.trainer does it; returns (wall seconds, loss)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    method.before_optimizer_step(model, optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, loss.item()


def memory_probe(variant: str, args) -> dict:
    """Run in a fresh process: peak memory of training one variant (model and method state included)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, method, optimizer, batch = build(variant, args, device)
    train_step(model, method, optimizer, batch)  # every weight touched, optimizer state allocated
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = reset_peak_rss()
        before = rss_now_mb()
    for _ in range(args.memory_steps):
        train_step(model, method, optimizer, batch)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "increase_mb": (peak - base) / 2**20, "what": "CUDA peak allocated"}
    peak = peak_rss_mb()
    what = "peak RSS during training" if reset else "process peak RSS (could not reset the count: load included)"
    return {"peak_mb": peak, "increase_mb": peak - before, "what": what}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="dbpedia", help="benchmark task whose first training items form the batch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--k", type=int, default=8, help="GaLore/GORP gradient-subspace rank")
    parser.add_argument("--gap", type=int, default=10, help="update gap T: measured steps per variant")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine a 2-thread barrier waits on the neighbours)")
    parser.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--no-docs", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args)))
        return
    command = ("CLORA_CACHE=/tmp/clora-cache python benchmarks/bench_gorp.py " + shlex.join(sys.argv[1:])).rstrip()
    load_before = os.getloadavg()[0]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = {v: build(v, args, device) for v in VARIANTS}
    trainable = {v: sum(p.numel() for p in built[v][0].parameters() if p.requires_grad) for v in VARIANTS}
    seq_len = built["lora"][3]["input_ids"].shape[1]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(1 + args.gap):
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]  # rotate who goes first
        for v in order:
            seconds, loss = train_step(*built[v])
            losses[v].append(loss)
            if i > 0:
                times[v].append(seconds)
            print(f"step {i} {v}: {seconds:.2f} s, loss {loss:.3f}", flush=True)
    del built
    load_after = os.getloadavg()[0]

    memory = {v: probe(__file__, v) for v in VARIANTS}

    mean = {v: statistics.mean(times[v]) for v in VARIANTS}
    spread = {v: statistics.stdev(times[v]) if len(times[v]) > 1 else 0.0 for v in VARIANTS}
    rows = []
    for v in VARIANTS:
        rows.append(f"| {LABELS[v]} | {trainable[v]:,} | {mean[v]:.2f} ± {spread[v]:.2f} | "
                    f"{mean[v] / mean['lora']:.2f} | {max(times[v]):.2f} | {memory[v]['peak_mb']:.0f} | "
                    f"{memory[v]['increase_mb']:.0f} | {memory[v]['peak_mb'] / memory['lora']['peak_mb']:.2f} | "
                    f"{losses[v][0]:.2f} → {losses[v][-1]:.2f} |")
    ratio = mean["gorp"] / mean["lora"]
    verdict = f"Goal for GORP ≤ 1.15× plain LoRA's time: {ratio:.2f}×, {'met' if ratio <= 1.15 else 'NOT met'}."
    markdown = "\n".join([
        "## GORP and GaLore: training-step cost vs plain LoRA",
        "",
        f"Model `{args.model}`, LoRA rank {args.rank}, GaLore/GORP subspace rank k {args.k}, update gap T "
        f"{args.gap}, one batch of {args.batch} `{args.task}` training items ({seq_len} tokens padded), fp32 on "
        f"{device.type} ({os.cpu_count()} cores, {args.threads} torch thread(s), torch {torch.__version__}, "
        f"{platform.machine()}; load average {load_before:.1f} → {load_after:.1f}: the machine is shared).",
        "",
        "| variant | trainable params | mean step over T (s, ± sd) | time × | slowest step (s) | "
        "peak memory (MiB) | increase in training (MiB) | memory × | loss on the batch, first → last step |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Step = forward, backward, the method's gradient hook, clipping, optimizer step. Time: mean of the "
        f"{args.gap} steps of one update gap per variant, after one unmeasured step, the variants alternating "
        "in one process (the first to go rotates), so the gap's SVD refresh is inside the mean and the "
        "slowest-step column shows it. Memory: " + memory["lora"]["what"] + " of a fresh process per variant "
        f"that loads the model, takes one step and then {args.memory_steps} measured steps (model weights and "
        "optimizer state included, the one-off peak of loading the model not; the increase column is the peak "
        "minus the RSS before the measured steps: activations, gradients, temporaries). GORP and "
        "GaLore also hold a CPU copy of the base full-rank matrices (to save W − W0 exactly), counted in their "
        "peak. " + verdict,
        "",
        "The loss column is only a sign of life: each variant repeats the same batch, at learning rates "
        "LoRA 2e-3 and full-rank 1e-5; it says nothing about accuracy.",
        "",
        f"Produced by: `{command}`",
    ])
    print(markdown)
    if not args.no_docs:
        update_section(ROOT / "docs" / "benchmarks.md", "gorp-step-cost", markdown)


if __name__ == "__main__":
    main()
