"""The interface every continual method implements, and the defaults (plain sequential LoRA).

The continual loop (`clora.continual`) calls these hooks and never names a method:

    stages(tasks)                         which tasks each training stage sees (default: one each)
    attach(model)                         wrap the base model once (default: one PEFT LoRA, "default")
    on_task_start(model, data)            freeze / add / re-parameterise before a stage trains
    training_items(data)                  the items the stage trains on (Replay adds old ones)
    make_optimizer(model)                 parameter groups and optimizer (GaLore/GORP project)
    penalty(model)                        extra loss term (O-LoRA, EWC, DEAL)
    before_optimizer_step(model, opt)     gradient hook (GORP's shared-space projection)
    on_task_end(model, data, opt)         merge, fold, store a subspace or a Fisher
    evaluating(model, task_index)         context to evaluate one task (PerTaskFT swaps adapters)
    save(model, dir) / load(model, dir)   end-of-stage artefacts: a PEFT adapter + method state

Invariant: after `on_task_end` the model holds exactly one LoRA adapter, "default" (plus full-weight
deltas for methods that train full matrices), which is what is evaluated and saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .. import lora
from ..benchmark import Item, Task
from ..encoding import Encoder
from ..errors import UserError


@dataclass
class Stage:
    index: int
    name: str
    tasks: list[str]


@dataclass
class StageData:
    """What a hook may read about the stage being trained."""
    stage: Stage
    tasks: dict[str, Task]  # every task of the run, by name (capped splits)
    train_items: list[tuple[str, Item]]  # (task name, item) of this stage's own tasks
    encoder: Encoder
    accelerator: typing.Any
    make_loader: Callable[[list[tuple[str, Item]]], DataLoader]  # batches of encoded training examples


@dataclass
class Settings:
    """Options every method reads (LoRA shape, learning rate, seed)."""
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class NoOptions:
    pass


class Method:
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""
    # Where a default is known not to suit the default model and no dev-split tuning has replaced it
    # yet, `clora methods` says so here (the project's rule: defaults must make a method learn).
    defaults_note: ClassVar[str] = ""
    keeps_old_data: ClassVar[bool] = False  # only Replay: reports must say so
    needs_task_id: ClassVar[bool] = False  # PerTaskFT: evaluation is told which task an item is from
    # False where the method needs whole parameters or gradients on every process (an SVD of a full
    # gradient, a parametrization shared by modules), which FSDP and DeepSpeed ZeRO shard.
    supports_sharding: ClassVar[bool] = True
    # Why the method cannot run on a 4-bit base (--load-in-4bit), as the end of "it needs full-precision
    # base weights, because ..."; empty where it trains adapters only and keeps the base frozen.
    needs_full_precision_base: ClassVar[str] = ""

    def __init__(self, settings: Settings, options=None):
        self.settings = settings
        self.options = options if options is not None else self.Options()
        self.lora_config = lora.lora_config(settings.rank, settings.alpha, settings.dropout, settings.target_modules)

    # -- structure of the run
    def stages(self, task_names: list[str]) -> list[Stage]:
        return [Stage(i, name, [name]) for i, name in enumerate(task_names)]

    def attach(self, model):
        return lora.attach_lora(model, self.lora_config)

    # -- one stage
    def on_task_start(self, model, data: StageData) -> None:
        lora.freeze_all_but(model, lora.adapter_parameters(model))

    def training_items(self, data: StageData) -> list[tuple[str, Item]]:
        return data.train_items

    def param_groups(self, model) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.settings.lr}]

    def make_optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model), lr=self.settings.lr, weight_decay=self.settings.weight_decay)

    def penalty(self, model) -> torch.Tensor | None:
        return None

    def before_optimizer_step(self, model, optimizer) -> None:
        pass

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        pass

    def evaluating(self, model, task_index: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # -- persistence: tensors only, so a checkpoint never holds pickled Python objects
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def save(self, model, directory: Path) -> None:
        lora.save_adapter(model, directory / "adapter")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if state:
            save_file(state, str(directory / "method_state.safetensors"))

    def load(self, model, directory: Path) -> None:
        lora.load_adapter(model, directory / "adapter")
        path = directory / "method_state.safetensors"
        self.load_state_dict(load_file(str(path)) if path.exists() else {})


def parse_options(options_cls: type, pairs: list[str], method_name: str):
    """Build a method's Options dataclass from "key=value" strings, typed by the field annotations."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise UserError(f"method option {pair!r} is not key=value")
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise UserError(f"unknown option {key!r} for method {method_name} (its options: {known})")
        values[key] = _convert(raw.strip(), hints[key], f"{method_name} option {key}")
    return options_cls(**values)


def _convert(raw: str, hint, what: str):
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise UserError(f"{what} must be one of {', '.join(map(str, choices))}, got {raw!r}")
        return raw
    try:
        if hint is bool:
            if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(raw)
            return raw.lower() in {"true", "1", "yes"}
        if hint in (int, float, str):
            return hint(raw)
    except ValueError:
        raise UserError(f"{what} must be {hint.__name__}, got {raw!r}") from None
    raise UserError(f"{what}: cannot parse {raw!r} as {hint}")


def describe_options(options_cls: type) -> list[str]:
    return [f"{f.name}={f.default}" for f in dataclasses.fields(options_cls)]
