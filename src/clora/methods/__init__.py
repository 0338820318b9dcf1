"""Method registry. A method is one module in this package ending with `register(MyMethod)`; every
module here is imported on first use, so adding a method edits no central list."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import UserError
from .base import Method, Settings, Stage, StageData, parse_options

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} missing or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(_REGISTRY.items()))


def build_method(name: str, settings: Settings, option_pairs: list[str] | None = None) -> Method:
    methods = registry()
    if name not in methods:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(methods)}")
    cls = methods[name]
    return cls(settings, parse_options(cls.Options, option_pairs or [], name))


__all__ = ["Method", "Settings", "Stage", "StageData", "register", "registry", "build_method"]
