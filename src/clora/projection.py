"""Gradient projections for GaLore and GORP, and one optimizer wrapper that applies them to any
`torch.optim` optimizer.

A `Projection` maps a parameter's gradient into the space the optimizer works in (`project`) and
the optimizer's update back to the parameter (`project_back`):

    Projection                   identity (the base class)
    OrthogonalProjection(S)      removes the shared space S from the update, on the input side:
                                 U - U S S^T (the gradient's G - G S S^T is GORP's hook)
    GaLoreProjection             rank-k gradient subspace, refreshed every T steps (galore-torch's
                                 GaLoreProjector), update scaled by alpha
    OrthogonalGaLoreProjection   both: the input-side rank-k subspace, S removed from the update

`ProjectedOptimizer(groups, torch.optim.AdamW)` keeps, for every projected parameter, a zero
"shadow" tensor of the projected shape. Each step it hands the inner optimizer the projected
gradient on the shadow, lets it step (so moments live at the low-rank shape, which is GaLore's
memory saving), and adds the shadow's update, projected back, to the real parameter. Nothing here
names Adam except `first_moment`, which reads Adam's `exp_avg` back in the full parameter space
(GORP builds its shared space from it; see `ProjectedOptimizer` for why that needs more than the
latest basis).

The shared space S of a weight W (d_out x d_in) is an orthonormal d_in x s basis of input directions.
Removing it from both the gradient and the update keeps W's action on span(S) exactly unchanged:
(W + dW) S = W S whenever dW S = 0.
"""
from __future__ import annotations

from typing import Callable

import torch
from galore_torch.galore_projector import GaLoreProjector


_TOLERANCE = 1e-6


def remove_space(matrix: torch.Tensor, space: torch.Tensor | None) -> torch.Tensor:
    """matrix - matrix S S^T: the component of every row orthogonal to span(S)."""
    if space is None or space.shape[1] == 0:
        return matrix
    s = space.to(matrix.dtype)
    return matrix - (matrix @ s) @ s.T


def grow_space(space: torch.Tensor | None, moment: torch.Tensor, epsilon: float) -> torch.Tensor | None:
    """Extend the orthonormal basis S (d_in x s) with the leading right singular directions of what S
    does not yet explain of `moment` (d x d_in), until S covers a fraction `epsilon` of its energy:
    ||M S_new||^2 >= (epsilon - 1e-6) ||M||^2. The old columns are kept exactly; returns S unchanged when it
    already covers enough (or the moment is zero)."""
    m = moment.detach().to(torch.float64)
    total = m.square().sum()
    if total == 0:
        return space
    old = None if space is None else space.detach().to(device=m.device, dtype=torch.float64)
    explained = m.new_zeros(()) if old is None else (m @ old).square().sum()
    target = (epsilon - _TOLERANCE) * total  # S is stored in the moment's dtype: float32 round-off
    if explained >= target or (old is not None and old.shape[1] >= old.shape[0]):
        return space
    residual = remove_space(m, old)
    _, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
    reached = explained + torch.cumsum(sigma.square(), 0)
    count = int(torch.searchsorted(reached, target).item()) + 1
    new = vh[:min(count, vh.shape[0])].T
    if old is not None:
        new = remove_space(new.T, old).T  # clean the float error before orthonormalising
        if old.shape[1] + new.shape[1] > old.shape[0]:
            new = new[:, :old.shape[0] - old.shape[1]]
    new, _ = torch.linalg.qr(new)
    grown = new if old is None else torch.cat([old, new], 1)
    dtype = moment.dtype if space is None else space.dtype
    # Contiguous, as it is when reloaded: LAPACK's column-major result would make the same products
    # round differently before and after a resume.
    return grown.to(dtype=dtype).contiguous()


def coverage(space: torch.Tensor | None, moment: torch.Tensor) -> float:
    """||M S||^2 / ||M||^2: the share of the moment's energy that S explains."""
    m = moment.detach().to(torch.float64)
    if space is None:
        return 0.0
    return float((m @ space.to(torch.float64)).square().sum() / m.square().sum())


class Projection:
    """Identity. Subclasses override `project`, `project_back` and `low_rank_shape`."""

    def low_rank_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return tuple(shape)

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        return grad

    def project_back(self, update: torch.Tensor) -> torch.Tensor:
        return update

    def basis(self) -> torch.Tensor | None:
        """The current projection basis, None where the projected space is the parameter's own."""
        return None

    def lift(self, low_rank: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """`low_rank` (coordinates in `basis`) in the full parameter space, unscaled."""
        return low_rank

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class OrthogonalProjection(Projection):
    """The update made orthogonal to the shared space S on the input side. The gradient side,
    G - G S S^T, is the method's gradient hook (GORP's `before_optimizer_step`, which runs before
    clipping, so the clipped norm is the projected gradient's); it is not repeated here. Adam's
    per-coordinate scaling of an S-free gradient is not S-free: removing S from the update as well is
    what keeps the weights' action on span(S) unchanged."""

    def __init__(self, space: torch.Tensor | None):
        self.space = space

    def project_back(self, update):
        return remove_space(update, self.space)


def randomized_svd(matrix: torch.Tensor, rank: int, oversample: int = 8, iterations: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` singular triplets (U, s, Vh) by a randomized range finder with power iterations
    (Halko et al. 2011). Its own seeded generator: the global RNG stream is left alone, so a run and
    its resume draw the same numbers."""
    m, n = matrix.shape
    width = min(rank + oversample, m, n)
    if width == min(m, n):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    sketch = torch.randn(n, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(iterations):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u)[:, :rank], s[:rank], vh[:rank]


class _Projector(GaLoreProjector):
    """galore-torch's projector with a choice of SVD: "full" is galore-torch's own (LAPACK, all
    singular vectors: ~0.2 s for a 1536 x 576 gradient on one core), "randomized" computes only the
    top k (~0.01 s) and is the default."""

    def __init__(self, rank, update_proj_gap, scale, proj_type, svd: str):
        super().__init__(rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        self.svd = svd

    def get_orthogonal_matrix(self, weights, rank, type):
        # Contiguous, as a basis reloaded from a step checkpoint is, so that a resumed stage computes
        # the same products in the same memory layout and rounds exactly as the uninterrupted one.
        if self.svd == "full" or type not in ("left", "right"):
            return super().get_orthogonal_matrix(weights, rank, type).contiguous()
        u, _, vh = randomized_svd(weights.detach().float(), rank)
        return (vh if type == "right" else u).to(weights.dtype).contiguous()


SVD_KINDS = ("randomized", "full")


class GaLoreProjection(Projection):
    """galore-torch's projector: the top-`rank` singular vectors of the gradient, recomputed every
    `update_gap` steps; updates projected back and multiplied by `scale`. `proj_type` as in
    galore-torch ("std" picks the smaller side; "right" always projects the input side); `svd` as in
    `_Projector`."""

    def __init__(self, rank: int, update_gap: int, scale: float, proj_type: str = "std", svd: str = "randomized"):
        if proj_type not in ("std", "right", "left"):
            raise ValueError(f"proj_type {proj_type!r}: use std, right or left")
        if svd not in SVD_KINDS:
            raise ValueError(f"svd {svd!r}: use {' or '.join(SVD_KINDS)}")
        self.projector = _Projector(rank, update_gap, scale, proj_type, svd)

    def _side(self, shape) -> str:
        kind = self.projector.proj_type
        if kind == "std":
            return "right" if shape[0] >= shape[1] else "left"
        return kind

    def low_rank_shape(self, shape):
        # The side is fixed by the parameter's shape; recorded here, where the optimizer first sees
        # it, so `lift` works on an optimizer reloaded from a checkpoint before any new step.
        self.side = self._side(shape)
        rank = min(self.projector.rank, shape[0], shape[1])
        return (shape[0], rank) if self.side == "right" else (rank, shape[1])

    def project(self, grad, step):
        self.side = self._side(grad.shape)
        return self.projector.project(grad, step)

    def project_back(self, update):
        return self.projector.project_back(update)

    def basis(self):
        return self.projector.ortho_matrix

    def lift(self, low_rank, basis):
        return low_rank @ basis if self.side == "right" else basis @ low_rank

    def state_dict(self):
        basis = self.projector.ortho_matrix
        return {} if basis is None else {"basis": basis}

    def load_state_dict(self, state):
        self.projector.ortho_matrix = state.get("basis")


class OrthogonalGaLoreProjection(GaLoreProjection):
    """GORP's full-rank projection: galore-torch's rank-k subspace of the gradient, which the method's
    hook has already made orthogonal to S (as in `OrthogonalProjection`). Always on the input side, so
    the update (low-rank update @ basis) lies in the basis's row space, orthogonal to S; removing S
    from it once more guarantees that even for a gradient the hook did not see, and cleans float error."""

    def __init__(self, rank: int, update_gap: int, scale: float, space: torch.Tensor | None, svd: str = "randomized"):
        super().__init__(rank, update_gap, scale, proj_type="right", svd=svd)
        self.space = space

    def project_back(self, update):
        return remove_space(super().project_back(update), self.space)


class ProjectedOptimizer(torch.optim.Optimizer):
    """Wrap any torch optimizer so that chosen parameters are optimised through a `Projection`.

    `param_groups` are ordinary groups (their hyperparameters go to the inner optimizer); a group may
    carry `"projections": [Projection per param]`. `param_groups` of this object hold the real
    parameters, so gradient clipping, unscaling and zero_grad see them as usual.

    `track_first_moment=True` keeps what `first_moment` needs to return Adam's first moment in the
    full parameter space exactly, across basis refreshes. Adam's low-rank moment is not reset when
    the basis P changes (galore-torch's behaviour, kept): after refreshes P_1, P_2, ... it is a sum
    of parts gathered in different coordinates, m = sum_k c_k, c_k = sum_{s in period k}
    b1^(t-s) (1-b1) G_s P_k^T (right side; the left side is the transpose). Lifting all of it through
    the latest basis, m P_K, puts the earlier parts in the wrong directions. The full-space moment
    of the gradients the optimizer was actually given, M_t = b1 M_(t-1) + (1-b1) G_t P_t^T P_t,
    equals sum_k c_k P_k, and is kept as M = C + m P with one full-space "carry" C:

        every step:                  C <- b1 C  (applied lazily: b1^(steps since C was set))
        refresh P_old -> P_new:      C <- C + m (P_old - P_new), with m the moment before the step

    (Check: b1 (C + m P_old - m P_new) + (b1 m + (1-b1) g) P_new = b1 (C + m P_old) + (1-b1) g P_new,
    which is b1 M_(t-1) + (1-b1) G_t P_new^T P_new.) Cost: one d_out x d_in tensor per projected
    matrix from its first refresh on, and two low-rank lifts per refresh; nothing per step. C and
    the step it was set at are part of `state_dict`, so a stage resumed from a step checkpoint
    reads the same moment."""

    def __init__(self, param_groups: list[dict], optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                 *, track_first_moment: bool = False, **defaults):
        self.track_first_moment = track_first_moment
        self._carry: dict[torch.nn.Parameter, torch.Tensor] = {}  # C above, per projected parameter
        self._carry_step: dict[torch.nn.Parameter, int] = {}  # the parameter's step count when C was set
        self.projections: dict[torch.nn.Parameter, Projection] = {}
        for group in param_groups:
            projections = group.pop("projections", None)
            if projections is not None:
                self.projections.update(zip(group["params"], projections))
        super().__init__(param_groups, defaults)
        self._shadow = {p: torch.zeros(proj.low_rank_shape(p.shape), device=p.device, dtype=p.dtype)
                        for p, proj in self.projections.items()}
        self._steps = {p: 0 for p in self.projections}
        inner_groups = []
        for group in self.param_groups:
            inner = {k: v for k, v in group.items() if k != "params"}
            inner["params"] = [self._shadow.get(p, p) for p in group["params"]]
            inner_groups.append(inner)
        self.inner = optimizer_cls(inner_groups, **defaults)

    def _sync_hyperparameters(self) -> None:
        # An lr schedule or a user edits this object's groups; the inner optimizer steps with them.
        # (Decoupled weight decay of a shadow is a no-op, the shadow being zero; `step` decays the
        # real weight of a projected parameter itself.)
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            for key, value in outer.items():
                if key != "params":
                    inner[key] = value

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        stepped: set[int] = set()
        for p, proj in self.projections.items():
            shadow = self._shadow[p]
            if p.grad is None:
                shadow.grad = None
                continue
            before = proj.basis()
            shadow.grad = proj.project(p.grad, self._steps[p])
            if self.track_first_moment and before is not None and proj.basis() is not before:
                self._carry_over(p, before, proj.basis())
            stepped.add(id(p))
        self.inner.step()
        for group in self.param_groups:
            decay = group.get("weight_decay", 0.0)
            for p in group["params"]:
                if id(p) not in stepped:
                    continue
                shadow = self._shadow[p]
                if decay:
                    p.mul_(1 - group["lr"] * decay)
                p.add_(self.projections[p].project_back(shadow))
                shadow.zero_()
                shadow.grad = None
                self._steps[p] += 1
        return loss

    def _beta1(self, p: torch.nn.Parameter) -> float:
        shadow = self._shadow[p]
        for group in self.inner.param_groups:
            if any(q is shadow for q in group["params"]):
                return float(group["betas"][0])
        raise KeyError("parameter not in the inner optimizer")

    def _decayed_carry(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        carry = self._carry.get(p)
        if carry is None:
            return None
        return carry * self._beta1(p) ** (self._steps[p] - self._carry_step[p])

    def _carry_over(self, p: torch.nn.Parameter, old: torch.Tensor, new: torch.Tensor) -> None:
        """The basis of `p` just changed from `old` to `new`, before this step's moment update."""
        moment = self.inner.state.get(self._shadow[p], {}).get("exp_avg")
        if moment is None:  # not an Adam: `first_moment` refuses it anyway
            return
        proj = self.projections[p]
        change = proj.lift(moment, old) - proj.lift(moment, new)
        carry = self._decayed_carry(p)
        self._carry[p] = change if carry is None else carry + change
        self._carry_step[p] = self._steps[p]

    def first_moment(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """Adam's first moment of `p` in the full parameter space (None if p never stepped): the EMA
        of the gradients the inner optimizer was given, each lifted through the basis it was
        projected with (see the class docstring), unscaled."""
        state = self.inner.state.get(self._shadow.get(p, p), {})
        if "exp_avg" not in state:
            if state:
                raise TypeError(f"{type(self.inner).__name__} keeps no first moment (exp_avg)")
            return None
        moment = state["exp_avg"]
        proj = self.projections.get(p)
        basis = None if proj is None else proj.basis()
        if basis is None:
            return moment
        if not self.track_first_moment:
            raise RuntimeError("the first moment of a projected parameter spans several bases: build the "
                               "ProjectedOptimizer with track_first_moment=True")
        lifted = proj.lift(moment, basis)
        carry = self._decayed_carry(p)
        return lifted if carry is None else carry + lifted

    # tensors only: the inner optimizer's state plus every projection's basis and step count, and the
    # first-moment carry where there is one
    def state_dict(self):
        projections = {}
        for i, (p, proj) in enumerate(self.projections.items()):
            projections[i] = {"step": torch.tensor(self._steps[p]), **proj.state_dict()}
            if p in self._carry:
                projections[i]["moment_carry"] = self._carry[p]
                projections[i]["moment_carry_step"] = torch.tensor(self._carry_step[p])
        return {"inner": self.inner.state_dict(), "projections": projections}

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict["inner"])
        self._carry, self._carry_step = {}, {}
        for i, (p, proj) in enumerate(self.projections.items()):
            saved = dict(state_dict["projections"][i])
            self._steps[p] = int(saved.pop("step"))
            carry = saved.pop("moment_carry", None)
            carry_step = saved.pop("moment_carry_step", None)
            if carry is not None:
                self._carry[p] = carry.to(device=p.device)
                self._carry_step[p] = int(carry_step)
            proj.load_state_dict(saved)


def first_moment(optimizer: torch.optim.Optimizer, p: torch.nn.Parameter) -> torch.Tensor | None:
    """Adam's first moment of `p` from a `ProjectedOptimizer` or a plain Adam/AdamW."""
    if isinstance(optimizer, ProjectedOptimizer):
        return optimizer.first_moment(p)
    state = optimizer.state.get(p, {})
    return state.get("exp_avg")
