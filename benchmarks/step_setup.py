"""What the step-cost benchmarks share: the default model with one training batch of a task, and the
bare StageData a method's task hooks need when no training loop drives them."""
from __future__ import annotations

import torch

from clora.benchmark import Benchmark, default_benchmark_dir
from clora.encoding import Encoder
from clora.methods import Stage, StageData
from clora.models import load_model


def bare_stage(index: int) -> StageData:
    return StageData(Stage(index, f"task{index + 1}", [f"task{index + 1}"]), {}, [], None, None, None)


def model_and_batch(model_name: str, task: str, items: int, device: torch.device):
    """(the loaded model, one training batch of the task's first `items` items on `device`)."""
    loaded = load_model(model_name)
    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder)
    data = Benchmark(default_benchmark_dir()).load_task(task, train_cap=items, sample_seed=0)
    batch = encoder.collate_train([encoder.example(data.prompt(item), item.label) for item in data.train])
    return loaded, {k: v.to(device) for k, v in batch.items()}
