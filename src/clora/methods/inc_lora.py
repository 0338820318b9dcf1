"""IncLoRA: a fresh LoRA per task; earlier ones frozen and kept. The kept LoRAs are stored as one
concatenated adapter (rank r per task seen), which is a plain PEFT LoRA computing their sum."""
from .. import lora
from . import register
from .base import Method, StageData


class IncLoRA(Method):
    name = "inc-lora"
    summary = "a new LoRA per task, earlier ones frozen and summed (rank grows r per task)"

    def on_task_start(self, model, data: StageData) -> None:
        if data.stage.index == 0:
            super().on_task_start(model, data)
        else:
            lora.start_new_adapter(model, self.lora_config)

    def on_task_end(self, model, data: StageData, optimizer) -> None:
        if data.stage.index > 0:
            lora.fold_new_adapter(model)


register(IncLoRA)
