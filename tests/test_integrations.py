"""clora.integrations: a method trained inside a user's own Trainer / TRL SFTTrainer, on the tiny Llama.
Through SFTTrainer: DEAL's task-start identity (the model the Trainer starts task 2 from is exactly the
model task 1 ended with), GORP's invariants (the gradients the optimizer steps with are orthogonal to the
shared space; task 1's full-rank update keeps its action on that space), O-LoRA's penalty in the logged
loss. The run folder is clora's own: clora's loop continues a stage the Trainer did, and the Trainer one
clora's loop did. Arguments that contradict the RunConfig are refused before training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.utils import parametrize
from transformers import Trainer, TrainerCallback

pytest.importorskip("trl")
from trl import SFTTrainer  # noqa: E402

import clora  # noqa: E402
from clora import integrations, lora  # noqa: E402
from clora.errors import UserError  # noqa: E402
from conftest import run_killed_in_second_stage, tiny_config  # noqa: E402
from test_gorp import OPTIONS as GORP_OPTIONS, _check_task_one_is_protected, _spaces  # noqa: E402

pytestmark = pytest.mark.usefixtures("without_plots")


class _At(TrainerCallback):
    """Calls `fn(model, state)` at each Trainer event given: _At(on_train_begin=fn, ...)."""

    def __init__(self, **events):
        for event, fn in events.items():
            setattr(self, event, lambda args, state, control, model=None, fn=fn, **kw: fn(model, state))


def _stages(run: Path) -> list[Path]:
    return sorted((run / "stages").iterdir())


def _probe(stage) -> dict[str, torch.Tensor]:
    """A fixed batch: the stage's first four training examples."""
    return stage.collator([stage.dataset[i] for i in range(4)])


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.detach().clone()


def test_deal_starts_task_two_from_exactly_where_task_one_ended(tiny_llama, tiny_bench, tmp_path):
    seen: dict[str, object] = {}

    def make_trainer(stage):
        batch = seen.setdefault("probe", _probe(stage))  # task 1's first items, for both tasks
        # TRL patched the base model's forward for task 1; clora evaluates and trains on with its own
        seen.setdefault("patched", []).append("forward" in vars(stage.model.get_base_model()))

        def at_start(model, state):
            if stage.index == 1:
                layers = lora.lora_layers(model)
                seen["parametrized"] = all(parametrize.is_parametrized(layer.lora_A["default"], "weight")
                                           and parametrize.is_parametrized(layer.lora_B["default"], "weight")
                                           for layer in layers.values())
                seen["factors"] = {f"{name}.lora_{f}.weight": w.detach().clone() for name, layer in layers.items()
                                   for f, w in zip("AB", lora.factors(layer))}
                seen["penalty"] = stage.method.penalty(model).item()
                seen["start"] = _logits(model, batch)

        def at_end(model, state):
            if stage.index == 0:
                seen["end"] = _logits(model, batch)

        return stage.trainer(SFTTrainer, callbacks=[_At(on_train_begin=at_start, on_train_end=at_end)])

    out = tmp_path / "run"
    result = integrations.run(tiny_config(tiny_llama, tiny_bench, "deal", epochs=2), out, make_trainer)
    assert result["status"] == "complete"
    first, second = (load_file(str(s / "adapter" / "adapter_model.safetensors")) for s in _stages(out))
    # Task 2 ran re-parameterised (filter + MLP), from the identity: the factors, the model's outputs
    # and the centred penalty are exactly those task 1 ended with.
    assert seen["parametrized"] is True and seen["patched"] == [False, False]
    assert set(seen["factors"]) == set(first)
    for key, factor in seen["factors"].items():
        assert torch.equal(factor, first[key]), key
    assert torch.equal(seen["start"], seen["end"])
    assert seen["penalty"] == 0.0
    # ... and then it learned, and left a plain LoRA of the same shape
    assert set(second) == set(first) and any(not torch.equal(second[k], first[k]) for k in first)
    assert json.loads((out / "trainer" / "02-beta.json").read_text())["trainer"] == "trl.trainer.sft_trainer.SFTTrainer"


def test_gorp_projects_gradients_before_clipping_and_keeps_task_one_through_sft_trainer(tiny_llama, tiny_bench,
                                                                                        tmp_path):
    checked: list[str] = []
    norms: list[float] = []
    trainers = []

    def make_trainer(stage):
        def before_step(model, state):  # after the method's hook and the clipping
            if stage.index == 1:
                grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
                norms.append(float(torch.nn.utils.get_total_norm(grads)))
                for key, p in stage.method.protected(model).items():
                    space = stage.method.spaces.get(key)
                    if space is not None and p.grad is not None and p.grad.norm() > 0:
                        assert (p.grad @ space).norm() <= 1e-5 * p.grad.norm(), key
                        checked.append(key)

        trainers.append(stage.trainer(SFTTrainer, callbacks=[_At(on_pre_optimizer_step=before_step)]))
        return trainers[-1]

    out = tmp_path / "run"
    config = tiny_config(tiny_llama, tiny_bench, "gorp", epochs=1, method_options=GORP_OPTIONS)
    assert integrations.run(config, out, make_trainer)["status"] == "complete"
    stages = _stages(out)
    assert set(checked) == set(_spaces(stages[0]))  # every protected matrix was checked, LoRA A and full-rank
    # Projected, then clipped (clora's order): a clipped step's gradient has exactly the norm 1, which
    # projecting after clipping would have shrunk.
    logged = [entry["grad_norm"] for entry in trainers[1].state.log_history if "grad_norm" in entry]
    assert len(logged) == len(norms) and sum(n > 1 for n in logged) >= 2
    for pre_clip, after in zip(logged, norms):
        assert after == pytest.approx(min(pre_clip, 1.0), rel=1e-4)
    _check_task_one_is_protected(stages, lora_rank=4)


def test_the_penalty_is_in_the_logged_loss_and_the_gradient(tiny_llama, tiny_bench, tmp_path):
    """O-LoRA on task 2 (one batch: the whole training set): the first logged loss is the task loss plus
    lambda1 * sum |A_old A_new^T|, and the first step's gradient is that of their sum, all computed here
    by hand before the first step."""
    expected: dict[str, object] = {}
    trainers = []

    def direction(grads) -> torch.Tensor:  # clipping rescales the whole gradient: compare directions
        flat = torch.cat([g.flatten() for g in grads])
        return flat / flat.norm()

    def make_trainer(stage):
        def at_start(model, state):
            if stage.index == 1:
                params = [p for p in model.parameters() if p.requires_grad]
                task = model(**stage.collator(list(stage.dataset))).loss
                penalty = 0.5 * sum((lora.factors(layer, lora.DEFAULT)[0] @ lora.factors(layer, lora.NEW)[0].T).abs().sum()
                                    for layer in lora.lora_layers(model).values())
                expected.update(task=task.item(), penalty=penalty.item(),
                                with_penalty=direction(torch.autograd.grad(task + penalty, params, retain_graph=True)),
                                without=direction(torch.autograd.grad(task, params)))

        def before_step(model, state):
            if stage.index == 1 and state.global_step == 0:
                expected["stepped"] = direction([p.grad for p in model.parameters() if p.requires_grad])

        trainers.append(stage.trainer(SFTTrainer, callbacks=[_At(on_train_begin=at_start,
                                                                 on_pre_optimizer_step=before_step)]))
        return trainers[-1]

    config = tiny_config(tiny_llama, tiny_bench, "o-lora", epochs=2, batch_size=24, method_options=["lambda1=0.5"])
    integrations.run(config, tmp_path / "run", make_trainer)
    first = trainers[1].state.log_history[0]
    assert expected["penalty"] > 0.05 * expected["task"]  # large enough to see
    assert first["loss"] == pytest.approx(expected["task"] + expected["penalty"], rel=1e-5)
    assert first["penalty"] == pytest.approx(expected["penalty"], rel=1e-5)
    assert torch.allclose(expected["stepped"], expected["with_penalty"], atol=1e-5)
    assert not torch.allclose(expected["stepped"], expected["without"], atol=1e-2)
    assert "penalty" not in trainers[0].state.log_history[0]  # task 1 has no old LoRA: no penalty
    # The Trainer's logs reach the run's trackers (TensorBoard here), at the stage's step offset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 10_001, 10_002]
    penalty = events.Scalars("train/penalty")
    assert penalty[0].step == 10_001 and penalty[0].value == pytest.approx(expected["penalty"], rel=1e-5)


def test_clora_continues_a_run_a_trainer_started_and_back(tiny_llama, tiny_bench, tmp_path, monkeypatch):
    """EWC (its Fisher and anchor are method state): stage 1 by a plain Trainer, stage 2 by clora's loop;
    and stage 1 by clora's loop, stage 2 by the Trainer. Both folders hold the files a clora run holds."""
    config = tiny_config(tiny_llama, tiny_bench, "ewc", epochs=1)

    def killed_in_stage_two(stage):
        if stage.index == 1:
            raise KeyboardInterrupt
        return stage.trainer(Trainer)

    started_by_trainer = tmp_path / "trainer-then-clora"
    with pytest.raises(KeyboardInterrupt):
        integrations.run(config, started_by_trainer, killed_in_stage_two)
    assert [s.name for s in _stages(started_by_trainer)] == ["01-alpha"]
    assert load_file(str(started_by_trainer / "stages" / "01-alpha" / "method_state.safetensors"))
    assert clora.run(config, started_by_trainer, resume=True)["status"] == "complete"

    started_by_clora = tmp_path / "clora-then-trainer"
    run_killed_in_second_stage(config, started_by_clora, monkeypatch)
    second = integrations.run(config, started_by_clora, lambda stage: stage.trainer(Trainer), resume=True)
    assert second["status"] == "complete"

    plain = tmp_path / "clora"
    clora.run(config, plain)

    def files(run: Path) -> set[str]:
        return {str(p.relative_to(run)) for p in run.rglob("*")
                if p.is_file() and p.relative_to(run).parts[0] not in ("tb", "trainer")}

    assert files(started_by_trainer) == files(started_by_clora) == files(plain)
    assert sorted(p.name for p in (started_by_clora / "trainer").iterdir()) == ["02-beta.json"]
    metrics = json.loads((started_by_trainer / "metrics.json").read_text())
    assert metrics["stage_names"] == ["alpha", "beta"] and len(metrics["accuracy_matrix"]) == 2


def test_sft_trainer_trains_on_the_text_dataset(tiny_llama, tiny_bench, tmp_path):
    logs = []

    def make_trainer(stage):
        rows = stage.text_dataset
        assert len(rows) == len(stage.dataset) == 24
        assert rows[0]["prompt"].endswith("Answer:") and rows[0]["completion"] in (" x", " y")
        logs.append(stage.trainer(SFTTrainer, train_dataset=rows))
        return logs[-1]

    config = tiny_config(tiny_llama, tiny_bench, "seq-lora", tasks="alpha", epochs=1)
    assert integrations.run(config, tmp_path / "run", make_trainer)["status"] == "complete"
    assert logs[0].state.global_step == 6 and logs[0].state.log_history[0]["loss"] > 0


def test_arguments_that_contradict_the_run_are_refused_before_training(tiny_llama, tiny_bench, tmp_path):
    config = tiny_config(tiny_llama, tiny_bench, "seq-lora")
    with pytest.raises(UserError, match=r"learning_rate 0\.001 \(RunConfig lr 0\.02\).*num_train_epochs 1"):
        integrations.run(config, tmp_path / "a", lambda s: s.trainer(
            Trainer, args=s.training_args(learning_rate=1e-3, num_train_epochs=1)))
    with pytest.raises(UserError, match="stage.trainer"):
        integrations.run(config, tmp_path / "b", lambda s: Trainer(model=s.model, args=s.training_args(),
                                                                   train_dataset=s.dataset))
    with pytest.raises(UserError, match="optimizers is the method's"):
        integrations.run(config, tmp_path / "c", lambda s: s.trainer(Trainer, optimizers=(None, None)))
    for run in ("a", "b", "c"):
        assert not (tmp_path / run).exists()  # left as it was: the corrected call starts afresh
    result = integrations.run(config, tmp_path / "a", lambda s: s.trainer(Trainer))
    assert result["status"] == "complete"


def test_the_example_runs_a_stream_of_free_text_tasks_through_sft_trainer(tiny_llama, tmp_path):
    """examples/trl_stream.py, as the README shows it, on the tiny model: DEAL over the example stream's
    labelled and free-text tasks, scored like `clora run --tasks-file` scores them."""
    import importlib.util

    path = Path(__file__).parent.parent / "examples" / "trl_stream.py"
    spec = importlib.util.spec_from_file_location("trl_stream", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "run"
    result = example.main(["--model", tiny_llama, "--train-per-task", "8", "--test-per-task", "3", "--output", str(out)])
    assert result["status"] == "complete" and result["method"] == "deal"
    assert result["task_metrics"] == {"sentiment": "exact_match", "capitals": "rouge_l", "numbers": "rouge_l"}
    assert len(result["accuracy_matrix"]) == 3
    assert sorted(p.name for p in (out / "trainer").iterdir()) == ["01-sentiment.json", "02-capitals.json",
                                                                    "03-numbers.json"]


def test_a_seq2seq_model_trains_with_a_plain_trainer(tiny_t5, tiny_bench, tmp_path):
    config = tiny_config(tiny_t5, tiny_bench, "o-lora", epochs=1)
    trainers = []

    def make_trainer(stage):
        trainers.append(stage.trainer(Trainer))
        return trainers[-1]

    result = integrations.run(config, tmp_path / "run", make_trainer)
    assert result["status"] == "complete" and len(result["accuracy_matrix"]) == 2
    assert [t.state.global_step for t in trainers] == [6, 6]
    assert all("penalty" in entry for entry in trainers[1].state.log_history if "loss" in entry)
