"""The continual-learning benchmark: task orders, loading, prompts and exact-match scoring.

A benchmark is any directory in the CL_Benchmark layout (see the README inside the shipped
archive): ``root/<group>/<dataset>/{train,test,labels}.json`` plus ``root/instruction_config.json``.
A task is named by its dataset directory; ``dev.json`` is never read. The 15-task benchmark ships
as ``data/CL_Benchmark.tar.xz`` and :func:`default_benchmark_dir` unpacks it once into the cache
(``$CLORA_CACHE`` or ``~/.cache/clora``). Users can point :class:`Benchmark` at their own directory.

Caps: ``load_task(name, train_cap=n)`` keeps a random sample of ``n`` items of the split, drawn by
``random.Random(f"{name}:{split}:{sample_seed}")`` and kept in the file's order, so a run is
reproducible and the same seed gives the same items everywhere. ``None`` or a cap at least the
split's size keeps the whole split. The whole split is validated either way.

Dev split: ``load_task(name, dev_cap=n)`` sets aside ``n`` items of the *training file* as
``Task.dev``, drawn by ``random.Random(f"{name}:dev:{sample_seed}")`` from the training items whose
sentence is not in the test file, so hyper-parameters can be chosen without reading a test item. The
dev sample depends on neither the train cap nor the method nor the run's seed. The training sample
never holds a dev sentence: it is the sample a run without a dev split draws, less the items the dev
split took, topped up from the remaining items (``{name}:train-refill:{sample_seed}``). So a run
without ``dev_cap`` keeps exactly the items it always had, and one with it changes only the items it
must.

Every mistake in the user's input raises :class:`clora.errors.UserError` with a one-line message
naming the file, item or option at fault.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import random
import shutil
import string
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from clora.errors import UserError

ORDERS: dict[str, list[str]] = {
    "1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "4": ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2",
          "dbpedia", "agnews", "MultiRC", "yahoo"],
    "5": ["MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2",
          "dbpedia", "agnews", "yelp", "amazon", "yahoo"],
    "6": ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia",
          "agnews", "yahoo", "MultiRC", "BoolQA", "WiC"],
    "TC-3": ["dbpedia", "yahoo", "agnews"],
}
# The 15-task orders, where the published protocol trains MNLI for two epochs.
LONG_ORDERS = {"4", "5", "6"}

ARCHIVE = Path(__file__).parent / "data" / "CL_Benchmark.tar.xz"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Item:
    sentence: str
    label: str


@dataclass
class Task:
    name: str
    group: str
    labels: list[str]
    instruction: str | None  # None: the group has no instruction (COPA), so no Option line either
    train: list[Item]
    test: list[Item]
    dev: list[Item] = field(default_factory=list)  # held out of the training file (dev_cap), never trained on
    # Tasks of a --tasks-file (clora.streams) differ from the benchmark's only in these three: R holds
    # `metric` ("exact_match", or "rouge_l" for free-text answers), the prompt is `template` with
    # "{input}" standing for the item's text, and generation stops after at most `max_new_tokens`.
    metric: str = "exact_match"
    template: str | None = None
    max_new_tokens: int | None = None

    def prompt(self, item: Item) -> str:
        if self.template is not None:
            return self.template.replace("{input}", item.sentence)
        # Byte for byte the published protocol, including the space before the newline after
        # the options; the instruction already ends with "\n".
        head = f"Task:{self.group}\nDataset:{self.name}\n"
        if self.instruction is None:
            return f"{head}{item.sentence}\nAnswer:"
        return f"{head}{self.instruction}Option: {', '.join(self.labels)} \n{item.sentence}\nAnswer:"


def _read_json(path: Path):
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


@functools.cache
def _archive_digest() -> str:
    return hashlib.sha256(ARCHIVE.read_bytes()).hexdigest()[:16]


def default_benchmark_dir() -> Path:
    """The shipped benchmark, unpacked once into the cache; returns its CL_Benchmark directory."""
    cache = Path(os.environ.get("CLORA_CACHE") or Path.home() / ".cache" / "clora")
    # Keyed on the archive's content, so a newer archive never reuses a stale unpacked copy.
    target = cache / f"benchmark-{_archive_digest()}"
    if (target / "CL_Benchmark").is_dir():
        return target / "CL_Benchmark"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
    except OSError as e:
        raise UserError(f"cannot write the cache dir {cache} ({e.strerror}); set CLORA_CACHE") from None
    try:
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(tmp, filter="data")
        try:
            # Atomic: concurrent runs never see a half-unpacked benchmark.
            os.replace(tmp, target)
        except OSError:
            if not (target / "CL_Benchmark").is_dir():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "CL_Benchmark"


def _zero_shot_instruction(entries) -> str | None:
    objects = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    preferred = [e for e in objects if e.get("instruction_type") == "zero-shot"] or objects
    return preferred[0].get("instruction") if preferred else None


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


class Benchmark:
    """A benchmark directory. Only the instruction file is read up front; tasks load on demand."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"benchmark dir {self.root} does not exist")
        config_path = self.root / "instruction_config.json"
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: expected a JSON object of group -> instructions")
        self._instructions: dict[str, str] = {}
        for group, entries in config.items():
            text = _zero_shot_instruction(entries)
            if not isinstance(text, str):
                raise UserError(f"{config_path}: group {group!r} needs a list of "
                                '{"instruction_type": "zero-shot", "instruction": <str>} objects')
            self._instructions[group] = text
        # name -> (group, dataset dir), found by listing only: parsing every split here would
        # read ~47 MB of JSON for the full benchmark.
        self._tasks: dict[str, tuple[str, Path]] = {}
        for group_dir in _subdirs(self.root):
            for task_dir in _subdirs(group_dir):
                if task_dir.name in self._tasks:
                    other = self._tasks[task_dir.name][1]
                    raise UserError(f"task name {task_dir.name!r} appears twice: {other} and {task_dir}")
                self._tasks[task_dir.name] = (group_dir.name, task_dir)

    def task_names(self) -> list[str]:
        return list(self._tasks)

    def _check_name(self, name: str, context: str = "") -> None:
        if name in self._tasks:
            return
        known = sorted(self._tasks)
        by_lower = {k.lower(): k for k in known}  # "sst-2" should suggest "SST-2"
        hint = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=1)]
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise UserError(f"unknown task {name!r}{context} in {self.root}; "
                        + (f"did you mean {hint[0]!r}? " if hint else "")
                        + f"known tasks: {shown or '(none)'}")

    def load_task(self, name: str, train_cap: int | None = None, test_cap: int | None = None,
                  sample_seed: int = 0, dev_cap: int | None = None) -> Task:
        for split, cap in zip((*SPLITS, "dev"), (train_cap, test_cap, dev_cap)):
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
                raise UserError(f"{split} cap must be a positive integer, got {cap!r}")
        self._check_name(name)
        group, task_dir = self._tasks[name]
        labels_path = task_dir / "labels.json"
        labels = _read_json(labels_path)
        if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
                or len(set(labels)) != len(labels)):
            raise UserError(f"{labels_path}: expected a non-empty JSON list of distinct label strings")
        full = {split: _load_split(task_dir / f"{split}.json", labels) for split in SPLITS}
        train, test, dev = sample_splits(name, full["train"], full["test"], train_cap, test_cap, sample_seed, dev_cap)
        return Task(name=name, group=group, labels=labels, instruction=self._instructions.get(group),
                    train=train, test=test, dev=dev)


def _load_split(path: Path, labels: list[str]) -> list[Item]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of items, got a JSON {type(data).__name__}")
    if not data:
        raise UserError(f"{path}: the split is empty")
    allowed = set(labels)
    items = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise UserError(f"{path}: item {i} is not a JSON object")
        for key in ("sentence", "label"):
            if key not in raw:
                raise UserError(f"{path}: item {i} lacks {key!r}")
            if not isinstance(raw[key], str):
                raise UserError(f"{path}: item {i} has a non-string {key!r}: {raw[key]!r}")
        if raw["label"] not in allowed:
            raise UserError(f"{path}: item {i} has label {raw['label']!r}, not in labels.json {labels}")
        items.append(Item(sentence=raw["sentence"], label=raw["label"]))
    return items


def sample_splits(name: str, train: list[Item], test: list[Item], train_cap: int | None, test_cap: int | None,
                  sample_seed: int, dev_cap: int | None) -> tuple[list[Item], list[Item], list[Item]]:
    """(train, test, dev) samples of a task's whole splits, as the module docstring describes; every task
    source (a benchmark directory, a --tasks-file) draws through this, so a cap means the same everywhere."""
    test_sample = _sample(test, test_cap, f"{name}:test:{sample_seed}")
    if dev_cap is None:
        return _sample(train, train_cap, f"{name}:train:{sample_seed}"), test_sample, []
    dev, train_sample = _split_dev(train, test, name, dev_cap, train_cap, sample_seed)
    return train_sample, test_sample, dev


def _sample(items: list[Item], cap: int | None, key: str) -> list[Item]:
    return [items[i] for i in _sample_indices(len(items), cap, key)]


def _sample_indices(n: int, cap: int | None, key: str) -> list[int]:
    if cap is None or cap >= n:
        return list(range(n))
    return sorted(random.Random(key).sample(range(n), cap))


def _split_dev(train: list[Item], test: list[Item], name: str, dev_cap: int, train_cap: int | None,
               sample_seed: int) -> tuple[list[Item], list[Item]]:
    """(dev items, training sample) out of the training file; see the module docstring."""
    # Identity is the sentence: a dev item that reads like a test item would let tuning see the test.
    test_sentences = {item.sentence for item in test}
    candidates = [i for i, item in enumerate(train) if item.sentence not in test_sentences]
    if dev_cap >= len(candidates):
        raise UserError(f"task {name}: a dev split of {dev_cap} items leaves no training items "
                        f"({len(candidates)} items of its train.json can be dev items)")
    dev_index = sorted(random.Random(f"{name}:dev:{sample_seed}").sample(candidates, dev_cap))
    dev_sentences = {train[i].sentence for i in dev_index}
    usable = [i for i, item in enumerate(train) if item.sentence not in dev_sentences]
    kept = [i for i in _sample_indices(len(train), train_cap, f"{name}:train:{sample_seed}")
            if train[i].sentence not in dev_sentences]
    wanted = len(usable) if train_cap is None else min(train_cap, len(usable))
    taken = set(kept)
    rest = [i for i in usable if i not in taken]
    refill = random.Random(f"{name}:train-refill:{sample_seed}").sample(rest, wanted - len(kept))
    return [train[i] for i in dev_index], [train[i] for i in sorted(kept + refill)]


def resolve_tasks(order: str | None, tasks: str | None, benchmark: Benchmark) -> tuple[str, list[str]]:
    """(order label, task names) from exactly one of a named order or a comma-separated task list."""
    if (order is None) == (tasks is None):
        raise UserError("give exactly one of an order (--order) or a task list (--tasks)")
    if order is not None:
        if order not in ORDERS:
            raise UserError(f"unknown order {order!r}; valid orders: {', '.join(ORDERS)}")
        label, names = order, list(ORDERS[order])
    else:
        label, names = "custom", [t.strip() for t in tasks.split(",")]
        if any(not n for n in names):
            raise UserError(f"task list {tasks!r} has an empty name")
        seen = set()
        for n in names:
            if n in seen:
                raise UserError(f"task list {tasks!r} names {n!r} twice")
            seen.add(n)
    for n in names:
        benchmark._check_name(n, f" (order {label})")
    return label, names


def epochs_for(task_name: str, order_label: str, base_epochs: int) -> int:
    return base_epochs * 2 if (order_label in LONG_ORDERS and task_name == "MNLI") else base_epochs


_STRIP_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().translate(_STRIP_PUNCT).split())


def exact_match(prediction: str, label: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(label)
