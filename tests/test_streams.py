"""Tasks from a --tasks-file (clora.streams): the file formats, sampling shared with the benchmark,
free-text scoring, and the example stream run end to end and resumed. Its bad inputs are in
test_bad_input.py's table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clora import streams
from clora.benchmark import Benchmark, Item, Task
from clora.cli import main
from clora.errors import UserError
from conftest import assert_same_run_folders, run_killed_in_second_stage, write_tiny_benchmark

EXAMPLE = Path(__file__).parent.parent / "examples" / "stream" / "stream.yaml"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_stream_task_draws_the_same_samples_as_the_same_benchmark_task(tmp_path):
    """Caps and the dev split are the benchmark's code, not a copy: the same items give the same samples."""
    bench = Benchmark(write_tiny_benchmark(tmp_path / "bench"))
    for split, n in (("train", 30), ("test", 12)):
        items = [{"sentence": f"{split} {i}", "label": "xy"[i % 2]} for i in range(n)]
        (tmp_path / "bench" / "TC" / "alpha" / f"{split}.json").write_text(json.dumps(items))
        _jsonl(tmp_path / f"{split}.jsonl", items)
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: alpha, train: train.jsonl, test: test.jsonl, "
                                     "input_field: sentence, output_field: label, labels: [x, y]}\n")
    for caps in [dict(train_cap=7, test_cap=5), dict(train_cap=7, test_cap=5, dev_cap=4), dict()]:
        expected = bench.load_task("alpha", sample_seed=3, **caps)
        (got,) = streams.load_stream(tmp_path / "s.yaml", sample_seed=3, **caps)
        assert (got.train, got.test, got.dev) == (expected.train, expected.test, expected.dev), caps
        assert got.metric == "exact_match" and got.labels == ["x", "y"]


def test_csv_parquet_and_saved_datasets_read_like_jsonl(tmp_path):
    import datasets

    rows = [{"q": f"question {i}", "a": str(i % 2)} for i in range(6)]
    _jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.csv").write_text("q,a\n" + "".join(f"{r['q']},{r['a']}\n" for r in rows))  # a: read as numbers
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    sources = ["d.jsonl", "d.csv", "d.parquet", "saved"]
    (tmp_path / "s.yaml").write_text("tasks:\n" + "".join(
        f"  - {{name: t{i}, train: {s}, test: {s}, input_field: q, output_field: a, labels: ['0', '1']}}\n"
        for i, s in enumerate(sources)))
    tasks = streams.load_stream(tmp_path / "s.yaml")
    expected = [Item(r["q"], r["a"]) for r in rows]
    assert [t.name for t in tasks] == ["t0", "t1", "t2", "t3"]  # the file's order is the task order
    for task in tasks:
        assert task.train == expected and task.test == expected, task.name


def test_prompt_template_instruction_and_default_metric(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"input": "two plus two", "output": "four"}])
    (tmp_path / "s.yaml").write_text(
        "tasks:\n"
        "  - {name: free, train: d.jsonl, test: d.jsonl, instruction: Compute.}\n"
        "  - {name: templated, train: d.jsonl, test: d.jsonl, template: 'Q: {input} A:', metric: exact_match}\n"
        "  - {name: labelled, train: d.jsonl, test: d.jsonl, labels: [four, five]}\n")
    free, templated, labelled = streams.load_stream(tmp_path / "s.yaml", max_new_tokens=7)
    assert free.prompt(free.test[0]) == "Compute.\ntwo plus two\nAnswer:"
    assert templated.prompt(templated.test[0]) == "Q: two plus two A:"
    assert (free.metric, templated.metric, labelled.metric) == ("rouge_l", "exact_match", "exact_match")
    assert (free.max_new_tokens, labelled.max_new_tokens) == (7, None)  # a label set bounds its own answers


def test_yes_no_labels_stay_strings(tmp_path):
    """YAML 1.1 would read [yes, no] as booleans, and no answer would ever match them."""
    _jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "yes"}, {"input": "b", "output": "no"}])
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, train: d.jsonl, test: d.jsonl, labels: [yes, no]}\n")
    assert streams.load_stream(tmp_path / "s.yaml")[0].labels == ["yes", "no"]


def test_digest_follows_the_data(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}])
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, train: d.jsonl, test: d.jsonl}\n")
    before = streams.digest(tmp_path / "s.yaml")
    _jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "c"}])
    after = streams.digest(tmp_path / "s.yaml")
    assert before["t/train"] != after["t/train"] and before["s.yaml"] == after["s.yaml"]


def test_unknown_key_is_refused(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}])
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, train: d.jsonl, test: d.jsonl, lables: [b]}\n")
    with pytest.raises(UserError, match="'lables'"):
        streams.read_stream(tmp_path / "s.yaml")


def test_free_text_task_is_scored_by_rouge_l_with_exact_match_kept(monkeypatch):
    from accelerate import Accelerator
    from transformers import ByT5Tokenizer

    from clora import evaluation
    from clora.encoding import Encoder

    asked = {}

    def fake_generate(model, encoder, prompt_ids, max_new_tokens, batch_size, progress=None):
        asked["max_new_tokens"] = max_new_tokens
        return ["sixty two", "seven"]

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    encoder = Encoder(ByT5Tokenizer(), is_encoder_decoder=False)
    test = [Item("Write 61 in words.", "sixty one"), Item("Write 7 in words.", "seven")]
    free = Task("numbers", "s", [], None, [], test, metric="rouge_l", template="{input}", max_new_tokens=64)
    score = evaluation.evaluate_task(None, encoder, free, Accelerator(cpu=True), 8)
    assert score.exact_match == 50.0  # "seven" only
    assert score.rouge_l == pytest.approx((50.0 + 100.0) / 2)  # "sixty two" shares one of two words
    assert score.accuracy == score.rouge_l
    assert [p["rouge_l"] for p in score.predictions] == pytest.approx([50.0, 100.0])
    assert asked["max_new_tokens"] == len(" sixty one") + 1  # the longest reference, in ByT5 bytes, plus EOS
    capped = Task("numbers", "s", [], None, [], test, metric="rouge_l", template="{input}", max_new_tokens=4)
    evaluation.evaluate_task(None, encoder, capped, Accelerator(cpu=True), 8)
    assert asked["max_new_tokens"] == 4
    labelled = Task("numbers", "s", ["sixty one", "seven"], None, [], test, template="{input}")
    score = evaluation.evaluate_task(None, encoder, labelled, Accelerator(cpu=True), 8)
    assert score.accuracy == 50.0 and "rouge_l" not in score.predictions[0]


def _example_config(model: str, **overrides):
    from clora import RunConfig

    values = dict(model=model, order=None, tasks_file=str(EXAMPLE), train_per_task=6, test_per_task=6,
                  batch_size=3, eval_batch_size=8, lr=2e-2, rank=4, epochs=1, max_new_tokens=8)
    return RunConfig(**{**values, **overrides})


def _partly_right_answers(monkeypatch):
    """A tiny random model answers nothing right, so every metric would be 0 and EM could not be told
    from ROUGE-L: the real generation runs, then an item whose reference has an even length gets that
    reference's first word as its answer (EM 1 for one word, a partial ROUGE-L for several)."""
    from clora import evaluation

    references = {t.prompt(item): item.label for t in streams.load_stream(EXAMPLE) for item in t.test}
    real = evaluation.generate

    def generate(model, encoder, prompt_ids, *args, **kwargs):
        texts = real(model, encoder, prompt_ids, *args, **kwargs)
        refs = [references[encoder.tokenizer.decode(ids, skip_special_tokens=True)] for ids in prompt_ids]
        return [ref.split()[0] if len(ref) % 2 == 0 else text for ref, text in zip(refs, texts)]

    monkeypatch.setattr(evaluation, "generate", generate)


def test_example_stream_runs_end_to_end_and_resumes(tiny_llama, tmp_path, monkeypatch, capsys, without_plots):
    _partly_right_answers(monkeypatch)
    out = tmp_path / "cli"
    argv = ["run", "--tasks-file", str(EXAMPLE), "--model", tiny_llama, "--train-per-task", "6", "--test-per-task", "6",
            "--batch-size", "3", "--eval-batch-size", "8", "--lr", "2e-2", "--rank", "4", "--epochs", "1", "--max-new-tokens", "8", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["tasks"] == ["sentiment", "capitals", "numbers"]
    assert metrics["task_metrics"] == {"sentiment": "exact_match", "capitals": "rouge_l", "numbers": "rouge_l"}
    R, EM, RL = metrics["accuracy_matrix"], metrics["exact_match_matrix"], metrics["rouge_l_matrix"]
    for row in range(3):
        for col, name in enumerate(metrics["tasks"][: row + 1]):
            wanted = EM if name == "sentiment" else RL
            assert R[row][col] == wanted[row][col], (row, name)
    free_cells = [(r, c) for r in range(3) for c in (1, 2) if c <= r]
    assert any(EM[r][c] != RL[r][c] for r, c in free_cells)  # else the check above could not tell them apart
    assert any(R[r][0] > 0 for r in range(3)) and any(R[r][c] > 0 for r, c in free_cells)
    assert set(metrics["exact_match"]) == set(metrics["rouge_l"]) == set(metrics["tasks"])
    assert any("ROUGE-L" in note for note in metrics["notes"])
    stage = json.loads((out / "stages" / "03-numbers" / "stage.json").read_text())
    assert set(stage["exact_match"]) == {"sentiment", "capitals", "numbers"}
    capitals = [json.loads(line) for line in (out / "stages" / "02-capitals" / "predictions" / "capitals.jsonl").open()]
    assert len(capitals) == 6 and all("rouge_l" in p and "correct" in p for p in capitals)
    config = json.loads((out / "config.json").read_text())
    assert config["tasks_file"] == str(EXAMPLE) and config["max_new_tokens"] == 8
    assert config["tasks_digest"] == streams.digest(EXAMPLE)

    # The same run through the API, killed in its second stage and resumed, ends byte for byte the same.
    import clora

    resumed = tmp_path / "resumed"
    run_killed_in_second_stage(_example_config(tiny_llama), resumed, monkeypatch)
    clora.run(_example_config(tiny_llama), resumed, resume=True)
    assert_same_run_folders(resumed, out)


def test_resume_over_changed_data_is_refused(tiny_llama, tmp_path, capsys):
    """The digest in config.json: the same options over other data would silently mix two experiments."""
    import shutil

    stream = tmp_path / "stream"
    shutil.copytree(EXAMPLE.parent, stream)
    out = tmp_path / "out"
    (out).mkdir()
    from clora.continual import prepare

    (out / "config.json").write_text(json.dumps(prepare(_example_config(tiny_llama, tasks_file=str(stream / "stream.yaml")))
                                                .config.to_dict()))
    with (stream / "numbers_test.jsonl").open("a") as f:
        f.write(json.dumps({"question": "Write 100 in words.", "answer": "one hundred"}) + "\n")
    argv = ["run", "--tasks-file", str(stream / "stream.yaml"), "--model", tiny_llama, "--train-per-task", "6",
            "--test-per-task", "6", "--batch-size", "3", "--eval-batch-size", "8", "--lr", "2e-2", "--rank", "4", "--epochs", "1",
            "--max-new-tokens", "8", "--output", str(out), "--resume"]
    before = (out / "config.json").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "options differ" in err and "tasks_digest" in err and "numbers/test" in err, err
    assert (out / "config.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_benchmark_config_has_no_stream_keys():
    """A benchmark run's config.json (and so every earlier run's resume check) is what it was before streams."""
    from clora import RunConfig

    assert not {"tasks_file", "max_new_tokens", "tasks_digest"} & set(RunConfig().to_dict())
