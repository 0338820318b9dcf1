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
