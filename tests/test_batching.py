"""Training batches: `random` is exactly the sampler runs used before length grouping; `length` batches
similar lengths together with less padding, covers every item once per epoch, is seeded, and still
shuffles the order of its batches."""
from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader, RandomSampler

from clora.batching import TrainingBatches, padding_fraction


def _lengths(n: int = 192, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(99, 216) for _ in range(n)]


def _epochs(sampler, epochs: int = 2) -> list[list[list[int]]]:
    return [list(sampler) for _ in range(epochs)]


def test_random_batches_are_exactly_those_of_a_seeded_random_sampler():
    lengths = _lengths(50)
    ours = TrainingBatches(lengths, 8, "random", torch.Generator().manual_seed(3))
    before = DataLoader(list(range(50)), batch_size=8, collate_fn=list,
                        sampler=RandomSampler(range(50), generator=torch.Generator().manual_seed(3)))
    assert _epochs(ours) == [list(before), list(before)]
    assert len(ours) == len(before) == 7


def test_length_batches_cover_each_item_once_per_epoch_with_less_padding():
    lengths = _lengths()
    grouped = TrainingBatches(lengths, 8, "length", torch.Generator().manual_seed(0))
    shuffled = TrainingBatches(lengths, 8, "random", torch.Generator().manual_seed(0))
    for batches in _epochs(grouped):
        assert len(batches) == len(grouped) == 24 and all(len(b) == 8 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert padding_fraction(lengths, batches) < padding_fraction(lengths, list(shuffled)) / 3


def test_length_batches_are_seeded_and_their_order_is_shuffled():
    lengths = _lengths()
    first = _epochs(TrainingBatches(lengths, 8, "length", torch.Generator().manual_seed(0)))
    again = _epochs(TrainingBatches(lengths, 8, "length", torch.Generator().manual_seed(0)))
    other = _epochs(TrainingBatches(lengths, 8, "length", torch.Generator().manual_seed(1)))
    assert first == again and first != other
    assert first[0] != first[1]  # each epoch draws a new grouping
    longest = [max(lengths[i] for i in b) for b in first[0]]
    # Not the mega-batches' longest-first order: the batches are shuffled.
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_padding_fraction():
    assert padding_fraction([2, 4], [[0, 1]]) == 0.25
    assert padding_fraction([3, 3], [[0], [1]]) == 0.0


def test_a_run_made_before_length_grouping_resumes_with_random_batches(tiny_llama, tiny_bench, tmp_path):
    """Its config.json has no `batching`: it was run with random batches, so a resume must keep them
    and a resume asking for length batches must be refused."""
    import json

    import pytest

    import clora
    from clora.errors import UserError
    from conftest import tiny_config

    out = tmp_path / "old-run"
    config = tiny_config(tiny_llama, tiny_bench, batching="random", epochs=1, train_per_task=8, test_per_task=4)
    clora.run(config, out)
    saved = json.loads((out / "config.json").read_text())
    del saved["batching"]  # as written before the option existed
    (out / "config.json").write_text(json.dumps(saved))
    assert clora.run(config, out, resume=True)["status"] == "complete"
    with pytest.raises(UserError, match="batching"):
        clora.run(tiny_config(tiny_llama, tiny_bench, epochs=1, train_per_task=8, test_per_task=4), out, resume=True)
