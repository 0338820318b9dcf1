"""The O-LoRA, EWC and Replay baselines: their invariants on fixed small tensors and tiny models,
then end to end on tiny Llama and T5 (plain-PEFT reload for O-LoRA, resume equality for EWC and
Replay, whose state is saved between stages)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import clora
from clora import lora
from clora.errors import UserError
from clora.methods import Settings, build_method
from clora.methods.base import Stage
from clora.methods.ewc import estimate_fisher, ewc_penalty
from clora.methods.o_lora import o_lora_penalty
from clora.models import load_model
from conftest import assert_predicts_as_saved, method_stages, run_killed_in_second_stage, tiny_config


# -- O-LoRA ------------------------------------------------------------------------------------


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(3, 3, bias=False)
        self.v = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.v(self.q(x))


def _stage(index: int) -> SimpleNamespace:
    return SimpleNamespace(stage=Stage(index, f"task{index}", [f"task{index}"]))


def _olora_model(method, stage: int = 1):
    torch.manual_seed(0)
    model = get_peft_model(_TwoLinears(), lora.lora_config(2, 32.0, 0.0, ["q", "v"]))
    old = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for layer in lora.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(old)
    method.on_task_start(model, _stage(stage))  # adds the new task's LoRA beside "default"
    new = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    for layer in lora.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_A[lora.NEW].weight.copy_(new)
            layer.lora_B[lora.NEW].weight.fill_(0.5)
    return model


def test_o_lora_penalty_equals_hand_computation():
    method = build_method("o-lora", Settings(rank=2, target_modules=["q", "v"]), ["lambda2=0.1"])
    model = _olora_model(method)
    # A_old A_new^T = [[1, 0], [-2, 0]] in both layers: sum |.| = 3 per layer.
    # New LoRA: A has Frobenius norm sqrt(1 + 4 + 9) = sqrt(14); B (3x2 or 2x2 of 0.5) sqrt(6)/2 or 1.
    expected = 0.5 * (3 + 3) + 0.1 * (2 * 14 ** 0.5 + 6 ** 0.5 / 2 + 1.0)
    assert method.penalty(model).item() == pytest.approx(expected, rel=1e-6)
    a_old, a_new = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    assert o_lora_penalty([(a_old, a_new)], [a_new], 0.5, 0.0).item() == pytest.approx(1.5)
    # Task 1 has no old LoRA: with the default lambda2 = 0 there is no penalty at all.
    plain = get_peft_model(_TwoLinears(), lora.lora_config(2, 32.0, 0.0, ["q", "v"]))
    assert build_method("o-lora", Settings(rank=2, target_modules=["q", "v"])).penalty(plain) is None


def test_o_lora_per_task_weights_replace_lambda1_and_lambda2_stage_by_stage():
    # The reference long scripts set the weights per task; here task 2 gets 7 and 0.1, task 3 gets none.
    options = ["lambda1=0.5", "lambda1_per_task=0,7,0", "lambda2_per_task=0,0.1,0"]
    method = build_method("o-lora", Settings(rank=2, target_modules=["q", "v"]), options)
    assert [s.name for s in method.stages(["a", "b", "c"])] == ["a", "b", "c"]
    model = _olora_model(method, stage=1)
    expected = 7 * (3 + 3) + 0.1 * (2 * 14 ** 0.5 + 6 ** 0.5 / 2 + 1.0)  # as in the hand computation above
    assert method.penalty(model).item() == pytest.approx(expected, rel=1e-6)
    assert method.penalty(_olora_model(method, stage=2)) is None, "task 3's weights are 0, whatever lambda1 says"
    with pytest.raises(UserError, match="lambda1_per_task has 3 values for 2 tasks"):
        method.stages(["a", "b"])


def test_o_lora_penalty_gradient_moves_new_a_towards_orthogonality():
    method = build_method("o-lora", Settings(rank=2, target_modules=["q", "v"]))
    model = _olora_model(method)
    torch.manual_seed(1)
    for layer in lora.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_A[lora.NEW].weight.copy_(torch.randn(2, 3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    olds = [lora.factors(layer)[0].detach().clone() for layer in lora.lora_layers(model).values()]
    optimizer = torch.optim.SGD(trainable, lr=0.05)
    before = method.penalty(model)
    before.backward()
    optimizer.step()
    after = method.penalty(model).item()
    assert after < before.item()
    # Only the new LoRA moves; the old (frozen) A's are untouched.
    assert all(torch.equal(o, lora.factors(layer)[0]) for o, layer in zip(olds, lora.lora_layers(model).values()))
    for _ in range(200):
        optimizer.zero_grad()
        method.penalty(model).backward()
        optimizer.step()
    assert method.penalty(model).item() < 0.05 * before.item()


# N-LoRA grows its adapter the same way (its own tests are in test_nlora.py); O-LoRA runs with per-task weights.
@pytest.mark.parametrize("method, options", [("o-lora", ["lambda1_per_task=0,0.5,5", "lambda2_per_task=0,0,0.1"]),
                                             ("n-lora", ["lambda1=0.01"])])
def test_adapter_has_rank_r_times_t_and_reloads_in_plain_peft(method, options, tiny_llama, tiny_bench3, tmp_path):
    cfg = tiny_config(tiny_llama, tiny_bench3, method, tasks="alpha,beta,gamma", epochs=1, train_per_task=8,
                      method_options=options)
    out = tmp_path / "run"
    result = clora.run(cfg, out)
    assert result["status"] == "complete"
    stage_dirs = sorted((out / "stages").iterdir())
    ranks = [json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] for d in stage_dirs]
    assert ranks == [cfg.rank, 2 * cfg.rank, 3 * cfg.rank]
    assert len(set(result["trainable_parameters"])) == 1, "every task trains one rank-r LoRA"
    for stage_dir, row in zip(stage_dirs, result["accuracy_matrix"]):
        loaded = load_model(tiny_llama)
        model = PeftModel.from_pretrained(loaded.model, str(stage_dir / "adapter"))
        assert_predicts_as_saved(loaded, model, stage_dir, result["tasks"], row, tiny_bench3, cfg)


# -- EWC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["llama", "t5"])
def test_ewc_penalty_is_zero_at_theta_star_and_quadratic(model_name, tiny_llama, tiny_t5, tiny_bench):
    method, model, data = method_stages({"llama": tiny_llama, "t5": tiny_t5}[model_name], tiny_bench, "ewc",
                                  ["fisher_samples=6", "lam=10"])
    torch.manual_seed(0)
    params = [p for p in lora.adapter_parameters(model)]
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))  # a trained-looking LoRA: B = 0 would give A no gradient
    method.on_task_start(model, data[0])
    model.train()
    method.on_task_end(model, data[0], None)
    assert model.training and all(p.grad is None and p.requires_grad for p in params)
    assert len(method.fisher) == len(params) and all((f >= 0).all() for f in method.fisher.values())
    assert all(f.sum() > 0 for n, f in method.fisher.items() if "lora_A" in n)
    assert method.penalty(model).item() == 0.0

    direction = [torch.randn_like(p) for p in params]

    def penalty_at(scale: float) -> float:
        with torch.no_grad():
            for p, d, star in zip(params, direction, method.star.values()):
                p.copy_(star + scale * d)
        return method.penalty(model).item()

    one, two = penalty_at(0.01), penalty_at(0.02)
    assert one > 0 and two == pytest.approx(4 * one, rel=1e-4)

    # The state is tensors only and round-trips; a second task adds its Fisher (gamma = 1: a sum).
    again = build_method("ewc", method.settings, ["lam=10"])
    again.load_state_dict(method.state_dict())
    assert again.penalty(model).item() == pytest.approx(two, rel=1e-6)
    first = {n: f.clone() for n, f in method.fisher.items()}
    method.on_task_end(model, data[1], None)
    second = estimate_fisher(model, data[1].make_loader(data[1].train_items), 6)
    assert all(torch.allclose(method.fisher[n], first[n] + second[n]) for n in first)


def test_ewc_fisher_is_the_mean_of_per_item_squared_gradients(tiny_llama, tiny_bench):
    method, model, data = method_stages(tiny_llama, tiny_bench, "ewc", [])
    torch.manual_seed(0)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in named.values():
            p.add_(0.1 * torch.randn_like(p))
    batch = next(iter(data[0].make_loader(data[0].train_items)))
    by_hand = {n: torch.zeros_like(p) for n, p in named.items()}
    model.eval()
    for i in range(3):
        model.zero_grad()
        model(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()
        for n, p in named.items():
            by_hand[n] += p.grad ** 2 / 3
    model.zero_grad(set_to_none=True)
    fisher = estimate_fisher(model, data[0].make_loader(data[0].train_items), 3)
    assert fisher.keys() == by_hand.keys()
    assert all(torch.allclose(fisher[n], by_hand[n], rtol=1e-4, atol=1e-12) for n in fisher)


def test_ewc_penalty_function_by_hand():
    theta = {"w": torch.tensor([1.0, 2.0])}
    value = ewc_penalty(theta, {"w": torch.tensor([3.0, 0.5])}, {"w": torch.tensor([0.0, 0.0])}, lam=2.0)
    assert value.item() == pytest.approx(2.0 * (3.0 * 1 + 0.5 * 4))


# -- Replay ------------------------------------------------------------------------------------


def test_replay_buffer_holds_k_items_per_earlier_task_and_none_of_the_current(tiny_bench3):
    method, _, data = method_stages(None, tiny_bench3, "replay", ["per_task=5"], tasks="alpha,beta,gamma")
    assert method.keeps_old_data
    assert method.training_items(data[0]) == data[0].train_items
    for index, stage_data in enumerate(data):
        if index:
            buffer = method.buffer(stage_data)
            earlier = [n for s in data[:index] for n in s.stage.tasks]
            assert sorted(n for n, _ in buffer) == sorted(earlier * 5)
            assert not {n for n, _ in buffer} & set(stage_data.stage.tasks)
            for name, item in buffer:
                assert item in stage_data.tasks[name].train
            assert method.training_items(stage_data) == stage_data.train_items + buffer
        method.on_task_end(None, stage_data, None)
    assert all(len(set(ix)) == 5 for ix in method.kept.values())
    # Tensors-only state; a fresh method loaded from it rebuilds the same buffer.
    state = method.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    again = build_method("replay", method.settings, ["per_task=5"])
    again.load_state_dict(state)
    assert again.buffer(data[2]) == method.buffer(data[2])
    # Seeded: the same seed draws the same buffer, another seed another one.
    other = build_method("replay", method.settings, ["per_task=5", "seed=1"])
    other.on_task_end(None, data[0], None)
    assert other.kept["alpha"] != method.kept["alpha"]


# -- end to end ------------------------------------------------------------------------------


def test_o_lora_runs_on_t5(tiny_t5, tiny_bench, tmp_path):
    """Encoder-decoder end to end (EWC's Fisher pass on T5 is covered by its unit test above)."""
    out = tmp_path / "run"
    result = clora.run(tiny_config(tiny_t5, tiny_bench, "o-lora", epochs=1, train_per_task=12), out)
    assert result["status"] == "complete"
    assert len(result["accuracy_matrix"]) == 2 and all(v is not None for v in result["accuracy_matrix"][-1])
    assert json.loads((out / "stages" / "02-beta" / "adapter" / "adapter_config.json").read_text())["r"] == 8


def _predictions(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.glob("stages/*/predictions/*.jsonl"))}


@pytest.mark.parametrize("method,options", [("ewc", ["fisher_samples=8"]), ("replay", ["per_task=6"])])
def test_resume_gives_identical_results(method, options, tiny_llama, tiny_bench, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_llama, tiny_bench, method, method_options=options, epochs=1, train_per_task=12)
    reference = clora.run(cfg, tmp_path / "reference")
    assert reference["status"] == "complete" and reference["keeps_old_data"] == (method == "replay")
    state = tmp_path / "reference" / "stages" / "01-alpha" / "method_state.safetensors"
    assert state.is_file(), "the stage-1 state is what the resumed stage 2 needs"
    if method == "replay":
        assert "data of earlier tasks" in (tmp_path / "reference" / "report.md").read_text()

    run_killed_in_second_stage(cfg, tmp_path / "resumed", monkeypatch)
    resumed = clora.run(cfg, tmp_path / "resumed", resume=True)
    for key in ["accuracy_matrix", "metrics", "rouge1_last_row", "trainable_parameters"]:
        assert resumed[key] == reference[key], key
    assert _predictions(tmp_path / "resumed") == _predictions(tmp_path / "reference")
    # The stage-2 state includes what stage 1 left (EWC: the summed Fisher; Replay: alpha's indices),
    # so equal bytes mean the resumed run loaded it.
    for name in ["adapter/adapter_model.safetensors", "method_state.safetensors"]:
        a = (tmp_path / "resumed" / "stages" / "02-beta" / name).read_bytes()
        b = (tmp_path / "reference" / "stages" / "02-beta" / name).read_bytes()
        assert a == b, name
