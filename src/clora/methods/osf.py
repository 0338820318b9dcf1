"""OSF / OSFT, orthogonal subspace fine-tuning (Nayak et al., "Sculpting Subspaces: Constrained Full
Fine-Tuning in LLMs for Continual Learning", ICLR 2026), on PEFT's own OSF tuner layer.

Each task, every chosen weight matrix W (its value after the previous task) is split by its SVD
into the top-k singular directions, frozen as what earlier training put there, and the rest,
W_low = U_low diag(S_low) V_low, trained in full. PEFT's `peft.tuners.osf.layer.Linear` does the split,
the forward pass (W + U_low S_low V_low - U_low0 S_low0 V_low0) and the gradient hooks that keep U_low's
and V_low's gradients orthogonal to U_high and V_high; this module adds what a continual run needs
around it:

* the preserved rank grows from task to task: task t of T keeps the top
  k_t = round((p + (1 - p) (t - 1) / T) * min(d_out, d_in)) singular directions of W_(t-1), p the
  `preserve` option (PEFT's default fraction, 0.5, for task 1);
* after every AdamW step U_low and V_low are projected back onto the complement of U_high / V_high:
  Adam's per-coordinate scaling of a projected gradient is not in the complement, and without this
  the update leaks into the preserved subspace (tested);
* after each task the layer is merged into W by PEFT's own `merge` and removed, so no parameters are
  added per task and the next task decomposes the merged weights.

What a stage saves: the change of the chosen matrices from the base model, W_t - W_0, in
`full_deltas.safetensors` (as GaLore and GORP do) beside the run's usual "default" LoRA, which OSF
keeps frozen with B = 0 (a no-op) so that every stage is a plain PEFT adapter plus deltas and
`clora.full_weights.load_stage_model` reloads it exactly. A PEFT OSF adapter cannot be that artefact
from task 2 on: `PeftModel.from_pretrained` re-decomposes the *base* weights, while task t trains the
low subspace of W_(t-1). The preserved ranks of the last task are the method state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft import OSFConfig
from peft.tuners.osf.layer import Linear as OSFLinear
from peft.utils.constants import TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING
from torch import nn

from .. import lora
from ..errors import UserError
from ..full_weights import FullWeights, SavesFullWeights
from . import register
from .base import Method, Stage, StageData

ADAPTER = "osf"
# T5 is not in PEFT's OSF mapping: the reference code's targets (self-attention q, k, v, o and the MLP).
T5_PATTERN = r"(SelfAttention\.(q|k|v|o)|DenseReluDense\.(wi|wi_0|wi_1|wo))$"


@dataclass
class OSFOptions:
    target: str = "auto"  # regex over nn.Linear module names; auto: PEFT's OSF targets for the model type
    preserve: float = 0.7  # fraction of min(d_out, d_in) preserved in task 1; grows to 1 - (1 - p)/T by task T
    full_lr: float = 8.1e-5  # learning rate of the trained subspace (the run's --lr is unused: no LoRA trains)


def default_pattern(model) -> str:
    model_type = getattr(model.config, "model_type", "")
    if model_type in ("t5", "mt5"):
        return T5_PATTERN
    names = TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING.get(model_type)
    if names is None:
        raise UserError(f"osf has no default target matrices for model type {model_type!r}: "
                        "pass -o target=<regex over module names>")
    return r"\.(" + "|".join(map(re.escape, names)) + r")$"


def preserved_rank(fraction: float, weight_shape: torch.Size) -> int:
    """The number of top singular directions kept: at least 1 (PEFT's OSF requires it), at most
    min(d) - 1 (so that something is left to train)."""
    m = min(weight_shape)
    return min(max(1, round(fraction * m)), max(1, m - 1))


@torch.no_grad()
def keep_in_complement(layer: OSFLinear, adapter: str = ADAPTER) -> None:
    """U_low := (I - U_high U_high^T) U_low and V_low := V_low (I - V_high^T V_high), with the same
    square/non-square cases as PEFT's gradient hook (U_low0 U_low0^T is that projector when U is square)."""
    params = layer.osf_svd_params[adapter]
    u, v = params["U_low"], params["V_low"]
    if adapter in layer._osf_U_high:
        high = layer._osf_U_high[adapter]
        u.sub_(high @ (high.T @ u))
    else:
        low = layer._osf_U_low_init[adapter]
        u.copy_(low @ (low.T @ u))
    if adapter in layer._osf_V_high:
        high = layer._osf_V_high[adapter]
        v.sub_((v @ high.T) @ high)
    else:
        low = layer._osf_V_low_init[adapter]
        v.copy_((v @ low.T) @ low)


class ComplementAdamW(torch.optim.AdamW):
    """AdamW whose every step ends with `keep_in_complement` on the given OSF layers. Its state is
    AdamW's, so step checkpoints and resume treat it like any optimizer."""

    def __init__(self, params, layers: list[OSFLinear], **kwargs):
        super().__init__(params, **kwargs)
        self.osf_layers = layers

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for layer in self.osf_layers:
            keep_in_complement(layer)
        return loss


class OSF(SavesFullWeights, Method):
    name = "osf"
    needs_full_precision_base = "it decomposes base weight matrices by their SVD and trains their low singular subspace"
    Options = OSFOptions
    summary = ("full fine-tuning of each matrix's low singular subspace, its top subspace frozen and "
               "growing task by task (PEFT's OSF tuner)")
    defaults_note = ("full_lr=8.1e-05 and preserve=0.7 are the dev-split search's choice on the default model "
                     "(docs/tuning.md: dev AA 77.3; 74.2 at 2.8e-5 and 8.2e-5 with preserve 0.7, 46.9-64.1 with "
                     "preserve 0.2-0.3, 12.5 at full_lr 2.3e-3); the reference code's rate is 1e-5, PEFT's preserved "
                     "fraction 0.5")
    supports_sharding = False  # an SVD of every whole weight matrix

    def __init__(self, settings, options=None):
        super().__init__(settings, options)
        o = self.options
        if not 0 < o.preserve < 1:
            raise UserError(f"osf option preserve must be in (0, 1), got {o.preserve}")
        if o.full_lr <= 0:
            raise UserError("osf option full_lr must be positive")
        if o.target != "auto":
            try:
                re.compile(o.target)
            except re.error as exc:
                raise UserError(f"osf option target {o.target!r} is not a valid regular expression: {exc}") from None
        self.full: FullWeights | None = None
        self.n_stages = 1
        self.ranks: dict[str, int] = {}  # preserved rank of every matrix in the current / last task
        self.wrapped: dict[str, tuple[nn.Module, str, OSFLinear]] = {}  # weight name -> (parent, attribute, layer)

    def stages(self, task_names: list[str]) -> list[Stage]:
        stages = super().stages(task_names)
        self.n_stages = len(stages)
        return stages

    def attach(self, model):
        pattern = default_pattern(model) if self.options.target == "auto" else self.options.target
        self.full = FullWeights(model, pattern)
        return super().attach(model)  # the "default" LoRA: never trained, B = 0

    def preserved_fraction(self, stage_index: int) -> float:
        p = self.options.preserve
        return p + (1 - p) * stage_index / self.n_stages

    # -- one stage
    def on_task_start(self, model, data: StageData) -> None:
        lora.freeze_all_but(model, [])
        fraction = self.preserved_fraction(data.stage.index)
        owners = {id(module.weight): (parent, attr) for parent in model.modules()
                  for attr, module in parent.named_children() if isinstance(module, nn.Linear)}
        self.wrapped, self.ranks = {}, {}
        for name, weight in self.full.params.items():
            parent, attr = owners[id(weight)]
            rank = preserved_rank(fraction, weight.shape)
            # PEFT's layer decomposes the weight as it is now (W_(t-1)) and makes U_low, S_low, V_low trainable.
            layer = OSFLinear(getattr(parent, attr), ADAPTER, OSFConfig(effective_rank=rank), effective_rank=rank)
            setattr(parent, attr, layer)
            self.wrapped[name] = (parent, attr, layer)
            self.ranks[name] = rank

    def trainable(self) -> list[nn.Parameter]:
        return [p for _, _, layer in self.wrapped.values() for p in layer.osf_svd_params[ADAPTER].values()]

    def make_optimizer(self, model) -> torch.optim.Optimizer:
        return ComplementAdamW(self.trainable(), [layer for _, _, layer in self.wrapped.values()],
                               lr=self.options.full_lr, weight_decay=self.settings.weight_decay)

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        for parent, attr, layer in self.wrapped.values():
            layer.merge(adapter_names=[ADAPTER])  # W := W + (U_low S_low V_low - U_low0 S_low0 V_low0)
            layer._detach_hooks()
            setattr(parent, attr, layer.base_layer)
        self.wrapped = {}
        self.full.commit()

    # -- persistence: the preserved ranks (the weights themselves are the full-weight deltas)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"rank|{name}": torch.tensor(rank) for name, rank in self.ranks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ranks = {key.removeprefix("rank|"): int(t) for key, t in state.items() if key.startswith("rank|")}


register(OSF)
