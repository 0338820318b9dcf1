"""clora: continual low-rank fine-tuning of LLMs.

    import clora
    result = clora.run(clora.RunConfig(method="seq-lora", order="1", train_per_task=32, test_per_task=32),
                       output="runs/demo")
    print(result["metrics"]["AA"], result["metrics"]["BWT"])
"""
from .config import RunConfig
from .errors import UserError

__version__ = "0.1.0"


def run(config: RunConfig, output, resume: bool = False, overwrite: bool = False) -> dict:
    from .continual import run as _run

    return _run(config, output, resume=resume, overwrite=overwrite)


__all__ = ["RunConfig", "UserError", "run", "__version__"]
