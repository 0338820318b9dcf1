"""One training stage on Hugging Face Accelerate: the same code on one CPU or several processes.

The method contributes the optimizer, an extra loss term and a gradient hook; nothing here names a
method."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .errors import UserError
from .methods import Method


class TrainingDiverged(UserError):
    """A non-finite loss: the stage stops and nothing of it is committed."""


@dataclass
class StageLog:
    steps: int
    batches: int  # on this process
    mean_loss: float
    last_loss: float
    optimizer: torch.optim.Optimizer  # the raw optimizer, for methods that read its state at task end


def train_stage(model, method: Method, loader, epochs: int, accelerator: Accelerator, max_grad_norm: float,
                description: str, log_scalar=None, step_offset: int = 0) -> StageLog:
    optimizer = method.make_optimizer(model)
    wrapped, prepared_optimizer, prepared_loader = accelerator.prepare(model, optimizer, loader)
    wrapped.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_batches = epochs * len(prepared_loader)
    bar = tqdm(total=total_batches, desc=description, unit="batch", leave=False,
               disable=not accelerator.is_local_main_process)
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        for batch in prepared_loader:
            with accelerator.accumulate(wrapped):
                loss = wrapped(**batch).loss
                penalty = method.penalty(model)
                total = loss if penalty is None else loss + penalty
                if not math.isfinite(total.item()):
                    bar.close()
                    raise TrainingDiverged(f"{description}: loss became {total.item()} at batch {len(losses) + 1}; "
                                           "lower --lr or check the data (nothing of this stage was saved)")
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    method.before_optimizer_step(model, optimizer)
                    if max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, max_grad_norm)
                    steps += 1
                prepared_optimizer.step()
                prepared_optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if log_scalar is not None:
                log_scalar("train/loss", losses[-1], step_offset + len(losses))
                if penalty is not None:
                    log_scalar("train/penalty", penalty.item(), step_offset + len(losses))
    bar.close()
    accelerator.wait_for_everyone()
    # Release Accelerate's references: the next stage prepares a model with other trainable parameters.
    accelerator._models.clear()
    accelerator._optimizers.clear()
    accelerator._dataloaders.clear()
    return StageLog(steps, len(losses), sum(losses) / max(len(losses), 1), losses[-1] if losses else float("nan"), optimizer)
