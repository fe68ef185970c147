"""``preftune label serve | stats | export``: argument parsing only; the work is in
:mod:`preftune.collect` (``server``, ``agreement``, ``export``).

``register(subparsers)`` adds the ``label`` command group to the main parser; every handler
returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import os

from preftune.cli.args import fraction, port, positive_int, print_usage

LABEL_DESCRIPTION = """\
Collect preferences from people: a local web app shows each annotator one task at a time (a prompt
and two responses side by side, 3+ responses to rank, or one response to rate thumbs up/down),
saves every label in a SQLite database, and turns the labels into training data."""

SERVE_EPILOG = """\
candidates file (JSONL, one record a line; the file is only read, never written):
  {"prompt": str | [messages], "responses": [str | [messages], ...], "meta": {...}}
      what `preftune generate --keep-all` writes (with --judge also "scores"; extra fields are ignored);
      2 responses: pair task, 3-9: rank task, 1: thumbs
  a pair file ({"prompt", "chosen", "rejected"} or any pair format `preftune train` reads): audit labels
  {"prompt", "completion"} (KTO / SFT rows): one response, thumbs up / down

keys: 1 or <- left better, 2 or -> right better, t tie, s skip / both bad, u undo (rank mode: press the
numbers best first or drag, Backspace, Enter; thumbs: 1 or up good, 2 or down bad). Each annotator opens
their own link, http://127.0.0.1:PORT/?annotator=NAME (plus &token=... when a token is required);
closing the tab and coming back carries on where they were.

what is kept: every label is committed to --db (SQLite, WAL) before the page shows the next task, so
killing the server loses nothing; starting it again on the same --db carries on. The response order is
random per annotator and task, and recorded. One server per database: a second one is refused.

security: binds 127.0.0.1 unless --host is given; with --host a token is required (--token, the
PREFTUNE_LABEL_TOKEN variable, or one made up and printed). POSTs must be same-origin JSON with the token;
texts are shown as text, never as HTML.

examples:
  preftune label serve candidates.jsonl --db labels.sqlite
  preftune label serve candidates.jsonl --db labels.sqlite --overlap 2 --guidelines guide.md --annotators ann,bob
  preftune label serve candidates.jsonl --db labels.sqlite --host 0.0.0.0 --port 8080   # prints a token"""

STATS_EPILOG = """\
per annotator: labels, median seconds per label, ties and skips, position bias (share of decisive labels
whose winner was shown on the left; 0.5 expected, * marks p < 0.05 in an exact binomial test) and length
bias (share choosing the longer response). Agreement on tasks labelled by 2+ annotators: raw (share of
agreeing annotator pairs), Cohen's kappa (per pair of annotators; the headline number with exactly two),
Krippendorff's alpha (nominal, any number of annotators). Skips are not votes. Rank tasks are compared
pair of responses by pair of responses.

examples:
  preftune label stats --db labels.sqlite
  preftune label stats --db labels.sqlite --json > stats.json"""

EXPORT_EPILOG = """\
majority vote per task over its non-skip labels: kept when one answer has more votes than any other, it
is not "tie", there are at least --min-votes votes and the winner's share is at least --min-agreement.
Everything dropped (split votes, majority ties, too few votes, all skipped, unlabelled) is counted.

targets:
  pairs   {"prompt", "chosen", "rejected", "meta"}: what `preftune train` and `preftune data check` read;
          rank tasks give every response pair a majority ordered the same way
  kto     {"prompt", "completion", "label", "meta"}: thumbs tasks; pair tasks as chosen/true, rejected/false
  ranked  {"prompt", "responses": [best ... worst], "ranks", "meta"}: consensus order, ranks the mean ranks
          (1 = best, ties equal): response groups `preftune train` reads, and a candidates file again

examples:
  preftune label export --db labels.sqlite --out pairs.jsonl
  preftune label export --db labels.sqlite --out pairs.jsonl --min-votes 2 --min-agreement 0.66
  preftune label export --db labels.sqlite --out kto.jsonl --to kto
  preftune label export --db labels.sqlite --out groups.jsonl --to ranked"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``label`` (with ``serve``, ``stats``, ``export``) to ``subparsers``; returns its parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    label = subparsers.add_parser("label", help="collect preferences from people in a local web app",
                                  description=LABEL_DESCRIPTION, formatter_class=fmt, allow_abbrev=False)
    commands = label.add_subparsers(dest="label_command", metavar="SUBCOMMAND")
    label.set_defaults(func=lambda args: print_usage(label))

    from preftune.collect.candidates import MODES

    serve = commands.add_parser("serve", help="run the labelling app", epilog=SERVE_EPILOG, formatter_class=fmt,
                                description="Serve CANDIDATES to annotators in the browser and save their labels "
                                            "in --db.", allow_abbrev=False)
    serve.add_argument("candidates", metavar="CANDIDATES", help="candidates file (see below)")
    serve.add_argument("--db", required=True, metavar="LABELS.sqlite", help="the labels database (made if missing)")
    serve.add_argument("--port", type=port, default=8765, help="port (default 8765; 0: any free port)")
    serve.add_argument("--host", help="listen on this address instead of 127.0.0.1 (then a token is required)")
    serve.add_argument("--token", default=os.environ.get("PREFTUNE_LABEL_TOKEN"),
                       help="the token annotators' links carry (default: $PREFTUNE_LABEL_TOKEN; with --host and "
                            "no token, one is made up and printed)")
    serve.add_argument("--overlap", type=positive_int, default=1, metavar="N",
                       help="annotators per task (default 1); nobody is shown a task twice")
    serve.add_argument("--guidelines", metavar="FILE", help="text shown to annotators above the tasks")
    serve.add_argument("--mode", choices=MODES, default="auto",
                       help="auto (default): 1 response thumbs, 2 pair, 3+ rank; thumbs: one task per response")
    serve.add_argument("--annotators", metavar="A,B,...", help="print a link for each of these names")
    serve.add_argument("--seed", type=int, help="seed of the response order (default: random)")
    serve.set_defaults(func=cmd_serve)

    stats = commands.add_parser("stats", help="labels, time, agreement and biases per annotator",
                                description="Report on the labels in --db.", epilog=STATS_EPILOG,
                                formatter_class=fmt, allow_abbrev=False)
    stats.add_argument("--db", required=True, metavar="LABELS.sqlite", help="the labels database")
    stats.add_argument("--json", action="store_true", help="print JSON instead of the table")
    stats.set_defaults(func=cmd_stats)

    from preftune.collect.export import TARGETS

    export = commands.add_parser("export", help="majority-vote labels into pairs, KTO rows or rankings",
                                 description="Write the labels of --db as training data.", epilog=EXPORT_EPILOG,
                                 formatter_class=fmt, allow_abbrev=False)
    export.add_argument("--db", required=True, metavar="LABELS.sqlite", help="the labels database")
    export.add_argument("--out", required=True, metavar="FILE", help="output: .jsonl, .jsonl.gz or .parquet")
    export.add_argument("--to", choices=TARGETS, default="pairs", help="what to write (default pairs)")
    export.add_argument("--min-votes", type=positive_int, default=1, metavar="K",
                        help="non-skip labels a task needs (default 1)")
    export.add_argument("--min-agreement", type=fraction, default=0.0, metavar="A",
                        help="the winner's share of the votes at least (0-1; default 0: a strict majority suffices)")
    export.set_defaults(func=cmd_export)
    return label


def cmd_serve(args) -> int:
    try:
        from preftune.collect.server import serve
    except ImportError as err:  # FastAPI / uvicorn not installed: one line, not a traceback
        raise ValueError(str(err)) from None

    annotators = [a.strip() for a in args.annotators.split(",") if a.strip()] if args.annotators else None
    return serve(args.candidates, args.db, host=args.host, port=args.port, overlap=args.overlap,
                 guidelines=args.guidelines, token=args.token, mode=args.mode, seed=args.seed, annotators=annotators)


def cmd_stats(args) -> int:
    from preftune.collect.agreement import format_stats, label_stats

    stats = label_stats(args.db)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_export(args) -> int:
    from preftune.collect.export import export_labels

    result = export_labels(args.db, args.out, to=args.to, min_votes=args.min_votes, min_agreement=args.min_agreement)
    print(result.summary())
    return 0 if result.written else 1
