"""Statistics of `clora compare`: bootstrap CIs over test items, paired McNemar tests, and the page that
shows them. Run folders are written by hand in the layout `clora run` writes (metrics.json, config.json,
stages/NN-<task>/predictions/<task>.jsonl), so the real readers run on them."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from clora import compare, stats
from clora import metrics as cl_metrics
from clora.config import RunConfig
from clora.errors import UserError

TASKS = ["alpha", "beta", "gamma"]


def write_run(folder: Path, order: str, seed: int, rows: list[dict[str, list[bool]]], *, params: int = 1000,
              seconds: float = 60.0, status: str = "complete", zero_shot: list[float] | None = None) -> Path:
    """A run folder whose stage j evaluated the tasks in rows[j] with the given per-item correctness."""
    for j, row in enumerate(rows):
        predictions = folder / "stages" / f"{j + 1:02d}-{TASKS[j]}" / "predictions"
        predictions.mkdir(parents=True)
        for task, correct in row.items():
            lines = [json.dumps({"index": k, "label": f"{task}{k % 3}", "prediction": f"{task}{k % 3}" if c else "no",
                                 "correct": bool(c)}) for k, c in enumerate(correct)]
            (predictions / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    tasks = TASKS[:len(rows)]
    matrix = [[100.0 * sum(row[t]) / len(row[t]) if t in row else None for t in tasks] for row in rows]
    (folder / "metrics.json").write_text(json.dumps({
        "tasks": tasks, "accuracy_matrix": matrix, "zero_shot": zero_shot, "metrics": cl_metrics.summarize(matrix, zero_shot),
        "status": status, "order": order, "trainable_parameters": [params] * len(rows), "seconds": seconds,
        "keeps_old_data": False}))
    (folder / "config.json").write_text(json.dumps({"order": order, "seed": seed}))
    return folder


def continual_rows(final: dict[str, list[bool]], learned: dict[str, list[bool]]) -> list[dict[str, list[bool]]]:
    """Stage j has learned task j (`learned`) and still holds the `final` answers on the earlier ones;
    the last row is `final`."""
    rows = []
    for j, task in enumerate(TASKS):
        row = {t: final[t] for t in TASKS[:j]}
        row[task] = final[task] if j == len(TASKS) - 1 else learned[task]
        rows.append(row)
    return rows


def draws(seed: int, n: int, p: float) -> dict[str, list[bool]]:
    rng = np.random.default_rng(seed)
    return {t: list(rng.random(n) < p) for t in TASKS}


def test_mcnemar_finds_a_planted_difference_and_none_between_identical_predictions(tmp_path):
    strong, weak = draws(1, 60, 0.85), draws(2, 60, 0.35)
    a = stats.load_run(write_run(tmp_path / "a", "1", 0, continual_rows(strong, strong)))
    b = stats.load_run(write_run(tmp_path / "b", "1", 0, continual_rows(weak, strong)))
    same = stats.load_run(write_run(tmp_path / "c", "1", 0, continual_rows(strong, strong)))

    planted = stats.paired_test("a", [a], "b", [b])
    expected = statistics.fmean(100.0 * (sum(strong[t]) - sum(weak[t])) / 60 for t in TASKS)
    assert planted.p_mcnemar < 1e-6 and planted.items == 180 and planted.runs == 1
    # No replicate mean is at or below 0: the bootstrap's smallest p, counted with the observed mean.
    assert planted.p_bootstrap == pytest.approx(2 / (stats.TEST_RESAMPLES + 1))
    assert planted.p == max(planted.p_mcnemar, planted.p_bootstrap)
    assert planted.aa_difference == pytest.approx(expected)
    lo, hi = planted.aa_difference_ci
    assert 0 < lo < expected < hi, "the interval holds the observed difference and excludes 0"
    assert planted.first_only - planted.second_only == sum(sum(strong[t]) - sum(weak[t]) for t in TASKS)

    identical = stats.paired_test("a", [a], "c", [same])
    assert identical.p == identical.p_mcnemar == identical.p_bootstrap == 1.0
    assert identical.first_only == identical.second_only == 0 and identical.aa_difference == 0.0


def test_a_gap_one_seed_shows_and_the_others_reverse_is_not_significant(tmp_path):
    """Pooled over seeds, McNemar counts one seed's large gap as hundreds of independent items; the paired
    bootstrap redraws the seeds too, so it finds the gap only where the seeds agree."""
    def pair(name: str, gaps: list[tuple[float, float]]):
        firsts, seconds = [], []
        for seed, (p_first, p_second) in enumerate(gaps):
            first, second = draws(10 + seed, 60, p_first), draws(20 + seed, 60, p_second)
            for runs, side, answers in ((firsts, "a", first), (seconds, "b", second)):
                folder = tmp_path / name / f"{side}{seed}"
                runs.append(stats.load_run(write_run(folder, "1", seed, continual_rows(answers, answers))))
        return stats.paired_test("a", firsts, "b", seconds)

    one_seed = pair("one-seed", [(0.95, 0.2), (0.45, 0.55), (0.45, 0.55)])
    assert one_seed.runs == 3 and one_seed.aa_difference > 15
    assert one_seed.p_mcnemar < 1e-6, "pooled over seeds, the first seed's gap dominates"
    assert one_seed.p_bootstrap > 0.2 and one_seed.p == one_seed.p_bootstrap
    assert one_seed.aa_difference_ci[0] < 0 < one_seed.aa_difference_ci[1]

    every_seed = pair("every-seed", [(0.8, 0.4), (0.75, 0.45), (0.8, 0.45)])
    assert every_seed.p_mcnemar < 1e-6 and every_seed.p_bootstrap < 0.01


def test_pairs_on_other_test_items_or_partial_runs_are_not_tested(tmp_path):
    full = stats.load_run(write_run(tmp_path / "a", "1", 0, continual_rows(draws(1, 40, 0.5), draws(1, 40, 0.5))))
    capped = stats.load_run(write_run(tmp_path / "b", "1", 0, continual_rows(draws(2, 20, 0.5), draws(2, 20, 0.5))))
    partial = stats.load_run(write_run(tmp_path / "c", "1", 0, continual_rows(draws(3, 40, 0.5), draws(3, 40, 0.5))[:2],
                                       status="partial: 2 of 3 stages done"))
    pairs = stats.pairwise({"full": [full], "capped": [capped], "partial": [partial]})
    by_pair = {(t.first, t.second): t for t in pairs}
    assert by_pair["full", "capped"].p is None and "different test items" in by_pair["full", "capped"].note
    assert by_pair["full", "partial"].p is None and by_pair["full", "partial"].p_holm is None
    assert by_pair["full", "capped"].significant is None


def test_holm_adjusts_step_down_and_never_lowers_a_p_value():
    raw = [0.01, 0.04, 0.03, 0.5]
    adjusted = stats.holm(raw)
    assert adjusted[0] == pytest.approx(4 * 0.01)  # the smallest is multiplied by the number of tests
    assert adjusted[2] == pytest.approx(3 * 0.03)
    assert adjusted[1] == pytest.approx(3 * 0.03)  # 2 * 0.04 < 0.09: raised to keep the order of the raw p
    assert all(a >= r for a, r in zip(adjusted, raw)) and max(adjusted) <= 1.0


def test_bootstrap_interval_contains_the_mean_shrinks_with_more_items_and_is_reproducible(tmp_path):
    def interval(n_items: int, name: str):
        final, learned = draws(5, n_items, 0.6), draws(6, n_items, 0.9)
        run = stats.load_run(write_run(tmp_path / name, "1", 0, continual_rows(final, learned)))
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]
        return stats.intervals([run]), metrics

    small, small_metrics = interval(20, "small")
    large, large_metrics = interval(400, "large")
    for ci, values in ((small, small_metrics), (large, large_metrics)):
        for metric in ("AA", "BWT"):
            assert ci[metric][0] <= values[metric] <= ci[metric][1]
        assert ci["FWT"] is None  # no zero-shot row
    for metric in ("AA", "BWT"):
        assert large[metric][1] - large[metric][0] < 0.5 * (small[metric][1] - small[metric][0])
    assert stats.intervals([stats.load_run(tmp_path / "small")]) == small


def test_bootstrap_keeps_a_task_s_items_paired_across_stages_and_runs(tmp_path):
    # Nothing forgotten: every stage answers each task's items exactly as the last one does, so BWT is 0
    # in every replicate only if one draw of items serves every stage.
    final = draws(7, 30, 0.5)
    kept = stats.load_run(write_run(tmp_path / "kept", "1", 0, continual_rows(final, final)))
    assert stats.intervals([kept])["BWT"] == (0.0, 0.0)
    # Two orders with the same predictions on the same items: their mean varies as one run does.
    twin = stats.load_run(write_run(tmp_path / "twin", "2", 0, continual_rows(final, final)))
    assert stats.intervals([kept, twin])["AA"] == pytest.approx(stats.intervals([kept])["AA"])


def test_forward_transfer_gets_an_interval_from_the_tasks_evaluated_ahead(tmp_path):
    final, learned, ahead = draws(1, 40, 0.6), draws(2, 40, 0.9), draws(3, 40, 0.3)
    rows = [{**row, **{t: ahead[t] for t in TASKS if t not in row}} for row in continual_rows(final, learned)]  # eval-all
    folder = write_run(tmp_path / "r", "1", 0, rows, zero_shot=[0.0, 5.0, 10.0])
    fwt = json.loads((folder / "metrics.json").read_text())["metrics"]["FWT"]
    lo, hi = stats.intervals([stats.load_run(folder)])["FWT"]
    assert lo <= fwt <= hi and hi > lo


def test_a_run_without_its_predictions_gives_no_interval(tmp_path):
    folder = write_run(tmp_path / "r", "1", 0, continual_rows(draws(1, 10, 0.5), draws(2, 10, 0.8)))
    (folder / "stages" / "02-beta" / "predictions" / "alpha.jsonl").unlink()
    assert stats.load_run(folder) is None


def _fake_comparison(tmp_path: Path) -> tuple[Path, list[dict]]:
    output = tmp_path / "cmp"
    for order, seed in (("1", 0), ("2", 0)):
        strong, weak, learned = draws(10 + int(order), 50, 0.9), draws(20 + int(order), 50, 0.3), draws(30, 50, 0.9)
        write_run(output / "seq-lora" / f"order{order}-seed{seed}", order, seed, continual_rows(weak, learned),
                  params=1000, seconds=60.0 * int(order))
        write_run(output / "gorp" / f"order{order}-seed{seed}", order, seed, continual_rows(strong, learned),
                  params=58000, seconds=120.0)
    grid = compare.expand(RunConfig(), ["seq-lora", "gorp"], ["1", "2"], [0], {})
    return output, compare.run_grid(grid, output, run_one=None, report_only=True)


def test_compare_summary_and_page_show_cis_parameters_time_per_run_and_paired_tests(tmp_path):
    output, results = _fake_comparison(tmp_path)
    rows = compare.write_summary(output, results, "clora compare --methods seq-lora,gorp")
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    compare.write_page(page, "fake", "Fake", results, rows, "clora compare ...", output / "summary.png")

    summary = json.loads((output / "summary.json").read_text())
    seq, gorp = summary["summary"]
    assert seq["seconds_per_run"] == pytest.approx(90.0)  # mean of 60 s and 120 s, not their sum
    assert gorp["trainable_parameters"] == 58000 and gorp["parameters_vs_seq_lora"] == pytest.approx(58.0)
    for row in (seq, gorp):
        lo, hi = row["AA_ci"]
        assert lo <= row["AA"] <= hi and hi > lo

    text = page.read_text()
    gorp_line = next(line for line in text.splitlines() if line.startswith("| gorp |"))
    assert f"| {gorp['AA']:.1f} [{gorp['AA_ci'][0]:.1f}, {gorp['AA_ci'][1]:.1f}] |" in gorp_line
    assert "| 58× |" in gorp_line and "| 58,000 |" in gorp_line
    assert "adjusted by Holm over the 1 pairs tested in this table" in text and "bootstrap" in text

    pair = summary["pairs"][0]
    assert (pair["first"], pair["second"], pair["runs"]) == ("seq-lora", "gorp", 2)
    assert pair["aa_difference"] == pytest.approx(seq["AA"] - gorp["AA"])
    pair_line = next(line for line in text.splitlines() if line.startswith("| seq-lora | gorp |"))
    assert f"**{pair['aa_difference']:+.1f}**" in pair_line and pair_line.endswith("| **yes** |")
    lo, hi = pair["aa_difference_ci"]
    assert f" [{lo:+.1f}, {hi:+.1f}] |" in pair_line and hi < 0
    p_cells = " | ".join(compare._p(pair[k]) for k in ("p_mcnemar", "p_bootstrap", "p_holm"))
    assert f"| {p_cells} |" in pair_line and pair["p"] == max(pair["p_mcnemar"], pair["p_bootstrap"])
    assert pair_line in (output / "summary.md").read_text()
    assert "AA_lo" in (output / "summary.csv").read_text().splitlines()[0]

    # Regenerating from the same folders writes the same page, byte for byte.
    compare.write_page(page, "fake", "Fake", results, compare.write_summary(output, results, "clora compare --methods seq-lora,gorp"),
                       "clora compare ...", output / "summary.png")
    assert page.read_text() == text


def test_page_gives_a_tuned_learning_rate_per_method_not_the_first_runs(tmp_path):
    output, results = _fake_comparison(tmp_path)
    for r in results:
        r["config"]["lr"] = 0.0011 if r["method"] == "gorp" else 0.00171
    rows = compare.write_summary(output, results, "clora compare ...")
    page = tmp_path / "results.md"
    compare.write_page(page, "fake", "Fake", results, rows, "clora compare ...", output / "summary.png")
    assert "lr per method (seq-lora 0.0017, gorp 0.0011)" in page.read_text()
    for r in results:
        r["config"]["lr"] = 0.002
    compare.write_page(page, "fake", "Fake", results, rows, "clora compare ...", output / "summary.png")
    assert ", lr 0.002," in page.read_text()


def test_declared_pairs_are_the_only_ones_tested_and_holm_counts_only_them(tmp_path):
    runs = {name: [stats.load_run(write_run(tmp_path / name, "1", 0, continual_rows(draws(k, 60, p), draws(k, 60, p))))]
            for k, (name, p) in enumerate([("seq-lora", 0.4), ("gorp", 0.6), ("galore", 0.55), ("deal", 0.5)])}
    every = stats.pairwise(runs)
    declared = stats.pairwise(runs, [("gorp", "seq-lora"), ("gorp", "galore")])
    assert len(every) == 6 and [(t.first, t.second) for t in declared] == [("gorp", "seq-lora"), ("gorp", "galore")]
    raw = {(t.first, t.second): t.p for t in every}
    assert declared[0].p == raw[("seq-lora", "gorp")]  # the same exact test, either way round
    assert declared[1].p == raw[("gorp", "galore")]
    # Holm over two pairs adjusts less than over six: the smallest p is multiplied by 2, not 6.
    smallest = min(declared, key=lambda t: t.p)
    assert smallest.p_holm == pytest.approx(min(1.0, 2 * smallest.p))
    assert next(t for t in every if {t.first, t.second} == {smallest.first, smallest.second}).p_holm == \
        pytest.approx(min(1.0, 6 * smallest.p))


def test_a_partial_table_adjusts_over_the_whole_declared_family(tmp_path):
    """A declared pair whose runs are not there yet still counts in Holm's family: the partial table must not
    call significant what the full one, with every pair tested, might not."""
    runs = {name: [stats.load_run(write_run(tmp_path / name, "1", 0, continual_rows(draws(k, 60, p), draws(k, 60, p))))]
            for k, (name, p) in enumerate([("seq-lora", 0.3), ("gorp", 0.7)])}
    family = [("gorp", "seq-lora"), ("gorp", "galore"), ("deal", "seq-lora")]  # galore, deal: no runs yet
    tests = stats.pairwise(runs, family)
    assert [(t.first, t.second) for t in tests] == [("gorp", "seq-lora")]
    assert tests[0].p_holm == pytest.approx(min(1.0, 3 * tests[0].p))
    assert stats.pairwise(runs, family[:1])[0].p_holm == pytest.approx(tests[0].p)


def test_holm_over_a_partly_tested_family_never_claims_more_than_the_full_family():
    import random

    rng = random.Random(0)
    for _ in range(200):
        full = [rng.random() ** 3 for _ in range(rng.randint(2, 12))]
        tested = sorted(rng.sample(range(len(full)), rng.randint(1, len(full))))
        partial = stats.holm([full[k] for k in tested], family=len(full))
        final = stats.holm(full)
        assert all(a >= final[k] - 1e-12 for a, k in zip(partial, tested))


def test_pairs_option_expands_stars_in_method_order_and_refuses_unknown_names():
    methods = ["seq-lora", "gorp", "gorp-no-shared:gorp", "galore"]
    assert compare.parse_pairs("*/seq-lora, gorp/gorp-no-shared", methods) == [
        ("gorp", "seq-lora"), ("gorp-no-shared", "seq-lora"), ("galore", "seq-lora"), ("gorp", "gorp-no-shared")]
    assert compare.parse_pairs("gorp/galore,galore/gorp", methods) == [("gorp", "galore")]  # once
    for bad, says in [("gorp/ewc", "'ewc', which is not one of --methods"), ("gorp", "FIRST/SECOND"),
                      ("gorp/gorp", "FIRST/SECOND"), ("*/*", "FIRST/SECOND")]:
        with pytest.raises(UserError, match=says):
            compare.parse_pairs(bad, methods)
