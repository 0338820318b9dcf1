"""The order and grouping of a stage's training batches.

`random`: a seeded random permutation cut into batches (what runs did before length grouping).
`length`: items of similar length batched together, so a batch padded to its longest item carries
little padding. Transformers' `get_length_grouped_indices` does the grouping (a seeded permutation cut
into mega-batches, each sorted by length); the batches it yields are then shuffled with the same
generator, because its mega-batches are sorted longest first and a stage would otherwise see its
batches in descending length within each mega-batch. Both are batch samplers over the whole global
batch, so with Accelerate's `split_batches` every process sees the same batches on 1 or N processes,
and a resumed stage that replays its batches advances the generator exactly as the first run did.
"""
from __future__ import annotations

from typing import Iterator, Literal

import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

Batching = Literal["random", "length"]


class TrainingBatches(Sampler[list[int]]):
    def __init__(self, lengths: list[int], batch_size: int, batching: Batching, generator: torch.Generator):
        self.lengths = lengths
        self.batch_size = batch_size  # read by Accelerate to split the global batch over processes
        self.batching = batching
        self.generator = generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.batching == "random":
            # torch's own samplers, so that the batches (and the generator's advance) are exactly
            # those of runs made before length grouping existed.
            shuffled = RandomSampler(range(len(self.lengths)), generator=self.generator)
            yield from BatchSampler(shuffled, self.batch_size, drop_last=False)
            return
        grouped = get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
        batches = [grouped[i:i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """The share of a stage's padded token positions that are padding."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths) / padded if padded else 0.0
