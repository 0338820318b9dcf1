"""O-LoRA (Wang et al., 2023): a new LoRA per task beside the frozen earlier ones (IncLoRA's
mechanism), trained with an orthogonality penalty between its A and every earlier task's A:

    L = L_task + lambda1 * sum_old sum |A_old A_new^T| + lambda2 * ||theta_new||_2

The earlier LoRAs live concatenated in the "default" adapter (rank r per task), so one product
`A_default A_new^T` holds every `A_old A_new^T` block and the elementwise |.| sum over it is the sum
over old tasks. As in the reference code, the L2 term is the sum over the new LoRA's weight matrices
of their Frobenius norms (not squared). After each task the new LoRA is folded into "default": a
plain PEFT LoRA of rank r*t that computes the sum of all task LoRAs.

Growth: the adapter holds r*t*(d_in + d_out) parameters per target module after t tasks, and an
unmerged forward pays the same extra multiply-adds per token; merged into the base weights
(`merge_and_unload`) it costs nothing at inference. See docs/methods/baselines.md.

`lambda1_per_task` / `lambda2_per_task` give one weight per task of the order, as the reference code's
long-benchmark scripts do (lambda1 0.5 for tasks 2-9 and 5 for tasks 10-15; lambda2 between 0 and 0.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import lora
from ..errors import UserError
from . import register
from .base import Method, Stage, StageData


@dataclass
class OLoRAOptions:
    lambda1: float = 0.5  # weight of the orthogonality term
    lambda2: float = 0.0  # weight of the L2 norm of the new LoRA
    lambda1_per_task: str = ""  # comma-separated, one per task of the order; given, it replaces lambda1
    lambda2_per_task: str = ""  # the same for lambda2


def orthogonality(a_old: torch.Tensor, a_new: torch.Tensor) -> torch.Tensor:
    """sum |A_old A_new^T| with A_old: r_old x d_in (all earlier tasks stacked), A_new: r x d_in."""
    return (a_old @ a_new.T).abs().sum()


def o_lora_penalty(pairs: list[tuple[torch.Tensor, torch.Tensor]], new_params: list[torch.Tensor],
                   lambda1: float, lambda2: float) -> torch.Tensor:
    """lambda1 * sum over layers of sum |A_old A_new^T| + lambda2 * sum of ||W||_2 over the new LoRA's
    weight matrices W. `pairs` holds (A_old, A_new) per layer; empty on the first task."""
    total = torch.zeros((), device=new_params[0].device if new_params else "cpu")
    if lambda1 and pairs:
        total = total + lambda1 * sum(orthogonality(a_old, a_new) for a_old, a_new in pairs)
    if lambda2 and new_params:
        total = total + lambda2 * sum(torch.linalg.norm(p) for p in new_params)
    return total


class OLoRA(Method):
    name = "o-lora"
    Options = OLoRAOptions
    defaults_note = ("the dev-split search chose lambda1=0.0013 (with --lr 1.1e-3; docs/tuning.md, dev AA 77.3); the "
                     "paper's 0.5 stays the default: the trials near it (68.8-70.3) used other learning rates, and "
                     "lambda1 0.001 at --lr 1.7e-3 scored 71.1, so 6 trials on 128 dev items do not separate lambda1 "
                     "from the learning rate. The tuned table runs the chosen values")
    summary = "IncLoRA plus an orthogonality penalty between the new LoRA's A and the old ones (rank grows r per task)"

    def __init__(self, settings, options=None):
        super().__init__(settings, options)
        o = self.options
        if o.lambda1 < 0 or o.lambda2 < 0:
            raise UserError("o-lora options lambda1 and lambda2 must be >= 0")
        self.per_task = {"lambda1": _weights(o.lambda1_per_task, "lambda1_per_task"),
                         "lambda2": _weights(o.lambda2_per_task, "lambda2_per_task")}
        self.lambdas = (o.lambda1, o.lambda2)  # the weights of the stage being trained

    def stages(self, task_names: list[str]) -> list[Stage]:
        for name, weights in self.per_task.items():
            if weights is not None and len(weights) != len(task_names):
                raise UserError(f"o-lora option {name}_per_task has {len(weights)} values for {len(task_names)} "
                                "tasks: give one per task of the order")
        return super().stages(task_names)

    def on_task_start(self, model, data: StageData) -> None:
        i, o = data.stage.index, self.options
        lambda1s, lambda2s = self.per_task["lambda1"], self.per_task["lambda2"]
        self.lambdas = (o.lambda1 if lambda1s is None else lambda1s[i], o.lambda2 if lambda2s is None else lambda2s[i])
        if i == 0:
            super().on_task_start(model, data)  # task 1 trains "default"; there is nothing old yet
        else:
            lora.start_new_adapter(model, self.lora_config)

    def penalty(self, model) -> torch.Tensor | None:
        lambda1, lambda2 = self.lambdas
        pairs, new_params = _old_new_factors(model)
        if not (lambda1 and pairs) and not lambda2:
            return None
        return o_lora_penalty(pairs, new_params, lambda1, lambda2)

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        if data.stage.index > 0:
            lora.fold_new_adapter(model)


def _weights(raw: str, option: str) -> list[float] | None:
    if not raw.strip():
        return None
    try:
        weights = [float(w) for w in raw.split(",")]
    except ValueError:
        raise UserError(f"o-lora option {option} must be comma-separated numbers, got {raw!r}") from None
    if any(w < 0 for w in weights):
        raise UserError(f"o-lora option {option} must hold weights >= 0, got {raw!r}")
    return weights


def _old_new_factors(model) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """(A_old, A_new) per LoRA layer and the trained LoRA's weights. Before the first fold there is no
    "new_task" adapter: no pairs, and the trained LoRA is "default"."""
    pairs, new_params = [], []
    for layer in lora.lora_layers(model).values():
        if lora.NEW in layer.lora_A:
            pairs.append((lora.factors(layer, lora.DEFAULT)[0], lora.factors(layer, lora.NEW)[0]))
            new_params.extend(lora.factors(layer, lora.NEW))
        else:
            new_params.extend(lora.factors(layer, lora.DEFAULT))
    return pairs, new_params


register(OLoRA)
