"""A clora method inside your own `transformers.Trainer` or TRL `SFTTrainer`.

`clora.integrations.run` is `clora.run` with the training of every stage handed to a Trainer you build:
clora loads the data and the model, attaches the method, and for each task of the stream calls the
method's `on_task_start`, then your `make_trainer(stage)`, then `trainer.train()`, then `on_task_end`,
evaluates every task seen so far and commits the stage to the run folder, exactly as `clora run` does.
The folder is the same kind of thing (config.json, stages/NN-task/{adapter, method_state, predictions,
stage.json}, metrics.json, report.md), so `--resume`, `clora export` and a next stage trained by
`clora run --resume` read it; a run killed mid-stage continues after its last finished stage.

    import clora
    from clora.integrations import run
    from trl import SFTTrainer

    config = clora.RunConfig(method="gorp", model="my/model", tasks_file="stream.yaml", lr=2e-4, epochs=1)
    run(config, "runs/trl", lambda stage: stage.trainer(SFTTrainer))

What the Trainer built by `stage.trainer(cls, args=None, **kwargs)` does besides its own work:

* optimizer: the method's (`method.make_optimizer`: GaLore/GORP's projected AdamW, DEAL's update_lr
  groups), passed as `optimizers=(optimizer, None)`; the Trainer adds its lr schedule from `args`.
* loss: after each micro-batch's backward, `method.penalty(model)` (O-LoRA, EWC, DEAL, N-LoRA) is
  back-propagated with weight 1 / (micro-batches per step), and added to the loss the Trainer logs, which
  is therefore task loss + penalty; its logs also carry `penalty` alone.
* gradient hook: `method.before_optimizer_step(model, optimizer)` (GORP's shared-space projection) runs
  after the step's last backward and before gradient clipping, the order of clora's own loop. (Where the
  Trainer has no `_clip_grad_norm` to hook, transformers < 5, or with max_grad_norm 0, it runs in the
  `on_pre_optimizer_step` callback instead: after clipping, still before the step.)

`stage.dataset` holds the stage's training items (`method.training_items`: Replay adds its buffer) as
the token ids `clora run` trains on (`input_ids`, and `labels` with -100 outside the answer), which both
Trainer (with `stage.collator`, the default) and SFTTrainer (which skips its own tokenisation for it)
train on as they are; `stage.text_dataset` has them as TRL's prompt/completion strings, for a pipeline
that formats and tokenises text itself (its tokens may then differ from what clora evaluates: an EOS a
tokenizer appends to the prompt, a chat template). `stage.training_args(cls, **overrides)` builds the
arguments from the RunConfig (lr, epochs, batch, grad-accum, clip, weight decay, precision; constant lr,
no Trainer checkpoints or trackers). Arguments passed by hand must agree with the RunConfig on those,
since config.json records them: a difference is refused before training. The Trainer's own arguments go
to `OUTPUT/trainer/NN-task.json`; its logged loss and penalty go to the run's trackers (`report_to`).

Not covered: a killed stage restarts from its beginning (the Trainer's checkpoints are not resumed),
one process only (clora's loop is the one tested on several), and SFTTrainer trains causal LMs only
(seq2seq models train with a plain Trainer).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .atomic import write_json_atomic
from .config import RunConfig
from .errors import UserError
from .methods import Method, StageData
from .trainer import StageLog, TrainingDiverged, TrainOptions

__all__ = ["run", "TrainerStage", "ContinualTrainerMixin", "continual_trainer_class"]


def run(config: RunConfig, output: str | Path, make_trainer: Callable[["TrainerStage"], Trainer],
        resume: bool = False, overwrite: bool = False) -> dict:
    """`clora.run` with each stage trained by `make_trainer(stage)`, a Trainer built with `stage.trainer`;
    returns the contents of metrics.json."""
    from . import continual

    def train(model, method, data, options, accelerator, description, log_scalar, step_offset) -> StageLog:
        if accelerator.num_processes > 1:
            raise UserError("clora.integrations trains in one process; launch `clora run` for several")
        stage = TrainerStage(config, model, method, data, options, accelerator, log_scalar, step_offset)
        print(f"clora: {description} with a user's Trainer", flush=True)
        return stage.train(make_trainer)

    fresh = not Path(output).exists()
    try:
        return continual.run(config, output, resume=resume, overwrite=overwrite, train=train)
    except UserError:
        # The Trainer is built, and its set-up refused, only once stage 1 starts, after the run folder was
        # made: a folder this call created and that holds no finished stage goes, so the corrected call
        # starts afresh instead of meeting "already holds a different run".
        if fresh and not any(Path(output, "stages").glob("*/stage.json")):
            shutil.rmtree(output, ignore_errors=True)
        raise


class TrainerStage:
    """One stage of the stream, as `make_trainer` sees it (after the method's `on_task_start`)."""

    def __init__(self, config: RunConfig, model, method: Method, data: StageData, options: TrainOptions,
                 accelerator, log_scalar, step_offset: int):
        self.config, self.model, self.method, self.data, self.options = config, model, method, data, options
        self.index, self.name, self.tasks = data.stage.index, data.stage.name, data.stage.tasks
        self.encoder = data.encoder
        self.tokenizer = data.encoder.tokenizer
        self.accelerator = accelerator
        self.log_scalar, self.step_offset = log_scalar, step_offset
        self.output_dir = Path(options.checkpoint_dir)  # in_progress/NN-task: removed once the stage commits
        self.optimizer: torch.optim.Optimizer | None = None
        self._trainer: Trainer | None = None
        self._trainer_cls: type | None = None
        self._items = method.training_items(data)
        self._examples = [data.encoder.example(data.tasks[name].prompt(item), item.label) for name, item in self._items]
        self._dataset = self._text_dataset = None
        self.batches = 0  # micro-batches trained
        self.task_loss = 0.0  # sum over optimizer steps of the step's task loss (penalty not included)
        self._penalty_sum, self._penalty_logged_at = 0.0, 0
        self._hooked_step = False

    # -- data
    @property
    def dataset(self):
        """The stage's training items as clora encodes them: `input_ids`, `labels` (-100: no loss)."""
        if self._dataset is None:
            from datasets import Dataset

            self._dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in self._examples],
                                               "labels": [e.labels for e in self._examples]})
        return self._dataset

    @property
    def text_dataset(self):
        """The same items as TRL prompt/completion strings (the completion as clora appends it)."""
        if self._text_dataset is None:
            from datasets import Dataset

            gap = "" if self.encoder.is_encoder_decoder else " "
            self._text_dataset = Dataset.from_dict({
                "prompt": [self.data.tasks[name].prompt(item) for name, item in self._items],
                "completion": [gap + item.label for _, item in self._items]})
        return self._text_dataset

    def collator(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded batches of `dataset` rows, as clora batches them (other columns are dropped)."""
        from .encoding import Example

        return self.encoder.collate_train([Example(list(r["input_ids"]), list(r["labels"])) for r in rows])

    # -- the Trainer
    def training_args(self, cls: type[TrainingArguments] = TrainingArguments, **overrides) -> TrainingArguments:
        """`cls` (TrainingArguments, SFTConfig, ...) from the RunConfig; `overrides` win."""
        cfg = self.config
        values = dict(output_dir=str(self.output_dir), learning_rate=cfg.lr, num_train_epochs=self.options.epochs,
                      per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                      max_grad_norm=self.options.max_grad_norm, weight_decay=cfg.weight_decay,
                      lr_scheduler_type="constant", bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16",
                      seed=cfg.seed * 1_000_003 + self.index, logging_steps=1, save_strategy="no", report_to="none",
                      use_cpu=self.accelerator.device.type == "cpu", disable_tqdm=True)
        # No activation checkpointing, as in clora's loop (TRL turns it on by default); transformers 5 renamed it.
        names = {f.name for f in dataclasses.fields(cls)}
        values["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
        values.update(overrides)
        return cls(**values)

    def trainer(self, cls: type[Trainer] = Trainer, args: TrainingArguments | None = None, **kwargs) -> Trainer:
        """An instance of `cls` (Trainer, SFTTrainer or a subclass of yours) training this stage's model
        with the method: `kwargs` go to its constructor (`train_dataset` defaults to `dataset`,
        `data_collator` to `collator` for it, `processing_class` to the run's tokenizer)."""
        for key in ("model", "optimizers", "optimizer_cls_and_kwargs", "model_init", "peft_config"):
            if key in kwargs:
                raise UserError(f"stage.trainer: {key} is the method's (the stage's model and the method's "
                                "optimizer); leave it out")
        if self._trainer is not None:
            raise UserError("stage.trainer: one Trainer per stage")
        if args is None:
            args = self.training_args(_config_class(cls))
        kwargs.setdefault("train_dataset", self.dataset)
        if kwargs["train_dataset"] is self.dataset:
            kwargs.setdefault("data_collator", self.collator)
        kwargs.setdefault("processing_class", self.tokenizer)
        self.optimizer = self.method.make_optimizer(self.model)
        trainer = continual_trainer_class(cls)(model=self.model, args=args, optimizers=(self.optimizer, None), **kwargs)
        trainer.clora_stage = self
        trainer.add_callback(_MethodCallback(self))
        self._trainer, self._trainer_cls = trainer, cls
        return trainer

    def train(self, make_trainer: Callable[["TrainerStage"], Trainer]) -> StageLog:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        own_forward = vars(base).get("forward")  # TRL patches the base model's forward: put it back after
        trainer = make_trainer(self)
        if trainer is None or trainer is not self._trainer:
            raise UserError("make_trainer must return the Trainer built by stage.trainer(...), which carries the "
                            "method's optimizer, penalty and gradient hook")
        self._check_args(trainer.args)
        self._write_args(trainer)
        try:
            trainer.train()
        finally:
            if own_forward is None:
                vars(base).pop("forward", None)
            else:
                base.forward = own_forward
        if trainer.model is not self.model:
            raise UserError("the Trainer replaced the stage's model (a PEFT config or model_init?); "
                            "it must train stage.model in place")
        steps = trainer.state.global_step
        mean = self.task_loss / steps if steps else None
        if mean is not None and not math.isfinite(mean):
            raise TrainingDiverged(f"stage {self.index + 1} ({self.name}): non-finite loss in the Trainer; "
                                   "nothing of this stage was saved. Lower the learning rate or check the data")
        return StageLog(steps, self.batches, 0, mean, self.optimizer)

    # -- the method's hooks, called by the Trainer subclass and the callback
    def before_step(self) -> None:
        self.method.before_optimizer_step(self.model, self.optimizer)
        self._hooked_step = True

    def _check_args(self, args: TrainingArguments) -> None:
        """What config.json records must be what the Trainer did."""
        cfg, world = self.config, getattr(args, "world_size", 1)
        expected = {"learning_rate": (args.learning_rate, cfg.lr, "lr"),
                    "num_train_epochs": (args.num_train_epochs, self.options.epochs, "epochs"),
                    "per_device_train_batch_size": (args.per_device_train_batch_size * world, cfg.batch_size, "batch_size"),
                    "gradient_accumulation_steps": (args.gradient_accumulation_steps, cfg.grad_accum, "grad_accum"),
                    "max_grad_norm": (args.max_grad_norm, self.options.max_grad_norm, "max_grad_norm"),
                    "weight_decay": (args.weight_decay, cfg.weight_decay, "weight_decay"),
                    "max_steps": (args.max_steps if args.max_steps > 0 else -1, -1, "(epochs only)"),
                    "bf16/fp16": ("bf16" if args.bf16 else "fp16" if args.fp16 else "no", cfg.precision, "precision")}
        wrong = [f"{key} {got!r} (RunConfig {field} {want!r})" for key, (got, want, field) in expected.items()
                 if not _same(got, want)]
        if wrong:
            raise UserError("the Trainer's arguments differ from the RunConfig that config.json records: "
                            + "; ".join(wrong) + ". Build them with stage.training_args(...) or set the RunConfig to match")

    def _write_args(self, trainer: Trainer) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"trainer": f"{self._trainer_cls.__module__}.{self._trainer_cls.__qualname__}",
                  "args": json.loads(trainer.args.to_json_string())}
        path = self.output_dir.parent.parent / "trainer" / f"{self.index + 1:02d}-{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)

    def penalty_for_log(self, step: int) -> float | None:
        steps = step - self._penalty_logged_at
        if steps <= 0 or not self._penalty_sum:
            return None
        value, self._penalty_sum, self._penalty_logged_at = self._penalty_sum / steps, 0.0, step
        return value


def _same(got, want) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=0.0)
    return got == want


def _config_class(cls: type[Trainer]) -> type[TrainingArguments]:
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return TrainingArguments
    return SFTConfig if issubclass(cls, SFTTrainer) else TrainingArguments


class ContinualTrainerMixin:
    """Put before a Trainer class (see `continual_trainer_class`): adds the method's penalty to every
    micro-batch's loss and runs its gradient hook before clipping. `clora_stage` is set by
    `TrainerStage.trainer`."""

    clora_stage: TrainerStage

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        stage = self.clora_stage
        stage.batches += 1
        stage.task_loss += float(loss)  # the micro-batch's share of the step's loss, as the Trainer sums it
        penalty = stage.method.penalty(stage.model)
        if penalty is None:
            return loss
        # The Trainer sums the returned losses of a step's micro-batches: each carries its share, so the
        # step's loss (and gradient) holds the penalty once, as in clora's loop.
        share = penalty / self.current_gradient_accumulation_steps
        self.accelerator.backward(share)
        stage._penalty_sum += share.detach().item()
        return loss + share.detach().to(loss.device)

    def _clip_grad_norm(self, model):
        self.clora_stage.before_step()  # after the step's last backward, before clipping: clora's order
        return super()._clip_grad_norm(model)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            penalty = self.clora_stage.penalty_for_log(self.state.global_step)
            if penalty is not None:
                logs["penalty"] = penalty
        super().log(logs, *args, **kwargs)


_CLASSES: dict[type, type] = {}


def continual_trainer_class(cls: type[Trainer]) -> type[Trainer]:
    """`cls` with `ContinualTrainerMixin` in front (one class per `cls`)."""
    if issubclass(cls, ContinualTrainerMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Continual{cls.__name__}", (ContinualTrainerMixin, cls), {})
    return _CLASSES[cls]


class _MethodCallback(TrainerCallback):
    """The gradient hook where the Trainer did not clip through `_clip_grad_norm`; the logs to clora's
    trackers."""

    def __init__(self, stage: TrainerStage):
        self.stage = stage

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.stage._hooked_step:
            self.stage.before_step()
        self.stage._hooked_step = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.stage.log_scalar is None or not logs:
            return
        for key in ("loss", "penalty"):
            if key in logs:
                self.stage.log_scalar(f"train/{key}", float(logs[key]), self.stage.step_offset + state.global_step)
