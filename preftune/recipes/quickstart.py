"""``preftune quickstart``: DPO end to end, offline, in minutes on a CPU.

Six stages on preftune's own pieces, written to one run folder:

1. **base model** — a BPE tokenizer (``tokenizers``) and a tiny Llama, pretrained with
   :func:`preftune.training.loop.train` (``loss="sft"``, empty prompts) on a generated film magazine;
2. **SFT** — ``train(loss="sft")`` on "Write a review of <film>." rows whose reviews range from
   scathing to glowing, so the SFT model writes both;
3. **preference pairs** — several samples per prompt from the SFT model, scored by the lexicon
   judge :func:`preftune.recipes.quickstart_world.sentiment_score`, best vs worst (ties skipped);
4. **DPO** — ``train(loss="dpo")`` from the SFT model on those on-policy pairs;
5. **evaluation** on films no stage has seen: judge scores, the DPO-vs-SFT win rate with its 95%
   interval, KL(DPO || SFT), held-out preference accuracy;
6. **report** — ``report.md``, ``metrics.json`` and two plots (:mod:`preftune.recipes.quickstart_report`).

The stages run under :class:`preftune.recipes.stages.StageRunner`, the runner the real recipe uses too.

The task is the controlled sentiment generation of the DPO paper (Rafailov et al. 2023, section
6.1) made small enough for a laptop. Everything is seeded and runs on ``cfg.threads`` threads:
the same command gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from preftune.recipes import quickstart_world as world
from preftune.recipes.quickstart_report import plot_scores, plot_training, summary_text, write_report
from preftune.recipes.stages import StageRunner, check_run_folder, clear_entries, write_metrics

JUDGE_SPEC = "python:preftune.recipes.quickstart_world:sentiment_score"
STAGE_NAMES = ("base model", "SFT", "preference pairs", "DPO", "evaluation", "report")
# What a run writes into its folder; a re-run clears exactly these and nothing else.
RUN_ENTRIES = ("base", "sft", "dpo", "data", "samples.jsonl", "metrics.json", "report.md", "judge_scores.png",
               "dpo_training.png")


@dataclass
class QuickstartConfig:
    """Sizes and settings of one run. :meth:`preset` gives the full run and the ``--quick`` one."""

    output_dir: str = "runs/quickstart"
    seed: int = 0
    progress: bool = True
    # One intra-op thread: ops this small gain little from more, and OpenMP threads spinning on a
    # busy machine made every stage ~5x slower when measured. It also keeps the numbers the
    # same on machines with different core counts.
    threads: int = 1
    # model: a tiny Llama; prompts are <= 13 tokens, reviews <= ~50
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    vocab_size: int = 1024
    max_length: int = 64
    max_prompt_length: int = 16
    max_new_tokens: int = 48
    batch_size: int = 32
    sample_batch_size: int = 96
    # 1. pretraining (one epoch over plain texts)
    pretrain_texts: int = 16000
    pretrain_lr: float = 3e-3
    # 2. SFT (one epoch over instruction rows)
    sft_rows: int = 6000
    sft_lr: float = 1e-3
    # 3. on-policy pairs: samples per training prompt, best vs worst
    pair_prompts: int = 1000
    samples_per_prompt: int = 8
    # 4. DPO
    beta: float = 0.1
    dpo_lr: float = 5e-4
    dpo_epochs: float = 2.0
    # 5. evaluation: eval_samples prompts per held-out film, one sample each per model
    held_out_films: int = 64
    eval_samples: int = 4
    kl_samples: int = 2
    min_win_rate: float = 0.8

    @classmethod
    def preset(cls, quick: bool = False, **overrides) -> "QuickstartConfig":
        """The full run (105 s of CPU on a 2-vCPU Intel Xeon), or the ``--quick`` CI run (~30 s there), with
        ``overrides``."""
        values = {}
        if quick:
            values = dict(hidden=96, layers=2, pretrain_texts=8000, sft_rows=3000, pair_prompts=600,
                          samples_per_prompt=6, dpo_epochs=3.0, held_out_films=32, kl_samples=1, min_win_rate=0.75)
        values.update(overrides)
        return cls(**values)


@dataclass
class QuickstartResult:
    output_dir: Path
    metrics: dict  # everything in metrics.json
    passed: bool  # win rate >= cfg.min_win_rate


# ------------------------------------------------------------------------------------------------
# The run, stage by stage
# ------------------------------------------------------------------------------------------------


def run_quickstart(cfg: QuickstartConfig, echo=print) -> QuickstartResult:
    """Run the six stages into ``cfg.output_dir``; ``echo`` prints stage headers and the summary.

    Torch's intra-op thread count is ``cfg.threads`` during the run and restored afterwards.
    Raises ValueError if the folder holds anything a quickstart run did not write.
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, echo)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: QuickstartConfig, echo) -> QuickstartResult:
    from preftune.evaluation.judges.python import PythonJudge

    out = prepare_output_dir(Path(cfg.output_dir))
    judge = PythonJudge(world.sentiment_score, spec=JUDGE_SPEC)
    runner, cpu_started = StageRunner(STAGE_NAMES, echo), time.process_time()
    train_films, held_out_films = world.film_titles(cfg.held_out_films, seed=cfg.seed)
    run: dict = {}  # what a stage hands to the later ones

    def base_model() -> None:
        run["tokenizer"] = build_base(cfg, out, train_films + held_out_films, train_films)

    def sft() -> None:
        write_jsonl(out / "data" / "sft.jsonl", world.sft_rows(train_films, cfg.sft_rows, seed=cfg.seed + 2))
        train_stage(cfg, out / "sft", model=out / "base", data=out / "data" / "sft.jsonl", loss="sft",
                    learning_rate=cfg.sft_lr, epochs=1.0)

    def preference_pairs() -> None:
        run["sft_model"] = load(out / "sft")
        run.update(build_pairs(cfg, out, judge, run["sft_model"], run["tokenizer"], train_films, held_out_films))
        echo(f"  {run['pairs']} training pairs ({run['skipped_ties']} prompts skipped: all samples tied), "
             f"{run['eval_pairs']} held-out pairs")

    def dpo() -> None:
        run["dpo"] = train_stage(cfg, out / "dpo", model=out / "sft", data=out / "data" / "pairs.jsonl", loss="dpo",
                                 learning_rate=cfg.dpo_lr, epochs=cfg.dpo_epochs, beta=cfg.beta,
                                 eval_data=out / "data" / "eval_pairs.jsonl")

    def evaluation() -> None:
        run["metrics"], run["samples"] = evaluate_dpo(cfg, out, judge, run)

    def report() -> None:
        samples, metrics = run["samples"], run["metrics"]
        plot_scores(out / "judge_scores.png", [s["sft_score"] for s in samples], [s["dpo_score"] for s in samples])
        plot_training(out / "dpo_training.png", out / "dpo" / "metrics.jsonl")
        metrics.update(passed=metrics["win_rate"]["rate"] >= cfg.min_win_rate, seconds=round(runner.elapsed(), 1),
                       cpu_seconds=round(time.process_time() - cpu_started, 1),  # this process, all threads
                       stage_seconds=list(runner.stage_seconds().values()), config=dataclasses.asdict(cfg))
        write_metrics(out, metrics)
        write_report(out, metrics, samples)

    runner.run("base model", "a BPE tokenizer and a tiny Llama pretrained on generated film reviews", base_model)
    runner.run("SFT", "supervised fine-tuning on 'Write a review of <film>.' (positive and negative reviews)", sft)
    runner.run("preference pairs", "SFT samples ranked by the sentiment judge, best vs worst", preference_pairs)
    runner.run("DPO", f"from the SFT model (beta {cfg.beta}) on the on-policy pairs", dpo)
    runner.run("evaluation", f"DPO vs SFT on {len(held_out_films)} held-out films", evaluation)
    runner.run("report", "report.md, metrics.json and two plots", report)
    echo(summary_text(out, run["metrics"], run["samples"]))
    return QuickstartResult(out, run["metrics"], run["metrics"]["passed"])


def build_pairs(cfg: QuickstartConfig, out: Path, judge, sft_model, tokenizer, train_films: list[str],
                held_out_films: list[str]) -> dict:
    """Stage 3: training pairs (best vs worst of the SFT model's samples on training films) and held-out
    pairs (the best and worst of each held-out film's samples), written to ``out/data``; the held-out
    prompts and their SFT samples are kept for the evaluation. -> ``{pairs, skipped_ties, eval_pairs,
    eval_prompts, sft_texts}`` (counts for pairs and eval_pairs)."""
    from preftune.evaluation.pairs import best_vs_worst_pairs

    rng = random.Random(cfg.seed + 3)
    pair_prompts = [world.prompt_text(rng.choice(train_films), rng.randrange(len(world.PROMPT_TEMPLATES)))
                    for _ in range(cfg.pair_prompts)]
    pair_samples = sample_with_progress(cfg, sft_model, tokenizer, pair_prompts, cfg.samples_per_prompt,
                                        seed=cfg.seed + 30, desc="sampling SFT (train films)")
    pairs, ties = best_vs_worst_pairs(pair_prompts, pair_samples, judge)
    pairs = non_empty(pairs)
    write_jsonl(out / "data" / "pairs.jsonl", pairs)
    # Held-out prompts: eval_samples copies of one prompt per film, one sample per copy.
    eval_prompts = [world.prompt_text(film, i % len(world.PROMPT_TEMPLATES))
                    for i, film in enumerate(held_out_films) for _ in range(cfg.eval_samples)]
    sft_texts = sample_with_progress(cfg, sft_model, tokenizer, eval_prompts, 1, seed=cfg.seed + 31,
                                     desc="sampling SFT (held-out films)")
    sft_texts = [row[0] for row in sft_texts]
    k = cfg.eval_samples  # held-out pairs: the best and worst of each film's samples
    per_film = [sft_texts[i:i + k] for i in range(0, len(sft_texts), k)]
    eval_pairs = non_empty(best_vs_worst_pairs(eval_prompts[::k], per_film, judge)[0])
    write_jsonl(out / "data" / "eval_pairs.jsonl", eval_pairs)
    return {"pairs": len(pairs), "skipped_ties": ties, "eval_pairs": len(eval_pairs), "eval_prompts": eval_prompts,
            "sft_texts": sft_texts}


def evaluate_dpo(cfg: QuickstartConfig, out: Path, judge, run: dict) -> tuple[dict, list[dict]]:
    """Stage 5: the DPO model's samples on the held-out prompts against the SFT model's -> (metrics, samples);
    ``samples.jsonl`` written. ``run`` holds the earlier stages' tokenizer, SFT model, prompts and texts."""
    dpo_model, prompts, sft_texts = load(out / "dpo"), run["eval_prompts"], run["sft_texts"]
    # The same seed as the SFT samples (common random numbers): the two models' samples start alike
    # and part where DPO changed the distribution, which makes the comparison less noisy.
    dpo_texts = sample_with_progress(cfg, dpo_model, run["tokenizer"], prompts, 1, seed=cfg.seed + 31,
                                     desc="sampling DPO (held-out films)")
    dpo_texts = [row[0] for row in dpo_texts]
    metrics = evaluate(cfg, judge, dpo_model, run["sft_model"], run["tokenizer"], prompts, sft_texts, dpo_texts,
                       run["dpo"])
    metrics.update(pairs=run["pairs"], skipped_ties=run["skipped_ties"], eval_pairs=run["eval_pairs"])
    samples = [{"prompt": p, "sft": s.strip(), "dpo": d.strip(), "sft_score": world.sentiment_score(p, s),
                "dpo_score": world.sentiment_score(p, d)} for p, s, d in zip(prompts, sft_texts, dpo_texts)]
    write_jsonl(out / "samples.jsonl", samples)
    return metrics, samples


def prepare_output_dir(out: Path) -> Path:
    """``out`` with the entries of an earlier run removed (train() appends to metrics files)."""
    check_run_folder(out, RUN_ENTRIES, "a quickstart run")
    clear_entries(out, RUN_ENTRIES)
    (out / "data").mkdir(parents=True)
    return out


def build_base(cfg: QuickstartConfig, out: Path, all_films: list[str], train_films: list[str]):
    """Train the tokenizer, initialise a tiny Llama in a scratch folder, pretrain it into ``out/base``."""
    from preftune.model.tiny import tiny_model, train_tokenizer

    tokenizer = train_tokenizer(world.tokenizer_corpus(all_films), vocab_size=cfg.vocab_size)
    texts = world.pretraining_texts(train_films, cfg.pretrain_texts, seed=cfg.seed + 1)
    # Plain-text pretraining is SFT with an empty prompt: the loss covers every token after BOS.
    write_jsonl(out / "data" / "pretrain.jsonl", [{"prompt": "", "completion": text} for text in texts])
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=cfg.seed, hidden=cfg.hidden, layers=cfg.layers,
                       heads=cfg.heads, max_positions=cfg.max_length * 2)
    with tempfile.TemporaryDirectory(prefix="preftune-init-") as init:
        model.save_pretrained(init, safe_serialization=True)
        tokenizer.save_pretrained(init)
        train_stage(cfg, out / "base", model=init, data=out / "data" / "pretrain.jsonl", loss="sft",
                    learning_rate=cfg.pretrain_lr, epochs=1.0)
    return tokenizer


def train_stage(cfg: QuickstartConfig, output_dir: Path, model, data: Path, loss: str, learning_rate: float,
                epochs: float, beta: float | None = None, eval_data: Path | None = None):
    """One :func:`preftune.training.loop.train` call with the quickstart's shared settings -> its TrainResult."""
    from preftune.config.train_config import TrainConfig
    from preftune.training.loop import train

    return train(TrainConfig(
        model=str(model), data=str(data), eval_data=str(eval_data) if eval_data else None,
        output_dir=str(output_dir), loss=loss, beta=beta, learning_rate=learning_rate, epochs=epochs,
        batch_size=cfg.batch_size, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        warmup_ratio=0.05, lr_scheduler="cosine", logging_steps=5, seed=cfg.seed, progress=cfg.progress))


def load(folder: Path):
    from preftune.model.loading import load_model

    return load_model(str(folder)).eval()


def sample_with_progress(cfg: QuickstartConfig, model, tokenizer, prompts: list[str], n: int, seed: int,
                         desc: str) -> list[list[str]]:
    """:func:`preftune.evaluation.sampling.sample` (temperature 1) in chunks under a progress bar: ``texts[i][j]``."""
    from tqdm.auto import tqdm

    from preftune.evaluation.sampling import sample

    per_chunk = max(1, cfg.sample_batch_size // n)
    texts: list[list[str]] = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not cfg.progress) as bar:
        for chunk_index, start in enumerate(range(0, len(prompts), per_chunk)):
            chunk = prompts[start:start + per_chunk]
            texts += sample(model, tokenizer, chunk, n=n, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                            seed=seed * 1000 + chunk_index, batch_size=cfg.sample_batch_size)
            bar.update(len(chunk))
    return texts


def non_empty(pairs: list[dict]) -> list[dict]:
    """Pairs whose two responses both have text (a sample that stopped at once has none)."""
    return [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]


def evaluate(cfg: QuickstartConfig, judge, dpo_model, sft_model, tokenizer, prompts: list[str],
             sft_texts: list[str], dpo_texts: list[str], dpo_result) -> dict:
    """Judge scores, win rate (the DPO vs the SFT sample of each prompt), KL, preference accuracy."""
    from preftune.evaluation.sampling import estimate_kl

    kl_prompts = prompts[::cfg.eval_samples]  # one per film
    kl, kl_stderr = estimate_kl(dpo_model, sft_model, tokenizer, kl_prompts, n_samples=cfg.kl_samples,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 50,
                                batch_size=cfg.sample_batch_size)

    def describe(texts: list[str]) -> dict:
        scores = judge.score(prompts, texts)
        return {"mean_score": sum(scores) / len(scores), "positive": sum(s > 0 for s in scores) / len(scores),
                "negative": sum(s < 0 for s in scores) / len(scores),
                "mean_words": sum(len(t.split()) for t in texts) / len(texts)}

    win = judge.compare(prompts, dpo_texts, sft_texts).win_rate()
    return {"judge": JUDGE_SPEC, "held_out_films": len(kl_prompts), "held_out_prompts": len(prompts),
            "sft": describe(sft_texts), "dpo": describe(dpo_texts), "win_rate": dataclasses.asdict(win),
            "kl": {"mean": kl, "stderr": kl_stderr, "samples": len(kl_prompts) * cfg.kl_samples},
            "preference_accuracy": {"before": dpo_result.eval_before.get("rewards/accuracies"),
                                    "after": dpo_result.eval_after.get("rewards/accuracies")},
            "dpo_final_train": {k: dpo_result.final_metrics.get(k)
                                for k in ("loss", "rewards/accuracies", "rewards/margins")}}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
