"""GORP (Continual Gradient Low-Rank Projection, ACL 2025): per task a new LoRA on the attention
projections (earlier tasks' LoRAs frozen and kept, as in IncLoRA) plus a few trainable full-rank
matrices (default: decoder-only MLP gate projection, T5 decoder cross-attention q and v), the
full-rank gradients handled in a rank-k GaLore subspace refreshed every T steps, Adam there, the update
scaled by alpha.

Shared gradient space: after each task, every protected matrix (each LoRA layer's A, each full-rank
matrix) grows an orthonormal basis S of input directions from Adam's first moment M (in the full
parameter space): what S already explains is removed and the leading singular directions of the rest
are added until S covers `epsilon` of ||M||^2. On later tasks each protected gradient is replaced by
G - G S S^T before the low-rank projection and Adam, and the optimizer removes S from the update too
(Adam's per-coordinate scaling would otherwise leak back into S), so the weights' action on span(S) is
left unchanged. With `orthogonal_init` the new LoRA's A also starts orthogonal to S.

`shared_space=false` is the ablation: no S is ever grown, so nothing is projected (GORP = IncLoRA on the
LoRA + GaLore on the full-rank matrices). `preset=long` is the paper's long setting (k 32, T 20, alpha 0.25).

S (per protected matrix) and the full-rank deltas persist across tasks and `--resume`: S is this
method's state (`method_state.safetensors`), the deltas `full_deltas.safetensors`, both per stage.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .. import lora
from ..errors import UserError
from ..full_weights import FullWeights, SavesFullWeights, default_pattern
from ..projection import (OrthogonalGaLoreProjection, OrthogonalProjection, ProjectedOptimizer, first_moment,
                          grow_space, remove_space)
from . import register
from .base import Method, StageData
from .galore import GaLoreOptions


@dataclass
class GORPOptions(GaLoreOptions):
    epsilon: float = 0.9  # energy of each task's first moment the shared space must cover
    orthogonal_init: bool = True  # start each new LoRA's A orthogonal to its layer's shared space
    # false: the ablation without the shared space (no S, no projection): IncLoRA on the LoRA plus GaLore
    # on the full-rank matrices, trained together
    shared_space: bool = True
    full_lr: float = 1.2e-6  # the dev-split search's choice (GaLore's differs)

    def validate(self, method: str) -> None:
        super().validate(method)
        if not 0 < self.epsilon <= 1:
            raise UserError(f"{method} option epsilon must be in (0, 1], got {self.epsilon}")


class GORP(SavesFullWeights, Method):
    name = "gorp"
    needs_full_precision_base = "it trains full-rank weight matrices of the base model (full_pattern) beside its LoRAs"
    Options = GORPOptions
    summary = ("a new LoRA per task plus full-rank matrices in a GaLore subspace, gradients projected "
               "away from a shared space grown from Adam's first moments")
    defaults_note = ("full_lr=1.2e-06 is the dev-split search's choice on the default model (docs/tuning.md: dev AA "
                     "78.1 and 75.8 at 1.2e-6 and 1.0e-6, 71.1-73.4 at 3e-4, a spread within the noise of 128 dev "
                     "items); at it the full-rank matrices barely move and the LoRAs do the learning. The paper's "
                     "rate for T5-large/LLaMA is 1e-5")
    supports_sharding = False  # its projections take SVDs of whole gradients

    def __init__(self, settings, options=None):
        super().__init__(settings, options)
        self.options.validate(self.name)
        self.full: FullWeights | None = None
        self.spaces: dict[str, torch.Tensor] = {}  # "lora_A|<layer>" / "full|<weight>" -> S (d_in x s)
        self.adapter = lora.DEFAULT

    def attach(self, model):
        pattern = default_pattern(model) if self.options.full_pattern == "auto" else self.options.full_pattern
        self.full = FullWeights(model, pattern)
        # A copy: PEFT keeps the config object it is given and folding rewrites its rank, which must not
        # leak into the config every later task's new LoRA is made from.
        return lora.attach_lora(model, copy.deepcopy(self.lora_config))

    def protected(self, model) -> dict[str, nn.Parameter]:
        """The matrices whose gradients are kept orthogonal to their shared space, by state key."""
        matrices = {f"lora_A|{name}": lora.factors(layer, self.adapter)[0]
                    for name, layer in lora.lora_layers(model).items() if self.adapter in layer.lora_A}
        matrices.update({f"full|{name}": p for name, p in self.full.params.items()})
        return matrices

    # -- one stage
    def on_task_start(self, model, data: StageData) -> None:
        if data.stage.index == 0:
            self.adapter = lora.DEFAULT
            lora.freeze_all_but(model, lora.adapter_parameters(model) + self.full.parameters())
        else:
            self.adapter = lora.NEW
            lora.start_new_adapter(model, copy.deepcopy(self.lora_config))
            for p in self.full.parameters():
                p.requires_grad_(True)
        protected = self.protected(model)
        for key, space in self.spaces.items():
            if key in protected:
                self.spaces[key] = space.to(protected[key].device)
        if self.options.orthogonal_init:
            with torch.no_grad():
                for key, p in protected.items():
                    if key.startswith("lora_A|") and key in self.spaces:
                        p.copy_(remove_space(p, self.spaces[key]))

    def make_optimizer(self, model) -> torch.optim.Optimizer:
        o, lr = self.options, self.settings.lr
        protected = self.protected(model)
        shielded = {id(p) for key, p in protected.items() if key.startswith("lora_A|") and key in self.spaces}
        lora_params = lora.adapter_parameters(model, self.adapter)
        plain = [p for p in lora_params if id(p) not in shielded]
        a_keys = [k for k, p in protected.items() if id(p) in shielded]
        full_keys = [f"full|{name}" for name in self.full.params]
        groups = [
            {"params": plain, "lr": lr},
            {"params": [protected[k] for k in a_keys], "lr": lr,
             "projections": [OrthogonalProjection(self.spaces[k]) for k in a_keys]},
            {"params": [protected[k] for k in full_keys], "lr": o.full_lr,
             "projections": [OrthogonalGaLoreProjection(o.rank, o.update_gap, o.scale, self.spaces.get(k), o.svd)
                             for k in full_keys]},
        ]
        # The shared space is built from the full-space first moment; across the GaLore subspace's
        # refreshes that needs the optimizer's carry (projection.ProjectedOptimizer).
        return ProjectedOptimizer([g for g in groups if g["params"]], torch.optim.AdamW, lr=lr,
                                  weight_decay=self.settings.weight_decay, track_first_moment=o.shared_space)

    @torch.no_grad()
    def before_optimizer_step(self, model, optimizer) -> None:
        for key, p in self.protected(model).items():
            space = self.spaces.get(key)
            if space is not None and p.grad is not None:
                p.grad.copy_(remove_space(p.grad, space))

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        if self.options.shared_space:
            for key, p in self.protected(model).items():
                moment = first_moment(optimizer, p)
                if moment is not None:
                    grown = grow_space(self.spaces.get(key), moment, self.options.epsilon)
                    if grown is not None:
                        self.spaces[key] = grown
        if data.stage.index > 0:
            lora.fold_new_adapter(model)
        self.adapter = lora.DEFAULT
        self.full.commit()

    # -- persistence: S per protected matrix (tensors), plus the full-weight deltas
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"space|{key}": space for key, space in self.spaces.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.spaces = {key.removeprefix("space|"): t for key, t in state.items() if key.startswith("space|")}


register(GORP)
