"""The training loss is the token mean over answer tokens, with or without computing the prompt
positions' logits, and equals the model's own loss on the same labels."""
import torch
from accelerate import Accelerator

from clora.encoding import Encoder
from clora.loss import answer_loss, supports_logits_to_keep
from clora.models import load_model


def _batch(loaded):
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    examples = [encoder.example("Topic?\nSentence: " + "x" * n + "\nAnswer:", label)
                for n, label in [(3, "alpha"), (11, "b"), (7, "gamma delta")]]
    return encoder.collate_train(examples)


def test_kept_logits_give_the_models_own_loss(tiny_llama):
    loaded = load_model(tiny_llama)
    batch, acc = _batch(loaded), Accelerator(cpu=True)
    assert supports_logits_to_keep(loaded.model)
    reference = loaded.model(**batch).loss
    kept = answer_loss(loaded.model, batch, False, True, acc)
    full = answer_loss(loaded.model, batch, False, False, acc)
    torch.testing.assert_close(kept.loss, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full.loss, reference, rtol=1e-6, atol=1e-6)
    assert kept.finite and abs(kept.mean - reference.item()) < 1e-5
    # The gradient is the same too: the prompt positions' logits carry no loss.
    kept.loss.backward()
    g_kept = loaded.model.lm_head.weight.grad.clone()
    loaded.model.zero_grad()
    reference.backward()
    torch.testing.assert_close(g_kept, loaded.model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_seq2seq_loss_is_the_models_own(tiny_t5):
    loaded = load_model(tiny_t5)
    batch = _batch(loaded)
    reference = loaded.model(**batch).loss
    ours = answer_loss(loaded.model, batch, True, False, Accelerator(cpu=True))
    torch.testing.assert_close(ours.loss, reference, rtol=1e-6, atol=1e-6)


def test_a_nan_loss_is_reported_not_finite(tiny_llama):
    loaded = load_model(tiny_llama)
    with torch.no_grad():
        loaded.model.lm_head.weight[0, 0] = float("nan")
    result = answer_loss(loaded.model, _batch(loaded), False, True, Accelerator(cpu=True))
    assert not result.finite
