"""The dev split and `clora tune`: hyper-parameters are chosen on items held out of the training files,
never on test items, with the same number of trials for every method; a killed search resumes."""
from __future__ import annotations

import json
import random
from pathlib import Path

import optuna
import pytest

from clora import RunConfig, continual
from clora.benchmark import Benchmark
from clora.cli import main
from clora.errors import UserError
from conftest import second_stage_killed


def _bench(root: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """Two tasks whose answer is the sentence's first letter; every sentence distinct, except one
    training item that repeats a test sentence (the dev split must never take it)."""
    root.mkdir(parents=True)
    (root / "instruction_config.json").write_text(json.dumps(
        {"TC": [{"instruction_type": "zero-shot", "instruction": "Topic?\n"}]}))
    for rel, labels in {"TC/alpha": ["x", "y"], "COPA/beta": ["A", "B"]}.items():
        d = root / rel
        d.mkdir(parents=True)
        (d / "labels.json").write_text(json.dumps(labels))
        test = [{"sentence": f"{labels[i % 2]}{100 + i}", "label": labels[i % 2]} for i in range(n_test)]
        train = [{"sentence": f"{labels[i % 2]}{i}", "label": labels[i % 2]} for i in range(n_train)]
        train[0] = dict(test[0])
        (d / "train.json").write_text(json.dumps(train))
        (d / "test.json").write_text(json.dumps(test))
    return root


@pytest.fixture()
def bench(tmp_path) -> Path:
    return _bench(tmp_path / "bench")


def _sentences(items) -> set[str]:
    return {item.sentence for item in items}


def test_dev_split_is_disjoint_from_train_and_test_deterministic_and_independent_of_the_train_cap(bench):
    b = Benchmark(bench)
    task = b.load_task("alpha", train_cap=8, test_cap=4, sample_seed=0, dev_cap=6)
    full_test = _sentences(b.load_task("alpha").test)
    assert len(task.dev) == 6 and len(task.train) == 8
    assert not _sentences(task.dev) & _sentences(task.train)
    assert not _sentences(task.dev) & full_test  # the training item that repeats a test sentence is never dev
    assert task.dev == b.load_task("alpha", train_cap=8, sample_seed=0, dev_cap=6).dev
    assert task.dev == b.load_task("alpha", train_cap=16, sample_seed=0, dev_cap=6).dev
    assert task.dev != b.load_task("alpha", train_cap=8, sample_seed=1, dev_cap=6).dev
    # Without a dev split a run keeps exactly the items it always had; with one, it keeps all of them
    # the dev split did not take.
    train_file = b.load_task("alpha").train
    today = [train_file[i] for i in sorted(random.Random("alpha:train:0").sample(range(24), 8))]
    assert b.load_task("alpha", train_cap=8, sample_seed=0).train == today
    assert set(today) - set(task.dev) <= set(task.train)
    whole = b.load_task("alpha", sample_seed=0, dev_cap=6)
    assert len(whole.train) == 24 - 6 and not _sentences(whole.train) & _sentences(whole.dev)
    with pytest.raises(UserError, match="leaves no training items"):
        b.load_task("alpha", dev_cap=23)


def test_dev_split_is_the_same_for_every_method_and_seed_and_a_dev_run_holds_no_test_item(bench):
    dev = None
    for method in ("seq-lora", "replay", "mtl"):
        for seed in (0, 1):
            config = RunConfig(method=method, data_dir=str(bench), order=None, tasks="alpha,beta", seed=seed,
                               train_per_task=8, dev_per_task=4, eval_split="dev")
            tasks = continual.prepare(config).tasks
            split = {n: t.dev for n, t in tasks.items()}
            assert dev is None or split == dev
            dev = split
            assert all(t.test == t.dev for t in tasks.values())  # what the run evaluates is the dev split
    with pytest.raises(UserError, match="--dev-per-task"):
        RunConfig(data_dir=str(bench), eval_split="dev").validate()


def _tune_args(bench, model, out, trials, methods="seq-lora", *extra):
    return ["tune", "--methods", methods, "--trials", str(trials), "--output", str(out), "--model", model,
            "--data-dir", str(bench), "--tasks", "alpha,beta", "--train-per-task", "8", "--dev-per-task", "4",
            "--batch-size", "4", "--epochs", "1", "--rank", "4", *extra]


def _trials(out: Path, method: str):
    study = optuna.load_study(study_name=f"clora-tune/{method}", storage=f"sqlite:///{out.resolve() / 'study.db'}")
    return sorted(study.get_trials(), key=lambda t: t.number)


def _stage_times(run: Path) -> dict:
    return {p.relative_to(run): p.stat().st_mtime_ns for p in run.glob("stages/*/stage.json")}


def test_a_killed_search_resumes_without_rerunning_or_losing_a_trial(bench, tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tune"
    evaluated: list[str] = []
    real_evaluate = continual.evaluate_task

    def recording(model, encoder, task, *args, **kwargs):
        evaluated.extend(item.sentence for item in task.test)
        return real_evaluate(model, encoder, task, *args, **kwargs)

    monkeypatch.setattr(continual, "evaluate_task", recording)
    with second_stage_killed(monkeypatch):  # Ctrl-C while trial 0 trains its second task
        assert main(_tune_args(bench, tiny_llama, out, 1)) == 130
    first = _trials(out, "seq-lora")
    assert [t.state for t in first] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert "error" not in first[0].user_attrs  # an interruption is not a failed setting: it costs no trial
    stage_one = _stage_times(out / "seq-lora" / "trial-0")
    assert len(stage_one) == 1

    # Rerun: the interrupted trial continues (same parameters, its finished stage kept), nothing else runs.
    assert main(_tune_args(bench, tiny_llama, out, 1)) == 0
    trials = _trials(out, "seq-lora")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in complete] == [1] and complete[0].params == first[0].params
    assert complete[0].user_attrs["continues"] == 0
    continued = out / "seq-lora" / "trial-1"
    assert {k: v for k, v in _stage_times(continued).items() if k in stage_one} == stage_one
    assert json.loads((continued / "config.json").read_text())["eval_split"] == "dev"

    # A larger budget adds one trial; the finished one is not run again.
    done = _stage_times(continued)
    assert main(_tune_args(bench, tiny_llama, out, 2)) == 0
    trials = _trials(out, "seq-lora")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in complete] == [1, 2]
    assert complete[1].params != complete[0].params  # the resumed sampler does not repeat its first draw
    assert _stage_times(continued) == done
    chosen = json.loads((out / "chosen.json").read_text())["methods"]["seq-lora"]
    best = max(complete, key=lambda t: t.value)
    assert chosen["trial"] == best.number and chosen["settings"] == {"lr": best.params["lr"]}

    test_items = _sentences(Benchmark(bench).load_task("alpha").test) | _sentences(Benchmark(bench).load_task("beta").test)
    assert evaluated and not set(evaluated) & test_items  # choosing never read a test item
    capsys.readouterr()


def test_a_failing_trial_is_recorded_every_method_gets_the_budget_and_compare_reads_the_choice(
        bench, tiny_llama, tmp_path, monkeypatch, capsys):
    out, page = tmp_path / "tune", tmp_path / "docs" / "tuning.md"
    real_run = continual.run
    calls = {"n": 0}

    def first_trial_diverges(config, output, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("non-finite loss at batch 1")
        return real_run(config, output, **kwargs)

    monkeypatch.setattr(continual, "run", first_trial_diverges)
    args = _tune_args(bench, tiny_llama, out, 2, "seq-lora,o-lora", "--for", "o-lora", "lambda2=0.01",
                      "--page", str(page))
    assert main(args) == 0
    seq, olora = _trials(out, "seq-lora"), _trials(out, "o-lora")
    assert [t.state.name for t in seq] == ["FAIL", "COMPLETE"]  # recorded, and the search went on
    assert "non-finite loss" in seq[0].user_attrs["error"]
    assert [t.state.name for t in olora] == ["COMPLETE", "COMPLETE"]  # the same budget of two trials
    assert set(olora[0].params) == {"lr", "lambda1"}
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["methods"]["seq-lora"]["trial"] == 1
    best = max(olora, key=lambda t: (t.value, -t.number))
    assert chosen["methods"]["o-lora"]["settings"] == {"lambda2": "0.01", **best.params}
    text = page.read_text()
    assert "2 trials per method" in text and "non-finite loss" in text and "clora tune --methods seq-lora,o-lora" in text
    assert "| o-lora | lr [0.0002, 0.01] log; lambda1 [0.001, 10] log | 2 / 0 |" in text

    # compare --settings applies the choice like --for; an explicit --for wins.
    monkeypatch.setattr(continual, "run", real_run)
    cmp = tmp_path / "cmp"
    common = ["compare", "--orders", "alpha+beta", "--model", tiny_llama, "--data-dir", str(bench),
              "--train-per-task", "8", "--test-per-task", "4", "--batch-size", "4", "--epochs", "1", "--rank", "4",
              "--settings", str(out / "chosen.json"), "--output", str(cmp)]
    assert main([*common, "--methods", "o-lora", "--for", "o-lora", "lambda1=0.25"]) == 0
    config = json.loads((cmp / "o-lora" / "orderalpha+beta-seed0" / "config.json").read_text())
    assert config["lr"] == best.params["lr"]
    options = dict(o.split("=") for o in config["method_options"])  # the last value of a key is the one used
    assert options["lambda1"] == "0.25" and options["lambda2"] == "0.01"
    capsys.readouterr()
    assert main([*common, "--methods", "o-lora,inc-lora"]) == 2
    assert "no tuned settings for inc-lora" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (["--dev-per-task", "0"], "--dev-per-task must be a positive integer"),
    (["--dev-per-task", "30"], "leaves no training items"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--for", "seq-lora", "lr=0.1"], "lr is what the search chooses"),
])
def test_bad_input_stops_with_one_line_and_writes_nothing(bench, tiny_llama, tmp_path, capsys, change, message):
    out = tmp_path / "tune"
    assert main(_tune_args(bench, tiny_llama, out, 1) + change) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_folder_holding_something_else_is_refused_untouched(bench, tiny_llama, tmp_path, capsys):
    out = tmp_path / "tune"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_tune_args(bench, tiny_llama, out, 1)) == 2
    assert "already holds other files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_search_is_not_resumed_with_other_settings(bench, tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tune"
    monkeypatch.setattr(continual, "run", lambda config, output, **kw: (_ for _ in ()).throw(RuntimeError("stub")))
    assert main(_tune_args(bench, tiny_llama, out, 1)) == 1  # one failed trial, recorded: nothing chosen
    assert main(_tune_args(bench, tiny_llama, out, 1, "seq-lora", "--train-per-task", "6")) == 2
    assert "train_per_task: 8 -> 6" in capsys.readouterr().err


def test_a_search_whose_worker_was_killed_retries_its_trial_once_the_heartbeat_stops(
        bench, tiny_llama, tmp_path, monkeypatch, capsys):
    import signal
    import subprocess
    import sys
    import time

    from clora import tune

    out = tmp_path / "tune"
    args = _tune_args(bench, tiny_llama, out, 1)
    # The worker hangs in its trial's second task, where it is killed (SIGKILL: no Python cleanup runs).
    script = ("import sys, time; from clora import continual, tune; tune.HEARTBEAT_S, tune.GRACE_S = 1, 2\n"
              "real, calls = continual.train_stage, []\n"
              "def slow(*a, **k):\n    calls.append(1)\n    if len(calls) == 2: time.sleep(600)\n    return real(*a, **k)\n"
              "continual.train_stage = slow\nfrom clora.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    worker = subprocess.Popen([sys.executable, "-c", script, *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_stage = out / "seq-lora" / "trial-0" / "stages" / "01-alpha" / "stage.json"
    deadline = time.time() + 300
    while not first_stage.is_file() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert first_stage.is_file()
    kept = first_stage.stat().st_mtime_ns
    assert [t.state.name for t in _trials(out, "seq-lora")] == ["RUNNING"]

    monkeypatch.setattr(tune, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tune, "GRACE_S", 2)
    monkeypatch.setattr(tune, "POLL_S", 0.5)
    assert main(args) == 0
    trials = _trials(out, "seq-lora")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["continues"] == 0
    assert (out / "seq-lora" / "trial-1" / "stages" / "01-alpha" / "stage.json").stat().st_mtime_ns == kept
    capsys.readouterr()


def test_every_method_searches_its_learning_rate_and_only_options_it_has():
    import dataclasses as dc

    from clora.methods import registry
    from clora.tune import search_space

    run_fields = {f.name for f in dc.fields(RunConfig)}
    for name, method in registry().items():
        space = search_space(name)
        options = {f.name for f in dc.fields(method.Options)}
        assert set(space) <= run_fields | options, name
        assert {"lr", "full_lr"} & set(space), f"{name} searches no learning rate"


def test_a_search_short_of_its_budget_chooses_nothing_and_says_it_is_in_progress(tmp_path):
    from clora import tune

    config = RunConfig(tasks="alpha,beta", order=None, train_per_task=8, dev_per_task=4, eval_split="dev").to_dict()
    search = tune.Search(output=str(tmp_path), storage="sqlite://", study="s", budget=2, seed=0,
                         configs={"seq-lora": config, "o-lora": config}, fixed={})

    def found(o_lora_trials: int) -> dict:
        def method(n):
            trials = [{"number": k, "state": "complete", "params": {"lr": 1e-3 * (k + 1)}, "dev_AA": 50.0 + k,
                       "error": None, "continues": None, "run_dir": None} for k in range(n)]
            return {"trials": trials, "complete": n, "failed": 0, "space": {"lr": "[0.0002, 0.01] log"},
                    "chosen": {"trial": n - 1, "dev_AA": 49.0 + n, "settings": {"lr": 1e-3 * n}}}
        return {"seq-lora": method(2), "o-lora": method(o_lora_trials)}

    (tmp_path / "chosen.json").write_text("{}")  # left by an older search
    tune.write_outputs(search, found(1), "clora tune ...", None, "s", "T")
    summary = (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "chosen.json").exists()
    assert "Search in progress**: 3 of 4 trials" in summary and "best so far" in summary and "**chosen**" not in summary
    tune.write_outputs(search, found(2), "clora tune ...", None, "s", "T")
    assert set(json.loads((tmp_path / "chosen.json").read_text())["methods"]) == {"seq-lora", "o-lora"}
    assert "in progress" not in (tmp_path / "summary.md").read_text()
