"""Fused CPU kernels for the bf16 decode step (``decode_kernels.cpp``), built on first use.

A decode step at a few rows spends as much time between its products as in them: each RMS norm is five
ATen calls, the rotary embedding four, SDPA's CPU flash kernel sets up per (row, KV head) for a three-row
query. Three kernels do that work in one call each, in the rounding of the Hugging Face bf16 forward:

- ``add_rms_norm(x, y, weight, eps)``: ``x += y`` (the residual add, in place) and the RMS norm of ``x``;
- ``decode_attention(qkv, cos, sin, k_cache, v_cache, valid, column, heads, kv_heads, scale)``: the rotary
  embedding of the new query and key heads, the key and value written into the cache, and each row's
  attention over its valid cache columns (float32 softmax);
- ``silu_mul(gate_up)``: ``silu(gate) * up``.

They are compiled once per machine with ``torch.utils.cpp_extension`` (the system C++ compiler and
``ninja``; ~20 s on 2 cores, then cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)
for CPUs where PyTorch runs its AVX-512 kernels. Where the build fails (no compiler, no ninja) or
``PREFTUNE_DECODE_KERNELS=0`` is set, :func:`available` is False and the decoder keeps its ATen path; the
reason is logged once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_kernels.cpp")
ENV = "PREFTUNE_DECODE_KERNELS"  # "0": never build or use them

# the flags PyTorch compiles its own kernels of that capability with (ATen's Vectorized<float> follows
# CPU_CAPABILITY_*). AVX-512 only: the decoder computes in bf16 on the CPU only where oneDNN has bf16
# products, which needs AVX-512 (packed_linear.packing_works), so an AVX2 build would never run.
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
}
BF16_LANES = 32  # bf16 values per AVX-512 vector (two float vectors): a head size is a multiple of two of them


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def supports(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernels take a model of this attention shape (before building them): up to 16 query heads
    per KV head, the head size a multiple of 64 (two AVX-512 vectors of bf16) and at most 512."""
    return (_capability() in _FLAGS and heads % kv_heads == 0 and heads // kv_heads <= 16
            and head_dim % (2 * BF16_LANES) == 0 and head_dim <= 16 * BF16_LANES)


@contextlib.contextmanager
def _ninja_on_path():
    """``torch.utils.cpp_extension`` runs ``ninja`` from PATH; the ``ninja`` package's binary (a dependency)
    sits in the environment's bin folder, which is not on PATH when the environment is not activated."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja

        folder = ninja.BIN_DIR
    except (ImportError, AttributeError):
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = folder + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


def wanted() -> bool:
    """False while ``PREFTUNE_DECODE_KERNELS=0`` is set (read at every decoder built)."""
    return os.environ.get(ENV, "").strip() != "0"


def available() -> bool:
    """Whether the kernels are wanted (:func:`wanted`) and ``torch.ops.preftune_decode`` is built and loaded
    (built on the first call that wants them; a failed build is not retried in the process)."""
    return wanted() and _built()


@functools.lru_cache(maxsize=1)
def _built() -> bool:
    reason = _unavailable_reason()
    if reason is not None:
        log.info("fused decode kernels not used: %s", reason)
        return False
    return True


def _unavailable_reason() -> str | None:
    capability = _capability()
    if capability not in _FLAGS:
        return f"PyTorch runs {capability} kernels on this CPU (AVX-512 needed)"
    if hasattr(torch.ops, "preftune_decode") and hasattr(torch.ops.preftune_decode, "decode_attention"):
        return None
    try:
        from torch.utils import cpp_extension

        source = SOURCE.read_bytes()
        # the name carries the source, the flags and the torch version: a changed kernel or torch is a new build
        tag = hashlib.sha256(source + repr(_FLAGS[capability]).encode() + torch.__version__.encode()).hexdigest()[:12]
        name = f"preftune_decode_{tag}"
        try:
            built = (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").exists()
        except (AttributeError, OSError, RuntimeError):
            built = False
        if not built:
            log.info("building the sampler's fused CPU kernels with the C++ compiler (once, ~20 s on 2 cores)")
        with _ninja_on_path():
            cpp_extension.load(name=name, sources=[str(SOURCE)], is_python_module=False,
                               extra_cflags=["-O3", "-fopenmp", *_FLAGS[capability]], extra_ldflags=["-fopenmp"],
                               verbose=False)
        torch.ops.preftune_decode.decode_attention  # noqa: B018 - raises if the library did not register
    except Exception as error:  # noqa: BLE001 - any build or load failure means the ATen path
        lines = str(error).strip().splitlines()
        return f"build failed ({type(error).__name__}: {lines[-1][:200] if lines else 'no message'})"
    return None
