"""GORP: the projected gradient and update are orthogonal to the shared space S; S is orthonormal,
covers epsilon of the moment it was built from and grows across tasks; that moment is Adam's first
moment in the full space, each part lifted through the basis it was gathered under (and survives a
reload of the optimizer); with shared_space=false nothing is projected and the full-rank matrices step
as GaLore's; preset=long sets k, T, alpha; the full-rank deltas of task 1 survive later tasks; saved
artefacts (adapter + full deltas) reload to the same predictions; a resumed run ends identical to an
uninterrupted one."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clora
from clora.encoding import Encoder
from clora.errors import UserError
from clora.full_weights import DELTAS_FILE, load_stage_model
from clora.methods import Settings, Stage, StageData, build_method
from clora.models import load_model
from clora.projection import (GaLoreProjection, OrthogonalGaLoreProjection, ProjectedOptimizer, coverage, first_moment,
                              grow_space)
from conftest import assert_predicts_as_saved, tiny_config, write_tiny_benchmark

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


# -- the first moment the shared space is built from

def _toy_optimizer(shape, side, track=True):
    """One matrix in a rank-3 subspace refreshed every 3 steps, on the given side."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape))
    proj = (OrthogonalGaLoreProjection(3, 3, 0.25, None, svd="full") if side == "right"  # GORP's own
            else GaLoreProjection(3, 3, 0.25, proj_type="left", svd="full"))
    opt = ProjectedOptimizer([{"params": [p], "lr": 0.01, "projections": [proj]}], torch.optim.AdamW,
                             lr=0.01, betas=(0.8, 0.99), track_first_moment=track)
    return p, proj, opt


def _toy_grad(step: int, shape) -> torch.Tensor:
    # a different dominant subspace every step, so each refresh picks a new basis
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g)


@pytest.mark.parametrize("side", ["right", "left"])
def test_first_moment_is_the_full_space_moment_of_the_projected_gradients(side):
    """Reference: Adam's EMA kept in the full space, of each step's gradient projected through the basis
    that step used. Lifting the low-rank moment through the latest basis only (the old mapping) is
    wrong once the basis has changed: most of the moment was gathered under earlier bases."""
    shape = (10, 14)
    p, proj, opt = _toy_optimizer(shape, side)
    reference = torch.zeros(shape)
    refreshes = 0
    for step in range(11):  # refreshes at steps 0, 3, 6, 9
        before = proj.basis()
        p.grad = _toy_grad(step, shape)
        opt.step()
        basis = proj.basis()
        refreshes += basis is not before
        kept = p.grad @ basis.T @ basis if side == "right" else basis @ basis.T @ p.grad
        reference = 0.8 * reference + 0.2 * kept
        assert torch.allclose(opt.first_moment(p), reference, rtol=1e-4, atol=1e-6), step
        opt.zero_grad()
    assert refreshes == 4
    moment = opt.inner.state[opt._shadow[p]]["exp_avg"]
    latest_only = proj.lift(moment, proj.basis())
    assert (latest_only - reference).norm() > 0.3 * reference.norm()
    assert torch.allclose(first_moment(opt, p), reference, rtol=1e-4, atol=1e-6)


def test_first_moment_survives_a_reload_of_the_optimizer_and_needs_tracking():
    shape = (10, 14)
    p, proj, opt = _toy_optimizer(shape, "right")
    for step in range(5):  # past the refresh at step 3: a carry exists
        p.grad = _toy_grad(step, shape)
        opt.step()
    state = opt.state_dict()
    assert "moment_carry" in state["projections"][0]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    copy_p, _, reloaded = _toy_optimizer(shape, "right")
    with torch.no_grad():
        copy_p.copy_(p)
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(reloaded.first_moment(copy_p), opt.first_moment(p))  # before any new step
    for step in range(5, 8):  # across the refresh at step 6
        for q, o in ((p, opt), (copy_p, reloaded)):
            q.grad = _toy_grad(step, shape)
            o.step()
    assert torch.equal(reloaded.first_moment(copy_p), opt.first_moment(p))

    untracked_p, _, untracked = _toy_optimizer(shape, "right", track=False)
    untracked_p.grad = _toy_grad(0, shape)
    untracked.step()
    with pytest.raises(RuntimeError, match="track_first_moment"):
        untracked.first_moment(untracked_p)


def test_gorp_builds_its_space_from_the_full_space_moment(tiny_llama):
    """GORP's own optimizer: the moment its shared space is grown from, for every full-rank matrix, is
    the full-space EMA of the projected gradients, across the refreshes of update_gap=2."""
    loaded = load_model(tiny_llama)
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    batches = [encoder.collate_train([encoder.example(f"Topic?\n{c}{i}{j}", c) for i, c in enumerate("xyyx")])
               for j in range(5)]
    torch.manual_seed(0)
    method = build_method("gorp", Settings(rank=4, lr=1e-2), OPTIONS)
    model = method.attach(loaded.model)
    method.on_task_start(model, _data(0))
    optimizer = method.make_optimizer(model)
    full = {k: p for k, p in method.protected(model).items() if k.startswith("full|")}
    beta1 = optimizer.inner.defaults["betas"][0]
    reference = {k: torch.zeros_like(p) for k, p in full.items()}
    for batch in batches:  # refreshes at steps 0, 2, 4
        model(**batch).loss.backward()
        method.before_optimizer_step(model, optimizer)
        optimizer.step()
        for k, p in full.items():
            basis = optimizer.projections[p].basis()
            reference[k] = beta1 * reference[k] + (1 - beta1) * p.grad @ basis.T @ basis
        optimizer.zero_grad()
    for k, p in full.items():
        moment = first_moment(optimizer, p)
        assert torch.allclose(moment, reference[k], rtol=1e-4, atol=1e-7), k
        latest_only = optimizer.inner.state[optimizer._shadow[p]]["exp_avg"] @ optimizer.projections[p].basis()
        assert (latest_only - reference[k]).norm() > 0.05 * reference[k].norm(), k
    method.on_task_end(model, _data(0), optimizer)
    for k in full:
        assert coverage(method.spaces[k], reference[k]) >= 0.9 - 1e-5, k


# -- the ablation without the shared space, and the long preset

def _task_one(tiny_llama, options, steps=3):
    loaded = load_model(tiny_llama)
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    batch = encoder.collate_train([encoder.example(f"Topic?\n{c}{i}", c) for i, c in enumerate("xyxy")])
    torch.manual_seed(0)
    method = build_method(*options)
    model = method.attach(loaded.model)
    method.on_task_start(model, _data(0))
    optimizer = method.make_optimizer(model)
    for _ in range(steps):
        model(**batch).loss.backward()
        method.before_optimizer_step(model, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    method.on_task_end(model, _data(0), optimizer)
    return method, model, batch


def test_without_the_shared_space_nothing_is_projected(tiny_llama):
    """shared_space=false: task 1 trains exactly as with it (there is no S yet), no S is kept, task 2's
    gradients reach the optimizer untouched -- including their part in the S the full method would
    protect -- and the full-rank matrices take GaLore's step."""
    on, on_model, batch = _task_one(tiny_llama, ("gorp", Settings(rank=4, lr=1e-2), OPTIONS))
    off, off_model, _ = _task_one(tiny_llama, ("gorp", Settings(rank=4, lr=1e-2), OPTIONS + ["shared_space=false"]))
    for (name, a), (_, b) in zip(on_model.named_parameters(), off_model.named_parameters()):
        assert torch.equal(a, b), name
    assert on.spaces and not off.spaces and off.state_dict() == {}

    for method, model in ((on, on_model), (off, off_model)):
        method.on_task_start(model, _data(1))
    off_opt = off.make_optimizer(off_model)
    on_protected, off_protected = on.protected(on_model), off.protected(off_model)
    for key, a in off_protected.items():  # no orthogonal start either: the new A reads S's directions
        if key.startswith("lora_A|"):
            assert (a @ on.spaces[key]).norm() > 1e-3 * a.norm(), key
    off_model(**batch).loss.backward()
    raw = {k: p.grad.clone() for k, p in off_protected.items() if p.grad is not None and p.grad.norm() > 0}
    assert any(k.startswith("full|") for k in raw)
    off.before_optimizer_step(off_model, off_opt)
    for key, grad in raw.items():
        assert torch.equal(off_protected[key].grad, grad), key
        assert (grad @ on.spaces[key]).norm() > 1e-3 * grad.norm(), key  # what the full method removes
    on_model(**batch).loss.backward()
    on.before_optimizer_step(on_model, on.make_optimizer(on_model))
    for key in raw:
        projected = on_protected[key].grad
        assert (projected @ on.spaces[key]).norm() <= 1e-5 * projected.norm(), key

    # the full-rank step is GaLore's on the same gradient
    galore = build_method("galore", Settings(rank=4, lr=1e-2), OPTIONS)
    galore_model = galore.attach(load_model(tiny_llama).model)
    galore.on_task_start(galore_model, _data(1))
    with torch.no_grad():
        for name, p in galore.full.params.items():
            p.copy_(off.full.params[name])
            p.grad = off.full.params[name].grad.clone()
    before = {name: p.detach().clone() for name, p in off.full.params.items()}
    galore_opt = galore.make_optimizer(galore_model)
    off_opt.step()
    galore_opt.step()
    for name, p in off.full.params.items():
        change = p.detach() - before[name]
        assert change.norm() > 0, name
        assert torch.allclose(galore.full.params[name], p, rtol=0, atol=1e-7), name
        assert (change @ on.spaces[f"full|{name}"]).norm() > 1e-3 * change.norm(), name


def test_long_preset_sets_rank_gap_and_scale():
    for name in ("gorp", "galore"):
        options = build_method(name, Settings(), ["preset=long"]).options
        assert (options.rank, options.update_gap, options.scale) == (32, 20, 0.25)
        standard = build_method(name, Settings(), []).options
        assert (standard.rank, standard.update_gap, standard.scale) == (8, 10, 1.0)
        with pytest.raises(UserError, match="preset=long sets rank, update_gap and scale; drop rank"):
            build_method(name, Settings(), ["preset=long", "rank=16"])
    with pytest.raises(UserError, match="preset"):
        build_method("gorp", Settings(), ["preset=huge"])


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
        assert_predicts_as_saved(loaded, load_stage_model(loaded.model, stage_dir), stage_dir, result["tasks"], row,
                                 bench, cfg)


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
