"""DEAL: one LoRA carried through all tasks. Task 1 trains it plainly; on every later task its factors
are frozen and each chosen factor Y is re-parameterised as Y' = Y_f + MLP(Y_f), Y_f = Filter(Y):
a learnable filter on Y's singular spectrum (knowledge retention) followed by a residual MLP over
Y's columns (adaptive update), with the asymmetric penalty λ1 Σ|θ_filter − θ_filter₀|^a +
λ2 Σ|θ_mlp − θ_mlp₀|^b, θ₀ the values at the task's start (the identity). Centred so, the penalty
measures the departure from the previous task's model: a task with no reason to move the filter
leaves it alone. (Uncentred, |g|^10 on gains that start at 1 has a gradient of 10·λ1 per gain, larger
than the task's, and AdamW walks every gain towards 0 at its full step in every task: a uniform
shrinkage of the kept LoRA, i.e. forgetting.)
After the task Y' is written back as the plain factor, so the saved model is a plain rank-r LoRA.

The re-parameterisation is a `torch.nn.utils.parametrize` parametrization of the PEFT layers'
`lora_A/lora_B["default"].weight`, so PEFT's forward is untouched. Each wrapped factor starts as the
exact identity (normalised kernel responses with gains 1, zero output layer of the MLP, and both
written as residuals Y + Δ with Δ = 0 at the start), and the SVD (or the wavelet transform) of each
frozen factor is taken once, when the task starts.

Every factor has its own filter and MLP, but factors of the same shape (all A's of the model, the
B's of each output size) are stacked in a `FactorGroup` and computed in one batched pass per forward:
a few dozen tensor operations per step for the whole model instead of a few dozen per factor, which
on a CPU is the difference between a negligible and a large overhead (see docs/benchmarks.md).
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
    lambda1: float = 0.01  # weight of the filter penalty Σ|θ1 - θ1₀|^a (θ₀: the task's identity start)
    lambda2: float = 0.001  # weight of the MLP penalty Σ|θ2 - θ2₀|^b
    a: float = 10.0
    b: float = 2.0
    update_lr: float = 0.0  # learning rate of the filter and MLP on tasks >= 2; 0: the run's --lr


class HeatFilter(nn.Module):
    """s'_k = relu(Σ_j g_jk w_jk s_k), w_jk = softmax_j(-(ŝ_k - c_j)² / 2σ_j²), ŝ = s / s_max, for a
    stack of G factors (every tensor has a leading G).

    The responses are normalised over the kernels (Σ_j w_jk = 1), so gains of 1 are the identity
    whatever the centres and widths; every parameter is of order 1 at the start (gains 1, centres
    on normalised singular values, log σ² = -1)."""

    def __init__(self, factors: list[torch.Tensor], num_kernels: int):
        super().__init__()
        # One SVD per factor, here, when the task starts; forward passes only recombine.
        u, s, vh = (torch.stack(t) for t in zip(*(torch.linalg.svd(f.detach().float(), full_matrices=False)
                                                    for f in factors)))
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.register_buffer("position", s / s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny))
        picks = torch.linspace(0, s.shape[-1] - 1, num_kernels, device=s.device).round().long()
        self.centres = nn.Parameter(self.position[:, picks].clone())
        self.log_var = nn.Parameter(torch.full((len(factors), num_kernels), -1.0, device=s.device))
        self.gains = nn.Parameter(torch.ones(len(factors), num_kernels, s.shape[-1], device=s.device))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        distance = (self.position[:, None, :] - self.centres[:, :, None]) ** 2
        weights = torch.softmax(-distance / (2 * self.log_var.exp()[:, :, None]), dim=1)  # G x K x r
        # Σ_j g_jk w_jk s_k = s_k + Σ_j (g_jk - 1) w_jk s_k since Σ_j w_jk = 1; and Y_f = U diag(s') Vᵀ
        # = Y + U diag(s' - s) Vᵀ. Written so, gains of 1 give exactly Y, not Y up to rounding and
        # the SVD's reconstruction error.
        s_new = torch.relu(self.s + ((self.gains - 1) * weights).sum(1) * self.s)
        return y + (self.u * (s_new - self.s)[:, None, :]) @ self.vh


class HaarFilter(nn.Module):
    """Single-level 2-D Haar DWT of each factor, a learnable gate (init 1) on the approximation band,
    inverse DWT: Y_f = IDWT(g ⊙ cA, details) = Y + IDWT((g - 1) ⊙ cA, 0), cropped to Y's shape
    (odd sizes are zero-padded by the transform and cropped back, which is exact for Haar)."""

    def __init__(self, factors: list[torch.Tensor]):
        super().__init__()
        # One DWT per factor, here, when the task starts.
        approx = torch.stack([ptwt.wavedec2(f.detach().float(), "haar", level=1, mode="zero")[0] for f in factors])
        self.register_buffer("approx", approx)
        self.register_buffer("zeros", torch.zeros_like(approx))
        self.gate = nn.Parameter(torch.ones_like(approx))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        details = ptwt.WaveletDetailTuple2d(self.zeros, self.zeros, self.zeros)
        delta = ptwt.waverec2((self.approx * (self.gate - 1), details), "haar")
        return y + delta[..., : y.shape[-2], : y.shape[-1]]


class ColumnMLP(nn.Module):
    """Y ↦ ρ · MLP(Y / ρ) applied to each column of each factor Y (vectors over Y's output dimension),
    ρ the RMS of the frozen factor when the task starts (a constant). The scaling lets the MLP see
    inputs of order 1 whatever the factor's scale (a LoRA factor's entries are ~1e-2: unscaled, the
    first layer's bias would swamp them and the MLP would add nearly the same vector to every column),
    and makes the learning rate a rate of relative change. Each factor has its own weights (a leading
    G); the first layer is initialised as `nn.Linear` is, the output layer at zero, so Y + MLP(Y)
    starts as Y."""

    def __init__(self, y: torch.Tensor, hidden: int):
        super().__init__()
        groups, dim = y.shape[0], y.shape[1]
        rms = y.detach().float().pow(2).mean((1, 2)).sqrt()
        self.register_buffer("scale", torch.where(rms > 0, rms, torch.ones_like(rms))[:, None, None])
        bound = dim ** -0.5
        self.inner_weight = nn.Parameter(torch.empty(groups, dim, hidden, device=y.device).uniform_(-bound, bound))
        self.inner_bias = nn.Parameter(torch.empty(groups, 1, hidden, device=y.device).uniform_(-bound, bound))
        self.outer_weight = nn.Parameter(torch.zeros(groups, hidden, dim, device=y.device))
        self.outer_bias = nn.Parameter(torch.zeros(groups, 1, dim, device=y.device))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        columns = y.transpose(1, 2) / self.scale  # G x columns x dim
        hidden = torch.relu(torch.baddbmm(self.inner_bias, columns, self.inner_weight))
        return torch.baddbmm(self.outer_bias, hidden, self.outer_weight).transpose(1, 2) * self.scale


class FactorGroup(nn.Module):
    """Frozen factors of one shape, stacked, each re-parameterised as Y' = Y_f + MLP(Y_f), Y_f =
    Filter(Y). `output()` computes all of them in one batched pass and keeps the result until a
    parameter changes or `invalidate()` is called (before every model forward: a new autograd graph)."""

    def __init__(self, factors: list[torch.Tensor], options: DEALOptions):
        super().__init__()
        self.register_buffer("original", torch.stack([f.detach().float() for f in factors]))
        self.filter = (HeatFilter(factors, options.num_kernels) if options.kernel == "heat"
                       else HaarFilter(factors))
        self.update = ColumnMLP(self.original, options.mlp_hidden)
        # The identity start the penalty is centred on. Plain tensors, not buffers: they are not part
        # of any checkpoint; a resumed stage rebuilds the same start from the same seed.
        self.filter_start = [p.detach().clone() for p in self.filter.parameters()]
        self.update_start = [p.detach().clone() for p in self.update.parameters()]
        self._cached: tuple[tuple[int, ...], tuple[torch.Tensor, ...]] | None = None

    def invalidate(self) -> None:
        self._cached = None

    def departure(self, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ|θ1 - θ1₀|^a over the filter's parameters and Σ|θ2 - θ2₀|^b over the MLP's."""
        def term(params, starts, power):
            return sum((p - p0).abs().pow(power).sum() for p, p0 in zip(params, starts))
        return (term(self.filter.parameters(), self.filter_start, a),
                term(self.update.parameters(), self.update_start, b))

    def output(self) -> tuple[torch.Tensor, ...]:
        """Y' of every factor of the group, in order."""
        versions = tuple(p._version for p in self.parameters())
        if self._cached is None or self._cached[0] != versions:
            filtered = self.filter(self.original)
            # unbind, not indexing: its backward stacks the factors' gradients in one operation.
            self._cached = (versions, (filtered + self.update(filtered)).unbind(0))
        return self._cached[1]


class GroupMember(nn.Module):
    """The parametrization of one factor: its slice of its group's output. (The frozen factor PEFT
    passes in is the same as the group's stacked copy of it.)"""

    def __init__(self, group: FactorGroup, index: int):
        super().__init__()
        self.group = group
        self.index = index

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.group.output()[self.index].to(y.dtype)


class DEAL(Method):
    name = "deal"
    Options = DEALOptions
    defaults_note = ("the dev-split search chose update_lr=0.0014 and lambda1=0.026 (with --lr 1.7e-3; docs/tuning.md, "
                     "dev AA 71.1); the defaults stay the paper's form (update_lr = --lr, lambda1 0.01): its trials do "
                     "not separate lambda1 from the learning rate (71.1 at lambda1 0.026 and at 0.0015) on 128 dev "
                     "items. The tuned table runs the chosen values (--settings results/tune-proxy/chosen.json)")
    summary = ("one LoRA through all tasks; later tasks filter its spectrum and update it with an MLP, "
               "merged back into a plain LoRA after each task")
    supports_sharding = False  # its factor groups are shared across modules and take an SVD of whole factors

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
            # Below 1, |θ - θ₀|^p has an infinite gradient at the start, where every task begins.
            if getattr(o, key) < 1:
                raise UserError(f"deal option {key} must be >= 1, got {getattr(o, key)}")
        self._linears: list[nn.Linear] = []  # the wrapped factors' layers, during a task t >= 2
        self._groups: list[FactorGroup] = []
        self._hook = None

    def on_task_start(self, model, data: StageData) -> None:
        if data.stage.index == 0:
            super().on_task_start(model, data)  # task 1: plain LoRA
            return
        lora.freeze_all_but(model, [])
        by_shape: dict[tuple, list[nn.Linear]] = {}
        for layer in lora.lora_layers(model).values():
            for factor in self.options.factors:
                linear = (layer.lora_A if factor == "A" else layer.lora_B)[lora.DEFAULT]
                w = linear.weight
                by_shape.setdefault((tuple(w.shape), w.dtype, w.device), []).append(linear)
        for linears in by_shape.values():
            group = FactorGroup([linear.weight for linear in linears], self.options)
            for index, linear in enumerate(linears):
                parametrize.register_parametrization(linear, "weight", GroupMember(group, index))
            self._groups.append(group)
            self._linears.extend(linears)
        # Every forward pass builds a new autograd graph: drop the groups' cached outputs first.
        self._hook = model.get_base_model().register_forward_pre_hook(lambda *_: self._invalidate())

    def _invalidate(self) -> None:
        for group in self._groups:
            group.invalidate()

    def param_groups(self, model) -> list[dict]:
        groups = super().param_groups(model)
        if self._groups and self.options.update_lr > 0:
            for group in groups:
                group["lr"] = self.options.update_lr
        return groups

    def penalty(self, model) -> torch.Tensor | None:
        if not self._groups:
            return None
        o = self.options
        filter_term, update_term = (sum(t) for t in zip(*(g.departure(o.a, o.b) for g in self._groups)))
        return o.lambda1 * filter_term + o.lambda2 * update_term

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        if not self._groups:
            return
        # Write Y' into each factor itself and drop the filters and MLPs: a plain rank-r LoRA again.
        self._hook.remove()
        self._invalidate()
        with torch.no_grad():
            for linear in self._linears:
                parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
        self._linears, self._groups, self._hook = [], [], None


register(DEAL)
