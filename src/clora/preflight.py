"""Checks made before a run's output folder is created or changed: a command refused at start-up
leaves the folder as it found it (absent stays absent), so the corrected command just works.

The model is checked without reading its weights: its config and tokenizer load, and the method
attaches to a weightless skeleton built from the config on the meta device, which is where PEFT
refuses target modules the model lacks and GaLore/GORP refuse a `full_pattern` matching nothing.
Seconds, whatever the model's size, instead of a refusal after the weights have loaded.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

from accelerate import init_empty_weights
from torch import nn

from .config import RunConfig
from .errors import UserError
from .methods import Method
from .models import auto_class, load_config, load_tokenizer, resolve_model_dir
from .rundir import RunDir


def folder_rules() -> tuple[frozenset[str], dict]:
    """What `RunDir.check`/`open` compare a resumed run's config.json by: the options a resume may change,
    and the values of options an older config.json predates."""
    return RunConfig.RUN_CONTROL, {**RunConfig().to_dict(), **RunConfig.PREDATED}


def check_grid(grid, output: Path) -> None:
    """Every run of `clora compare`, checked before the comparison's folder is created: a mistake in its
    last run (a method option, a target module) would otherwise stop it hours in."""
    from .compare import run_dir_of
    from .continual import prepare

    checked: set[tuple] = set()
    for method, order, seed, config in grid:
        prepared = prepare(config)  # options, data, method options
        run_dir = run_dir_of(output, method, order, seed)
        # The prepared config: it carries the digest of a --tasks-file's data, which a resume must match.
        RunDir.check(run_dir, prepared.config.to_dict(), (run_dir / "config.json").is_file(), False, *folder_rules())
        key = (config.model, config.method, tuple(config.method_options), tuple(config.target_modules or ()))
        if key not in checked:
            check_model(config.model, prepared.method)
            checked.add(key)


def check_model(spec: str, method: Method) -> None:
    source = resolve_model_dir(spec)
    config = load_config(spec, source)
    load_tokenizer(spec, source)
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the architecture's code, not the user's to fix
        skeleton = auto_class(config).from_config(config)
    attach(copy.deepcopy(method), skeleton, spec)  # a copy: attaching records model state in the method


def attach(method: Method, model: nn.Module, spec: str) -> nn.Module:
    """`method.attach`, with PEFT's refusals (target modules not in the model, no default target
    modules for its architecture) as one-line errors that list the names the model does have."""
    try:
        return method.attach(model)
    except ValueError as exc:
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, nn.Linear)})
        wanted = ",".join(method.settings.target_modules or []) or "(the default)"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--target-modules {wanted} does not fit model {spec!r}: {reason} "
                        f"(its linear layers are named: {', '.join(names)})") from None
