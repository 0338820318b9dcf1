"""GORP: the projected gradient and update are orthogonal to the shared space S; S is orthonormal,
covers epsilon of the moment it was built from and grows across tasks; the full-rank deltas of task 1
survive later tasks; saved artefacts (adapter + full deltas) reload to the same predictions; a resumed
run ends identical to an uninterrupted one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import clora
from clora.benchmark import Benchmark
from clora.encoding import Encoder
from clora.errors import UserError
from clora.evaluation import evaluate_task
from clora.full_weights import DELTAS_FILE, load_stage_model
from clora.methods import Settings, Stage, StageData, build_method
from clora.models import load_model
from clora.projection import coverage, first_moment, grow_space
from conftest import tiny_config, write_tiny_benchmark

OPTIONS = ["full_lr=1e-2", "update_gap=2", "rank=4"]


pytestmark = pytest.mark.usefixtures("without_plots")


def _three_task_bench(root: Path) -> Path:
    write_tiny_benchmark(root, n_train=12, n_test=4)
    shutil.copytree(root / "TC" / "alpha", root / "TC" / "gamma")
    (root / "TC" / "gamma" / "labels.json").write_text(json.dumps(["p", "q"]))
    for split in ("train", "test"):
        path = root / "TC" / "gamma" / f"{split}.json"
        items = [{"sentence": f"p{i}" if i % 2 == 0 else f"q{i}", "label": "pq"[i % 2]}
                 for i in range(len(json.loads(path.read_text())))]
        path.write_text(json.dumps(items))
    return root


def _config(model: str, bench: Path, **overrides):
    values = dict(tasks="alpha,beta,gamma", epochs=1, method_options=OPTIONS)
    values.update(overrides)
    return tiny_config(model, bench, "gorp", **values)


@pytest.fixture(scope="module")
def gorp_run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gorp")
    bench = _three_task_bench(root / "bench")
    result = clora.run(_config(tiny_llama, bench), root / "run")
    return root / "run", bench, result


def _stages(run: Path) -> list[Path]:
    return sorted((run / "stages").iterdir())


def _spaces(stage: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("space|"): v for k, v in load_file(str(stage / "method_state.safetensors")).items()}


# -- unit: S and the projections, driving the hooks by hand on a tiny model

def _data(index: int) -> StageData:
    return StageData(Stage(index, f"t{index}", [f"t{index}"]), {}, [], None, None, None)


@pytest.fixture(params=["llama", "t5"])
def driven(request, tiny_llama, tiny_t5):
    """A GORP method attached to a tiny model, task 1 trained by hand, and a training batch."""
    loaded = load_model({"llama": tiny_llama, "t5": tiny_t5}[request.param])
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    batch = encoder.collate_train([encoder.example(f"Topic?\n{c}{i}", c) for i, c in enumerate("xyxy")])
    torch.manual_seed(0)
    method = build_method("gorp", Settings(rank=4, lr=1e-2), OPTIONS)
    model = method.attach(loaded.model)
    method.on_task_start(model, _data(0))
    optimizer = method.make_optimizer(model)
    for _ in range(3):
        model(**batch).loss.backward()
        method.before_optimizer_step(model, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    moments = {k: first_moment(optimizer, p).clone() for k, p in method.protected(model).items()}
    method.on_task_end(model, _data(0), optimizer)
    return method, model, batch, moments


def test_space_is_orthonormal_and_covers_epsilon_and_projection_is_orthogonal_to_it(driven):
    method, model, batch, moments = driven
    assert {k.split("|")[0] for k in method.spaces} == {"lora_A", "full"}
    assert set(method.spaces) == set(moments)
    for key, space in method.spaces.items():
        assert torch.allclose(space.T @ space, torch.eye(space.shape[1]), atol=1e-5), key
        assert coverage(space, moments[key]) >= 0.9 - 1e-6, key
        # minimal: one direction fewer would not reach epsilon
        assert space.shape[1] == 1 or coverage(space[:, :-1], moments[key]) < 0.9, key

    # task 2: the gradient, and the update Adam makes of it, are orthogonal to S
    method.on_task_start(model, _data(1))
    optimizer = method.make_optimizer(model)
    protected = method.protected(model)
    for key, p in protected.items():  # orthogonal_init: the new LoRA's A starts orthogonal to S
        if key.startswith("lora_A|"):
            assert (p @ method.spaces[key]).norm() <= 1e-5 * p.norm(), key
    before = {k: p.detach().clone() for k, p in protected.items()}
    checked = set()
    for _ in range(2):  # step 1 moves the new B (zero at start), step 2 the new A too
        model(**batch).loss.backward()
        raw = {k: p.grad.clone() for k, p in protected.items() if p.grad is not None and p.grad.norm() > 0}
        method.before_optimizer_step(model, optimizer)
        for key, grad in raw.items():
            space, projected = method.spaces[key], protected[key].grad
            assert (grad @ space).norm() > 1e-3 * grad.norm(), key  # there was something to remove
            assert (projected @ space).norm() <= 1e-5 * projected.norm(), key
            checked.add(key)
        optimizer.step()
        optimizer.zero_grad()
    assert checked == set(protected)
    for key, p in protected.items():
        change = p.detach() - before[key]
        assert change.norm() > 0, key
        # the weights' action on span(S) is unchanged: Adam's scaling does not leak back into S
        assert (change @ method.spaces[key]).norm() <= 1e-5 * change.norm(), key


def test_grow_space_keeps_old_columns_and_reaches_epsilon():
    torch.manual_seed(0)
    moment = torch.randn(20, 4) @ torch.randn(4, 12) + 0.01 * torch.randn(20, 12)
    first = grow_space(None, moment, 0.9)
    assert coverage(first, moment) >= 0.9 and coverage(first[:, :-1], moment) < 0.9
    other = torch.randn(20, 3) @ torch.randn(3, 12)
    grown = grow_space(first, other, 0.95)
    assert torch.equal(grown[:, :first.shape[1]], first)
    assert torch.allclose(grown.T @ grown, torch.eye(grown.shape[1]), atol=1e-5)
    assert coverage(grown, other) >= 0.95
    assert grow_space(grown, moment, 0.9) is grown  # already covered: nothing added
    assert grow_space(grown, torch.zeros(5, 12), 0.9) is grown
    full = grow_space(None, torch.randn(30, 12), 1.0)
    assert full.shape == (12, 12) and grow_space(full, torch.randn(30, 12), 1.0) is full


def test_bad_options_are_user_errors(tiny_llama):
    with pytest.raises(UserError, match="epsilon"):
        build_method("gorp", Settings(), ["epsilon=1.5"])
    with pytest.raises(UserError, match="regular expression"):
        build_method("gorp", Settings(), ["full_pattern=mlp.(gate"])
    with pytest.raises(UserError, match="svd"):
        build_method("galore", Settings(), ["svd=exact"])
    method = build_method("gorp", Settings(), ["full_pattern=nothing_matches_this"])
    with pytest.raises(UserError, match="full_pattern"):
        method.attach(load_model(tiny_llama).model)


# -- end to end on the three-task run

def test_space_grows_across_tasks(gorp_run):
    run, _, result = gorp_run
    assert result["status"] == "complete"
    spaces = [_spaces(stage) for stage in _stages(run)]
    assert len(spaces) == 3 and set(spaces[0]) == set(spaces[2])
    grew = 0
    for key in spaces[0]:
        widths = [s[key].shape[1] for s in spaces]
        assert widths == sorted(widths), key
        grew += widths[2] > widths[0]
        for earlier, later in zip(spaces, spaces[1:]):  # old directions are kept exactly
            assert torch.equal(later[key][:, :earlier[key].shape[1]], earlier[key]), key
        assert torch.allclose(spaces[2][key].T @ spaces[2][key], torch.eye(widths[2]), atol=1e-5)
    assert grew == len(spaces[0])


def _check_task_one_is_protected(stages: list[Path], lora_rank: int) -> None:
    """Task 1's full-rank delta survives later tasks, and its action on task 1's shared space S1 is
    untouched by them; later tasks' LoRA A rows are orthogonal to S1."""
    deltas = [load_file(str(stage / DELTAS_FILE)) for stage in stages]
    space1 = _spaces(stages[0])
    assert set(deltas[0]) == {k.removeprefix("full|") for k in space1 if k.startswith("full|")}
    for name in deltas[0]:
        first, last = deltas[0][name], deltas[-1][name]
        s1 = space1[f"full|{name}"]
        for earlier, later in zip(deltas, deltas[1:]):  # every task moved the matrix...
            assert (later[name] - earlier[name]).norm() > 0
        assert not torch.allclose(last, last - deltas[-2][name])  # ...and W_T - W0 is not just W_T - W_T-1
        assert (first @ s1).norm() > 0
        assert (last @ s1 - first @ s1).norm() <= 1e-4 * (first @ s1).norm(), name
    adapter = load_file(str(stages[-1] / "adapter" / "adapter_model.safetensors"))
    a_factors = {k.rsplit(".lora_A", 1)[0]: a for k, a in adapter.items() if ".lora_A." in k}
    assert a_factors
    for layer, a in a_factors.items():
        assert a.shape[0] == len(stages) * lora_rank  # one LoRA per task, concatenated
        later_rows = a[lora_rank:]
        assert (later_rows @ space1[f"lora_A|{layer}"]).norm() <= 1e-4 * later_rows.norm(), layer


def test_task_one_is_protected_through_task_three(gorp_run):
    _check_task_one_is_protected(_stages(gorp_run[0]), lora_rank=4)


def test_saved_artefacts_reload_with_the_same_predictions(gorp_run, tiny_llama):
    run, bench, result = gorp_run
    cfg = _config(tiny_llama, bench)
    stages = _stages(run)
    for stage_dir, row in [(stages[0], result["accuracy_matrix"][0]), (stages[-1], result["accuracy_matrix"][-1])]:
        loaded = load_model(tiny_llama)
        model = load_stage_model(loaded.model, stage_dir)
        encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder, cfg.max_prompt_tokens)
        for task, accuracy in zip(result["tasks"], row):
            if accuracy is None:
                continue
            saved = [json.loads(line) for line in (stage_dir / "predictions" / f"{task}.jsonl").read_text().splitlines()]
            again = evaluate_task(model, encoder, Benchmark(bench).load_task(task), Accelerator(cpu=True),
                                  cfg.eval_batch_size).predictions
            assert [p["prediction"] for p in again] == [p["prediction"] for p in saved]
            assert 100.0 * sum(p["correct"] for p in again) / len(again) == accuracy


def test_resume_gives_identical_results(gorp_run, tiny_llama, tmp_path):
    """A run killed after stage 2 (its committed stages copied, the third removed) resumes from what
    it saved -- S, full deltas, adapter -- and ends byte-identical to the uninterrupted run."""
    reference_dir, bench, reference = gorp_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(reference_dir, resumed_dir)
    shutil.rmtree(_stages(resumed_dir)[-1])
    resumed = clora.run(_config(tiny_llama, bench), resumed_dir, resume=True)
    for key in ["accuracy_matrix", "metrics", "rouge1_last_row", "trainable_parameters"]:
        assert resumed[key] == reference[key], key
    ours, theirs = _stages(resumed_dir)[-1], _stages(reference_dir)[-1]
    for name in ["adapter/adapter_model.safetensors", "method_state.safetensors", DELTAS_FILE]:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    for p in sorted((theirs / "predictions").iterdir()):
        assert (ours / "predictions" / p.name).read_text() == p.read_text()


def test_gorp_trains_on_t5(tiny_t5, tmp_path):
    bench = write_tiny_benchmark(tmp_path / "bench", n_train=12, n_test=4)
    out = tmp_path / "run"
    result = clora.run(tiny_config(tiny_t5, bench, "gorp", epochs=1, method_options=OPTIONS), out)
    assert result["status"] == "complete"
    last = _stages(out)[-1]
    deltas = load_file(str(last / DELTAS_FILE))
    assert deltas and all("decoder." in k and "EncDecAttention" in k for k in deltas)
    assert all(d.norm() > 0 for d in deltas.values())
    assert {k.split("|")[0] for k in _spaces(last)} == {"lora_A", "full"}
    _check_task_one_is_protected(_stages(out), lora_rank=4)
