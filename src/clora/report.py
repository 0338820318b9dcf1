"""A run's results on disk: metrics.json, accuracy_matrix.csv, report.md and two PNG plots.

Every file is written atomically (see ``atomic``), and metrics.json last, so its presence means the
whole set is complete. Plots use ``matplotlib.figure.Figure`` directly rather than pyplot: no
backend switch, no global figure registry to leak into, safe from any thread and headless.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from clora.atomic import atomic_path, write_json_atomic, write_text_atomic
from clora.metrics import Cell, Matrix, normalize_matrix, summarize

__all__ = ["format_matrix_text", "write_results"]

_CORE_KEYS = ("tasks", "accuracy_matrix", "zero_shot", "metrics", "rouge1_last_row", "rouge1_mean")
_MISSING_MD = "—"


def _stage_names(task_names: Sequence[str], rows: list[list[Cell]], given: Sequence[str] | None) -> list[str]:
    if given is not None:
        if len(given) != len(rows):
            raise ValueError(f"{len(given)} stage names for {len(rows)} stages")
        return [str(name) for name in given]
    if len(rows) == 1 and len(task_names) > 1:
        return ["joint"]  # multi-task training: one stage over all tasks, not "after task 1"
    return list(task_names)


def _checked(task_names: Sequence[str], R: Matrix) -> list[list[Cell]]:
    rows = normalize_matrix(R)
    if len(task_names) != len(rows[-1]):
        raise ValueError(f"{len(task_names)} task names for {len(rows[-1])} tasks in the matrix")
    return rows


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return _MISSING_MD
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def format_matrix_text(
    task_names: Sequence[str],
    R: Matrix,
    stage_names: Sequence[str] | None = None,
    Z: Sequence[Cell] | None = None,
) -> str:
    """Fixed-width table for the console; ``-`` marks a task not evaluated at that stage."""
    rows = _checked(task_names, R)
    labels = _stage_names(task_names, rows, stage_names)
    table = list(zip(labels, rows))
    if Z is not None:
        table.insert(0, ("zero_shot", list(Z)))
    label_width = max(len("after task"), *(len(label) for label, _ in table))
    widths = [max(len(name), 5) for name in task_names]
    lines = ["after task".ljust(label_width) + "".join(f"  {n:>{w}}" for n, w in zip(task_names, widths))]
    for label, row in table:
        cells = ("-" if v is None else f"{v:.1f}" for v in row)
        lines.append(label.ljust(label_width) + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def _csv_text(task_names: Sequence[str], labels: list[str], rows: list[list[Cell]], Z) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["after_task", *task_names])
    # repr-exact floats (str), so the CSV reads back to the very matrix in metrics.json.
    if Z is not None:
        writer.writerow(["zero_shot", *("" if v is None else str(v) for v in Z)])
    for label, row in zip(labels, rows):
        writer.writerow([label, *("" if v is None else str(v) for v in row)])
    return buffer.getvalue()


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _markdown(title, task_names, labels, rows, Z, metrics, rouge_mean, notes) -> str:
    out = [f"# {title or 'Continual-learning results'}", "", "| metric | value |", "|---|---:|"]
    for name, value, signed in [
        ("AA (average accuracy)", metrics["AA"], False),
        ("BWT (backward transfer)", metrics["BWT"], True),
        ("FWT (forward transfer)", metrics["FWT"], True),
        ("forgetting", metrics["forgetting"], False),
        ("learning accuracy", metrics["learning_accuracy"], False),
        ("ROUGE-1 mean", rouge_mean, False),
    ]:
        out.append(f"| {name} | {_fmt(value, signed)} |")
    out += ["", "## Accuracy matrix (%; row = after training on, column = evaluated task)", ""]
    out.append("| after task | " + " | ".join(_md_cell(n) for n in task_names) + " |")
    out.append("|---|" + "---:|" * len(task_names))
    table = ([("zero-shot", list(Z))] if Z is not None else []) + list(zip(labels, rows))
    for label, row in table:
        out.append(f"| {_md_cell(label)} | " + " | ".join(_fmt(v) for v in row) + " |")
    if notes:
        out += ["", "## Notes", ""]
        out += [f"- {line}" for line in ([notes] if isinstance(notes, str) else notes)]
    return "\n".join(out) + "\n"


def _save_png(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)  # format given: the temp name ends in .tmp


def _heatmap(path: Path, task_names, labels, rows) -> None:
    n_stages, n_tasks = len(rows), len(task_names)
    fig = Figure(figsize=(max(4.5, 1.5 + 0.75 * n_tasks), max(2.5, 1.5 + 0.5 * n_stages)), layout="constrained")
    ax = fig.add_subplot()
    grid = [[math.nan if v is None else v for v in row] for row in rows]
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")  # NaN cells stay blank
    fontsize = 9 if n_tasks <= 8 else 7
    for j, row in enumerate(rows):
        for i, v in enumerate(row):
            if v is not None:  # dark text on the bright (high) end of viridis, white on the dark end
                ax.text(i, j, f"{v:.1f}", ha="center", va="center", fontsize=fontsize,
                        color="black" if v >= 60 else "white")
    ax.set_xticks(range(n_tasks), labels=task_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n_stages), labels=labels)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training on")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    _save_png(fig, path)


def _curves(path: Path, task_names, labels, rows) -> None:
    fig = Figure(figsize=(max(5.0, 2.5 + 0.6 * len(labels)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(labels)))
    # The default colour cycle repeats after 10: the 15-task "long" orders would share colours.
    colours = matplotlib.colormaps["tab20"].colors if len(task_names) > 10 else [None] * len(task_names)
    for i, name in enumerate(task_names):
        # NaN leaves a gap before the task is first evaluated; markers keep single points visible;
        # clip_on=False keeps points at exactly 0 or 100 whole.
        ys = [math.nan if row[i] is None else row[i] for row in rows]
        ax.plot(x, ys, marker="o", label=name, color=colours[i % len(colours)], clip_on=False)
    ax.set_xticks(x, labels=labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_ylim(0, 100)
    ax.set_xlabel("after training on")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="task")
    _save_png(fig, path)


def write_results(
    out_dir: Path,
    task_names: list[str],
    R: Matrix,
    Z: Sequence[Cell] | None,
    extra: dict[str, Any],
    rouge_last_row: list[float | None] | None = None,
    title: str = "",
) -> dict[str, float | None]:
    """Write the five result files into ``out_dir``; return ``summarize(R, Z)``.

    ``extra`` is merged into metrics.json; ``extra["stage_names"]`` relabels the rows and
    ``extra["notes"]`` (a string or a list of lines) is appended to report.md.
    """
    rows = _checked(task_names, R)
    metrics = summarize(rows, Z)  # also validates Z
    clash = [key for key in extra if key in _CORE_KEYS]
    if clash:
        raise ValueError(f"extra must not override result keys {clash}")
    labels = _stage_names(task_names, rows, extra.get("stage_names"))
    rouge_mean = None
    if rouge_last_row is not None:
        if len(rouge_last_row) != len(task_names):
            raise ValueError(f"{len(rouge_last_row)} ROUGE-1 values for {len(task_names)} tasks")
        # Macro mean like AA, and only over the full row: a partial mean would not be comparable.
        if all(v is not None for v in rouge_last_row):
            rouge_mean = sum(rouge_last_row) / len(rouge_last_row)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "accuracy_matrix.csv", _csv_text(task_names, labels, rows, Z))
    write_text_atomic(
        out_dir / "report.md",
        _markdown(title, task_names, labels, rows, Z, metrics, rouge_mean, extra.get("notes")),
    )
    _heatmap(out_dir / "accuracy_matrix.png", task_names, labels, rows)
    _curves(out_dir / "accuracy_curves.png", task_names, labels, rows)
    payload = {
        "tasks": list(task_names),
        "accuracy_matrix": rows,
        "zero_shot": None if Z is None else list(Z),
        "metrics": metrics,
        "rouge1_last_row": None if rouge_last_row is None else list(rouge_last_row),
        "rouge1_mean": rouge_mean,
        **extra,
    }
    write_json_atomic(out_dir / "metrics.json", payload)  # last: its presence marks a complete set
    return metrics
