"""Mixed precision that trains: fp32 master weights, bf16 compute, fp32 log-softmax and losses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training.test_loop import read_metrics, rule_config

from preftune.cli.main import build_parser, config_from_args
from preftune.config.train_config import TrainConfig
from preftune.config.values import ConfigError
from preftune.data.collate import collate_packed
from preftune.model.logprobs import batch_logps, chunked_target_logps
from preftune.model.precision import check_trainable_dtype, cpu_has_fast_bf16, resolve_mixed_precision
from preftune.model.tiny import tiny_model
from preftune.training.loop import train

ZEN3 = "flags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
ZEN4 = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"


def test_auto_picks_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch):
    assert not cpu_has_fast_bf16(ZEN3)
    assert cpu_has_fast_bf16(ZEN4) and cpu_has_fast_bf16(SAPPHIRE)
    import preftune.model.precision as precision

    monkeypatch.setattr(precision, "_host_has_fast_bf16", lambda: True)
    assert resolve_mixed_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(precision, "_host_has_fast_bf16", lambda: False)
    mode, why = resolve_mixed_precision("auto", "cpu")
    assert mode == "no" and "no bf16 matmul instructions" in why
    assert resolve_mixed_precision("bf16", "cpu") == ("bf16", "as asked")
    assert resolve_mixed_precision("no", "cpu")[0] == "no"


def test_fp16_off_cuda_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU.*loss scaling"):
        resolve_mixed_precision("fp16", "cpu")


def test_trl_flags_map_to_mixed_precision(tmp_path):
    parser = build_parser()

    def parsed(*flags):
        return config_from_args(parser.parse_args(["train", *flags]))

    assert parsed("--bf16").mixed_precision == "bf16"
    assert parsed("--bf16", "false").mixed_precision == "no"
    assert parsed("--fp16", "True").mixed_precision == "fp16"
    assert parsed("--mixed-precision", "bf16").mixed_precision == "bf16"
    assert parsed().mixed_precision == "auto"
    with pytest.raises(ConfigError, match="--bf16 and --mixed-precision both given"):
        parsed("--bf16", "--mixed-precision", "no")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("bf16: true\n")
    assert TrainConfig.from_yaml(yaml_file).mixed_precision == "bf16"
    yaml_file.write_text("bf16: false\n")
    assert TrainConfig.from_yaml(yaml_file).mixed_precision == "no"
    # the old boolean gradient_checkpointing still reads
    yaml_file.write_text("gradient_checkpointing: true\n")
    assert TrainConfig.from_yaml(yaml_file).gradient_checkpointing == "on"
    assert parsed("--gradient-checkpointing").gradient_checkpointing == "on"


def test_pure_16bit_training_of_a_full_model_is_refused():
    """AdamW on bf16 weights rounds DPO-sized updates away; we refuse instead of silently not training."""
    cfg = TrainConfig(model="m", data="d", output_dir="o", dtype="bfloat16")
    with pytest.raises(ConfigError, match="round away.*--mixed-precision bf16"):
        cfg.validate()
    TrainConfig(model="m", data="d", output_dir="o", dtype="bfloat16", lora_r=8).validate()  # frozen base: fine
    model = tiny_model("llama", vocab_size=64, seed=0).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 parameter tensors"):
        check_trainable_dtype(model)
    model.requires_grad_(False)
    check_trainable_dtype(model)  # nothing trained in bf16


def test_pure_bf16_adamw_loses_the_updates_that_fp32_master_weights_keep():
    """Why the refusal: 8 AdamW steps at lr 1e-6 on weights ~0.02. In fp32 every weight moves; in bf16
    (8 mantissa bits: spacing 2^-14 ~ 6e-5 near 0.02) an update of 1e-6 rounds back to the same value."""
    torch.manual_seed(0)
    start = torch.randn(4096) * 0.02
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.nn.Parameter(start.clone().to(dtype))
        optimizer = torch.optim.AdamW([weight], lr=1e-6, weight_decay=0.0)
        for _ in range(8):
            weight.grad = torch.randn(4096).to(dtype)
            optimizer.step()
        moved[dtype] = float((weight.detach().float() != start.to(dtype).float()).float().mean())
    assert moved[torch.float32] > 0.99
    assert moved[torch.bfloat16] < 0.05


def _batch(tokenizer_vocab: int, seed: int = 0):
    from preftune.data.records import TokenizedExample

    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, tokenizer_vocab, (n,), generator=gen).tolist()

    examples = [TokenizedExample(index=i, prompt_ids=ids(6 + i), completions=[ids(5 + i), ids(4 + 2 * i)])
                for i in range(3)]
    return collate_packed(examples, pad_id=0)


def test_bf16_head_matches_fp32_within_its_tolerance():
    """The chunked head with bf16 matmuls: log-probs within 0.05 of fp32 per token (bf16 rounds the
    logits' inputs to 8 mantissa bits), gradients within 2% relative, log-probs returned in fp32."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(300, 32) * 0.2)
    targets = torch.randint(0, 300, (40,))
    out = {}
    for dtype in (None, torch.bfloat16):
        logps = chunked_target_logps(hidden, weight, None, targets, chunk_size=16, compute_dtype=dtype)
        grads = torch.autograd.grad(logps.sum(), (hidden, weight))
        out[dtype] = (logps.detach(), grads)
    assert out[torch.bfloat16][0].dtype == torch.float32
    assert (out[torch.bfloat16][0] - out[None][0]).abs().max() < 0.05
    for g16, g32 in zip(out[torch.bfloat16][1], out[None][1]):
        assert g16.dtype == torch.float32
        assert float((g16 - g32).norm() / g32.norm()) < 0.02


def test_bf16_frozen_reference_logps_within_the_stated_tolerance():
    """A reference held in bf16 weights against the same fp32 reference, on a packed batch: the summed
    log-probs per sequence differ by < 0.05 per token on average, < 0.1 worst (README's numbers are
    from the real model); mixed precision on fp32 weights is closer still."""
    model = tiny_model("llama", vocab_size=400, seed=0).eval()
    batch = _batch(400)
    with torch.no_grad():
        fp32 = batch_logps(model, batch)
        autocast = batch_logps(model, batch, compute_dtype=torch.bfloat16)
        ref16 = batch_logps(tiny_model("llama", vocab_size=400, seed=0).to(torch.bfloat16).eval(), batch,
                            compute_dtype=torch.bfloat16)
    per_token = (ref16.token_logps - fp32.token_logps).abs()
    assert float(per_token.mean()) < 0.05 and float(per_token.max()) < 0.1
    assert float((autocast.token_logps - fp32.token_logps).abs().mean()) <= float(per_token.mean()) + 1e-6
    assert fp32.logps.dtype == ref16.logps.dtype == torch.float32


def _moved_fraction(start: dict, out) -> float:
    end = load_file(out / "model.safetensors")
    moved = total = 0
    for name, tensor in end.items():
        if name in start:
            moved += int((tensor != start[name]).sum())
            total += tensor.numel()
    return moved / total


@pytest.mark.slow
def test_bf16_mixed_precision_trains_like_fp32(tiny_model_dir, rule_data, tmp_path):
    """8 steps at lr 1e-6 (a DPO rate) on the same batches: with fp32 master weights under bf16 compute
    the same share of weights moves as in fp32 (pure bf16 moved ~2% in the issue's measurement), and
    the per-step losses stay within 2e-3 of fp32's. At lr 3e-3 both learn the rule."""
    start = load_file(tiny_model_dir / "model.safetensors")
    common = dict(max_steps=8, logging_steps=1, eval_data=None, learning_rate=1e-6)
    train(rule_config(tiny_model_dir, rule_data, tmp_path / "fp32", mixed_precision="no", **common))
    result = train(rule_config(tiny_model_dir, rule_data, tmp_path / "bf16", mixed_precision="bf16", **common))
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and result.steps == 8
    fp32_moved = _moved_fraction(start, tmp_path / "fp32")
    bf16_moved = _moved_fraction(start, tmp_path / "bf16")
    assert fp32_moved > 0.5
    assert bf16_moved == pytest.approx(fp32_moved, abs=0.01)
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())  # master weights saved in fp32
    fp32_losses = [r["loss"] for r in read_metrics(tmp_path / "fp32") if "loss" in r]
    bf16_losses = [r["loss"] for r in read_metrics(tmp_path / "bf16") if "loss" in r]
    assert len(fp32_losses) == len(bf16_losses) == 8
    assert bf16_losses == pytest.approx(fp32_losses, abs=2e-3)


@pytest.mark.slow
def test_bf16_mixed_precision_learns_the_rule(tiny_model_dir, rule_data, tmp_path):
    result = train(rule_config(tiny_model_dir, rule_data, tmp_path / "run", mixed_precision="bf16"))
    assert result.eval_before["rewards/accuracies"] == 0.0  # policy and reference: identical bf16 forwards
    assert result.eval_after["rewards/accuracies"] >= 0.9


def test_cpu_bf16_can_be_forced_by_environment():
    """PREFTUNE_CPU_BF16=0/1 overrides the /proc/cpuinfo check (tests set 0 for the CLI runs they start)."""
    from preftune.model.precision import host_has_fast_bf16

    with_bf16 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
    without = "flags\t\t: fpu avx2\n"
    assert host_has_fast_bf16({}, with_bf16) and not host_has_fast_bf16({}, without)
    assert not host_has_fast_bf16({"PREFTUNE_CPU_BF16": "0"}, with_bf16)
    assert host_has_fast_bf16({"PREFTUNE_CPU_BF16": "1"}, without)
