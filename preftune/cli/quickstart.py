"""``preftune quickstart``: argument parsing only; the run is :func:`preftune.recipes.quickstart.run_quickstart`.

Wired into ``preftune.cli.main`` with ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import logging

QUICKSTART_DESCRIPTION = """\
DPO end to end, offline, in a few minutes on one CPU core: builds a tiny Llama and a BPE tokenizer,
pretrains it on generated film reviews, SFTs it to write reviews of both sentiments, samples and
ranks its own reviews with a lexicon sentiment judge, runs DPO on best-vs-worst pairs, and
evaluates on held-out films (judge score, win rate vs the SFT model with a 95% interval, KL paid,
held-out preference accuracy). Everything is seeded: the same command gives the same numbers."""

QUICKSTART_EPILOG = """\
examples:
  preftune quickstart                         # full run, writes runs/quickstart/
  preftune quickstart --quick --output-dir /tmp/qs   # CI-sized run: same stages, fewer steps and samples

time on one thread of a 2-vCPU Intel Xeon: full run 105 s of CPU (2-2.5 min wall), --quick 30-80 s wall.

exit status: 0 when the DPO model's win rate over its SFT base reaches the target
(0.8 full, 0.75 --quick), 1 when it does not."""


class _Given(argparse.Action):
    """Store the value and note in ``namespace.given`` that the flag was given: --real has other defaults."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``quickstart`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    from preftune.recipes.real_config import help_text

    parser = subparsers.add_parser("quickstart", help="DPO end to end on a tiny generated task, offline (minutes); "
                                                      "--real: SmolLM2 on two real tasks",
                                   description=QUICKSTART_DESCRIPTION, epilog=QUICKSTART_EPILOG + "\n\n" + help_text(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart", metavar="DIR", action=_Given,
                        help="run folder (emptied first; with --real each stage replaces its own entries): "
                             "models, data, metrics, report (default: runs/quickstart, with --real runs/real)")
    parser.add_argument("--quick", action="store_true", help="smaller, faster run for CI: same stages, fewer steps "
                                                             "and samples, target win rate 0.75")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    parser.add_argument("--threads", type=int, default=1, action=_Given,
                        help="torch intra-op threads (default: 1; more rarely helps a model this small; "
                             "with --real 2)")
    real = parser.add_argument_group("the real recipe (--real; see below)")
    real.add_argument("--real", action="store_true",
                      help="SmolLM2-135M-Instruct on two real tasks (sentiment, HH-RLHF harmless); 55-60 min on 2 CPU "
                           "cores (54.5 min measured on a 2-vCPU Intel Xeon)")
    real.add_argument("--reduced", action="store_true",
                      help="with --real: every stage, fewer prompts, pairs and variants: a smoke run that passes when "
                           "every stage wrote its files and every number is finite and in range (the targets are the "
                           "full run's)")
    real.add_argument("--model", metavar="PATH", help="with --real: the base model (a folder or .gguf) instead of "
                                                      "the downloaded SmolLM2")
    real.add_argument("--hh-data", metavar="PATH", help="with --real: task B preference pairs (default: "
                                                        "Anthropic HH-RLHF harmless test pairs, shipped with "
                                                        "preftune: preftune/recipes/data/)")
    real.add_argument("--resume", action="store_true",
                      help="with --real: keep the stages an earlier run into --output-dir finished (its metrics.json "
                           "says which; same settings, else an error names the difference) and run the rest")
    real.add_argument("--cache-dir", metavar="DIR", help="with --real: where the fetched and converted model is "
                                                         "kept (default: $PREFTUNE_CACHE or ~/.cache/preftune)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show the training loop's log lines")
    parser.set_defaults(func=cmd_quickstart)
    return parser


def cmd_quickstart(args) -> int:
    from transformers.utils import logging as hf_logging

    from preftune.recipes.quickstart import QuickstartConfig, run_quickstart

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not args.real:
        wrong = [flag for flag, value in (("--reduced", args.reduced), ("--model", args.model),
                                          ("--hh-data", args.hh_data), ("--cache-dir", args.cache_dir),
                                          ("--resume", args.resume)) if value]
        if wrong:
            raise ValueError(f"{wrong[0]} belongs to the real recipe: add --real")
    elif args.quick:
        raise ValueError("--quick is the tiny quickstart's; the real recipe's smaller run is --reduced")
    if not args.verbose:
        # The stage headers and bars say what happens; keep the loop's INFO lines and the
        # weight loading/saving bars out of the way.
        logging.getLogger("preftune").setLevel(logging.WARNING)
        hf_logging.disable_progress_bar()
    if args.real:
        from preftune.recipes.real import run_real_recipe
        from preftune.recipes.real_config import RealRecipeConfig

        given = getattr(args, "given", set())
        cfg = RealRecipeConfig.preset("reduced" if args.reduced else "full",
                                      output_dir=args.output_dir if "output_dir" in given else "runs/real",
                                      threads=args.threads if "threads" in given else 2, model=args.model,
                                      hh_data=args.hh_data, cache_dir=args.cache_dir, seed=args.seed,
                                      progress=args.progress, resume=args.resume)
        return 0 if run_real_recipe(cfg).passed else 1
    cfg = QuickstartConfig.preset(quick=args.quick, output_dir=args.output_dir, seed=args.seed,
                                  threads=args.threads, progress=args.progress)
    result = run_quickstart(cfg)
    return 0 if result.passed else 1
