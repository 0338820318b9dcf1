"""`clora run --config FILE`: a run folder's config.json replays the run exactly; a YAML file sets the
options it names; only options actually typed on the command line override the file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clora import continual
from clora.cli import main
from clora.configfile import load
from conftest import assert_same_run_folders

RUN = ["run", "--tasks", "alpha,beta", "--train-per-task", "6", "--test-per-task", "4", "--batch-size", "2",
       "--epochs", "2", "--lr", "2e-2", "--rank", "4", "--eval-batch-size", "4"]


def test_a_run_folders_config_json_replays_the_run(tiny_llama, tiny_bench, tmp_path, capsys, without_plots):
    first, replay = tmp_path / "first", tmp_path / "replay"
    assert main(RUN + ["--data-dir", str(tiny_bench), "--model", tiny_llama, "--method", "ewc",
                       "--output", str(first)]) == 0, capsys.readouterr().err
    assert main(["run", "--config", str(first / "config.json"), "--output", str(replay)]) == 0, capsys.readouterr().err
    assert (replay / "config.json").read_bytes() == (first / "config.json").read_bytes()
    assert_same_run_folders(replay, first)  # metrics, predictions, adapters, byte for byte


@pytest.fixture()
def captured(monkeypatch) -> list:
    """The RunConfig `clora run` would run, without running it."""
    seen = []
    monkeypatch.setattr(continual, "run", lambda config, output, **kw: seen.append(config) or _fake_result())
    return seen


def _fake_result() -> dict:
    return {"metrics": {"AA": 0.0, "BWT": None, "FWT": None, "forgetting": None}, "seconds": 0}


def _run_with(file: Path, *extra: str, captured: list):
    assert main(["run", "--config", str(file), "--output", str(file.parent / "out"), *extra]) == 0
    return captured[-1]


def test_command_line_overrides_only_what_it_gives(tmp_path, captured):
    file = tmp_path / "run.yaml"
    file.write_text("method: o-lora\nmethod_options: [lambda1=0.3]\nlr: 2e-2\nrank: 16\ntasks: alpha,beta\n"
                    "eval_all: true\ntarget_modules: q_proj,v_proj\n")
    config = _run_with(file, captured=captured)
    assert (config.method, config.lr, config.rank, config.tasks, config.order) == ("o-lora", 0.02, 16, "alpha,beta", None)
    assert config.method_options == ["lambda1=0.3"] and config.eval_all and config.target_modules == ["q_proj", "v_proj"]
    # --lr with its *default* value still wins over the file: it was typed
    config = _run_with(file, "--lr", "1e-3", "--rank", "8", "-o", "lambda1=0.9", captured=captured)
    assert (config.lr, config.rank, config.method, config.eval_all) == (0.001, 8, "o-lora", True)
    assert config.method_options == ["lambda1=0.3", "lambda1=0.9"]  # the later key wins in the method
    # naming the tasks on the command line replaces the file's way of naming them
    config = _run_with(file, "--order", "2", captured=captured)
    assert (config.order, config.tasks) == ("2", None)


def test_json_and_yaml_read_alike(tmp_path, captured):
    (tmp_path / "a.json").write_text(json.dumps({"seed": 3, "order": "2", "zero_shot": True}))
    (tmp_path / "b.yml").write_text("seed: 3\norder: 2\nzero_shot: true\n")  # `order: 2` is the order "2"
    a, b = _run_with(tmp_path / "a.json", captured=captured), _run_with(tmp_path / "b.yml", captured=captured)
    assert a == b and (a.seed, a.order, a.zero_shot) == (3, "2", True)


def test_an_old_run_folders_config_replays_with_what_it_was_run_with(tmp_path):
    """A config.json that predates an option was run without it (batching: random then); a plain
    options file that leaves it out gets today's default."""
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "seq-lora", "lr": 0.002}))
    (run / "metrics.json").write_text("{}")
    assert load(run / "config.json")["batching"] == "random"
    (tmp_path / "config.json").write_text(json.dumps({"method": "seq-lora"}))  # not beside a run
    assert "batching" not in load(tmp_path / "config.json")
