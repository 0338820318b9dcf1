"""Several methods x task orders x seeds in one resumable invocation, summarised in one table and one
plot. Every run is an ordinary run directory (`<output>/<method>/order<o>-seed<s>/`), so a killed
comparison continues where it stopped; the zero-shot row is computed once per order and seed and
shared, since it does not depend on the method."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from . import stats
from .atomic import atomic_path, write_json_atomic, write_text_atomic
from .pages import update_section
from .config import RunConfig
from .errors import UserError

METRICS = ["AA", "BWT", "FWT", "forgetting", "learning_accuracy"]

# Published average accuracy after the last task (exact match, T5-large unless stated; "standard" =
# 4 tasks, mean of orders 1-3; "long" = 15 tasks, mean of orders 4-6), as listed in SPEC.md.
PUBLISHED = {
    "seq-lora": (44.6, 42.1, "DEAL Table 1"),
    "o-lora": (75.8, 69.6, "O-LoRA paper (71.2 standard in DEAL's runs)"),
    "deal": (78.5, 73.9, "DEAL Table 1"),
    "gorp": (79.8, 76.0, "GORP paper (BWT -0.8 standard, -4.3 long)"),
    "mtl": (80.0, 76.5, "GORP paper"),
}


def parse_method(spec: str) -> tuple[str, str]:
    """"LABEL:METHOD" is a variant of a method with its own row and run folders (an ablation such as
    `gorp-no-shared:gorp` with `--for gorp-no-shared shared_space=false`), so it is tested against the
    others in the same table; a plain name is its own label."""
    label, _, method = spec.partition(":")
    return label, method or label


def expand(base: RunConfig, methods: list[str], orders: list[str], seeds: list[int],
           per_method: dict[str, list[str]]) -> list[tuple[str, str, int, RunConfig]]:
    """The grid of runs, (label, order, seed, config); `per_method[label]` holds "key=value" overrides of a
    RunConfig field or, for any other key, a method option."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    specs = [parse_method(m) for m in methods]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"--methods names a method or label twice: {','.join(methods)}")
    unknown = set(per_method) - set(labels)
    if unknown:
        raise UserError(f"--for names methods not in --methods: {', '.join(sorted(unknown))}")
    grid = []
    for label, method in specs:
        overrides, options = {}, list(base.method_options)
        for pair in per_method.get(label, []):
            key, sep, value = pair.partition("=")
            if not sep:
                raise UserError(f"--for {method} {pair!r} is not key=value")
            if key.replace("-", "_") in fields:
                overrides[key.replace("-", "_")] = _typed(fields[key.replace("-", "_")], value, method)
            else:
                options.append(pair)
        for order in orders:
            for seed in seeds:
                # "a+b+c" is a custom order, so a comparison can run on one's own tasks too.
                tasks = order.replace("+", ",") if "+" in order else None
                # With a --tasks-file the file is the order; `order` only labels its runs.
                grid.append((label, order, seed, dataclasses.replace(
                    base, method=method, order=None if tasks or base.tasks_file else order, tasks=tasks, seed=seed,
                    method_options=options, **overrides)))
    return grid


def _typed(field: dataclasses.Field, raw: str, method: str):
    default = field.default if field.default is not dataclasses.MISSING else None
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, (int, float)):
            return type(default)(raw)
        if field.name == "target_modules":
            return [m for m in raw.split(",") if m]
        return raw
    except ValueError:
        raise UserError(f"--for {method} {field.name}={raw!r}: not a {type(default).__name__}") from None


def run_dir_of(output: Path, method: str, order: str, seed: int) -> Path:
    return output / method / f"order{order}-seed{seed}"


def run_grid(grid, output: Path, run_one, report_only: bool = False) -> list[dict]:
    """Run (or resume) every run of the grid in this process; `report_only`: train nothing, collect the
    runs' results as they stand (partial ones included, runs not started left out)."""
    results = []
    for i, (method, order, seed, config) in enumerate(grid, 1):
        run_dir = run_dir_of(output, method, order, seed)
        if report_only:
            metrics = run_dir / "metrics.json"
            if metrics.is_file():
                results.append({**json.loads(metrics.read_text()), "method": method, "order": order, "seed": seed,
                                "run_dir": str(run_dir), "config": config.to_dict()})
            continue
        print(f"\nclora compare: [{i}/{len(grid)}] {method}, order {order}, seed {seed} -> {run_dir}", flush=True)
        result = run_one(config, run_dir, resume=(run_dir / "config.json").is_file(),
                         shared_zero_shot=zero_shot_file(output, order, seed))
        results.append({**result, "method": method, "order": order, "seed": seed, "run_dir": str(run_dir),
                        "config": config.to_dict()})
    return results


def zero_shot_file(output: Path, order: str, seed: int) -> Path:
    return output / "zero_shot" / f"order{order}-seed{seed}.json"


def missing_runs(grid, results: list[dict]) -> str:
    """The grid's runs that have no results yet, per method ("" when none): a summary must not let a
    partly-run comparison pass for the whole grid."""
    have = {(r["method"], r["order"], r["seed"]) for r in results}
    absent: dict[str, list[str]] = {}
    for method, order, seed, _ in grid:
        if (method, order, seed) not in have:
            absent.setdefault(method, []).append(f"order {order} seed {seed}")
    return "; ".join(f"{m} ({', '.join(runs)})" for m, runs in absent.items())


def run_items(results: list[dict]) -> dict[str, list[stats.RunItems | None]]:
    """Each method's runs as per-item predictions (None for a run whose predictions are not all there)."""
    items: dict[str, list[stats.RunItems | None]] = {}
    for r in results:
        items.setdefault(r["method"], []).append(stats.load_run(Path(r["run_dir"])) if r.get("run_dir") else None)
    return items


def parse_pairs(spec: str, methods: list[str]) -> list[tuple[str, str]]:
    """`--pairs "A/B,*/C"`: the pairs of method labels to test, `*` standing for every other method of
    the comparison, in the order of --methods."""
    labels = [parse_method(m)[0] for m in methods]
    pairs: list[tuple[str, str]] = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        first, slash, second = word.partition("/")
        if not slash or not first or not second or first == second or first == second == "*":
            raise UserError(f"--pairs takes FIRST/SECOND pairs of two different methods (one side may be *), got {word!r}")
        for name in (first, second):
            if name != "*" and name not in labels:
                raise UserError(f"--pairs names {name!r}, which is not one of --methods ({', '.join(labels)})")
        for x in (labels if first == "*" else [first]):
            for y in (labels if second == "*" else [second]):
                if x != y and (x, y) not in pairs and (y, x) not in pairs:
                    pairs.append((x, y))
    if not pairs:
        raise UserError("--pairs names no pair to test")
    return pairs


def pairwise(results: list[dict], declared: list[tuple[str, str]] | None = None) -> list[stats.PairTest]:
    return stats.pairwise(run_items(results), declared)


def summarize(results: list[dict]) -> list[dict]:
    """Per method: every metric's mean over runs with its std and its bootstrap CI (`stats`; None
    unless every run's predictions are there, so an interval is never of other runs than the mean),
    the largest trainable-parameter count of any stage and its ratio to seq-lora's, time per run."""
    items = run_items(results)
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        params = [n for r in runs for n in r.get("trainable_parameters") or []]
        row = {"method": method, "runs": len(runs), "keeps_old_data": runs[0].get("keeps_old_data", False),
               "seconds_per_run": statistics.fmean(r.get("seconds", 0) for r in runs),
               "trainable_parameters": max(params) if params else None}
        usable = items[method] if all(items[method]) else []
        intervals = stats.intervals(usable) if usable else {}
        for metric in METRICS:
            values = [r["metrics"][metric] for r in runs if r["metrics"].get(metric) is not None]
            row[metric] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
            row[f"{metric}_ci"] = intervals.get(metric) if values else None
        rows.append(row)
    reference = next((r["trainable_parameters"] for r in rows if r["method"] == "seq-lora"), None)
    for row in rows:
        row["parameters_vs_seq_lora"] = (row["trainable_parameters"] / reference
                                         if reference and row["trainable_parameters"] is not None else None)
    return rows


def _fixed(value: float) -> str:
    return f"{round(value, 1) + 0.0:.1f}"  # + 0.0: a bootstrap bound of -1e-16 is 0.0, not -0.0


def _cell(row: dict, metric: str) -> str:
    mean, std, ci = row[metric], row[f"{metric}_std"], row.get(f"{metric}_ci")
    if mean is None:
        return "—"
    if ci is not None:
        return f"{_fixed(mean)} [{_fixed(ci[0])}, {_fixed(ci[1])}]"
    return f"{_fixed(mean)} ± {_fixed(std)}" if std is not None else _fixed(mean)


def _params_cells(row: dict) -> str:
    n, ratio = row["trainable_parameters"], row["parameters_vs_seq_lora"]
    count = "—" if n is None else f"{n:,}"
    return f"{count} | " + ("—" if ratio is None else f"{ratio:.1f}×" if ratio < 10 else f"{ratio:.0f}×")


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else f"{value:.0e}"


def pairs_table(pairs: list[stats.PairTest]) -> str:
    """One line per pair of methods: the paired AA difference, the discordant items, McNemar's and the
    paired bootstrap's p, the larger Holm-adjusted, and whether the difference is significant at 0.05
    after Holm."""
    lines = ["| first | second | runs | items | AA first − second | only first right | only second right "
             "| McNemar p | bootstrap p | Holm p | significant |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in pairs:
        if t.p is None:
            lines.append(f"| {t.first} | {t.second} |" + " — |" * 8 + f" not tested: {t.note} |")
            continue
        difference = f"{t.aa_difference:+.1f}"
        verdict = "**yes**" if t.significant else "no"
        lo, hi = t.aa_difference_ci
        p_cells = " | ".join(_p(value) for value in (t.p_mcnemar, t.p_bootstrap, t.p_holm))
        lines.append(f"| {t.first} | {t.second} | {t.runs} | {t.items} | "
                     + (f"**{difference}**" if t.significant else difference) + f" [{lo:+.1f}, {hi:+.1f}]"
                     + f" | {t.first_only} | {t.second_only} | {p_cells} | {verdict}"
                     + (f" ({t.note})" if t.note else "") + " |")
    return "\n".join(lines)


def _stats_note(pairs: list[stats.PairTest], declared: list[tuple[str, str]] | None = None) -> str:
    tested = sum(1 for t in pairs if t.p is not None)
    family = (f"the {len(declared)} pairs declared in the command (--pairs), fixed before the results were seen "
              f"({tested} testable so far; the others count as untested, p = 1)"
              if declared is not None else f"the {tested} pairs tested in this table")
    return (f"Means over runs with a {stats.LEVEL:.0%} bootstrap CI in brackets ({stats.RESAMPLES} resamples, "
            "seed 0): the test items of each task are resampled (one draw per task, shared by every stage and "
            "every run of the method, so BWT stays paired) and the seeds within each order (orders are fixed); "
            "with one seed per order the CI covers test-item noise only, not training noise between seeds. "
            "± std where a run's predictions are missing. Trainable parameters: the largest count of any stage "
            "(any run), and its ratio to seq-lora's.\n\n"
            f"Paired tests, on the last accuracy row: for each {'declared ' if declared else ''}pair of methods, "
            "the complete runs (order, seed) "
            "both have, over their identical test items. Two tests: the exact McNemar test (two-sided binomial test "
            "of the items only one of the two got right, pooled over the runs as if every run's items were "
            "independent) and a two-sided paired bootstrap of the AA difference "
            f"({stats.TEST_RESAMPLES} resamples, seed 0) that redraws the items of each task (the same draw for both "
            "methods) and the seeds within each order (a drawn seed brings both methods' runs), so a gap that "
            "one seed shows and another reverses does not count (its p is never below "
            f"2/{stats.TEST_RESAMPLES + 1}, about 2e-4). AA first − second is the macro AA difference "
            "averaged over those runs, with the paired bootstrap's 95 % interval; the larger of the two p-values "
            f"is adjusted by Holm over {family}; "
            "significant means Holm p < 0.05 (bold).")


def write_summary(output: Path, results: list[dict], command: str, missing: str = "",
                  declared: list[tuple[str, str]] | None = None) -> list[dict]:
    rows = summarize(results)
    pairs = pairwise(results, declared)
    header = ("| method | runs | trainable params | × seq-lora | AA | BWT | FWT | forgetting | learning acc. "
              "| time / run (min) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    partial = {r["method"] for r in results if r.get("status", "complete") != "complete"}
    body = "".join(
        f"| {r['method']}{' (keeps old data)' if r['keeps_old_data'] else ''}{' (partial)' if r['method'] in partial else ''}"
        f" | {r['runs']} | {_params_cells(r)} | " + " | ".join(_cell(r, m) for m in METRICS)
        + f" | {r['seconds_per_run'] / 60:.0f} |\n" for r in rows)
    orders = sorted({r["order"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    text = (f"# Comparison\n\nOrders {', '.join(orders)}; seeds {', '.join(map(str, seeds))}; runs = orders × seeds "
            f"per method. {_stats_note(pairs, declared)}\n\n" + header + body
            + (f"\nNot run yet: {missing}.\n" if missing else "")
            + (f"\nPaired tests:\n\n{pairs_table(pairs)}\n" if pairs else "")
            + f"\nMade by:\n\n```\n{command}\n```\n")
    write_text_atomic(output / "summary.md", text)
    columns = [c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi", f"{m}_std")]
    csv = "method,runs,trainable_parameters," + ",".join(columns) + ",seconds_per_run\n" + "".join(
        f"{r['method']},{r['runs']},{r['trainable_parameters'] or ''},"
        + ",".join(_num(_column(r, c)) for c in columns) + f",{r['seconds_per_run']:.0f}\n" for r in rows)
    write_text_atomic(output / "summary.csv", csv)
    write_json_atomic(output / "summary.json", {"summary": rows, "pairs": [dataclasses.asdict(t) for t in pairs], "runs": [
        {k: r[k] for k in ("method", "order", "seed", "run_dir", "metrics", "accuracy_matrix", "tasks")} for r in results]})
    _plot(output / "summary.png", rows, results)
    return rows


def _num(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _column(row: dict, column: str):
    metric, _, bound = column.rpartition("_")
    if bound in ("lo", "hi"):
        ci = row[f"{metric}_ci"]
        return None if ci is None else ci[bound == "hi"]
    return row[column]


def _error_bar(row: dict, metric: str, side: int) -> float:
    """The CI where there is one (asymmetric; a percentile bound can fall a hair inside the mean, and
    matplotlib refuses a negative bar), else the std over runs."""
    mean, ci = row[metric], row.get(f"{metric}_ci")
    if mean is None:
        return 0.0
    if ci is None:
        return row[f"{metric}_std"] or 0.0
    return max(0.0, mean - ci[0] if side == 0 else ci[1] - mean)


def _plot(path: Path, rows: list[dict], results: list[dict]) -> None:
    first = {}
    for r in results:
        first.setdefault(r["method"], r)
    n = len(rows)
    fig = Figure(figsize=(4 + 3.2 * n, 7.5), layout="constrained")
    grid = fig.add_gridspec(2, max(n, 2))
    for col, (metric, label) in enumerate([("AA", "AA (%)"), ("BWT", "BWT (points)")]):
        ax = fig.add_subplot(grid[0, col * max(n, 2) // 2:(col + 1) * max(n, 2) // 2])
        names = [r["method"] for r in rows]
        means = [r[metric] if r[metric] is not None else 0.0 for r in rows]
        # The CI where there is one (asymmetric), else the std over runs.
        errs = [[_error_bar(r, metric, side) for r in rows] for side in (0, 1)]
        ax.bar(names, means, yerr=errs, capsize=4, color="tab:blue" if metric == "AA" else "tab:red")
        ax.set_ylabel(label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.tick_params(axis="x", rotation=30)
    for i, row in enumerate(rows):
        r = first[row["method"]]
        ax = fig.add_subplot(grid[1, i])
        matrix = [[float("nan") if v is None else v for v in line] for line in r["accuracy_matrix"]]
        ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        for (y, line) in enumerate(matrix):
            for (x, v) in enumerate(line):
                if v == v:
                    ax.text(x, y, f"{v:.0f}", ha="center", va="center", color="white", fontsize=7)
        ax.set_title(f"{row['method']} (order {r['order']})", fontsize=9)
        ax.set_xticks(range(len(r["tasks"])), r["tasks"], rotation=90, fontsize=7)
        ax.set_yticks([])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _by_order_table(results: list[dict]) -> str:
    """AA (BWT) of each method on each order ("" for a single order)."""
    orders = sorted({r["order"] for r in results})
    if len(orders) < 2:
        return ""
    lines = ["| method | " + " | ".join(f"order {o}" for o in orders) + " |", "|---|" + "---:|" * len(orders)]
    for method in dict.fromkeys(r["method"] for r in results):
        cells = []
        for order in orders:
            runs = [r for r in results if r["method"] == method and r["order"] == order]
            aa = [r["metrics"]["AA"] for r in runs if r["metrics"].get("AA") is not None]
            bwt = [r["metrics"]["BWT"] for r in runs if r["metrics"].get("BWT") is not None]
            cell = f"{statistics.fmean(aa):.1f}" if aa else "—"
            cell += f" ({statistics.fmean(bwt):+.1f})" if bwt else ""
            cell += "" if all(r["status"] == "complete" for r in runs) else " partial"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _settings_line(results: list[dict]) -> str:
    """The caps the runs share; a setting that differs between methods (a tuned learning rate) is given
    per method."""
    parts = []
    for key in ("model", "train_per_task", "test_per_task", "epochs", "lr", "rank", "batch_size"):
        values = {r["method"]: r["config"][key] for r in results if key in r.get("config", {})}
        if len(set(values.values())) == 1:
            parts.append(f"{key.replace('_', ' ')} {next(iter(values.values()))}")
        elif values:
            each = ", ".join(f"{m} {v:.2g}" if isinstance(v, float) else f"{m} {v}" for m, v in values.items())
            parts.append(f"{key.replace('_', ' ')} per method ({each})")
    return ", ".join(parts)


def write_page(page: Path, section: str, title: str, results: list[dict], rows: list[dict], command: str,
               plot: Path, missing: str = "", declared: list[tuple[str, str]] | None = None) -> None:
    """A comparison's section of a docs page: settings, the summary table (CIs, parameter counts) with the
    published numbers beside it (labelled as such), the paired tests, every run's last accuracy row, the
    plot, the command."""
    settings = _settings_line(results)
    long_order = any(len(r["tasks"]) > 4 for r in results)
    table = ["| method | runs | trainable params | × seq-lora | AA | BWT | FWT | forgetting | learning acc. "
             f"| time / run (min) | published AA, T5-large ({'long' if long_order else 'standard'}) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        published = PUBLISHED.get(r["method"])
        ref = f"{published[1 if long_order else 0]} ({published[2]})" if published else "—"
        status = {res["status"] for res in results if res["method"] == r["method"]}
        name = r["method"] + (" (keeps old data)" if r["keeps_old_data"] else "")
        name += "" if status == {"complete"} else " **(partial)**"
        table.append(f"| {name} | {r['runs']} | {_params_cells(r)} | " + " | ".join(_cell(r, m) for m in METRICS)
                     + f" | {r['seconds_per_run'] / 60:.0f} | {ref} |")
    lines = []
    for res in results:
        last = res["accuracy_matrix"][-1]
        cells = ", ".join(f"{t} {v:.1f}" if v is not None else f"{t} —" for t, v in zip(res["tasks"], last))
        lines.append(f"* {res['method']}, order {res['order']}, seed {res['seed']}: {cells}"
                     + ("" if res["status"] == "complete" else f" ({res['status']})"))
    plot_link = os.path.relpath(plot.resolve(), page.resolve().parent)
    by_order = _by_order_table(results)
    pairs = pairwise(results, declared)
    text = (f"## {title}\n\n{settings}; orders {', '.join(sorted({r['order'] for r in results}))}, seeds "
            f"{', '.join(str(s) for s in sorted({r['seed'] for r in results}))}; runs = orders × seeds per method. "
            "Our numbers are the default model on a 2-core CPU with the "
            "caps above; the published ones are T5-large on the full benchmark, shown for orientation, not as "
            f"a like-for-like comparison. {_stats_note(pairs, declared)}\n\n" + "\n".join(table)
            + (f"\n\n**Not run yet** (rerun the command below to add them): {missing}." if missing else "")
            + (f"\n\nPaired tests:\n\n{pairs_table(pairs)}" if pairs else "")
            + (f"\n\nAA (BWT) per order, mean over seeds: a method's mean above is over the orders it has run, "
               f"so compare methods on the orders they share.\n\n{by_order}" if by_order else "")
            + "\n\nAccuracy after the last task, per run:\n\n" + "\n".join(lines)
            + f"\n\n![AA, BWT and accuracy matrices]({plot_link})\n\nMade by:\n\n```\n{command}\n```\n")
    update_section(page, section, text, title="# Results\n")
