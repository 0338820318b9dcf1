"""Training-step cost of DEAL at task 2 against plain PEFT LoRA, on the same model, batch and rank.

Time: one process holds both models (plain LoRA, and DEAL after a task-1 LoRA with its filters and
MLPs attached) and alternates their training steps (forward, loss + penalty, backward, clipping,
AdamW step), so a slower or faster moment of a shared machine hits both alike; the median of the
measured steps is reported after warm-up steps.
Memory: on CPU, the peak resident set size (ru_maxrss) of a fresh subprocess per variant that loads
the model, builds the variant and runs the same training steps: the whole process's peak, model
included, which is what a user's machine has to hold; its increase over the RSS before the first
step (activations, gradients, optimizer state) is shown too. On CUDA, torch's peak allocated bytes.
The results go to docs/benchmarks.md, section "deal-step-cost", with the command that produced them.

    CLORA_CACHE=/tmp/clora-cache python benchmarks/bench_deal.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from clora.benchmark import Benchmark, default_benchmark_dir
from clora.encoding import Encoder
from clora.methods import Settings, Stage, StageData, build_method
from clora.models import load_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import update_section  # noqa: E402

VARIANTS = ("lora", "deal")


def _stage(index: int) -> StageData:
    return StageData(Stage(index, f"task{index + 1}", [f"task{index + 1}"]), {}, [], None, None, None)


def build(variant: str, args, device: torch.device):
    """(model, method, optimizer, batch) for one variant, ready to train."""
    loaded = load_model(args.model)
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    task = Benchmark(default_benchmark_dir()).load_task(args.task, train_cap=args.batch, sample_seed=0)
    batch = encoder.collate_train([encoder.example(task.prompt(item), item.label) for item in task.train])
    batch = {k: v.to(device) for k, v in batch.items()}
    settings = Settings(rank=args.rank, lr=2e-3)
    method = build_method("deal" if variant == "deal" else "seq-lora", settings, args.option)
    model = method.attach(loaded.model).to(device)
    method.on_task_start(model, _stage(0))
    if variant == "deal":
        torch.manual_seed(0)
        with torch.no_grad():  # a task-1 LoRA: B is non-zero after training
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        method.on_task_start(model, _stage(1))
    model.train()
    optimizer = method.make_optimizer(model)
    return model, method, optimizer, batch


def train_step(model, method, optimizer, batch) -> float:
    """One step as clora.trainer does it; returns its wall time in seconds."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    loss = model(**batch).loss
    penalty = method.penalty(model)
    (loss if penalty is None else loss + penalty).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_probe(variant: str, args) -> dict:
    """Run in a fresh process: peak memory of building one variant and training it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, method, optimizer, batch = build(variant, args, device)
    before = _rss_now_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(args.memory_steps):
        train_step(model, method, optimizer, batch)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "increase_mb": (peak - base) / 2**20, "what": "CUDA peak allocated"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak, "increase_mb": peak - before, "what": "peak RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="dbpedia", help="benchmark task whose first training items form the batch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per variant")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("-o", "--option", action="append", default=[], help="DEAL option key=value")
    parser.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--no-docs", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args)))
        return
    command = "CLORA_CACHE=/tmp/clora-cache python benchmarks/bench_deal.py " + shlex.join(sys.argv[1:])

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = {v: build(v, args, device) for v in VARIANTS}
    trainable = {v: sum(p.numel() for p in built[v][0].parameters() if p.requires_grad) for v in VARIANTS}
    seq_len = built["lora"][3]["input_ids"].shape[1]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.steps):
        for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):  # alternate who goes first
            seconds = train_step(*built[v])
            if i >= args.warmup:
                times[v].append(seconds)
            print(f"step {i + 1} {v}: {seconds:.2f} s", flush=True)
    del built

    memory = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--probe", v, *sys.argv[1:]], check=True,
                             capture_output=True, text=True).stdout
        memory[v] = json.loads(out.strip().splitlines()[-1])
        print(f"memory {v}: {memory[v]}", flush=True)

    median = {v: statistics.median(times[v]) for v in VARIANTS}
    time_ratio = median["deal"] / median["lora"]
    mem_ratio = memory["deal"]["peak_mb"] / memory["lora"]["peak_mb"]
    what = memory["lora"]["what"]
    options = " ".join(args.option) or "defaults (factors=AB, kernel=heat, num_kernels=4, mlp_hidden=128)"
    rows = [f"| plain PEFT LoRA | {trainable['lora']:,} | {median['lora']:.2f} | 1.00 | "
            f"{memory['lora']['peak_mb']:.0f} | {memory['lora']['increase_mb']:.0f} | 1.00 |",
            f"| DEAL at task 2 | {trainable['deal']:,} | {median['deal']:.2f} | {time_ratio:.2f} | "
            f"{memory['deal']['peak_mb']:.0f} | {memory['deal']['increase_mb']:.0f} | {mem_ratio:.2f} |"]
    verdict = (f"Goal ≤ 1.10× time, ≤ 1.15× memory: time {'met' if time_ratio <= 1.10 else 'NOT met'}, "
               f"memory {'met' if mem_ratio <= 1.15 else 'NOT met'}.")
    markdown = "\n".join([
        "## DEAL: training-step cost at task 2 vs plain LoRA",
        "",
        f"Model `{args.model}`, rank {args.rank}, one batch of {args.batch} `{args.task}` training items "
        f"({seq_len} tokens padded), fp32 on {device.type} ({os.cpu_count()} cores, torch {torch.__version__}, "
        f"{platform.machine()}). DEAL options: {options}; its task-1 LoRA is a random non-zero one (the cost "
        "does not depend on its values).",
        "",
        "| variant | trainable params | median step (s) | time × | peak memory (MiB) | increase in training (MiB) | memory × |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Step = forward, loss + penalty, backward, gradient clipping, AdamW step. Time: median of {args.steps} "
        f"steps per variant after {args.warmup} warm-up, the two variants alternating in one process (the "
        "machine is shared, so single steps vary; alternation spreads that over both). "
        f"Memory: {what} of a fresh process per variant that loads the model and runs {args.memory_steps} "
        "steps (model weights included; the increase column is the peak minus the RSS before the first step: "
        "activations, gradients, optimizer state). " + verdict,
        "",
        "After each task DEAL writes its factors back into a plain rank-r LoRA, so inference and the saved "
        "adapter cost exactly what plain LoRA costs; the figures above are the training overhead only.",
        "",
        f"Produced by: `{command}`",
    ])
    print(markdown)
    if not args.no_docs:
        update_section(ROOT / "docs" / "benchmarks.md", "deal-step-cost", markdown)


if __name__ == "__main__":
    main()
