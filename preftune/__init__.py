"""preftune: preference fine-tuning (DPO and family, KTO, SFT) for causal language models."""

__version__ = "0.1.0"
