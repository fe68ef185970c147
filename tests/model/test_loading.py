"""Loading helpers: the tokenizer as it is (the data doctor's), dtype names, one-line error text."""

import pytest
import torch

from preftune.model.errors import first_line
from preftune.model.loading import load_tokenizer, load_tokenizer_as_is
from preftune.model.precision import resolve_dtype


def test_tokenizer_as_is(tiny_model_dir, tmp_path):
    as_is = load_tokenizer_as_is(str(tiny_model_dir))
    assert as_is.get_vocab() == load_tokenizer(str(tiny_model_dir)).get_vocab()
    with pytest.raises(ValueError, match=r"cannot load tokenizer '.*nope'"):
        load_tokenizer_as_is(tmp_path / "nope")


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="is not one of float32, bfloat16, float16, auto"):
        resolve_dtype("int8")


def test_first_line():
    assert first_line(ValueError("first\nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"
