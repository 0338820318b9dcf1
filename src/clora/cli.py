"""`clora` command line. User mistakes print one line `clora: error: ...` and exit 2."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing

from .config import RunConfig
from .errors import UserError

_HELP = {
    "method": "continual method (see `clora methods`)",
    "method_options": "method option key=value (repeatable; see `clora methods`) (default: the method's own)",
    "model": "hub id, local directory or .gguf file (default: smollm2-135m-instruct, the embedded SmolLM2-135M-Instruct)",
    "data_dir": "benchmark directory in the CL_Benchmark layout (default: the copy shipped with clora)",
    "order": "task order: 1-6 or TC-3 (see `clora tasks`)",
    "tasks": "custom task order, comma-separated (instead of --order) (default: none, --order applies)",
    "tasks_file": "your own tasks: a YAML/JSON stream file naming each task's data files, in order (instead of "
                  "--order/--tasks and --data-dir; see README 'Your own tasks')",
    "max_new_tokens": "most tokens generated for a free-text task of a --tasks-file (its longest answer, up to this)",
    "train_per_task": "cap on training items per task (a seeded random sample) (default: all items)",
    "test_per_task": "cap on test items per task (a seeded random sample) (default: all items)",
    "sample_seed": "seed of the caps' samples",
    "dev_per_task": "hold out N items of each task's training file as its dev split (seeded; never trained on)",
    "eval_split": "evaluate on the test items, or on the dev items (tuning: no test item is read)",
    "epochs": "epochs per task (MNLI trains twice as many in orders 4-6)",
    "batch_size": "global training batch size (split over the processes)",
    "batching": "training batches of similar-length items (less padding; batch order still shuffled) or random",
    "share_prefix": "run the instruction every item of a training batch starts with through the model once and "
                    "continue each item from its KV cache (same loss up to rounding, less compute) (default: on)",
    "grad_accum": "gradient accumulation steps",
    "eval_batch_size": "generation batch size",
    "lr": "learning rate (AdamW, constant)",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha (the LoRA update is scaled by alpha / rank)",
    "dropout": "LoRA dropout",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "seed": "training seed (initialisations, batch order)",
    "target_modules": "comma-separated LoRA target modules (default: the model's query and value projections)",
    "max_prompt_tokens": "longer prompts lose tokens from the middle of their sentence",
    "precision": "mixed precision: no, bf16 or fp16",
    "load_in_4bit": "load the base model's linear layers in 4 bits (NF4, bitsandbytes: pip install 'clora[4bit]'), "
                    "frozen, as QLoRA does; for the methods that train adapters only",
    "eval_all": "evaluate every task after each stage, not only the seen ones (gives FWT)",
    "zero_shot": "evaluate the untouched base model first (the zero-shot row, gives FWT)",
    "checkpoint_every": "write a step checkpoint every N optimizer steps (and after a stage's last step); 0: none",
    "on_nonfinite": "a NaN/inf loss or gradient: stop the stage (keeping the last checkpoint) or skip the batch",
    "report_to": "experiment trackers, comma-separated: tensorboard (the run folder's tb/), mlflow, wandb; or none",
}
_SHORT = {"method_options": ["-o", "--method-option"]}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # The promised one line, not argparse's usage dump: `--help` has the usage.
        print(f"clora: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        self.exit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default exactly once: the help's own words where it names it (a None default
    means something in words), else the value; none for on/off flags, which are off unless given."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if "(default:" in help_text or action.nargs == 0:
            return help_text
        if action.default is None:
            return help_text + " (default: none)"
        return super()._get_help_string(action)


_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.IGNORECASE)


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """`--lr -1e-3` as `--lr=-1e-3`: argparse (before Python 3.13) takes "-1e-3" for an option and
    stops with its usage; joined, the value reaches validation, whose error names what is wrong."""
    joined: list[str] = []
    for word in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _NUMBER.fullmatch(word):
            joined[-1] += "=" + word
        else:
            joined.append(word)
    return joined


_GRID_FIELDS = {"method", "order", "tasks", "seed"}  # `clora compare` takes these as lists


def _add_config_options(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in skip or f.name == "tasks_digest":  # computed from the data, never given
            continue
        flags = _SHORT.get(f.name, [f"--{f.name.replace('_', '-')}"])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        hint, help_text = hints[f.name], _HELP.get(f.name, " ")
        if hint is bool and default:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=True,
                                help=help_text)
        elif hint is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
        elif f.name == "method_options":
            parser.add_argument(*flags, dest=f.name, action="append", default=[], metavar="KEY=VALUE", help=help_text)
        elif f.name == "target_modules":
            parser.add_argument(*flags, dest=f.name, type=lambda s: [m for m in s.split(",") if m], help=help_text)
        else:
            kind = next((t for t in (int, float) if t in typing.get_args(hint) or t is hint), str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=default, help=help_text)


def _run_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("run", help="run a continual method over a task order", formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE",
                        help="run options from a YAML or JSON file, keys as in a run folder's config.json (which is "
                             "itself one: it replays the run); options given on the command line win")
    _add_config_options(parser)
    parser.add_argument("--output", help="run directory (default: runs/<method>-<order>)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --output after its last finished stage")
    group.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    return parser


def _compare_parser(sub) -> None:
    parser = sub.add_parser("compare", help="methods x orders x seeds, one table and one plot (resumable)",
                            formatter_class=_HelpFormatter)
    parser.add_argument("--methods", required=True, help="comma-separated methods")
    parser.add_argument("--orders", default="1", help="comma-separated task orders")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--for", dest="per_method", nargs=2, action="append", default=[], metavar=("METHOD", "KEY=VALUE"),
                        help="per-method override of a run option (e.g. lr=1e-4) or a method option (repeatable)")
    parser.add_argument("--settings", metavar="CHOSEN_JSON",
                        help="each method's settings chosen by `clora tune` (its chosen.json), applied like --for; "
                             "an explicit --for wins")
    parser.add_argument("--pairs", metavar="A/B,...",
                        help="the pairs of methods to test, declared before the results are seen (Holm corrects over "
                             "these only); * is every other method, e.g. '*/seq-lora,gorp/galore' (default: every pair)")
    parser.add_argument("--output", required=True, help="comparison directory; rerun the same command to resume")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each in its own process (logs in OUTPUT/logs/); several share a GPU well")
    parser.add_argument("--one-at-a-time", metavar="METHOD,...", default="",
                        help="with --jobs: never two runs of these methods at once (a method whose runs need more "
                             "memory than half the machine's, e.g. osf on a 24 GiB machine); other runs fill the slots")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: summarise the runs as they stand (partial ones marked)")
    parser.add_argument("--page", help="also write the comparison as a section of this Markdown page (e.g. docs/results.md)")
    parser.add_argument("--section", help="that section's name (default: the --output folder's name)")
    parser.add_argument("--title", help="that section's heading (default: the methods and orders)")
    _add_config_options(parser, skip=_GRID_FIELDS)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="clora", description="Continual low-rank fine-tuning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = _run_parser(sub)
    _compare_parser(sub)
    _tune_parser(sub)
    _export_parser(sub)
    sub.add_parser("methods", help="list the methods and their options")
    tasks = sub.add_parser("tasks", help="list the benchmark's tasks and orders")
    tasks.add_argument("--data-dir")
    try:
        words = _join_negative_numbers(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(words)
    except SystemExit as exc:  # --help, or a parse error already printed as one line
        return int(exc.code or 0)
    try:
        if args.command == "run":
            _refuse_two_task_sources(run_parser, words[1:])
            _apply_config_file(args, run_parser, words[1:])
            return _run(args)
        if args.command == "compare":
            return _compare(args, argv)
        if args.command == "tune":
            return _tune(args, argv)
        if args.command == "export":
            return _export(args)
        if args.command == "methods":
            return _methods()
        return _tasks(args.data_dir)
    except UserError as exc:
        print(f"clora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clora: interrupted; finished stages are kept, continue with --resume", file=sys.stderr)
        return 130


_ORDER_KEYS = ("order", "tasks", "tasks_file")  # one of them names the tasks
_COMPUTED = {"tasks_digest"}  # in a run's config.json, but computed from the data, never given


def _apply_config_file(args, parser: argparse.ArgumentParser, words: list[str]) -> None:
    """--config FILE: its options replace the defaults, and only the options actually given on the command
    line override it (an option given with its default value too). `-o` adds to the file's method
    options, a repeated key winning; naming the tasks on the command line replaces the file's way."""
    if args.config is None:
        return
    from . import configfile

    values = {k: v for k, v in configfile.load(args.config).items() if k not in _COMPUTED}
    given = _given(parser, words)
    for key, value in values.items():
        if key == "method_options" and key in given:
            args.method_options = list(value) + list(args.method_options)
        elif key not in given:
            setattr(args, key, value)
    if any(k in given for k in _ORDER_KEYS):
        for key in _ORDER_KEYS:
            if key not in given and hasattr(args, key):
                setattr(args, key, parser.get_default(key))


def _refuse_two_task_sources(parser: argparse.ArgumentParser, words: list[str]) -> None:
    """`--order 1` is also the default, so only the words typed tell `--order 1 --tasks-file F` (refused)
    from `--tasks-file F`."""
    given = _given(parser, words) & {"order", "tasks", "tasks_file"}
    if "tasks_file" in given and len(given) > 1:
        raise UserError("give either --tasks-file or --order/--tasks, not both: the file sets the task order")


def _given(parser: argparse.ArgumentParser, words: list[str]) -> set[str]:
    """The destinations of the options present in `words`: parsed again with every default suppressed,
    so only what the user typed lands in the namespace."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(words)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))


def _run(args) -> int:
    from .continual import run

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if f.name != "tasks_digest"}
    if (values["tasks"] is not None or values["tasks_file"] is not None) and values["order"] == RunConfig.order:
        values["order"] = None  # --tasks or --tasks-file replaces the default order
    config = RunConfig(**values)
    output = args.output or f"runs/{config.method}-{config.order or _stream_label(config) or 'custom'}"
    result = run(config, output, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":
        return 0  # one summary line per run, not one per process
    m = result["metrics"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"\n{config.method}: AA {fmt(m['AA'])}  BWT {fmt(m['BWT'])}  FWT {fmt(m['FWT'])}  "
          f"forgetting {fmt(m['forgetting'])}  ({result['seconds']:.0f} s)  -> {output}/report.md")
    return 0


def _compare(args, argv: list[str] | None) -> int:
    import shlex
    from pathlib import Path

    from . import compare, preflight
    from .continual import finished, run
    from .parallel import run_parallel

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
              if f.name not in _GRID_FIELDS and f.name != "tasks_digest"}
    base = RunConfig(**values, tasks=None)
    methods = [m for m in args.methods.split(",") if m]
    orders = [o for o in args.orders.split(",") if o]
    if base.tasks_file is not None:
        if args.orders != "1":  # the parser's default: --orders was not given
            raise UserError("give either --tasks-file or --orders, not both: the file sets the task order")
        orders = [_stream_label(base)]  # one "order": the file's; its runs' folders are named after it
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    declared = compare.parse_pairs(args.pairs, methods) if args.pairs is not None else None
    per_method = _per_method(args.per_method, methods, args.settings)
    grid = compare.expand(base, methods, orders, seeds, per_method)
    for _, _, _, config in grid:  # fail on a bad option before hours of work, not in the middle
        config.validate()
    if args.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {args.jobs}")
    labels = list(dict.fromkeys(label for label, _, _, _ in grid))
    one_at_a_time = frozenset(m for m in args.one_at_a_time.split(",") if m)
    if one_at_a_time - set(labels):
        raise UserError(f"--one-at-a-time names {', '.join(sorted(one_at_a_time - set(labels)))}, "
                        f"which is not one of --methods ({', '.join(labels)})")
    output = Path(args.output)
    if not args.report_only:  # before the comparison's folder is created (see clora.preflight)
        preflight.check_grid(grid, output)
    parallel = args.jobs > 1 and not args.report_only
    failed = []
    if parallel:
        # A finished run is only summarised again: done here, it costs no process start-up (an import of
        # torch and transformers per run, minutes over a grid of a hundred finished runs).
        done = [g for g in grid if finished(g[3], compare.run_dir_of(output, *g[:3]))]
        compare.run_grid(done, output, run)
        failed = run_parallel([g for g in grid if g not in done], output, args.jobs, one_at_a_time)
    results = compare.run_grid(grid, output, run, report_only=args.report_only or parallel)
    if not results:
        raise UserError(f"{output} holds none of these runs yet" + (f"; failed: {', '.join(failed)}" if failed else ""))
    words = _without_run_control(argv if argv is not None else sys.argv[1:])
    command = "clora " + " ".join(shlex.quote(a) for a in words)
    missing = compare.missing_runs(grid, results)
    rows = compare.write_summary(output, results, command, missing, declared)
    if args.page:
        title = args.title or f"{', '.join(methods)} on order(s) {', '.join(orders)}"
        compare.write_page(Path(args.page), args.section or output.name, title, results, rows, command,
                           output / "summary.png", missing, declared)
    print((output / "summary.md").read_text())
    if failed:  # the summary holds what finished (failed runs as partial or absent); the error says what did not
        raise UserError(f"{len(failed)} of {len(grid)} runs failed: {'; '.join(failed)}")
    return 0 if rows else 1


def _stream_label(config: RunConfig) -> str | None:
    """What names a --tasks-file's order in folder names and tables: the file's name without suffix."""
    from pathlib import Path

    return Path(config.tasks_file).stem if config.tasks_file else None


def _without_run_control(words: list[str]) -> list[str]:
    """The command recorded beside a summary: how the runs were carried out (--report-only, --jobs N,
    --one-at-a-time M) does not change what they computed."""
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--jobs", "--one-at-a-time"):
            skip = True
        elif word != "--report-only" and not word.startswith(("--jobs=", "--one-at-a-time=")):
            kept.append(word)
    return kept


def _per_method(pairs: list[list[str]], methods: list[str], settings: str | None) -> dict[str, list[str]]:
    """`--for` pairs by method, after the tuned settings of `--settings` (an explicit --for wins)."""
    from pathlib import Path

    from .tune import settings_for

    per_method = settings_for(Path(settings), methods) if settings else {}
    for method, pair in pairs:
        key = pair.partition("=")[0].strip().replace("-", "_")
        kept = [p for p in per_method.get(method, []) if p.partition("=")[0].strip().replace("-", "_") != key]
        per_method[method] = kept + [pair]
    return per_method


_TUNE_SKIP = {"method", "method_options", "eval_split", "test_per_task"}  # set by the search; no test item is read


def _tune_parser(sub) -> None:
    parser = sub.add_parser("tune", help="choose each method's hyper-parameters on the dev split, same budget for all",
                            formatter_class=_HelpFormatter)
    parser.add_argument("--methods", required=True, help="comma-separated methods")
    parser.add_argument("--trials", type=int, required=True, help="the budget: trials per method, the same for every method")
    parser.add_argument("--output", required=True,
                        help="search folder: study.db, <method>/trial-<n>/ runs, chosen.json; rerun to resume")
    parser.add_argument("--for", dest="per_method", nargs=2, action="append", default=[], metavar=("METHOD", "KEY=VALUE"),
                        help="a fixed (not searched) run or method option for one method (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes on the search (logs in OUTPUT/logs/)")
    parser.add_argument("--storage", help="database URL shared by workers on several machines "
                                          "(default: sqlite:///OUTPUT/study.db)")
    parser.add_argument("--study", default="clora-tune", help="name prefix of the studies in the database")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler")
    parser.add_argument("--page", help="also write the search as a section of this Markdown page (e.g. docs/tuning.md)")
    parser.add_argument("--section", help="that section's name (default: the --output folder's name)")
    parser.add_argument("--title", help="that section's heading (default: the methods)")
    _add_config_options(parser, skip=_TUNE_SKIP)


def _tune(args, argv: list[str] | None) -> int:
    import shlex
    from pathlib import Path

    from . import compare, tune
    from .atomic import write_json_atomic

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
              if f.name not in _TUNE_SKIP and f.name != "tasks_digest"}
    if (values["tasks"] is not None or values["tasks_file"] is not None) and values["order"] == RunConfig.order:
        values["order"] = None  # --tasks or --tasks-file replaces the default order
    base = RunConfig(**values, eval_split="dev")
    methods = [m for m in args.methods.split(",") if m]
    if not methods or len(set(methods)) != len(methods):
        raise UserError(f"--methods must name each method once, got {args.methods!r}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {args.jobs}")
    per_method = _per_method(args.per_method, methods, None)
    label = base.order if base.order is not None else _stream_label(base) or base.tasks.replace(",", "+")
    configs = {m: dataclasses.replace(config, order=base.order, tasks=base.tasks)
               for m, _, _, config in compare.expand(base, methods, [label], [base.seed], per_method)}
    output = Path(args.output)
    url = args.storage or f"sqlite:///{output.resolve() / 'study.db'}"
    search = tune.Search(output=str(output), storage=url, study=args.study, budget=args.trials, seed=args.sampler_seed,
                         configs={m: c.to_dict() for m, c in configs.items()},
                         fixed={m: per_method.get(m, []) for m in methods})
    tune.check(search)
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a directory")
    if (output.is_dir() and any(output.iterdir()) and not (output / "tune.json").is_file()
            and not (output / "study.db").is_file()):
        raise UserError(f"output {output} already holds other files; give an empty or new folder, or the folder of "
                        "an earlier search to resume it")
    if args.storage is None:
        output.mkdir(parents=True, exist_ok=True)  # the database lives there
    tune.open_studies(search)
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "tune.json", {"storage": url, "study": args.study})
    try:
        if args.jobs > 1:
            failed = tune.run_workers(search, args.jobs)
        else:
            failed = []
            tune.work(search)
    except KeyboardInterrupt:
        print("clora: interrupted; finished trials are kept and the interrupted ones queued again: rerun the same "
              "command to resume the search", file=sys.stderr)
        return 130
    words = _without_run_control(argv if argv is not None else sys.argv[1:])
    command = "clora " + " ".join(shlex.quote(a) for a in words)
    found = tune.results(search)
    tune.write_outputs(search, found, command, Path(args.page) if args.page else None,
                       args.section or output.name, args.title or f"Tuning {', '.join(methods)} on the dev split")
    print((output / "summary.md").read_text())
    if failed:
        raise UserError(f"{len(failed)} of {args.jobs} workers failed: {'; '.join(failed)}")
    unchosen = [m for m, r in found.items() if r["chosen"] is None]
    if unchosen:
        print(f"clora tune: no trial of {', '.join(unchosen)} completed, so nothing was chosen for it "
              "(see the errors above)", file=sys.stderr)
    return 1 if unchosen else 0


def _export_parser(sub) -> None:
    parser = sub.add_parser("export", help="a run's model after one stage, as a standalone Hugging Face folder",
                            formatter_class=_HelpFormatter)
    parser.add_argument("run", help="the run folder")
    parser.add_argument("--stage", type=int, help="the stage to export, 1-based (default: the last complete stage)")
    parser.add_argument("--to", required=True, help="a new or empty folder to write the model to")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the stage's plain PEFT adapter (and tokenizer), not the merged model")


def _export(args) -> int:
    from .export import export

    path = export(args.run, args.to, args.stage, args.adapter_only)
    print(f"clora: exported {args.run} -> {path} (its README.md says what it holds)")
    return 0


def _methods() -> int:
    from .methods import registry
    from .methods.base import describe_options

    for name, cls in registry().items():
        options = " ".join(describe_options(cls.Options)) or "(no options)"
        print(f"{name:14s} {cls.summary}\n{'':14s} options: {options}")
        if cls.defaults_note:
            print(f"{'':14s} note: {cls.defaults_note}")
    return 0


def _tasks(data_dir: str | None) -> int:
    from .benchmark import ORDERS, Benchmark, default_benchmark_dir

    bench = Benchmark(data_dir or default_benchmark_dir())
    print("tasks: " + ", ".join(bench.task_names()))
    for name, order in ORDERS.items():
        print(f"order {name}: {', '.join(order)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
