"""Named points where a run can be killed on purpose, to prove it survives a kill there.

`CLORA_KILL_AT=<point>:<n>` ends the process abruptly (as SIGKILL would: no cleanup, no flush) the
n-th time `<point>` is reached. Unset, a point costs one dictionary lookup. The points are the
moments a real kill hurts: mid-training, mid-evaluation, mid-checkpoint, mid-commit, mid-report.
"""
from __future__ import annotations

import os

_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("CLORA_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os._exit(137)
