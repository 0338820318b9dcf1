"""Run options from a file: `clora run --config run.yaml` (YAML or JSON), keys = RunConfig field names.

A run folder's own config.json is such a file, so a published run replays with one command
(`clora run --config results/.../config.json --output new`). Values are checked against the field's
type here, with the file's name in the message, because a wrong type would otherwise surface deep in
the run as a traceback. A config.json beside a run's metrics.json that predates an option gets the
value that run was made with (RunConfig.PREDATED), not today's default, so the replay is exact.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import yaml

from .config import RunConfig
from .errors import UserError


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RunConfig)}


def load(path: str | Path) -> dict:
    """The options a config file sets, by RunConfig field name, checked and typed."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--config {path} is a directory; give a YAML or JSON file (e.g. a run's config.json)")
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--config {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"--config {path} is not valid YAML: {problem}{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of option names to values, not a {type(data).__name__}")
    fields = _fields()
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)} (keys are the names in a run's "
                        f"config.json: {', '.join(fields)})")
    values = {k: _typed(k, v, path) for k, v in data.items()}
    if path.name == "config.json" and (path.parent / "metrics.json").is_file():
        values = {**{k: v for k, v in RunConfig.PREDATED.items() if k not in data}, **values}
    return values


def _typed(key: str, value, path: Path):
    hint = typing.get_type_hints(RunConfig)[key]
    args = set(typing.get_args(hint))
    where = f"--config {path}: {key}"
    if value is None:
        if type(None) in args:
            return None
        raise UserError(f"{where} cannot be null")
    if dict in {typing.get_origin(a) for a in args} | {typing.get_origin(hint)}:
        if isinstance(value, dict):
            return value
        raise UserError(f"{where} must be a mapping, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {value!r}")
    if key in ("method_options", "target_modules"):
        if isinstance(value, str):  # the command line's comma-separated form
            value = [v.strip() for v in value.split(",") if v.strip()] if key == "target_modules" else [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise UserError(f"{where} must be a list of strings, got {value!r}")
    if hint is int or int in args:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where} must be an integer, got {value!r}")
    if hint is float or float in args:
        # YAML reads 1e-3 (no dot) as a string: take it, as the command line does.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where} must be a number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("order", "tasks"):
        return str(value)  # `order: 1` in YAML is the order "1"
    if not isinstance(value, str):
        raise UserError(f"{where} must be a string, got {value!r}")
    return value
