"""GaLore baseline and the projected optimizer: the wrapper around any torch optimizer reproduces
galore-torch's own AdamW; its state is tensors and survives a reload; GaLore trains the chosen
full-rank matrices on tiny Llama and T5, saves their deltas, and the artefacts reload to the same
predictions; a resumed run ends identical."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from galore_torch import GaLoreAdamW
from safetensors.torch import load_file

import clora
from clora.full_weights import DELTAS_FILE, load_stage_model
from clora.models import load_model
from clora.projection import GaLoreProjection, ProjectedOptimizer, randomized_svd
from conftest import assert_predicts_as_saved, tiny_config, write_tiny_benchmark

OPTIONS = ["full_lr=1e-2", "update_gap=2", "rank=4"]


pytestmark = pytest.mark.usefixtures("without_plots")


def _matrices() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(12, 6)), torch.nn.Parameter(torch.randn(5, 9)),
            torch.nn.Parameter(torch.randn(7))]


def _grads(step: int, params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _ours(params, rank=3, gap=2, scale=0.5, svd="full"):
    groups = [{"params": params[:2], "lr": 0.01,
               "projections": [GaLoreProjection(rank, gap, scale, svd=svd) for _ in params[:2]]},
              {"params": params[2:], "lr": 0.01}]
    return ProjectedOptimizer(groups, torch.optim.AdamW, lr=0.01, eps=1e-6, weight_decay=0.0)


def test_projected_optimizer_reproduces_galore_torch_adamw():
    ours_p, theirs_p = _matrices(), _matrices()
    ours = _ours(ours_p)
    theirs = GaLoreAdamW([{"params": theirs_p[:2], "rank": 3, "update_proj_gap": 2, "scale": 0.5, "proj_type": "std"},
                          {"params": theirs_p[2:]}], lr=0.01, eps=1e-6, weight_decay=0.0, no_deprecation_warning=True)
    for step in range(5):  # subspace refreshed at steps 0, 2 and 4
        for params, opt in ((ours_p, ours), (theirs_p, theirs)):
            for p, g in zip(params, _grads(step, params)):
                p.grad = g.clone()
            opt.step()
            opt.zero_grad()
    for a, b in zip(ours_p, theirs_p):
        # torch's AdamW adds eps to sqrt(v_hat), galore-torch's to sqrt(v): equal up to eps
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert ours.inner.state[ours._shadow[ours_p[0]]]["exp_avg"].shape == (12, 3)  # moments at low rank
    assert ours.inner.state[ours._shadow[ours_p[1]]]["exp_avg"].shape == (3, 9)


def test_randomized_svd_finds_the_top_subspace():
    torch.manual_seed(0)
    for shape in [(96, 40), (40, 96)]:
        grad = torch.randn(shape[0], 6) @ torch.diag(torch.linspace(10, 5, 6)) @ torch.randn(6, shape[1])
        grad += 0.05 * torch.randn(shape)
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
        ru, rs, rvh = randomized_svd(grad, 6)
        assert torch.allclose(rs, s[:6], rtol=1e-4)
        assert torch.allclose(torch.linalg.svdvals(vh[:6] @ rvh.T), torch.ones(6), atol=1e-4)
        assert torch.allclose(torch.linalg.svdvals(u[:, :6].T @ ru), torch.ones(6), atol=1e-4)
        state = torch.get_rng_state()
        randomized_svd(grad, 6)
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG stream is untouched


def test_projected_optimizer_state_is_tensors_and_reloads():
    params = _matrices()
    opt = _ours(params, svd="randomized")
    for step in range(3):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()
    state = opt.state_dict()

    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x
    assert all(isinstance(v, (torch.Tensor, int, float, bool, str, type(None))) for v in leaves(state))

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reloaded = _ours(copies, svd="randomized")
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))  # loads without unpickling objects
    for step in range(3, 5):  # step 4 refreshes the subspace: the step counter came back too
        for group in ((params, opt), (copies, reloaded)):
            for p, g in zip(group[0], _grads(step, group[0])):
                p.grad = g
            group[1].step()
    for a, b in zip(params, copies):
        assert torch.equal(a, b)


@pytest.fixture(params=["llama", "t5"])
def galore_run(request, tiny_llama, tiny_t5, tmp_path):
    model = {"llama": tiny_llama, "t5": tiny_t5}[request.param]
    bench = write_tiny_benchmark(tmp_path / "bench", n_train=12, n_test=4)
    cfg = tiny_config(model, bench, "galore", epochs=1, method_options=OPTIONS)
    result = clora.run(cfg, tmp_path / "run")
    return model, bench, cfg, tmp_path / "run", result


def _stages(run: Path) -> list[Path]:
    return sorted((run / "stages").iterdir())


def test_galore_trains_full_matrices_and_reloads_exactly(galore_run):
    model_path, bench, cfg, run, result = galore_run
    assert result["status"] == "complete"
    stages = _stages(run)
    deltas = [load_file(str(s / DELTAS_FILE)) for s in stages]
    assert result["trainable_parameters"] == [sum(d.numel() for d in deltas[0].values())] * 2
    for name in deltas[0]:
        first, last = deltas[0][name], deltas[1][name]
        assert first.norm() > 0 and (last - first).norm() > 0
        assert not torch.allclose(last, last - first)  # task 1's delta is still in the saved one
    adapter = load_file(str(stages[-1] / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().sum() == 0 for k, v in adapter.items() if "lora_B" in k)  # the frozen LoRA is a no-op

    loaded = load_model(model_path)
    assert_predicts_as_saved(loaded, load_stage_model(loaded.model, stages[-1]), stages[-1], result["tasks"],
                             result["accuracy_matrix"][-1], bench, cfg)


def test_galore_resume_gives_identical_results(galore_run, tmp_path):
    model_path, bench, cfg, run, reference = galore_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run, resumed_dir)
    shutil.rmtree(_stages(resumed_dir)[-1])
    resumed = clora.run(cfg, resumed_dir, resume=True)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert (_stages(resumed_dir)[-1] / DELTAS_FILE).read_bytes() == (_stages(run)[-1] / DELTAS_FILE).read_bytes()


def test_full_weights_commit_makes_saved_deltas_reproduce_the_weights_exactly(tiny_llama, tmp_path):
    from clora.full_weights import FullWeights, apply_deltas

    model = load_model(tiny_llama).model
    full = FullWeights(model, r"mlp\.gate_proj$")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in full.parameters():  # updates of all sizes, some far below the weights' resolution
            p.add_(torch.randn_like(p) * torch.logspace(-12, 0, p.numel()).reshape(p.shape))
    full.commit()
    committed = {name: p.detach().clone() for name, p in full.params.items()}
    full.save(tmp_path)
    fresh = load_model(tiny_llama).model
    apply_deltas(fresh, tmp_path)
    params = dict(fresh.named_parameters())
    for name, weight in committed.items():
        assert torch.equal(params[name], weight), name
    again = FullWeights(load_model(tiny_llama).model, r"mlp\.gate_proj$")
    again.load(tmp_path)
    for name, weight in committed.items():
        assert torch.equal(again.params[name], weight), name
