"""``preftune data check | convert | split | pairs``: argument parsing only; the work is in
:mod:`preftune.data.doctor`, :mod:`preftune.data.convert`, :mod:`preftune.data.split` and
:mod:`preftune.data.ratings`.

``register(subparsers)`` adds the ``data`` command group to the main parser; every handler
returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import math

from preftune.cli.args import open_fraction, positive_int, print_usage

DATA_DESCRIPTION = """\
Look at a data file before training on it, rewrite it in another format, or split it into
train and held-out files with no prompt on both sides. Inputs: .jsonl, .jsonl.gz, .json,
.parquet, a datasets save_to_disk folder (folder[:split]) or a hub dataset name[:split]."""

CHECK_EPILOG = """\
checks: file format and prompt source; pair count (warning under 1,000); bad records, prompts that
cannot be extracted, empty responses, chosen == rejected (errors: 'preftune train' stops on them);
exact and near duplicates (same text once lowercased, punctuation dropped, whitespace collapsed) and
pairs that contradict an earlier one; length bias (chosen longer than rejected, warned outside
40-60%); prompt / chosen / rejected lengths (mean, p50, p95, max); with --max-length or
--max-prompt-length, the pairs training would truncate or drop; with --eval, prompts shared with the
held-out file (an error). Every record is read: nothing stops at the first problem.

exit status: 0 when no finding is an error (warnings allowed), 1 when any is, so CI can run
  preftune data check data/train.jsonl --eval data/eval.jsonl --tokenizer ./model || exit 1

examples:
  preftune data check pairs.jsonl
  preftune data check pairs.jsonl --tokenizer ./my-sft-model --max-length 1024 --max-prompt-length 512
  preftune data check train.jsonl --eval eval.jsonl --json > report.json"""

CONVERT_EPILOG = """\
targets:
  messages  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}; HH-RLHF dialogue
            text is split into user / assistant turns at "\\n\\nHuman:" / "\\n\\nAssistant:"
  standard  {"prompt": str, "chosen": str, "rejected": str}; messages become dialogue text
  kto       {"prompt", "completion", "label"}: each pair -> (chosen, true), (rejected, false)
  sft       the chosen side: {"prompt": str, "completion": str} or {"messages": [...]}
response groups ({"prompt", "responses", "scores" | "ranks"}, UltraFeedback's raw rows) stay groups
{"prompt", "responses", "scores"} (messages / standard convert the prompt and each response); sft
keeps the best response; kto refuses them.

UltraFeedback-style score_chosen / score_rejected columns are kept. Bad records are skipped and
counted (their first locations are printed); the rest is converted. The output is .jsonl, .jsonl.gz
or .parquet by its name, and appears only once complete.

examples:
  preftune data convert hh-rlhf.jsonl.gz hh-messages.jsonl --to messages
  preftune data convert ultrafeedback.parquet uf.jsonl --to standard --drop-equal-scores
  preftune data convert pairs.jsonl kto.jsonl --to kto"""

SPLIT_EPILOG = """\
Records are grouped by prompt (compared lowercased, without punctuation, whitespace collapsed) and
whole groups go to one side, so no prompt is both trained on and held out. The groups are shuffled
with --seed: the same file and seed always give the same split, whatever the order of the records.
Records are copied unchanged (a response group is one record: it stays whole); bad records are
skipped and counted.

examples:
  preftune data split pairs.jsonl --train train.jsonl --eval eval.jsonl
  preftune data split pairs.jsonl --train train.jsonl --eval eval.jsonl --eval-size 500 --seed 1"""


PAIRS_EPILOG = """\
input rows:
  nested  one prompt, several scored responses: UltraFeedback's {"instruction", "completions": [{"response",
          "overall_score"}, ...]}, or {"prompt", "responses": [texts], "scores": [numbers]}
  flat    one response per row, grouped by prompt text or --group-by ID: CSAT or thumbs logs such as
          {"conversation_id", "prompt", "response", "csat": 4}; scores may be numbers, true/false, up/down

strategies (equal scores are ties: never a pair, always counted):
  best-worst   the best against the worst response of each prompt (score difference >= --margin)
  all          every pair of responses whose scores differ by >= --margin
  best-random  the best against a random response scoring >= --margin below it (seeded per prompt)
--to kto: every response with a score, labelled by --threshold (and --reject-below).
--to groups: every scored response of a prompt in one response group {"prompt", "responses", "scores"}
  (ties kept; prompts with fewer than 2 scored responses dropped), trained on with one forward per group.

examples:
  preftune data pairs ultrafeedback.jsonl uf-pairs.jsonl --score-field overall_score
  preftune data pairs ultrafeedback.jsonl uf-all.jsonl --score-field overall_score --strategy all --margin 1
  preftune data pairs csat.jsonl csat-pairs.jsonl --score-field csat --group-by conversation_id
  preftune data pairs csat.jsonl csat-kto.jsonl --score-field csat --to kto --threshold 4 --reject-below 3
  preftune data pairs ultrafeedback.jsonl uf-groups.jsonl --score-field overall_score --to groups"""

def finite_number(text: str, least: float = -math.inf) -> float:
    """A number that is not NaN or infinite (``float`` alone takes ``nan`` and ``inf``), >= ``least``."""
    expects = "a finite number" + (f" >= {least:g}" if least > -math.inf else "")
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects {expects}, got {text!r}") from None
    if not math.isfinite(value) or value < least:
        raise argparse.ArgumentTypeError(f"expects {expects}, got {text!r}")
    return value


def non_negative_number(text: str) -> float:
    """A finite number >= 0."""
    return finite_number(text, least=0.0)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``data`` (with ``check``, ``convert``, ``split``) to ``subparsers``; returns its parser."""
    data = subparsers.add_parser("data", help="check, convert or split a data file; scored responses to pairs",
                                 description=DATA_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: print_usage(data))

    check = commands.add_parser("check", help="report every problem in a data file (exit 1 on errors)",
                                description="Read a whole data file and report its problems and statistics, "
                                            "each finding ok / warning / error.",
                                epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("path", metavar="PATH", help="the data file, folder or hub dataset to check")
    check.add_argument("--tokenizer", metavar="T", help="tokenizer folder or name for exact token lengths "
                                                         "(default: characters / 4, marked approximate)")
    check.add_argument("--max-length", type=positive_int, metavar="N",
                       help="count the pairs training would truncate or drop at this --max-length")
    check.add_argument("--max-prompt-length", type=positive_int, metavar="N",
                       help="... and at this --max-prompt-length (the end of the prompt is kept)")
    check.add_argument("--eval", metavar="PATH", dest="eval_path",
                       help="held-out file: report prompts it shares with PATH (a train/eval leak, an error)")
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    check.set_defaults(func=cmd_check)

    from preftune.data.convert import TARGETS

    convert = commands.add_parser("convert", help="rewrite a data file in another format",
                                  description="Convert every good record of SRC into the format --to and "
                                              "write DST.",
                                  epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("src", metavar="SRC", help="input file, folder or hub dataset")
    convert.add_argument("dst", metavar="DST", help="output file: .jsonl, .jsonl.gz or .parquet")
    convert.add_argument("--to", required=True, choices=TARGETS, help="target format (see below)")
    convert.add_argument("--drop-equal-scores", action="store_true",
                         help="drop pairs whose score_chosen equals score_rejected (no preference)")
    convert.set_defaults(func=cmd_convert)

    split = commands.add_parser("split", help="split into train and eval files, grouped by prompt",
                                description="Split SRC into train and eval files with no prompt on both sides.",
                                epilog=SPLIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    split.add_argument("src", metavar="SRC", help="input file, folder or hub dataset")
    split.add_argument("--train", required=True, metavar="OUT", help="training output (.jsonl, .jsonl.gz, .parquet)")
    split.add_argument("--eval", required=True, metavar="OUT", dest="eval_out",
                       help="held-out output (.jsonl, .jsonl.gz, .parquet)")
    size = split.add_mutually_exclusive_group()
    size.add_argument("--eval-fraction", type=open_fraction, metavar="F",
                      help="share of the records to hold out (default 0.1)")
    size.add_argument("--eval-size", type=positive_int, metavar="N", help="number of records to hold out")
    split.add_argument("--seed", type=int, default=0, help="seed of the group shuffle (default 0)")
    split.set_defaults(func=cmd_split)

    from preftune.data.ratings import STRATEGIES
    from preftune.data.ratings import TARGETS as PAIR_TARGETS

    pairs = commands.add_parser("pairs", help="turn scored / rated responses into pairs, KTO rows or groups",
                                description="Group the scored responses of SRC by prompt (or an id field) and "
                                            "write preference pairs (KTO rows, response groups) to DST.",
                                epilog=PAIRS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    pairs.add_argument("src", metavar="SRC", help="input file, folder or hub dataset")
    pairs.add_argument("dst", metavar="DST", help="output file: .jsonl, .jsonl.gz or .parquet")
    pairs.add_argument("--score-field", required=True, metavar="F",
                       help="the score of a response (a dotted path for nested fields), e.g. overall_score")
    pairs.add_argument("--to", choices=PAIR_TARGETS, default="pairs",
                       help="pairs (default), kto rows or response groups")
    pairs.add_argument("--strategy", choices=STRATEGIES, default="best-worst",
                       help="which pairs per prompt (default best-worst; see below)")
    pairs.add_argument("--margin", type=non_negative_number, default=0.0, metavar="M",
                       help="least score difference of a pair (default 0: any difference; equal scores never pair)")
    pairs.add_argument("--threshold", type=finite_number, metavar="T", help="--to kto: score >= T is desirable")
    pairs.add_argument("--reject-below", type=finite_number, metavar="R",
                       help="--to kto: score < R is undesirable (default T); scores in between are dropped")
    pairs.add_argument("--group-by", default="prompt", metavar="FIELD",
                       help="group responses by the prompt text (default) or by this id field")
    pairs.add_argument("--prompt-field", metavar="F", help="the prompt (default: prompt, instruction, question, ...)")
    pairs.add_argument("--responses-field", metavar="F",
                       help="the list of responses in nested rows (default: completions, responses, ...)")
    pairs.add_argument("--response-field", metavar="F", help="a response's text (default: response, completion, "
                                                                "text, ...)")
    pairs.add_argument("--seed", type=int, default=0, help="seed of best-random (default 0)")
    pairs.set_defaults(func=cmd_pairs)
    return data


def cmd_check(args) -> int:
    from preftune.data.doctor import check_data
    from preftune.model.loading import load_tokenizer_as_is

    tokenizer = load_tokenizer_as_is(args.tokenizer) if args.tokenizer is not None else None
    report = check_data(args.path, tokenizer=tokenizer, max_length=args.max_length,
                        max_prompt_length=args.max_prompt_length, eval_path=args.eval_path)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return report.exit_code


def cmd_convert(args) -> int:
    from preftune.data.convert import convert

    result = convert(args.src, args.dst, to=args.to, drop_equal_scores=args.drop_equal_scores)
    print(result.summary())
    for sample in result.bad_record_samples[1:]:
        print(f"  bad: {sample}")
    return 0 if result.written else 1


def cmd_split(args) -> int:
    from preftune.data.split import split

    result = split(args.src, args.train, args.eval_out, eval_fraction=args.eval_fraction,
                   eval_size=args.eval_size, seed=args.seed)
    print(result.summary())
    print(f"  train: {args.train}\n  eval:  {args.eval_out}")
    return 0


def cmd_pairs(args) -> int:
    from preftune.data.ratings import score_pairs

    result = score_pairs(args.src, args.dst, score_field=args.score_field, to=args.to, strategy=args.strategy,
                         margin=args.margin, threshold=args.threshold, reject_below=args.reject_below,
                         group_by=args.group_by, prompt_field=args.prompt_field,
                         responses_field=args.responses_field, response_field=args.response_field, seed=args.seed)
    print(result.summary())
    for sample in result.bad_record_samples[1:]:
        print(f"  bad: {sample}")
    return 0 if result.written else 1
