"""LoRA bookkeeping: folding a new adapter into the frozen one keeps the function it computes, and a
grown adapter saves and reloads with plain PEFT."""
from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from clora import lora


def _randomise(params):
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5)


def test_fold_new_adapter_preserves_outputs_and_reloads(tiny_llama, tmp_path):
    torch.manual_seed(0)
    model = lora.attach_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), lora.lora_config(4, 8, 0.0, None))
    _randomise(lora.adapter_parameters(model))
    x = torch.randint(3, 200, (2, 12))
    trainable = lora.start_new_adapter(model, lora.lora_config(4, 16, 0.0, None))  # other scaling on purpose
    assert all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for p in lora.adapter_parameters(model, lora.DEFAULT))
    _randomise(trainable)
    model.eval()
    with torch.no_grad():
        both = model(input_ids=x).logits
    lora.fold_new_adapter(model)
    assert list(model.peft_config) == [lora.DEFAULT] and model.peft_config[lora.DEFAULT].r == 8
    with torch.no_grad():
        folded = model(input_ids=x).logits
    torch.testing.assert_close(folded, both, rtol=1e-5, atol=1e-5)

    lora.save_adapter(model, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "adapter"))
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, folded, rtol=1e-5, atol=1e-5)

    fresh = lora.attach_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), lora.lora_config(4, 8, 0.0, None))
    lora.load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, folded, rtol=0, atol=0)


def test_saved_target_modules_do_not_depend_on_set_order(tiny_llama, tmp_path, monkeypatch):
    """PEFT writes target_modules from a set, so two processes may write them in two orders; the saved
    adapter_config.json must be the same bytes either way (a resumed run's adapter folder equals an
    uninterrupted run's)."""
    import dataclasses
    import json

    from peft import LoraConfig

    model = lora.attach_lora(AutoModelForCausalLM.from_pretrained(tiny_llama),
                             lora.lora_config(4, 8, 0.0, ["q_proj", "v_proj", "k_proj"]))
    written = []
    for order in (["v_proj", "q_proj", "k_proj"], ["k_proj", "q_proj", "v_proj"]):
        # what to_dict hands PEFT's writer in a process whose string hashing gives this set order
        monkeypatch.setattr(LoraConfig, "to_dict",
                            lambda self, order=order: {**dataclasses.asdict(self), "target_modules": order})
        lora.save_adapter(model, tmp_path / "-".join(order))
        written.append((tmp_path / "-".join(order) / "adapter_config.json").read_bytes())
    assert written[0] == written[1]
    assert json.loads(written[0])["target_modules"] == ["k_proj", "q_proj", "v_proj"]
