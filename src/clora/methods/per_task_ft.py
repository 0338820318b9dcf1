"""PerTaskFT: a separate LoRA per task, each evaluated on its own task (needs the task id at
inference). Every task's LoRA starts fresh; the finished ones are kept as method state."""
from __future__ import annotations

import contextlib

import torch

from .. import lora
from . import register
from .base import Method, StageData


class PerTaskFT(Method):
    name = "per-task-ft"
    summary = "a separate fresh LoRA per task, evaluated with its own task's LoRA (needs task id)"
    needs_task_id = True

    def __init__(self, settings, options=None):
        super().__init__(settings, options)
        self.adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def on_task_start(self, model, data: StageData) -> None:
        if data.stage.index > 0:
            for layer in lora.lora_layers(model).values():
                layer.reset_lora_parameters(lora.DEFAULT, init_lora_weights=True)
        super().on_task_start(model, data)

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        self.adapters.append(_snapshot(model))

    @contextlib.contextmanager
    def evaluating(self, model, task_index: int):
        if task_index >= len(self.adapters):  # not trained yet (--eval-all): the current LoRA answers
            yield
            return
        current = _snapshot(model)
        lora.set_factors(model, self.adapters[task_index], alpha=self.settings.alpha)
        try:
            yield
        finally:
            lora.set_factors(model, current, alpha=self.settings.alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{t}|{name}|{kind}": tensor
                for t, adapter in enumerate(self.adapters)
                for name, pair in adapter.items()
                for kind, tensor in zip("AB", pair)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        adapters: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for key, tensor in state.items():
            t, name, kind = key.split("|")
            adapters.setdefault(int(t), {}).setdefault(name, {})[kind] = tensor
        self.adapters = [{name: (ab["A"], ab["B"]) for name, ab in adapters[t].items()} for t in sorted(adapters)]


def _snapshot(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: tuple(w.detach().clone() for w in lora.factors(layer))
            for name, layer in lora.lora_layers(model).items()}


register(PerTaskFT)
