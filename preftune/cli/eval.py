"""Command line for evaluation: ``preftune eval``, ``preftune generate`` and ``preftune compare``.

Argument parsing only; the work is in :mod:`preftune.evaluation.evaluate` and
:mod:`preftune.evaluation.sweep`. ``preftune eval`` has one flag per
:class:`preftune.config.eval_config.EvalConfig` field (generated from the dataclass, with its help,
choices and range; bad values give one line and exit 2) and reads a YAML of the same names with
``--config``. ``register(subparsers)`` adds the three commands to the ``preftune`` parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from preftune.config.eval_config import EvalConfig
from preftune.config.values import check_field, coerce, field_type, flag_name, flags_markdown
from preftune.config.yaml import load_options

EVAL_GROUPS = {"model": "models", "data": "held-out data", "generation": "generation, KL and win rate (--generate)",
               "compute": "compute"}
SAMPLING = ("max_new_tokens", "temperature", "top_p", "seed", "batch_size", "dtype", "mixed_precision",
            "trust_remote_code")  # the EvalConfig fields `preftune generate` shares
REQUIRED = ("model", "data")  # flags every `preftune eval` names (--config gives the other options)

EVAL_EPILOG = """\
examples:
  preftune eval --model runs/dpo1 --ref-model ./sft --data held_out.jsonl
  preftune eval --model runs/dpo1 --ref-model ./sft --data held_out.jsonl --nll-data sft_val.jsonl --json
  preftune eval --model runs/dpo1 --ref-model ./sft --data held_out.jsonl \\
      --generate 64 --judge python:my_judges.py:score --max-new-tokens 128 --seed 0

what is measured:
  preference accuracy  share of held-out pairs whose implicit reward beta * (logp_model - logp_ref) is higher
                       for the chosen response; without --ref-model the raw preference logp(chosen) >
                       logp(rejected) (the output says which)
  NLL/token            mean NLL per token of the chosen responses (or of --nll-data) under model and base
  KL(model || base)    Monte-Carlo on the model's samples (--generate N prompts, temperature 1)
  win rate vs base     model's sample vs base's sample per prompt under --judge, 95% Wilson interval

judges (--judge):
  python:module:function | python:path/to/file.py:function   f(prompt, response) -> float, higher is better
  reward-model:PATH                                         a sequence-classification reward model
  openai:URL#MODEL                                          an OpenAI-compatible server, asked in both orders
"""

GENERATE_EPILOG = """\
examples:
  preftune generate --model ./sft --prompts prompts.txt --n 4 --judge python:my_judges.py:score --out pairs.jsonl
  preftune generate --model runs/dpo1 --prompts held_out.jsonl --n 8 --judge reward-model:./rm \\
      --temperature 0.8 --top-p 0.95 --out round2.jsonl
  preftune generate --model ./sft --prompts prompts.txt --n 4 --keep-all --judge python:my_judges.py:score \\
      --out groups.jsonl

prompts file (--prompts):
  prompts.txt     one prompt per line (blank lines skipped; use JSONL for prompts with newlines)
  prompts.jsonl   {"prompt": "..."} or {"prompt": [{"role": "user", "content": "..."}]} per line; records
                  without "prompt" give the prompt of their chosen/rejected pair (explicit or implicit,
                  as in training) or of their SFT "messages"

output: one {"prompt", "chosen", "rejected"} pair per prompt (best vs worst of the n samples by the judge),
readable by `preftune train --data`. Prompts whose samples all tie, or whose best or worst sample is
empty text (training refuses empty completions), are skipped and counted.

--keep-all: every sample, {"prompt", "responses": [...], "meta"} per prompt, for `preftune label serve`.
With --judge as well, each record also holds "scores" (a scoring judge's scores, or a pairwise judge's
round-robin points): response groups `preftune train --data` reads (one forward per group, ties kept);
empty samples are left out and prompts with fewer than 2 other samples skipped, both counted.
"""

COMPARE_EPILOG = """\
example sweep.yaml (relative paths are relative to the current directory):
  base: ./sft-model             # every variant starts from it and is compared with it
  data: train.jsonl
  eval_data: held_out.jsonl
  output_dir: runs/sweep
  common: {max_steps: 50, batch_size: 8, learning_rate: 5.0e-6}   # any `preftune train` option
  variants:
    - {name: dpo-b0.05, loss: dpo, beta: 0.05}
    - {name: ipo, loss: ipo, beta: 0.5}
    - {name: simpo, loss: simpo}
  eval: {generate: 16, judge: "python:my_judges.py:score"}   # optional; also max_new_tokens, temperature,
                                # top_p, seed, batch_size, beta, kl_samples, nll_data, max_examples
  criterion: win_rate           # or eval_accuracy: how the best variant is chosen
  isolate: true                 # one process per variant (its peak memory is measured); default

writes OUTPUT_DIR/<name>/ per variant (done.json when finished: re-runs skip it), and OUTPUT_DIR/report.md,
report.html (self-contained), summary.json, curves.png, frontier.png. Every variant's options are checked
before any variant runs (a bad one: exit 2). A variant that fails while running is reported with its error,
the others still run, and compare exits 1 with one line naming the failed variants. Each variant runs in
a process that ends with compare's; run again, compare waits (up to 10 min) for a variant folder that a
live process still holds.
"""


def register(subparsers) -> None:
    """Add ``eval``, ``generate`` and ``compare`` to the ``preftune`` sub-command parsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    ev = subparsers.add_parser("eval", help="evaluate a model against its base on held-out pairs",
                               description="Held-out preference metrics, NLL regression vs the base, and\n"
                                           "(with --generate) KL to the base and the win rate over it.",
                               epilog=EVAL_EPILOG, formatter_class=fmt)
    ev.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (keys = flag names); command-line "
                                                         "flags override it")
    ev.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ev.add_argument("--output", metavar="FILE.json", help="also write the JSON result to this file")
    add_eval_flags(ev)
    ev.set_defaults(func=cmd_eval)

    gen = subparsers.add_parser("generate", help="build on-policy preference pairs: best vs worst of n samples",
                                description="Sample --n responses per prompt from --model, rank them with\n"
                                            "--judge, and write the best as chosen and the worst as rejected.",
                                epilog=GENERATE_EPILOG, formatter_class=fmt)
    gen.add_argument("--model", required=True, help="model to sample (folder, hub name or .gguf file)")
    gen.add_argument("--prompts", required=True, help="prompts file: .txt (one per line) or JSONL (see below)")
    gen.add_argument("--n", type=int, default=4, help="samples per prompt (>= 2; default: 4)")
    gen.add_argument("--judge", help="judge spec ranking the samples (required unless --keep-all; with --keep-all "
                                     "it scores every sample)")
    gen.add_argument("--out", required=True, metavar="PAIRS.jsonl", help="where to write the pairs")
    gen.add_argument("--keep-all", action="store_true",
                     help="write every sample: {\"prompt\", \"responses\": [...], \"meta\"} per prompt, a "
                          "candidates file for `preftune label serve`; with --judge also \"scores\" (empty "
                          "samples left out): response groups `preftune train` reads")
    gen.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    add_sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)

    cmp = subparsers.add_parser("compare", help="train several variants from one base and compare them",
                                description="Train each variant of a sweep file from the same base on the\n"
                                            "same data, evaluate each against the base, and write a report\n"
                                            "(table, training curves, reward-vs-KL plot, best variant).",
                                epilog=COMPARE_EPILOG, formatter_class=fmt)
    cmp.add_argument("--config", required=True, metavar="SWEEP.yaml", help="the sweep file")
    cmp.set_defaults(func=cmd_compare)


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EvalConfig field that has one, grouped, with defaults suppressed (so the flags given
    are known and override ``--config``); the help shows each default; ``--model`` and ``--data`` are required."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(EvalConfig):
        if not f.metadata.get("flag", True):
            continue
        group_name = f.metadata.get("group", "compute")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(EVAL_GROUPS.get(group_name, group_name))
        _add_flag(groups[group_name], f, argparse.SUPPRESS, required=f.name in REQUIRED)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """``preftune generate``'s sampling and compute flags: the EvalConfig fields of :data:`SAMPLING`, with
    their command-line defaults; :func:`sampling_options` checks the values as ``preftune eval`` does."""
    fields = EvalConfig.fields()
    for name in SAMPLING:
        _add_flag(parser, fields[name], fields[name].metadata.get("cli_default", fields[name].default))


def _add_flag(parser, f: dataclasses.Field, default, required: bool = False) -> None:
    """The flag of field ``f``: its help (with its command-line default), choices and placeholder; text values
    are converted and range-checked afterwards (:func:`eval_config_from_args`, :func:`sampling_options`)."""
    shown = f.metadata.get("cli_default", f.default)
    shown = "off" if shown is False else "on" if shown is True else shown
    suffix = "" if required or shown is None else f" (default: {shown})"  # None: described in the help
    help_text = (f.metadata.get("help", "") + suffix).replace("%", "%%")
    if field_type(f) is bool:
        parser.add_argument("--" + flag_name(f.name), action=argparse.BooleanOptionalAction, default=default,
                            help=help_text)
        return
    choices = f.metadata.get("choices")
    metavar = "{" + ",".join(choices) + "}" if choices else f.metadata.get("metavar", f.name.upper())
    parser.add_argument("--" + flag_name(f.name), default=default, metavar=metavar, help=help_text,
                        required=required)


def sampling_options(args: argparse.Namespace) -> dict:
    """The :data:`SAMPLING` flags' values converted to their types and checked against their fields (choices,
    ranges), or ConfigError naming the flag."""
    fields = EvalConfig.fields()
    options = {}
    for name in SAMPLING:
        options[name] = coerce(fields[name], getattr(args, name), source="command line")
        check_field(fields[name], options[name])
    return options


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The ``--config`` file (if any) overridden by the flags given, then validated; the command line's
    defaults where neither sets an option (``--mixed-precision auto``)."""
    source = getattr(args, "config", None)
    file_options = load_options(source) if source else {}
    cfg = EvalConfig.from_dict(file_options, source=str(source))
    in_file = {key.replace("-", "_") for key in file_options}  # every key is a known name here
    fields = EvalConfig.fields()
    for f in fields.values():
        if "cli_default" in f.metadata and f.name not in in_file:
            setattr(cfg, f.name, f.metadata["cli_default"])
    given = {name: value for name, value in vars(args).items() if name in fields}
    for name, value in given.items():
        setattr(cfg, name, coerce(fields[name], value, source="command line"))
    return cfg.validate()


def eval_flags_markdown() -> str:
    """The docs' table of every ``preftune eval`` flag, generated from EvalConfig like the train flags table."""
    return flags_markdown(EvalConfig)


def cmd_eval(args) -> int:
    from preftune.evaluation.evaluate import evaluate_model
    from preftune.evaluation.report_table import format_table, to_json

    result = evaluate_model(eval_config_from_args(args))
    text = to_json(result)
    if args.output:
        from preftune.common.files import write_atomic

        write_atomic(Path(args.output), text)
    print(text if args.json else format_table(result))
    return 0


def cmd_generate(args) -> int:
    from preftune.data.convert import write_rows
    from preftune.evaluation.pairs import onpolicy_pairs
    from preftune.evaluation.prompts import read_prompts

    if not args.keep_all and not args.judge:
        raise ValueError("--judge is required to rank the samples (or --keep-all to write them all unranked)")
    options = sampling_options(args)  # checked before anything is read or loaded
    prompts = read_prompts(args.prompts, limit=args.max_prompts)
    if args.keep_all:
        return _write_candidates(args, prompts, options)
    pairs, counts = onpolicy_pairs(args.model, prompts, args.judge, n=args.n, **options)
    write_rows(args.out, pairs)  # atomic; an unwritable or full disk is one line naming --out
    print(f"{len(pairs)} pairs from {len(prompts)} prompts written to {args.out}; skipped: "
          f"{counts['skipped_ties']} prompts whose {args.n} samples all tied, "
          f"{counts['skipped_empty']} whose best or worst sample was empty")
    return 0


def _write_candidates(args, prompts, options: dict) -> int:
    from preftune.data.convert import write_rows
    from preftune.evaluation.pairs import onpolicy_candidates

    records = onpolicy_candidates(args.model, prompts, n=args.n, judge=args.judge, **options)
    write_rows(args.out, records)
    if not args.judge:
        print(f"{len(records)} prompts with {args.n} responses each written to {args.out} (candidates: "
              f"preftune label serve {args.out} --db labels.sqlite)")
        return 0
    empty = sum(args.n - len(record["responses"]) for record in records)
    print(f"{len(records)} response groups from {len(prompts)} prompts ({args.n} samples each, scored by "
          f"{args.judge}) written to {args.out}; left out: {len(prompts) - len(records)} prompts with fewer than 2 "
          f"non-empty samples, {empty} empty samples of the others (train: preftune train --data {args.out}; "
          f"label: preftune label serve {args.out} --db labels.sqlite)")
    return 0


def cmd_compare(args) -> int:
    """Run the sweep; exit 1 with one line naming the variants that failed (the report is written first)."""
    from preftune.evaluation.sweep import failure_line, run_compare

    path = run_compare(args.config)
    summary = json.loads((path.parent / "summary.json").read_text())
    print(summary["best_text"])
    print(f"report: {path} and {path.with_suffix('.html')}")
    failed = failure_line(summary["rows"])
    if failed:
        raise ValueError(failed)  # main(): "preftune: error: ..." and exit 1
    return 0
