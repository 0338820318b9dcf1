"""Data efficiency: AA and BWT against the number of training items per task, per method, from the run
folders of several `clora compare` outputs that differ only in --train-per-task. One table and one
plot, written as the section "data-efficiency" of docs/results.md with the command that made them.

    python benchmarks/data_efficiency.py --order 1 results/proxy-data-16 results/proxy-data-64 results/proxy-standard

Only complete runs of the given order count; runs of several seeds at one size are averaged.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from matplotlib.figure import Figure

from clora.atomic import atomic_path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import update_section  # noqa: E402


def collect(folders: list[Path], order: str) -> dict[str, dict[int, list[dict]]]:
    """method (with its options) -> training items per task -> metrics of its complete runs."""
    found: dict[str, dict[int, list[dict]]] = {}
    for folder in folders:
        for metrics_file in sorted(folder.glob(f"*/order{order}-seed*/metrics.json")):
            metrics = json.loads(metrics_file.read_text())
            if metrics.get("status") != "complete":
                continue
            config = json.loads((metrics_file.parent / "config.json").read_text())
            # A method with other options is another line: runs of different settings are never averaged.
            options = " ".join(config["method_options"])
            label = f"{config['method']} ({options})" if options else config["method"]
            found.setdefault(label, {}).setdefault(config["train_per_task"], []).append(metrics["metrics"])
    return found


def mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]  # BWT is None for one-stage MTL
    return statistics.fmean(values) if values else None


def plot(path: Path, found: dict, sizes: list[int]) -> None:
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    for col, (key, label) in enumerate([("AA", "AA (%)"), ("BWT", "BWT (points)")]):
        ax = fig.add_subplot(1, 2, col + 1)
        for method, by_size in found.items():
            points = [(n, value) for n in sizes if n in by_size and (value := mean(by_size[n], key)) is not None]
            ax.plot([n for n, _ in points], [value for _, value in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("training items per task")
        ax.set_ylabel(label)
        ax.axhline(0, color="black", linewidth=0.6)
    fig.axes[0].legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="`clora compare --output` folders")
    parser.add_argument("--order", default="1")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "results" / "data-efficiency.png")
    args = parser.parse_args()
    for folder in args.folders:
        if not folder.is_dir():
            sys.exit(f"data_efficiency: error: {folder} is not a folder")
    found = collect(args.folders, args.order)
    if not found:
        sys.exit(f"data_efficiency: error: no complete run of order {args.order} in {', '.join(map(str, args.folders))}")
    sizes = sorted({n for by_size in found.values() for n in by_size})
    def cell(runs: list[dict]) -> str:
        if not runs:
            return "—"
        bwt = mean(runs, "BWT")
        return f"{mean(runs, 'AA'):.1f}" + (f" ({bwt:+.1f})" if bwt is not None else "")
    rows = [f"| {method} | " + " | ".join(cell(by_size.get(n, [])) for n in sizes) + " |"
            for method, by_size in found.items()]
    plot(args.plot, found, sizes)
    command = "python benchmarks/data_efficiency.py " + shlex.join(sys.argv[1:])
    plot_link = os.path.relpath(args.plot.resolve(), args.page.resolve().parent)
    text = "\n".join([
        f"## Data efficiency: AA against training items per task (order {args.order})",
        "",
        "AA after the last task (BWT in brackets), complete runs only, from the run folders of "
        f"{', '.join(f'`{f}`' for f in args.folders)}; every other setting as in those comparisons.",
        "",
        "| method | " + " | ".join(f"{n} items" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
        *rows,
        "",
        f"![AA and BWT against training items per task]({plot_link})",
        "",
        f"Made by: `{command}`",
    ])
    update_section(args.page, "data-efficiency", text, title="# Results\n")
    print(text)


if __name__ == "__main__":
    main()
