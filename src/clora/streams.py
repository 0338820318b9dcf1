"""A task stream described by a small YAML (or JSON) file: a practitioner's own tasks, from ordinary
data files, in the file's order, without re-laying them into the CL_Benchmark layout.

    tasks:
      - name: sentiment                 # unique; names the task in the matrix and the stage folders
        train: sentiment/train.jsonl    # .jsonl, .json, .csv, .parquet, or a `save_to_disk` folder
        test: sentiment/test.jsonl
        dev: sentiment/dev.jsonl        # optional; without it --dev-per-task holds items out of train
        input_field: text               # default "input"
        output_field: label             # default "output"
        instruction: "Is the review positive or negative?"   # optional, a line before each input
        template: "{input}\\nAnswer:"    # optional, the default; "{input}" is the item's text
        labels: [positive, negative]    # optional: a classification, every answer must be one of them
        metric: exact_match             # exact_match | rouge_l; default exact_match with labels, else rouge_l

Paths are relative to the stream file. Files are read with the Hugging Face `datasets` library. A task
becomes an ordinary `clora.benchmark.Task`, sampled by the same `sample_splits` as the benchmark's tasks,
so caps, the dev split and everything downstream behave as they do on the benchmark. Every mistake is a
`UserError` naming the file and, for an item, its line (JSONL) or row, raised before a run folder exists.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .benchmark import Item, Task, _sample, sample_splits
from .errors import UserError

METRICS = ("exact_match", "rouge_l")
DEFAULT_TEMPLATE = "{input}\nAnswer:"
_KEYS = {"name", "train", "test", "dev", "input_field", "output_field", "instruction", "template", "labels", "metric"}
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    sources: dict[str, Path]  # split -> file or folder
    input_field: str
    output_field: str
    template: str  # the instruction already folded in
    instruction: str | None
    labels: list[str] | None
    metric: str


def read_stream(path: str | Path) -> list[TaskSpec]:
    """The tasks of a stream file, in order, each checked for everything but its data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tasks file {path} does not exist")
    raw = _parse(path)
    tasks = raw.get("tasks") if isinstance(raw, dict) else raw
    if not isinstance(tasks, list) or not tasks:
        raise UserError(f"{path}: expected `tasks:` followed by a non-empty list of tasks")
    specs: list[TaskSpec] = []
    for i, entry in enumerate(tasks, 1):
        where = f"{path}: task {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} is not a mapping of name, train, test, ...")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise UserError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(_KEYS))}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise UserError(f"{where} needs a `name` (a non-empty string without '/')")
        where = f"{path}: task {name!r}"
        if name in {s.name for s in specs}:
            raise UserError(f"{where} is named twice; task names must be unique")
        sources = {}
        for split in ("train", "test", "dev"):
            value = entry.get(split)
            if value is None and split != "dev":
                raise UserError(f"{where} needs a `{split}` file")
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise UserError(f"{where}: `{split}` must be a path")
                source = path.parent / value
                if not source.exists():
                    raise UserError(f"{where}: {split} file {source} does not exist")
                sources[split] = source
        texts = {}
        for key, default in (("input_field", "input"), ("output_field", "output"), ("instruction", None),
                             ("template", DEFAULT_TEMPLATE)):
            value = entry.get(key, default)
            if value is not None and (not isinstance(value, str) or not value):
                raise UserError(f"{where}: `{key}` must be a non-empty string")
            texts[key] = value
        if "{input}" not in texts["template"]:
            raise UserError(f"{where}: `template` must contain {{input}}, where each item's text goes")
        labels = entry.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not labels or not all(isinstance(x, (str, int, float)) for x in labels):
                raise UserError(f"{where}: `labels` must be a non-empty list of strings")
            labels = [str(x) for x in labels]
            if len(set(labels)) != len(labels):
                raise UserError(f"{where}: `labels` lists a label twice")
        metric = entry.get("metric", "exact_match" if labels else "rouge_l")
        if metric not in METRICS:
            raise UserError(f"{where}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
        instruction = texts["instruction"]
        template = (instruction.rstrip("\n") + "\n" if instruction else "") + texts["template"]
        specs.append(TaskSpec(name, sources, texts["input_field"], texts["output_field"], template, instruction,
                              labels, metric))
    return specs


def load_stream(path: str | Path, train_cap: int | None = None, test_cap: int | None = None, sample_seed: int = 0,
                dev_cap: int | None = None, max_new_tokens: int = 64) -> list[Task]:
    """Every task of the stream file, read, validated as a whole and sampled like a benchmark task."""
    tasks = []
    for spec in read_stream(path):
        split_items = {split: _read_items(source, spec) for split, source in spec.sources.items()}
        train, test, dev = sample_splits(spec.name, split_items["train"], split_items["test"], train_cap, test_cap,
                                         sample_seed, None if "dev" in split_items else dev_cap)
        if "dev" in split_items:  # a dev file of its own: the cap samples it, the training file stays whole
            dev = _sample(split_items["dev"], dev_cap, f"{spec.name}:dev:{sample_seed}")
        tasks.append(Task(name=spec.name, group=Path(path).stem, labels=spec.labels or [],
                          instruction=spec.instruction, train=train, test=test, dev=dev, metric=spec.metric,
                          template=spec.template, max_new_tokens=None if spec.labels else max_new_tokens))
    return tasks


def digest(path: str | Path) -> dict[str, str]:
    """Content hashes of the stream file and of every data file it names (a folder: all its files), so
    a resume over changed data is refused like a resume with changed options."""
    path = Path(path)
    out = {path.name: _hash_files([path])}
    for spec in read_stream(path):
        for split, source in spec.sources.items():
            files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
            out[f"{spec.name}/{split}"] = _hash_files(files, source if source.is_dir() else None)
    return out


def _hash_files(files: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for f in files:
        if root is not None:
            h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _loader():
    """PyYAML's safe loader, except that yes/no/on/off stay strings: YAML 1.1 reads `labels: [yes, no]`
    as booleans, and a label set of yes/no is common. true/false are still booleans."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return Loader


def _parse(path: Path):
    import yaml  # JSON is YAML, so one parser reads both

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_loader())  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{at}: {problem}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_items(source: Path, spec: TaskSpec) -> list[Item]:
    rows, unit = _read_rows(source, spec.name)
    if not rows:
        raise UserError(f"{source}: the split is empty (task {spec.name!r})")
    lines = _line_numbers(source) if unit == "line" else None
    items = []
    for i, row in enumerate(rows):
        at = f"{source}: {unit} {lines[i] if lines else i + 1}"
        values = []
        for key in (spec.input_field, spec.output_field):
            value = row.get(key)
            if value is None:
                raise UserError(f"{at} lacks the field {key!r} (task {spec.name!r})")
            if isinstance(value, (bool, int, float)):
                value = str(value)  # a CSV column of 0/1 labels is read as numbers
            if not isinstance(value, str):
                raise UserError(f"{at} has a non-text {key!r}: {value!r}")
            values.append(value)
        if spec.labels is not None and values[1] not in spec.labels:
            raise UserError(f"{at} has the answer {values[1]!r}, not in the labels {spec.labels} of task {spec.name!r}")
        items.append(Item(sentence=values[0], label=values[1]))
    return items


def _read_rows(source: Path, task: str) -> tuple[list[dict], str]:
    """The rows of a data file or saved dataset, and what a row is called in an error (line, item, row)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if source.is_dir():
        try:
            data = datasets.load_from_disk(str(source))
        except Exception as e:  # noqa: BLE001 - any failure to read is the user's folder to fix
            raise UserError(f"{source}: not a dataset saved with save_to_disk ({_first_line(e)})") from None
        if isinstance(data, datasets.DatasetDict):
            raise UserError(f"{source} holds several splits ({', '.join(data)}); name one split's folder, "
                            f"e.g. {source / next(iter(data))}")
        return data.to_list(), "row"
    builder = _BUILDERS.get(source.suffix.lower())
    if builder is None:
        raise UserError(f"{source}: unknown file type {source.suffix!r} for task {task!r}; use "
                        f"{', '.join(_BUILDERS)} or a saved dataset folder")
    if source.stat().st_size == 0:
        raise UserError(f"{source}: the file is empty (task {task!r})")
    try:
        data = datasets.load_dataset(builder, data_files=str(source), split="train")
    except Exception as e:  # noqa: BLE001 - a file datasets cannot parse is the user's to fix
        if "corresponds to no data" in str(e):  # how datasets says a file holds no rows (blank lines, [])
            raise UserError(f"{source}: the split is empty (task {task!r})") from None
        raise UserError(f"{source}: cannot read it as {source.suffix[1:]} ({_first_line(e)})") from None
    unit = {".jsonl": "line", ".json": "item", ".csv": "row"}.get(source.suffix.lower(), "row")
    return data.to_list(), unit


def _line_numbers(source: Path) -> list[int]:
    """The 1-based line of each JSONL record (blank lines hold none), for errors that point at an item."""
    with open(source, encoding="utf-8", errors="replace") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _first_line(exc: BaseException) -> str:
    text = str(exc.__cause__ or exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
