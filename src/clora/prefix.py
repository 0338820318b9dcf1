"""The prompts' shared prefix, computed once.

Every prompt of a task begins with the same header, instruction and options: 40-68 of a benchmark
prompt's 80-380 tokens with SmolLM2's tokenizer (dbpedia: 68 of 145 on average). A decoder-only model's
keys and values over those tokens are the same in every row of a batch, so evaluation pre-fills them
once per task and training computes them once per batch, repeating the KV cache to the batch's rows;
the rows then continue from that cache, their padding masked out. Under autograd the repeat is an
ordinary op: the gradient of the prefix's computation is the sum over the rows, as when every row
computed it itself.
"""
from __future__ import annotations

import inspect

import torch

MIN_SHARED_PREFIX = 8  # tokens; below this a cached prefix saves less than its copies cost


def shared_prefix_length(prompt_ids: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token to continue from."""
    if not prompt_ids:
        return 0
    first, shortest = prompt_ids[0], min(len(p) for p in prompt_ids)
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompt_ids):
        n += 1
    return n


def cache_argument(model) -> str:
    # Transformers 5.x renamed `past_key_values` to `cache`; both are supported.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def prefill(model, prefix: list[int] | torch.Tensor, rows: int = 1):
    """The KV cache of the prefix, repeated for `rows` rows (under autograd when gradients are on)."""
    ids = torch.as_tensor(prefix, device=model.device).reshape(1, -1)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = getattr(out, cache_argument(model))
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache
