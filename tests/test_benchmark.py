import json
from pathlib import Path

import pytest

from clora.benchmark import (
    LONG_ORDERS, ORDERS, Benchmark, Item, default_benchmark_dir, epochs_for, exact_match,
    normalize_answer, resolve_tasks,
)
from clora.errors import UserError


@pytest.fixture(scope="session")
def shipped_root(tmp_path_factory):
    """The shipped archive unpacked once per session into a fresh cache (tests the extraction)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLORA_CACHE", str(cache))
        root = default_benchmark_dir()
        yield root


@pytest.fixture(scope="session")
def shipped(shipped_root):
    return Benchmark(shipped_root)


def test_extraction_is_cached_and_leaves_no_temp_dirs(shipped_root, monkeypatch):
    cache = shipped_root.parent.parent
    assert shipped_root.name == "CL_Benchmark"
    assert (shipped_root / "README.md").is_file()
    assert (shipped_root / "instruction_config.json").is_file()
    assert [p.name for p in cache.iterdir()] == [shipped_root.parent.name]  # no .unpack-* left
    stamp = shipped_root.stat().st_mtime_ns
    monkeypatch.setenv("CLORA_CACHE", str(cache))
    assert default_benchmark_dir() == shipped_root
    assert shipped_root.stat().st_mtime_ns == stamp


README_SIZES = {
    "agnews": (4000, 7600, 4), "amazon": (5000, 7600, 5), "dbpedia": (3800, 3800, 14),
    "yahoo": (638, 637, 10), "yelp": (4500, 500, 5), "IMDB": (1500, 500, 2), "SST-2": (2000, 872, 2),
    "MNLI": (3000, 7469, 3), "CB": (250, 56, 3), "RTE": (2000, 277, 2), "QQP": (2000, 7600, 2),
    "BoolQA": (2000, 3270, 2), "COPA": (400, 100, 2), "MultiRC": (1500, 500, 2), "WiC": (2000, 638, 2),
}


def test_shipped_tasks_match_readme_sizes(shipped):
    assert sorted(shipped.task_names()) == sorted(README_SIZES)
    for name, (n_train, n_test, n_labels) in README_SIZES.items():
        task = shipped.load_task(name)
        assert (len(task.train), len(task.test), len(task.labels)) == (n_train, n_test, n_labels), name


# (task, test index, expected label, expected prompt) — one item per group, written out in full.
PROMPTS = [
    ("agnews", 106, "Science or Technology",
     "Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? Choose one from the option.\n"
     "Option: World, Sports, Business, Science or Technology \n"
     "Title: Creative Sound Blaster Wireless Music\n"
     "Text: &lt;strong&gt;Review&lt;/strong&gt; From PC to hi-fi via Wi-Fi\n\nAnswer:"),
    ("SST-2", 266, "Bad",
     "Task:SC\nDataset:SST-2\nWhat is the sentiment of the following paragraph? Choose one from the option.\n"
     "Option: Good, Bad \nText: bad . \nAnswer:"),
    ("CB", 14, "contradiction",
     'Task:NLI\nDataset:CB\nWhat is the logical relationship between the "sentence 1" and the "sentence 2"?'
     " Choose one from the option.\nOption: entailment, contradiction, neutral \n"
     "sentence 1: A: Your turn. B: Okay. Uh, I don't think they should abolish it.\n"
     "sentence 2: they should abolish it\nAnswer:"),
    ("QQP", 1388, "True",
     'Task:QQP\nDataset:QQP\nWhether the "first sentence" and the "second sentence" have the same meaning?'
     " Choose one from the option.\nOption: False, True \n"
     "first sentence: What is a Euro?\nsecond sentence: What is euro?\nAnswer:"),
    ("BoolQA", 2644, "True",
     "Task:BoolQA\nDataset:BoolQA\nAccording to the following passage, is the question true or false?"
     " Choose one from the option.\nOption: True, False \n"
     "question: are they going to make a punisher season 2\n"
     "passage: The Punisher (season 2) -- The season is set for release in 2019.\nAnswer:"),
    ("MultiRC", 380, "False",
     "Task:MultiRC\nDataset:MultiRC\nAccording to the following passage and question, is the candidate"
     " answer true or false? Choose one from the option.\nOption: False, True \n"
     "paragraph: Density is also an important physical property of matter. The concept of density"
     " combines what we know about an objects mass and volume. Density reflects how closely packed the"
     " particles of matter are. When particles are packed together more tightly, matter is more dense."
     " Differences in density of matter explain many phenomena. It explains why helium balloons rise."
     " It explains why currents such as the Gulf Stream flow through the oceans. It explains why some"
     " things float in or sink. You can see this in action by pouring vegetable oil into water. You can"
     " see a colorful demonstration in this video. \n"
     "question: What does density tell?\ncandidate answer: How big things are\nAnswer:"),
    ("WiC", 239, "True",
     "Task:WiC\nDataset:WiC\nGiven a word and two sentences, whether the word is used with the same sense"
     " in both sentence? Choose one from the option.\nOption: True, False \n"
     "word: curd\nBean curd.\nLemon curd.\nAnswer:"),
    ("COPA", 32, "A",
     'Task:COPA\nDataset:COPA\nWhich sentence is the cause of "I coughed."? Choose one between A and B.\n'
     "A: I inhaled smoke.\nB: I lowered my voice.\nAnswer:"),
]


@pytest.mark.parametrize("name,index,label,expected", PROMPTS, ids=[p[0] for p in PROMPTS])
def test_prompt_is_byte_exact(shipped, name, index, label, expected):
    task = shipped.load_task(name, train_cap=1)
    item = task.test[index]
    assert item.label == label
    assert task.prompt(item) == expected


def test_copa_has_no_instruction(shipped):
    assert shipped.load_task("COPA", train_cap=1, test_cap=1).instruction is None


def test_orders_match_readme(shipped):
    assert list(ORDERS) == ["1", "2", "3", "4", "5", "6", "TC-3"]
    assert LONG_ORDERS == {"4", "5", "6"}
    for key in ("1", "2", "3"):
        assert sorted(ORDERS[key]) == ["agnews", "amazon", "dbpedia", "yahoo"]
    for key in LONG_ORDERS:
        assert sorted(ORDERS[key]) == sorted(README_SIZES)
    assert ORDERS["4"][:4] == ["MNLI", "CB", "WiC", "COPA"]
    assert ORDERS["5"][-3:] == ["yelp", "amazon", "yahoo"]
    assert ORDERS["6"][:3] == ["yelp", "amazon", "MNLI"]
    assert ORDERS["TC-3"] == ["dbpedia", "yahoo", "agnews"]
    for key in ORDERS:
        assert resolve_tasks(key, None, shipped) == (key, ORDERS[key])


def test_custom_order_and_epochs(shipped):
    assert resolve_tasks(None, "yahoo, CB,MNLI", shipped) == ("custom", ["yahoo", "CB", "MNLI"])
    assert epochs_for("MNLI", "4", 1) == 2
    assert epochs_for("MNLI", "6", 3) == 6
    assert epochs_for("CB", "4", 1) == 1
    assert epochs_for("MNLI", "custom", 1) == 1
    assert epochs_for("MNLI", "TC-3", 2) == 2


@pytest.mark.parametrize("order,tasks,needle", [
    (None, None, "exactly one"),
    ("1", "CB", "exactly one"),
    ("7", None, "valid orders: 1, 2, 3, 4, 5, 6, TC-3"),
    (None, "CB,RTE,CB", "'CB' twice"),
    (None, "CB,,RTE", "empty name"),
    (None, "CB,sst-2", "did you mean 'SST-2'"),
])
def test_bad_orders(shipped, order, tasks, needle):
    with pytest.raises(UserError, match=needle):
        resolve_tasks(order, tasks, shipped)


def test_caps_are_deterministic_ordered_samples(shipped):
    full = shipped.load_task("CB")
    a = shipped.load_task("CB", train_cap=20, test_cap=10, sample_seed=0)
    assert shipped.load_task("CB", train_cap=20, test_cap=10, sample_seed=0) == a
    b = shipped.load_task("CB", train_cap=20, test_cap=10, sample_seed=1)
    assert (len(a.train), len(a.test)) == (20, 10)
    assert a.train != b.train and a.test != b.test
    # The chosen items keep the file's relative order.
    positions = [full.train.index(item) for item in a.train]
    assert positions == sorted(positions)
    big = shipped.load_task("CB", train_cap=10_000, test_cap=56)
    assert big.train == full.train and big.test == full.test
    only_train = shipped.load_task("CB", train_cap=20)
    assert only_train.train == a.train and only_train.test == full.test


def test_exact_match_normalisation():
    assert normalize_answer("  Science  or\tTechnology. ") == "science or technology"
    assert normalize_answer("Society & Culture") == "society culture"
    assert exact_match("very negative!", "very negative")
    assert exact_match(" TRUE\n", "True")
    assert not exact_match("negative", "very negative")
    assert not exact_match("", "True")


# --- bring-your-own and broken benchmark dirs --------------------------------------------------

def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")


def make_bench(root: Path) -> Path:
    write_json(root / "instruction_config.json",
               {"Q": [{"instruction_type": "zero-shot", "instruction": "Is it so?\n"}]})
    for group, name in (("Q", "toy"), ("Plain", "bare")):
        write_json(root / group / name / "labels.json", ["yes", "no"])
        write_json(root / group / name / "train.json",
                   [{"sentence": f"s{i}", "label": "yes" if i % 2 else "no"} for i in range(6)])
        write_json(root / group / name / "test.json", [{"sentence": "t0", "label": "no"}])
    return root


def test_bring_your_own_benchmark(tmp_path):
    bench = Benchmark(make_bench(tmp_path / "mine"))
    assert sorted(bench.task_names()) == ["bare", "toy"]
    toy = bench.load_task("toy")
    assert (toy.group, toy.labels, len(toy.train)) == ("Q", ["yes", "no"], 6)
    assert toy.prompt(Item("hi", "yes")) == "Task:Q\nDataset:toy\nIs it so?\nOption: yes, no \nhi\nAnswer:"
    bare = bench.load_task("bare", train_cap=2)
    assert bare.prompt(bare.test[0]) == "Task:Plain\nDataset:bare\nt0\nAnswer:"
    assert len(bare.train) == 2
    assert resolve_tasks(None, "bare,toy", bench) == ("custom", ["bare", "toy"])
    with pytest.raises(UserError, match="unknown task 'MNLI'.*known tasks: bare, toy"):
        resolve_tasks("4", None, bench)


def test_loading_is_lazy(tmp_path):
    root = make_bench(tmp_path)
    write_json(root / "Q" / "toy" / "train.json", "{broken")
    bench = Benchmark(root)  # a broken task does not stop the others from loading
    assert len(bench.load_task("bare").train) == 6


BROKEN = [
    # (file, new content: raw text if a str, else dumped as JSON; None deletes the file, words
    # the message must contain)
    ("Q/toy/train.json", None, ["missing file", "train.json"]),
    ("Q/toy/labels.json", None, ["missing file", "labels.json"]),
    ("Q/toy/test.json", '[{"sentence": "a", "label": "no"},\n oops]', ["test.json", "line 2, column 2"]),
    ("Q/toy/train.json", {"sentence": "a", "label": "no"}, ["train.json", "JSON list", "dict"]),
    ("Q/toy/train.json", [], ["train.json", "empty"]),
    ("Q/toy/test.json", [{"sentence": "a", "label": "no"}, "text"],
     ["test.json", "item 1", "not a JSON object"]),
    ("Q/toy/train.json", [{"sentence": "a", "label": "no"}, {"sentence": "b"}],
     ["train.json", "item 1", "'label'"]),
    ("Q/toy/train.json", [{"label": "no"}], ["train.json", "item 0", "'sentence'"]),
    ("Q/toy/train.json", [{"sentence": "a", "label": 1}], ["train.json", "item 0", "non-string 'label'"]),
    ("Q/toy/train.json", [{"sentence": ["a"], "label": "no"}],
     ["train.json", "item 0", "non-string 'sentence'"]),
    ("Q/toy/test.json", [{"sentence": "a", "label": "no"}, {"sentence": "b", "label": "Maybe"}],
     ["test.json", "item 1", "'Maybe'", "labels.json"]),
    ("Q/toy/labels.json", '"yes"', ["labels.json", "JSON list"]),
    ("Q/toy/labels.json", ["yes", "yes"], ["labels.json", "distinct"]),
]


@pytest.mark.parametrize("rel,content,needles", BROKEN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)])
def test_broken_task_files(tmp_path, rel, content, needles):
    root = make_bench(tmp_path)
    if content is None:
        (root / rel).unlink()
    else:
        write_json(root / rel, content)
    bench = Benchmark(root)
    with pytest.raises(UserError) as err:
        bench.load_task("toy", train_cap=1, test_cap=1)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize("content,needles", [
    (None, ["missing file", "instruction_config.json"]),
    ('{"Q": [', ["instruction_config.json", "malformed JSON at line 1"]),
    ("[]", ["instruction_config.json", "JSON object"]),
    ({"Q": [{"instruction": 3}]}, ["instruction_config.json", "'Q'"]),
    ({"Q": "Is it so?"}, ["instruction_config.json", "'Q'"]),
])
def test_broken_instruction_config(tmp_path, content, needles):
    root = make_bench(tmp_path)
    path = root / "instruction_config.json"
    if content is None:
        path.unlink()
    else:
        write_json(path, content)
    with pytest.raises(UserError) as err:
        Benchmark(root)
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_missing_root_and_unknown_task(tmp_path):
    with pytest.raises(UserError, match="does-not-exist"):
        Benchmark(tmp_path / "does-not-exist")
    bench = Benchmark(make_bench(tmp_path))
    with pytest.raises(UserError, match="unknown task 'toys'.*did you mean 'toy'"):
        bench.load_task("toys")


def test_duplicate_task_name_across_groups(tmp_path):
    root = make_bench(tmp_path)
    write_json(root / "Other" / "toy" / "labels.json", ["a"])
    with pytest.raises(UserError, match="'toy' appears twice"):
        Benchmark(root)


@pytest.mark.parametrize("caps,needle", [
    ({"train_cap": 0}, "train cap must be a positive integer, got 0"),
    ({"test_cap": -3}, "test cap must be a positive integer, got -3"),
    ({"train_cap": 2.5}, "train cap must be a positive integer, got 2.5"),
])
def test_bad_caps(tmp_path, caps, needle):
    bench = Benchmark(make_bench(tmp_path))
    with pytest.raises(UserError, match=needle):
        bench.load_task("toy", **caps)


def test_dev_json_is_ignored(tmp_path):
    root = make_bench(tmp_path)
    write_json(root / "Q" / "toy" / "dev.json", "not json at all")
    assert len(Benchmark(root).load_task("toy").test) == 1
