"""Replay: SeqLoRA trained on each new task mixed with a small buffer of earlier tasks' items.
The one baseline that KEEPS OLD DATA (`keeps_old_data`, said in every report), so it is not a
data-free continual method.

At the end of each task, `per_task` items of its (capped) training split are drawn, seeded, into the
buffer; every later stage trains on its own items plus the whole buffer. The buffer is stored as
indices into each task's training split, so the method state is tensors only and a resumed run
rebuilds exactly the same buffer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..benchmark import Item
from ..errors import UserError
from . import register
from .base import Method, StageData


@dataclass
class ReplayOptions:
    per_task: int = 8  # items kept from each finished task
    seed: int = 0  # mixed with the run's --seed to draw the buffer


class Replay(Method):
    name = "replay"
    Options = ReplayOptions
    defaults_note = ("the dev-split search chose per_task=10 (with --lr 1.7e-3; docs/tuning.md, dev AA 67.2, 60.2 "
                     "with the same buffer at --lr 1.0e-3): the buffer size is not separated from the learning rate "
                     "by 6 trials, so the default stays 8. The tuned table runs the chosen values")
    summary = "SeqLoRA plus a small buffer of k items per earlier task (KEEPS OLD DATA)"
    keeps_old_data = True

    def __init__(self, settings, options=None):
        super().__init__(settings, options)
        if self.options.per_task < 0:
            raise UserError(f"replay option per_task must be >= 0, got {self.options.per_task}")
        self.kept: dict[str, list[int]] = {}  # task name -> indices into its train split

    def buffer(self, data: StageData) -> list[tuple[str, Item]]:
        """The stored items of earlier tasks, in the run's task order; never the current stage's."""
        return [(name, data.tasks[name].train[i]) for name in data.tasks
                if name in self.kept and name not in data.stage.tasks for i in self.kept[name]]

    def training_items(self, data: StageData) -> list[tuple[str, Item]]:
        return data.train_items + self.buffer(data)

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        for name in data.stage.tasks:
            n = len(data.tasks[name].train)
            rng = random.Random(f"replay:{name}:{self.settings.seed}:{self.options.seed}")
            self.kept[name] = sorted(rng.sample(range(n), min(self.options.per_task, n)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"buffer|{name}": torch.tensor(indices, dtype=torch.long) for name, indices in self.kept.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.kept = {k.split("|", 1)[1]: t.tolist() for k, t in state.items() if k.startswith("buffer|")}


register(Replay)
