"""Docs pages written by commands: each command owns a section between markers, so several
comparisons and benchmark scripts share one page (docs/results.md, docs/benchmarks.md) without
overwriting each other, and rerunning a command replaces only its own section."""
from __future__ import annotations

import re
from pathlib import Path

from .atomic import write_text_atomic


def update_section(page: str | Path, name: str, markdown: str, title: str = "# Benchmarks\n") -> None:
    page = Path(page)
    text = page.read_text() if page.is_file() else title
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(page, text)
