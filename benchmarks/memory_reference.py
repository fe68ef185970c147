"""Peak memory by reference mode: what a second model costs, and what LoRA / precompute save.

Each configuration trains a few DPO-family steps in a fresh subprocess on the same randomly
initialised Llama (default ~0.2B parameters, fp32, CPU) and reports that process's peak RSS
(``preftune.common.process.peak_rss_mb``: Linux ``VmHWM``) and the time per step:

* ``dpo``             full fine-tuning, reference = a frozen copy (two models in memory)
* ``dpo-precompute``  full fine-tuning, reference log-probs precomputed, reference freed
* ``dpo-lora``        LoRA r=16, reference = the same model with adapters disabled (no copy)
* ``orpo``, ``simpo`` reference-free: one model

Reproduce:  python benchmarks/memory_reference.py [--hidden 1024 --layers 12 --steps 2]

Nothing is downloaded: the tokenizer is trained on the fly, the model is built from a config.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "dpo": dict(loss="dpo"),
    "dpo-precompute": dict(loss="dpo", precompute_ref=True),
    "dpo-lora": dict(loss="dpo", lora_r=16, lora_alpha=32, learning_rate=1e-4),
    "orpo": dict(loss="orpo"),
    "simpo": dict(loss="simpo"),
}


def make_assets(folder: Path, hidden: int, layers: int, pairs: int) -> tuple[Path, Path]:
    """A random Llama folder (vocab 32,000, untied head) + a pairs file of ~100-token pairs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from preftune.model.tiny import train_tokenizer

    rng = random.Random(0)
    words = ("the a river city mountain music winter kind calm rude harsh honest answer question "
             "because however people often think about small large good bad story history").split()
    rows = []
    for _ in range(pairs):
        prompt = "\n\nHuman: " + " ".join(rng.choice(words) for _ in range(60)) + "\n\nAssistant:"
        rows.append({"prompt": prompt, "chosen": " " + " ".join(rng.choice(words) for _ in range(30)),
                     "rejected": " " + " ".join(rng.choice(words) for _ in range(40))})
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=2000)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model_dir = folder / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    (folder / "params.txt").write_text(str(params))
    return model_dir, data


def child(spec: dict) -> None:
    """Run one configuration and print its peak RSS (GB) and seconds per step as JSON."""
    import torch

    from preftune.config.train_config import TrainConfig
    from preftune.common.process import peak_rss_mb
    from preftune.training.loop import train

    torch.set_num_threads(spec.pop("threads"))
    start = time.perf_counter()
    result = train(TrainConfig(**spec))
    elapsed = time.perf_counter() - start
    peak_gb = peak_rss_mb() / 1024
    print(json.dumps({"peak_rss_gb": peak_gb, "seconds": elapsed, "steps": result.steps}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS))
    parser.add_argument("--results-dir", metavar="DIR",
                        help="write DIR/results.json (command, commit, date, hardware, versions, metrics) for "
                             "benchmarks/results/ and benchmarks/results_tables.py")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    with tempfile.TemporaryDirectory(prefix="preftune-mem-") as tmp:
        folder = Path(tmp)
        model_dir, data = make_assets(folder, args.hidden, args.layers, pairs=args.batch_size * args.steps)
        params = int((folder / "params.txt").read_text())
        print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, vocab 32000, "
              f"{params / 1e6:.0f}M parameters ({params * 4 / 1e9:.2f} GB in fp32); "
              f"{args.steps} steps of {args.batch_size} pairs, CPU fp32, {args.threads} threads")
        rows = []
        for name in args.only or list(CONFIGS):
            spec = dict(model=str(model_dir), data=str(data), output_dir=str(folder / name), batch_size=args.batch_size,
                        max_steps=args.steps, max_length=256, max_prompt_length=128, logging_steps=1,
                        progress=False, learning_rate=1e-6, threads=args.threads)
            spec.update(CONFIGS[name])
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, env=env)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((name, result))
            print(f"{name:16s} peak RSS {result['peak_rss_gb']:6.2f} GB   {result['seconds']:6.1f} s total")
        base = dict(rows).get("dpo")
        if base:
            print("\n| configuration | peak RSS (GB) | vs dpo with a frozen copy |\n|---|---|---|")
            for name, result in rows:
                print(f"| {name} | {result['peak_rss_gb']:.2f} | {result['peak_rss_gb'] / base['peak_rss_gb']:.2f}x |")
        if args.results_dir:
            write_results(args, params, rows)
    return 0


def write_results(args, params: int, rows: list[tuple[str, dict]]) -> None:
    """``args.results_dir``/results.json: each configuration's peak RSS and its ratio to dpo's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_report

    base = dict(rows).get("dpo")
    configurations = [{"configuration": name, "peak_rss_gb": round(r["peak_rss_gb"], 3),
                       "vs_frozen_copy": round(r["peak_rss_gb"] / base["peak_rss_gb"], 3) if base else None,
                       "seconds": round(r["seconds"], 1)} for name, r in rows]
    metrics = {"model_parameters": params, "hidden": args.hidden, "layers": args.layers, "steps": args.steps,
               "pairs_per_step": args.batch_size, "threads": args.threads, "configurations": configurations}
    path = bench_report.write_results(args.results_dir, "Peak memory by reference mode", "memory-reference", metrics)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
