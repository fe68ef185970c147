"""Prepacked bf16 linears: autocast's numbers, the model given back as it was, a no-op where not bf16."""

from __future__ import annotations

import pytest
import torch

from preftune.model.packed_linear import PackedLinear, packed_linears, packing_works
from preftune.model.tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


def test_the_probe_finds_packing_where_onednn_has_bf16():
    assert packing_works() == bool(torch.backends.mkldnn.is_available()
                                   and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.skipif(not packing_works(), reason="this CPU / PyTorch build has no oneDNN bf16; packing is a no-op")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_forward_equals_the_bf16_autocast_forward(arch):
    """Same logits as ``torch.autocast(bf16)`` on the fp32 model (the arithmetic autocast does), and every
    linear given back afterwards."""
    model = tiny_model(arch, vocab_size=96, seed=3).eval()
    ids = torch.randint(3, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = model(ids).logits
        with packed_linears(model, torch.bfloat16, 3):
            inside = [type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
            got = model(ids).logits
    assert set(inside) == {PackedLinear} and len(inside) == len(linears)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=1e-2)
    assert {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear} == linears


def test_fp32_computation_is_left_alone():
    model = tiny_model("llama", vocab_size=64, seed=0).eval()
    with packed_linears(model, None, 4):
        assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with packed_linears(model, torch.float32, 4):
        assert not any(isinstance(m, PackedLinear) for m in model.modules())
