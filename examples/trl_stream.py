"""A clora method over a task stream, each task trained by TRL's SFTTrainer (clora.integrations).

    pip install 'clora[trl]'
    python examples/trl_stream.py --method deal --output runs/trl-deal

The run folder is a `clora run` folder (accuracy matrix, per-stage adapters, metrics.json): `clora export
runs/trl-deal --to models/deal` gives the merged model, and `clora run --resume` could continue it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trl import SFTConfig, SFTTrainer

import clora
from clora.integrations import run

STREAM = Path(__file__).parent / "stream" / "stream.yaml"


def make_trainer(stage):
    # The arguments follow the RunConfig (lr, epochs, batch, ...); anything else of SFTConfig can be set here.
    args = stage.training_args(SFTConfig, logging_steps=5)
    return stage.trainer(SFTTrainer, args=args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="deal")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks-file", default=str(STREAM))
    parser.add_argument("--train-per-task", type=int, default=None)
    parser.add_argument("--test-per-task", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--output", required=True)
    a = parser.parse_args(argv)
    config = clora.RunConfig(method=a.method, model=a.model, tasks_file=a.tasks_file, order=None, lr=a.lr,
                             epochs=a.epochs, train_per_task=a.train_per_task, test_per_task=a.test_per_task,
                             report_to="none")
    result = run(config, a.output, make_trainer)
    print(f"AA {result['metrics']['AA']:.1f}  BWT {result['metrics']['BWT']:.1f}  -> {a.output}/report.md")
    return result


if __name__ == "__main__":
    main()
