"""The final model: written into the run folder atomically, an interrupted write undone, and a full
disk answered by keeping the trained weights somewhere else.

:func:`save_model_folder` writes it into ``OUTPUT/.final.tmp-<pid>`` and moves its files in, the old
model's ``config.json`` out first and the new one in last: a kill while the model is written (the long
part) leaves the previous model untouched, and a kill during the moves leaves a folder without
config.json (not loadable, never a mix), which the next run's start puts back as it was
(:func:`recover_final_save`). These are moves of whole files between folders (``os.replace``), not a
single file's write, so :func:`preftune.common.files.write_atomic` does not fit them.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from pathlib import Path

from preftune.common.files import (
    DiskFullError,
    free_bytes,
    fsync_dir,
    left_by_dead_process,
    remove_left_temp,
    size_text,
    tensor_bytes,
    write_guard,
)
from preftune.training import checkpoint as ckpt

log = logging.getLogger("preftune")

FINAL_TMP = ".final.tmp-"  # OUTPUT/.final.tmp-<pid>: the final model being written
FINAL_OLD = ".final.old-"  # OUTPUT/.final.old-<pid>: the previous model's files while the new ones move in
# Test hook stages of the final save (the same environment variable as the checkpoint's, ckpt.CRASH_HOOK_ENV).
FINAL_CRASH_STAGES = ("final_after_weights", "final_mid_swap", "final_after_swap")

# The final model's files (save_pretrained of a model or adapters, and of the tokenizer).
MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json", "*.safetensors",
               "*.safetensors.index.json", "pytorch_model*.bin", "adapter_model.bin", "tokenizer*",
               "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "spiece.model",
               "chat_template.jinja", "chat_template.json", "README.md")  # README.md: the model card
CONFIG_FILES = ("config.json", "adapter_config.json")  # what makes a folder loadable: moved out first, in last
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "adapter_model.bin")


def matches_any(name: str, patterns) -> bool:
    """Whether the file name ``name`` matches one of the glob ``patterns``."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def save_final(cfg, accelerator, model, tokenizer, run) -> None:
    """The final model + tokenizer in Hugging Face format (merged or adapter folder with LoRA), written
    atomically into ``run.out`` (:func:`save_model_folder`).

    A full disk raises :class:`DiskFullError` saying where the trained weights are: a checkpoint of this
    step, or a copy written to the system's temp folder when that has room; nothing in ``run.out``
    is replaced then. A collective.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model).model  # the transformers (or peft) model
    if cfg.lora_r and cfg.merge_lora:
        unwrapped = unwrapped.merge_and_unload()
        state = unwrapped.state_dict()
    else:  # gathered across ranks (FSDP); keys of the LogProbModel wrapper start with "model."
        state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            unwrapped.save_pretrained(folder, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(folder)

        needed = tensor_bytes(state)
        try:
            save_model_folder(run.out, write, step=0, needed=needed)
        except DiskFullError as exc:
            raise DiskFullError(f"{exc}; nothing in {run.out} was replaced. {_keep_trained(run, write, needed)}") \
                from None
        if getattr(cfg, "export_gguf", None):
            export_final_gguf(run.out, cfg.export_gguf)
    accelerator.wait_for_everyone()


def export_final_gguf(out: Path, quant: str) -> Path:
    """``--export-gguf QUANT``: the saved final model in ``out`` (LoRA adapters merged) also written as
    ``out/gguf/<out's name>.<QUANT>.gguf``, with an Ollama ``Modelfile`` beside it. A subfolder, so the run
    folder itself never holds a ``.gguf`` (an adapter folder with one would load as that GGUF).
    Returns the GGUF's path; a model that cannot be exported raises one line saying the model is saved.
    """
    from preftune.model.export_gguf import ExportError, export_gguf
    from preftune.model.export_ollama import ollama_name, write_modelfile

    out = Path(out)
    target = out / "gguf" / f"{out.resolve().name}.{quant.upper()}.gguf"
    try:
        result = export_gguf(out, target, quant=quant)
    except ExportError as exc:
        raise ExportError(f"the final model is saved in {out}, but --export-gguf {quant} failed: {exc}") from None
    modelfile, _ = write_modelfile(target, result.plan.tokenizer, result.plan.vocab.stop_tokens)
    log.info("GGUF written: %s (%s); for Ollama: ollama create %s -f %s", target, size_text(result.size_bytes),
             ollama_name(target), modelfile)
    return target


def _keep_trained(run, write, needed: int) -> str:
    """After a failed final save: where the trained weights are kept (a checkpoint of the last step,
    or a copy in the temp folder when it lies on another, roomier disk), as a sentence."""
    step = run.step
    latest = ckpt.list_checkpoints(run.out, run.run_id)
    if latest and ckpt.checkpoint_step(latest[-1]) == step:
        return (f"The trained weights are in checkpoint {latest[-1]}: free some space and run the same command "
                f"with --resume-from latest to write the final model")
    spare = Path(tempfile.gettempdir())
    free = free_bytes(spare)
    if free is not None and free > 2 * needed:
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"preftune-{run.run_id}-final-", dir=spare))
            write(folder)
            return f"The trained model was saved to {folder} instead: move it into place once there is space"
        except Exception as exc:  # the last resort failed as well: say so
            log.warning("could not keep the trained model in %s either: %s", spare, exc)
    kept = f" (the newest checkpoint is {latest[-1]}, step {ckpt.checkpoint_step(latest[-1])})" if latest else ""
    return f"The trained weights of step {step} could not be kept{kept}: free at least {size_text(needed)} and run again"


def save_model_folder(out: Path, write, step: int, needed: int) -> None:
    """Write the final model into ``out`` atomically: ``write(folder)`` fills ``out/.final.tmp-<pid>``,
    whose files then replace the model files in ``out`` (config.json out first and in last, so no
    moment shows a config beside another model's weights). Raises :class:`DiskFullError` (nothing in
    ``out`` replaced) when the disk fills up; ``needed`` is the estimated size in bytes.
    """
    out = Path(out)
    remove_left_temp(out, f"{FINAL_TMP}*")
    tmp = out / f"{FINAL_TMP}{os.getpid()}"
    tmp.mkdir()
    try:
        with write_guard(tmp, needed):
            write(tmp)
            ckpt._crash_point("final_after_weights", step)
            fsync_dir(tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    new = sorted(p.name for p in tmp.iterdir())
    old = sorted(p.name for p in out.iterdir() if p.is_file() and (p.name in new or matches_any(p.name, MODEL_FILES)))
    aside = out / f"{FINAL_OLD}{os.getpid()}"
    aside.mkdir(exist_ok=True)
    configs_first = sorted(old, key=lambda n: n not in CONFIG_FILES)
    for name in configs_first:  # from the first move on the folder has no config.json: not loadable, not mixed
        os.replace(out / name, aside / name)
    ckpt._crash_point("final_mid_swap", step)
    for name in sorted(new, key=lambda n: n in CONFIG_FILES):  # config.json last: the new model is complete
        os.replace(tmp / name, out / name)
    fsync_dir(out)
    ckpt._crash_point("final_after_swap", step)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def recover_final_save(out: Path) -> None:
    """Undo or finish a final save that a kill interrupted (see :func:`save_model_folder`).

    A ``.final.old-<pid>`` folder of a dead process holds the previous model's files. When ``out`` has
    no config.json the new files were not all in: the model files that did arrive go and the old ones
    come back (the previous model, as it was). Otherwise the new model was complete: the old files go.
    Leftover ``.final.tmp-`` folders of dead processes go too.
    """
    out = Path(out)
    for aside in sorted(out.glob(f"{FINAL_OLD}*")):
        if not left_by_dead_process(aside.name):
            continue
        if not any((out / name).exists() for name in CONFIG_FILES):
            for arrived in [p for p in out.iterdir() if p.is_file() and matches_any(p.name, MODEL_FILES)]:
                arrived.unlink()  # every model file was moved aside before the first new one came in
            for name in sorted((p.name for p in aside.iterdir()), key=lambda n: n in CONFIG_FILES):
                os.replace(aside / name, out / name)
            log.warning("an interrupted final save was undone: the previous model in %s is back as it was", out)
        shutil.rmtree(aside, ignore_errors=True)
    remove_left_temp(out, f"{FINAL_TMP}*")
