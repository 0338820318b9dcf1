"""`clora tune`: choose each method's hyper-parameters on the dev split, with the same budget for every
method, so that a comparison never rests on settings picked by looking at test items.

Each method has one Optuna study ("<study>/<method>") in a shared database (default
`sqlite:///<output>/study.db`). A trial is an ordinary clora run under `<output>/<method>/trial-<n>/`
with `eval_split="dev"`: it trains on the training sample and is scored by its AA over the dev items
(held out of the training files, see `clora.benchmark`); the test items are never loaded into it.

Budget: every method gets `budget` trials that finish (complete, or failed with an error, which is
recorded and costs its trial: a setting that diverges is a bad setting). Workers take the method with
the fewest trials first, so a search stopped half way leaves every method with the same number. A
trial whose process died (Ctrl-C, or no heartbeat for GRACE_S seconds) costs nothing: it is queued
again with the same parameters, and the new trial continues the dead one's run folder.

Reproducible: the sampler of a method's k-th trial is TPE seeded with (seed, k), so a search that
was stopped and resumed proposes what an uninterrupted one would (with one worker; several workers
see each other's results in whatever order they finish). The first STARTUP_TRIALS trials of each
method are seeded random draws, the same for every method's shared parameter (lr).

A method's search space is the row of SEARCH_SPACES under its name, or its class attribute
`search_space` (a dict of Optuna distributions by option name), so a new method declares its own
without editing this file; keys that are RunConfig fields (lr) are run options, the others method
options.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution, distribution_to_json)
from optuna.trial import TrialState

from .atomic import write_json_atomic, write_text_atomic
from .config import RunConfig
from .errors import UserError
from .pages import update_section

# The LoRA learning rate around the SPEC §4 calibration (2e-3 on the default model).
LR = FloatDistribution(2e-4, 1e-2, log=True)
# Full-rank matrices move far more per unit of lr than a LoRA; 1e-5 (GaLore's default) left it at 0 % on dbpedia.
FULL_LR = FloatDistribution(1e-6, 3e-3, log=True)
SEARCH_SPACES: dict[str, dict[str, BaseDistribution]] = {
    "seq-lora": {"lr": LR},
    "inc-lora": {"lr": LR},
    "mtl": {"lr": LR},
    "per-task-ft": {"lr": LR},
    "o-lora": {"lr": LR, "lambda1": FloatDistribution(1e-3, 10.0, log=True)},
    "ewc": {"lr": LR, "lam": FloatDistribution(10.0, 1e6, log=True)},
    "replay": {"lr": LR, "per_task": IntDistribution(1, 32, log=True)},
    "deal": {"lr": LR, "update_lr": FloatDistribution(1e-5, 1e-2, log=True),
             "lambda1": FloatDistribution(1e-4, 1.0, log=True)},
    "galore": {"full_lr": FULL_LR},  # its LoRA is frozen at zero: the run's lr trains nothing
    "gorp": {"lr": LR, "full_lr": FULL_LR},
    "n-lora": {"lr": LR, "lambda1": FloatDistribution(1e-6, 1e-2, log=True)},
    "osf": {"full_lr": FULL_LR, "preserve": FloatDistribution(0.2, 0.9)},  # no LoRA trains: the run's lr is unused
}
STARTUP_TRIALS = 5
HEARTBEAT_S, GRACE_S = 30, 120  # a trial without a heartbeat for GRACE_S seconds is dead (killed worker)
POLL_S = 10.0
OBJECTIVE = ("dev AA: the run's average accuracy after the last task over the dev items of every task "
             "(maximised)")
_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def search_space(method: str) -> dict[str, BaseDistribution]:
    from .methods import registry

    declared = getattr(registry()[method], "search_space", None)
    return dict(declared) if declared else dict(SEARCH_SPACES.get(method, {"lr": LR}))


@dataclass
class Search:
    """What a worker needs; JSON-able, so a worker process gets it on its command line."""
    output: str
    storage: str
    study: str
    budget: int
    seed: int
    configs: dict[str, dict]  # method -> the RunConfig of its trials before the searched keys are set
    fixed: dict[str, list[str]]  # method -> its `--for KEY=VALUE` settings, which hold in the chosen setting too

    def config(self, method: str) -> RunConfig:
        return RunConfig(**self.configs[method])

    def study_name(self, method: str) -> str:
        return f"{self.study}/{method}"


def trial_config(base: RunConfig, params: dict) -> RunConfig:
    run = {k: v for k, v in params.items() if k in _RUN_FIELDS}
    options = [f"{k}={v}" for k, v in params.items() if k not in _RUN_FIELDS]
    return dataclasses.replace(base, **run, method_options=list(base.method_options) + options)


def check(search: Search) -> None:
    """Every mistake the search could make, found before anything is written: unknown methods or
    options, a search space naming an option its method lacks, bad data, a dev split too large."""
    from .continual import prepare
    from .methods import registry
    from .methods.base import parse_options
    from .models import resolve_model_dir

    if search.budget < 1:
        raise UserError(f"--trials must be a positive integer, got {search.budget}")
    known = registry()
    for method in search.configs:
        if method not in known:
            raise UserError(f"unknown method {method!r}; known methods: {', '.join(known)}")
        base = search.config(method)
        if base.dev_per_task is None:
            raise UserError("clora tune needs a dev split to score trials on: give --dev-per-task N")
        options = {f.name for f in dataclasses.fields(known[method].Options)}
        space = search_space(method)
        for key in space:
            if key not in _RUN_FIELDS and key not in options:
                raise UserError(f"the search space of {method} names {key!r}, neither a run option nor one of its "
                                f"options ({', '.join(sorted(options)) or 'none'})")
        clash = sorted({_key(pair) for pair in search.fixed.get(method, [])} & set(space))
        if clash:
            raise UserError(f"--for {method} {clash[0]}=...: {clash[0]} is what the search chooses for {method}")
        base.validate()
        parse_options(known[method].Options, base.method_options, method)
    first = search.config(next(iter(search.configs)))
    prepare(first)  # the tasks, the caps and the dev split, once: the data is the same for every method
    resolve_model_dir(first.model)


def _key(pair: str) -> str:
    return pair.partition("=")[0].strip().replace("-", "_")


def storage(url: str) -> optuna.storages.RDBStorage:
    # Heartbeats are how a worker on another machine is known to be dead; Optuna calls them experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                      grace_period=GRACE_S, heartbeat_stale_trial_callback=_continue_later)


def _continue_later(study: optuna.Study, trial) -> None:
    """A trial whose process died is queued again with the same parameters (its run folder is
    continued): a kill must neither cost a method a trial nor change what the search proposes."""
    study.enqueue_trial(trial.params, user_attrs={"continues": trial.number})


def open_studies(search: Search) -> dict[str, optuna.Study]:
    """Create the studies, or load them to resume; a study made with other settings is refused, so
    trials of two different searches never mix."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage(search.storage)
    studies = {}
    for method, config in search.configs.items():
        settings = {"config": config, "seed": search.seed,
                    "space": {k: distribution_to_json(d) for k, d in search_space(method).items()}}
        study = optuna.create_study(study_name=search.study_name(method), storage=store, direction="maximize",
                                    load_if_exists=True)
        previous = study.user_attrs.get("settings")
        if previous is None:
            study.set_user_attr("settings", settings)
        elif _comparable(previous) != _comparable(settings):
            raise UserError(f"cannot resume the search of {method} in {search.storage}: it was made with other "
                            f"settings ({_difference(previous, settings)}); use another --output or --study")
        studies[method] = study
    return studies


def _comparable(settings: dict) -> dict:
    return {**settings, "config": {k: v for k, v in settings["config"].items() if k not in RunConfig.RUN_CONTROL}}


def _difference(old: dict, new: dict) -> str:
    old, new = _comparable(old), _comparable(new)
    flat = lambda s: {**{f"config.{k}": v for k, v in s["config"].items()}, "seed": s["seed"], "space": s["space"]}  # noqa: E731
    a, b = flat(old), flat(new)
    return "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _spent(trial) -> bool:
    """Whether a trial holds (or will hold) one of its method's budgeted trials."""
    if trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def work(search: Search) -> None:
    """One worker: until every method has its budget of finished trials, run one trial of the method
    with the fewest. Several workers (processes or machines) on one database share the work."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage(search.storage)
    waiting_said = False
    while True:
        studies = {m: optuna.load_study(study_name=search.study_name(m), storage=store) for m in search.configs}
        trials = {}
        for method, study in studies.items():
            optuna.storages.fail_stale_trials(study)
            trials[method] = study.get_trials(deepcopy=False)
        spent = {m: sum(_spent(t) for t in ts) for m, ts in trials.items()}
        queued = [m for m, ts in trials.items() if any(t.state == TrialState.WAITING for t in ts)]
        free = queued or [m for m in search.configs if spent[m] < search.budget]
        if not free:
            if not any(t.state == TrialState.RUNNING for ts in trials.values() for t in ts):
                return
            if not waiting_said:
                print(f"clora tune: waiting for running trials (a killed one is retried once it has had no "
                      f"heartbeat for {GRACE_S} s)", flush=True)
                waiting_said = True
            time.sleep(POLL_S)
            continue
        method = min(free, key=lambda m: spent[m])
        rank = sum(_spent(t) for t in trials[method] if t.state != TrialState.WAITING)
        sampler = optuna.samplers.TPESampler(seed=search.seed * 1_000_003 + rank, n_startup_trials=STARTUP_TRIALS,
                                             constant_liar=True)
        study = optuna.load_study(study_name=search.study_name(method), storage=store, sampler=sampler)
        study.optimize(lambda trial: _objective(search, study, method, trial), n_trials=1, catch=(Exception,))


def _objective(search: Search, study: optuna.Study, method: str, trial: optuna.Trial) -> float:
    from .continual import run

    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _spent(t)]
    if len(before) >= search.budget and "continues" not in trial.user_attrs:
        # Another worker took the last slot between our count and this trial's creation.
        raise optuna.TrialPruned("over budget")
    for name, distribution in search_space(method).items():
        _suggest(trial, name, distribution)
    config = trial_config(search.config(method), trial.params)
    run_dir = Path(search.output) / method / f"trial-{trial.number}"
    trial.set_user_attr("run_dir", str(run_dir))
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    print(f"\nclora tune: {method} trial {trial.number}: {shown} -> {run_dir}", flush=True)
    started = time.time()
    # Everything that can fail is inside: a failure without a recorded error would cost no trial, and
    # the search would draw new trials for ever.
    try:
        earlier = trial.user_attrs.get("continues")
        if earlier is not None and not run_dir.exists() and (run_dir.parent / f"trial-{earlier}").is_dir():
            os.replace(run_dir.parent / f"trial-{earlier}", run_dir)
        has_run = (run_dir / "config.json").is_file()
        metrics = run(config, run_dir, resume=has_run, overwrite=not has_run)["metrics"]
        if metrics.get("AA") is None or not math.isfinite(metrics["AA"]):
            raise RuntimeError(f"the run gave no dev AA (metrics: {metrics})")
    except KeyboardInterrupt:
        _continue_later(study, trial)
        raise
    except Exception as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
        print(f"clora tune: {method} trial {trial.number} failed ({type(exc).__name__}: {exc}); recorded, "
              "the search goes on", flush=True)
        raise
    finally:
        trial.set_user_attr("seconds", round(time.time() - started, 1))
    print(f"clora tune: {method} trial {trial.number}: dev AA {metrics['AA']:.1f}", flush=True)
    return float(metrics["AA"])


def _suggest(trial: optuna.Trial, name: str, d: BaseDistribution):
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)


def run_workers(search: Search, jobs: int) -> list[str]:
    """`jobs` worker processes on the search (logs in `<output>/logs/`); returns those that failed."""
    from .parallel import _visible_gpus

    logs = Path(search.output) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gpus = _visible_gpus()
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    spec = json.dumps(dataclasses.asdict(search))
    processes = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for i in range(jobs):
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads), "PYTHONUNBUFFERED": "1"}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            with (logs / f"worker-{i}.log").open("a") as log:
                processes.append((subprocess.Popen([sys.executable, "-m", "clora.tune", spec], stdout=log,
                                                   stderr=subprocess.STDOUT, env=env), logs / f"worker-{i}.log"))
        print(f"clora tune: {jobs} workers started (logs in {logs})", flush=True)
        for process, _ in processes:
            process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process, _ in processes:
            if process.poll() is None:
                # SIGTERM, not SIGINT: a search started in the background of a shell has SIGINT ignored in
                # every process; the worker takes either as Ctrl-C and queues its trial again before it exits.
                process.send_signal(signal.SIGTERM)
        for process, _ in processes:
            process.wait()
    return [f"worker {i} (exit {p.returncode}, log {log})" for i, (p, log) in enumerate(processes) if p.returncode]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# -- results -------------------------------------------------------------------------------------

def results(search: Search) -> dict:
    """Per method: its trials and the chosen setting (the best complete trial; the earliest on a tie)."""
    store = storage(search.storage)
    out = {}
    for method in search.configs:
        study = optuna.load_study(study_name=search.study_name(method), storage=store)
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
        settings = None
        if best is not None:
            settings = {_key(pair): pair.partition("=")[2].strip() for pair in search.fixed.get(method, [])}
            settings.update(best.params)
        out[method] = {
            "trials": [{"number": t.number, "state": t.state.name.lower(), "params": t.params, "dev_AA": t.value,
                        "error": t.user_attrs.get("error"), "continues": t.user_attrs.get("continues"),
                        "run_dir": t.user_attrs.get("run_dir")} for t in trials],
            "complete": len(complete),
            "failed": sum(1 for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs),
            "space": {k: _describe(d) for k, d in search_space(method).items()},
            "chosen": None if best is None else {"trial": best.number, "dev_AA": best.value, "settings": settings},
        }
    return out


def _describe(d: BaseDistribution) -> str:
    if isinstance(d, CategoricalDistribution):
        return "{" + ", ".join(map(str, d.choices)) + "}"
    return f"[{_fmt(d.low)}, {_fmt(d.high)}]" + (" log" if getattr(d, "log", False) else "")


def finished(search: Search, found: dict) -> bool:
    """Every method has spent its budget (complete trials and trials failed with an error)."""
    return all(r["complete"] + r["failed"] >= search.budget for r in found.values())


def write_outputs(search: Search, found: dict, command: str, page: Path | None, section: str, title: str) -> None:
    """`chosen.json` (read by `clora compare --settings`), once the search has finished; `summary.md` and
    the page's section at any time, marked in progress until then."""
    base = search.config(next(iter(search.configs)))
    chosen = {
        "objective": OBJECTIVE, "budget": search.budget, "sampler": f"TPE, seed {search.seed}",
        "dev_per_task": base.dev_per_task, "sample_seed": base.sample_seed,
        "settings_of_the_search": {k: v for k, v in base.to_dict().items()
                                   if k not in ("method", "method_options", "lr", "eval_split")},
        "command": command,
        "methods": {m: {**r["chosen"], "complete_trials": r["complete"], "failed_trials": r["failed"]}
                    for m, r in found.items() if r["chosen"] is not None},
        "not_chosen": {m: "no complete trial" for m, r in found.items() if r["chosen"] is None},
    }
    out = Path(search.output)
    if finished(search, found):
        write_json_atomic(out / "chosen.json", chosen)
    else:  # a search stopped half way has chosen nothing yet: a table must not run on its early leader
        (out / "chosen.json").unlink(missing_ok=True)
    text = _markdown(search, found, command, title)
    write_text_atomic(out / "summary.md", text)
    if page is not None:
        update_section(page, section, text, title="# Tuning on the dev split\n")


def _markdown(search: Search, found: dict, command: str, title: str) -> str:
    base = search.config(next(iter(search.configs)))
    fixed = ", ".join(f"{k.replace('_', ' ')} {getattr(base, k)}" for k in
                      ("model", "order", "tasks", "train_per_task", "dev_per_task", "epochs", "rank", "batch_size", "seed")
                      if getattr(base, k) is not None)
    lines = [f"## {title}", "",
             f"Budget: **{search.budget} trials per method**, the same for every method (a trial that fails "
             f"costs its trial); sampler TPE seeded {search.seed}, the first {STARTUP_TRIALS} trials of each method "
             f"random. Objective: {OBJECTIVE}. The dev items ({base.dev_per_task} per task, sample seed "
             f"{base.sample_seed}) are held out of each task's training file, disjoint from the training sample; "
             f"no test item is read. Fixed settings: {fixed}.", ""]
    if not finished(search, found):
        done = sum(min(search.budget, r["complete"] + r["failed"]) for r in found.values())
        lines += [f"**Search in progress**: {done} of {search.budget * len(found)} trials finished. Nothing is "
                  "chosen until every method has its budget (no chosen.json yet); rerun the command to go on.", ""]
    chosen_column = "chosen" if finished(search, found) else "best so far"
    lines += [f"| method | searched | trials complete / failed | {chosen_column} | dev AA |", "|---|---|---:|---|---:|"]
    for method, r in found.items():
        space = "; ".join(f"{k} {v}" for k, v in r["space"].items())
        chosen = r["chosen"]
        picked = ", ".join(f"{k}={_fmt(chosen['settings'][k])}" for k in r["space"]) if chosen else "—"
        score = f"{chosen['dev_AA']:.1f} (trial {chosen['trial']})" if chosen else "—"
        lines.append(f"| {method} | {space} | {r['complete']} / {r['failed']} | {picked} | {score} |")
    for method, r in found.items():
        keys = list(r["space"])
        lines += ["", f"### {method}", "", "| trial | state | " + " | ".join(keys) + " | dev AA |",
                  "|---:|---|" + "---:|" * len(keys) + "---:|"]
        for t in r["trials"]:
            if t["state"] == "pruned":
                continue  # over-budget duplicates of a race between workers: never trained
            state = t["state"] + (f" (continues trial {t['continues']})" if t["continues"] is not None else "")
            if t["error"]:
                state += f": {t['error'][:120]}"
            elif t["state"] == "fail":
                state += " (interrupted, queued again)"
            value = f"{t['dev_AA']:.1f}" if t["dev_AA"] is not None else "—"
            mark = "" if not (r["chosen"] and r["chosen"]["trial"] == t["number"]) else (
                " **chosen**" if chosen_column == "chosen" else " (best so far)")
            lines.append(f"| {t['number']}{mark} | {state} | " + " | ".join(_fmt(t["params"].get(k, "—")) for k in keys)
                         + f" | {value} |")
    lines += ["", "Made by:", "", "```", command, "```", ""]
    return "\n".join(lines)


# -- reading the choice back ------------------------------------------------------------------------

def settings_for(path: Path, methods: list[str]) -> dict[str, list[str]]:
    """`clora compare --settings chosen.json`: each compared method's tuned settings as `--for` pairs."""
    if not path.is_file():
        raise UserError(f"--settings file {path} does not exist")
    try:
        chosen = json.loads(path.read_text())
        tuned = chosen["methods"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--settings file {path} is not a chosen.json written by clora tune") from None
    from .compare import parse_method

    specs = [parse_method(m) for m in methods]  # a variant (LABEL:METHOD) takes its method's settings
    missing = [m for _, m in specs if m not in tuned]
    if missing:
        raise UserError(f"--settings file {path} has no tuned settings for {', '.join(missing)}: tune them too, "
                        "or leave them out of --methods")
    return {label: [f"{k}={v}" for k, v in tuned[m]["settings"].items()] for label, m in specs}


if __name__ == "__main__":
    # A worker of `clora tune --jobs N`: python -m clora.tune SEARCH_JSON
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        work(Search(**json.loads(sys.argv[1])))
    except KeyboardInterrupt:
        sys.exit(130)
