"""N-LoRA (Yang et al., "Is Parameter Collision Hindering Continual Learning in LLMs?", COLING 2025):
O-LoRA's setting -- a new LoRA per task beside the frozen earlier ones, folded into "default" after the
task -- with an L1 sparsity penalty on the new task's weight update in place of O-LoRA's orthogonality
term, so that the updates of different tasks touch different entries of W ("collide" less):

    L = L_task + lambda1 * sum_layers ||dW_new||_1 (+ lambda_orth * sum_layers sum |A_old A_new^T|)

with dW_new = s * B_new A_new (d_out x d_in, s = alpha / r, the update the LoRA adds to W). This is the
paper's form; the public code penalises ||A_new B_new||_1, an r x r product (docs/methods/n-lora.md).
The orthogonality term is off by default, as in the reference code; `lambda_orth` adds O-LoRA's.

||B A||_1 is computed in row blocks of B by `l1_of_product`, an autograd function that keeps only A, B
and one block of B A alive at a time (forward and backward), so the d_out x d_in update is never held
whole. See docs/methods/n-lora.md for its cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import lora
from ..errors import UserError
from . import register
from .base import Method, StageData
from .o_lora import orthogonality


@dataclass
class NLoRAOptions:
    lambda1: float = 1e-4  # weight of the L1 norm of the new task's update s * B A, summed over layers
    lambda_orth: float = 0.0  # weight of O-LoRA's orthogonality term beside it (0: the paper's N-LoRA)
    block_rows: int = 256  # rows of B A computed at a time by the L1 term


class _L1OfProduct(torch.autograd.Function):
    """sum |B A| over all entries, in row blocks of B. d/dB = sign(B A) A^T, d/dA = B^T sign(B A): the
    backward recomputes each block's sign instead of keeping the d_out x d_in product from the forward."""

    @staticmethod
    def forward(ctx, b: torch.Tensor, a: torch.Tensor, block_rows: int) -> torch.Tensor:
        ctx.save_for_backward(b, a)
        ctx.block_rows = block_rows
        # Summed in at least fp32: a million bf16 terms would lose the small ones.
        acc = torch.promote_types(b.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=b.device)
        for start in range(0, b.shape[0], block_rows):
            total += (b[start:start + block_rows] @ a).abs().sum(dtype=acc)
        return total.to(b.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        b, a = ctx.saved_tensors
        grad_b = torch.empty_like(b)
        grad_a = torch.zeros_like(a)
        for start in range(0, b.shape[0], ctx.block_rows):
            rows = b[start:start + ctx.block_rows]
            sign = torch.sign(rows @ a)
            grad_b[start:start + ctx.block_rows] = sign @ a.T
            grad_a += rows.T @ sign
        return grad_b * grad_output, grad_a * grad_output, None


def l1_of_product(b: torch.Tensor, a: torch.Tensor, block_rows: int = 256) -> torch.Tensor:
    """||B A||_1 (the sum of absolute entries) for B: d_out x r, A: r x d_in, without holding B A whole."""
    return _L1OfProduct.apply(b, a, block_rows)


def update_l1(model, adapter: str, block_rows: int = 256) -> torch.Tensor:
    """sum over LoRA layers of ||s B A||_1 for one adapter: the L1 norm of the weight update it adds."""
    total = None
    for layer in lora.lora_layers(model).values():
        if adapter not in layer.lora_A:
            continue
        a, b = lora.factors(layer, adapter)
        term = abs(layer.scaling[adapter]) * l1_of_product(b, a, block_rows)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"the model has no LoRA adapter {adapter!r}")
    return total


class NLoRA(Method):
    name = "n-lora"
    Options = NLoRAOptions
    defaults_note = ("the dev-split search chose lambda1=1.3e-06 (docs/tuning.md, dev AA 77.3; 66.4-68.8 at "
                     "~7e-4), the bottom of its range, where the L1 term is all but off and N-LoRA is IncLoRA: on "
                     "this proxy sparsity did not pay. The default stays 1e-4 so that n-lora is N-LoRA; the tuned "
                     "table runs the chosen value")
    summary = "IncLoRA plus an L1 penalty on the new task's update s*B*A (sparse, non-colliding updates; rank grows r per task)"

    def __init__(self, settings, options=None):
        super().__init__(settings, options)
        o = self.options
        if o.lambda1 < 0 or o.lambda_orth < 0:
            raise UserError("n-lora options lambda1 and lambda_orth must be >= 0")
        if o.block_rows <= 0:
            raise UserError("n-lora option block_rows must be a positive integer")
        self.adapter = lora.DEFAULT

    def on_task_start(self, model, data: StageData) -> None:
        if data.stage.index == 0:
            # Task 1's LoRA is "default" itself: it is the new task's LoRA, and the L1 term applies to it.
            self.adapter = lora.DEFAULT
            super().on_task_start(model, data)
        else:
            self.adapter = lora.NEW
            lora.start_new_adapter(model, self.lora_config)

    def penalty(self, model) -> torch.Tensor | None:
        o = self.options
        total = None
        if o.lambda1:
            total = o.lambda1 * update_l1(model, self.adapter, o.block_rows)
        if o.lambda_orth and self.adapter == lora.NEW:
            pairs = [(lora.factors(layer, lora.DEFAULT)[0], lora.factors(layer, lora.NEW)[0])
                     for layer in lora.lora_layers(model).values() if lora.NEW in layer.lora_A]
            orth = o.lambda_orth * sum(orthogonality(a_old, a_new) for a_old, a_new in pairs)
            total = orth if total is None else total + orth
        return total

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        if data.stage.index > 0:
            lora.fold_new_adapter(model)
        self.adapter = lora.DEFAULT


register(NLoRA)
