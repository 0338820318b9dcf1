"""Token-level invariants: the loss sees only answer tokens, prompts are what generation continues,
long prompts keep their head and their trailing "Answer:"."""
from __future__ import annotations

import torch
from transformers import ByT5Tokenizer

from clora.encoding import IGNORE_INDEX, Encoder


def test_decoder_example_masks_prompt_and_ends_with_eos():
    enc = Encoder(ByT5Tokenizer(), is_encoder_decoder=False)
    ex = enc.example("Q?\nAnswer:", "yes")
    prompt = enc.prompt_ids("Q?\nAnswer:")
    assert ex.input_ids[: len(prompt)] == prompt
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = ex.labels[len(prompt):]
    assert answer[-1] == enc.eos and IGNORE_INDEX not in answer
    assert enc.tokenizer.decode(answer, skip_special_tokens=True).strip() == "yes"
    assert prompt[-1] != enc.eos  # ByT5 appends EOS; a prompt to be continued must not end


def test_encoder_decoder_example_has_label_as_target():
    enc = Encoder(ByT5Tokenizer(), is_encoder_decoder=True)
    ex = enc.example("Q?\nAnswer:", "no")
    assert enc.tokenizer.decode(ex.labels, skip_special_tokens=True) == "no"
    assert ex.labels[-1] == enc.eos


def test_prompt_padding_is_left_for_decoders_right_for_seq2seq():
    for seq2seq in (False, True):
        enc = Encoder(ByT5Tokenizer(), is_encoder_decoder=seq2seq)
        batch = enc.collate_prompts([[5, 6, 7], [8]])
        expected = torch.tensor([[1, 1, 1], [1, 0, 0]] if seq2seq else [[1, 1, 1], [0, 0, 1]])
        assert torch.equal(batch["attention_mask"], expected)


def test_train_batch_pads_labels_with_ignore_index():
    enc = Encoder(ByT5Tokenizer(), is_encoder_decoder=False)
    batch = enc.collate_train([enc.example("a", "b"), enc.example("long prompt", "b")])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_long_prompt_is_cut_in_the_middle():
    enc = Encoder(ByT5Tokenizer(), is_encoder_decoder=False, max_prompt_tokens=40)
    prompt = "Task:TC\nDataset:x\n" + "word " * 50 + "\nAnswer:"
    ids = enc.prompt_ids(prompt)
    text = enc.tokenizer.decode(ids)
    assert len(ids) == 40
    assert text.startswith("Task:TC\nDataset:x\n") and text.endswith("\nAnswer:")
