"""Evaluation reuses the KV cache of the prompts' shared prefix: the same predictions on every item as
prefilling each whole prompt, with fewer positions computed."""
from __future__ import annotations

import torch

from clora.encoding import Encoder
from clora.evaluation import generate, generation_batches, shared_prefix_length
from clora.methods import Settings, build_method
from clora.models import load_model

HEADER = "Task:TC\nDataset:toy\nWhich topic is it? Option: alpha, beta, gamma \n"


def test_shared_prefix_length_leaves_every_prompt_a_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter one keeps its last token
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([]) == 0


def _lora_model(tiny_llama):
    """The tiny Llama under a LoRA that is not zero, as after training a task."""
    loaded = load_model(tiny_llama)
    method = build_method("seq-lora", Settings(rank=4))
    model = method.attach(loaded.model)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model, Encoder(loaded.tokenizer, loaded.is_encoder_decoder)


def test_prefix_cache_gives_the_same_predictions_with_fewer_positions_computed(tiny_llama):
    model, encoder = _lora_model(tiny_llama)
    sentences = ["ab", "a longer sentence here", "mid size one", "x", "the longest sentence of them all, by far",
                 "qq", "seven words are in this one", "z z z", "another", "tail"]
    prompts = [encoder.prompt_ids(f"{HEADER}{s}\nAnswer:") for s in sentences]
    assert shared_prefix_length(prompts) >= len(HEADER)  # ByT5: one token per byte

    positions = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda _m, args, kwargs: positions.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                                   else args[0]).numel()), with_kwargs=True)
    full = generate(model, encoder, prompts, max_new_tokens=6, batch_size=4, reuse_prefix=False)
    full_positions, positions[:] = sum(positions), []
    cached = generate(model, encoder, prompts, max_new_tokens=6, batch_size=4, reuse_prefix=True)
    hook.remove()
    assert cached == full
    assert len(set(full)) > 1  # the predictions depend on the prompt, so the comparison means something
    # Every batch skips its prefill of the prefix (less the one prefill of it).
    assert sum(positions) <= full_positions - (len(prompts) - 1) * len(HEADER)


def test_prompts_without_a_shared_prefix_are_generated_as_before(tiny_llama):
    model, encoder = _lora_model(tiny_llama)
    prompts = [encoder.prompt_ids(s) for s in ("first prompt", "second one", "third")]
    assert shared_prefix_length(prompts) == 0
    assert (generate(model, encoder, prompts, 4, 2, reuse_prefix=True)
            == generate(model, encoder, prompts, 4, 2, reuse_prefix=False))


def test_generation_batches_bound_each_rows_padding_and_keep_every_item_once():
    lengths = [100, 40, 95, 80, 79, 10, 60, 61, 99]
    batches = generation_batches(lengths, batch_size=3, max_padding=0.25)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    for b in batches:  # longest first, and no row padded by more than a quarter of the longest
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        assert all(lengths[i] >= 0.75 * lengths[b[0]] for i in b)
    assert batches == [[0, 8, 2], [3, 4, 7], [6], [1], [5]]
    assert generation_batches(lengths, 3, None) == [[0, 8, 2], [3, 4, 7], [6, 1, 5]]  # fixed batches


def test_padding_bounded_batches_give_the_same_predictions_as_fixed_ones(tiny_llama):
    model, encoder = _lora_model(tiny_llama)
    sentences = ["ab", "a much longer sentence than the others here", "mid size one", "x", "qq", "z z z"]
    prompts = [encoder.prompt_ids(f"{HEADER}{s}\nAnswer:") for s in sentences]
    computed = [len(p) - shared_prefix_length(prompts) for p in prompts]
    assert len(generation_batches(computed, 4, 0.25)) > len(generation_batches(computed, 4, None))
    bounded = generate(model, encoder, prompts, max_new_tokens=6, batch_size=4)
    assert bounded == generate(model, encoder, prompts, max_new_tokens=6, batch_size=4, max_padding=None)
    assert len(set(bounded)) > 1
