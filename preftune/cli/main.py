"""Command line: argument parsing only; every command calls into the library.

``preftune train`` has one flag per :class:`preftune.config.train_config.TrainConfig` field (generated
from the dataclass, so the help text and the YAML keys can't drift apart), also spelled with
underscores as TRL does (``--learning_rate``). Flags given on the command line override the
``--config`` file; bad values give one line and exit 2. No parser accepts abbreviations
(``--lr`` is not ``--lr-scheduler``): :class:`Parser` is the class of every (sub)parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

from preftune.common.text import suggest
from preftune.config.train_config import TrainConfig
from preftune.config.values import ConfigError, as_bool, coerce, field_type
from preftune.config.values import flags_markdown as config_flags_markdown
from preftune.evaluation.judges.base import JudgeError

GROUP_TITLES = {
    "model": "model", "data": "data", "method": "method and reference", "lora": "LoRA",
    "training": "optimisation", "speed": "speed and memory", "scale": "several processes (accelerate)",
    "output": "output, logging, checkpoints",
}

TRAIN_EPILOG = """\
examples:
  preftune train --model ./my-sft-model --data pairs.jsonl --output-dir runs/dpo1 --loss dpo --beta 0.1
  preftune train --config configs/dpo.yaml --model ./sft --data pairs.jsonl --output-dir runs/dpo2
  preftune train --model ./sft --data pairs.jsonl --output-dir runs/lora --lora-r 16 --precompute-ref

data formats (one JSON object per line, or Parquet / datasets folders with the same columns):
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"chosen": [{"role","content"}...], "rejected": [...], "prompt": [...] (optional)}
  implicit prompt {"chosen": str, "rejected": str}  (prompt = up to the last common "\\n\\nAssistant:")
  KTO (--loss kto){"prompt": str, "completion": str, "label": bool}  (paired files are unpaired for you)
  SFT (--loss sft){"prompt": str, "completion": str} or {"messages": [...]}  (or a paired file: chosen side)

every flag is also accepted with underscores, as TRL spells it (--learning_rate = --learning-rate); --config
also reads a YAML of TRL's DPOConfig names (per_device_train_batch_size, loss_type, bf16 ...), logs what it
mapped and refuses what it cannot honour (docs/configuration.md: Bring your TRL config).

allocator: on Linux the command keeps large freed buffers in glibc's heap for the next step instead of
unmapping them (~10% faster steps; memory freed after a peak stays with the process until it exits);
PREFTUNE_ALLOCATOR=system keeps glibc's defaults, and MALLOC_* variables you set are left alone
(docs/performance.md: The allocator).
"""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes no abbreviations (``--learning-rat`` is an error, not ``--learning-rate``).

    ``add_subparsers`` makes its sub-parsers of the parent's class, so every command inherits this.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """argparse's one line, plus what an unrecognized flag may have meant."""
        if message.startswith("unrecognized arguments:"):
            given = next((w for w in message.split()[2:] if w.startswith("--")), None)
            if given:
                message += _flag_hint(given.split("=")[0], _option_strings(self))
        super().error(message)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every --flag of ``parser`` and of its sub-commands (the top-level parser reports unrecognized ones)."""
    found = [o for action in parser._actions for o in action.option_strings if o.startswith("--")
             and action.help is not argparse.SUPPRESS]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _option_strings(sub)
    return sorted(set(found))


def _flag_hint(given: str, options: list[str]) -> str:
    starts = [o for o in options if o.startswith(given)]
    if starts:
        return f" ({given} is the start of {', '.join(starts[:4])}: flags are never abbreviated; give one in full)"
    close = suggest(given.replace("_", "-"), options, n=3, cutoff=0.8)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, grouped, with defaults suppressed (so we know what was given)."""
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        group_name = f.metadata.get("group", "training")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(GROUP_TITLES.get(group_name, group_name))
        group = groups[group_name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default
        help_text += f" (default: {'off' if default is False else 'on' if default is True else default})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings ("10-30% more time")
        # TRL's spelling (--learning_rate) as a hidden alias of the same option
        alias = ["--" + f.name] if "_" in f.name else []
        if field_type(f) is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
            for name in alias:
                group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            const = f.metadata.get("const")
            extra = dict(nargs="?", const=const) if const is not None else {}
            group.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=help_text, **extra)
            for name in alias:
                group.add_argument(name, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                                   help=argparse.SUPPRESS, **extra)
            if f.name == "mixed_precision":  # TRL's spellings
                for name in ("bf16", "fp16"):
                    group.add_argument(f"--{name}", nargs="?", const="true", default=argparse.SUPPRESS,
                                       metavar="BOOL", help=f"TRL's --{name}: the same as --mixed-precision {name} "
                                                            f"(--{name} false: no mixed precision)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML file (if any) overridden by the flags given on the command line."""
    cfg = TrainConfig.from_yaml(args.config) if getattr(args, "config", None) else TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    given = vars(args)
    for name, value in given.items():
        if name in fields:
            setattr(cfg, name, coerce(fields[name], value, source="command line"))
    cfg.given = getattr(cfg, "given", frozenset()) | {name for name in given if name in fields}
    for name in ("bf16", "fp16"):  # TRL's flags
        if name in given:
            if "mixed_precision" in given:
                raise ConfigError(f"--{name} and --mixed-precision both given; use one")
            cfg.mixed_precision = name if as_bool(given[name], name, "command line") else "no"
    return cfg


def flags_markdown() -> str:
    """docs/reference/train-flags.md's table of every ``preftune train`` flag (kept in sync by a test)."""
    return config_flags_markdown(TrainConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="preftune",
        description="Preference fine-tuning for causal language models: DPO and every TRL loss type (IPO, robust, "
                    "hinge, EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP ...), ORPO, SimPO, CPO, KTO, BCO and SFT, with "
                    "packed prefix-shared batches, a cheap reference model, and a labelling app "
                    "(`preftune train --help` lists every method with its paper).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (DPO and family, KTO, SFT)",
                           description="Train a causal LM with a preference (or SFT) objective.",
                           epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (keys = flag names); "
                                                           "command-line flags override it")
    train.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    from preftune.cli import data as cli_data
    from preftune.cli import eval as cli_eval
    from preftune.cli import export as cli_export
    from preftune.cli import iterate as cli_iterate
    from preftune.cli import label as cli_label
    from preftune.cli import model as cli_model
    from preftune.cli import quickstart as cli_quickstart

    cli_quickstart.register(sub)
    cli_eval.register(sub)
    cli_data.register(sub)
    cli_model.register(sub)
    cli_label.register(sub)
    cli_export.register(sub)
    cli_iterate.register(sub, add_config_flags, config_from_args)
    return parser


def needs_launch(cfg: TrainConfig) -> bool:
    """Several processes, or an accelerate config on a GPU machine (FSDP / DeepSpeed on one GPU
    still need accelerate's launcher to set them up)."""
    import torch

    return cfg.num_processes > 1 or bool(cfg.accelerate_config and torch.cuda.is_available())


def launch_command(cfg: TrainConfig, argv: list[str]) -> list[str]:
    """The command that re-runs ``preftune train ARGV`` in ``cfg.num_processes`` processes.

    GPUs: ``accelerate launch`` (with ``--accelerate-config`` if given). CPU: ``torchrun``
    (accelerate's own launcher starts a single process on CPU); preftune then runs gloo DDP.
    """
    import torch

    # The launched processes see LOCAL_RANK and run the training themselves.
    module = ["-m", "preftune", "train", *argv]
    n = str(cfg.num_processes)
    if torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", n]
        if cfg.accelerate_config:
            cmd += ["--config_file", cfg.accelerate_config]
        else:
            cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1"]
        return cmd + module
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--standalone", *module]


def cmd_train(args) -> int:
    from preftune.training.loop import train

    cfg = config_from_args(args).validate()
    if needs_launch(cfg) and "LOCAL_RANK" not in os.environ:
        import subprocess

        cmd = launch_command(cfg, args.argv)
        logging.getLogger("preftune").info("launching: %s", " ".join(cmd))
        # Ctrl-C reaches the launched processes (same process group): they checkpoint and exit;
        # this parent just waits for them and passes their exit code on. A do-nothing handler, not
        # SIG_IGN: an ignored signal is inherited through exec (and training leaves an ignored SIGINT
        # ignored), a handler is reset to the default there.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            return subprocess.call(cmd)
        finally:
            signal.signal(signal.SIGINT, previous)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # launched processes: only the first one reports
        return 0
    print(f"done: {result.steps} steps; model saved to {result.output_dir}")
    before, after = result.eval_before, result.eval_after
    if after:
        key = "rewards/accuracies" if "rewards/accuracies" in after else "loss"
        prior = f"{before[key]:.4f} -> " if key in before else ""
        print(f"held-out {key}: {prior}{after[key]:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # after the command name, for re-launching
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(message)s" if sys.stderr.isatty() else "%(asctime)s %(levelname)s "
                                                                                       "%(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, JudgeError) as exc:
        if os.environ.get("PREFTUNE_DEBUG"):
            raise
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (the first finishes the step and checkpoints), or one outside training
        if os.environ.get("PREFTUNE_DEBUG"):
            raise
        print("preftune: aborted (Ctrl-C); steps since the last checkpoint were not saved", file=sys.stderr)
        return 130


def _version() -> str:
    from preftune.common.version import VERSION as __version__

    return f"preftune {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
