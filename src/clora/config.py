"""The resolved configuration of a run: every option that changes its results. It is written to the
run directory, and a resumed run must match it exactly."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .errors import UserError
from .models import DEFAULT_MODEL


@dataclass
class RunConfig:
    method: str = "seq-lora"
    method_options: list[str] = field(default_factory=list)  # "key=value", see `clora methods`
    model: str = DEFAULT_MODEL
    data_dir: str | None = None  # None: the benchmark shipped with clora
    order: str | None = "1"
    tasks: str | None = None  # custom order "a,b,c" (instead of order)
    tasks_file: str | None = None  # a task stream file (clora.streams), instead of order/tasks and data_dir
    max_new_tokens: int = 64  # cap on the tokens generated for a free-text task of a tasks_file
    tasks_digest: dict[str, str] | None = None  # set by `prepare` from the contents of tasks_file and its data
    train_per_task: int | None = None
    test_per_task: int | None = None
    sample_seed: int = 0  # which items a cap keeps
    dev_per_task: int | None = None  # items of each task's training file held out as its dev split
    eval_split: Literal["test", "dev"] = "test"  # "dev": the matrix is over dev items (tuning), no test item is read
    epochs: int = 1
    batch_size: int = 8
    batching: Literal["length", "random"] = "length"  # training batches of similar-length items, or random
    share_prefix: bool = True  # a training batch's shared prompt prefix runs through the model once
    grad_accum: int = 1
    eval_batch_size: int = 16
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_prompt_tokens: int = 512
    seed: int = 0
    precision: Literal["no", "bf16", "fp16"] = "no"
    load_in_4bit: bool = False  # the base model's linear layers in 4 bits (NF4, bitsandbytes; QLoRA), frozen
    eval_all: bool = False  # evaluate every task after each stage (needed for FWT), not only seen ones
    zero_shot: bool = False  # evaluate the base model first (the zero-shot row, needed for FWT)
    # Run control: how the run is carried out, not what it computes; a resume may change them.
    checkpoint_every: int = 50  # optimizer steps between step checkpoints inside a stage; 0: none
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient stops the stage, or skips the batch
    report_to: str = "tensorboard"  # experiment trackers, comma-separated: tensorboard, mlflow, wandb; or none

    RUN_CONTROL: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "on_nonfinite", "report_to"})
    # Left out of to_dict() without a tasks_file, so a benchmark run's config.json stays what it always was.
    STREAM_FIELDS: ClassVar[tuple[str, ...]] = ("tasks_file", "max_new_tokens", "tasks_digest")
    # What a config.json written before an option existed was run with, where that is not the option's
    # default today (runs before length grouping shuffled their batches at random and computed every row's
    # prefix itself).
    PREDATED: ClassVar[dict] = {"batching": "random", "share_prefix": False}

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if self.tasks_file is None:
            for name in self.STREAM_FIELDS:
                del values[name]
        return values

    def validate(self) -> None:
        positive = {"--train-per-task": self.train_per_task, "--test-per-task": self.test_per_task,
                    "--dev-per-task": self.dev_per_task}
        for option, value in positive.items():
            if value is not None and value <= 0:
                raise UserError(f"{option} must be a positive integer, got {value}")
        for option, value in {"--epochs": self.epochs, "--batch-size": self.batch_size,
                              "--grad-accum": self.grad_accum, "--eval-batch-size": self.eval_batch_size,
                              "--rank": self.rank, "--max-prompt-tokens": self.max_prompt_tokens}.items():
            if value <= 0:
                raise UserError(f"{option} must be a positive integer, got {value}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.tasks_file is not None:
            if self.order is not None or self.tasks is not None:
                raise UserError("give either --tasks-file or --order/--tasks, not both: the file sets the task order")
            if self.data_dir is not None:
                raise UserError("--data-dir does not apply with --tasks-file: the file names each task's data")
            if self.max_new_tokens <= 0:
                raise UserError(f"--max-new-tokens must be a positive integer, got {self.max_new_tokens}")
        elif (self.order is None) == (self.tasks is None):
            raise UserError("give exactly one of --order and --tasks")
        if self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        from .tracking import names

        names(self.report_to)  # an unknown or uninstalled tracker, before anything is written
        if self.on_nonfinite not in ("stop", "skip"):
            raise UserError(f"--on-nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if self.batching not in ("length", "random"):
            raise UserError(f"--batching must be length or random, got {self.batching!r}")
        if self.eval_split not in ("test", "dev"):
            raise UserError(f"--eval-split must be test or dev, got {self.eval_split!r}")
        if self.eval_split == "dev" and self.dev_per_task is None:
            raise UserError("--eval-split dev needs a dev split: give --dev-per-task N")
        if self.precision not in ("no", "bf16", "fp16"):
            raise UserError(f"--precision must be no, bf16 or fp16, got {self.precision!r}")
        if self.load_in_4bit:
            from .models import require_bitsandbytes

            require_bitsandbytes()
