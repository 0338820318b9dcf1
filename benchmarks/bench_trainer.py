"""clora's training loop against the alternative a user would pick: `transformers.Trainer` + PEFT LoRA
(how the O-LoRA, DEAL and GORP reference code train), on the same SeqLoRA stage in the same process.

Same model, items, rank, alpha, target modules, lr (constant, no warm-up), batch, epochs, gradient
clipping and answer-only loss (prompt positions labelled -100) for both. What differs is each loop's
own machinery: clora batches items of similar length together (`--batching length`), runs the
instruction every item of a batch starts with through the model once (`--share-prefix`) and computes
logits only at answer positions; the Trainer pads each random batch to its longest item and computes
the LM head over every position (its defaults, as the reference code runs it). The loops run in
alternating order (ABBA over `--repeats`); wall time per epoch, tokens/s, peak memory (VmHWM restarted
before each loop), the final training loss and the task's accuracy after the stage (both evaluated by
the same clora evaluation) are reported as ratios. Written to docs/benchmarks.md, section
"trainer-vs-clora" ("-gpu" on a GPU), with the command.

    OMP_NUM_THREADS=1 python benchmarks/bench_trainer.py [--task dbpedia] [--train 192] [--test 32] [--repeats 1]
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from clora import lora
from clora.batching import TrainingBatches, padding_fraction
from clora.benchmark import Benchmark, default_benchmark_dir
from clora.encoding import Encoder
from clora.evaluation import evaluate_task
from clora.methods import Settings, Stage, StageData, build_method
from clora.models import load_model
from clora.trainer import TrainOptions, train_stage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import update_section  # noqa: E402
from peak_memory import peak_rss_mb, reset_peak_rss  # noqa: E402

LAST = 5  # batches averaged for "final training loss"
# On a CPU the process's CPU time: other work on the machine moves wall times by tens of percent from one
# run to the next (measured here: the same clora stage took 194 s and 383 s of wall time), CPU time far less.
clock = time.perf_counter if torch.cuda.is_available() else time.process_time


def clora_loop(args, task, accelerator, share_prefix: bool = True):
    loaded = load_model(args.model)
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    torch.manual_seed(args.seed)
    method = build_method("seq-lora", Settings(rank=args.rank, alpha=args.alpha, lr=args.lr, seed=args.seed))
    model = method.attach(loaded.model)
    items = [(task.name, item) for item in task.train]
    method.on_task_start(model, StageData(Stage(0, task.name, [task.name]), {task.name: task}, items, encoder,
                                          accelerator, None))
    examples = [encoder.example(task.prompt(item), item.label) for _, item in items]
    lengths = [len(e.input_ids) for e in examples]
    batches = TrainingBatches(lengths, args.batch, args.batching, torch.Generator().manual_seed(args.seed))
    loader = DataLoader(examples, batch_sampler=batches, collate_fn=encoder.collate_train)
    losses: list[float] = []

    def log_scalar(tag, value, _step):
        if tag == "train/loss":
            losses.append(value)

    reset_peak_rss()
    start = clock()
    train_stage(model, method, loader, TrainOptions(epochs=args.epochs, max_grad_norm=1.0, share_prefix=share_prefix),
                accelerator,
                "clora", log_scalar)
    seconds = clock() - start
    padding = padding_fraction(lengths, list(TrainingBatches(lengths, args.batch, args.batching,
                                                             torch.Generator().manual_seed(args.seed))))
    return model, encoder, seconds, peak_rss_mb(), losses, padding


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, _args, _state, _control, logs=None, **_kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def trainer_loop(args, task, out_dir: Path):
    loaded = load_model(args.model)
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    torch.manual_seed(args.seed)
    model = get_peft_model(loaded.model, lora.lora_config(args.rank, args.alpha, 0.0, None))
    examples = [encoder.example(task.prompt(item), item.label) for item in task.train]
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right"  # training pads on the right, as clora's collate does
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    training = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=args.seed, data_seed=args.seed, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False)
    losses = _Losses()
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=collator, callbacks=[losses])
    reset_peak_rss()
    start = clock()
    trainer.train()
    seconds = clock() - start
    peak = peak_rss_mb()
    masks = [batch["attention_mask"] for batch in trainer.get_train_dataloader()]  # the Trainer's own batching
    padding = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    return model, encoder, seconds, peak, losses.losses, padding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="dbpedia")
    parser.add_argument("--train", type=int, default=192)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batching", default="length", choices=["length", "random"], help="clora's batching")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each loop, in ABBA order")
    parser.add_argument("--page", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    task = Benchmark(default_benchmark_dir()).load_task(args.task, args.train, args.test, sample_seed=0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    encoder = Encoder(load_model(args.model).tokenizer, is_encoder_decoder=False)
    tokens = sum(len(encoder.example(task.prompt(i), i.label).input_ids) for i in task.train) * args.epochs
    loops = {"clora": lambda: clora_loop(args, task, accelerator),
             "clora --no-share-prefix": lambda: clora_loop(args, task, accelerator, share_prefix=False),
             "Trainer + PEFT": lambda: trainer_loop(args, task, Path("/tmp/clora-bench-trainer"))}
    results: dict[str, list[dict]] = {name: [] for name in loops}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats):
        for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):  # ABBA
            model, encoder, seconds, peak, losses, padding = loops[name]()
            score = evaluate_task(model, encoder, task, accelerator, 16, f"eval {name}")
            results[name].append({"seconds": seconds, "peak": peak, "final": statistics.fmean(losses[-LAST:]),
                                  "mean": statistics.fmean(losses), "accuracy": score.accuracy, "padding": padding,
                                  "steps": len(losses)})
            print(name, results[name][-1], flush=True)
            del model

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    def each(name):
        return ", ".join(f"{r['seconds']:.0f}" for r in results[name])

    ours, theirs = "clora", "Trainer + PEFT"
    rows = "\n".join(
        f"| {name} | {med(name, 'seconds') / args.epochs:.0f} ({each(name)}) "
        f"| {tokens / med(name, 'seconds'):.0f} | {med(name, 'padding'):.2f} | {med(name, 'peak'):.0f} "
        f"| {med(name, 'final'):.3f} | {med(name, 'mean'):.3f} | {med(name, 'accuracy'):.1f} |" for name in loops)
    ratio = med(ours, "seconds") / med(theirs, "seconds")
    gpu = torch.cuda.is_available()
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python benchmarks/bench_trainer.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    where = (f"one {torch.cuda.get_device_name()} GPU" if gpu else
             f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores")
    text = f"""## Training: clora's loop against Transformers Trainer + PEFT{' on a GPU' if gpu else ''}

One SeqLoRA stage, model `{args.model}`, `{args.task}`, {args.train} training items
({tokens // args.epochs:,} tokens per epoch), {args.epochs} epoch(s), batch {args.batch}, lr {args.lr} constant,
rank {args.rank}, alpha {args.alpha:g}, q/v projections, clipping 1.0, answer-only loss, fp32, {where},
torch {torch.__version__}; load average {load_before:.1f} → {os.getloadavg()[0]:.1f}. Medians of {args.repeats} run(s)
of each loop in alternating order, timed in {'wall' if gpu else 'CPU (process) time, which other work on the machine disturbs far less than wall'} seconds; accuracy on {args.test} test items, evaluated the same way for both.
clora's batches: `--batching {args.batching}`; the Trainer's: its defaults (random, padded to the longest item).

| loop | {'wall' if gpu else 'CPU'} s per epoch (each run) | tokens/s | padding fraction | peak RSS (MB) | final loss (last {LAST} batches) | mean loss | accuracy |
|---|---|---|---|---|---|---|---|
{rows}

clora's stage takes **{ratio:.2f}×** the Trainer + PEFT time (goal ≤ 0.6×: {'met' if ratio <= 0.6 else 'missed'}),
{med(ours, 'peak') / med(theirs, 'peak'):.2f}× its peak memory; final loss {med(ours, 'final'):.3f} against
{med(theirs, 'final'):.3f}, accuracy {med(ours, 'accuracy'):.1f} against {med(theirs, 'accuracy'):.1f}
(one run of {args.test} items each: a few points of accuracy are within noise).

Produced by: `{command.strip()}`
"""
    update_section(args.page, "trainer-vs-clora-gpu" if gpu else "trainer-vs-clora", text)
    print(text)


if __name__ == "__main__":
    main()
