"""DEAL: one LoRA carried through all tasks. Task 1 trains it plainly; on every later task its factors
are frozen and each chosen factor Y is re-parameterised as Y' = Y_f + MLP(Y_f), Y_f = Filter(Y):
a learnable filter on Y's singular spectrum (knowledge retention) followed by a residual MLP over
Y's columns (adaptive update), with the asymmetric penalty λ1 Σ|θ_filter|^a + λ2 Σ|θ_mlp|^b.
After the task Y' is written back as the plain factor, so the saved model is a plain rank-r LoRA.

The re-parameterisation is a `torch.nn.utils.parametrize` parametrization of the PEFT layers'
`lora_A/lora_B["default"].weight`, so PEFT's forward is untouched. Each wrapped factor starts as the
exact identity (normalised kernel responses with gains 1, zero output layer of the MLP, and both
written as residuals Y + Δ with Δ = 0 at the start), and the SVD (or the wavelet transform) of the
frozen factor is taken once, when the task starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ptwt
import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import lora
from ..errors import UserError
from . import register
from .base import Method, StageData


@dataclass
class DEALOptions:
    factors: Literal["A", "B", "AB"] = "AB"  # which LoRA factors are filtered and updated on tasks >= 2
    kernel: Literal["heat", "wavelet"] = "heat"  # spectral heat-kernel filter or Haar-wavelet gate
    num_kernels: int = 4  # heat kernels K
    mlp_hidden: int = 128  # hidden width of the adaptive-update MLP
    lambda1: float = 0.01  # weight of the filter penalty Σ|θ1|^a
    lambda2: float = 0.001  # weight of the MLP penalty Σ|θ2|^b
    a: float = 10.0
    b: float = 2.0
    update_lr: float = 0.0  # learning rate of the filter and MLP on tasks >= 2; 0: the run's --lr


class HeatFilter(nn.Module):
    """s'_k = relu(Σ_j g_jk w_jk s_k), w_jk = softmax_j(-(ŝ_k - c_j)² / 2σ_j²), ŝ = s / s_max.

    The responses are normalised over the kernels (Σ_j w_jk = 1), so gains of 1 are the identity
    whatever the centres and widths; every parameter is of order 1 at the start (gains 1, centres
    on normalised singular values, log σ² = -1), so |θ|^a with a large a stays a soft bound."""

    def __init__(self, y: torch.Tensor, num_kernels: int):
        super().__init__()
        u, s, vh = torch.linalg.svd(y.detach().float(), full_matrices=False)  # once per task
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.register_buffer("position", s / s.max().clamp_min(torch.finfo(s.dtype).tiny))
        picks = torch.linspace(0, s.numel() - 1, num_kernels, device=s.device).round().long()
        self.centres = nn.Parameter(self.position[picks].clone())
        self.log_var = nn.Parameter(torch.full((num_kernels,), -1.0, device=s.device))
        self.gains = nn.Parameter(torch.ones(num_kernels, s.numel(), device=s.device))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        distance = (self.position[None, :] - self.centres[:, None]) ** 2
        weights = torch.softmax(-distance / (2 * self.log_var.exp()[:, None]), dim=0)  # K x r
        # Σ_j g_jk w_jk s_k = s_k + Σ_j (g_jk - 1) w_jk s_k since Σ_j w_jk = 1; and Y_f = U diag(s') Vᵀ
        # = Y + U diag(s' - s) Vᵀ. Written so, gains of 1 give exactly Y, not Y up to rounding and
        # the SVD's reconstruction error.
        s_new = torch.relu(self.s + ((self.gains - 1) * weights).sum(0) * self.s)
        return y + ((self.u * (s_new - self.s)) @ self.vh).to(y.dtype)


class HaarFilter(nn.Module):
    """Single-level 2-D Haar DWT of the factor, a learnable gate (init 1) on the approximation band,
    inverse DWT: Y_f = IDWT(g ⊙ cA, details) = Y + IDWT((g - 1) ⊙ cA, 0), cropped to Y's shape
    (odd sizes are zero-padded by the transform and cropped back, which is exact for Haar)."""

    def __init__(self, y: torch.Tensor):
        super().__init__()
        approx, _ = ptwt.wavedec2(y.detach().float(), "haar", level=1, mode="zero")  # once per task
        self.register_buffer("approx", approx)
        self.register_buffer("zeros", torch.zeros_like(approx))
        self.gate = nn.Parameter(torch.ones_like(approx))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        details = ptwt.WaveletDetailTuple2d(self.zeros, self.zeros, self.zeros)
        delta = ptwt.waverec2((self.approx * (self.gate - 1), details), "haar")
        return y + delta[: y.shape[0], : y.shape[1]].to(y.dtype)


class ColumnMLP(nn.Module):
    """Y ↦ ρ · MLP(Y / ρ) applied to each column of Y (vectors over Y's output dimension), ρ the RMS of
    the frozen factor when the task starts (a constant). The scaling lets the MLP see inputs of order 1
    whatever the factor's scale (a LoRA factor's entries are ~1e-2: unscaled, the first layer's bias
    would swamp them and the MLP would add nearly the same vector to every column), and makes the
    learning rate a rate of relative change. The output layer starts at zero: Y + MLP(Y) starts as Y."""

    def __init__(self, y: torch.Tensor, hidden: int):
        super().__init__()
        rms = y.detach().float().pow(2).mean().sqrt()
        self.register_buffer("scale", rms if rms > 0 else torch.ones_like(rms))
        self.inner = nn.Linear(y.shape[0], hidden, device=y.device)
        self.outer = nn.Linear(hidden, y.shape[0], device=y.device)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        columns = y.T.float() / self.scale
        return (self.outer(torch.relu(self.inner(columns))).T * self.scale).to(y.dtype)


class DEALFactor(nn.Module):
    """The parametrization of one frozen factor: Y ↦ Y_f + MLP(Y_f), Y_f = Filter(Y)."""

    def __init__(self, y: torch.Tensor, options: DEALOptions):
        super().__init__()
        self.filter = HeatFilter(y, options.num_kernels) if options.kernel == "heat" else HaarFilter(y)
        self.update = ColumnMLP(y, options.mlp_hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        filtered = self.filter(y)
        return filtered + self.update(filtered)


class DEAL(Method):
    name = "deal"
    Options = DEALOptions
    summary = ("one LoRA through all tasks; later tasks filter its spectrum and update it with an MLP, "
               "merged back into a plain LoRA after each task")

    def __init__(self, settings, options=None):
        super().__init__(settings, options)
        o = self.options
        for key in ("num_kernels", "mlp_hidden"):
            if getattr(o, key) < 1:
                raise UserError(f"deal option {key} must be a positive integer, got {getattr(o, key)}")
        for key in ("lambda1", "lambda2", "update_lr"):
            if getattr(o, key) < 0:
                raise UserError(f"deal option {key} must be >= 0, got {getattr(o, key)}")
        for key in ("a", "b"):
            if getattr(o, key) <= 0:
                raise UserError(f"deal option {key} must be > 0, got {getattr(o, key)}")
        self._wrapped: list[tuple[nn.Linear, DEALFactor]] = []

    def on_task_start(self, model, data: StageData) -> None:
        if data.stage.index == 0:
            super().on_task_start(model, data)  # task 1: plain LoRA
            return
        lora.freeze_all_but(model, [])
        self._wrapped = []
        for layer in lora.lora_layers(model).values():
            for factor in self.options.factors:
                linear = (layer.lora_A if factor == "A" else layer.lora_B)[lora.DEFAULT]
                wrapper = DEALFactor(linear.weight.detach(), self.options)
                parametrize.register_parametrization(linear, "weight", wrapper)
                self._wrapped.append((linear, wrapper))

    def param_groups(self, model) -> list[dict]:
        groups = super().param_groups(model)
        if self._wrapped and self.options.update_lr > 0:
            for group in groups:
                group["lr"] = self.options.update_lr
        return groups

    def penalty(self, model) -> torch.Tensor | None:
        if not self._wrapped:
            return None
        o = self.options
        filter_term = sum(p.abs().pow(o.a).sum() for _, w in self._wrapped for p in w.filter.parameters())
        update_term = sum(p.abs().pow(o.b).sum() for _, w in self._wrapped for p in w.update.parameters())
        return o.lambda1 * filter_term + o.lambda2 * update_term

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        # Write Y' into the factor itself and drop the filter and MLP: a plain rank-r LoRA again.
        for linear, _ in self._wrapped:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
        self._wrapped = []


register(DEAL)
