"""Batched greedy generation and exact-match scoring of one task's test split.

Prompts are sorted by length before batching so batches carry little padding; generation stops at
EOS or after the longest label's token count. Under several processes the items are sharded and the
predictions gathered, so every rank returns the same result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from .benchmark import Task, exact_match
from . import faults
from .encoding import Encoder

_ROUGE = rouge_scorer.RougeScorer(["rouge1"])


@dataclass
class TaskScore:
    accuracy: float  # exact match, percent
    rouge1: float  # mean ROUGE-1 F, percent
    predictions: list[dict] = field(repr=False)


@torch.no_grad()
def generate(model, encoder: Encoder, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
             progress: tqdm | None = None) -> list[str]:
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = encoder.collate_prompts([prompt_ids[i] for i in chunk])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=encoder.eos, pad_token_id=encoder.pad)
        if not encoder.is_encoder_decoder:
            out = out[:, batch["input_ids"].shape[1]:]
        for i, ids in zip(chunk, out.tolist()):
            texts[i] = encoder.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if progress is not None:
            progress.update(len(chunk))
        faults.point("eval_batch")
    model.train(was_training)
    return [texts[i] for i in range(len(prompt_ids))]


def evaluate_task(model, encoder: Encoder, task: Task, accelerator: Accelerator, batch_size: int,
                  description: str = "") -> TaskScore:
    items = task.test
    indices = list(range(len(items)))
    with accelerator.split_between_processes(indices) as mine:
        prompts = [encoder.prompt_ids(task.prompt(items[i])) for i in mine]
        bar = tqdm(total=len(mine), desc=description or f"eval {task.name}", unit="item", leave=False,
                   disable=not accelerator.is_local_main_process)
        texts = generate(model, encoder, prompts, encoder.max_new_tokens(task.labels), batch_size, bar)
        bar.close()
        local = list(zip(mine, texts))
    if accelerator.num_processes > 1:
        local = gather_object(local)
    by_index = dict(local)
    predictions = []
    for i, item in enumerate(items):
        pred = by_index[i]
        predictions.append({"index": i, "label": item.label, "prediction": pred,
                            "correct": exact_match(pred, item.label)})
    accuracy = 100.0 * sum(p["correct"] for p in predictions) / len(predictions)
    rouge = 100.0 * sum(_ROUGE.score(p["label"], p["prediction"])["rouge1"].fmeasure for p in predictions) / len(predictions)
    return TaskScore(accuracy, rouge, predictions)
