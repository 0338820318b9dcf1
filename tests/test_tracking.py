"""--report-to: Accelerate's trackers. TensorBoard (the default) still writes the run folder's tb/ with
train/loss, train/penalty and accuracy/<task> per stage; MLflow (local file store) and W&B (offline)
receive the same numbers; `none` writes no logs; a resume may change the trackers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import clora
from clora.cli import main
from conftest import run_killed_in_second_stage, tiny_config


def _config(model: str, bench: Path, **overrides):
    return tiny_config(model, bench, "ewc", test_per_task=4, **overrides)


def _stage_accuracy(out: Path) -> dict[int, dict[str, float]]:
    return {i + 1: json.loads((d / "stage.json").read_text())["accuracy"]
            for i, d in enumerate(sorted((out / "stages").iterdir()))}


def _by_task(stages: dict[int, dict[str, float]]) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list] = {}
    for stage, row in stages.items():
        for task, value in row.items():
            found.setdefault(task, []).append((stage, value))
    return found


def _same_points(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    # Trackers store float32: the stage's number exactly, its accuracy to float32 precision.
    return [s for s, _ in got] == [s for s, _ in expected] and \
        [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_tensorboard_by_default_logs_what_it_always_did(tiny_llama, tiny_bench, tmp_path, without_plots):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    clora.run(_config(tiny_llama, tiny_bench), out)
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    batches = sum(json.loads((d / "stage.json").read_text())["train_batches"] for d in (out / "stages").iterdir())
    assert len(events.Scalars("train/loss")) == batches
    assert len(events.Scalars("train/penalty")) > 0  # EWC's penalty, from stage 2 on
    for task, points in _by_task(_stage_accuracy(out)).items():
        assert _same_points([(e.step, e.value) for e in events.Scalars(f"accuracy/{task}")], points)


def test_none_writes_no_logs_and_a_resume_may_change_the_trackers(tiny_llama, tiny_bench, tmp_path, monkeypatch,
                                                                   without_plots):
    out = tmp_path / "run"
    run_killed_in_second_stage(_config(tiny_llama, tiny_bench, report_to="none"), out, monkeypatch)
    assert not (out / "tb").exists()
    result = clora.run(_config(tiny_llama, tiny_bench, report_to="tensorboard"), out, resume=True)
    assert result["status"] == "complete" and (out / "tb").is_dir()


def test_mlflow_gets_the_losses_accuracies_and_options(tiny_llama, tiny_bench, tmp_path, monkeypatch, without_plots):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install 'clora[mlflow]'")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the local file store behind this switch
    out = tmp_path / "run"
    clora.run(_config(tiny_llama, tiny_bench, report_to="tensorboard,mlflow"), out)
    assert (out / "tb").is_dir()  # both at once
    client = MlflowClient(tracking_uri=store.as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["method"] == "ewc" and run.data.params["tasks"] == "alpha,beta"
    for task, points in _by_task(_stage_accuracy(out)).items():
        history = client.get_metric_history(run.info.run_id, f"accuracy/{task}")
        assert _same_points(sorted((m.step, m.value) for m in history), points)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) > 0


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of
    records, each with a 7-byte header: checksum, length, kind 1 full / 2 first / 3 middle / 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_gets_the_accuracies_and_options(tiny_llama, tiny_bench, tmp_path, monkeypatch, without_plots):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install 'clora[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    clora.run(_config(tiny_llama, tiny_bench, report_to="wandb"), out)
    import wandb

    # `run.finish()` hands the records to W&B's service process, which may still be writing them;
    # teardown is what the process's exit does (W&B's atexit hook): wait for the service to flush.
    wandb.teardown()
    assert not (out / "tb").exists()  # only what was asked for
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # the run was finished
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
              for r in records if r.HasField("config") for i in r.config.update}
    assert config["method"] == "ewc"
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.HasField("history")]
    logged: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("accuracy/"):
                logged.setdefault(key.removeprefix("accuracy/"), []).append((row["stage"], value))
    assert set(logged) == {"alpha", "beta"}
    for task, points in _by_task(_stage_accuracy(out)).items():
        assert _same_points(logged[task], points)
    assert any("train/loss" in row for row in rows) and any("train/penalty" in row for row in rows)


def test_unknown_tracker_is_one_line(tiny_llama, tiny_bench, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--model", tiny_llama, "--data-dir", str(tiny_bench), "--tasks", "alpha,beta",
                 "--output", str(out), "--report-to", "tensorboard,comet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("clora: error:") == 1 and "'comet'" in err and "mlflow" in err, err
    assert not out.exists()
