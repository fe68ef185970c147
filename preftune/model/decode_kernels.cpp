// Fused CPU kernels of one decode step (one new token per row), bf16 compute: the pointwise work and the
// attention between a layer's products. Each replaces several small ATen calls whose per-call cost, not
// their arithmetic, dominates a step at a few rows (see fast_decode.py). The rounding follows the Hugging
// Face Llama forward in bf16: every op's float result rounded to bf16 where that forward rounds it.
// Built on first use by torch.utils.cpp_extension (decode_kernels.py); registered as torch.ops.preftune_decode.*

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::BFloat16;
using fvec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fvec::size();

inline float bf16_round(float x) { return static_cast<float>(static_cast<BFloat16>(x)); }

using bvec = at::vec::Vectorized<BFloat16>;
constexpr int64_t kPair = bvec::size();  // bf16 lanes of one vector: two float vectors

template <typename T>
inline void load_floats(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// kPair bf16 values -> two float vectors, and back (round to nearest even)
inline void load_pair(const BFloat16* src, fvec& lo, fvec& hi) {
  std::tie(lo, hi) = at::vec::convert_to_float<BFloat16>(bvec::loadu(src));
}
inline void store_pair(BFloat16* dst, const fvec& lo, const fvec& hi) {
  at::vec::convert_from_float<BFloat16>(lo, hi).store(dst);
}
inline void round_pair(fvec& lo, fvec& hi) {
  std::tie(lo, hi) = at::vec::convert_to_float<BFloat16>(at::vec::convert_from_float<BFloat16>(lo, hi));
}
inline float sum_lanes(const fvec& v) {
  return at::vec::vec_reduce_all<float>([](fvec& a, fvec& b) { return a + b; }, v);
}

// kPair values of a row (bf16 or float) as two float vectors, and back
inline void load_row(const BFloat16* src, fvec& lo, fvec& hi) { load_pair(src, lo, hi); }
inline void load_row(const float* src, fvec& lo, fvec& hi) {
  lo = fvec::loadu(src);
  hi = fvec::loadu(src + kLanes);
}
inline void store_row(BFloat16* dst, const fvec& lo, const fvec& hi) { store_pair(dst, lo, hi); }
inline void store_row(float* dst, const fvec& lo, const fvec& hi) {
  lo.store(dst);
  hi.store(dst + kLanes);
}

// Residual add then RMS norm of each row: x += y (x's dtype; skipped when y is undefined), then
// h = bf16(w * norm(x)): for a bf16 residual stream norm(x) is rounded to bf16 before the weight (the
// Hugging Face RMSNorm casts back to the input dtype first); for a float32 one it is not.
template <typename T>
void add_rms_norm_rows(T* x, const BFloat16* y, const T* w, BFloat16* h, int64_t rows, int64_t dim, double eps) {
  constexpr bool reduced = std::is_same_v<T, BFloat16>;
  const int64_t whole = dim - dim % kPair;  // the part done in vectors; the rest one by one
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * dim;
      const BFloat16* yr = y == nullptr ? nullptr : y + r * dim;
      fvec squares(0.f);
      float tail = 0.f;
      for (int64_t i = 0; i < whole; i += kPair) {
        fvec lo, hi;
        load_row(xr + i, lo, hi);
        if (yr != nullptr) {
          fvec ylo, yhi;
          load_pair(yr + i, ylo, yhi);
          lo = lo + ylo;
          hi = hi + yhi;
          if constexpr (reduced) round_pair(lo, hi);
          store_row(xr + i, lo, hi);
        }
        squares = at::vec::fmadd(lo, lo, squares);
        squares = at::vec::fmadd(hi, hi, squares);
      }
      for (int64_t i = whole; i < dim; ++i) {
        if (yr != nullptr) xr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(yr[i]));
        const float v = static_cast<float>(xr[i]);
        tail += v * v;
      }
      const float sum = sum_lanes(squares) + tail;
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
      BFloat16* hr = h + r * dim;
      const fvec scale(inv);
      for (int64_t i = 0; i < whole; i += kPair) {
        fvec lo, hi, wlo, whi;
        load_row(xr + i, lo, hi);
        load_row(w + i, wlo, whi);
        lo = lo * scale;
        hi = hi * scale;
        if constexpr (reduced) round_pair(lo, hi);  // the norm in the stream's dtype, then the weight
        store_pair(hr + i, wlo * lo, whi * hi);
      }
      for (int64_t i = whole; i < dim; ++i) {
        float normed = static_cast<float>(xr[i]) * inv;
        if constexpr (reduced) normed = bf16_round(normed);
        hr[i] = static_cast<BFloat16>(static_cast<float>(w[i]) * normed);
      }
    }
  });
}

at::Tensor add_rms_norm(at::Tensor x, const std::optional<at::Tensor>& y, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "add_rms_norm: x must be a contiguous (rows, dim) tensor");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous(), "add_rms_norm: weight dtype");
  const int64_t rows = x.size(0), dim = x.size(1);
  const BFloat16* yp = nullptr;
  if (y.has_value() && y->defined()) {
    TORCH_CHECK(y->scalar_type() == at::kBFloat16 && y->is_contiguous() && y->sizes() == x.sizes(),
                "add_rms_norm: y must be a contiguous bf16 tensor shaped like x");
    yp = y->data_ptr<BFloat16>();
  }
  at::Tensor h = at::empty({rows, dim}, x.options().dtype(at::kBFloat16));
  if (x.scalar_type() == at::kBFloat16) {
    add_rms_norm_rows<BFloat16>(x.data_ptr<BFloat16>(), yp, weight.data_ptr<BFloat16>(), h.data_ptr<BFloat16>(),
                                rows, dim, eps);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "add_rms_norm: x must be bf16 or float32");
    add_rms_norm_rows<float>(x.data_ptr<float>(), yp, weight.data_ptr<float>(), h.data_ptr<BFloat16>(), rows, dim,
                             eps);
  }
  return h;
}

// silu(gate) * up of (rows, 2F) gate/up products -> (rows, F): silu rounded to bf16, then the product.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.scalar_type() == at::kBFloat16,
              "silu_mul: a contiguous bf16 (rows, 2F) tensor");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const BFloat16* in = gate_up.data_ptr<BFloat16>();
  BFloat16* o = out.data_ptr<BFloat16>();
  const int64_t chunks = (width + kPair - 1) / kPair;
  at::parallel_for(0, rows * chunks, 8, [&](int64_t begin, int64_t end) {
    float buffer[2 * kPair];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks, first = (item % chunks) * kPair;
      const BFloat16* gate = in + r * 2 * width + first;
      const BFloat16* up = gate + width;
      BFloat16* dst = o + r * width + first;
      if (first + kPair <= width) {
        fvec g0, g1, u0, u1;
        load_pair(gate, g0, g1);
        load_pair(up, u0, u1);
        fvec s0 = g0 / (fvec(1.f) + g0.neg().exp_u20()), s1 = g1 / (fvec(1.f) + g1.neg().exp_u20());
        round_pair(s0, s1);  // silu's bf16 result
        store_pair(dst, s0 * u0, s1 * u1);
      } else {  // the row's last, partial chunk
        const int64_t n = width - first;
        load_floats(gate, buffer, n);
        load_floats(up, buffer + kPair, n);
        for (int64_t k = 0; k < n; ++k) {
          const float g = buffer[k];
          const float silu = bf16_round(g / (1.f + std::exp(-g)));
          dst[k] = static_cast<BFloat16>(silu * buffer[kPair + k]);
        }
      }
    }
  });
  return out;
}

// Rotary embedding of one head of hd values (hd a multiple of 2 kPair) with the cos and sign-carrying sin
// tables (fast_decode.py's _rotate): bf16(bf16(x * cos) + bf16(roll(x, hd/2) * signed_sin)), as float
// vectors (hd / kLanes of them) in `out`.
inline void rotate_head(const BFloat16* x, const BFloat16* cos, const BFloat16* ssin, int64_t hd, fvec* out) {
  const int64_t vectors = hd / kLanes, shift = vectors / 2;
  fvec xs[32];
  for (int64_t j = 0; j < vectors; j += 2) load_pair(x + j * kLanes, xs[j], xs[j + 1]);
  for (int64_t j = 0; j < vectors; j += 2) {
    fvec c0, c1, s0, s1;
    load_pair(cos + j * kLanes, c0, c1);
    load_pair(ssin + j * kLanes, s0, s1);
    fvec a0 = xs[j] * c0, a1 = xs[j + 1] * c1;
    fvec b0 = xs[(j + shift) % vectors] * s0, b1 = xs[(j + 1 + shift) % vectors] * s1;
    round_pair(a0, a1);
    round_pair(b0, b1);
    fvec r0 = a0 + b0, r1 = a1 + b1;
    round_pair(r0, r1);
    out[j] = r0;
    out[j + 1] = r1;
  }
}

// The scores of one (row, KV head): `groups` query heads (scaled, `vectors` float vectors each) against every
// key row 0..keys-1 of the cache (masked ones -inf) -> scores (groups x keys). Called with compile-time
// groups/vectors (std::integral_constant) for the common shapes so the loops unroll into registers.
template <typename Groups, typename Vectors>
inline void score_keys(Groups groups, Vectors vectors, const fvec* q, const BFloat16* kbase, int64_t stride,
                       const bool* ok, int64_t keys, float* scores) {
  fvec key[32];
  for (int64_t l = 0; l < keys; ++l) {
    if (!ok[l]) {
      for (int64_t g = 0; g < groups; ++g) scores[g * keys + l] = -std::numeric_limits<float>::infinity();
      continue;
    }
#pragma GCC unroll 8
    for (int64_t j = 0; j < vectors; j += 2) load_pair(kbase + l * stride + j * kLanes, key[j], key[j + 1]);
#pragma GCC unroll 8
    for (int64_t g = 0; g < groups; ++g) {
      fvec dot = q[g * vectors] * key[0];
#pragma GCC unroll 8
      for (int64_t j = 1; j < vectors; ++j) dot = at::vec::fmadd(q[g * vectors + j], key[j], dot);
      scores[g * keys + l] = sum_lanes(dot);
    }
  }
}

// The value rows weighted by the probabilities p (groups x keys; masked keys skipped) -> acc (groups x
// vectors float vectors).
template <typename Groups, typename Vectors>
inline void weigh_values(Groups groups, Vectors vectors, const float* p, const BFloat16* vbase, int64_t stride,
                         const bool* ok, int64_t keys, fvec* acc) {
  // compile-time shapes: the sums live in a local array the compiler keeps in registers
  constexpr bool fixed = !std::is_integral_v<Groups>;
  fvec local[fixed ? 8 * 8 : 1];
  fvec* a = fixed ? local : acc;
  fvec value[32];
#pragma GCC unroll 64
  for (int64_t i = 0; i < groups * vectors; ++i) a[i] = fvec(0.f);
  for (int64_t l = 0; l < keys; ++l) {
    if (!ok[l]) continue;
#pragma GCC unroll 8
    for (int64_t j = 0; j < vectors; j += 2) load_pair(vbase + l * stride + j * kLanes, value[j], value[j + 1]);
#pragma GCC unroll 8
    for (int64_t g = 0; g < groups; ++g) {
      const fvec weight(p[g * keys + l]);
#pragma GCC unroll 8
      for (int64_t j = 0; j < vectors; ++j) a[g * vectors + j] = at::vec::fmadd(weight, value[j], a[g * vectors + j]);
    }
  }
  if constexpr (fixed) std::copy_n(local, groups * vectors, acc);
}

// f(groups, vectors) with compile-time values for the shapes of common models (up to 8 query heads per KV
// head; head size 4 or 8 float vectors: 64 or 128 with AVX-512), runtime values otherwise.
template <typename F>
inline void with_shape(int64_t groups, int64_t vectors, F&& f) {
  using std::integral_constant;
#define PREFTUNE_SHAPE(G, V) \
  if (groups == G && vectors == V) return f(integral_constant<int64_t, G>{}, integral_constant<int64_t, V>{});
  PREFTUNE_SHAPE(1, 4) PREFTUNE_SHAPE(2, 4) PREFTUNE_SHAPE(3, 4) PREFTUNE_SHAPE(4, 4)
  PREFTUNE_SHAPE(5, 4) PREFTUNE_SHAPE(6, 4) PREFTUNE_SHAPE(7, 4) PREFTUNE_SHAPE(8, 4)
  PREFTUNE_SHAPE(1, 8) PREFTUNE_SHAPE(2, 8) PREFTUNE_SHAPE(3, 8) PREFTUNE_SHAPE(4, 8)
  PREFTUNE_SHAPE(5, 8) PREFTUNE_SHAPE(6, 8) PREFTUNE_SHAPE(7, 8) PREFTUNE_SHAPE(8, 8)
#undef PREFTUNE_SHAPE
  f(groups, vectors);
}

// One decode step's attention for every row. qkv: (B, (H + 2 KV) hd) bf16, the fused q/k/v product (keys
// and queries not yet rotated); cos, ssin: (B, hd) bf16 rows of the rotary tables; k_cache, v_cache: one
// layer's (B, KV, T, hd) bf16 caches: the new key (rotated) and value are written at column `column`, then
// each row's query heads attend over the columns 0..column where valid (B, >= column + 1) is true.
// Returns (B, H hd) bf16: softmax(q k^T * scale) v with the scores, probabilities and sums in float32,
// rounded once at the end.
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& ssin, at::Tensor k_cache,
                            at::Tensor v_cache, const at::Tensor& valid, int64_t column, int64_t heads,
                            int64_t kv_heads, double scale) {
  const int64_t batch = qkv.size(0), hd = k_cache.size(3), total = k_cache.size(2);
  TORCH_CHECK(qkv.is_contiguous() && qkv.scalar_type() == at::kBFloat16 && qkv.size(1) == (heads + 2 * kv_heads) * hd,
              "decode_attention: qkv must be contiguous bf16 (B, (H + 2 KV) hd)");
  TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
                  k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_cache.size(0) == batch &&
                  k_cache.size(1) == kv_heads && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: caches must be bf16 (B, KV, T, hd) with contiguous heads");
  TORCH_CHECK(hd % (2 * kPair) == 0 && hd / kLanes <= 32, "decode_attention: head size must be a multiple of ",
              2 * kPair, " and at most ", 32 * kLanes);
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= 16, "decode_attention: at most 16 query heads per KV head");
  TORCH_CHECK(column >= 0 && column < total, "decode_attention: column outside the cache");
  TORCH_CHECK(cos.is_contiguous() && ssin.is_contiguous() && cos.scalar_type() == at::kBFloat16 &&
                  ssin.scalar_type() == at::kBFloat16 && cos.size(0) == batch && cos.size(1) == hd,
              "decode_attention: cos / sin must be contiguous bf16 (B, hd)");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.size(0) == batch && valid.size(1) > column &&
                  valid.stride(1) == 1,
              "decode_attention: valid must be bool (B, > column)");
  const int64_t groups = heads / kv_heads, keys = column + 1, width = qkv.size(1), vectors = hd / kLanes;
  at::Tensor out = at::empty({batch, heads * hd}, qkv.options());
  const BFloat16* q_all = qkv.data_ptr<BFloat16>();
  const BFloat16* cos_p = cos.data_ptr<BFloat16>();
  const BFloat16* sin_p = ssin.data_ptr<BFloat16>();
  const bool* valid_p = valid.data_ptr<bool>();
  BFloat16* kc = k_cache.data_ptr<BFloat16>();
  BFloat16* vc = v_cache.data_ptr<BFloat16>();
  BFloat16* o = out.data_ptr<BFloat16>();
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  const int64_t valid_stride = valid.stride(0);
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * keys);
    std::vector<fvec> q(groups * vectors), acc(groups * vectors);
    fvec key[32];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, kv = item % kv_heads;
      const BFloat16* row = q_all + b * width;
      const BFloat16* c = cos_p + b * hd;
      const BFloat16* s = sin_p + b * hd;
      // the new key, rotated, and the new value into the cache
      rotate_head(row + (heads + kv) * hd, c, s, hd, key);
      BFloat16* kdst = kc + b * ks0 + kv * ks1 + column * ks2;
      for (int64_t j = 0; j < vectors; j += 2) store_pair(kdst + j * kLanes, key[j], key[j + 1]);
      std::copy_n(row + (heads + kv_heads + kv) * hd, hd, vc + b * vs0 + kv * vs1 + column * vs2);
      // this KV head's query heads, rotated (bf16 values) and scaled
      for (int64_t g = 0; g < groups; ++g) {
        rotate_head(row + (kv * groups + g) * hd, c, s, hd, q.data() + g * vectors);
        for (int64_t j = 0; j < vectors; ++j) q[g * vectors + j] = q[g * vectors + j] * fvec(scale_f);
      }
      const bool* ok = valid_p + b * valid_stride;
      const BFloat16* kbase = kc + b * ks0 + kv * ks1;
      const BFloat16* vbase = vc + b * vs0 + kv * vs1;
      // scores: one key row converted once, dotted with every query head
      with_shape(groups, vectors, [&](auto G, auto V) {
        score_keys(G, V, q.data(), kbase, ks2, ok, keys, scores.data());
      });
      // softmax numerators in place (masked keys: exp(-inf) = 0) and their sums
      float totals[16];
      for (int64_t g = 0; g < groups; ++g) {
        float* sg = scores.data() + g * keys;
        fvec most(-std::numeric_limits<float>::infinity());
        int64_t at_key = 0;
        for (; at_key + kLanes <= keys; at_key += kLanes) most = at::vec::maximum(most, fvec::loadu(sg + at_key));
        float best = at::vec::vec_reduce_all<float>([](fvec& a, fvec& b) { return at::vec::maximum(a, b); }, most);
        for (; at_key < keys; ++at_key) best = std::max(best, sg[at_key]);
        fvec sum(0.f);
        for (int64_t l = 0; l < keys; l += kLanes) {  // the last vector may be partial: its other lanes stay 0
          const int64_t n = std::min(kLanes, keys - l);
          const fvec loaded = fvec::loadu(sg + l, n);
          fvec e = (loaded - fvec(best)).exp_u20();
          e = fvec::blendv(e, fvec(0.f), loaded == fvec(-std::numeric_limits<float>::infinity()));
          e = fvec::set(fvec(0.f), e, n);
          e.store(sg + l, n);
          sum = sum + e;
        }
        totals[g] = sum_lanes(sum);
      }
      // the values weighted by the probabilities
      with_shape(groups, vectors, [&](auto G, auto V) {
        weigh_values(G, V, scores.data(), vbase, vs2, ok, keys, acc.data());
      });
      for (int64_t g = 0; g < groups; ++g) {
        BFloat16* dst = o + b * heads * hd + (kv * groups + g) * hd;
        const fvec inv(1.f / totals[g]);
        const fvec* ag = acc.data() + g * vectors;
        for (int64_t j = 0; j < vectors; j += 2) store_pair(dst + j * kLanes, ag[j] * inv, ag[j + 1] * inv);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(preftune_decode, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? y, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor ssin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor valid, "
        "int column, int heads, int kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(preftune_decode, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attention", &decode_attention);
}
