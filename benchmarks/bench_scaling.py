"""Data-parallel speed-up on this machine: training steps of the default model with the same global
batch on 1 process (1 and 2 torch threads) and on 2 processes of 1 thread (torch.distributed, gloo,
through Accelerate exactly as `clora run` trains), one after another in one invocation.

Each configuration is a fresh process group that loads the model, attaches a rank-r LoRA, takes one
unmeasured step and then `--steps` measured ones (forward, loss, backward with the gradient
all-reduce, clipping, AdamW) over the same global batches of real `dbpedia` items. The ratio is the
step time of 1 process x 1 thread over that of each configuration, measured in the same run.
The results go to docs/scaling.md, section "cpu-scaling", with the command that produced them.

    python benchmarks/bench_scaling.py [--steps 4] [--batch 8]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import update_section  # noqa: E402

CONFIGS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]


def worker(args) -> None:
    import torch
    from torch.utils.data import DataLoader

    from clora.benchmark import Benchmark, default_benchmark_dir
    from clora.config import RunConfig
    from clora.continual import make_accelerator
    from clora.encoding import Encoder
    from clora.loss import answer_loss, supports_logits_to_keep
    from clora.methods import Settings, Stage, StageData, build_method
    from clora.models import load_model

    torch.manual_seed(0)
    accelerator = make_accelerator(RunConfig())
    loaded = load_model(args.model)
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    task = Benchmark(default_benchmark_dir()).load_task("dbpedia", train_cap=args.batch * (args.steps + 1), sample_seed=0)
    examples = [encoder.example(task.prompt(item), item.label) for item in task.train]
    method = build_method("seq-lora", Settings(rank=args.rank, lr=2e-3))
    model = method.attach(loaded.model)
    method.on_task_start(model, StageData(Stage(0, "dbpedia", ["dbpedia"]), {}, [], encoder, accelerator, None))
    optimizer = method.make_optimizer(model)
    loader = DataLoader(examples, batch_size=args.batch, collate_fn=encoder.collate_train)  # global batches
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    keep = supports_logits_to_keep(model)
    times, losses = [], []
    for batch in loader:
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        result = answer_loss(wrapped, batch, loaded.is_encoder_decoder, keep, accelerator)
        accelerator.backward(result.loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accelerator.wait_for_everyone()
        times.append(time.perf_counter() - start)
        losses.append(result.mean)
    if accelerator.is_main_process:
        print("RESULT " + json.dumps({"times": times[1:], "losses": losses}))


def launch(processes: int, threads: int, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    script = [str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps), "--batch", str(args.batch),
              "--rank", str(args.rank), "--model", args.model]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", "29631", *script] if processes > 1
           else [sys.executable, *script])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{processes} x {threads} failed:\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--page", default=str(ROOT / "docs" / "scaling.md"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    load_before = os.getloadavg()[0]
    results = {label: launch(p, t, args) for label, p, t in CONFIGS}
    reference = statistics.median(results[CONFIGS[0][0]]["times"])
    rows = []
    for label, _, _ in CONFIGS:
        r = results[label]
        median = statistics.median(r["times"])
        rows.append(f"| {label} | {median:.2f} | {', '.join(f'{t:.2f}' for t in r['times'])} | "
                    f"{reference / median:.2f} | {r['losses'][0]:.4f} → {r['losses'][-1]:.4f} |")
    same = all(abs(results[l]["losses"][0] - results[CONFIGS[0][0]]["losses"][0]) < 1e-4 for l, _, _ in CONFIGS)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python benchmarks/bench_scaling.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = f"""## Data-parallel speed-up on this CPU (measured)

Model `{args.model}`, seq-lora rank {args.rank}, global batch {args.batch} `dbpedia` training items per step,
{args.steps} measured steps after one unmeasured one, fp32, torch {torch.__version__}, {os.cpu_count()} cores,
load average {load_before:.1f} → {os.getloadavg()[0]:.1f} (other jobs share the machine when it is above 0).

| configuration | median step (s) | measured steps (s) | speed-up × vs 1 process x 1 thread | loss, first → last step |
|---|---|---|---|---|
{chr(10).join(rows)}

Every configuration takes the same steps on the same global batches: the first loss is the same to
1e-4 in all three ({'yes' if same else 'NO'}), as the 2-process = 1-process tests require.

Produced by: `{command.strip()}`
"""
    update_section(args.page, "cpu-scaling", text, title="# Scaling out\n")
    print(text)


if __name__ == "__main__":
    main()
