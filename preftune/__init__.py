"""preftune: preference fine-tuning (DPO and family, KTO, SFT) for causal language models.

In Python (notebooks, scripts), the same options as the command line::

    import preftune
    result = preftune.train(model="./sft", data="pairs.jsonl", output_dir="runs/dpo1", loss="dpo")
    metrics = preftune.evaluate(model="runs/dpo1", ref_model="./sft", data="held_out.jsonl")

``import preftune`` loads nothing heavy (no torch): the work is imported when first called.
"""

import sys
import types

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "__version__"]


def train(config=None, **options):
    """Train as ``preftune train`` does; keywords are the flags with underscores (see :func:`preftune.api.train`)."""
    from .api import train as api_train

    return api_train(config, **options)


def evaluate(model, data, **options):
    """Evaluate as ``preftune eval`` does; returns its result dict (see :func:`preftune.api.evaluate`)."""
    from .api import evaluate as api_evaluate

    return api_evaluate(model, data, **options)


_API = {"train": train, "evaluate": evaluate}


class _CallableModule(types.ModuleType):
    """``preftune.train`` and ``preftune.evaluate`` are also submodules (the loop, the evaluator). Importing
    one makes Python set it as the package attribute over the API function; called, it is the API again."""

    def __call__(self, *args, **kwargs):
        return _API[self.__name__.rpartition(".")[2]](*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _CallableModule  # the import system is binding the submodule of that name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
