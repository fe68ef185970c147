"""Small models and tokenizers built offline, for the quickstart, tests and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the fly
with ``tokenizers``, and models are randomly initialised from a ``transformers`` config.
"""

from __future__ import annotations

from collections.abc import Iterable

# A ChatML-style template; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

DEFAULT_CORPUS = [
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
    "Human: Name a colour. Assistant: blue. Assistant: black. The sky is blue and the night is black.",
    "The quick brown fox jumps over the lazy dog. A cat sat on the mat.",
    "Answer: yes. Answer: no. Good, great, wonderful, terrible, awful, bad, fine, okay.",
    "One two three four five six seven eight nine ten. 0 1 2 3 4 5 6 7 8 9",
    "user assistant system <|im_start|> <|im_end|> hello world, how are you today?",
]


def train_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512, bos: bool = True):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    With ``bos=True`` the tokenizer prepends ``<s>`` to every encoded text (like Llama's),
    which is what makes double-BOS bugs visible in tests. EOS is ``</s>``, pad ``<pad>``.
    The tokenizer carries a ChatML-style chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus) if corpus is not None else list(DEFAULT_CORPUS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 4, trainer=trainer)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                intermediate: int | None = None, max_positions: int = 1024, **overrides):
    """A transformers config for a small randomly initialised causal LM.

    ``arch`` is one of ``llama``, ``qwen2``, ``mistral`` (sliding window off), ``gpt2``.
    """
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    intermediate = intermediate or hidden * 2
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=max_positions, tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=max_positions, tie_word_embeddings=True,
                          use_sliding_window=False, **common)
    elif arch == "mistral":
        cfg = MistralConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                            max_position_embeddings=max_positions, sliding_window=None,
                            tie_word_embeddings=False, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                         n_inner=intermediate, **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose llama, qwen2, mistral or gpt2")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str = "llama", vocab_size: int = 512, seed: int = 0, attn_implementation: str = "sdpa",
               **config_kwargs):
    """A randomly initialised ``AutoModelForCausalLM`` (fp32) from :func:`tiny_config`."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, vocab_size, **config_kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
