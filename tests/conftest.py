"""Fixtures: tiny randomly-initialised Llama and T5 models saved to disk (so the real loading path
runs), and a tiny benchmark in the CL_Benchmark layout with short items."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny_llama(path: Path) -> None:
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         initializer_range=0.3,  # logits of a 0.02 init cannot leave uniform in a few steps
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def _tiny_t5(path: Path) -> None:
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def without_plots():
    """No PNG plots in modules that run many stages: they cost seconds per stage and are tested elsewhere."""
    from clora import report

    patch = pytest.MonkeyPatch()
    patch.setattr(report, "_heatmap", lambda *args, **kwargs: None)
    patch.setattr(report, "_curves", lambda *args, **kwargs: None)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-t5")
    _tiny_t5(path)
    return str(path)


def write_tiny_benchmark(root: Path, n_train: int = 24, n_test: int = 8, third_task: bool = False) -> Path:
    """Two (or three) tasks a tiny model can learn a little: the answer is readable off the sentence."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "instruction_config.json").write_text(json.dumps(
        {"TC": [{"instruction_type": "zero-shot", "instruction": "Topic?\n"}]}))
    specs = {"TC/alpha": ["x", "y"], "COPA/beta": ["A", "B"]}
    if third_task:
        specs["NLI/gamma"] = ["p", "q"]
    for rel, labels in specs.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "labels.json").write_text(json.dumps(labels))
        for split, n in (("train", n_train), ("test", n_test)):
            items = [{"sentence": f"{labels[i % 2]}{i % 3}", "label": labels[i % 2]} for i in range(n)]
            (d / f"{split}.json").write_text(json.dumps(items))
    return root


@pytest.fixture()
def tiny_bench(tmp_path) -> Path:
    return write_tiny_benchmark(tmp_path / "bench")


@pytest.fixture()
def tiny_bench3(tmp_path) -> Path:
    return write_tiny_benchmark(tmp_path / "bench3", third_task=True)


def tiny_config(model: str, bench: Path, method: str = "seq-lora", **overrides):
    from clora import RunConfig

    values = dict(method=method, model=model, data_dir=str(bench), order=None, tasks="alpha,beta",
                  batch_size=4, eval_batch_size=8, lr=2e-2, rank=4, epochs=3, seed=0)
    values.update(overrides)
    return RunConfig(**values)


@contextmanager
def second_stage_killed(monkeypatch):
    """Inside, a run is interrupted as it starts training its second stage (what a kill looks like from
    inside the loop); the real trainer is back in place afterwards."""
    from clora import continual

    calls = {"n": 0}
    real_train = continual.train_stage

    def dies_in_second_stage(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(continual, "train_stage", dies_in_second_stage)
    try:
        yield
    finally:
        monkeypatch.setattr(continual, "train_stage", real_train)


def run_killed_in_second_stage(config, output: Path, monkeypatch) -> None:
    """Run `config` into `output`, interrupted as it starts training its second stage."""
    import clora

    with second_stage_killed(monkeypatch), pytest.raises(KeyboardInterrupt):
        clora.run(config, output)


# What a resumed run may write differently from an uninterrupted one: wall-clock times only.
TIMING_FIELDS = {"metrics.json": ["seconds"], "stage.json": ["seconds"]}
TIMING_PATHS = {"tb",           # TensorBoard event files: wall-clock stamps, host and pid in their names
                ".clora.lock"}  # names the process that last held the folder


def run_folder_files(out: Path) -> dict[str, bytes | dict]:
    """Every file a run wrote, by path: its bytes, or for the JSON files with times its contents less
    those times (TIMING_FIELDS); the paths in TIMING_PATHS are left out."""
    files = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if not path.is_file() or relative.parts[0] in TIMING_PATHS:
            continue
        if path.name in TIMING_FIELDS:
            files[str(relative)] = {k: v for k, v in json.loads(path.read_text()).items()
                                    if k not in TIMING_FIELDS[path.name]}
        else:
            files[str(relative)] = path.read_bytes()
    return files


def assert_same_run_folders(got: Path, expected: Path) -> None:
    a, b = run_folder_files(got), run_folder_files(expected)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], name


def method_stages(model_path: str | None, bench: Path, method: str, options: list[str], tasks: str = "alpha,beta",
                  seed: int | None = None):
    """The method, the attached model (None without a model path) and one StageData per stage, built
    as the continual loop builds them (loaders unshuffled); `seed`: torch's seed before attaching."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from clora import continual
    from clora.encoding import Encoder
    from clora.methods import StageData
    from clora.models import load_model

    p = continual.prepare(tiny_config(model_path or "unused", bench, method, method_options=options, tasks=tasks))
    encoder = model = None
    if model_path:
        loaded = load_model(model_path)
        encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder, p.config.max_prompt_tokens)
        if seed is not None:
            torch.manual_seed(seed)
        model = p.method.attach(loaded.model)

    def make_loader(items):
        examples = [encoder.example(p.tasks[n].prompt(item), item.label) for n, item in items]
        return DataLoader(examples, batch_size=4, collate_fn=encoder.collate_train)

    data = [StageData(s, p.tasks, [(n, it) for n in s.tasks for it in p.tasks[n].train], encoder,
                    Accelerator(cpu=True), make_loader) for s in p.stages]
    return p.method, model, data


def assert_predicts_as_saved(loaded, model, stage_dir: Path, tasks: list[str], row: list, bench: Path, cfg) -> None:
    """`model` (rebuilt from a stage's saved files on `loaded`'s tokenizer) gives, on every task the run
    evaluated at that stage, the predictions the stage saved and the accuracy of the run's matrix row."""
    from accelerate import Accelerator

    from clora.benchmark import Benchmark
    from clora.encoding import Encoder
    from clora.evaluation import evaluate_task

    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder, cfg.max_prompt_tokens)
    for task, accuracy in zip(tasks, row):
        if accuracy is None:
            continue
        saved = [json.loads(line) for line in (stage_dir / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        again = evaluate_task(model, encoder, Benchmark(bench).load_task(task), Accelerator(cpu=True),
                              cfg.eval_batch_size).predictions
        assert [p["prediction"] for p in again] == [p["prediction"] for p in saved], (stage_dir.name, task)
        assert 100.0 * sum(p["correct"] for p in again) / len(again) == accuracy, (stage_dir.name, task)
