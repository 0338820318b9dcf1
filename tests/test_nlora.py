"""N-LoRA (IncLoRA + an L1 penalty on the new task's update s B A): the blocked L1 term and its
gradient equal the direct ones, the penalty moves the update towards sparsity, the old tasks' LoRAs
stay frozen, and the saved adapter reloads with plain PEFT to the same predictions."""
from __future__ import annotations


import pytest
import torch

import clora
from clora import lora
from clora.methods import Settings, StageData, build_method
from clora.methods.n_lora import l1_of_product, update_l1
from conftest import method_stages

pytestmark = pytest.mark.usefixtures("without_plots")


@pytest.mark.parametrize("block_rows", [1, 7, 64])
def test_blocked_l1_and_its_gradient_equal_the_direct_computation(block_rows):
    torch.manual_seed(0)
    b = torch.randn(37, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, 23, dtype=torch.float64, requires_grad=True)
    blocked = l1_of_product(b, a, block_rows)
    blocked.backward()
    grads = b.grad.clone(), a.grad.clone()
    b.grad = a.grad = None
    direct = (b @ a).abs().sum()
    direct.backward()
    assert blocked.item() == pytest.approx(direct.item(), rel=1e-12)
    assert torch.allclose(grads[0], b.grad, atol=1e-10) and torch.allclose(grads[1], a.grad, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x, y: l1_of_product(x, y, block_rows), (b.detach().requires_grad_(),
                                                                                    a.detach().requires_grad_()))


def _train_stage(method, model, data: StageData, steps: int) -> None:
    """The trainer's loss: task loss plus the method's penalty, through the method's optimizer."""
    method.on_task_start(model, data)
    optimizer = method.make_optimizer(model)
    model.train()
    batches = iter(data.make_loader(data.train_items))
    for _ in range(steps):
        loss = model(**next(batches)).loss
        penalty = method.penalty(model)
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _new_update_norms(model, adapter: str) -> tuple[float, float]:
    """||dW||_1 and ||dW||_2 (Frobenius) of the adapter's update over all layers."""
    with torch.no_grad():
        l2 = sum(float((layer.scaling[adapter] * (lora.factors(layer, adapter)[1] @ lora.factors(layer, adapter)[0]))
                       .square().sum()) for layer in lora.lora_layers(model).values())
        return float(update_l1(model, adapter)), l2 ** 0.5


def test_l1_penalty_makes_the_new_update_sparser_than_without_it(tiny_llama, tiny_bench):
    """Same seed, data and steps for task 2; only lambda1 differs. Smaller in L1, and sparser in the
    scale-free sense too (a lower ||dW||_1 / ||dW||_2), not only shrunk."""
    l1, ratio = {}, {}
    for lam in (0.0, 0.05):
        method, model, data = method_stages(tiny_llama, tiny_bench, "n-lora", [f"lambda1={lam}"], seed=0)
        _train_stage(method, model, data[0], steps=3)
        method.on_task_end(model, data[0], None)
        torch.manual_seed(1)
        _train_stage(method, model, data[1], steps=5)
        l1[lam], l2 = _new_update_norms(model, lora.NEW)
        assert l1[lam] > 0
        ratio[lam] = l1[lam] / l2
    assert l1[0.05] < 0.5 * l1[0.0], l1
    assert ratio[0.05] < 0.95 * ratio[0.0], ratio


def test_penalty_is_lambda_times_the_l1_of_the_scaled_update_and_old_loras_stay_frozen(tiny_llama, tiny_bench):
    method, model, data = method_stages(tiny_llama, tiny_bench, "n-lora", ["lambda1=0.05"], seed=0)
    _train_stage(method, model, data[0], steps=2)
    method.on_task_end(model, data[0], None)
    old = {name: [t.detach().clone() for t in lora.factors(layer)] for name, layer in lora.lora_layers(model).items()}
    _train_stage(method, model, data[1], steps=3)

    expected = 0.0
    for name, layer in lora.lora_layers(model).items():
        a, b = lora.factors(layer, lora.NEW)
        expected += (layer.scaling[lora.NEW] * (b @ a)).abs().sum().item()
        # The old LoRA ("default") neither trains nor moves while task 2 trains.
        assert not any(t.requires_grad for t in lora.factors(layer))
        assert all(torch.equal(before, now) for before, now in zip(old[name], lora.factors(layer)))
    assert method.penalty(model).item() == pytest.approx(0.05 * expected, rel=1e-5)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.adapter_parameters(model, lora.NEW)}


def test_orthogonality_term_is_added_only_when_asked(tiny_llama, tiny_bench):
    method, model, data = method_stages(tiny_llama, tiny_bench, "n-lora", ["lambda1=0", "lambda_orth=0.5"], seed=0)
    _train_stage(method, model, data[0], steps=1)
    method.on_task_end(model, data[0], None)
    method.on_task_start(model, data[1])
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_A[lora.NEW].weight.copy_(layer.lora_A[lora.DEFAULT].weight)  # maximally overlapping
    expected = sum(0.5 * (lora.factors(l)[0] @ lora.factors(l, lora.NEW)[0].T).abs().sum().item()
                   for l in lora.lora_layers(model).values())
    assert expected > 0 and method.penalty(model).item() == pytest.approx(expected, rel=1e-5)
    plain = build_method("n-lora", Settings(), ["lambda1=0"])
    plain.adapter = lora.NEW
    assert plain.penalty(model) is None


def test_bad_options_are_refused():
    with pytest.raises(clora.errors.UserError, match="lambda1"):
        build_method("n-lora", Settings(), ["lambda1=-1"])
    with pytest.raises(clora.errors.UserError, match="block_rows"):
        build_method("n-lora", Settings(), ["block_rows=0"])
