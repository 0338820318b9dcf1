"""Continual-learning metrics over an accuracy matrix (SPEC §1). Pure functions, no I/O.

``R[j][i]`` = accuracy (percent, 0-100) on task i after training stage j; ``None`` where task i was
not evaluated at stage j (normally i > j). Rows may be ragged (row j holding only tasks 0..j) or
padded with ``None``; the number of tasks T is the length of the last row, which must cover every
task. Two shapes are valid:

* continual: T rows, one per task, the diagonal always evaluated;
* joint (multi-task learning upper bound): a single row over all T tasks. Only AA is defined there.

``Z[i]`` = zero-shot accuracy of the base model on task i (needed for forward transfer only).

Shape errors raise ``ValueError``: a malformed matrix is a bug in the caller, not a user mistake.
Indices in the comments below are 0-based; SPEC §1 writes the same formulas 1-based.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "learning_accuracy",
    "normalize_matrix",
    "summarize",
]

Cell = Optional[float]
Matrix = Sequence[Sequence[Cell]]


def _check_value(value: Cell, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number or None, got {value!r}")
    # Percentages: a fraction (0-1) would pass but NaN or 85000 reveals a bug upstream.
    if not (math.isfinite(value) and 0.0 <= value <= 100.0):
        raise ValueError(f"{where}: accuracy must be a percentage in [0, 100], got {value!r}")


def normalize_matrix(R: Matrix) -> list[list[Cell]]:
    """Validate ``R`` and return it as T-wide rows padded with ``None``."""
    if not R:
        raise ValueError("accuracy matrix is empty")
    n_tasks = len(R[-1])
    if n_tasks == 0:
        raise ValueError("the last row of the accuracy matrix is empty")
    if len(R) not in (1, n_tasks):
        raise ValueError(
            f"accuracy matrix has {len(R)} rows for {n_tasks} tasks; expected one row per task "
            "(continual) or a single row (joint training)"
        )
    rows: list[list[Cell]] = []
    for j, row in enumerate(R):
        if len(row) > n_tasks:
            raise ValueError(f"row {j} has {len(row)} entries, more than the {n_tasks} tasks")
        for i, value in enumerate(row):
            _check_value(value, f"R[{j}][{i}]")
        rows.append(list(row) + [None] * (n_tasks - len(row)))
    missing = [i for i, value in enumerate(rows[-1]) if value is None]
    if missing:
        raise ValueError(f"last row of the accuracy matrix lacks tasks {missing}")
    if len(rows) == n_tasks:
        undiag = [j for j in range(n_tasks) if rows[j][j] is None]
        if undiag:
            raise ValueError(f"diagonal entries R[j][j] missing for stages {undiag}")
    return rows


def _is_joint(rows: list[list[Cell]]) -> bool:
    # A single row over T > 1 tasks cannot be a continual sequence (that would need T rows).
    return len(rows) == 1 and len(rows[0]) > 1


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def average_accuracy(R: Matrix) -> float:
    """AA = mean_i R[T-1][i]: the macro mean over tasks, never pooled over test items."""
    rows = normalize_matrix(R)
    return _mean([v for v in rows[-1] if v is not None])


def backward_transfer(R: Matrix) -> float | None:
    """BWT = mean_{i<T-1} (R[T-1][i] - R[i][i]); negative means forgetting."""
    rows = normalize_matrix(R)
    T = len(rows)
    if T == 1:
        return None
    return _mean([rows[T - 1][i] - rows[i][i] for i in range(T - 1)])


def forward_transfer(R: Matrix, Z: Sequence[Cell] | None) -> float | None:
    """FWT = mean_{i>=1} (R[i-1][i] - Z[i]): how much earlier tasks help before task i is trained.

    Needs the matrix evaluated one task ahead (eval-all); ``None`` where that or ``Z`` is missing.
    """
    rows = normalize_matrix(R)
    T = len(rows)
    if Z is not None:
        if len(Z) != len(rows[-1]):
            raise ValueError(f"zero-shot row has {len(Z)} entries for {len(rows[-1])} tasks")
        for i, value in enumerate(Z):
            _check_value(value, f"Z[{i}]")
    if Z is None or T == 1:
        return None
    diffs = []
    for i in range(1, T):
        ahead, zero = rows[i - 1][i], Z[i]
        if ahead is None or zero is None:
            return None
        diffs.append(ahead - zero)
    return _mean(diffs)


def forgetting(R: Matrix) -> float | None:
    """F = mean_{i<T-1} (max_{i<=j<T-1} R[j][i] - R[T-1][i]).

    The max starts at row i: an evaluation before task i was trained (eval-all) is not knowledge
    that could be forgotten.
    """
    rows = normalize_matrix(R)
    T = len(rows)
    if T == 1:
        return None
    drops = []
    for i in range(T - 1):
        best = max(rows[j][i] for j in range(i, T - 1) if rows[j][i] is not None)
        drops.append(best - rows[T - 1][i])
    return _mean(drops)


def learning_accuracy(R: Matrix) -> float | None:
    """LA = mean_i R[i][i]: how well each task was learnt right after training on it.

    ``None`` for the joint case, which has no per-task stage.
    """
    rows = normalize_matrix(R)
    if _is_joint(rows):
        return None
    return _mean([rows[i][i] for i in range(len(rows))])


def summarize(R: Matrix, Z: Sequence[Cell] | None = None) -> dict[str, float | None]:
    """All metrics at once; undefined ones (joint case, T == 1, no zero-shot) are ``None``."""
    return {
        "AA": average_accuracy(R),
        "BWT": backward_transfer(R),
        "FWT": forward_transfer(R, Z),
        "forgetting": forgetting(R),
        "learning_accuracy": learning_accuracy(R),
    }
