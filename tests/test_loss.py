"""The training loss is the token mean over answer tokens, with or without computing the prompt
positions' logits, and equals the model's own loss on the same labels."""
import torch
from accelerate import Accelerator

from clora.encoding import Encoder
from clora.loss import answer_loss, shared_prefix, supports_logits_to_keep
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


def _shared_batch(loaded, header="Classify the topic of the sentence below.\nSentence: "):
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    examples = [encoder.example(header + "x" * n + "\nAnswer:", label)
                for n, label in [(3, "alpha"), (11, "b"), (7, "gamma delta"), (5, "b")]]
    return encoder.collate_train(examples)


def test_a_shared_prefix_computed_once_gives_the_same_loss_and_gradients(tiny_llama):
    from peft import LoraConfig, get_peft_model

    loaded = load_model(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch, acc = _shared_batch(loaded), Accelerator(cpu=True)
    first_answer = int((batch["labels"][:, 1:] != -100).any(0).nonzero()[0])
    assert shared_prefix(batch, first_answer) >= len("Classify the topic")  # ByT5: a token per byte

    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: embedded.append(args[0].numel()))

    def loss_and_grads(share: bool):
        model.zero_grad()
        embedded.clear()
        result = answer_loss(model, batch, False, True, acc, share_prefix=share)
        result.loss.backward()
        return result.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (shared, g_shared), positions_shared = loss_and_grads(True), sum(embedded)
    (whole, g_whole), positions_whole = loss_and_grads(False), sum(embedded)
    rows, width = batch["input_ids"].shape
    prefix = shared_prefix(batch, first_answer)
    assert (positions_whole, positions_shared) == (rows * width, prefix + rows * (width - prefix))
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-6)
    assert g_whole and set(g_shared) == set(g_whole)
    for name in g_whole:  # the LoRA of the prefix's own positions gets its gradient through the cache
        assert g_whole[name].abs().sum() > 0
        torch.testing.assert_close(g_shared[name], g_whole[name], rtol=1e-4, atol=1e-6)


def test_the_shared_prefix_stops_before_the_first_loss_position_and_needs_two_rows(tiny_llama):
    loaded = load_model(tiny_llama)
    batch = _shared_batch(loaded)
    width = batch["input_ids"].shape[1]
    assert shared_prefix(batch, 12) == 12  # capped where the first answer token's logits are needed
    assert shared_prefix(batch, 5) == 0  # too short to pay
    one_row = {k: v[:1] for k, v in batch.items()}
    assert shared_prefix(one_row, width) == 0
    differs = {k: v.clone() for k, v in batch.items()}
    differs["input_ids"][1, 10] += 1
    assert shared_prefix(differs, width) == 10
