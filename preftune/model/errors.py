"""Why a model could not be loaded, in one line.

* :class:`ModelFileError` — ``cannot read this model file: PATH (what is wrong)``, raised by the
  loaders of :mod:`preftune.model.loading` (safetensors) and :mod:`preftune.model.gguf` when a
  weights file is truncated or its header corrupt.
* :func:`safetensors_problem`, :func:`gguf_problem` — what is wrong with such a file, from its
  header alone (a few reads, never the tensor data), or None when the header agrees with the file.
  The loaders call them only after a load failed, so a good file costs nothing extra.
* :func:`attention_unavailable` — the line for an ``--attn-implementation`` whose package is missing.
* :func:`first_line` — an exception's message cut to one line.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

# Bytes per element of each safetensors dtype (sub-byte float types are left out: their spans are not checked).
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                           "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers

# Attention implementations that need no package beyond torch (None: the loaders' default, sdpa).
PACKAGE_FREE_ATTENTION = (None, "sdpa", "eager")

GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: struct formats of the scalar ones; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class ModelFileError(ValueError):
    """A weights file that cannot be read. ``str()``: ``cannot read this model file: PATH (reason)``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot read this model file: {self.path} ({reason})")


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def attention_unavailable(attn: str, exc: BaseException) -> str:
    """The one line for an attention implementation that could not be switched on for want of a package."""
    return (f"--attn-implementation {attn} needs a package that is not installed here ({first_line(exc)}); "
            "sdpa (the default) and eager need none")


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the safetensors file ``path``, from its 8-byte length and JSON header:
    truncated (the header's tensors end past the file), bytes past their end, or a corrupt header.
    None when the header agrees with the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = f.read(8)
        if len(length) < 8:
            return f"truncated: {size} bytes, shorter than the 8-byte length of its header"
        header_size = int.from_bytes(length, "little")
        if header_size > SAFETENSORS_MAX_HEADER:
            return f"corrupt header: its length field says {header_size} bytes, over safetensors' limit of 100 MB"
        if 8 + header_size > size:
            return f"truncated: the header says {8 + header_size} bytes of header, the file has {size}"
        text = f.read(header_size)
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"corrupt header: not JSON ({first_line(exc)})"
    if not isinstance(header, dict):
        return "corrupt header: not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        span = _safetensors_span(name, entry)
        if isinstance(span, str):
            return span
        end = max(end, span)
    expected = 8 + header_size + end
    if size < expected:
        return f"truncated: the header says {expected} bytes, the file has {size}"
    if size > expected:
        return f"{size - expected} bytes past the end of the tensor data its header describes ({expected} bytes)"
    return None


def _safetensors_span(name: str, entry) -> int | str:
    """The end offset of tensor ``name``'s data, or what is wrong with its header entry."""
    try:
        dtype, shape, (begin, stop) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        return f"corrupt header: tensor {name!r} lacks a dtype, shape or data_offsets pair"
    numbers = [*shape, begin, stop]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers) or stop < begin:
        return f"corrupt header: tensor {name!r} has shape {shape} and data_offsets [{begin}, {stop}]"
    item = SAFETENSORS_DTYPE_BYTES.get(dtype)
    if item is not None and math.prod(shape) * item != stop - begin:
        return (f"corrupt header: tensor {name!r} of shape {shape} ({dtype}) needs {math.prod(shape) * item} bytes, "
                f"its data_offsets give {stop - begin}")
    return stop


class _Unreadable(Exception):
    """What :class:`_GGUFHeader` found wrong (the message is the reason)."""


class _GGUFHeader:
    """Bounded reads of a GGUF header: every read first checks that the file has the bytes."""

    def __init__(self, f, size: int):
        self.f, self.size, self.order = f, size, "<"

    def take(self, n: int, what: str) -> bytes:
        end = self.f.tell() + n
        if end > self.size:
            raise _Unreadable(f"truncated: the header needs {end} bytes for {what}, the file has {self.size}")
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        end = self.f.tell() + n
        if end > self.size:
            raise _Unreadable(f"truncated: the header needs {end} bytes for {what}, the file has {self.size}")
        self.f.seek(end)

    def number(self, fmt: str, what: str):
        return struct.unpack(self.order + fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, least_bytes_each: int) -> int:
        """A u64 count, refused when that many entries of ``least_bytes_each`` cannot fit in the rest of the file."""
        n = self.number("Q", what)
        end = self.f.tell() + n * least_bytes_each
        if end > self.size:
            raise _Unreadable(f"truncated or corrupt: the header needs at least {end} bytes for {n} entries of {what}, "
                              f"the file has {self.size}")
        return n

    def string(self, what: str) -> str:
        return self.take(self.number("Q", what), what).decode("utf-8", "replace")

    def value(self, kind: int, what: str):
        """Read (scalars and strings) or skip (arrays) one metadata value of type ``kind``."""
        if kind in _GGUF_SCALARS:
            return self.number(_GGUF_SCALARS[kind], what)
        if kind == _GGUF_STRING:
            return self.skip(self.number("Q", what), what)
        if kind != _GGUF_ARRAY:
            raise _Unreadable(f"corrupt header: {what} has value type {kind}, not a GGUF type")
        item = self.number("I", what)
        fixed = struct.calcsize(_GGUF_SCALARS[item]) if item in _GGUF_SCALARS else None
        n = self.count(what, fixed or 8)
        if fixed is not None:
            return self.skip(n * fixed, what)
        for _ in range(n):
            self.value(item, what)
        return None


def gguf_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the GGUF file ``path``, from its header (metadata skipped over, tensor
    infos read): truncated, not a GGUF, an unreadable version, more than 4 dimensions, an unknown
    tensor type, or tensor data the header places past the end of the file. None when the header
    agrees with the file."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header = _GGUFHeader(f, size)
            magic = header.take(4, "the magic number")
            if magic != b"GGUF":
                return f"not a GGUF file: it starts with {magic!r}, not b'GGUF'"
            version = header.number("I", "the version")
            if version & 0xFFFF == 0:  # written for the other byte order
                header.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
            if version not in GGUF_VERSIONS:
                return f"GGUF version {version}; versions {' and '.join(map(str, GGUF_VERSIONS))} can be read"
            n_tensors = header.count("tensor infos", 32)
            n_keys = header.count("metadata", 13)
            alignment = _gguf_metadata(header, n_keys)
            tensors = [_gguf_tensor_info(header, i) for i in range(n_tensors)]
            data_start = -(-f.tell() // alignment) * alignment
    except _Unreadable as problem:
        return str(problem)
    return _gguf_data_problem(tensors, data_start, size)


def _gguf_metadata(header: _GGUFHeader, n_keys: int) -> int:
    """Walk the metadata; returns the tensor data alignment (``general.alignment``, default 32)."""
    alignment = GGUF_DEFAULT_ALIGNMENT
    for i in range(n_keys):
        key = header.string(f"metadata key {i}")
        value = header.value(header.number("I", f"metadata {key!r}"), f"metadata {key!r}")
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise _Unreadable(f"corrupt header: general.alignment is {value!r}, not a power of two")
            alignment = value
    return alignment


def _gguf_tensor_info(header: _GGUFHeader, i: int) -> tuple[str, list[int], int, int]:
    """(name, dimensions, GGML type, data offset) of tensor info ``i``."""
    name = header.string(f"tensor info {i}")
    n_dims = header.number("I", f"tensor {name!r}")
    if n_dims > GGUF_MAX_DIMS:
        raise _Unreadable(f"corrupt header: tensor {name!r} has {n_dims} dimensions (GGUF allows at most "
                          f"{GGUF_MAX_DIMS})")
    dims = [header.number("Q", f"tensor {name!r}") for _ in range(n_dims)]
    return name, dims, header.number("I", f"tensor {name!r}"), header.number("Q", f"tensor {name!r}")


def _gguf_data_problem(tensors, data_start: int, size: int) -> str | None:
    """The tensor whose data the header places furthest, checked against the file's ``size``; an unknown
    type or a row length its blocks don't divide is named too."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # the loaders say that the package is missing
        return None
    furthest = None
    for name, dims, kind, offset in tensors:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            return f"corrupt header: tensor {name!r} has type {kind}, not a GGML type"
        if dims and dims[0] % block:
            return (f"corrupt header: tensor {name!r} has rows of {dims[0]} values, not a multiple of its type's "
                    f"block of {block}")
        end = data_start + offset + math.prod(dims) // block * block_bytes
        if furthest is None or end > furthest[0]:
            furthest = (end, name, dims, GGMLQuantizationType(kind).name)
    if furthest is not None and furthest[0] > size:
        end, name, dims, kind = furthest
        return (f"truncated or corrupt: the header says {end} bytes (tensor {name!r} of dimensions {dims}, {kind}), "
                f"the file has {size}")
    return None
