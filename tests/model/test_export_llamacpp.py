"""The real client: llama.cpp (``llama-cpp-python``) runs what ``preftune export`` writes as preftune computes it.

* Tiny Llama, Qwen2, Mistral and a SentencePiece-style vocabulary (every run): llama.cpp makes the same
  token ids of text as preftune's tokenizer, and its logits at f32 agree with transformers' to 1e-3
  (measured ~2e-4: float summation order), at q8_0 to 5e-2 (measured ~1e-2).
* SmolLM2-135M-Instruct that preftune tuned (``slow``): the same token ids for chat text, next-token
  log-probs within a bound per quantization, and at f16 the same greedy tokens. The measuring code is
  ``benchmarks/gguf_export.py`` (which also writes the results the docs quote); this test holds it to
  its bounds. Against the tuned model in float32 in transformers, over ~300 positions of four chat
  conversations (docs/export.md has the numbers): llama.cpp at f32 differs by ~1e-3 on average (its own
  arithmetic); f16 stores 11 significant bits per weight, measured ~3e-3 (bound 1e-2); q8_0 moves each
  weight by up to half of its block's step (max |w| / 254) and llama.cpp also rounds the activations to
  8 bits in its q8_0 matmuls, measured ~8e-2 (bound 0.15; weights alone, in transformers: ~4.5e-2).

Skipped where llama-cpp-python is not installed (the ``llamacpp`` extra, built from source; ``make test``
installs it); with ``CI`` set, a missing llama-cpp-python or SmolLM2 fails instead.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune.model.export_gguf import export_gguf
from preftune.model.tiny import tiny_model

if importlib.util.find_spec("llama_cpp") is None and os.environ.get("CI"):  # CI never skips it silently
    raise ImportError("llama-cpp-python is not installed: `make test` installs it (the llamacpp extra)")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")

TEXTS = ["The river is calm and kind.", "\n\nHuman: Tell me about the city.\n\nAssistant: The city is warm.",
         "two words, <|im_start|>user\nhi<|im_end|> and digits 0 1 2 345", "é ü 日本 – tabs\tand\nlines"]
TINY_BOUND = {"f32": 1e-3, "q8_0": 5e-2}


def llama_cpp_logits(path, ids_list, texts):
    """llama.cpp's (T, V) logits of each id list, and its own ids of each of ``texts``."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1)
    try:
        logits = []
        for ids in ids_list:
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[:len(ids)]))
        return logits, [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in texts]
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "sentencepiece"])
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_tiny_models_run_in_llama_cpp_as_in_transformers(tmp_path, tiny_tokenizer, arch, quant):
    from transformers import AutoTokenizer

    tokenizer = tiny_tokenizer
    if arch == "sentencepiece":
        from tests.model.test_export_gguf import sentencepiece_style_tokenizer

        tokenizer = sentencepiece_style_tokenizer()
    folder = tmp_path / f"tiny-{arch}-model"
    model = tiny_model("llama" if arch == "sentencepiece" else arch, vocab_size=len(tokenizer), seed=0).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    path = export_gguf(folder, tmp_path / f"m.{quant}.gguf", quant).path
    # a Metaspace vocabulary: not beside special tokens (the difference the export names in its notes)
    texts = [t for t in TEXTS if "<|" not in t] if arch == "sentencepiece" else TEXTS
    ids_list = [tokenizer(text).input_ids for text in texts]
    logits, their_ids = llama_cpp_logits(path, ids_list, texts)
    assert their_ids == ids_list
    with torch.no_grad():
        ours = [model(torch.tensor([ids])).logits[0].numpy() for ids in ids_list]
    gap = max(np.abs(a - b).max() for a, b in zip(logits, ours))
    assert gap <= TINY_BOUND[quant]


def test_a_leading_space_differs_with_a_metaspace_vocabulary(tmp_path):
    """The known difference, named in the export's notes: Metaspace adds no '▁' before a leading space."""
    from tests.model.test_export_gguf import sentencepiece_style_tokenizer

    tokenizer = sentencepiece_style_tokenizer()
    folder = tmp_path / "spm-model"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = export_gguf(folder, tmp_path / "m.gguf", "f32")
    assert any("starts with a space" in note for note in result.plan.notes)
    llm = llama_cpp.Llama(model_path=str(result.path), n_ctx=64, verbose=False, n_threads=1)
    try:
        theirs = llm.tokenize(b"  two", add_bos=True, special=True)
    finally:
        llm.close()
    ours = tokenizer("  two").input_ids
    assert theirs != ours and theirs[1:] == [ours[1], *ours[1:]]  # one more leading '▁'


# ----------------------------------------------------------------------------- SmolLM2, tuned by preftune

MEAN_BOUND = {"f16": 1e-2, "q8_0": 0.15}
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gguf_export.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gguf_export_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    bench = load_bench()
    try:
        base = bench.smollm2_folder()
    except ValueError as exc:  # no network and no cached copy
        if os.environ.get("CI"):
            pytest.fail(f"SmolLM2 not available: {exc}")
        pytest.skip(f"SmolLM2 not available: {exc}")
    work = tmp_path_factory.mktemp("gguf-llamacpp")
    tuned = bench.tune(base, work / "tuned", steps=2)
    return bench.measure(tuned, ["f16", "q8_0"], work)["per_quant"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_tokenizes_and_scores_like_preftune(measured, quant):
    m = measured[quant]
    assert m["ids_equal"]  # BOS as the file says, special tokens parsed, byte-level splits the same
    assert m["positions"] >= 200
    assert m["mean_abs_logp_diff"] <= MEAN_BOUND[quant]
    assert m["mean_abs_logp_diff"] > 0  # really a different runtime (and precision)


@pytest.mark.slow
def test_greedy_generation_agrees_at_f16(measured):
    m = measured["f16"]
    assert m["greedy_same_first_tokens"] == m["greedy_tokens"] > 0, (m["greedy_ours"], m["greedy_llama_cpp"])


@pytest.mark.slow
def test_q8_0_is_about_half_the_size_of_f16(measured):
    ratio = measured["q8_0"]["size_bytes"] / measured["f16"]["size_bytes"]
    assert 0.5 < ratio < 0.6  # 34 bytes per 32 weights against 64, plus f32 norms and metadata
