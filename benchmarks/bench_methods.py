"""What every method costs next to plain PEFT LoRA, on the same model and the same batch, in one run.

1. Training step at task 2, where the methods differ (a task-1 stage already run through the method's
   own hooks: O-LoRA's and EWC's penalties have something to act on, IncLoRA/O-LoRA/GORP hold a frozen
   LoRA beside the new one, DEAL trains its filter and MLP, GORP projects away from a shared space).
   Time: every method's model is held in one process and the methods take their steps in turn, the
   first to go rotating each round, so a slow moment of the shared machine hits all of them alike;
   the median step per method and its ratio to plain LoRA's. Memory: the peak RSS of a fresh process
   per method during two steps after a first one (model, method state and optimizer state in it; the
   one-off peak of loading the model not), as a ratio to plain LoRA's.
2. After 1, 4 and 15 tasks of the long order 4: the size of what a finished stage saves (the PEFT
   adapter, the method state, the full-weight deltas of GaLore/GORP) and the time to evaluate a fixed
   set of prompts with the model as the method leaves it, as a ratio to plain rank-r LoRA timed right
   after it. The stages before a measurement train on 2 items each: what is measured depends on the
   shapes the method holds, not on how well it learned.
The results go to docs/benchmarks.md, sections "method-step-cost" and "cost-vs-tasks", with the
command that produced them.

    python benchmarks/bench_methods.py [--batch 4] [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from clora import lora
from clora.benchmark import ORDERS, Benchmark, default_benchmark_dir
from clora.encoding import Encoder
from clora.evaluation import generate
from clora.loss import answer_loss, supports_logits_to_keep
from clora.methods import Settings, StageData, build_method, registry
from clora.models import load_model
from clora.trainer import TrainOptions, train_stage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_rss_mb, probe, reset_peak_rss, rss_now_mb  # noqa: E402
from docs_section import update_section  # noqa: E402

# The methods' proxy settings (docs/results.md); GaLore/GORP subspaces at their defaults.
OPTIONS = {"deal": ["update_lr=5e-4"], "gorp": ["full_lr=1e-3"], "galore": ["full_lr=1e-3"]}


class Harness:
    """Model, tasks and encoder of the benchmark, and a method driven through its real hooks."""

    def __init__(self, args):
        self.args = args
        self.bench = Benchmark(default_benchmark_dir())
        self.accelerator = Accelerator(cpu=True)
        self.encoder = None
        self._tasks = {}

    def tasks(self, names: list[str], train: int) -> dict:
        for name in names:
            if (name, train) not in self._tasks:
                self._tasks[name, train] = self.bench.load_task(name, train_cap=train, test_cap=self.args.eval_items)
        return {name: self._tasks[name, train] for name in names}

    def new_model(self, method_name: str, stage_names: list[str]):
        loaded = load_model(self.args.model)
        self.encoder = self.encoder or Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
        method = build_method(method_name, Settings(rank=self.args.rank, lr=2e-3), OPTIONS.get(method_name, []))
        torch.manual_seed(0)
        return method.attach(loaded.model), method, method.stages(stage_names)

    def stage_data(self, stage, tasks: dict) -> StageData:
        own = [(name, item) for name in stage.tasks for item in tasks[name].train]

        def make_loader(items):
            examples = [self.encoder.example(tasks[name].prompt(item), item.label) for name, item in items]
            return DataLoader(examples, batch_size=len(own), shuffle=False, collate_fn=self.encoder.collate_train)
        return StageData(stage, tasks, own, self.encoder, self.accelerator, make_loader)

    def run_stage(self, model, method, stage, tasks: dict) -> None:
        """One stage as clora.continual runs it: the method's start hook, training, its end hook."""
        data = self.stage_data(stage, tasks)
        method.on_task_start(model, data)
        log = train_stage(model, method, data.make_loader(method.training_items(data)), TrainOptions(),
                          self.accelerator, f"{method.name} {stage.name}")
        method.on_task_end(model, data, log.optimizer)

    def at_task_2(self, method_name: str):
        """(model, method, optimizer, batch): task 1 run through the method on 2 items, task 2 started."""
        names = ORDERS["1"][:2]
        model, method, stages = self.new_model(method_name, names)
        model.train()
        if len(stages) > 1:
            self.run_stage(model, method, stages[0], self.tasks(names, 2))
        stage = stages[min(1, len(stages) - 1)]
        data = self.stage_data(stage, self.tasks(names, self.args.batch))
        method.on_task_start(model, data)
        # Task 2's items for every method (MTL's one stage holds both tasks' items): the same batch for all.
        own = [self.encoder.example(data.tasks[n].prompt(item), item.label) for n, item in data.train_items
               if n == names[1]]
        batch = self.encoder.collate_train(own[:self.args.batch])
        return model, method, method.make_optimizer(model), batch


# On a CPU the process's CPU time: the shared machine moves wall times of the same step by up to 2x
# (measured here: 5.6 s and 10.7 s for the same LoRA step), CPU time far less.
clock = time.perf_counter if torch.cuda.is_available() else time.process_time


def train_step(model, method, optimizer, batch, accelerator) -> float:
    """One optimizer step as clora.trainer takes it; returns its seconds (CPU seconds on a CPU)."""
    started = clock()
    loss = answer_loss(model, batch, False, supports_logits_to_keep(model), accelerator).loss
    penalty = method.penalty(model)
    (loss if penalty is None else loss + penalty).backward()
    method.before_optimizer_step(model, optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return clock() - started


def memory_probe(method_name: str, args) -> dict:
    """In a fresh process: the peak RSS of two training steps at task 2, after a first one."""
    harness = Harness(args)
    model, method, optimizer, batch = harness.at_task_2(method_name)
    train_step(model, method, optimizer, batch, harness.accelerator)
    reset = reset_peak_rss()
    before = rss_now_mb()
    for _ in range(2):
        train_step(model, method, optimizer, batch, harness.accelerator)
    return {"peak_mb": peak_rss_mb(), "before_mb": before, "reset": reset}


def step_costs(args, methods: list[str]) -> str:
    harness = Harness(args)
    built = {m: harness.at_task_2(m) for m in methods}
    trainable = {m: sum(p.numel() for p in built[m][0].parameters() if p.requires_grad) for m in methods}
    tokens = built[methods[0]][3]["input_ids"].shape
    times = {m: [] for m in methods}
    for r in range(1 + args.rounds):
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:
            seconds = train_step(*built[m], harness.accelerator)
            if r:
                times[m].append(seconds)
            print(f"round {r} {m}: {seconds:.2f} s", flush=True)
    del built
    memory = {m: probe(__file__, m) for m in methods}
    median = {m: statistics.median(t) for m, t in times.items()}
    ref, ref_mem = median["seq-lora"], memory["seq-lora"]["peak_mb"]
    rows = [f"| {m} | {trainable[m]:,} | {median[m]:.2f} ({', '.join(f'{t:.2f}' for t in times[m])}) | "
            f"{median[m] / ref:.2f} | {memory[m]['peak_mb']:.0f} | {memory[m]['peak_mb'] / ref_mem:.2f} |"
            for m in methods]
    return "\n".join([
        "## Every method: training-step cost at task 2 vs plain LoRA",
        "",
        f"Model `{args.model}`, LoRA rank {args.rank}, one batch of {tokens[0]} `{ORDERS['1'][1]}` training items "
        f"({tokens[1]} tokens padded), fp32 on the CPU ({args.threads} torch thread(s), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}: the machine is shared). Method options "
        f"as on the proxy: {', '.join(f'{m} ' + ' '.join(o) for m, o in OPTIONS.items())}. `seq-lora` at task 2 *is* "
        "plain PEFT LoRA (one rank-r adapter, AdamW), the reference of the ratios.",
        "",
        "| method | trainable params | median step s, CPU time on a CPU (each round) | time × LoRA | peak memory (MiB) | memory × LoRA |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Step = forward (answer-token loss), the method's penalty, backward, its gradient hook, clipping, "
        f"its optimizer's step. {args.rounds} rounds after one unmeasured round, the methods in turn within a "
        "round, the first to go rotating. Memory: " + ("peak RSS (VmHWM reset after the first step)"
        if all(v["reset"] for v in memory.values()) else "process peak RSS") + " of a fresh process per "
        "method during two steps after a first one; model weights, method state and optimizer state are "
        "in it. Notes: GaLore and GORP refresh their gradient subspace (an SVD per full-rank matrix) every "
        "T = 10 steps, not inside these rounds; their cost over a whole gap is in the GORP section. Replay's "
        "step costs what LoRA's does, but it takes more of them: its buffer (8 items per earlier task) is "
        "added to each task's data. MTL trains one stage on all tasks' items: plain LoRA's step. EWC adds a "
        "Fisher estimate (one backward per item of up to `samples` items) at each task's end, not per step.",
    ])


def stage_bytes(directory: Path) -> dict[str, int]:
    sizes = {"adapter": 0, "method state": 0, "full-weight deltas": 0}
    for f in directory.rglob("*"):
        if f.is_file():
            kind = ("full-weight deltas" if "deltas" in f.name else "method state" if "method_state" in f.name
                    else "adapter")
            sizes[kind] += f.stat().st_size
    return sizes


def eval_seconds(model, method, harness: Harness, prompts: list[list[int]], max_new: int) -> float:
    with method.evaluating(model, 0):
        started = clock()
        generate(model, harness.encoder, prompts, max_new, len(prompts))
        return clock() - started


def cost_vs_tasks(args, methods: list[str], points=(1, 4, 15)) -> str:
    harness = Harness(args)
    names = ORDERS["4"]
    reference, ref_method, _ = harness.new_model("seq-lora", names)
    prompt_task = harness.tasks(names[:1], 2)[names[0]]
    prompts = [harness.encoder.prompt_ids(prompt_task.prompt(item)) for item in prompt_task.test]
    max_new = args.max_new
    rows = []
    for m in methods:
        model, method, stages = harness.new_model(m, names)
        model.train()
        done = 0
        for t in points:
            while done < t:
                harness.run_stage(model, method, stages[done], harness.tasks(names, 2))
                done += 1
            with tempfile.TemporaryDirectory() as tmp:
                method.save(model, Path(tmp))
                sizes = stage_bytes(Path(tmp))
            # Best of two, interleaved: a busy moment of the shared machine should not decide a ratio.
            ours, ref = float("inf"), float("inf")
            for _ in range(2):
                ours = min(ours, eval_seconds(model, method, harness, prompts, max_new))
                ref = min(ref, eval_seconds(reference, ref_method, harness, prompts, max_new))
            rank = {n: int(layer.r[lora.DEFAULT]) for n, layer in lora.lora_layers(model).items()}
            rows.append((m, t, sizes, ours, ref, max(rank.values())))
            print(f"{m} after {t}: {sizes} eval {ours:.2f} s vs LoRA {ref:.2f} s, rank {max(rank.values())}", flush=True)
        del model, method
    mb = lambda b: f"{b / 2**20:.1f}" if b else "—"  # noqa: E731
    table = [f"| {m} | {t} | {r} | {mb(s['adapter'])} | {mb(s['method state'])} | {mb(s['full-weight deltas'])} | "
             f"{ours:.2f} | {ours / ref:.2f} |" for m, t, s, ours, ref, r in rows]
    return "\n".join([
        "## Adapter size and evaluation time against the number of tasks",
        "",
        f"Model `{args.model}`, LoRA rank {args.rank}, the 15 tasks of order 4 in turn (each stage trains on 2 "
        f"items: sizes and times depend on shapes, not on what was learned). After 1, 4 and 15 tasks: the size of "
        f"what the stage saves, and the time to evaluate {len(prompts)} `{names[0]}` test prompts in one batch "
        f"(greedy, {max_new} new tokens, best of two) with the model as the method leaves it, against a plain "
        f"rank-{args.rank} LoRA timed right after it ({args.threads} torch thread(s), torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f}). MTL is left out: it trains one stage on all tasks.",
        "",
        "| method | tasks | adapter rank | adapter (MiB) | method state (MiB) | full-weight deltas (MiB) | eval s | eval × LoRA |",
        "|---|---|---|---|---|---|---|---|",
        *table,
        "",
        "IncLoRA, O-LoRA and GORP keep every task's LoRA as a slice of one adapter of rank r × tasks, so "
        "their adapter grows with the tasks (the eval columns show what that costs at inference; on this shared 2-core machine ratios within about ±10 % of 1 are noise); SeqLoRA, EWC, Replay and DEAL keep one "
        "rank-r adapter (DEAL writes its filter and MLP back into it after each task); GaLore and GORP add "
        "the deltas of their full-rank matrices (constant in size); PerTaskFT keeps one LoRA per task as "
        "method state and evaluates with one of them; EWC keeps a Fisher and an anchor per LoRA weight; "
        "Replay keeps buffer indices (its data stays in the benchmark).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="training items in the measured batch")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of steps")
    parser.add_argument("--eval-items", type=int, default=8, help="prompts evaluated in the task-count part")
    parser.add_argument("--max-new", type=int, default=4, help="new tokens per evaluated prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", choices=("step", "tasks", "both"), default="both")
    parser.add_argument("--methods", default=",".join(registry()))
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--page", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args)))
        return
    methods = [m for m in args.methods.split(",") if m]
    ordered = ["seq-lora"] + [m for m in methods if m != "seq-lora"]  # the reference first
    command = "python benchmarks/bench_methods.py " + shlex.join(sys.argv[1:])
    if args.part in ("step", "both"):
        text = step_costs(args, ordered) + f"\n\nProduced by: `{command.strip()}`"
        update_section(args.page, "method-step-cost", text)
        print(text, flush=True)
    if args.part in ("tasks", "both"):
        text = cost_vs_tasks(args, [m for m in ordered if m != "mtl"]) + f"\n\nProduced by: `{command.strip()}`"
        update_section(args.page, "cost-vs-tasks", text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
