"""SeqLoRA: one LoRA trained on each task in turn, nothing protects earlier tasks (the lower bound).
The base class's defaults are exactly this method."""
from . import register
from .base import Method


class SeqLoRA(Method):
    name = "seq-lora"
    summary = "one LoRA trained on each task in turn (forgetting lower bound)"


register(SeqLoRA)
