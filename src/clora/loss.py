"""The training loss: cross-entropy on the answer tokens, averaged over the answer tokens of the whole
global batch, so that N processes with a batch of B/N each compute exactly the gradient one process
computes with a batch of B.

DDP averages the processes' gradients; each process therefore returns
    N * (sum of its answer tokens' losses) / (answer tokens on all processes),
whose average over the processes is the global token mean.

Decoder-only models compute logits only where a loss is taken (`logits_to_keep`, the positions
holding an answer token in some row): the LM head over every prompt position is a fifth of a small
model's compute and, with a 49k vocabulary, most of a training step's memory. With `share_prefix`
the tokens every row of the batch starts with (the task's instruction, up to the first position a loss
is taken at) run through the model once and the rows continue from their KV cache (clora.prefix): the
same loss and gradient up to rounding, at (B-1)/B less of the prefix's compute.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoding import IGNORE_INDEX
from .prefix import MIN_SHARED_PREFIX, cache_argument, prefill


@dataclass
class BatchLoss:
    loss: torch.Tensor  # what this process back-propagates
    mean: float  # the global token-mean loss (the same on every process)
    finite: bool  # the loss is finite on every process


def supports_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_loss(model, batch: dict[str, torch.Tensor], is_encoder_decoder: bool, keep_logits: bool,
                accelerator, share_prefix: bool = False) -> BatchLoss:
    labels = batch["labels"]
    if is_encoder_decoder:
        logits, targets = model(**batch).logits, labels
    else:
        targets = labels[:, 1:]  # the logits at position t predict the token at t + 1
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        prefix = shared_prefix(batch, int(positions[0])) if share_prefix and len(positions) else 0
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if prefix:  # the attention mask keeps its whole width: the rows attend to the cached prefix too
            inputs["input_ids"] = batch["input_ids"][:, prefix:]
            # The prefix through the bare model: under DDP a second forward of the wrapper would start a
            # second gradient reduction; the one backward still reaches every parameter through the cache.
            inputs[cache_argument(model)] = prefill(accelerator.unwrap_model(model), batch["input_ids"][0, :prefix],
                                                    rows=len(batch["input_ids"]))
        if keep_logits:
            logits = model(**inputs, logits_to_keep=positions - prefix).logits
        else:
            logits = model(**inputs).logits[:, positions - prefix]
        targets = targets[:, positions]
    token_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")
    count = (targets != IGNORE_INDEX).sum()
    finite = torch.isfinite(token_sum)
    if accelerator.num_processes == 1:
        return BatchLoss(token_sum / count, (token_sum / count).item(), bool(finite))
    totals = accelerator.reduce(torch.stack([token_sum.detach(), count.to(token_sum.dtype),
                                             (~finite).to(token_sum.dtype)]), reduction="sum")
    loss = token_sum * accelerator.num_processes / totals[1]
    return BatchLoss(loss, (totals[0] / totals[1]).item(), bool(totals[2] == 0))


def shared_prefix(batch: dict[str, torch.Tensor], first_loss_position: int) -> int:
    """Leading tokens shared by every row of a batch, ending before the first position whose logits the
    loss needs; 0 where sharing would not pay (one row, or fewer than MIN_SHARED_PREFIX tokens)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if len(ids) < 2:
        return 0
    same = (ids == ids[:1]).all(0) if mask is None else ((ids == ids[:1]) & (mask == 1)).all(0)
    n = min(int(same.long().cumprod(0).sum()), first_loss_position)
    return n if n >= MIN_SHARED_PREFIX else 0
