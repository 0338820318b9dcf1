"""A table of mistakes a new user makes, each refused before anything is written: exit code 2, exactly
one line `clora: error: ...` naming the fault, no traceback, and the output path exactly as it was
(absent stays absent; an existing folder keeps its listing and bytes), so the corrected command just
works. `--config FILE` (run options from YAML/JSON) has rows of its own."""
from __future__ import annotations

import json
import shlex
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from clora.cli import main

COMMON = "--data-dir {bench} --tasks alpha,beta --train-per-task 2 --test-per-task 2 --batch-size 2 --epochs 1"
RUN = "run " + COMMON + " --model {llama} --output {out}"
COMPARE = "compare --methods seq-lora --orders alpha+beta --data-dir {bench} --train-per-task 2 --test-per-task 2 " \
          "--model {llama} --output {out}"


def _malformed_json(env):
    (env.bench / "TC" / "alpha" / "train.json").write_text('[{"sentence": "a", "label": "x"},')


def _item_without_label(env):
    (env.bench / "TC" / "alpha" / "test.json").write_text(json.dumps([{"sentence": "b"}]))


def _label_not_in_labels(env):
    (env.bench / "TC" / "alpha" / "test.json").write_text(json.dumps([{"sentence": "b", "label": "zzz"}]))


def _empty_split(env):
    (env.bench / "COPA" / "beta" / "train.json").write_text("[]")


STREAM = "run --tasks-file {tmp}/stream/stream.yaml --train-per-task 2 --test-per-task 2 --batch-size 2 --epochs 1 " \
         "--model {llama} --output {out}"


def _stream(env, tasks: str | None = None, files: dict | None = None):
    """A good two-task stream (one labelled, one free-text) beside the benchmark, then `tasks`/`files`
    in place of its YAML or data files: each case breaks exactly one thing."""
    root = env.bench.parent / "stream"
    root.mkdir(exist_ok=True)
    good = {"a.jsonl": "".join(json.dumps({"input": f"s{i}", "output": "yes" if i % 2 else "no"}) + "\n" for i in range(4)),
            "b.jsonl": "".join(json.dumps({"input": f"q{i}", "output": f"answer {i}"}) + "\n" for i in range(4))}
    for name, text in {**good, **(files or {})}.items():
        (root / name).write_text(text)
    (root / "stream.yaml").write_text(tasks or "tasks:\n"
                                      "  - {name: a, train: a.jsonl, test: a.jsonl, labels: [yes, no]}\n"
                                      "  - {name: b, train: b.jsonl, test: b.jsonl}\n")


def _stream_data_missing(env):
    _stream(env, "tasks:\n  - {name: a, train: a.jsonl, test: nosuch.jsonl}\n")


def _stream_item_lacks_field(env):
    _stream(env, files={"b.jsonl": '{"input": "q", "output": "x"}\n\n{"input": "r"}\n'})


def _stream_empty_file(env):
    _stream(env, files={"b.jsonl": ""})


def _stream_empty_split(env):
    _stream(env, files={"b.jsonl": "\n\n"})


def _stream_unknown_metric(env):
    _stream(env, "tasks:\n  - {name: a, train: a.jsonl, test: a.jsonl, metric: bleu}\n")


def _stream_name_twice(env):
    _stream(env, "tasks:\n  - {name: a, train: a.jsonl, test: a.jsonl}\n  - {name: a, train: b.jsonl, test: b.jsonl}\n")


def _stream_answer_not_in_labels(env):
    _stream(env, "tasks:\n  - {name: a, train: a.jsonl, test: a.jsonl, labels: [yes, maybe]}\n")


def _stream_malformed_yaml(env):
    _stream(env, "tasks:\n  - {name: a, train: a.jsonl\n")


def _stream_csv_missing_cell(env):
    _stream(env, "tasks:\n  - {name: c, train: c.csv, test: c.csv}\n", {"c.csv": "input,output\nx,y\nz,\n"})


def _out_is_a_file(env):
    env.out.write_text("my notes")


def _out_holds_other_files(env):
    env.out.mkdir()
    (env.out / "notes.txt").write_text("mine")


def _out_holds_another_run(env):
    env.out.mkdir()
    (env.out / "config.json").write_text(json.dumps({"method": "seq-lora"}))
    (env.out / "metrics.json").write_text("{}")


def _out_is_empty(env):
    env.out.mkdir()


def _disk_full(env):
    from clora import rundir

    usage = namedtuple("usage", "total used free")
    env.monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1 << 20))


def _without_bitsandbytes(env):
    import importlib.util

    real = importlib.util.find_spec
    env.monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args: None if name.split(".")[0] == "bitsandbytes" else real(name, *args))


def _config_file(text: str, name: str = "run.yaml"):
    def setup(env):
        (env.bench.parent / name).write_text(text)
    return setup


# (id, command, words the error line must hold, setup)
CASES = [
    # the four of the issue
    ("target-modules-llama", RUN + " --target-modules nosuch_proj", ["nosuch_proj", "q_proj"], None),
    ("target-modules-t5", RUN + " --model {t5} --target-modules nosuch_proj", ["nosuch_proj", "wi"], None),
    ("model-path-missing", RUN + " --model ./nowhere", ["no such file or directory", "./nowhere"], None),
    ("resume-absent-folder", RUN + " --resume", ["cannot resume", "does not exist"], None),
    ("lr-negative-no-equals", RUN + " --lr -1e-3", ["--lr must be positive", "-0.001"], None),
    # models
    ("model-tokenizer-only", RUN + " --model {models}/tokenizer-only", ["tokenizer-only", "config.json"], None),
    ("model-fake-gguf", RUN + " --model {models}/fake.gguf", ["fake.gguf", "not a GGUF file"], None),
    ("model-missing-gguf", RUN + " --model {models}/absent.gguf", ["absent.gguf", "not found"], None),
    ("model-bad-config", RUN + " --model {models}/bad-config", ["cannot load model", "bad-config"], None),
    ("model-no-tokenizer", RUN + " --model {models}/no-tokenizer", ["tokenizer", "no-tokenizer"], None),
    ("model-no-weights", RUN + " --model {models}/no-weights", ["weights", "no-weights"], None),
    # method options that only show when the method attaches to the model
    ("galore-pattern-matches-nothing", RUN + " --method galore -o full_pattern=nomatch", ["full_pattern", "nomatch"], None),
    ("gorp-pattern-not-a-regex", RUN + " --method gorp -o full_pattern=[", ["full_pattern", "regular expression"], None),
    ("gorp-bad-epsilon", RUN + " --method gorp -o epsilon=2", ["epsilon"], None),
    ("o-lora-per-task-wrong-length", RUN + " --method o-lora -o lambda1_per_task=0,0.5,5",
     ["lambda1_per_task", "3 values", "2 tasks"], None),
    ("o-lora-per-task-not-numbers", RUN + " --method o-lora -o lambda2_per_task=0,x", ["lambda2_per_task", "'0,x'"], None),
    # a 4-bit base (--load-in-4bit): only for methods that keep the base frozen, and only with bitsandbytes
    ("4bit-gorp", RUN + " --method gorp --load-in-4bit", ["--load-in-4bit", "gorp", "full-precision", "full-rank"], None),
    ("4bit-galore", RUN + " --method galore --load-in-4bit", ["--load-in-4bit", "galore", "full-precision"], None),
    ("4bit-osf", RUN + " --method osf --load-in-4bit", ["--load-in-4bit", "osf", "full-precision", "SVD"], None),
    ("4bit-without-bitsandbytes", RUN + " --load-in-4bit", ["--load-in-4bit", "bitsandbytes", "pip install 'clora[4bit]'"],
     _without_bitsandbytes),
    # options
    ("unknown-task-among-good", RUN + " --tasks alpha,nosuch,beta", ["nosuch"], None),
    ("unknown-order", "run " + COMMON.replace("--tasks alpha,beta", "--order 9") + " --model {llama} --output {out}",
     ["9"], None),
    ("unknown-method", RUN + " --method nope", ["nope"], None),
    ("unknown-method-option", RUN + " -o bogus=1", ["bogus"], None),
    ("method-option-not-key-value", RUN + " -o noequals", ["noequals"], None),
    ("cap-zero", RUN + " --train-per-task 0", ["--train-per-task"], None),
    ("rank-not-a-number", RUN + " --rank x", ["--rank", "'x'"], None),
    ("rank-zero", RUN + " --rank 0", ["--rank"], None),
    ("dropout-out-of-range", RUN + " --dropout 1.5", ["--dropout"], None),
    ("precision-unknown", RUN + " --precision fp64", ["--precision", "fp64"], None),
    ("unknown-option", RUN + " --nosuch 3", ["--nosuch"], None),
    ("config-directory", RUN + " --config {models}", ["--config", "is a directory"], None),
    ("config-missing", RUN + " --config {tmp}/nosuch.yaml", ["--config", "nosuch.yaml", "no such file"], None),
    ("config-unknown-key", RUN + " --config {tmp}/run.yaml", ["run.yaml", "unknown option", "learning_rate"],
     _config_file("learning_rate: 0.1\n")),
    ("config-malformed-yaml", RUN + " --config {tmp}/run.yaml", ["run.yaml", "not valid YAML", "line 3"],
     _config_file("lr: 0.1\nrank: [4\n")),
    ("config-malformed-json", RUN + " --config {tmp}/run.json", ["run.json", "not valid JSON", "line 1"],
     _config_file('{"lr": 0.1,', "run.json")),
    ("config-not-a-mapping", RUN + " --config {tmp}/run.yaml", ["run.yaml", "mapping"], _config_file("- lr\n- rank\n")),
    ("config-wrong-type", RUN + " --config {tmp}/run.yaml", ["run.yaml", "rank", "integer", "'four'"],
     _config_file("rank: four\n")),
    ("config-bad-value", RUN + " --config {tmp}/run.yaml", ["--rank must be a positive integer"], _config_file("rank: 0\n")),
    ("report-to-unknown-tracker", RUN + " --report-to tensorboard,comet", ["--report-to", "'comet'", "mlflow"], None),
    ("resume-and-overwrite", RUN + " --resume --overwrite", ["--overwrite", "--resume"], None),
    # data
    ("data-dir-missing", RUN + " --data-dir {tmp}/nowhere", ["nowhere"], None),
    ("data-malformed-json", RUN, ["alpha", "train.json"], _malformed_json),
    ("data-item-without-label", RUN, ["test.json", "label"], _item_without_label),
    ("data-label-not-in-labels", RUN, ["test.json", "zzz"], _label_not_in_labels),
    ("data-empty-split", RUN, ["beta", "train.json"], _empty_split),
    # a --tasks-file stream (clora.streams)
    ("stream-file-missing", STREAM.replace("stream/stream.yaml", "nowhere.yaml"), ["nowhere.yaml", "does not exist"], None),
    ("stream-data-file-missing", STREAM, ["nosuch.jsonl", "does not exist", "'a'"], _stream_data_missing),
    ("stream-item-lacks-field", STREAM, ["b.jsonl", "line 3", "'output'"], _stream_item_lacks_field),
    ("stream-csv-cell-missing", STREAM, ["c.csv", "row 2", "'output'"], _stream_csv_missing_cell),
    ("stream-empty-file", STREAM, ["b.jsonl", "empty"], _stream_empty_file),
    ("stream-empty-split", STREAM, ["b.jsonl", "empty"], _stream_empty_split),
    ("stream-unknown-metric", STREAM, ["metric", "'bleu'", "rouge_l"], _stream_unknown_metric),
    ("stream-task-named-twice", STREAM, ["'a'", "twice"], _stream_name_twice),
    ("stream-answer-not-in-labels", STREAM, ["a.jsonl", "line 1", "'no'", "labels"], _stream_answer_not_in_labels),
    ("stream-malformed-yaml", STREAM, ["stream.yaml", "malformed YAML", "line"], _stream_malformed_yaml),
    ("stream-and-order", STREAM + " --order 2", ["--tasks-file", "--order"], _stream),
    ("stream-and-order-1", STREAM + " --order 1", ["--tasks-file", "--order"], _stream),  # 1 is also the default
    ("stream-and-tasks", STREAM + " --tasks alpha,beta", ["--tasks-file", "--tasks"], _stream),
    ("stream-and-data-dir", STREAM + " --data-dir {bench}", ["--data-dir", "--tasks-file"], _stream),
    ("stream-max-new-tokens-zero", STREAM + " --max-new-tokens 0", ["--max-new-tokens"], _stream),
    ("compare-stream-and-orders", COMPARE.replace("--data-dir {bench}", "--tasks-file {tmp}/stream/stream.yaml")
     + " --orders 2", ["--tasks-file", "--orders"], _stream),
    # the output path
    ("output-is-a-file", RUN, ["not a directory"], _out_is_a_file),
    ("output-holds-other-files", RUN, ["other files", "--overwrite"], _out_holds_other_files),
    ("output-holds-another-run", RUN, ["different run", "--resume", "--overwrite"], _out_holds_another_run),
    ("resume-with-other-options", RUN + " --resume", ["options differ"], _out_holds_another_run),
    ("resume-empty-folder", RUN + " --resume", ["holds no clora run"], _out_is_empty),
    ("disk-full", RUN, ["not enough disk space", "stage 1 (alpha)"], _disk_full),
    # clora compare
    ("compare-target-modules", COMPARE + " --target-modules nosuch_proj", ["nosuch_proj"], None),
    ("compare-attach-option-of-one-method", COMPARE.replace("seq-lora", "seq-lora,gorp") + " --for gorp full_pattern=zzz",
     ["full_pattern", "zzz"], None),
    ("compare-model-missing", COMPARE + " --model ./nowhere", ["no such file or directory"], None),
    ("compare-jobs-zero", COMPARE + " --jobs 0", ["--jobs"], None),
    ("compare-one-at-a-time-unknown", COMPARE + " --jobs 2 --one-at-a-time osf", ["--one-at-a-time", "osf"], None),
    ("compare-seeds-not-integers", COMPARE + " --seeds x", ["--seeds"], None),
    ("compare-for-unknown-method", COMPARE + " --for gorp lr=1", ["--for", "gorp"], None),
    ("compare-4bit-gorp", COMPARE.replace("seq-lora", "seq-lora,gorp") + " --load-in-4bit",
     ["--load-in-4bit", "gorp", "full-precision"], None),
]


@pytest.fixture(scope="module")
def broken_models(tiny_llama, tmp_path_factory) -> Path:
    """Model folders and files that are each wrong in one way."""
    root = tmp_path_factory.mktemp("broken-models")
    source = Path(tiny_llama)
    tokenizer_files = [p for p in source.iterdir() if "token" in p.name]
    assert tokenizer_files
    for name in ["tokenizer-only", "bad-config", "no-tokenizer", "no-weights"]:
        (root / name).mkdir()
    for p in tokenizer_files:
        for name in ["tokenizer-only", "bad-config", "no-weights"]:
            shutil.copy(p, root / name / p.name)
    for name in ["bad-config", "no-tokenizer", "no-weights"]:
        shutil.copy(source / "config.json", root / name / "config.json")
    (root / "bad-config" / "config.json").write_text('{"model_type": "llama",')
    shutil.copy(source / "model.safetensors", root / "no-tokenizer" / "model.safetensors")
    (root / "fake.gguf").write_text("not a gguf file at all")
    return root


def snapshot(path: Path):
    """The output path as a user would see it: absent, a file's bytes, or a folder's listing and bytes."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "<dir>" for p in sorted(path.rglob("*"))}


Env = namedtuple("Env", "bench out monkeypatch")


@pytest.mark.parametrize("command, needles, setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_before_anything_is_written(command, needles, setup, tiny_llama, tiny_t5, broken_models, tiny_bench,
                                            tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    if setup is not None:
        setup(Env(tiny_bench, out, monkeypatch))
    before = snapshot(out)
    argv = shlex.split(command.format(bench=tiny_bench, llama=tiny_llama, t5=tiny_t5, models=broken_models,
                                      out=out, tmp=tmp_path))
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("clora: error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert snapshot(out) == before


def test_table_holds_enough_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("mistake, fix", [(["--target-modules", "nosuch_proj"], ["--target-modules", "q_proj,v_proj"]),
                                          (["--model", "./nowhere"], [])])
def test_the_corrected_command_just_works(mistake, fix, tiny_llama, tiny_bench, tmp_path, capsys, monkeypatch):
    """The two mistakes that used to strand the user: a folder holding config.json and .clora.lock,
    refused as "a different run" by the corrected command and by --resume."""
    monkeypatch.chdir(tmp_path)  # ./nowhere is relative
    out = tmp_path / "out"
    argv = shlex.split(RUN.format(bench=tiny_bench, llama=tiny_llama, out=out))
    assert main(argv + mistake) == 2
    assert not out.exists()
    capsys.readouterr()
    assert main(argv + fix) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


def test_help_shows_every_default_once(capsys):
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    blocks = [" ".join(b.split()) for b in options.split("\n  -")[1:]]  # one block per option
    assert len(blocks) > 25
    for block in blocks:
        flag = block.split()[0]
        takes_value = len(block.split()) > 1 and block.split()[1].rstrip(",").isupper()
        on_by_default = block.split()[1:2] == [f"--no-{flag.rstrip(',')[1:]}"]  # --x, --no-x: says it is on
        assert block.count("(default:") == (1 if takes_value or on_by_default else 0), block
        assert "(default: None)" not in block, block
    by_flag = {b.split()[0]: b for b in blocks}
    for flag, default in [("-lr", "0.001"), ("-rank", "8"), ("-alpha", "32.0"), ("-seed", "0"),
                          ("-weight-decay", "0.0"), ("-max-grad-norm", "1.0"), ("-model", "smollm2-135m-instruct")]:
        assert f"(default: {default}" in by_flag[flag], by_flag[flag]
