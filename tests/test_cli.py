"""Bad input from the command line: one line naming the fault, exit code 2, nothing half-written."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clora.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def base_args(bench: Path, out: Path, model: str = "unused-model") -> list[str]:
    return ["run", "--data-dir", str(bench), "--tasks", "alpha,beta", "--model", model, "--output", str(out)]


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.startswith("clora: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_missing_data_dir(tmp_path, capsys):
    code, err = run_cli(base_args(tmp_path / "nowhere", tmp_path / "out"), capsys)
    _assert_one_line_error(code, err, "nowhere")


def test_malformed_json(tiny_bench, tmp_path, capsys):
    (tiny_bench / "TC" / "alpha" / "train.json").write_text('[{"sentence": "a", "label": "x"},')
    code, err = run_cli(base_args(tiny_bench, tmp_path / "out"), capsys)
    _assert_one_line_error(code, err, "alpha", "train.json")


@pytest.mark.parametrize("item, needle", [({"sentence": "a"}, "label"), ({"label": "x"}, "sentence"),
                                          ({"sentence": "a", "label": "zzz"}, "zzz")])
def test_bad_item(item, needle, tiny_bench, tmp_path, capsys):
    (tiny_bench / "TC" / "alpha" / "test.json").write_text(json.dumps([{"sentence": "b", "label": "x"}, item]))
    code, err = run_cli(base_args(tiny_bench, tmp_path / "out"), capsys)
    _assert_one_line_error(code, err, "test.json", needle)


def test_empty_split(tiny_bench, tmp_path, capsys):
    (tiny_bench / "COPA" / "beta" / "train.json").write_text("[]")
    code, err = run_cli(base_args(tiny_bench, tmp_path / "out"), capsys)
    _assert_one_line_error(code, err, "train.json")


def test_missing_split(tiny_bench, tmp_path, capsys):
    (tiny_bench / "COPA" / "beta" / "test.json").unlink()
    code, err = run_cli(base_args(tiny_bench, tmp_path / "out"), capsys)
    _assert_one_line_error(code, err, "test.json")


@pytest.mark.parametrize("extra, needle", [
    (["--tasks", "alpha,gamma"], "gamma"),
    (["--order", "9"], "9"),
    (["--method", "nope"], "nope"),
    (["--train-per-task", "0"], "--train-per-task"),
    (["--test-per-task", "-3"], "--test-per-task"),
    (["--lr", "0"], "--lr"),
    (["-o", "bogus=1"], "bogus"),
    (["--method", "seq-lora", "-o", "noequals"], "noequals"),
])
def test_bad_option(extra, needle, tiny_bench, tmp_path, capsys):
    args = base_args(tiny_bench, tmp_path / "out")
    if "--order" in extra:
        i = args.index("--tasks")
        del args[i:i + 2]
    code, err = run_cli(args + extra, capsys)
    _assert_one_line_error(code, err, needle)


def test_unknown_model_path(tiny_bench, tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    code, err = run_cli(base_args(tiny_bench, tmp_path / "out", str(tmp_path / "empty-model")), capsys)
    _assert_one_line_error(code, err, "config.json")


def test_output_holding_another_run_is_refused(tiny_bench, tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"method": "seq-lora"}))
    (out / "metrics.json").write_text("{}")
    code, err = run_cli(base_args(tiny_bench, out, tiny_llama), capsys)
    _assert_one_line_error(code, err, str(out), "--resume", "--overwrite")
    code, err = run_cli(base_args(tiny_bench, out, tiny_llama) + ["--resume"], capsys)
    _assert_one_line_error(code, err, "options differ")
    assert (out / "metrics.json").read_text() == "{}"  # nothing was touched


@pytest.mark.parametrize("extra, needle", [([], "other files"), (["--resume"], "no clora run")])
def test_output_holding_other_files_is_refused_untouched(extra, needle, tiny_bench, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(base_args(tiny_bench, out, "unused-model") + extra, capsys)
    _assert_one_line_error(code, err, str(out), needle)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no lock file left in a folder not ours


def test_run_folder_held_by_another_process_is_refused(tiny_bench, tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(  # another clora process with the folder open, as a concurrent resume would
        [sys.executable, "-c", "import sys; from clora.rundir import RunDir; "
         f"RunDir.open({str(out)!r}, {{'method': 'other'}}, False, False); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, err = run_cli(base_args(tiny_bench, out, tiny_llama) + extra, capsys)
            _assert_one_line_error(code, err, str(out), "in use by another clora process", f"pid {holder.pid}")
            assert json.loads((out / "config.json").read_text()) == {"method": "other"}  # not overwritten
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its process: the folder is free again, with no stale lock to clear by hand.
    code, err = run_cli(base_args(tiny_bench, out, tiny_llama) + ["--overwrite", "--train-per-task", "2",
                                                                  "--test-per-task", "2"], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


def test_cli_runs_end_to_end_as_a_process(tiny_bench, tiny_llama, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "clora.cli", *base_args(tiny_bench, out, tiny_llama),
                           "--lr", "0.02", "--rank", "4", "--batch-size", "4", "--epochs", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AA" in proc.stdout and "BWT" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
    # Rerunning into the same directory without a flag is refused with one line.
    again = subprocess.run([sys.executable, "-m", "clora.cli", *base_args(tiny_bench, out, tiny_llama)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr


def test_methods_lists_every_method_and_says_where_a_default_is_not_yet_tuned(capsys):
    from clora.methods import registry

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in f"\n{out}" for name in registry())
    seq = out[out.index("\nseq-lora "):]
    assert "note:" not in seq


def test_every_default_is_the_committed_search_choice_or_its_note_says_why_not():
    """What the dev-split search chose (results/tune-proxy/chosen.json) is a method's default, to two
    significant digits, or the note `clora methods` prints names the choice and says why not."""
    from clora.methods import registry

    chosen = json.loads((Path(__file__).parents[1] / "results/tune-proxy/chosen.json").read_text())["methods"]
    methods = registry()
    for name, found in chosen.items():
        defaults = {f.name: f.default for f in dataclasses.fields(methods[name].Options)}
        for key, value in found["settings"].items():
            if key == "lr":  # the run's --lr, not a method option
                continue
            adopted = float(f"{float(value):.2g}") == defaults[key]
            assert adopted or f"{key}={float(value):.2g}" in methods[name].defaults_note, (name, key, value)
    assert methods["galore"].Options().full_lr == float(f"{chosen['galore']['settings']['full_lr']:.2g}")