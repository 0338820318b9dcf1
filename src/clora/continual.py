"""The continual recipe, read top to bottom: load data and model, then for every stage
`on_task_start` -> train -> `on_task_end` -> evaluate the tasks seen so far -> commit the stage.
A killed run resumes after its last committed stage with the same results."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader

from . import faults, preflight, report, tracking
from .atomic import write_json_atomic
from .batching import TrainingBatches
from .benchmark import Benchmark, Item, Task, default_benchmark_dir, epochs_for, resolve_tasks
from .config import RunConfig
from .encoding import Encoder
from .errors import UserError
from .evaluation import TaskScore, evaluate_task
from .methods import Method, Settings, Stage, StageData, build_method
from .models import load_model
from .rundir import RunDir, unlock
from .streams import digest as stream_digest, load_stream
from .trainer import TrainOptions, train_stage


@dataclass
class Prepared:
    """Everything a run needs before training; `clora.run` and the tests share it."""
    config: RunConfig
    order_label: str
    task_names: list[str]
    tasks: dict[str, Task]
    method: Method
    stages: list[Stage]


def prepare(config: RunConfig) -> Prepared:
    config.validate()
    if config.tasks_file is not None:
        # Read and checked here, before any folder exists; the digest goes into config.json, so a resume
        # over changed data is refused like one with changed options.
        stream = load_stream(config.tasks_file, config.train_per_task, config.test_per_task, config.sample_seed,
                             config.dev_per_task, config.max_new_tokens)
        config = dataclasses.replace(config, tasks_digest=stream_digest(config.tasks_file))
        order_label, task_names = f"file {Path(config.tasks_file).name}", [t.name for t in stream]
        tasks = {t.name: t for t in stream}
    else:
        bench = Benchmark(config.data_dir or default_benchmark_dir())
        order_label, task_names = resolve_tasks(config.order, config.tasks, bench)
        tasks = {n: bench.load_task(n, config.train_per_task, config.test_per_task, config.sample_seed,
                                    dev_cap=config.dev_per_task) for n in task_names}
    if config.eval_split == "dev":
        # A tuning trial: its matrix is over dev items, and the test items are dropped here so that
        # nothing downstream (evaluation, zero-shot row, reports) can read one.
        tasks = {n: dataclasses.replace(t, test=t.dev) for n, t in tasks.items()}
    settings = Settings(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                        target_modules=config.target_modules, lr=config.lr,
                        weight_decay=config.weight_decay, seed=config.seed)
    method = build_method(config.method, settings, config.method_options)
    if config.load_in_4bit and method.needs_full_precision_base:
        raise UserError(f"--load-in-4bit cannot be used with method {config.method}: it needs full-precision base "
                        f"weights, because {method.needs_full_precision_base}; a 4-bit base is frozen and only "
                        "adapters train on it (run it without --load-in-4bit)")
    return Prepared(config, order_label, task_names, tasks, method, method.stages(task_names))


def run(config: RunConfig, output: str | Path, resume: bool = False, overwrite: bool = False,
        accelerator: Accelerator | None = None, shared_zero_shot: Path | None = None, train=None) -> dict:
    """Run a method over a task order; returns the contents of metrics.json. `shared_zero_shot`: a
    file holding the zero-shot row of the same model, tasks and caps (reused, or written once).
    `train`: trains each stage instead of clora's own loop (clora.integrations: a user's Trainer), called
    as train(model, method, data, options, accelerator, description, log_scalar, step_offset) -> StageLog."""
    config.validate()  # before an accelerator is made of its options
    accelerator = accelerator or make_accelerator(config, output)
    try:
        return _run(config, output, resume, overwrite, accelerator, shared_zero_shot, train)
    finally:
        tracking.finish(accelerator)
        unlock(output)  # the output folder is this process's while it runs (see RunDir.open)


def _run(config: RunConfig, output: str | Path, resume: bool, overwrite: bool,
         accelerator: Accelerator | None, shared_zero_shot: Path | None, train=None) -> dict:
    p = prepare(config)
    cfg, method = p.config, p.method
    accelerator = accelerator or make_accelerator(cfg)
    check_distributed(method, accelerator)
    if cfg.batch_size % accelerator.num_processes:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must be divisible by the "
                        f"{accelerator.num_processes} processes")
    main = accelerator.is_main_process
    stage_names = [s.name for s in p.stages]
    control = preflight.folder_rules()
    # Every refusal comes before the output folder is created or changed (see clora.preflight). The main
    # process alone: another one could see the folder the main one has just created.
    if main:
        RunDir.check(output, cfg.to_dict(), resume, overwrite, *control)
    summarise_only = resume and _finished(RunDir(Path(output)), stage_names, cfg.zero_shot)
    if resume and not summarise_only:
        _check_weights_kept(RunDir(Path(output)), stage_names)
    if not summarise_only:
        preflight.check_model(cfg.model, method)
        set_seed(cfg.seed)
        loaded = load_model(cfg.model, load_in_4bit=cfg.load_in_4bit)
        model = preflight.attach(method, loaded.model, cfg.model).to(accelerator.device)
        if main:  # stage 1 as far as it is known before it starts; every stage checks again
            trainable = sum(p_.numel() for p_ in model.parameters() if p_.requires_grad)
            RunDir(Path(output)).check_space(_space_needed(trainable), f"stage 1 ({stage_names[0]})")
    rundir = RunDir.open(output, cfg.to_dict(), resume, overwrite, *control) if main else RunDir(Path(output))
    accelerator.wait_for_everyone()
    records = rundir.completed(stage_names)
    saved_zero_shot = rundir.load_zero_shot() if cfg.zero_shot else None
    if summarise_only:
        # A finished run is only summarised again: no model, adapters or weight deltas are needed, so
        # a comparison over committed result runs (which keep no weights) still completes.
        if main:
            _write_results(rundir, p, records, saved_zero_shot["accuracy"] if saved_zero_shot else None, final=True)
        accelerator.wait_for_everyone()
        return json.loads((rundir.path / "metrics.json").read_text())

    encoder = Encoder(loaded.tokenizer, loaded.is_encoder_decoder, cfg.max_prompt_tokens)
    tracking.start(accelerator, cfg.to_dict(), rundir.path)
    log_scalar = tracking.scalar_logger(accelerator)

    zero_shot = _zero_shot(cfg, p, model, encoder, accelerator, rundir, shared_zero_shot) if cfg.zero_shot else None
    if records:
        method.load(model, rundir.stage_dir(len(records) - 1, stage_names[len(records) - 1]))
        print(f"clora: resuming {rundir.path} after stage {len(records)} of {len(p.stages)}", flush=True)

    def make_loader(items: list[tuple[str, Item]], shuffle_seed: int) -> DataLoader:
        examples = [encoder.example(p.tasks[name].prompt(item), item.label) for name, item in items]
        generator = torch.Generator().manual_seed(shuffle_seed)
        batches = TrainingBatches([len(e.input_ids) for e in examples], cfg.batch_size, cfg.batching, generator)
        return DataLoader(examples, batch_sampler=batches, collate_fn=encoder.collate_train)

    written = False
    for stage in p.stages[len(records):]:
        started = time.time()
        # Seeded per stage, so a resumed run draws the same initialisations and batch order.
        set_seed(cfg.seed + 1000 * (stage.index + 1))
        shuffle_seed = cfg.seed * 1_000_003 + stage.index
        own_items = [(name, item) for name in stage.tasks for item in p.tasks[name].train]
        data = StageData(stage, p.tasks, own_items, encoder, accelerator,
                         lambda items, s=shuffle_seed: make_loader(items, s))
        method.on_task_start(model, data)
        trainable = sum(p_.numel() for p_ in model.parameters() if p_.requires_grad)
        if main:
            rundir.check_space(_space_needed(trainable), f"stage {stage.index + 1} ({stage.name})")
        options = TrainOptions(
            epochs=epochs_for(stage.tasks[0], p.order_label, cfg.epochs) if len(stage.tasks) == 1 else cfg.epochs,
            max_grad_norm=cfg.max_grad_norm, on_nonfinite=cfg.on_nonfinite, checkpoint_every=cfg.checkpoint_every,
            checkpoint_dir=rundir.in_progress(stage.index, stage.name), is_encoder_decoder=loaded.is_encoder_decoder,
            share_prefix=cfg.share_prefix)
        description = f"[{stage.index + 1}/{len(p.stages)}] train {stage.name}"
        if train is None:
            log = train_stage(model, method, data.make_loader(method.training_items(data)), options, accelerator,
                              description, log_scalar, step_offset=10_000 * stage.index)
        else:
            log = train(model, method, data, options, accelerator, description, log_scalar, 10_000 * stage.index)
        method.on_task_end(model, data, log.optimizer)
        if accelerator.num_processes > 1:
            _check_ranks_agree(model, method, accelerator, stage.name)
        scores = _evaluate_row(cfg, p, stage, model, encoder, accelerator)
        record = {"stage": stage.name, "tasks": stage.tasks, "trainable_parameters": trainable,
                  "train_batches": log.batches, "skipped_batches": log.skipped,
                  "optimizer_steps": log.steps, "mean_train_loss": log.mean_loss,
                  "accuracy": {n: s.accuracy for n, s in scores.items()},
                  "rouge1": {n: s.rouge1 for n, s in scores.items()},
                  "seconds": round(time.time() - started, 1)}
        if cfg.tasks_file is not None:  # accuracy holds each task's own metric; both metrics stay on record
            record["exact_match"] = {n: s.exact_match for n, s in scores.items()}
            record["rouge_l"] = {n: s.rouge_l for n, s in scores.items()}
        if main:
            rundir.commit_stage(stage.index, stage.name, lambda d: _write_stage(d, method, model, scores), record)
            tracking.log_accuracy(accelerator, {n: s.accuracy for n, s in scores.items()}, stage.index + 1)
            rundir.drop_in_progress(stage.index, stage.name)
        accelerator.wait_for_everyone()
        records.append(record)
        _print_row(stage, p, records, accelerator)
        if main:
            _write_results(rundir, p, records, zero_shot, final=len(records) == len(p.stages))
            written = True

    if main and records and not written:  # a kill between the last commit and its results must not leave them stale
        _write_results(rundir, p, records, zero_shot, final=len(records) == len(p.stages))
    accelerator.wait_for_everyone()
    result = json.loads((rundir.path / "metrics.json").read_text())
    return result


def finished(config: RunConfig, output: str | Path) -> bool:
    """Whether the run in `output` has every stage (and its zero-shot row) done, so that resuming it only
    summarises it again, loading no model."""
    rundir = RunDir(Path(output))
    if not (rundir.path / "config.json").is_file():
        return False
    p = prepare(config)
    return _finished(rundir, [s.name for s in p.stages], p.config.zero_shot)


def _check_weights_kept(rundir: RunDir, stage_names: list[str]) -> None:
    """An unfinished run goes on from its last stage's weights; a folder copied without them (result
    folders are committed without weights) has that stage's results but nothing to go on from."""
    done = rundir.completed(stage_names)
    if done:
        last = rundir.stage_dir(len(done) - 1, stage_names[len(done) - 1])
        if not any(last.rglob("*.safetensors")):
            raise UserError(f"cannot resume {rundir.path}: stage {len(done)} ({stage_names[len(done) - 1]}) kept "
                            f"its results but not its weights (no .safetensors file under {last}); delete the "
                            "folder or rerun with --overwrite to start it again")


def _finished(rundir: RunDir, stage_names: list[str], zero_shot: bool) -> bool:
    return (len(rundir.completed(stage_names)) == len(stage_names)
            and (not zero_shot or rundir.load_zero_shot() is not None))


def _space_needed(trainable: int) -> int:
    # Adapter, deltas and a step checkpoint with its optimizer state: a few times the trainable weights.
    return 16 * trainable + (64 << 20)


def make_accelerator(cfg: RunConfig, run_dir: str | Path | None = None) -> Accelerator:
    # cpu=True when there is no GPU: only then does Accelerate form a multi-process CPU (gloo) group.
    # split_batches: --batch-size is the global batch, cut into equal slices per process, so the same
    # command gives the same optimisation on one process or eight.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.precision,
                       gradient_accumulation_steps=cfg.grad_accum,
                       dataloader_config=DataLoaderConfiguration(split_batches=True),
                       log_with=tracking.log_with(cfg.report_to, run_dir) if run_dir is not None else None)


def check_distributed(method: Method, accelerator: Accelerator) -> None:
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in ("FSDP", "DEEPSPEED") and not method.supports_sharding:
        raise UserError(f"method {method.name} cannot train under {kind}: it needs whole weights and gradients "
                        "on every process; launch it data-parallel (DDP) instead")


def _check_ranks_agree(model, method: Method, accelerator: Accelerator, stage: str) -> None:
    """Every process must hold the same adapter, full weights and method state (shared spaces, Fisher,
    ...) after a stage: they took the same averaged gradients and the same deterministic steps."""
    tensors = [p for p in model.parameters() if p.requires_grad] + list(method.state_dict().values())
    fingerprint = [float(t.detach().double().sum()) for t in tensors] + [float(t.detach().double().abs().sum()) for t in tensors]
    prints = gather_object([fingerprint])
    if any(other != prints[0] for other in prints[1:]):
        raise RuntimeError(f"processes disagree on the model or method state after stage {stage}")


def _zero_shot(cfg, p: Prepared, model, encoder, accelerator, rundir: RunDir, shared: Path | None) -> dict[str, float]:
    saved = rundir.load_zero_shot()
    if saved is None and shared is not None and shared.is_file():
        saved = json.loads(shared.read_text())
    if saved is not None:
        if accelerator.is_main_process:
            rundir.save_zero_shot(saved)
        return saved["accuracy"]
    with model.disable_adapter():
        scores = {n: evaluate_task(model, encoder, p.tasks[n], accelerator, cfg.eval_batch_size, f"zero-shot {n}")
                  for n in p.task_names}
    record = {"accuracy": {n: s.accuracy for n, s in scores.items()}}
    if accelerator.is_main_process:
        rundir.save_zero_shot(record)
        if shared is not None:
            write_json_atomic(shared, record)
    return record["accuracy"]


def _evaluate_row(cfg, p: Prepared, stage: Stage, model, encoder, accelerator) -> dict[str, TaskScore]:
    seen = {n for s in p.stages[: stage.index + 1] for n in s.tasks}
    names = [n for n in p.task_names if cfg.eval_all or n in seen]
    scores = {}
    for n in names:
        with p.method.evaluating(model, p.task_names.index(n)):
            scores[n] = evaluate_task(model, encoder, p.tasks[n], accelerator, cfg.eval_batch_size,
                                      f"[{stage.index + 1}/{len(p.stages)}] eval {n}")
    return scores


def _write_stage(directory: Path, method: Method, model, scores: dict[str, TaskScore]) -> None:
    method.save(model, directory)
    predictions = directory / "predictions"
    predictions.mkdir()
    for name, score in scores.items():
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in score.predictions)
        (predictions / f"{name}.jsonl").write_text(lines, encoding="utf-8")


def _matrix(p: Prepared, records: list[dict]) -> tuple[list[str], list[list[float | None]]]:
    """The tasks trained so far and their accuracy rows: AA and BWT of a partial run are over those."""
    trained = len({n for r in records for n in r["tasks"]})
    names = p.task_names[:trained]
    return names, [[r["accuracy"].get(n) for n in names] for r in records]


def _print_row(stage: Stage, p: Prepared, records: list[dict], accelerator) -> None:
    if accelerator.is_main_process:
        print(f"\nafter stage {stage.index + 1}/{len(p.stages)} ({stage.name}):", flush=True)
        print(report.format_matrix_text(*_matrix(p, records), [r["stage"] for r in records]), flush=True)


def _write_results(rundir: RunDir, p: Prepared, records: list[dict], zero_shot: dict | None, final: bool) -> None:
    cfg = p.config
    names, R = _matrix(p, records)
    Z = [zero_shot[n] for n in names] if zero_shot else None
    last = records[-1]
    rouge = [last["rouge1"].get(n) for n in names]
    status = "complete" if final else f"partial: {len(records)} of {len(p.stages)} stages done"
    notes = [f"Status: **{status}**.",
             f"Command options: method `{cfg.method}`{''.join(' ' + o for o in cfg.method_options)}, model `{cfg.model}`, "
             f"order `{p.order_label}`, train/test per task {cfg.train_per_task}/{cfg.test_per_task}, "
             f"lr {cfg.lr}, rank {cfg.rank}, epochs {cfg.epochs}, batch {cfg.batch_size}x{cfg.grad_accum}, seed {cfg.seed}.",
             "Trainable parameters per stage: " + ", ".join(f"{r['stage']} {r['trainable_parameters']:,}" for r in records) + "."]
    if cfg.load_in_4bit:
        notes.append("The base model's linear layers were loaded in 4 bits (NF4, double-quantised scales; bitsandbytes) "
                     "and kept frozen (QLoRA); the adapters trained in full precision.")
    if p.method.keeps_old_data:
        notes.append("This method trains on data of earlier tasks: it is not a data-free continual method.")
    if cfg.eval_split == "dev":
        notes.append(f"Evaluated on the dev split ({cfg.dev_per_task} items per task, held out of the training "
                     "files), not on the test items: a tuning run, not a result to report.")
    elif cfg.dev_per_task:
        notes.append(f"{cfg.dev_per_task} items per task are held out of training as the dev split.")
    stream = {}
    if cfg.tasks_file is not None:
        metric_of = {n: p.tasks[n].metric for n in names}
        notes.append("Tasks from " + f"`{cfg.tasks_file}`" + ": the matrix holds each task's own metric, exact match for "
                     "labelled tasks and ROUGE-L F for free-text ones (" + ", ".join(f"{n}: {m}" for n, m in metric_of.items())
                     + "); metrics.json has both for every task (`exact_match`, `rouge_l`, last row and matrix).")
        stream = {"task_metrics": metric_of,
                  "exact_match": {n: last["exact_match"].get(n) for n in names},
                  "rouge_l": {n: last["rouge_l"].get(n) for n in names},
                  "exact_match_matrix": [[r["exact_match"].get(n) for n in names] for r in records],
                  "rouge_l_matrix": [[r["rouge_l"].get(n) for n in names] for r in records]}
    extra = {"status": status, "method": cfg.method, "order": p.order_label, "stage_names": [r["stage"] for r in records],
             "trainable_parameters": [r["trainable_parameters"] for r in records],
             "seconds": sum(r["seconds"] for r in records), "keeps_old_data": p.method.keeps_old_data, "notes": notes,
             **stream}
    title = f"clora {cfg.method} on order {p.order_label}" + ("" if final else " (PARTIAL)")
    faults.point("results_write")
    report.write_results(rundir.path, names, R, Z, extra, rouge, title)
