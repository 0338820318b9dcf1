"""MTL: one LoRA trained once on the union of all tasks. Not continual: the upper bound methods are
measured against. Its accuracy matrix has a single row, so BWT/FWT/forgetting do not apply."""
from . import register
from .base import Method, Stage


class MTL(Method):
    name = "mtl"
    summary = "one LoRA trained jointly on all tasks (upper bound, not continual)"
    keeps_old_data = True

    def stages(self, task_names: list[str]) -> list[Stage]:
        return [Stage(0, "joint", list(task_names))]


register(MTL)
