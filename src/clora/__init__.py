"""clora: continual low-rank fine-tuning of LLMs.

    import clora
    result = clora.run(clora.RunConfig(method="seq-lora", order="1", train_per_task=32, test_per_task=32),
                       output="runs/demo")
    print(result["metrics"]["AA"], result["metrics"]["BWT"])
"""
import logging

# bitsandbytes (imported by peft and galore-torch when installed; galore-torch requires it) logs a
# warning about optional kernels at import on every run: a user's error output must stay one line.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from .config import RunConfig  # noqa: E402
from .errors import UserError  # noqa: E402

__version__ = "0.1.0"


def run(config: RunConfig, output, resume: bool = False, overwrite: bool = False) -> dict:
    from .continual import run as _run

    return _run(config, output, resume=resume, overwrite=overwrite)


__all__ = ["RunConfig", "UserError", "run", "__version__"]
