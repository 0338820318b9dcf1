"""Helpers over PEFT LoRA adapters: find the LoRA layers, read and write their factors (resizing the
rank when needed), start a new adapter beside a frozen one and fold it in afterwards.

After every task the continual loop holds exactly one adapter, "default", so what is evaluated is
exactly what `save_pretrained` writes and what plain `PeftModel.from_pretrained` reloads.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn

DEFAULT = "default"
NEW = "new_task"


def lora_config(rank: int, alpha: float, dropout: float, target_modules: list[str] | None) -> LoraConfig:
    # target_modules None: PEFT's per-architecture default, the attention query and value projections.
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")


def attach_lora(model, config: LoraConfig) -> PeftModel:
    # PEFT keeps the config object it is given and set_factors edits it when a rank grows: a copy keeps
    # the method's own config at the unit rank.
    return get_peft_model(model, copy.deepcopy(config))


def lora_layers(model) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def factors(layer: LoraLayer, adapter: str = DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A: r x d_in, B: d_out x r."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def set_factors(model, new_factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                adapter: str = DEFAULT) -> None:
    """Replace an adapter's factors in every LoRA layer, resizing its rank if the new factors need it."""
    layers = lora_layers(model)
    rank = None
    for name, (a, b) in new_factors.items():
        layer = layers[name]
        rank = a.shape[0]
        if layer.lora_A[adapter].weight.shape != a.shape or layer.lora_B[adapter].weight.shape != b.shape:
            layer.lora_A[adapter] = nn.Linear(a.shape[1], rank, bias=False).to(a.device, a.dtype)
            layer.lora_B[adapter] = nn.Linear(rank, b.shape[0], bias=False).to(b.device, b.dtype)
        with torch.no_grad():
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)
        layer.r[adapter] = rank
        layer.lora_alpha[adapter] = alpha
        layer.scaling[adapter] = alpha / rank
    if rank is not None:
        model.peft_config[adapter].r = rank
        model.peft_config[adapter].lora_alpha = alpha


def adapter_parameters(model, adapter: str = DEFAULT) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if f".{adapter}." in name and "lora_" in name]


def freeze_all_but(model, trainable: list[nn.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def start_new_adapter(model: PeftModel, config: LoraConfig) -> list[nn.Parameter]:
    """Add a fresh LoRA beside the frozen "default" one; both act on the forward pass."""
    model.add_adapter(NEW, copy.deepcopy(config))
    model.base_model.set_adapter([DEFAULT, NEW])
    params = adapter_parameters(model, NEW)
    freeze_all_but(model, params)
    return params


def fold_new_adapter(model: PeftModel) -> None:
    """Concatenate the new LoRA onto "default": a rank r1 + r2 LoRA computing the sum of both."""
    merged = {}
    scale = None
    for name, layer in lora_layers(model).items():
        a0, b0 = factors(layer, DEFAULT)
        a1, b1 = factors(layer, NEW)
        s0, s1 = layer.scaling[DEFAULT], layer.scaling[NEW]
        # Keep the default's scaling; rescale the new B so that s0 * B1' = s1 * B1.
        merged[name] = (torch.cat([a0, a1]).detach(), torch.cat([b0, b1 * (s1 / s0)], dim=1).detach())
        scale = s0
    rank = next(iter(merged.values()))[0].shape[0]
    model.base_model.set_adapter(DEFAULT)
    model.delete_adapter(NEW)
    set_factors(model, merged, alpha=scale * rank)


def save_adapter(model: PeftModel, directory: Path) -> None:
    model.save_pretrained(str(directory), selected_adapters=[DEFAULT])
    # PEFT writes target_modules from a set, in an order that follows the process's string hashing: sorted,
    # a resumed run's adapter folder is byte-identical to an uninterrupted one's.
    config_file = Path(directory) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def load_adapter(model: PeftModel, directory: Path) -> None:
    """Load a saved "default" adapter into the attached model, resizing the rank if it grew."""
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    state = load_file(str(Path(directory) / "adapter_model.safetensors"))
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        # PEFT saves "base_model.model.<module>.lora_A.weight"; the module name in the wrapped model
        # is the same path.
        module, kind = key.rsplit(".lora_", 1)
        by_layer.setdefault(module, {})[kind.split(".")[0]] = tensor
    set_factors(model, {name: (t["A"], t["B"]) for name, t in by_layer.items()}, alpha=config["lora_alpha"])
