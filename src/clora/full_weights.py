"""Trainable full-rank weight matrices (GaLore, GORP): chosen by a module-name pattern, saved after
every stage as their deltas from the base model, W - W0, in `full_deltas.safetensors` next to the
stage's PEFT adapter, and reapplied on resume.

The evaluated model of a stage is exactly `load_stage_model(base_model, stage_dir)`: the base model
plus the deltas, plus the plain-PEFT adapter. Exactness: floating-point W0 + (W - W0) is not always W,
so at the end of every stage the live weights are rebuilt as W := W0 + delta (`commit`) before they
are evaluated; loading does the same addition on the same numbers. Memory: W0 is kept as a CPU copy
(in the model's dtype); the deltas are recomputed when saved, not kept.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError

DELTAS_FILE = "full_deltas.safetensors"

# Defaults of the papers: T5 decoder cross-attention q, v; decoder-only MLP gate projection.
ENCODER_DECODER_PATTERN = r"decoder\..*(EncDecAttention\.(q|v)|encoder_attn\.(q_proj|v_proj))$"
DECODER_ONLY_PATTERN = r"mlp\.gate_proj$"


def default_pattern(model) -> str:
    return ENCODER_DECODER_PATTERN if getattr(model.config, "is_encoder_decoder", False) else DECODER_ONLY_PATTERN


def select_matrices(model: nn.Module, pattern: str) -> dict[str, nn.Parameter]:
    """The weights of the nn.Linear modules of a (not yet PEFT-wrapped) model whose name matches the
    regular expression `pattern` (re.search), by their state-dict name ("...gate_proj.weight")."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"full_pattern {pattern!r} is not a valid regular expression: {exc}") from None
    chosen = {f"{name}.weight": module.weight for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and regex.search(name)}
    if not chosen:
        raise UserError(f"full_pattern {pattern!r} matches no linear layer of the model "
                        "(module names look like 'model.layers.0.mlp.gate_proj'; pass full_pattern=...)")
    return chosen


class FullWeights:
    """The chosen matrices of one run and their base values W0 (a copy kept on the CPU)."""

    def __init__(self, model: nn.Module, pattern: str):
        self.params = select_matrices(model, pattern)
        # A weightless skeleton (the pre-flight check builds the model on the meta device) has no W0 to copy.
        self.base = {name: p.detach().to("meta" if p.is_meta else "cpu", copy=True) for name, p in self.params.items()}
        self._pinned: dict[str, torch.Tensor] = {}  # the rare deltas recomputing would not reproduce

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @torch.no_grad()
    def commit(self) -> None:
        """Make the live weights exactly what a reload builds: W := W0 + delta with delta = W - W0
        (fp32), such that recomputing delta from W gives the same delta again. Then `deltas()` need
        not be kept in memory; the few matrices where rounding will not settle keep theirs."""
        self._pinned = {}
        for name, p in self.params.items():
            base, weight = self.base[name], p.detach().cpu()
            for _ in range(4):
                delta = weight.float() - base.float()
                rebuilt = _apply(base, delta)
                if torch.equal(rebuilt, weight):
                    break
                weight = rebuilt
            else:
                weight = rebuilt
                self._pinned[name] = delta
            p.copy_(weight.to(p.device))

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """W - W0 (fp32, CPU) of every matrix, as committed."""
        return {name: self._pinned[name] if name in self._pinned else p.detach().cpu().float() - self.base[name].float()
                for name, p in self.params.items()}

    @torch.no_grad()
    def restore(self, deltas: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(deltas))
        if missing:
            raise UserError(f"saved full-weight deltas lack {missing[0]} (and {len(missing) - 1} more): "
                            "the run was made with another full_pattern or model")
        self._pinned = {}
        for name, p in self.params.items():
            delta = deltas[name].float().cpu()
            weight = _apply(self.base[name], delta)
            if not torch.equal(weight.float() - self.base[name].float(), delta):
                self._pinned[name] = delta
            p.copy_(weight.to(p.device))

    def save(self, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.deltas().items()}, str(Path(directory) / DELTAS_FILE))

    def load(self, directory: Path) -> None:
        path = Path(directory) / DELTAS_FILE
        if not path.is_file():
            raise UserError(f"{path} is missing: cannot restore the full-weight deltas of this stage")
        self.restore(load_file(str(path)))


class SavesFullWeights:
    """Mixin for a method that holds its trainable matrices in `self.full`: each stage's folder gets
    their deltas beside the PEFT adapter, and loading a stage restores them."""
    full: FullWeights

    def save(self, model, directory: Path) -> None:
        super().save(model, directory)
        self.full.save(directory)

    def load(self, model, directory: Path) -> None:
        super().load(model, directory)
        self.full.load(directory)


def _apply(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (base.float() + delta).to(base.dtype)


@torch.no_grad()
def apply_deltas(base_model: nn.Module, stage_dir: str | Path) -> None:
    """Add a stage's saved full-weight deltas to a plain base model, in place (no-op if it has none)."""
    path = Path(stage_dir) / DELTAS_FILE
    if not path.is_file():
        return
    params = dict(base_model.named_parameters())
    for name, delta in load_file(str(path)).items():
        if name not in params:
            raise UserError(f"{path}: the model has no weight {name!r}")
        p = params[name]
        p.copy_(_apply(p.detach().cpu(), delta).to(p.device))


def load_stage_model(base_model: nn.Module, stage_dir: str | Path) -> PeftModel:
    """The model a stage evaluated: the base model plus the stage's full-weight deltas, plus its adapter
    loaded with plain `PeftModel.from_pretrained`. Modifies `base_model` in place."""
    apply_deltas(base_model, stage_dir)
    return PeftModel.from_pretrained(base_model, str(Path(stage_dir) / "adapter"))
