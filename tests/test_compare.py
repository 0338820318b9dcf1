"""`clora compare`: methods x orders x seeds in one resumable invocation, one table, one plot."""
from __future__ import annotations

import json

from clora.cli import main


def test_compare_runs_grid_shares_zero_shot_and_resumes(tiny_bench, tiny_llama, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "seq-lora,inc-lora", "--orders", "alpha+beta", "--seeds", "0,1",
            "--model", tiny_llama, "--data-dir", str(tiny_bench), "--lr", "0.02", "--rank", "4",
            "--batch-size", "4", "--epochs", "1", "--zero-shot", "--eval-all",
            "--for", "inc-lora", "lr=0.01", "--output", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["summary"]] == ["seq-lora", "inc-lora"]
    assert all(r["runs"] == 2 for r in summary["summary"])
    assert len(summary["runs"]) == 4
    seq = [r for r in summary["runs"] if r["method"] == "seq-lora"]
    mean_aa = sum(r["metrics"]["AA"] for r in seq) / 2
    assert abs(summary["summary"][0]["AA"] - mean_aa) < 1e-9
    assert json.loads((out / "inc-lora" / "orderalpha+beta-seed0" / "config.json").read_text())["lr"] == 0.01
    assert (out / "zero_shot" / "orderalpha+beta-seed0.json").is_file()
    zero = [json.loads((out / m / "orderalpha+beta-seed1" / "zero_shot.json").read_text()) for m in ("seq-lora", "inc-lora")]
    assert zero[0] == zero[1]
    for name in ("summary.md", "summary.csv", "summary.png"):
        assert (out / name).stat().st_size > 100
    assert "inc-lora" in (out / "summary.md").read_text()

    # Rerunning the same command resumes every finished run instead of training again.
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/stages/*/stage.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/stages/*/stage.json")} == before

    # Committed result runs keep no weights: a finished run is summarised again without them.
    for weights in out.glob("**/*.safetensors"):
        weights.unlink()
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["summary"] == summary["summary"]
    capsys.readouterr()


def test_compare_rejects_override_for_method_not_compared(tiny_bench, tmp_path, capsys):
    code = main(["compare", "--methods", "seq-lora", "--for", "deal", "lr=1", "--data-dir", str(tiny_bench),
                 "--output", str(tmp_path / "c")])
    assert code == 2 and "deal" in capsys.readouterr().err


def test_compare_writes_its_section_of_a_results_page_beside_the_published_numbers(tiny_bench, tiny_llama, tmp_path, capsys):
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Results\n\nHand-written introduction.\n")
    common = ["--model", tiny_llama, "--data-dir", str(tiny_bench), "--lr", "0.02", "--rank", "4", "--batch-size", "4",
              "--epochs", "1", "--orders", "alpha+beta", "--page", str(page)]
    assert main(["compare", "--methods", "seq-lora", "--output", str(tmp_path / "a"), "--title", "First", *common]) == 0
    assert main(["compare", "--methods", "mtl", "--output", str(tmp_path / "b"), "--title", "Second", *common]) == 0
    text = page.read_text()
    assert text.startswith("# Results\n\nHand-written introduction.")
    assert "## First" in text and "## Second" in text  # two sections, neither overwrote the other
    seq_aa = json.loads((tmp_path / "a" / "summary.json").read_text())["summary"][0]["AA"]
    row = next(line for line in text.splitlines() if line.startswith("| seq-lora |"))
    assert f"| {seq_aa:.1f} [" in row and "44.6 (DEAL Table 1)" in row  # ours (with its CI), then the published, labelled
    assert "](../a/summary.png)" in text and "clora compare --methods seq-lora" in text
    # Rerunning replaces only its own section.
    assert main(["compare", "--methods", "seq-lora", "--output", str(tmp_path / "a"), "--title", "First", *common]) == 0
    assert page.read_text() == text
    capsys.readouterr()


def test_report_only_summarises_what_is_there_and_trains_nothing(tiny_bench, tiny_llama, tmp_path, capsys):
    common = ["--model", tiny_llama, "--data-dir", str(tiny_bench), "--lr", "0.02", "--rank", "4", "--batch-size", "4",
              "--epochs", "1", "--orders", "alpha+beta", "--output", str(tmp_path / "c")]
    assert main(["compare", "--methods", "seq-lora", "--report-only", *common]) == 2
    assert "holds none of these runs yet" in capsys.readouterr().err
    assert main(["compare", "--methods", "seq-lora", *common]) == 0
    full = json.loads((tmp_path / "c" / "summary.json").read_text())["summary"]
    assert main(["compare", "--methods", "seq-lora,inc-lora", "--report-only", *common]) == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())["summary"]
    assert summary == full  # inc-lora, never run, is left out; seq-lora read back as it was
    assert "Not run yet: inc-lora (order alpha+beta seed 0)." in (tmp_path / "c" / "summary.md").read_text()
    assert not (tmp_path / "c" / "inc-lora").exists()
    capsys.readouterr()


def test_parallel_jobs_give_the_same_runs_report_failures_and_resume(tiny_bench, tiny_llama, tmp_path, capsys, monkeypatch):
    common = ["--methods", "seq-lora,inc-lora", "--orders", "alpha+beta", "--model", tiny_llama, "--data-dir",
              str(tiny_bench), "--lr", "0.02", "--rank", "4", "--batch-size", "4", "--epochs", "1"]
    assert main(["compare", *common, "--output", str(tmp_path / "serial")]) == 0
    serial = json.loads((tmp_path / "serial" / "summary.json").read_text())

    # Every run process is killed while writing its results after its second (last) stage.
    monkeypatch.setenv("CLORA_KILL_AT", "results_write:2")
    assert main(["compare", *common, "--jobs", "2", "--output", str(tmp_path / "par")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 of 2 runs failed" in err and "seq-lora-orderalpha+beta-seed0.log" in err
    assert (tmp_path / "par" / "logs" / "inc-lora-orderalpha+beta-seed0.log").is_file()
    assert "(partial)" in (tmp_path / "par" / "summary.md").read_text()  # what finished, marked as such

    monkeypatch.delenv("CLORA_KILL_AT")
    assert main(["compare", *common, "--jobs", "2", "--output", str(tmp_path / "par")]) == 0
    parallel = json.loads((tmp_path / "par" / "summary.json").read_text())
    assert [r["accuracy_matrix"] for r in parallel["runs"]] == [r["accuracy_matrix"] for r in serial["runs"]]
    assert "--jobs" not in (tmp_path / "par" / "summary.md").read_text()  # how it ran is not what it computed

    # Rerun over finished runs: each is summarised again in this process, none gets a process of its own.
    capsys.readouterr()
    report = tmp_path / "par" / "seq-lora" / "orderalpha+beta-seed0" / "report.md"
    report.unlink()
    assert main(["compare", *common, "--jobs", "2", "--output", str(tmp_path / "par")]) == 0
    assert "clora compare: started" not in capsys.readouterr().out
    assert report.is_file()
    assert json.loads((tmp_path / "par" / "summary.json").read_text())["runs"] == parallel["runs"]


def test_page_shows_each_method_per_order_so_methods_are_compared_on_shared_orders():
    from clora.compare import _by_order_table

    def run(method, order, aa, bwt, status="complete"):
        return {"method": method, "order": order, "status": status, "metrics": {"AA": aa, "BWT": bwt}}

    table = _by_order_table([run("deal", "1", 60.0, -2.0), run("deal", "2", 50.0, -4.0),
                             run("o-lora", "1", 64.0, -4.0, status="partial: 2 of 4 stages done")])
    lines = table.splitlines()
    assert lines[0] == "| method | order 1 | order 2 |"
    assert lines[2] == "| deal | 60.0 (-2.0) | 50.0 (-4.0) |"
    assert lines[3] == "| o-lora | 64.0 (-4.0) partial | — |"
    assert _by_order_table([run("deal", "1", 60.0, -2.0)]) == ""  # one order: nothing to break down


def test_a_labelled_variant_has_its_own_runs_and_takes_its_methods_tuned_settings(tmp_path):
    import pytest

    from clora.compare import expand, run_dir_of
    from clora.config import RunConfig
    from clora.errors import UserError
    from clora.tune import settings_for

    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"methods": {"gorp": {"settings": {"lr": "0.002", "full_lr": "0.0001"}}}}))
    methods = ["gorp", "gorp-no-shared:gorp"]
    per_method = settings_for(chosen, methods)
    per_method["gorp-no-shared"].append("shared_space=false")
    grid = expand(RunConfig(), methods, ["1"], [0], per_method)
    (label_a, _, _, full), (label_b, _, _, ablation) = grid
    assert (label_a, label_b) == ("gorp", "gorp-no-shared")
    assert full.method == ablation.method == "gorp" and full.lr == ablation.lr == 0.002
    assert full.method_options == ["full_lr=0.0001"]
    assert ablation.method_options == ["full_lr=0.0001", "shared_space=false"]
    assert run_dir_of(tmp_path, label_b, "1", 0) != run_dir_of(tmp_path, label_a, "1", 0)
    with pytest.raises(UserError, match="twice"):
        expand(RunConfig(), ["gorp", "gorp:gorp"], ["1"], [0], {})


def test_one_at_a_time_never_runs_two_of_a_method_together(tiny_bench, tiny_llama, tmp_path, capsys):
    """In grid order, a's two orders would start together; with `--one-at-a-time a`, b's first run
    takes the second slot and a's second run starts only after a's first is done."""
    common = ["--methods", "a:seq-lora,b:seq-lora", "--orders", "alpha+beta,beta+alpha", "--model", tiny_llama,
              "--data-dir", str(tiny_bench), "--lr", "0.02", "--rank", "4", "--batch-size", "4", "--epochs", "1",
              "--jobs", "2", "--output", str(tmp_path / "cmp")]
    assert main(["compare", *common, "--one-at-a-time", "a"]) == 0
    events = [line.removeprefix("clora compare: ") for line in capsys.readouterr().out.splitlines()
              if line.startswith("clora compare: ")]
    started = [e.split()[1] for e in events if e.startswith("started")]
    assert started[:2] == ["a-orderalpha+beta-seed0", "b-orderalpha+beta-seed0"], events
    second_a = events.index(next(e for e in events if e.startswith("started a-orderbeta+alpha")))
    assert "a-orderalpha+beta-seed0 done" in events[:second_a], events
    assert "--one-at-a-time" not in (tmp_path / "cmp" / "summary.md").read_text()


def test_next_runnable_skips_a_busy_one_at_a_time_method():
    from clora.parallel import next_runnable

    pending = list(enumerate([("osf", "1", 0, None), ("osf", "2", 0, None), ("seq-lora", "1", 0, None)]))
    assert next_runnable(pending, [], frozenset({"osf"})) == 0
    assert next_runnable(pending, ["osf"], frozenset({"osf"})) == 2
    assert next_runnable(pending, ["osf"], frozenset()) == 0
    assert next_runnable(pending[:2], ["osf"], frozenset({"osf"})) is None
