"""A lean decode forward for Llama-family models: prefill, then one token per step, without Hugging Face's
per-call machinery.

:func:`lean_decoder` builds a :class:`LeanDecoder` from a ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
``MistralForCausalLM`` (or returns None, and :func:`unsupported_reason` says why, for anything it cannot
compute exactly: another architecture, a PEFT wrapper or injected adapter layers, a rope scaling other than
the default one, an activation other than SiLU, offloaded or meta weights, a sequence that may outgrow a
sliding window). What a decode step does differently from the Hugging Face forward (same arithmetic):

* **Weights read once**: q/k/v fused into one matrix and gate/up into one, in the compute dtype; on a CPU
  computing in bf16 they are reordered once for oneDNN (:mod:`preftune.model.packed_linear`). Where the
  compute dtype is the weights' own, the model's tensors are used as they are (no fused copy).
* **A static KV cache** ``(layers, batch, kv-heads, max-length, head-dim)`` in the compute dtype,
  allocated once per batch; a step writes one column and attends over the filled part.
* **Prefill in groups of similar length** (:func:`prefill_groups`): each group runs over its own longest
  prompt's columns only, so one 800-token prompt does not make every row of its batch 800 columns wide
  (HH-RLHF prompts at batch 32 on 2 Xeon cores with AMX: the longest batch's prefill 16.5 -> 6.5 s); a group without
  padding takes SDPA's causal path with no mask, the others one additive mask built once per forward.
* **Rotary cos/sin computed once** for every position of the batch, the sin table's first half negated so
  the rotation is ``x * cos + roll(x) * signed_sin`` (``rotate_half``'s products and sums, three ops fewer).
* **A decode step in two dimensions** (:meth:`LeanDecoder.step`): (B, D) inputs to every product (oneDNN's 2-D
  path is faster than its 3-D one at these shapes), the new key and value written into the cache by index.
* **Grouped-query attention without repeating K/V**: the query heads sharing a KV head are folded into
  the query-length axis of one SDPA call.
* ``torch.rms_norm``; the LM head on the last position only.
* **Fused step kernels** on a CPU computing in bf16 (:mod:`preftune.model.decode_kernels`, C++ built on first
  use): per layer the residual add and RMS norm, the rotary embedding with the cache write and attention, and
  ``silu(gate) * up`` are one call each between the four products, seven calls where the ATen step makes
  about twenty-five (SmolLM2-135M at batch 16, 2 Xeon cores with AMX: 33-37 ms a step instead of 52-54).
  The ATen step remains for float32, other head sizes, and machines where the kernels cannot be built.

The residual stream keeps the dtype of the model's weights (as the Hugging Face forward under autocast
does); the linears, the cache and attention run in the compute dtype. Rows are left padded: a row's
positions are counted from its first real token, and no query attends to a padding key (a padding query
attends to itself only, so no row of the softmax is empty).

``torch.compile`` of the per-step forward (inductor on the CPU) was measured and is not used: with plain
weights it failed to lower the prepacked oneDNN linear; with inductor's own freezing (weights as constants,
prepacked by inductor) and dynamic shapes, SmolLM2-135M's step took 265 s to compile, recompiled as the cache
grew until dynamo's recompile limit, and ran 65 ms a step against the eager step's 48 on the same 2 cores --
longer to compile than the whole decoding of a typical sampling job (well under a minute eager).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as nn_functional

from preftune.model import decode_kernels
from preftune.model.packed_linear import packing_works

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
# the same bodies under a one-logit score head (reward models): :meth:`LeanDecoder.extend` scores with them
SCORING = ("LlamaForSequenceClassification", "Qwen2ForSequenceClassification", "MistralForSequenceClassification")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _rope_type(config) -> str:
    """The rope scaling's type (``default`` when there is none)."""
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict) and params:
            return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def sliding_window(config) -> int | None:
    """The attention window of the config's sliding layers, None when no layer slides."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def _layer_reason(model) -> str | None:
    """Why the decoder layers cannot be read (a projection that is not a plain ``nn.Linear``), or None."""
    for index, layer in enumerate(model.model.layers):
        for name in PROJECTIONS:
            module = layer.get_submodule(name)
            if type(module) is not nn.Linear:
                return f"layer {index} {name} is a {type(module).__name__}, not nn.Linear (adapter or packed)"
    return None


def unsupported_reason(model, max_length: int = 0) -> str | None:
    """Why :func:`lean_decoder` falls back to the Hugging Face forward for this model (None: it does not).

    ``max_length``: the longest sequence (padded prompt + new tokens) a batch may reach; a sliding
    window shorter than that is not reproduced, so such a model falls back."""
    name = type(model).__name__
    if name not in SUPPORTED + SCORING:
        return f"{name} is not one of {', '.join(SUPPORTED + SCORING)}"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if _rope_type(config) != "default":
        return f"rope scaling {_rope_type(config)!r} is not the default rope"
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        return "partial rotary embedding"
    window = sliding_window(config)
    if window is not None and max_length > window:
        return f"sequences up to {max_length} tokens exceed the sliding window of {window}"
    for module in model.modules():
        if hasattr(module, "_hf_hook"):
            return "the model is dispatched with accelerate hooks (offloaded or sharded)"
    if any(type(p) is not nn.Parameter or p.device.type == "meta" for p in model.parameters()):
        return "parameters are not plain tensors (meta, sharded or wrapped)"
    return _layer_reason(model)


class FusedLinear:
    """Several ``nn.Linear`` layers that read the same input, as one product: (..., in) -> tuple of
    (..., out_i) in the compute dtype, one per layer (or one per entry of ``split``, sizes summing to the
    layers' outputs).

    When the compute dtype is not the weights' (or the weights are prepacked for oneDNN), the weights
    are fused into one matrix in the compute dtype (the copy that dtype needs anyway); otherwise the
    layers' own tensors are multiplied one by one (no fused fp32 copy)."""

    def __init__(self, linears: list[nn.Linear], dtype: torch.dtype, pack: bool, batch_hint: int,
                 split: list[int] | None = None):
        self.dtype, self.pack = dtype, pack
        self.sizes = split or [linear.out_features for linear in linears]
        weights = [linear.weight.detach() for linear in linears]
        biases = [None if linear.bias is None else linear.bias.detach() for linear in linears]
        self.fused = pack or weights[0].dtype != dtype
        if not self.fused:
            self.parts = list(zip(weights, biases))
            return
        self.weight = torch.cat([w.to(dtype) for w in weights]) if len(weights) > 1 else weights[0].to(dtype)
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.to(dtype) if b is not None else w.new_zeros(w.shape[0], dtype=dtype)
                                   for w, b in zip(weights, biases)])
        if pack:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, max(1, batch_hint))

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The fused product unsplit: (..., in) -> (..., sum of the outputs); only for fused weights."""
        if self.pack:
            return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")
        return nn_functional.linear(x.to(self.dtype), self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.to(self.dtype)
        if not self.fused:
            outs = tuple(nn_functional.linear(x, w, b) for w, b in self.parts)
            return outs if len(outs) == len(self.sizes) else torch.cat(outs, dim=-1).split(self.sizes, dim=-1)
        out = self.whole(x)
        return out.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (out,)


class LeanLayer:
    """One decoder layer's tensors: norms (the model's own) and fused projections."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, pack: bool, batch_hint: int):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight.detach()
        self.post_norm = layer.post_attention_layernorm.weight.detach()
        q_k = attn.q_proj.out_features + attn.k_proj.out_features
        self.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj], dtype, pack, batch_hint,
                               split=[q_k, attn.v_proj.out_features])  # -> (queries and keys, values)
        self.out = FusedLinear([attn.o_proj], dtype, pack, batch_hint)
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj], dtype, pack, batch_hint)
        self.down = FusedLinear([mlp.down_proj], dtype, pack, batch_hint)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) normed hidden states -> (..., D): ``down(silu(gate(h)) * up(h))`` in the compute dtype."""
        gate, up = self.gate_up(h)
        return self.down(nn_functional.silu(gate) * up)[0]


PREFILL_WASTE = 1.25  # a prefill group computes at most this many padded cells per real prompt token


def prefill_groups(lengths: list[int], waste: float = PREFILL_WASTE) -> list[list[int]]:
    """Rows of a batch (prompt lengths ``lengths``) in groups for the prefill, longest first: a group takes
    the next rows by length while ``rows x its longest length <= waste x its real tokens`` (so its padding
    stays under ``waste - 1`` of its work). One group for prompts of similar length. Each group lists its
    rows in batch order (a group of every row is the batch itself)."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    groups: list[list[int]] = []
    real = 0
    for r in order:
        if groups and (len(groups[-1]) + 1) * max(lengths[groups[-1][0]], 1) <= waste * (real + lengths[r]):
            groups[-1].append(r)
            real += lengths[r]
        else:
            groups.append([r])
            real = lengths[r]
    return [sorted(group) for group in groups]


class LeanDecoder:
    """Prefill and decode steps of a supported model (:func:`unsupported_reason` is None for it).

    ``compute_dtype``: the dtype of the linears, the KV cache and attention (None: the weights' dtype).
    Use: :meth:`prefill` one left-padded batch, then :meth:`step` once per new token, :meth:`keep_rows`
    to drop finished rows from the cache. Call under ``torch.no_grad()``; autocast is switched off inside
    (the dtypes are set here)."""

    def __init__(self, model, compute_dtype: torch.dtype | None = None, batch_hint: int = 16):
        config = model.config
        self.embed = model.model.embed_tokens.weight.detach()  # (V, D): the residual stream's dtype
        self.device = self.embed.device
        self.dtype = compute_dtype or self.embed.dtype
        pack = self.device.type == "cpu" and self.dtype == torch.bfloat16 and packing_works()
        self.layers = [LeanLayer(layer, self.dtype, pack, batch_hint) for layer in model.model.layers]
        self.final_norm = model.model.norm.weight.detach()
        # the output head: the LM head, or a reward model's score head (one logit per position)
        head = model.lm_head if hasattr(model, "lm_head") else model.score
        self.head = FusedLinear([head], self.dtype, pack, batch_hint)
        self.eps = float(config.rms_norm_eps)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.inv_freq = 1.0 / (_rope_theta(config) ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(self.device, torch.float) / self.head_dim))
        self.k_cache = self.v_cache = None
        # the fused step kernels (decode_kernels): a bf16 step on the CPU, checked last (builds on first use)
        self.kernels = (pack and self.embed.dtype in (torch.bfloat16, torch.float32)
                        and decode_kernels.supports(self.heads, self.kv_heads, self.head_dim)
                        and decode_kernels.available())

    def _rotary_table(self, length: int) -> None:
        """cos and sin of every position below ``length``: (length, head_dim) each, computed in float32 and
        kept in the compute dtype (the Hugging Face forward casts them to its activations' dtype); the sin
        table's first half negated (:meth:`_rotate`)."""
        positions = torch.arange(length, device=self.device, dtype=torch.float)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # sin with its first half negated: rotate_half(x) * sin == roll(x, half) * signed_sin, bit for bit
        sin = emb.sin()
        sin[:, : self.head_dim // 2].neg_()
        self.cos, self.signed_sin = emb.cos().to(self.dtype), sin.to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding: (..., heads, hd) by (..., 1, hd) cos / signed sin -> (..., heads, hd), in their dtype.

        The Hugging Face ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``: the same
        products and sums, the sign carried by the sin table and the halves swapped by one ``roll``."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin

    def _attention(self, index: int, layer: LeanLayer, h: torch.Tensor, cos, sin, mask, start: int,
                   rows: torch.Tensor | None) -> torch.Tensor:
        """Self-attention of (B, T, D) normed hidden states written at cache columns ``start..start+T`` of the
        cache rows ``rows`` (None: every row) -> (B, T, heads x hd) before o_proj. ``mask``: None (a prefill
        without padding: causal), or additive (0 / -inf) in the compute dtype, (B, 1, T, start + T), its query
        axis already repeated for the query heads sharing a KV head when T > 1 (:meth:`_body`)."""
        batch, length, _ = h.shape
        q_k, v = layer.qkv(h)
        # one rotation for the query and key heads together: (B, T, H + KV, hd)
        q_k = self._rotate(q_k.view(batch, length, self.heads + self.kv_heads, self.head_dim), cos, sin)
        q, k = q_k.transpose(1, 2).split((self.heads, self.kv_heads), dim=1)  # (B, H, T, hd), (B, KV, T, hd)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        end = start + length
        which = slice(None) if rows is None else rows  # the cache rows written
        self.k_cache[index, which, :, start:end] = k
        self.v_cache[index, which, :, start:end] = v
        groups = self.heads // self.kv_heads
        if start == 0 or rows is not None:  # a prefill: its keys are the ones just computed
            keys, values = k, v
        else:
            keys, values = self.k_cache[index, :, :, :end], self.v_cache[index, :, :, :end]
        if mask is None:  # causal without padding: SDPA's own causal path, K/V repeated per query head
            out = nn_functional.scaled_dot_product_attention(
                q, keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1), is_causal=True)
        else:
            # heads kv*groups .. kv*groups + groups - 1 share KV head kv: fold them into the query axis
            q = q.reshape(batch, self.kv_heads, groups * length, self.head_dim)
            out = nn_functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.reshape(batch, self.heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, start: int,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids at (B, T) positions, written at cache columns from ``start`` of cache rows ``rows``
        (None: all) -> (B, V) float32 logits of the last column. ``mask``: see :meth:`_attention` (its
        query axis is repeated here, once for every layer)."""
        return self._logits(self._body(ids, positions, mask, start, rows)[:, -1])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) last hidden states -> (B, V) float32 outputs of the head, after the final norm."""
        return self.head(torch.rms_norm(x, (self.hidden,), self.final_norm, self.eps))[0].float()

    def _body(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, start: int,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`_forward` up to the last decoder layer: (B, T, D) hidden states (the residual stream's dtype)."""
        cos, sin = self.cos[positions].unsqueeze(2), self.signed_sin[positions].unsqueeze(2)  # (B, T, 1, hd)
        groups, length = self.heads // self.kv_heads, ids.shape[1]
        if mask is not None and groups > 1 and length > 1:
            mask = mask.repeat(1, 1, groups, 1)  # (B, 1, groups * T, keys): the folded query axis
        x = nn_functional.embedding(ids, self.embed)  # (B, T, D)
        shape = (self.hidden,)
        for index, layer in enumerate(self.layers):
            h = torch.rms_norm(x, shape, layer.input_norm, self.eps)
            x = x + layer.out(self._attention(index, layer, h, cos, sin, mask, start, rows))[0]
            h = torch.rms_norm(x, shape, layer.post_norm, self.eps)
            x = x + layer.mlp(h)
        return x

    def _step_body(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`_body` of one new token per row, written at cache column :attr:`filled`, in two dimensions:
        (B,) ids -> (B, D) hidden states. The products see (B, D) inputs (oneDNN's faster 2-D path), the new
        key and value go to the cache by index, and each row's query heads attend over the filled columns
        with ``mask`` (B, 1, 1, filled + 1)."""
        batch, start = tokens.shape[0], self.filled
        end, groups = start + 1, self.heads // self.kv_heads
        positions = self.next_position.view(-1)
        cos, sin = self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)  # (B, 1, hd)
        x = nn_functional.embedding(tokens, self.embed)  # (B, D)
        shape = (self.hidden,)
        for index, layer in enumerate(self.layers):
            h = torch.rms_norm(x, shape, layer.input_norm, self.eps)
            q_k, v = layer.qkv(h)
            q_k = self._rotate(q_k.view(batch, self.heads + self.kv_heads, self.head_dim), cos, sin)
            q, k = q_k.split((self.heads, self.kv_heads), dim=1)  # (B, H, hd), (B, KV, hd)
            self.k_cache[index, :, :, start] = k
            self.v_cache[index, :, :, start] = v.view(batch, self.kv_heads, self.head_dim)
            # the query heads sharing a KV head as that head's query rows: (B, KV, groups, hd)
            out = nn_functional.scaled_dot_product_attention(
                q.reshape(batch, self.kv_heads, groups, self.head_dim),
                self.k_cache[index, :, :, :end], self.v_cache[index, :, :, :end], attn_mask=mask)
            x = x + layer.out(out.reshape(batch, -1))[0]
            h = torch.rms_norm(x, shape, layer.post_norm, self.eps)
            x = x + layer.mlp(h)
        return x

    def _fused_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`_step_body` and :meth:`_logits` through the fused kernels (:mod:`preftune.model.decode_kernels`):
        (B,) ids -> (B, V) float32 logits. Per layer: the residual add and RMS norm in one call, the products,
        the rotary embedding, cache write and attention in one call, ``silu(gate) * up`` in one call -- seven
        calls where the ATen step makes about twenty-five. The Hugging Face bf16 forward's rounding (the norm,
        rotation and activation bit-equal; attention in float32 throughout, where SDPA rounds its
        probabilities to bf16 before the values)."""
        kernels, start = torch.ops.preftune_decode, self.filled
        positions = self.next_position.view(-1)
        cos, sin = self.cos[positions], self.signed_sin[positions]  # (B, hd)
        x = nn_functional.embedding(tokens, self.embed)  # (B, D): the residual stream, updated in place
        scale = self.head_dim ** -0.5
        pending = None  # the last product not yet added to the residual stream
        for index, layer in enumerate(self.layers):
            h = kernels.add_rms_norm(x, pending, layer.input_norm, self.eps)
            attended = kernels.decode_attention(layer.qkv.whole(h), cos, sin, self.k_cache[index],
                                                self.v_cache[index], self.valid, start, self.heads,
                                                self.kv_heads, scale)
            h = kernels.add_rms_norm(x, layer.out.whole(attended), layer.post_norm, self.eps)
            pending = layer.down.whole(kernels.silu_mul(layer.gate_up.whole(h)))
        return self.head.whole(kernels.add_rms_norm(x, pending, self.final_norm, self.eps)).float()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Left-padded (B, P) prompts and their (B, P) 0/1 mask -> (B, V) float32 logits of the next token.

        Allocates the cache for ``P + max_new_tokens`` columns (the last generated token is never fed).
        Rows are run in groups of similar length (:func:`prefill_groups`), each group only over its own
        longest prompt's columns (the last ones: rows are left padded), so a batch mixing an 800-token
        prompt with 300-token ones does not compute 800 columns for every row; a group without padding
        takes SDPA's causal path with no mask."""
        batch, width = input_ids.shape
        total = width + max_new_tokens
        self._rotary_table(total)
        shape = (len(self.layers), batch, self.kv_heads, total, self.head_dim)
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.valid = torch.ones(batch, total, dtype=torch.bool, device=self.device)  # (B, total) real keys
        self.valid[:, :width] = attention_mask.bool()
        self.next_position = attention_mask.sum(-1, keepdim=True)  # (B, 1)
        self.filled = width
        positions = (attention_mask.cumsum(-1) - 1).clamp_(min=0)  # (B, P)
        logits = torch.empty(batch, self.head.sizes[0], dtype=torch.float, device=self.device)
        lengths = self.next_position.squeeze(-1).tolist()
        with torch.autocast(self.device.type, enabled=False):
            for group in prefill_groups(lengths):
                rows = torch.tensor(group, device=self.device)
                start = width - max(max(lengths[r] for r in group), 1)
                if start:  # columns left of the group's span: padding, never attended, but finite (0 x -inf)
                    self.k_cache[:, rows, :, :start] = 0
                    self.v_cache[:, rows, :, :start] = 0
                valid = self.valid[rows, start:width]  # (b, w)
                mask = None
                if not bool(valid.all()):
                    w = width - start
                    causal = torch.ones(w, w, dtype=torch.bool, device=self.device).tril()
                    allowed = (causal & valid[:, None, :]) | torch.eye(w, dtype=torch.bool, device=self.device)
                    mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
                    mask = mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)  # (b, 1, w, w) additive
                logits[rows] = self._forward(input_ids[rows, start:], positions[rows, start:], mask, start,
                                             None if len(group) == batch else rows)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the tokens just chosen, one per remaining row -> (B, V) float32 logits of the next ones."""
        with torch.autocast(self.device.type, enabled=False):
            if self.kernels:
                logits = self._fused_step(tokens.view(-1))
            else:
                # (B, 1, 1, filled + 1) additive mask, built once for every layer (SDPA would convert a bool
                # mask per call)
                mask = torch.zeros(self.valid.shape[0], 1, 1, self.filled + 1, dtype=self.dtype, device=self.device)
                mask.masked_fill_(~self.valid[:, None, None, :self.filled + 1], float("-inf"))
                logits = self._logits(self._step_body(tokens.view(-1), mask))
        self.filled += 1
        self.next_position = self.next_position + 1
        return logits

    def extend(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, prompt_valid: torch.Tensor,
               prompt_lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Run (B, T) token ids after prompts whose states are given, -> (B, T, D) final-normed hidden states
        (the residual stream's dtype; :attr:`head` maps them to logits).

        ``prompt_keys``/``prompt_values``: (layers, B, kv-heads, P, head-dim) the prompts' cache columns, left
        padded to P (:class:`preftune.evaluation.prompt_states.PromptStates`); ``prompt_valid`` (B, P) bool: the
        real ones; ``prompt_lengths`` (B,): each row's prompt length (its first new position). ``ids`` may be right
        padded: a padding column attends like a real one and its output means nothing (the caller reads the
        real columns only). The same arithmetic as a prefill of prompt + tokens in one piece."""
        batch, width = ids.shape
        prompt = prompt_keys.shape[3]
        total = prompt + width
        self._rotary_table(int(prompt_lengths.max()) + width)
        shape = (len(self.layers), batch, self.kv_heads, total, self.head_dim)
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.k_cache[:, :, :, :prompt] = prompt_keys
        self.v_cache[:, :, :, :prompt] = prompt_values
        new = torch.arange(width, device=self.device)
        causal = new[None, :] <= new[:, None]  # (T, T): query r sees new keys up to r
        allowed = torch.cat([prompt_valid[:, None, :].expand(batch, width, prompt),
                             causal[None].expand(batch, width, width)], dim=-1)  # (B, T, P + T)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)  # (B, 1, T, P + T)
        positions = prompt_lengths.to(self.device)[:, None] + new[None, :]  # (B, T)
        with torch.autocast(self.device.type, enabled=False):
            x = self._body(ids.to(self.device), positions, mask, prompt)
            out = torch.rms_norm(x, (self.hidden,), self.final_norm, self.eps)
        self.release()
        return out

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ((b,) long, on the decoder's device) in the cache; the filled
        columns are copied into a smaller cache."""
        end = self.filled
        shape = list(self.k_cache.shape)
        shape[1] = rows.numel()
        for name in ("k_cache", "v_cache"):
            old = getattr(self, name)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, :end] = old[:, rows, :, :end]
            setattr(self, name, new)
        self.valid, self.next_position = self.valid[rows], self.next_position[rows]

    def release(self) -> None:
        """Free the KV cache (a kept decoder holds only its weights between sampling jobs)."""
        self.k_cache = self.v_cache = None


# model -> (weights state, dtype, batch hint) and its decoder: sampling called again on the same weights (a
# recipe sampling in chunks, an evaluation after another) reuses the fused / prepacked copies (~1-3 s to
# build for a 135M model on 2 CPU cores) instead of building them per call
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, LeanDecoder]]" = weakref.WeakKeyDictionary()


def weights_state(model) -> tuple:
    """Where every parameter lives and its in-place version counter: changes when training (an optimizer's
    in-place update), ``load_state_dict`` or a swapped tensor changes any weight."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


def lean_decoder(model, compute_dtype: torch.dtype | None = None, batch_hint: int = 16,
                 max_length: int = 0) -> LeanDecoder | None:
    """A :class:`LeanDecoder` of ``model``, or None where :func:`unsupported_reason` gives a reason. The
    decoder is kept for the next call on the same model with the same weights, dtype and batch hint (and
    the same ``PREFTUNE_DECODE_KERNELS`` choice)."""
    if unsupported_reason(model, max_length) is not None:
        return None
    key = (weights_state(model), compute_dtype, batch_hint, decode_kernels.wanted())
    kept = _DECODERS.get(model)
    if kept is not None and kept[0] == key:
        return kept[1]
    decoder = LeanDecoder(model, compute_dtype, batch_hint)
    _DECODERS[model] = (key, decoder)
    return decoder
