"""Statistics over run folders' per-item predictions: how far a method's mean could move with other
test items (bootstrap confidence intervals of AA, BWT, FWT, forgetting and learning accuracy), and
whether two methods differ on the same test items (exact McNemar and paired bootstrap tests,
Holm-corrected per table).

What the bootstrap resamples, in each of `RESAMPLES` replicates:

* the test items of each task, with replacement: one draw per task, applied to every stage's
  evaluation of that task and to every run of the method that scored the same items, so R[T][i] and
  R[i][i] stay paired (BWT) and the orders see the same resampled test set;
* the seeds within each order, with replacement (orders are fixed: they are the benchmark's design,
  not a sample); with one seed per order this adds nothing, and the interval covers test-item noise
  only, not training noise between seeds.

A pair of methods is tested twice over the same runs (order, seed) and items. McNemar's exact test
pools the items of every shared run as if each (run, item) were independent, which holds for one
seed per order but not across seeds: the same item recurs in every seed, and a gap that one seed shows
and another reverses is training noise, not a difference. The paired bootstrap resamples what a
reviewer would redraw, the items (one draw per task, shared by both methods) and the seeds within each
order (paired: a drawn seed brings both methods' runs). A pair's p is the larger of the two, so a
difference is called significant only where both tests find it.

The zero-shot row is held fixed (runs keep only its accuracies, not its predictions). The interval is
the percentile interval of the replicates' means over runs; the generator is seeded, so the same
folders always give the same interval.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from . import metrics as cl_metrics

RESAMPLES = 2000
# The paired test's floor is 2/(TEST_RESAMPLES + 1); Holm multiplies it by up to the family's size (45
# pairs in a 10-method table), so the test draws more replicates than an interval needs.
TEST_RESAMPLES = 10000
SEED = 0
LEVEL = 0.95
ALPHA = 0.05
BOOTSTRAPPED = ["AA", "BWT", "FWT", "forgetting", "learning_accuracy"]


@dataclasses.dataclass(frozen=True)
class RunItems:
    """One run's per-item correctness: `correct[j][i]` over the items of task i after stage j (None
    where task i was not evaluated then); `items[i]`/`labels[i]` name those items, in the same order
    in every stage."""
    order: str
    seed: int
    complete: bool
    tasks: list[str]
    items: list[np.ndarray]
    labels: list[list[str]]
    correct: list[list[np.ndarray | None]]
    zero_shot: list[float] | None


@dataclasses.dataclass(frozen=True)
class PairTest:
    """Two methods on the same test items: `first_only` items the first got right and the second wrong,
    `second_only` the reverse; `aa_difference` = first's AA minus second's, averaged over the shared
    runs. `p` is None (and `note` says why) where the pair could not be tested."""
    first: str
    second: str
    runs: int = 0
    items: int = 0
    aa_difference: float | None = None
    aa_difference_ci: tuple[float, float] | None = None  # the paired bootstrap's 95 % percentile interval
    first_only: int = 0
    second_only: int = 0
    p_mcnemar: float | None = None
    p_bootstrap: float | None = None
    p: float | None = None  # the larger of the two: what Holm adjusts
    p_holm: float | None = None
    note: str = ""

    @property
    def significant(self) -> bool | None:
        return None if self.p_holm is None else self.p_holm < ALPHA


def _read_predictions(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(lines, key=lambda p: p["index"])


def load_run(run_dir: Path) -> RunItems | None:
    """The run's predictions, stage by stage, for the cells of its accuracy matrix; None where a cell's
    predictions are missing or do not reproduce the accuracy in metrics.json (then no statistic can be
    drawn from its items, and saying so beats a statistic of other data)."""
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    matrix, tasks = metrics["accuracy_matrix"], metrics["tasks"]
    stages = sorted(p for p in (run_dir / "stages").glob("[0-9]*-*") if p.is_dir())[:len(matrix)]
    if len(stages) < len(matrix):
        return None
    rows: list[list[list[dict] | None]] = []
    for stage, row in zip(stages, matrix):
        cells = []
        for task, accuracy in zip(tasks, row):
            path = stage / "predictions" / f"{task}.jsonl"
            if accuracy is None:
                cells.append(None)
                continue
            if not path.is_file():
                return None
            predictions = _read_predictions(path)
            if not predictions or abs(100.0 * sum(p["correct"] for p in predictions) / len(predictions) - accuracy) > 1e-6:
                return None
            cells.append(predictions)
        rows.append(cells)
    last = rows[-1]
    items = [np.array([p["index"] for p in cell]) for cell in last]
    correct: list[list[np.ndarray | None]] = []
    for row in rows:
        line = []
        for i, cell in enumerate(row):
            if cell is not None and not np.array_equal([p["index"] for p in cell], items[i]):
                return None  # a stage that scored other items than the final one cannot be paired with it
            line.append(None if cell is None else np.array([bool(p["correct"]) for p in cell]))
        correct.append(line)
    zero = metrics.get("zero_shot")
    return RunItems(order=str(metrics.get("order", config.get("order"))), seed=int(config["seed"]),
                    complete=metrics.get("status") == "complete", tasks=list(tasks), items=items,
                    labels=[[p["label"] for p in cell] for cell in last], correct=correct,
                    zero_shot=list(zero) if zero is not None else None)


# ---- bootstrap confidence intervals -------------------------------------------------------------

def _item_draws(run: RunItems, draws: dict, rng: np.random.Generator, resamples: int) -> list[np.ndarray]:
    """Resampled positions per task, shared with every earlier run that scored the same items."""
    positions = []
    for task, items in zip(run.tasks, run.items):
        key = (task, items.tobytes())
        if key not in draws:
            draws[key] = rng.integers(0, len(items), size=(resamples, len(items)))
        positions.append(draws[key])
    return positions


def _replicate_metrics(run: RunItems, positions: list[np.ndarray], resamples: int) -> dict[str, np.ndarray]:
    """Each metric of the run in every replicate (NaN where undefined), computed by clora.metrics from
    the resampled accuracy matrix, so the definitions are those of metrics.json."""
    cells = [[None if c is None else 100.0 * c[positions[i]].mean(axis=1) for i, c in enumerate(row)]
             for row in run.correct]
    out = {m: np.full(resamples, np.nan) for m in BOOTSTRAPPED}
    for b in range(resamples):
        matrix = [[None if c is None else float(c[b]) for c in row] for row in cells]
        for metric, value in cl_metrics.summarize(matrix, run.zero_shot).items():
            if metric in out and value is not None:
                out[metric][b] = value
    return out


def _run_draws(runs: list[RunItems], rng: np.random.Generator, resamples: int) -> np.ndarray:
    """(resamples, len(runs)) run indices: each order keeps its number of runs, drawn from its own seeds."""
    columns = []
    for order in dict.fromkeys(r.order for r in runs):
        members = np.array([k for k, r in enumerate(runs) if r.order == order])
        columns.append(members[rng.integers(0, len(members), size=(resamples, len(members)))])
    return np.concatenate(columns, axis=1)


def _percentile_interval(means: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def intervals(runs: list[RunItems], resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict[str, tuple[float, float] | None]:
    """Percentile interval of each metric's mean over `runs` (the module docstring says what is
    resampled); None for a metric no run defines."""
    rng = np.random.default_rng(seed)
    draws: dict = {}
    per_run = [_replicate_metrics(run, _item_draws(run, draws, rng, resamples), resamples) for run in runs]
    chosen = _run_draws(runs, rng, resamples)
    out: dict[str, tuple[float, float] | None] = {}
    for metric in BOOTSTRAPPED:
        values = np.stack([r[metric] for r in per_run], axis=1)  # (resamples, runs)
        picked = np.take_along_axis(values, chosen, axis=1)
        defined = ~np.isnan(picked)
        counts = defined.sum(axis=1)
        if not counts.any():
            out[metric] = None
            continue
        means = np.where(defined, picked, 0.0).sum(axis=1)[counts > 0] / counts[counts > 0]
        out[metric] = _percentile_interval(means, level)
    return out


# ---- paired tests ------------------------------------------------------------------------------

def mcnemar(first: np.ndarray, second: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test on paired per-item correctness: a two-sided binomial test of the discordant
    items against an even split. Returns (first right only, second right only, p)."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    first_only, second_only = int(np.sum(first & ~second)), int(np.sum(~first & second))
    discordant = first_only + second_only
    p = 1.0 if discordant == 0 else float(binomtest(first_only, discordant, 0.5).pvalue)
    return first_only, second_only, p


def paired_bootstrap(shared: list[tuple[RunItems, RunItems]], resamples: int = TEST_RESAMPLES,
                     seed: int = SEED) -> tuple[float, tuple[float, float]]:
    """Two-sided paired bootstrap test of the AA difference over runs (first, second) of the same order,
    seed and items: in each replicate the items of each task are redrawn (the same draw for both methods
    and every run that scored those items) and the seeds within each order (a drawn seed brings both of
    its runs). Returns p = 2 x the share of replicate means on the far side of 0, counted with the
    observed one so that it is never 0, and the difference's percentile interval at LEVEL."""
    rng = np.random.default_rng(seed)
    draws: dict = {}
    differences = []  # per run, (resamples,) macro-AA differences
    for first, second in shared:
        positions = _item_draws(first, draws, rng, resamples)
        accuracy = [np.mean([c[pos].mean(axis=1) for c, pos in zip(run.correct[-1], positions)], axis=0)
                    for run in (first, second)]
        differences.append(100.0 * (accuracy[0] - accuracy[1]))
    chosen = _run_draws([first for first, _ in shared], rng, resamples)
    means = np.take_along_axis(np.stack(differences, axis=1), chosen, axis=1).mean(axis=1)
    far_side = min(int(np.sum(means <= 0)), int(np.sum(means >= 0)))
    return min(1.0, 2.0 * (far_side + 1) / (resamples + 1)), _percentile_interval(means)


def _final_row(run: RunItems) -> tuple[tuple, np.ndarray, list[float]]:
    """The run's final-row items as a comparable key (task, index, label), their correctness pooled over
    tasks, and the per-task accuracies (for the macro AA)."""
    key = tuple((task, int(i), label) for task, items, labels in zip(run.tasks, run.items, run.labels)
                for i, label in zip(items, labels))
    last = run.correct[-1]
    return key, np.concatenate(last), [100.0 * c.mean() for c in last]


def paired_test(first: str, first_runs: list[RunItems | None], second: str,
                second_runs: list[RunItems | None]) -> PairTest:
    """McNemar and the paired bootstrap over the final-row items of the complete runs (order, seed) both
    methods have; a shared run whose items differ (other caps, other sample) is left out and named in
    the note."""
    def by_run(runs):
        return {(r.order, r.seed): r for r in runs if r is not None and r.complete}

    a, b = by_run(first_runs), by_run(second_runs)
    shared = [k for k in a if k in b]
    if not shared:
        return PairTest(first, second, note="no complete run (order, seed) with per-item predictions in common")
    kept, mismatched, diffs, right_a, right_b = [], [], [], [], []
    for k in shared:
        key_a, correct_a, acc_a = _final_row(a[k])
        key_b, correct_b, acc_b = _final_row(b[k])
        if key_a != key_b:
            mismatched.append(f"order {k[0]} seed {k[1]}")
            continue
        kept.append(k)
        diffs.append(float(np.mean(acc_a) - np.mean(acc_b)))
        right_a.append(correct_a)
        right_b.append(correct_b)
    notes = [f"different test items in {', '.join(mismatched)}: left out"] if mismatched else []
    partial = sum(1 for r in [*first_runs, *second_runs] if r is not None and not r.complete)
    if partial:  # a partial run's last row is not the model after the last task
        notes.append(f"{partial} partial run{'s' * (partial > 1)} left out")
    note = "; ".join(notes)
    if not kept:
        return PairTest(first, second, note=f"different test items in {', '.join(mismatched)}: not comparable")
    first_only, second_only, p_mcnemar = mcnemar(np.concatenate(right_a), np.concatenate(right_b))
    p_bootstrap, interval = paired_bootstrap([(a[k], b[k]) for k in kept])
    return PairTest(first, second, runs=len(kept), items=int(sum(len(x) for x in right_a)),
                    aa_difference=float(np.mean(diffs)), aa_difference_ci=interval,
                    first_only=first_only, second_only=second_only,
                    p_mcnemar=p_mcnemar, p_bootstrap=p_bootstrap, p=max(p_mcnemar, p_bootstrap), note=note)


def holm(pvalues: list[float], family: int | None = None) -> list[float]:
    """Holm's step-down adjustment (family-wise error over the list); scipy offers only FDR control.
    `family`: the size of the family when some of its hypotheses have no p-value yet. They count as
    p = 1; Holm's adjusted p-values never rise when a raw p-value falls, so the others' can only fall
    once those are tested: a partial table claims no more than the full one will."""
    m = max(len(pvalues), family or 0)
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(range(len(pvalues)), key=lambda k: pvalues[k])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def pairwise(methods: dict[str, list[RunItems | None]], declared: list[tuple[str, str]] | None = None) -> list[PairTest]:
    """Every pair of methods in the given order, or only the `declared` ones (a family fixed before the
    results were seen: Holm over fewer pairs has more power for the comparisons the study is about),
    with Holm-adjusted p: over the pairs tested, or over the whole declared family, pairs not yet
    testable included, so that a partial table claims no more than the full one will."""
    names = list(methods)
    pairs = declared if declared is not None else [(x, y) for n, x in enumerate(names) for y in names[n + 1:]]
    tests = [paired_test(x, methods[x], y, methods[y]) for x, y in pairs if x in methods and y in methods]
    tested = [k for k, t in enumerate(tests) if t.p is not None]
    family = len(pairs) if declared is not None else None
    for k, adjusted in zip(tested, holm([tests[k].p for k in tested], family)):
        tests[k] = dataclasses.replace(tests[k], p_holm=adjusted)
    return tests
