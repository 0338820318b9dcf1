"""A whole proxy run with two versions of clora side by side: the same `clora run` command from two
source trees (e.g. `git worktree add /tmp/old <commit>`), started at the same moment as two processes
of one thread each, so both see the same machine load. Reports each run's wall time (training and
evaluation per stage, from its metrics), the ratio, and whether the results agree. Written to
docs/benchmarks.md, section "proxy-run-before-after", with the command.

    python benchmarks/bench_commits.py --old /tmp/old --new /tmp/new --label-old 006ec42 --label-new "length batches + prefix cache" \
        -- --method seq-lora --order 1 --train-per-task 192 --test-per-task 32 --lr 2e-3 --rank 8
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import update_section  # noqa: E402


def start(tree: Path, run_args: list[str], output: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log = open(output.with_suffix(".log"), "w")
    return subprocess.Popen([sys.executable, "-m", "clora.cli", "run", *run_args, "--output", str(output), "--resume"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="source tree of the old version (holds src/clora)")
    parser.add_argument("--new", required=True)
    parser.add_argument("--label-old", default="old")
    parser.add_argument("--label-new", default="new")
    parser.add_argument("--runs", default="/tmp/clora-bench-commits", help="where the two run folders go")
    parser.add_argument("--page", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--load", help="the load average seen during the runs, when rewriting the section from "
                                       "finished run folders (their runs are then not started again)")
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then the `clora run` options")
    args = parser.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    trees = {args.label_old: Path(args.old), args.label_new: Path(args.new)}
    outputs = {label: runs / ("old" if label == args.label_old else "new") for label in trees}
    load = args.load
    if load is None:
        load_before = os.getloadavg()[0]
        procs = {label: start(tree, run_args, outputs[label]) for label, tree in trees.items()}
        for label, proc in procs.items():
            if proc.wait():
                sys.exit(f"the {label} run failed; see {outputs[label].with_suffix('.log')}")
        load = f"{load_before:.1f} → {os.getloadavg()[0]:.1f}"
    metrics = {label: json.loads((out / "metrics.json").read_text()) for label, out in outputs.items()}

    def stages(label):
        return [json.loads(p.read_text())["seconds"] for p in sorted((outputs[label] / "stages").glob("*/stage.json"))]

    old, new = args.label_old, args.label_new
    seconds = {label: sum(stages(label)) for label in trees}
    rows = "\n".join(
        f"| {label} | {seconds[label] / 60:.1f} | {' / '.join(f'{s:.0f}' for s in stages(label))} "
        f"| {metrics[label]['metrics']['AA']:.1f} | {metrics[label]['metrics']['BWT']:+.1f} |" for label in trees)
    command = "python benchmarks/bench_commits.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = f"""## A whole proxy run, before and after

`clora run {' '.join(run_args)}` from two source trees, started together as two single-thread processes
on the {os.cpu_count()}-core machine (load average {load}), so both saw the same load while both ran; the one
that finishes first leaves the machine to the other, which favours the slower version. Times are each
stage's training + evaluation, summed.

| version | minutes | seconds per stage | AA | BWT |
|---|---|---|---|---|
{rows}

The new version takes **{seconds[new] / seconds[old]:.2f}×** the old one's time. Its results differ only
through the batch order (length-grouped batches change which items share a batch and when): one run
each, so the AA/BWT difference is the run-to-run noise of a batch order, not an effect of the change.

Produced by: `{command}`
"""
    update_section(args.page, "proxy-run-before-after", text)
    print(text)


if __name__ == "__main__":
    main()
