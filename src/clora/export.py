"""`clora export RUN --stage K --to DIR`: the model a run evaluated after stage K, as one standalone
Hugging Face folder (weights, tokenizer, model card) that plain `AutoModelForCausalLM/Seq2SeqLM
.from_pretrained` loads without clora or peft; `--adapter-only` writes the stage's plain PEFT adapter.

The model is rebuilt exactly as the stage was evaluated (`full_weights.load_stage_model`: base model,
plus the full-weight deltas of GaLore/GORP/OSF, plus the adapter) and the adapter folded in with
PEFT's `merge_and_unload`. Every refusal comes before anything is written, and the folder is built
under a temporary name and renamed into place, so a failed export leaves no half-written model that
would load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import configfile
from .benchmark import ORDERS
from .config import RunConfig
from .errors import UserError, guard_disk
from .full_weights import DELTAS_FILE, SavesFullWeights
from .methods import Method, Settings, build_method

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Plan:
    run: Path
    config: RunConfig
    method: Method
    stage_names: list[str]
    index: int  # 0-based stage index
    stage_dir: Path
    record: dict  # the stage's stage.json
    to: Path
    adapter_only: bool

    @property
    def full_weights(self) -> bool:
        return isinstance(self.method, SavesFullWeights)


def export(run: str | Path, to: str | Path, stage: int | None = None, adapter_only: bool = False) -> Path:
    plan = check(Path(run), Path(to), stage, adapter_only)
    staging = plan.to.parent / f".{plan.to.name}.export-{os.getpid()}.tmp"
    with guard_disk(plan.to):
        plan.to.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _write_adapter(plan, staging) if adapter_only else _write_model(plan, staging)
            (staging / "README.md").write_text(model_card(plan), encoding="utf-8")
            _readable_as_umask_allows(staging)
            os.replace(staging, plan.to)  # onto an absent or empty folder only (checked)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return plan.to


def _readable_as_umask_allows(folder: Path) -> None:
    # safetensors weights are written owner-only (0600); a folder made to be shared gets the
    # permissions any other file the user writes gets.
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def check(run: Path, to: Path, stage: int | None, adapter_only: bool) -> Plan:
    """Every refusal of `export`, made without writing anything."""
    config_file = run / "config.json"
    if not run.is_dir():
        raise UserError(f"no such run folder: {run}")
    if not config_file.is_file():
        raise UserError(f"{run} holds no clora run (no config.json)")
    config = RunConfig(**configfile.load(config_file))
    method, stage_names = _stages(config)
    done = 0
    while done < len(stage_names) and (_stage_dir(run, done, stage_names) / "stage.json").is_file():
        done += 1
    if stage is None:
        if done == 0:
            raise UserError(f"{run} has no complete stage yet: nothing to export")
        stage = done
    if not 1 <= stage <= len(stage_names):
        raise UserError(f"--stage {stage} is out of range: {run} has {len(stage_names)} stages (1-{len(stage_names)})")
    if stage > done:
        raise UserError(f"stage {stage} ({stage_names[stage - 1]}) of {run} is not complete ({done} of "
                        f"{len(stage_names)} stages done): export one of stages 1-{done} or finish the run with --resume"
                        if done else f"stage {stage} ({stage_names[stage - 1]}) of {run} is not complete (no stage "
                                     "is done yet)")
    index = stage - 1
    stage_dir = _stage_dir(run, index, stage_names)
    plan = Plan(run, config, method, stage_names, index, stage_dir,
                json.loads((stage_dir / "stage.json").read_text()), to, adapter_only)
    if method.needs_task_id and index > 0:
        raise UserError(f"method {config.method} answers each task with its own task's LoRA (the earlier ones are in "
                        f"{stage_dir / 'method_state.safetensors'}): no single model or adapter reproduces stage "
                        f"{stage}; only its stage 1 can be exported")
    if adapter_only and plan.full_weights:
        raise UserError(f"--adapter-only: method {config.method} also trains full weight matrices "
                        f"({DELTAS_FILE}), so its adapter alone is not the model it evaluated; export without "
                        "--adapter-only for the merged model")
    needed = [stage_dir / "adapter" / f for f in ADAPTER_FILES] + ([stage_dir / DELTAS_FILE] if plan.full_weights else [])
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]} is missing: the run keeps no weights for stage {stage} (committed result runs "
                        f"keep none); replay it with `clora run --config {config_file} --output NEW` and export NEW")
    if config.load_in_4bit and not adapter_only:
        from .models import require_bitsandbytes

        require_bitsandbytes()  # the run's base is rebuilt in 4 bits, as it was trained, then dequantised
    if to.exists() and not to.is_dir():
        raise UserError(f"--to {to} exists and is not a directory")
    if to.is_dir() and any(to.iterdir()):
        raise UserError(f"--to {to} already holds files; give a new or empty folder")
    return plan


def _stages(config: RunConfig) -> tuple[Method, list[str]]:
    """The run's stage names, from its config alone: its data need not be on this machine."""
    if config.order is not None:
        if config.order not in ORDERS:
            raise UserError(f"the run's order {config.order!r} is unknown here")
        tasks = list(ORDERS[config.order])
    elif config.tasks is not None:
        tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
    else:  # tasks from a file: its task names are in the file
        from .continual import prepare

        prepared = prepare(config)
        return prepared.method, [s.name for s in prepared.stages]
    settings = Settings(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                        target_modules=config.target_modules, lr=config.lr, weight_decay=config.weight_decay,
                        seed=config.seed)
    method = build_method(config.method, settings, config.method_options)
    return method, [s.name for s in method.stages(tasks)]


def _stage_dir(run: Path, index: int, names: list[str]) -> Path:
    return run / "stages" / f"{index + 1:02d}-{names[index]}"


def _write_model(plan: Plan, target: Path) -> None:
    from .full_weights import load_stage_model
    from .models import load_model

    loaded = load_model(plan.config.model, load_in_4bit=plan.config.load_in_4bit)
    base = loaded.model
    if plan.config.load_in_4bit:
        # The model the run evaluated is the 4-bit (NF4) base, dequantised in every matrix product, plus the
        # adapter. Its weights, dequantised once, are what the folder holds (in the base's dtype, fp32), so
        # it loads without bitsandbytes and predicts what the run did; merging into a re-quantised 4-bit
        # base would round W + BA to NF4 again, and the original full-precision base is not what trained.
        base = base.dequantize()
    merged = load_stage_model(base, plan.stage_dir).merge_and_unload()
    # The generation settings the run evaluated with, so that a plain `generate` stops and pads alike.
    merged.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    merged.generation_config.eos_token_id = loaded.tokenizer.eos_token_id
    merged.save_pretrained(str(target))
    loaded.tokenizer.save_pretrained(str(target))


def _write_adapter(plan: Plan, target: Path) -> None:
    from .models import load_tokenizer, resolve_model_dir

    for name in ADAPTER_FILES:
        shutil.copy2(plan.stage_dir / "adapter" / name, target / name)
    load_tokenizer(plan.config.model, resolve_model_dir(plan.config.model)).save_pretrained(str(target))


def command_line(config: RunConfig, output: str | Path) -> str:
    """`clora run ...` with every option that differs from its default: what made the run."""
    words, default = ["clora", "run"], RunConfig()
    for f in dataclasses.fields(RunConfig):
        value = getattr(config, f.name)
        if value == getattr(default, f.name) or (value is None) or (f.name == "order" and config.tasks):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "method_options":
            for option in value:
                words += ["-o", option]
        elif isinstance(value, bool):
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, ",".join(value)]
        else:
            words += [flag, str(value)]
    words += ["--output", str(output)]
    return " ".join(shlex.quote(w) for w in words)


def model_card(plan: Plan) -> str:
    cfg, stage = plan.config, plan.index + 1
    seen = [t for name in plan.stage_names[:stage] for t in _tasks_of(plan, name)]
    accuracy = plan.record.get("accuracy", {})
    rows = "\n".join(f"| {task} | {accuracy[task]:.1f} |" for task in accuracy)
    scored = [accuracy[t] for t in seen if accuracy.get(t) is not None]
    mean = f"{sum(scored) / len(scored):.1f}" if scored else "n/a"
    split = "dev items (a tuning run)" if cfg.eval_split == "dev" else "test items"
    if plan.adapter_only:
        what = ("the stage's plain PEFT LoRA adapter: `PeftModel.from_pretrained(base_model, this folder)` "
                f"with the base model `{cfg.model}`")
        if cfg.load_in_4bit:
            what += (", which the run loaded in 4 bits: `clora.models.load_model(base, load_in_4bit=True)` loads it as "
                     "the run had it (NF4 with double-quantised scales, bitsandbytes, the layers computing in fp32)")
        library = "peft"
    else:
        deltas = " and full-weight deltas" if plan.full_weights else ""
        base = (f"the base model `{cfg.model}` as the run trained on it, loaded in 4 bits (NF4) and dequantised "
                "(its linear layers hold the NF4-rounded weights, in fp32, not the original ones)"
                if cfg.load_in_4bit else f"the base model `{cfg.model}`")
        what = (f"{base} with the stage's LoRA adapter{deltas} merged in: "
                "`AutoModelForCausalLM.from_pretrained(this folder)` (or `AutoModelForSeq2SeqLM` for an "
                "encoder-decoder model) loads it; neither clora nor peft is needed")
        library = "transformers"
    export_words = ["clora", "export", str(plan.run), "--stage", str(stage), "--to", str(plan.to)]
    if plan.adapter_only:
        export_words.append("--adapter-only")
    return f"""---
library_name: {library}
tags:
- clora
- continual-learning
- {cfg.method}
---

# clora `{cfg.method}` after stage {stage} of {len(plan.stage_names)} ({plan.stage_names[plan.index]})

This folder holds {what}.

Tasks seen, in order: {', '.join(seen)}. Method: `{cfg.method}`{''.join(' `-o ' + o + '`' for o in cfg.method_options)}.

## Accuracy after stage {stage}

Exact match (%) on the run's {split}, greedy generation, as the run measured it:

| task | accuracy |
|---|---|
{rows}

Mean over the tasks seen: {mean}.

## How it was made

```bash
{command_line(cfg, plan.run)}
{' '.join(shlex.quote(w) for w in export_words)}
```

The run replays with `clora run --config {shlex.quote(str(plan.run / 'config.json'))} --output NEW`. Its options:

```json
{json.dumps(cfg.to_dict(), indent=2)}
```
"""


def _tasks_of(plan: Plan, stage_name: str) -> list[str]:
    tasks = plan.record.get("tasks") if stage_name == plan.stage_names[plan.index] else None
    if tasks:
        return list(tasks)
    stage_file = plan.run / "stages" / f"{plan.stage_names.index(stage_name) + 1:02d}-{stage_name}" / "stage.json"
    return list(json.loads(stage_file.read_text()).get("tasks", [stage_name]))
