"""GGUF export: a trained folder written as a .gguf loads back through transformers' own GGUF reader
with the same config, the same tokenizer and the same logits (within a stated bound per quantization).

Tolerances, on the tiny models here (hidden 64, 2 layers, |logits| ~0.6): f32 is the weights as they
are, so the logits agree to 1e-5 (float summation order only). f16 keeps 11 significant bits: each
weight moves by at most 2^-11 of itself, measured 2.5e-4 on the logits, bounded at 2e-3. q8_0 stores
blocks of 32 weights as int8 times one f16 scale (max |w| / 127): each weight moves by up to half a
step, measured 6e-3 on the logits, bounded at 2e-2 -- and above 1e-4 (it really was quantized).
"""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch

from preftune.model.export_gguf import ExportError, export_gguf, plan_export, rotary_permute
from preftune.model.tiny import CHAT_TEMPLATE, DEFAULT_CORPUS, tiny_model

TEXTS = ["The river is calm and kind.", "\n\nHuman: Tell me about the city.\n\nAssistant: The city is warm.",
         "  two spaces, <|im_start|>user\nhi<|im_end|> and digits 0 1 2 345", "é ü 日本 – tabs\tand\nlines"]
LOGIT_BOUND = {"f32": 1e-5, "f16": 2e-3, "q8_0": 2e-2, "bf16": 2e-2}
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "head_dim")


def save_model(folder, arch, tokenizer, seed=0, **config):
    """A tiny ``arch`` model (random weights) and ``tokenizer`` saved to ``folder``; returns the model."""
    model = tiny_model(arch, vocab_size=len(tokenizer), seed=seed, **config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def load_back(path):
    """transformers' own GGUF reader: (model in float32, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def logits(model, tokenizer, texts=TEXTS) -> torch.Tensor:
    """(sum of T over texts, V) float32 logits, one text at a time (no padding)."""
    with torch.no_grad():
        return torch.cat([model(torch.tensor([tokenizer(t).input_ids])).logits[0] for t in texts])


def gguf_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        out[key] = value
    out["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer):
    """Saved tiny models: Llama (untied head), Qwen2 (tied, q/k/v biases), Mistral (untied).

    Folder names avoid the bare word "mistral": transformers' GGUF reader turns a file whose
    general.name is exactly that into its own Mistral class.
    """
    from transformers import AutoTokenizer

    made = {}
    for arch in ("llama", "qwen2", "mistral"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}") / f"tiny-{arch}-tuned"
        model = save_model(folder, arch, tiny_tokenizer)
        made[arch] = (folder, model, AutoTokenizer.from_pretrained(str(folder)))
    return made


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_round_trip_through_transformers(folders, tmp_path, arch, quant):
    folder, original, tokenizer = folders[arch]
    result = export_gguf(folder, tmp_path / f"m.{quant}.gguf", quant)
    assert result.path.is_file() and [p.name for p in tmp_path.iterdir()] == [f"m.{quant}.gguf"]  # no temp left
    assert result.size_bytes == result.path.stat().st_size
    model, loaded_tokenizer = load_back(result.path)

    for key in CONFIG_KEYS:
        assert getattr(model.config, key, None) == pytest.approx(getattr(original.config, key, None)), key
    assert model.config.rope_parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]
    assert model.config.model_type == ("llama" if arch == "mistral" else arch)  # llama.cpp writes Mistral as llama

    for text in TEXTS:
        assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids, text
    assert loaded_tokenizer.chat_template == tokenizer.chat_template == CHAT_TEMPLATE
    assert (loaded_tokenizer.bos_token, loaded_tokenizer.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)

    gap = (logits(model, tokenizer) - logits(original, tokenizer)).abs().max().item()
    assert gap <= LOGIT_BOUND[quant]
    if quant != "f32":
        assert gap > 1e-6 if quant == "f16" else gap > 1e-4  # it really was stored at lower precision


def test_q8_0_is_exactly_its_dequantized_weights(folders, tmp_path):
    """The loaded q8_0 model equals the original with every 2-D weight put through Q8_0 and back: the
    permutation moves whole rows, so each block of 32 holds the same weights as before it."""
    folder, original, tokenizer = folders["llama"]
    model, _ = load_back(export_gguf(folder, tmp_path / "m.gguf", "q8_0").path)
    dequantized = copy.deepcopy(original)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for param in dequantized.parameters():
            if param.ndim == 2:
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), q8), q8)))
    assert (logits(model, tokenizer) - logits(dequantized, tokenizer)).abs().max().item() <= 1e-5


def test_bf16_round_trip(folders, tmp_path):
    folder, original, tokenizer = folders["llama"]
    model, _ = load_back(export_gguf(folder, tmp_path / "m.gguf", "bf16").path)
    assert (logits(model, tokenizer) - logits(original, tokenizer)).abs().max().item() <= LOGIT_BOUND["bf16"]


def test_metadata_and_tensor_layout(folders, tmp_path):
    folder, original, tokenizer = folders["llama"]
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M\n---\n# x\n")
    try:
        fields = gguf_fields(export_gguf(folder, tmp_path / "m.gguf", "q8_0").path)
    finally:
        (folder / "README.md").unlink()
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny-llama-tuned"
    assert fields["general.license"] == "apache-2.0" and fields["general.base_model.count"] == 1
    assert fields["general.base_model.0.name"] == "HuggingFaceTB/SmolLM2-135M"
    assert fields["general.base_model.0.repo_url"] == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    cfg = original.config
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.context_length"] == cfg.max_position_embeddings
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    tensors = fields["tensors"]
    assert tensors["output.weight"] == "Q8_0" and tensors["token_embd.weight"] == "Q8_0"  # untied head
    assert tensors["blk.0.attn_q.weight"] == "Q8_0" and tensors["blk.1.ffn_down.weight"] == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"] == "F32" and tensors["output_norm.weight"] == "F32"
    assert len(tensors) == 2 + 1 + 2 * 9  # embeddings, head, final norm; 9 per layer


def test_tied_head_is_not_written(folders, tmp_path):
    folder, original, _ = folders["qwen2"]
    assert original.config.tie_word_embeddings
    fields = gguf_fields(export_gguf(folder, tmp_path / "m.gguf", "f16").path)
    assert "output.weight" not in fields["tensors"] and fields["tensors"]["token_embd.weight"] == "F16"
    assert fields["tensors"]["blk.0.attn_q.bias"] == "F32"  # Qwen2's q/k/v biases, 1-D: f32
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.pre"] == "qwen2"


def test_llama_q_and_k_rows_are_in_llama_cpp_rotary_order(folders, tmp_path):
    """Per head of d rows: 0, d/2, 1, d/2 + 1, ... (the K weight has the KV heads' count)."""
    folder, original, _ = folders["llama"]
    reader = gguf.GGUFReader(str(export_gguf(folder, tmp_path / "m.gguf", "f32").path))
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    attn = original.model.layers[0].self_attn
    q, k = attn.q_proj.weight.detach().numpy(), attn.k_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.0.attn_q.weight"], rotary_permute(q, 4, 4))
    assert np.array_equal(stored["blk.0.attn_k.weight"], rotary_permute(k, 4, 2))
    head = q[:16]  # the first head (head_dim 16)
    assert np.array_equal(stored["blk.0.attn_q.weight"][:4], head[[0, 8, 1, 9]])


def test_sentencepiece_style_vocabulary_round_trips(tmp_path):
    """A Llama-2 / Mistral-7B style vocabulary: BPE with byte fallback, '▁' for spaces, <0xNN> tokens."""
    from transformers import AutoTokenizer

    tokenizer = sentencepiece_style_tokenizer()
    folder = tmp_path / "spm-model"
    original = save_model(folder, "llama", tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    result = export_gguf(folder, tmp_path / "spm.gguf", "f32")
    fields = gguf_fields(result.path)
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True and fields["tokenizer.ggml.add_bos_token"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert types[5 + 0x41] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.UNKNOWN
    assert types[1] == gguf.TokenType.CONTROL
    scores = fields["tokenizer.ggml.scores"]
    merged = fields["tokenizer.ggml.merges"][0].replace(" ", "")
    assert scores[fields["tokenizer.ggml.tokens"].index(merged)] == 0.0  # the first merge: rank 0
    model, loaded = load_back(result.path)
    for text in TEXTS:
        assert loaded(text).input_ids == tokenizer(text).input_ids, text
        ids = tokenizer(text).input_ids
        assert loaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert (logits(model, tokenizer) - logits(original, tokenizer)).abs().max().item() <= 1e-5


def sentencepiece_style_tokenizer():
    """A tiny tokenizer shaped like Llama 2's tokenizer.json: <unk> <s> </s>, 256 byte tokens, learned
    merges over '▁'-marked words, a Metaspace pre-tokenizer that prefixes the first word, BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    learner.train_from_iterator(DEFAULT_CORPUS * 4, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# ----------------------------------------------------------------------------------------- LoRA


def lora_folder(tmp_path, base_folder, trained: bool):
    """LoRA adapters on the tiny Llama at ``base_folder``, saved with the tokenizer as preftune saves an
    unmerged run; ``trained``: lora_B set to small random values (a fresh adapter has every lora_B zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    if trained:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path / ("lora-trained" if trained else "lora-fresh")
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(base_folder)).save_pretrained(out)
    return out, peft_model


def test_lora_folder_is_merged_first(folders, tmp_path):
    base_folder, original, tokenizer = folders["llama"]
    adapters, peft_model = lora_folder(tmp_path, base_folder, trained=True)
    result = export_gguf(adapters, tmp_path / "lora.gguf", "f32")
    assert result.plan.adapter_base == str(base_folder) and result.plan.base_model == str(base_folder)
    model, _ = load_back(result.path)
    merged = peft_model.merge_and_unload().eval()
    assert (logits(model, tokenizer) - logits(merged, tokenizer)).abs().max().item() <= 1e-5
    assert (logits(model, tokenizer) - logits(original, tokenizer)).abs().max().item() > 1e-3  # the adapters act


# ----------------------------------------------------------------------------------------- refusals


def refused(folder, tmp_path, match: str, quant: str = "f16", out_name: str = "out.gguf"):
    """export_gguf raises one ExportError line matching ``match`` and writes nothing."""
    out = tmp_path / "refused"
    out.mkdir(exist_ok=True)
    with pytest.raises(ExportError, match=match) as info:
        export_gguf(folder, out / out_name, quant)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []
    return str(info.value)


def test_unsupported_architecture_is_refused(tmp_path, tiny_tokenizer):
    folder = tmp_path / "gpt2-model"
    save_model(folder, "gpt2", tiny_tokenizer)
    message = refused(folder, tmp_path, r"architecture 'gpt2' \(GPT2LMHeadModel\) cannot be exported to GGUF")
    assert message.endswith("supported are llama, mistral, qwen2")


def test_untrained_lora_folder_is_refused(folders, tmp_path):
    adapters, _ = lora_folder(tmp_path, folders["llama"][0], trained=False)
    refused(adapters, tmp_path, r"untrained LoRA adapters \(every lora_B is zero\)")


def test_lora_folder_without_weights_or_base_is_refused(folders, tmp_path):
    adapters, _ = lora_folder(tmp_path, folders["llama"][0], trained=True)
    config = json.loads((adapters / "adapter_config.json").read_text())
    (adapters / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/no/such/base"}))
    refused(adapters, tmp_path, "the base model of adapter folder .* is not found: /no/such/base")
    (adapters / "adapter_model.safetensors").unlink()
    refused(adapters, tmp_path, "has adapter_config.json but no adapter_model.safetensors")


def test_missing_tokenizer_is_refused(folders, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folders["llama"][1].save_pretrained(folder)
    refused(folder, tmp_path, "missing tokenizer: .* has no tokenizer.json")


def test_vocabulary_kinds_gguf_cannot_hold_are_refused(folders, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "hello": 1, "world": 2}
    wordpiece = Tokenizer(models.WordPiece(vocab=words, unk_token="[UNK]"))
    folder = tmp_path / "wordpiece"
    save_model(folder, "llama", PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]"))
    refused(folder, tmp_path, "vocabulary kind 'WordPiece' cannot be exported to GGUF")

    whitespace = Tokenizer(models.BPE(vocab=words, merges=[], unk_token="[UNK]"))
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "whitespace-bpe"
    save_model(folder, "llama", PreTrainedTokenizerFast(tokenizer_object=whitespace, unk_token="[UNK]"))
    refused(folder, tmp_path, r"pre-tokenizer \[Whitespace\] is neither byte-level nor SentencePiece-style")


def test_bad_arguments_and_folders_are_refused(folders, tmp_path):
    folder = folders["llama"][0]
    refused(folder, tmp_path, "quantization 'q4_k' is not one of f32, f16, bf16, q8_0", quant="q4_k")
    refused(folder, tmp_path, "the output file must end in .gguf", out_name="model.bin")
    refused(tmp_path / "nope", tmp_path, "model folder not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, tmp_path, "has no config.json or adapter_config.json")


def test_rope_scaling_llama_cpp_cannot_run_is_refused(tmp_path, tiny_tokenizer):
    folder = tmp_path / "yarn-model"
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}
    save_model(folder, "llama", tiny_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    refused(folder, tmp_path, "rope scaling 'yarn' cannot be exported to GGUF")


def test_plan_notes_a_sliding_window(tmp_path, tiny_tokenizer):
    folder = tmp_path / "windowed"
    save_model(folder, "mistral", tiny_tokenizer, sliding_window=64)
    plan = plan_export(folder)
    assert plan.notes == ["the sliding window (64 tokens) is not stored: llama.cpp attends to the whole context"]
    assert plan.vocab.stop_tokens == ["</s>"]


def test_docs_quote_the_measured_results():
    """docs/export.md's table is the one benchmarks/gguf_export.py makes from its newest results.json."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    runs = sorted((repo / "benchmarks" / "results").glob("*-gguf-export/results.json"))
    assert runs, "no benchmarks/results/*-gguf-export/results.json"
    spec = importlib.util.spec_from_file_location("gguf_export_bench", repo / "benchmarks" / "gguf_export.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = json.loads(runs[-1].read_text())
    page = (repo / "docs" / "export.md").read_text()
    assert bench.docs_table(record) in page
