"""``preftune iterate``: argument parsing only; the run is :func:`preftune.recipes.iterate.run_iterate`.

Wired into ``preftune.cli.main`` with ``register(subparsers, add_config_flags, config_from_args)``: the train
options are ``preftune train``'s own flags (main's, passed in so this module does not import main).
"""

from __future__ import annotations

import argparse

from preftune.cli.args import positive_int

ITERATE_DESCRIPTION = """\
On-policy preference tuning in rounds: each round samples --samples responses per prompt from the current
policy on its slice of --prompts, judges them (--judge), trains on best-vs-worst pairs from the current
policy (any method: the train flags below), and measures the new model on --eval-prompts (held out: never
trained on): judge score, win rate over the start and over the previous round with 95% intervals, KL to the
start, pairs kept / tied, seconds per stage. Each round writes OUT/round-N/ (samples, judge scores and their
cache, pairs, model/, measurements); OUT/report.md, OUT/metrics.json and OUT/iterate.svg cover every round."""

ITERATE_EPILOG = """\
examples:
  preftune iterate --model ./sft --prompts prompts.txt --eval-prompts held_out.txt \\
      --judge python:my_judge.py:score --rounds 3 --samples 4 --output-dir runs/iter --beta 0.1
  preftune iterate ... --resume            # after a crash or Ctrl-C: the finished stages are kept
  preftune iterate ... --judge openai:http://localhost:8080/v1#qwen --loss simpo --lora-r 16

train flags: every `preftune train` flag but --data, --ref-model, --resume-from, --num-processes and
--overwrite-output-dir (the loop sets them); --model is the starting policy, --output-dir the run folder.
exit status: 0 when every round ran (or --stop-when-no-gain stopped the loop), 2 for bad flags or other
settings on --resume, 1 for bad data or a failing judge (the round stays resumable)."""


def register(subparsers, add_config_flags, config_from_args) -> argparse.ArgumentParser:
    """Add the ``iterate`` command to ``subparsers``; ``add_config_flags(parser)`` adds the train flags and
    ``config_from_args(args)`` reads them back (:mod:`preftune.cli.main`'s)."""
    parser = subparsers.add_parser("iterate", help="on-policy rounds: sample -> judge -> train -> measure",
                                   description=ITERATE_DESCRIPTION, epilog=ITERATE_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    loop = parser.add_argument_group("the rounds")
    loop.add_argument("--prompts", metavar="FILE", help="training prompts: a .txt (one a line) or any file "
                                                         "`preftune train` reads (its prompts)")
    loop.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts every round is measured on (none "
                                                              "may be in --prompts)")
    loop.add_argument("--judge", metavar="SPEC", help="python:FILE.py:FUNCTION, reward-model:PATH or openai:URL#MODEL")
    loop.add_argument("--rounds", type=positive_int, default=2, help="rounds (default: 2)")
    loop.add_argument("--samples", type=positive_int, default=4, help="responses per prompt per round (default: 4)")
    loop.add_argument("--prompts-per-round", type=positive_int, metavar="N",
                      help="prompts each round samples (default: --prompts split evenly over the rounds)")
    loop.add_argument("--reuse-prompts", action="store_true", help="every round samples the same prompts")
    loop.add_argument("--groups", action="store_true",
                      help="train on response groups (every response with its judge score; a pair loss on their "
                           "ordered pairs, see --group-pairs) instead of best-vs-worst pairs; a group loss "
                           "(plackett_luce, lipo_lambda) always does")
    loop.add_argument("--reference", choices=("previous", "base"), default="previous",
                      help="each round's reference: the previous round's policy (default) or the start "
                           "(docs/iterate.md says which measured better)")
    loop.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: 64)")
    loop.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    loop.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    loop.add_argument("--sample-batch-size", type=positive_int, default=32, help="(default: 32)")
    loop.add_argument("--kl-samples", type=positive_int, default=2,
                      help="KL to the start: samples per held-out prompt (default: 2); with 1 at temperature 1 "
                           "and top-p 1 the judged samples serve the KL too (one sampling instead of two)")
    loop.add_argument("--eval-pairs", metavar="FILE",
                      help="held-out preference pairs: each round's preference accuracy and NLL regression against "
                           "the start, as preftune eval measures them (optional)")
    loop.add_argument("--stop-when-no-gain", action="store_true",
                      help="end the loop when the win rate over the previous round's 95%% interval includes 0.5")
    loop.add_argument("--resume", action="store_true",
                      help="go on with the run in --output-dir from its first unfinished stage (same settings)")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of train options")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    add_config_flags(parser)
    parser.set_defaults(func=lambda args: cmd_iterate(args, config_from_args))
    return parser


def iterate_config(args, config_from_args):
    """The :class:`IterateConfig` of the parsed ``args`` (the train flags given become its ``train`` options)."""
    from preftune.recipes.iterate_config import IterateConfig

    train_cfg = config_from_args(args)
    given = sorted(getattr(train_cfg, "given", ()))
    train = {name: getattr(train_cfg, name) for name in given if name not in ("model", "output_dir", "seed",
                                                                              "progress")}
    return IterateConfig(model=train_cfg.model, prompts=args.prompts, eval_prompts=args.eval_prompts,
                         judge=args.judge, output_dir=train_cfg.output_dir, rounds=args.rounds, samples=args.samples,
                         prompts_per_round=args.prompts_per_round, reuse_prompts=args.reuse_prompts, groups=args.groups,
                         reference=args.reference, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, sample_batch_size=args.sample_batch_size,
                         kl_samples=args.kl_samples, eval_pairs=args.eval_pairs, seed=train_cfg.seed,
                         stop_when_no_gain=args.stop_when_no_gain, resume=args.resume, progress=train_cfg.progress,
                         train=train)


def cmd_iterate(args, config_from_args) -> int:
    from preftune.recipes.iterate import run_iterate

    cfg = iterate_config(args, config_from_args)
    result = run_iterate(cfg)
    rows = result.metrics["rounds"]
    if rows:
        last = rows[-1]
        print(f"done: {result.rounds} round(s); round {last['round']}: judge score "
              f"{last['judge_score'] if last['judge_score'] is None else round(last['judge_score'], 3)}, win rate over "
              f"the start {last['win_vs_base']['rate']:.3f}; report: {result.output_dir / 'report.md'}")
    return 0
