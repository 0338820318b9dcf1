"""`clora export`: the exported folder is the run's own model. It loads with plain transformers in a
process where peft cannot be imported and clora is never imported, and its greedy predictions equal
the ones the run saved for that stage, on every task seen (SeqLoRA on Llama and T5; GORP, whose model
is base + full-weight deltas + adapter). Bad input is refused with one line and writes nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import clora
from clora.cli import main
from clora.continual import prepare
from clora.encoding import Encoder
from clora.evaluation import evaluate_task
from conftest import run_killed_in_second_stage, tiny_config, write_tiny_benchmark

# Run in a fresh interpreter: peft made unimportable before anything loads, clora never imported.
CHILD = r"""
import json, sys
sys.modules["peft"] = None  # `import peft` now raises ImportError
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

folder, spec_file = sys.argv[1:3]
spec = json.load(open(spec_file))
config = AutoConfig.from_pretrained(folder)
seq2seq = config.is_encoder_decoder
model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
out = {}
with torch.no_grad():
    for task, (prompts, max_new_tokens) in spec.items():
        answers = []
        for prompt in prompts:
            ids = tokenizer(prompt).input_ids
            if not seq2seq and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]  # a prompt to continue does not end with EOS
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False)
            y = y[0] if seq2seq else y[0, x.shape[1]:]
            answers.append(tokenizer.decode(y, skip_special_tokens=True).strip())
        out[task] = answers
assert "clora" not in sys.modules and not any(m.startswith("clora.") for m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_tiny_benchmark(tmp_path_factory.mktemp("bench"), n_train=12, n_test=6)


def _config(model: str, bench: Path, method: str):
    options = ["full_lr=5e-3", "update_gap=2"] if method == "gorp" else []
    return tiny_config(model, bench, method, epochs=2, method_options=options)


@pytest.fixture(scope="module")
def runs(tiny_llama, tiny_t5, bench, tmp_path_factory, without_plots) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, model, method in [("llama-seq-lora", tiny_llama, "seq-lora"), ("t5-seq-lora", tiny_t5, "seq-lora"),
                                ("llama-gorp", tiny_llama, "gorp"), ("llama-per-task-ft", tiny_llama, "per-task-ft")]:
        clora.run(_config(model, bench, method), root / name)
        made[name] = root / name
    return made


def _saved(stage_dir: Path) -> dict[str, list[str]]:
    return {p.stem: [json.loads(line)["prediction"] for line in p.read_text().splitlines()]
            for p in sorted((stage_dir / "predictions").glob("*.jsonl"))}


def _plain_transformers_predictions(folder: Path, run: Path, tasks: list[str], tmp_path: Path) -> dict[str, list[str]]:
    config = clora.RunConfig(**json.loads((run / "config.json").read_text()))
    prepared = prepare(config)
    from clora.models import load_config, load_tokenizer, resolve_model_dir

    source = resolve_model_dir(config.model)
    encoder = Encoder(load_tokenizer(config.model, source), load_config(config.model, source).is_encoder_decoder,
                      config.max_prompt_tokens)
    spec = {t: ([prepared.tasks[t].prompt(item) for item in prepared.tasks[t].test],
                encoder.max_new_tokens(prepared.tasks[t].labels)) for t in tasks}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(spec_file)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("run_name, stage", [("llama-seq-lora", 2), ("llama-seq-lora", 1), ("t5-seq-lora", 2),
                                             ("llama-gorp", 2)])
def test_exported_model_predicts_what_the_run_did_without_clora_or_peft(run_name, stage, runs, tmp_path, capsys):
    run = runs[run_name]
    to = tmp_path / "exported"
    argv = ["export", str(run), "--to", str(to)] + ([] if stage == 2 else ["--stage", str(stage)])  # default: last
    assert main(argv) == 0, capsys.readouterr().err
    assert not (to / "adapter_config.json").exists()  # a merged model, not an adapter
    umask = os.umask(0)
    os.umask(umask)
    assert (to / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # shareable, not owner-only
    stage_dir = sorted((run / "stages").iterdir())[stage - 1]
    saved = _saved(stage_dir)
    assert len(saved) == stage  # every task seen so far was evaluated
    got = _plain_transformers_predictions(to, run, list(saved), tmp_path)
    assert got == saved
    card = (to / "README.md").read_text()
    record = json.loads((stage_dir / "stage.json").read_text())
    for task, accuracy in record["accuracy"].items():
        assert f"| {task} | {accuracy:.1f} |" in card
    assert f"after stage {stage} of 2" in card and "clora run " in card and f"clora export {run}" in card
    if "gorp" in run_name:
        assert "--method gorp" in card  # the command that made the run
        _assert_deltas_are_in(to, stage_dir, run)


def _assert_deltas_are_in(exported: Path, stage_dir: Path, run: Path) -> None:
    """GORP's full-rank matrices (not LoRA targets) are exactly base + saved delta in the export: the
    predictions alone do not show it on a tiny model whose deltas rarely flip a greedy answer."""
    from safetensors.torch import load_file

    from clora.full_weights import DELTAS_FILE

    base_dir = json.loads((run / "config.json").read_text())["model"]
    base, weights = load_file(f"{base_dir}/model.safetensors"), load_file(str(exported / "model.safetensors"))
    deltas = load_file(str(stage_dir / DELTAS_FILE))
    assert deltas and all(d.abs().max() > 0 for d in deltas.values())
    for name, delta in deltas.items():
        assert torch.equal(weights[name], (base[name].float() + delta).to(base[name].dtype)), name


def test_the_plain_model_differs_from_the_export(runs, tiny_llama, tmp_path, capsys):
    """The prediction check above has teeth: the untouched base model does not give the run's answers."""
    run = runs["llama-seq-lora"]
    saved = _saved(sorted((run / "stages").iterdir())[-1])
    got = _plain_transformers_predictions(Path(tiny_llama), run, list(saved), tmp_path)
    assert got != saved


def test_adapter_only_is_the_plain_peft_adapter(runs, tiny_llama, tmp_path, capsys):
    from peft import PeftModel

    from clora.models import load_model

    run = runs["llama-seq-lora"]
    to = tmp_path / "adapter"
    assert main(["export", str(run), "--to", str(to), "--adapter-only"]) == 0, capsys.readouterr().err
    assert (to / "adapter_model.safetensors").is_file() and (to / "tokenizer_config.json").is_file()
    assert "PeftModel.from_pretrained" in (to / "README.md").read_text()
    loaded = load_model(tiny_llama)
    model = PeftModel.from_pretrained(loaded.model, str(to))
    config = clora.RunConfig(**json.loads((run / "config.json").read_text()))
    prepared = prepare(config)
    encoder = Encoder(loaded.tokenizer, False, config.max_prompt_tokens)
    saved = _saved(sorted((run / "stages").iterdir())[-1])
    for task, predictions in saved.items():
        again = evaluate_task(model, encoder, prepared.tasks[task], Accelerator(cpu=True), 8).predictions
        assert [p["prediction"] for p in again] == predictions


def _without_weights(run: Path, tmp: Path) -> Path:
    """A committed result run: adapters' configs and predictions, no weights."""
    copy = tmp / "results-like"
    shutil.copytree(run, copy)
    for weights in copy.rglob("*.safetensors"):
        weights.unlink()
    return copy


def _killed(tiny_llama: str, bench: Path, tmp: Path, monkeypatch) -> Path:
    out = tmp / "killed"
    run_killed_in_second_stage(_config(tiny_llama, bench, "seq-lora"), out, monkeypatch)
    return out


# (id, arguments after `export`, words the error must hold)
BAD = [
    ("no-such-run", ["{tmp}/nowhere", "--to", "{to}"], ["no such run folder", "nowhere"]),
    ("not-a-run", ["{tmp}", "--to", "{to}"], ["no clora run", "config.json"]),
    ("stage-zero", ["{seq}", "--stage", "0", "--to", "{to}"], ["--stage 0", "out of range", "2 stages"]),
    ("stage-past-the-end", ["{seq}", "--stage", "3", "--to", "{to}"], ["--stage 3", "out of range"]),
    ("stage-not-a-number", ["{seq}", "--stage", "x", "--to", "{to}"], ["--stage", "'x'"]),
    ("incomplete-stage", ["{killed}", "--stage", "2", "--to", "{to}"], ["stage 2 (beta)", "not complete", "1 of 2"]),
    ("no-weights", ["{bare}", "--to", "{to}"], ["adapter_model.safetensors is missing", "keeps no weights",
                                                 "--config"]),
    ("no-weights-gorp-deltas", ["{bare_gorp}", "--to", "{to}"], ["is missing", "keeps no weights"]),
    ("to-not-empty", ["{seq}", "--to", "{full}"], ["--to", "already holds files"]),
    ("to-is-a-file", ["{seq}", "--to", "{file}"], ["--to", "not a directory"]),
    ("adapter-only-gorp", ["{gorp}", "--to", "{to}", "--adapter-only"], ["--adapter-only", "gorp", "full_deltas"]),
    ("per-task-ft-stage-2", ["{ptft}", "--to", "{to}"], ["per-task-ft", "own task's LoRA", "stage 2"]),
    ("no-to", ["{seq}"], ["--to"]),
]


@pytest.mark.parametrize("args, needles", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_export_is_refused_and_writes_nothing(args, needles, runs, tiny_llama, bench, tmp_path, capsys,
                                                  monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    places = {"tmp": work, "to": work / "out", "seq": runs["llama-seq-lora"], "gorp": runs["llama-gorp"],
              "ptft": runs["llama-per-task-ft"], "full": work / "full", "file": work / "notes.txt"}
    (work / "full").mkdir()
    (work / "full" / "mine.txt").write_text("mine")
    (work / "notes.txt").write_text("notes")
    if "{killed}" in args:
        places["killed"] = _killed(tiny_llama, bench, tmp_path, monkeypatch)
    if "{bare}" in args:
        places["bare"] = _without_weights(runs["llama-seq-lora"], tmp_path)
    if "{bare_gorp}" in args:
        bare = _without_weights(runs["llama-gorp"], tmp_path)
        for stage in (bare / "stages").iterdir():  # the adapter kept, only the deltas gone
            shutil.copy(runs["llama-gorp"] / "stages" / stage.name / "adapter" / "adapter_model.safetensors",
                        stage / "adapter" / "adapter_model.safetensors")
        places["bare_gorp"] = bare
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    code = main(["export"] + [a.format(**places) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("clora: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before  # nothing written, no temp folder


def test_default_stage_is_the_last_complete_one(tiny_llama, bench, tmp_path, monkeypatch, capsys):
    killed = _killed(tiny_llama, bench, tmp_path, monkeypatch)
    to = tmp_path / "out"
    to.mkdir()  # an empty folder is fine
    assert main(["export", str(killed), "--to", str(to), "--adapter-only"]) == 0, capsys.readouterr().err
    assert "after stage 1 of 2 (alpha)" in (to / "README.md").read_text()
    assert (to / "adapter_model.safetensors").read_bytes() == \
        (killed / "stages" / "01-alpha" / "adapter" / "adapter_model.safetensors").read_bytes()
