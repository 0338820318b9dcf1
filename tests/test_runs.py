"""End-to-end runs on tiny models: every method of the foundation trains and evaluates on a
decoder-only and an encoder-decoder model; saved adapters reload in plain PEFT with the same
predictions; a resumed run ends identical to an uninterrupted one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel

import clora
from clora.models import load_model
from conftest import assert_predicts_as_saved, assert_same_run_folders, run_killed_in_second_stage, tiny_config

METHODS = ["seq-lora", "inc-lora", "mtl", "per-task-ft"]


@pytest.fixture(params=["llama", "t5"])
def tiny_model(request, tiny_llama, tiny_t5) -> str:
    return {"llama": tiny_llama, "t5": tiny_t5}[request.param]


def _predictions(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.glob("stages/*/predictions/*.jsonl"))}


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_and_writes_results(method, tiny_model, tiny_bench, tmp_path):
    out = tmp_path / "run"
    result = clora.run(tiny_config(tiny_model, tiny_bench, method, epochs=1), out)
    assert result["status"] == "complete"
    for name in ["config.json", "metrics.json", "accuracy_matrix.csv", "report.md",
                 "accuracy_matrix.png", "accuracy_curves.png"]:
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir()), "TensorBoard logs missing"
    rows = result["accuracy_matrix"]
    assert len(rows) == (1 if method == "mtl" else 2)
    assert all(v is not None for v in rows[-1])
    assert result["metrics"]["AA"] == pytest.approx(sum(rows[-1]) / 2)
    assert all(n > 0 for n in result["trainable_parameters"])
    assert f"method `{method}`, model" in (out / "report.md").read_text()  # the options recorded, no stray space


def test_inc_lora_grows_rank_and_reloads(tiny_llama, tiny_bench3, tmp_path):
    out = tmp_path / "run"
    clora.run(tiny_config(tiny_llama, tiny_bench3, "inc-lora", epochs=1, tasks="alpha,beta,gamma"), out)
    ranks = [json.loads((d / "adapter" / "adapter_config.json").read_text())["r"]
             for d in sorted((out / "stages").iterdir())]
    assert ranks == [4, 8, 12]  # r per task seen, each new LoRA at the unit rank


@pytest.mark.parametrize("method", ["seq-lora", "inc-lora"])
def test_saved_adapter_reloads_in_plain_peft_with_same_predictions(method, tiny_model, tiny_bench, tmp_path):
    cfg = tiny_config(tiny_model, tiny_bench, method)
    out = tmp_path / "run"
    result = clora.run(cfg, out)
    for stage_dir, row in zip(sorted((out / "stages").iterdir()), result["accuracy_matrix"]):
        loaded = load_model(tiny_model)
        model = PeftModel.from_pretrained(loaded.model, str(stage_dir / "adapter"))
        assert_predicts_as_saved(loaded, model, stage_dir, result["tasks"], row, tiny_bench, cfg)


@pytest.mark.parametrize("method", ["seq-lora", "inc-lora", "per-task-ft"])
def test_resume_after_interruption_gives_identical_results(method, tiny_llama, tiny_bench, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_llama, tiny_bench, method, eval_all=True, zero_shot=True)
    reference = clora.run(cfg, tmp_path / "reference")

    run_killed_in_second_stage(cfg, tmp_path / "resumed", monkeypatch)
    partial = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert partial["status"].startswith("partial")
    assert "PARTIAL" in (tmp_path / "resumed" / "report.md").read_text()
    assert [d.name for d in (tmp_path / "resumed" / "stages").iterdir()] == ["01-alpha"]

    resumed = clora.run(cfg, tmp_path / "resumed", resume=True)
    for key in ["accuracy_matrix", "zero_shot", "metrics", "rouge1_last_row", "trainable_parameters"]:
        assert resumed[key] == reference[key], key
    assert _predictions(tmp_path / "resumed") == _predictions(tmp_path / "reference")
    # The whole folder, byte for byte, less wall-clock times (conftest.TIMING_FIELDS, TIMING_PATHS).
    assert_same_run_folders(tmp_path / "resumed", tmp_path / "reference")


def test_training_changes_the_model(tiny_llama, tiny_bench, tmp_path):
    """Guards the tests above: identical predictions must not come from a model that never moved."""
    out = tmp_path / "run"
    clora.run(tiny_config(tiny_llama, tiny_bench, "seq-lora", zero_shot=True, eval_all=True), out)
    from safetensors.torch import load_file
    weights = load_file(str(out / "stages" / "01-alpha" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    zero = json.loads((out / "zero_shot.json").read_text())["accuracy"]
    after = json.loads((out / "stages" / "02-beta" / "stage.json").read_text())["accuracy"]
    assert zero != after or _predictions(out)["stages/01-alpha/predictions/alpha.jsonl"] != \
        _predictions(out)["stages/02-beta/predictions/alpha.jsonl"]
