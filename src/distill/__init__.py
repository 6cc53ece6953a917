"""distill: knowledge distillation of large language models.

The Python API (:mod:`distill.api`) is here under the commands' names: ``distill.train``, ``distill.cache``,
``distill.generate``, ``distill.evaluate``, ``distill.prune``, and their result types. They are looked up when
first used, so ``import distill`` alone (and every module below the API) does not load the commands.
"""

import importlib

__version__ = "0.1.0"

_API = ("train", "cache", "generate", "evaluate", "prune",
        "TrainResult", "CacheResult", "GenerateResult", "EvalResult", "PruneResult")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("distill.api"), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
