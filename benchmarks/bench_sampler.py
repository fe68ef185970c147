"""Sampling speed on SmolLM2-135M-Instruct: preftune's sampler vs Hugging Face ``generate`` vs llama.cpp.

    python benchmarks/bench_sampler.py --out benchmarks/results/<date>-sampler            # ~10 min on 2 cores
    python benchmarks/bench_sampler.py --quick                                            # a 1-minute smoke run

Same model, prompts, batches and settings for every contender, in one process, one after the other:

* prompts: the first human turn of HH-RLHF harmless-test dialogues as chat messages (the model's
  chat template, ``add_generation_prompt``), tokenized by preftune's data path; the same ids go to
  every contender; batches of similar prompt length (longest first), left padded;
* sampling at temperature 1, top-p 1, top-k off, up to ``--max-new-tokens``, stop at EOS;
* ``hf-generate-bf16``: ``model.generate`` on bf16 weights (its fastest CPU setting);
  ``preftune-bf16``: :func:`preftune.evaluation.decoding.decode` on the same bf16 weights (what ``sample``
  runs: the lean forward of :mod:`preftune.model.fast_decode`, with its fused step kernels where they build);
  ``preftune-bf16-aten``: the same with the fused kernels off (the lean forward's ATen step, what a machine
  without a C++ compiler runs); ``preftune-bf16-hf``: the same loop on the
  model's Hugging Face forward with prepacked linears (the fallback path, and what ``sample`` ran before the
  lean forward); ``preftune-autocast``: fp32 weights under bf16 autocast (what ``preftune eval
  --mixed-precision auto`` runs on a model loaded in fp32); ``llama.cpp-<quant>`` (batch 1 only; needs
  ``llama-cpp-python`` and a GGUF from ``preftune export``): ``Llama.generate`` with the same ids and
  settings (min-p off).
* ``--repeats N`` runs the contenders N times in turn (A, B, A, B, ...) and reports each one's median
  tokens/s (every repeat's figure is kept): the fair comparison on a machine other work shares.

Reported per contender and batch size: generated tokens (EOS included) per second of wall time, and the
share of a roofline measured on the same machine: a decode step must read every weight once (bytes /
memory bandwidth) and do 2 FLOPs per weight per row (at the bf16 matmul peak); the bound is the slower of
the two. Sampled lengths differ between contenders (different random draws), so tokens/s is the
comparable number, not wall time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_assets import HH_FILE, smollm2_folder  # noqa: E402
from bench_report import write_results  # noqa: E402


def chat_prompts(count: int) -> list[list[dict]]:
    """The first human turn of the first ``count`` HH-RLHF dialogues, as one-message chat prompts."""
    prompts = []
    with gzip.open(HH_FILE, "rt") as fh:
        for line in fh:
            text = json.loads(line)["chosen"].split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0].strip()
            prompts.append([{"role": "user", "content": text}])
            if len(prompts) == count:
                break
    return prompts


def roofline(threads: int) -> dict:
    """Measured bf16 matmul peak (FLOP/s, 2048 x 2048 x 2048) and memory bandwidth (bytes/s read+written
    by copying a 256 MB tensor), with ``threads`` threads: the best of 5 repeats each."""
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    src = torch.empty(64 * 2 ** 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best_mm, best_copy = float("inf"), float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best_mm = min(best_mm, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - start)
    return {"bf16_matmul_flops": 2 * 2048 ** 3 / best_mm, "memory_bytes_per_s": 2 * src.numel() * 4 / best_copy}


def bound_tokens_per_s(params: int, batch: int, roof: dict) -> float:
    """Tokens/s a decode step at ``batch`` rows can reach: one read of the bf16 weights per step, 2 FLOPs
    per weight per row; attention over the cache and the sampling are not counted (a generous bound)."""
    step = max(2 * params / roof["memory_bytes_per_s"], 2 * params * batch / roof["bf16_matmul_flops"])
    return batch / step


def hf_generate(model, prompt_ids, batch, max_new_tokens, eos_ids, pad_id, seed) -> int:
    """Generated tokens (EOS included) of ``generate`` over every batch of the same length-sorted prompts."""
    from preftune.evaluation.decoding import _left_pad

    torch.manual_seed(seed)
    order = sorted(range(len(prompt_ids)), key=lambda s: -len(prompt_ids[s]))
    total = 0
    for start in range(0, len(order), batch):
        input_ids, mask = _left_pad([prompt_ids[s] for s in order[start:start + batch]], pad_id)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos_ids,
                             pad_token_id=pad_id, repetition_penalty=1.0)
        for row in out[:, input_ids.shape[1]:].tolist():
            total += next((t + 1 for t, token in enumerate(row) if token in eos_ids), len(row))
    return total


def preftune_decode(model, prompt_ids, batch, max_new_tokens, eos_ids, pad_id, seed) -> int:
    """What :func:`preftune.evaluation.sampling.sample_token_ids` runs on a Llama-family model: ``decode`` on
    the lean forward (it prepacks its own weights)."""
    from preftune.evaluation.decoding import decode

    return sum(len(c) for c in decode(model, prompt_ids, max_new_tokens, eos_ids, pad_id, seed=seed,
                                      batch_size=batch))


def preftune_decode_hf(model, prompt_ids, batch, max_new_tokens, eos_ids, pad_id, seed) -> int:
    """The same ``decode`` on the model's Hugging Face forward with prepacked linears (the lean forward
    switched off): the fallback path for other architectures."""
    from unittest import mock

    from preftune.evaluation import decoding
    from preftune.model.packed_linear import packed_linears

    with packed_linears(model, torch.bfloat16, batch), mock.patch.object(decoding, "lean_decoder",
                                                                         lambda *args, **kwargs: None):
        return sum(len(c) for c in decoding.decode(model, prompt_ids, max_new_tokens, eos_ids, pad_id, seed=seed,
                                                   batch_size=batch))


def preftune_decode_aten(model, *args) -> int:
    """:func:`preftune_decode` with the fused step kernels switched off (``PREFTUNE_DECODE_KERNELS=0``): the
    lean forward's ATen decode step."""
    from unittest import mock

    with mock.patch.dict(os.environ, {"PREFTUNE_DECODE_KERNELS": "0"}):
        return preftune_decode(model, *args)


def autocast_decode(model, *args) -> int:
    """:func:`preftune_decode` on fp32 weights under bf16 autocast."""
    with torch.autocast("cpu", torch.bfloat16):
        return preftune_decode(model, *args)


def llama_cpp_generate(llm, prompt_ids, max_new_tokens, eos_ids) -> int:
    """Batch 1: each prompt through ``Llama.generate`` at temperature 1, top-k/top-p/min-p off."""
    total = 0
    for ids in prompt_ids:
        llm.reset()
        for count, token in enumerate(llm.generate(ids, temp=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                   repeat_penalty=1.0, reset=True), start=1):
            if token in eos_ids or count == max_new_tokens:
                total += count
                break
    return total


def timed(fn, *args) -> dict:
    start = time.perf_counter()
    tokens = fn(*args)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def run_contenders(runs: dict, repeats: int) -> dict:
    """``{name: (fn, args)}`` run ``repeats`` times in turn -> ``{name: result}``: the median repeat's
    :func:`timed` result by tokens/s, with every repeat's tokens/s under ``repeats_tokens_per_s``."""
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, args) in runs.items():
            results[name].append(timed(fn, *args))
    out = {}
    for name, tries in results.items():
        ranked = sorted(tries, key=lambda r: r["tokens_per_s"])
        out[name] = dict(ranked[len(ranked) // 2], repeats_tokens_per_s=[r["tokens_per_s"] for r in tries])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,64", help="batch sizes, comma separated")
    parser.add_argument("--prompts", type=int, default=0, help="prompts per batch size (default: 8 at batch 1, "
                        "else 2 batches' worth)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", action="append", default=[], metavar="FILE",
                        help="a GGUF of the same model for llama.cpp at batch 1 (repeatable: F16, Q8_0, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every contender, in turn (median kept)")
    parser.add_argument("--contenders", default="", help="comma-separated names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4, 4 prompts, 16 tokens")
    parser.add_argument("--allocator", choices=("command", "system"), default="command",
                        help="command: glibc's settings the preftune command starts with "
                        "(preftune.common.allocator), for every contender in this process; system: glibc's defaults")
    parser.add_argument("--out", help="folder for results.json")
    args = parser.parse_args(argv)
    if args.allocator == "command":
        from preftune.common.allocator import tune_allocator

        print(tune_allocator(), flush=True)
    if args.quick:
        args.batches, args.prompts, args.max_new_tokens = "1,4", 4, 16
    from transformers import AutoModelForCausalLM

    from preftune.data.tokenize import prompt_token_ids, special_prefix_ids
    from preftune.evaluation.sampling import _eos_ids
    from preftune.evaluation.scoring import pad_token_id
    from preftune.model.loading import load_tokenizer

    torch.set_num_threads(args.threads)
    folder = smollm2_folder()
    tokenizer = load_tokenizer(str(folder))
    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = sum(p.numel() for p in bf16.parameters())
    eos_ids, pad_id = _eos_ids(bf16, tokenizer), pad_token_id(tokenizer)
    prefix = special_prefix_ids(tokenizer)
    roof = roofline(args.threads)
    llms = {}
    for path in args.gguf:
        from llama_cpp import Llama

        llms[Path(path).stem] = Llama(model_path=path, n_ctx=2048, n_threads=args.threads, n_batch=512,
                                      verbose=False)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        count = args.prompts or (8 if batch == 1 else 2 * batch)
        prompt_ids = [prompt_token_ids(tokenizer, p, prefix) for p in chat_prompts(count)]
        common = (prompt_ids, batch, args.max_new_tokens, eos_ids, pad_id, args.seed)
        with torch.no_grad():  # warm-up: one short call each (first-call allocations, oneDNN kernel choice)
            hf_generate(bf16, prompt_ids[:batch], batch, 4, eos_ids, pad_id, args.seed)
            preftune_decode(bf16, prompt_ids[:batch], batch, 4, eos_ids, pad_id, args.seed)
            preftune_decode_hf(bf16, prompt_ids[:batch], batch, 4, eos_ids, pad_id, args.seed)
            preftune_decode_aten(bf16, prompt_ids[:batch], batch, 4, eos_ids, pad_id, args.seed)
            with torch.autocast("cpu", torch.bfloat16):
                preftune_decode(fp32, prompt_ids[:batch], batch, 4, eos_ids, pad_id, args.seed)
        runs = {"hf-generate-bf16": (hf_generate, (bf16, *common)),
                "preftune-bf16": (preftune_decode, (bf16, *common)),
                "preftune-bf16-hf": (preftune_decode_hf, (bf16, *common)),
                "preftune-bf16-aten": (preftune_decode_aten, (bf16, *common)),
                "preftune-autocast": (autocast_decode, (fp32, *common))}
        wanted = set(args.contenders.split(",")) if args.contenders else set(runs)
        runs = {name: run for name, run in runs.items() if name in wanted or name == "hf-generate-bf16"}
        with torch.no_grad():
            contenders = run_contenders(runs, args.repeats)
        if batch == 1:
            for name, llm in llms.items():
                contenders[f"llama.cpp-{name}"] = timed(llama_cpp_generate, llm, prompt_ids, args.max_new_tokens,
                                                        eos_ids)
        bound = bound_tokens_per_s(params, batch, roof)
        for name, result in contenders.items():
            result["share_of_roofline"] = round(result["tokens_per_s"] / bound, 3)
        base = contenders["hf-generate-bf16"]["tokens_per_s"]
        row = {"batch": batch, "prompts": count, "roofline_tokens_per_s": round(bound, 1), "contenders": contenders,
               "speedup_vs_generate": {name: round(r["tokens_per_s"] / base, 2) for name, r in contenders.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    metrics = {"model": "SmolLM2-135M-Instruct", "parameters": params, "threads": args.threads,
               "max_new_tokens": args.max_new_tokens, "allocator": args.allocator,
               "roofline": {k: round(v / 1e9, 1) for k, v in roof.items()},
               "roofline_units": "GFLOP/s, GB/s", "rows": rows}
    if args.out:
        print(write_results(args.out, "sampler", "sampling", metrics, argv=sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
