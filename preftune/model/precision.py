"""Mixed precision: fp32 master weights and optimizer state, matmuls in bf16 / fp16.

``--mixed-precision bf16`` runs the model body under ``torch.autocast`` and the output head's
matmuls in bf16 (:mod:`preftune.model.logprobs`), while log-softmax, log-probs and every loss stay
fp32 and AdamW updates fp32 weights. ``fp16`` adds loss scaling (accelerate's ``GradScaler``;
CUDA only). Training 16-bit weights directly is refused: AdamW updates far below the weights'
resolution round away (bf16 has 8 bits of mantissa: at lr 1e-6 a weight of 0.02 needs an update
of ~1e-4 to change at all), so such a run silently does not train.

``auto`` picks bf16 where the hardware runs it fast (a CUDA GPU with bf16, a CPU with
AVX512-BF16 or AMX), else no mixed precision: on a CPU without bf16 instructions a bf16 matmul
is emulated and runs orders of magnitude slower than fp32.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

# --mixed-precision choices (the config's field takes them from here).
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# --dtype / --ref-dtype names of the weights' dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_dtype(name: str):
    """``"float32"`` -> ``torch.float32`` (also bfloat16, float16); ``"auto"`` stays ``"auto"``."""
    if name == "auto":
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join([*DTYPES, 'auto'])}")
    return DTYPES[name]


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in _BF16_CPU_FLAGS)
    return False


def host_has_fast_bf16(environ=os.environ, cpuinfo: str | None = None) -> bool:
    """:func:`cpu_has_fast_bf16`, unless ``PREFTUNE_CPU_BF16`` says (``0``: treat this CPU as without
    bf16, so ``--mixed-precision auto`` is fp32; ``1``: as with it)."""
    forced = environ.get("PREFTUNE_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_has_fast_bf16(cpuinfo)


def _host_has_fast_bf16() -> bool:  # tests patch this one
    return host_has_fast_bf16()


def resolve_mixed_precision(name: str, device: torch.device | str) -> tuple[str, str]:
    """``(mode, why)`` with mode one of ``no``, ``bf16``, ``fp16`` for this device.

    Raises ValueError where the asked mode can't run here (fp16 loss scaling off CUDA).
    """
    device = torch.device(device)
    if name not in MIXED_PRECISION:
        raise ValueError(f"--mixed-precision: {name!r} is not one of {', '.join(MIXED_PRECISION)}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU (fp16 needs loss scaling, which accelerate "
                         "runs on CUDA only); on CPU use --mixed-precision bf16 (CPUs with AVX512-BF16/AMX) "
                         "or no")
    if name != "auto":
        return name, "as asked"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU supports bf16"
        return "no", "auto: this GPU has no bf16 (pass --mixed-precision fp16 for loss-scaled fp16)"
    if device.type == "cpu":
        if _host_has_fast_bf16():
            return "bf16", "auto: this CPU has bf16 matmul instructions (AVX512-BF16/AMX)"
        return "no", ("auto: this CPU has no bf16 matmul instructions (AVX512-BF16/AMX), where bf16 is "
                      "emulated and slower than fp32")
    return "no", f"auto: no mixed precision on {device.type}"


def compute_dtype(mode: str) -> torch.dtype | None:
    """The matmul dtype of a resolved mode (None = the weights' own dtype)."""
    return COMPUTE_DTYPES[mode]


def resolve_compute_dtype(mixed_precision: str, device) -> torch.dtype | None:
    """The autocast dtype of a ``--mixed-precision`` value on ``device`` (None: the weights' own)."""
    return compute_dtype(resolve_mixed_precision(mixed_precision, torch.device(device).type)[0])


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a no-op context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def check_trainable_dtype(model, what: str = "the policy") -> None:
    """Refuse trainable 16-bit parameters (pure bf16/fp16 training); see the module docstring."""
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype in
           (torch.bfloat16, torch.float16)]
    if low:
        name, dtype = low[0]
        kind = str(dtype).replace("torch.", "")
        raise ValueError(
            f"{what} would train {len(low)} {kind} parameter tensors (e.g. {name}): AdamW updates below "
            f"{kind}'s resolution round away, so at DPO learning rates most weights never change. Keep the "
            f"weights fp32 (--dtype float32, the default) and compute in 16 bits with --mixed-precision "
            f"bf16 (or fp16 on a GPU); with LoRA (--lora-r) 16-bit frozen base weights are fine.")
