"""One training stage on Hugging Face Accelerate: the same code on one CPU or several processes.

The method contributes the optimizer, an extra loss term and a gradient hook; nothing here names a
method. With `checkpoint_every` > 0 the stage writes a step checkpoint every that many optimizer steps
and after its last one, and a stage that finds a checkpoint continues from it: the batches already
done are replayed through the loader without computing anything (so the shuffling generators advance
exactly as they did) and the trainable weights, the optimizer and the generators are restored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import checkpoint, faults
from .checkpoint import Progress
from .errors import UserError
from .loss import answer_loss, supports_logits_to_keep
from .methods import Method


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the stage stops; its last step checkpoint stays loadable."""


@dataclass
class TrainOptions:
    epochs: int = 1
    max_grad_norm: float = 1.0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    checkpoint_every: int = 0  # optimizer steps; 0: no step checkpoints
    checkpoint_dir: Path | None = None
    is_encoder_decoder: bool = False
    share_prefix: bool = True  # the batch's shared prompt prefix through the model once (clora.loss)


@dataclass
class StageLog:
    steps: int
    batches: int  # on this process
    skipped: int  # batches skipped for a non-finite loss or gradient
    mean_loss: float | None  # None: no batch had a finite loss
    optimizer: torch.optim.Optimizer  # the raw optimizer, for methods that read its state at task end


def train_stage(model, method: Method, loader, options: TrainOptions, accelerator: Accelerator,
                description: str, log_scalar=None, step_offset: int = 0) -> StageLog:
    optimizer = method.make_optimizer(model)
    wrapped, prepared_optimizer, prepared_loader = accelerator.prepare(model, optimizer, loader)
    wrapped.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    keep_logits = not options.is_encoder_decoder and supports_logits_to_keep(model)
    progress = Progress()
    saved = checkpoint.latest(options.checkpoint_dir) if options.checkpoint_dir else None
    resume_at = checkpoint.position(saved) if saved is not None else 0
    if saved is not None:
        print(f"clora: continuing {description} from {saved}", flush=True)
    total_batches = options.epochs * len(prepared_loader)
    bar = tqdm(total=total_batches, desc=description, unit="batch", leave=False,
               disable=not accelerator.is_local_main_process)

    def save_checkpoint() -> None:
        if accelerator.is_main_process:
            checkpoint.save(options.checkpoint_dir, model, optimizer, progress)
        accelerator.wait_for_everyone()

    batch_index = 0
    for _ in range(options.epochs):
        for batch in prepared_loader:
            batch_index += 1
            if saved is not None:  # replaying up to the checkpoint's position
                if batch_index == resume_at:
                    progress = checkpoint.load(saved, model, optimizer)
                    saved = None
                    bar.update(batch_index - bar.n)
                continue
            with accelerator.accumulate(wrapped):
                result = answer_loss(wrapped, batch, options.is_encoder_decoder, keep_logits, accelerator,
                                     options.share_prefix)
                penalty = method.penalty(model)
                total = result.loss if penalty is None else result.loss + penalty
                finite = result.finite and (penalty is None or bool(torch.isfinite(penalty)))
                if finite:
                    accelerator.backward(total)
                    faults.point("train_backward")
                    finite = not accelerator.sync_gradients or _finite_gradients(trainable)
                if not finite:
                    _nonfinite(options, description, progress, batch_index, result.mean, penalty)
                    prepared_optimizer.zero_grad(set_to_none=True)
                elif accelerator.sync_gradients:
                    method.before_optimizer_step(model, optimizer)
                    if options.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, options.max_grad_norm)
                    prepared_optimizer.step()
                    prepared_optimizer.zero_grad(set_to_none=True)
                    progress.steps += 1
            progress.batches = batch_index
            if finite:
                progress.loss_sum += result.mean
                progress.loss_count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.mean:.3f}")
            if log_scalar is not None:
                log_scalar("train/loss", result.mean, step_offset + batch_index)
                if penalty is not None:
                    log_scalar("train/penalty", penalty.item(), step_offset + batch_index)
            if (options.checkpoint_every and finite and accelerator.sync_gradients
                    and progress.steps % options.checkpoint_every == 0 and batch_index < total_batches):
                save_checkpoint()
    if saved is not None:
        raise UserError(f"step checkpoint {saved} is past the end of this stage's data; it belongs to another run")
    # After the last step too, so a kill during evaluation does not repeat the training. Decided from what
    # every process read when the stage started, never from the folder rank 0 is writing into: a process
    # that saw rank 0's new checkpoint would skip the barrier the others wait in.
    if options.checkpoint_every and progress.batches == total_batches and resume_at != total_batches:
        save_checkpoint()
    bar.close()
    accelerator.wait_for_everyone()
    # Release Accelerate's references: the next stage prepares a model with other trainable parameters.
    accelerator._models.clear()
    accelerator._optimizers.clear()
    accelerator._dataloaders.clear()
    mean = progress.loss_sum / progress.loss_count if progress.loss_count else None
    return StageLog(progress.steps, progress.batches, progress.skipped, mean, optimizer)


def _finite_gradients(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def _nonfinite(options: TrainOptions, description: str, progress: Progress, batch: int, loss: float,
               penalty: torch.Tensor | None) -> None:
    what = f"loss {loss}" if not math.isfinite(loss) else (
        f"penalty {penalty.item()}" if penalty is not None and not torch.isfinite(penalty) else "gradient")
    if options.on_nonfinite == "skip":
        progress.skipped += 1
        print(f"clora: {description}: non-finite {what} at batch {batch}; batch skipped", flush=True)
        return
    kept = "its last step checkpoint is kept" if options.checkpoint_every else "nothing of this stage was saved"
    raise TrainingDiverged(f"{description}: non-finite {what} at batch {batch}; {kept}. Lower --lr, "
                           "check the data, or pass --on-nonfinite skip to skip such batches")
