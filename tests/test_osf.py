"""OSF (orthogonal subspace fine-tuning on PEFT's OSF layer): an update leaves every matrix's preserved
subspace untouched, the preserved rank grows task by task, and a run folder's stage (no-op LoRA +
full-weight deltas) reloads to the same predictions and resumes to the same result."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft.tuners.osf.layer import OSFLayer
from safetensors.torch import load_file

import clora
from clora import continual, lora
from clora.full_weights import DELTAS_FILE, load_stage_model
from clora.methods import StageData, osf
from clora.models import load_model
from conftest import assert_predicts_as_saved, method_stages, tiny_config, write_tiny_benchmark

pytestmark = pytest.mark.usefixtures("without_plots")

OPTIONS = ["full_lr=1e-2"]


def _train(method, model, data: StageData, steps: int) -> None:
    optimizer = method.make_optimizer(model)
    model.train()
    batches = iter(data.make_loader(data.train_items))
    for _ in range(steps):
        model(**next(batches)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _leak(method, model, data: StageData) -> dict[str, tuple[float, float]]:
    """Train one stage and return, per matrix, ||U_k^T dW|| / ||dW|| and ||dW V_k^T|| / ||dW||, with
    U_k, V_k the top-k singular vectors of the weight the stage started from (computed here, not read
    from PEFT)."""
    method.on_task_start(model, data)
    before = {name: p.detach().clone() for name, p in method.full.params.items()}
    _train(method, model, data, steps=3)
    method.on_task_end(model, data, None)
    leaks = {}
    for name, w0 in before.items():
        u, _, vh = torch.linalg.svd(w0.double())
        k = method.ranks[name]
        delta = method.full.params[name].detach().double() - w0.double()
        assert delta.norm() > 1e-3 * w0.norm(), f"{name} did not train"
        leaks[name] = (float((u[:, :k].T @ delta).norm() / delta.norm()),
                       float((delta @ vh[:k].T).norm() / delta.norm()))
    return leaks


@pytest.mark.parametrize("model_name", ["llama", "t5"])
def test_update_leaves_the_preserved_subspace_of_every_matrix_untouched(model_name, tiny_llama, tiny_t5, tiny_bench):
    method, model, data = method_stages({"llama": tiny_llama, "t5": tiny_t5}[model_name], tiny_bench, "osf", OPTIONS)
    first = _leak(method, model, data[0])
    second = _leak(method, model, data[1])  # task 2 starts from task 1's merged weights
    # llama: q, k, v, o, gate, up, down in 2 layers; T5: self-attention q, k, v, o and wi, wo in 2 + 2 blocks
    assert len(first) == {"llama": 14, "t5": 24}[model_name]
    for leaks in (first, second):
        for name, (left, right) in leaks.items():
            assert left < 1e-4 and right < 1e-4, (name, left, right)
    # Exactly one LoRA adapter and no OSF layer left once the task has ended.
    assert not any(isinstance(m, OSFLayer) for m in model.modules())
    assert all(list(layer.lora_A) == [lora.DEFAULT] for layer in lora.lora_layers(model).values())


def test_without_the_post_step_projection_adam_leaks_into_the_preserved_subspace(tiny_llama, tiny_bench, monkeypatch):
    """PEFT's gradient hooks alone do not keep the update out of the preserved subspace under Adam
    (its per-coordinate scaling of a projected gradient is not projected): the reason for
    `keep_in_complement`. If this fails, the hooks became enough and the projection is redundant."""
    method, model, data = method_stages(tiny_llama, tiny_bench, "osf", OPTIONS)
    monkeypatch.setattr(osf, "keep_in_complement", lambda layer, adapter=osf.ADAPTER: None)
    leaks = _leak(method, model, data[0])
    assert max(max(pair) for pair in leaks.values()) > 1e-2


def test_preserved_rank_grows_task_by_task_and_trainable_rank_shrinks(tiny_llama, tiny_bench3):
    p = continual.prepare(tiny_config(tiny_llama, tiny_bench3, "osf", tasks="alpha,beta,gamma",
                                      method_options=["preserve=0.5"]))
    method = p.method
    model = method.attach(load_model(tiny_llama).model)
    ranks, trainable = [], []
    for stage in p.stages:
        data = StageData(stage, p.tasks, [], None, Accelerator(cpu=True), None)
        method.on_task_start(model, data)
        ranks.append(dict(method.ranks))
        trainable.append(sum(q.numel() for q in model.parameters() if q.requires_grad))
        assert trainable[-1] == sum(q.numel() for q in method.trainable())  # only the low subspaces train
        method.on_task_end(model, data, None)
    for name, weight in method.full.params.items():
        m = min(weight.shape)
        # preserve=0.5 over 3 tasks: 1/2, 2/3, 5/6 of min(d)
        assert [r[name] for r in ranks] == [osf.preserved_rank(f, weight.shape) for f in (1 / 2, 2 / 3, 5 / 6)]
        assert ranks[0][name] < ranks[1][name] < ranks[2][name] < m
    assert trainable[0] > trainable[1] > trainable[2]
    # The ranks are the method's state, tensors only.
    again = clora.methods.build_method("osf", method.settings)
    again.load_state_dict(method.state_dict())
    assert again.ranks == ranks[-1]


def test_options_are_checked(tiny_llama, tiny_bench):
    with pytest.raises(clora.errors.UserError, match="preserve"):
        clora.methods.build_method("osf", clora.methods.Settings(), ["preserve=1.0"])
    with pytest.raises(clora.errors.UserError, match="matches no linear layer"):
        method_stages(tiny_llama, tiny_bench, "osf", ["target=nothing_like_this$"])


@pytest.fixture(params=["llama", "t5"])
def osf_run(request, tiny_llama, tiny_t5, tmp_path):
    model = {"llama": tiny_llama, "t5": tiny_t5}[request.param]
    bench = write_tiny_benchmark(tmp_path / "bench", n_train=12, n_test=4)
    cfg = tiny_config(model, bench, "osf", epochs=1, method_options=OPTIONS)
    return model, bench, cfg, tmp_path / "run", clora.run(cfg, tmp_path / "run")


def _stage_dirs(run: Path) -> list[Path]:
    return sorted((run / "stages").iterdir())


def test_stage_reloads_to_the_same_predictions_with_plain_peft_and_deltas(osf_run):
    model_path, bench, cfg, run, result = osf_run
    assert result["status"] == "complete"
    stages = _stage_dirs(run)
    ranks = [load_file(str(s / "method_state.safetensors")) for s in stages]
    assert ranks[0].keys() == ranks[1].keys() and all(ranks[1][k] > ranks[0][k] for k in ranks[0])
    deltas = [load_file(str(s / DELTAS_FILE)) for s in stages]
    assert all((deltas[1][k] - deltas[0][k]).norm() > 0 for k in deltas[0])  # task 2 moved every matrix
    adapter = load_file(str(stages[-1] / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().sum() == 0 for k, v in adapter.items() if "lora_B" in k)  # the LoRA is a no-op
    for stage, row in zip(stages, result["accuracy_matrix"]):
        loaded = load_model(model_path)
        assert_predicts_as_saved(loaded, load_stage_model(loaded.model, stage), stage, result["tasks"], row, bench, cfg)


def test_resume_inside_the_second_task_gives_identical_results(tiny_llama, tmp_path, monkeypatch):
    """Killed at the third batch of task 2, after step checkpoints of its first two steps: the resumed
    run rebuilds the OSF layers from the task-1 stage and loads U_low, S_low, V_low and AdamW's state
    from the checkpoint."""
    from clora import trainer

    bench = write_tiny_benchmark(tmp_path / "bench", n_train=12, n_test=4)
    cfg = tiny_config(tiny_llama, bench, "osf", epochs=1, method_options=OPTIONS, checkpoint_every=1)
    reference = clora.run(cfg, tmp_path / "reference")
    real_loss, calls = trainer.answer_loss, {"n": 0}

    def killed_at_sixth_batch(*args, **kwargs):  # 3 batches per task
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "answer_loss", killed_at_sixth_batch)
    with pytest.raises(KeyboardInterrupt):
        clora.run(cfg, tmp_path / "resumed")
    monkeypatch.setattr(trainer, "answer_loss", real_loss)
    assert list((tmp_path / "resumed" / "in_progress").rglob("step-000002")), "no mid-task checkpoint to resume from"
    resumed = clora.run(cfg, tmp_path / "resumed", resume=True)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    for name in [DELTAS_FILE, "method_state.safetensors"]:
        a = (_stage_dirs(tmp_path / "resumed")[-1] / name).read_bytes()
        b = (_stage_dirs(tmp_path / "reference")[-1] / name).read_bytes()
        assert a == b, name
