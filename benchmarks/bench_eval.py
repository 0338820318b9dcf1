"""Evaluation throughput: clora's batched greedy generation against a plain per-item `generate` loop
and against the floor, one forward pass over the same prompts (what any generation must at least
compute), in one run on the same model, prompts and threads.

Ours: prompts sorted by length, left-padded batches, greedy `generate` with the KV cache and
`max_new_tokens` = the longest label's token count (`clora.evaluation.generate`). The per-item loop is
what evaluation scripts of the field do: one `generate` per prompt with the same bound. The bare
forward pass runs the same batches through the model once, without generating. The three are
repeated in rotating order and the medians kept; the predictions of ours and of the per-item loop
are compared item by item.
The results go to docs/benchmarks.md, section "eval-throughput" (on a CPU) or "eval-throughput-gpu"
(on a GPU), with the command that produced them.

    python benchmarks/bench_eval.py [--items 32] [--task dbpedia] [--batch 16] [--repeats 2] [--device cuda]
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

from clora.benchmark import Benchmark, default_benchmark_dir
from clora.encoding import Encoder
from clora.evaluation import generate
from clora.models import load_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import update_section  # noqa: E402


@torch.no_grad()
def per_item(model, encoder: Encoder, prompts: list[list[int]], max_new: int) -> list[str]:
    texts = []
    for ids in prompts:
        batch = {k: v.to(model.device) for k, v in encoder.collate_prompts([ids]).items()}
        out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, num_beams=1,
                             eos_token_id=encoder.eos, pad_token_id=encoder.pad)
        if not encoder.is_encoder_decoder:
            out = out[:, batch["input_ids"].shape[1]:]
        texts.append(encoder.tokenizer.decode(out[0].tolist(), skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def bare_forward(model, encoder: Encoder, prompts: list[list[int]], batch_size: int) -> None:
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        batch = encoder.collate_prompts([prompts[i] for i in order[start:start + batch_size]])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if encoder.is_encoder_decoder:
            start_ids = torch.full((batch["input_ids"].shape[0], 1), model.config.decoder_start_token_id,
                                   device=model.device)
            model(**batch, decoder_input_ids=start_ids)
        else:
            model(**batch, logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="dbpedia")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--page", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    loaded = load_model(args.model)
    model = loaded.model.eval().to(args.device)
    gpu = model.device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)  # GPU work is asynchronous: time it finished
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    task = Benchmark(default_benchmark_dir()).load_task(args.task, test_cap=args.items, sample_seed=0)
    prompts = [encoder.prompt_ids(task.prompt(item)) for item in task.test]
    max_new = encoder.max_new_tokens(task.labels)
    load_before = os.getloadavg()[0]

    runs = {
        "per-item generate loop": lambda: per_item(model, encoder, prompts, max_new),
        "clora batched generation": lambda: generate(model, encoder, prompts, max_new, args.batch),
        "bare forward pass (floor)": lambda: bare_forward(model, encoder, prompts, args.batch),
    }
    generate(model, encoder, prompts[:2], max_new, 2)  # warm-up: first-call allocations and lazy imports
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % 3:] + names[:r % 3]:  # rotate, so no variant always runs first
            sync()
            start = time.perf_counter()
            outputs[name] = runs[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    same = sum(a == b for a, b in zip(outputs["per-item generate loop"], outputs["clora batched generation"]))
    floor = median["bare forward pass (floor)"]
    rows = "\n".join(
        f"| {name} | {args.items / median[name]:.2f} | {median[name]:.1f} ({', '.join(f'{t:.1f}' for t in times[name])}) "
        f"| {median[name] / floor:.2f} |" for name in runs)
    ours, loop = median["clora batched generation"], median["per-item generate loop"]
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python benchmarks/bench_eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    where = (f"one {torch.cuda.get_device_name()} GPU" if gpu else
             f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores")
    goal = f" (goal on a GPU ≥ 10×: {'met' if loop / ours >= 10 else 'missed'})" if gpu else ""
    text = f"""## Evaluation throughput{' on a GPU' if gpu else ''}

Model `{args.model}`, {args.items} `{args.task}` test prompts ({min(map(len, prompts))}–{max(map(len, prompts))} tokens),
greedy, at most {max_new} new tokens (the longest label), generation batch {args.batch}, fp32,
{where}, torch {torch.__version__}, load average
{load_before:.1f} → {os.getloadavg()[0]:.1f}. Medians of {args.repeats} repetitions in rotating order.

| variant | examples/s | seconds (each repetition) | × bare forward |
|---|---|---|---|
{rows}

Ours is {loop / ours:.1f}× the per-item loop{goal} and {ours / floor:.2f}× the floor of one forward pass over the
prompts (goal ≤ 1.3×: {'met' if ours / floor <= 1.3 else 'missed'}). Predictions identical to the per-item loop's: {same} of {args.items}.
The base model answers in sentences, so every prompt runs to the token bound: the worst case.

Produced by: `{command.strip()}`
"""
    update_section(args.page, "eval-throughput-gpu" if gpu else "eval-throughput", text)
    print(text)


if __name__ == "__main__":
    main()
