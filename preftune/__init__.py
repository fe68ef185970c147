"""preftune: preference fine-tuning (DPO and family, KTO, SFT) for causal language models.

In Python (notebooks, scripts), the same options as the command line::

    import preftune
    result = preftune.train(model="./sft", data="pairs.jsonl", output_dir="runs/dpo1", loss="dpo")
    metrics = preftune.evaluate(model="runs/dpo1", ref_model="./sft", data="held_out.jsonl")

``import preftune`` loads nothing heavy (no torch): the work is imported when first called.
"""

from preftune.common.version import VERSION as __version__

__all__ = ["train", "evaluate", "iterate", "__version__"]


def train(config=None, **options):
    """Train as ``preftune train`` does; keywords are the flags with underscores (see :func:`preftune.api.train`)."""
    from preftune.api import train as api_train

    return api_train(config, **options)


def evaluate(model, data, **options):
    """Evaluate as ``preftune eval`` does; returns its result dict (see :func:`preftune.api.evaluate`)."""
    from preftune.api import evaluate as api_evaluate

    return api_evaluate(model, data, **options)


def iterate(model, prompts, eval_prompts, judge, output_dir, **options):
    """On-policy rounds as ``preftune iterate`` runs them (sample -> judge -> train -> measure); returns its
    result (see :func:`preftune.api.iterate`)."""
    from preftune.api import iterate as api_iterate

    return api_iterate(model, prompts, eval_prompts, judge, output_dir, **options)
