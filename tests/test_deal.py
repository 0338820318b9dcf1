"""DEAL: the wrapped factors start as the exact identity, take one SVD per factor per task, feel the
regulariser, train end to end in every variant, and leave a plain rank-r PEFT LoRA of constant size
that reloads with the same predictions; a killed DEAL run resumes to the same results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file
from torch.nn.utils import parametrize

import clora
from clora import lora
from clora.benchmark import Benchmark
from clora.encoding import Encoder
from clora.errors import UserError
from clora.evaluation import evaluate_task
from clora.methods import Settings, Stage, StageData, build_method
from clora.methods.deal import ColumnMLP, DEALOptions, FactorGroup, HaarFilter, HeatFilter
from clora.models import load_model
from clora.trainer import TrainOptions, train_stage
from conftest import run_killed_in_second_stage, tiny_config

VARIANTS = {"AB": ["factors=AB"], "A": ["factors=A"], "B": ["factors=B"], "wavelet": ["kernel=wavelet"]}
SMALL = dict(epochs=1, train_per_task=8, test_per_task=4)  # 2 steps and 4 answers per task: CPU time is shared


def _stage_data(index: int) -> StageData:
    # on_task_start / on_task_end read only the stage.
    return StageData(Stage(index, f"task{index}", [f"task{index}"]), {}, [], None, None, None)


def _model_after_task1(model_path: str, options: list[str], rank: int = 4):
    """The tiny model with a LoRA that looks trained (random non-zero A and B) and DEAL's method."""
    method = build_method("deal", Settings(rank=rank, lr=1e-2), options)
    model = method.attach(load_model(model_path).model)
    method.on_task_start(model, _stage_data(0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model, method


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (3, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=batch["input_ids"], labels=batch["labels"]).logits
        return model(input_ids=batch["input_ids"]).logits


# -- the building blocks -------------------------------------------------------------------------

def test_heat_filter_and_mlp_start_as_identity_and_filter_reshapes_singular_values():
    torch.manual_seed(0)
    y = torch.randn(6, 40)
    heat = HeatFilter([y], num_kernels=4)
    assert torch.equal(heat(y[None]), y[None])
    assert torch.equal(ColumnMLP(y[None], 16)(y[None]), torch.zeros_like(y[None]))
    with torch.no_grad():
        heat.gains[0, :, 0] = 0.5  # every kernel's gain on the largest singular value
    s = torch.linalg.svdvals(y)
    expected = torch.cat([0.5 * s[:1], s[1:]]).sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(heat(y[None])[0]), expected, rtol=1e-4)


@pytest.mark.parametrize("shape", [(4, 16), (5, 7), (7, 4)])
def test_haar_filter_is_exact_identity_at_start_and_equals_the_direct_transform(shape):
    import ptwt

    torch.manual_seed(0)
    y = torch.randn(*shape, dtype=torch.float32)
    haar = HaarFilter([y])
    assert torch.equal(haar(y[None]), y[None])
    with torch.no_grad():
        haar.gate.uniform_(0.0, 1.5)
    approx, details = ptwt.wavedec2(y, "haar", level=1, mode="zero")
    direct = ptwt.waverec2((approx * haar.gate[0], details), "haar")[: shape[0], : shape[1]]
    assert torch.allclose(haar(y[None])[0], direct, atol=1e-5)


@pytest.mark.parametrize("kernel", ["heat", "wavelet"])
def test_a_group_computes_each_factor_as_if_alone(kernel):
    """Stacking factors of one shape is only batching: factor i's output depends on its own slice."""
    torch.manual_seed(0)
    factors = [torch.randn(4, 10) * 0.1 for _ in range(3)]
    options = DEALOptions(kernel=kernel, mlp_hidden=8)
    group = FactorGroup(factors, options)
    with torch.no_grad():
        for p in group.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    for i, factor in enumerate(factors):
        alone = FactorGroup([factor], options)
        with torch.no_grad():
            for p_alone, p in zip(alone.parameters(), group.parameters()):
                p_alone.copy_(p[i:i + 1])
        assert torch.allclose(alone.output()[0], group.output()[i], atol=1e-6)
    assert not torch.allclose(group.output()[0], factors[0], atol=1e-3)  # the parameters did act


def test_options_parse_and_bad_values_are_user_errors():
    method = build_method("deal", Settings(), ["factors=B", "kernel=wavelet", "num_kernels=3", "lambda1=0.5"])
    assert method.options == DEALOptions(factors="B", kernel="wavelet", num_kernels=3, lambda1=0.5)
    for bad in (["factors=C"], ["kernel=gauss"], ["num_kernels=0"], ["lambda2=-1"], ["mlp_hidden=x"], ["a=0.5"]):
        with pytest.raises(UserError):
            build_method("deal", Settings(), bad)


# -- on the tiny models --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_task_start_reproduces_the_previous_model_and_task_end_leaves_plain_lora(variant, tiny_llama):
    model, method = _model_after_task1(tiny_llama, VARIANTS[variant])
    batch = _batch()
    before = _logits(model, batch)
    method.on_task_start(model, _stage_data(1))
    wrapped = [m for m in model.modules() if parametrize.is_parametrized(m)]
    assert len(wrapped) == 2 * 2 * len(method.options.factors)  # 2 layers x (q, v) x factors
    # Same-shape factors share one batched group: A's all 4 x 32; B's 32 x 4 (q) and 16 x 4 (v).
    assert len(method._groups) == {"A": 1, "B": 2}.get(variant, 3)
    # Exact, not only close: every residual Δ is exactly 0 at the start.
    assert torch.equal(_logits(model, batch), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".parametrizations.weight.0." in n for n in trainable)

    method.on_task_end(model, _stage_data(1), None)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all("parametrizations" not in n for n, _ in model.named_parameters())
    assert torch.allclose(_logits(model, batch), before, atol=1e-5, rtol=1e-5)


def test_task_start_reproduces_the_previous_model_on_t5(tiny_t5):
    model, method = _model_after_task1(tiny_t5, [])
    batch = _batch()
    before = _logits(model, batch)
    method.on_task_start(model, _stage_data(1))
    assert torch.equal(_logits(model, batch), before)


@pytest.mark.parametrize("variant", ["AB", "wavelet"])
def test_one_decomposition_per_factor_per_task(variant, tiny_llama, monkeypatch):
    import ptwt

    model, method = _model_after_task1(tiny_llama, VARIANTS[variant])
    calls = {"svd": 0, "dwt": 0}
    real_svd, real_dwt = torch.linalg.svd, ptwt.wavedec2

    def counting_svd(*args, **kwargs):
        calls["svd"] += 1
        return real_svd(*args, **kwargs)

    def counting_dwt(*args, **kwargs):
        calls["dwt"] += 1
        return real_dwt(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    monkeypatch.setattr(ptwt, "wavedec2", counting_dwt)
    method.on_task_start(model, _stage_data(1))
    optimizer = method.make_optimizer(model)
    model.train()
    for step in range(4):
        loss = model(**_batch(step)).loss + method.penalty(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    factors = 2 * 2 * 2  # layers x (q, v) x (A, B)
    assert calls == ({"svd": factors, "dwt": 0} if variant == "AB" else {"svd": 0, "dwt": factors})


def test_group_cache_follows_each_forward_and_each_parameter_change(tiny_llama):
    """The batched output is cached per forward: gradient accumulation (two backward passes without a
    step) must see two fresh graphs, and a step must change the factors PEFT reads."""
    model, method = _model_after_task1(tiny_llama, [])
    method.on_task_start(model, _stage_data(1))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    model(**_batch()).loss.backward()
    once = [p.grad.clone() for p in params]
    model(**_batch()).loss.backward()  # would fail on a freed graph if the cache outlived the forward
    assert all(torch.allclose(p.grad, 2 * g, rtol=1e-4, atol=1e-7) for p, g in zip(params, once))
    assert any(g.abs().sum() > 0 for g in once)

    layer = next(iter(lora.lora_layers(model).values()))
    before = layer.lora_B["default"].weight.detach().clone()
    optimizer = torch.optim.SGD(params, lr=1.0)
    optimizer.step()
    after = layer.lora_B["default"].weight.detach().clone()
    assert not torch.equal(after, before)
    method.on_task_end(model, _stage_data(1), optimizer)
    assert torch.equal(layer.lora_B["default"].weight, after)  # materialised = what was trained


def test_update_lr_applies_to_later_tasks_only(tiny_llama):
    method = build_method("deal", Settings(rank=4, lr=2e-3), ["update_lr=1e-4"])
    model = method.attach(load_model(tiny_llama).model)
    method.on_task_start(model, _stage_data(0))
    assert {g["lr"] for g in method.make_optimizer(model).param_groups} == {2e-3}  # task 1: plain LoRA
    method.on_task_start(model, _stage_data(1))
    assert {g["lr"] for g in method.make_optimizer(model).param_groups} == {1e-4}


def _train_task2(tiny_llama, options: list[str]) -> dict[str, torch.Tensor]:
    """Task 2 through the real trainer (loss + penalty, clipping, AdamW); the filters' parameters."""
    torch.manual_seed(0)
    model, method = _model_after_task1(tiny_llama, options)
    torch.manual_seed(0)
    method.on_task_start(model, _stage_data(1))
    batches = [_batch(i) for i in range(3)]
    train_stage(model, method, batches, TrainOptions(), Accelerator(cpu=True), "test")
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".filter." in n}


def _filter_and_mlp(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".filter." in n or ".update." in n}


def test_penalty_is_zero_at_the_identity_start_and_pulls_back_towards_it_not_towards_zero(tiny_llama):
    model, method = _model_after_task1(tiny_llama, ["lambda1=1.0", "lambda2=1.0", "a=2", "b=2"])
    method.on_task_start(model, _stage_data(1))
    penalty = method.penalty(model)
    assert penalty.requires_grad and penalty.item() == 0.0
    gains = [p for n, p in model.named_parameters() if n.endswith("filter.gains")]
    outer = [p for n, p in model.named_parameters() if n.endswith("update.outer_weight")]
    with torch.no_grad():  # gains displaced both ways from their start (1); the MLP's output layer from 0
        for g in gains:
            g[..., 0] = 1.5
            g[..., 1] = 0.5
        for w in outer:
            w.fill_(0.25)
    method.penalty(model).backward()
    for g in gains:
        assert torch.all(g.grad[..., 0] > 0) and torch.all(g.grad[..., 1] < 0)  # descent moves both to 1
        assert torch.all(g.grad[..., 2:] == 0)  # undisplaced gains feel nothing
    for w in outer:
        assert torch.allclose(w.grad, torch.full_like(w, 0.5))  # λ2 · 2 · (0.25 - 0)


def test_with_no_task_gradient_the_penalty_leaves_filter_and_mlp_at_the_identity(tiny_llama):
    """The defect this centring fixes: |g|^10 on gains starting at 1 walked every gain towards 0 under
    AdamW whatever the data. With only the penalty as loss, nothing may move."""
    model, method = _model_after_task1(tiny_llama, [])  # default λ1, λ2, a, b
    method.on_task_start(model, _stage_data(1))
    start = _filter_and_mlp(model)
    optimizer = method.make_optimizer(model)
    for _ in range(5):
        method.penalty(model).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _filter_and_mlp(model)
    assert start.keys() == after.keys() and any(".filter." in n for n in start)
    assert all(torch.equal(start[n], after[n]) for n in start)


def test_with_a_task_gradient_the_penalty_holds_the_filter_near_its_start(tiny_llama):
    torch.manual_seed(0)
    model, method = _model_after_task1(tiny_llama, [])
    torch.manual_seed(0)
    method.on_task_start(model, _stage_data(1))
    start = {n: p for n, p in _filter_and_mlp(model).items() if ".filter." in n}
    free = _train_task2(tiny_llama, ["lambda1=0", "a=2"])
    held = _train_task2(tiny_llama, ["lambda1=100", "a=2"])
    assert free.keys() == held.keys() == start.keys()
    distance = {k: sum(float((d[n] - start[n]).norm()) for n in start) for k, d in (("free", free), ("held", held))}
    assert 0 < distance["held"] < distance["free"]
    gains = [n for n in start if n.endswith("gains")]
    mean = {k: torch.stack([d[n].mean() for n in gains]).mean() for k, d in (("free", free), ("held", held))}
    # Held towards 1, not towards 0: the held gains are no further below 1 than the free ones.
    assert abs(mean["held"] - 1) <= abs(mean["free"] - 1)


def _plain_lora_predictions(model_path: str, adapter_dir: Path, bench: Path, task: str, cfg) -> list[str]:
    loaded = load_model(model_path)
    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder, cfg.max_prompt_tokens)
    task_data = Benchmark(bench).load_task(task, cfg.train_per_task, cfg.test_per_task, cfg.sample_seed)
    return [p["prediction"] for p in evaluate_task(model, encoder, task_data, Accelerator(cpu=True),
                                                   cfg.eval_batch_size).predictions]


def _deal_parameter_count(model_path: str, options: DEALOptions, rank: int) -> int:
    """Filter + MLP parameters DEAL trains on a later task, from the LoRA shapes."""
    method = build_method("deal", Settings(rank=rank), [])
    model = method.attach(load_model(model_path).model)
    total = 0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        factor = "A" if "lora_A" in name else "B"
        if factor not in options.factors:
            continue
        dim = p.shape[0]
        if options.kernel == "heat":
            total += options.num_kernels * rank + 2 * options.num_kernels
        else:
            total += ((p.shape[0] + 1) // 2) * ((p.shape[1] + 1) // 2)
        total += 2 * dim * options.mlp_hidden + options.mlp_hidden + dim
    return total


# AB on Llama runs in the three-task test below.
@pytest.mark.parametrize("model_kind,variant", [("llama", "A"), ("llama", "B"), ("llama", "wavelet"), ("t5", "AB")])
def test_each_variant_trains_and_saves_a_plain_lora_that_reloads(model_kind, variant, tiny_llama, tiny_t5,
                                                                 tiny_bench, tmp_path):
    model_path = {"llama": tiny_llama, "t5": tiny_t5}[model_kind]
    options = VARIANTS[variant] + ["mlp_hidden=16"]
    cfg = tiny_config(model_path, tiny_bench, "deal", method_options=options, **SMALL)
    out = tmp_path / "run"
    result = clora.run(cfg, out)
    assert result["status"] == "complete"
    assert all(v is not None for v in result["accuracy_matrix"][-1])
    plain = sum(v.numel() for v in load_file(str(out / "stages/01-alpha/adapter/adapter_model.safetensors")).values())
    expected = _deal_parameter_count(model_path, build_method("deal", Settings(), options).options, cfg.rank)
    assert result["trainable_parameters"] == [plain, expected]

    stage = out / "stages" / "02-beta"
    state = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    assert all("lora_A" in k or "lora_B" in k for k in state) and sum(v.numel() for v in state.values()) == plain
    for task in result["tasks"]:
        lines = (stage / "predictions" / f"{task}.jsonl").read_text().splitlines()
        saved = [json.loads(line)["prediction"] for line in lines]
        assert _plain_lora_predictions(model_path, stage / "adapter", tiny_bench, task, cfg) == saved


def test_three_tasks_keep_plain_lora_size_and_a_killed_run_resumes_identically(tiny_llama, tiny_bench3, tmp_path,
                                                                              monkeypatch):
    cfg = tiny_config(tiny_llama, tiny_bench3, "deal", tasks="alpha,beta,gamma", method_options=["mlp_hidden=16"],
                      **SMALL)
    reference = clora.run(cfg, tmp_path / "reference")
    assert reference["status"] == "complete"
    stages = sorted((tmp_path / "reference" / "stages").iterdir())
    adapters = [d / "adapter" / "adapter_model.safetensors" for d in stages]
    weights = [load_file(str(a)) for a in adapters]
    plain = sum(v.numel() for v in weights[0].values())
    expected = _deal_parameter_count(tiny_llama, DEALOptions(mlp_hidden=16), cfg.rank)
    assert reference["trainable_parameters"] == [plain, expected, expected]
    # Tasks 2 and 3 leave a plain rank-r LoRA of the same tensors and bytes as task 1's.
    shapes = [{k: v.shape for k, v in w.items()} for w in weights]
    assert shapes[1] == shapes[2] == shapes[0]
    assert len({a.stat().st_size for a in adapters}) == 1
    assert all(json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] == cfg.rank for d in stages)
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # task 3 trained
    for task in reference["tasks"]:
        saved = [json.loads(line)["prediction"]
                 for line in (stages[-1] / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        assert _plain_lora_predictions(tiny_llama, stages[-1] / "adapter", tiny_bench3, task, cfg) == saved

    run_killed_in_second_stage(cfg, tmp_path / "resumed", monkeypatch)
    resumed = clora.run(cfg, tmp_path / "resumed", resume=True)
    for key in ["accuracy_matrix", "metrics", "trainable_parameters"]:
        assert resumed[key] == reference[key], key
    for stage in stages[1:]:
        name = f"stages/{stage.name}/adapter/adapter_model.safetensors"
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
