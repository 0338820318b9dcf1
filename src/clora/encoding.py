"""Token ids for training and generation, the same way for both so that what the model is trained to
continue is exactly what it is asked to continue at evaluation.

Decoder-only: input = prompt + " " + label + EOS, loss on the answer tokens only; generation continues
the prompt (left padding). Encoder-decoder: prompt as source, label + EOS as target (right padding).
Prompts longer than `max_prompt_tokens` lose tokens from their middle (inside the sentence), so the
task header, options and the trailing "Answer:" survive.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
_KEEP_AT_END = 8  # tokens kept after a middle cut: "\nAnswer:" and the sentence's last words


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # decoder-only: same length as input_ids; encoder-decoder: target ids


class Encoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, is_encoder_decoder: bool, max_prompt_tokens: int = 512):
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.max_prompt_tokens = max_prompt_tokens
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
        if not self.is_encoder_decoder and ids and ids[-1] == self.eos:
            ids = ids[:-1]  # some tokenizers (T5/ByT5 style) append EOS; a prompt to continue must not end
        if len(ids) > self.max_prompt_tokens:
            head = self.max_prompt_tokens - _KEEP_AT_END
            ids = ids[:head] + ids[-_KEEP_AT_END:]
        return ids

    def answer_ids(self, label: str) -> list[int]:
        if self.is_encoder_decoder:
            ids = self.tokenizer(label, add_special_tokens=False).input_ids
        else:
            ids = self.tokenizer(" " + label, add_special_tokens=False).input_ids
        return ids + [self.eos]

    def max_new_tokens(self, labels: list[str]) -> int:
        return max(len(self.answer_ids(label)) for label in labels)

    def example(self, prompt: str, label: str) -> Example:
        prompt_ids, answer = self.prompt_ids(prompt), self.answer_ids(label)
        if self.is_encoder_decoder:
            return Example(prompt_ids, answer)
        return Example(prompt_ids + answer, [IGNORE_INDEX] * len(prompt_ids) + answer)

    def collate_train(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        # Right padding for both kinds: padded label positions are ignored by the loss.
        input_ids, attention = _pad([e.input_ids for e in examples], self.pad, left=False)
        labels, _ = _pad([e.labels for e in examples], IGNORE_INDEX, left=False)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def collate_prompts(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        # Decoder-only generation continues the last position, so padding must go on the left.
        input_ids, attention = _pad(prompts, self.pad, left=not self.is_encoder_decoder)
        return {"input_ids": input_ids, "attention_mask": attention}


def _pad(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
