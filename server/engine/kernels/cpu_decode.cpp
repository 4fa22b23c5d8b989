// CPU kernels for the compiled decode step (AVX-512), registered as torch ops `prefix_server::*`.
//
// Why these exist (measured on the 2-core AVX-512 VM the project is developed on, SmolLM2-135M; the
// figures are in README.md, "Performance: the compiled decode step"):
//  - linear (float32 and bfloat16 weights): MKL's float32 GEMM is poor at the few rows of a decode step.
//    A decode step reads every weight once, so the kernel streams each weight block once and multiplies
//    it into every row while it is in registers.
//  - write_kv: writing the new K/V into the slots in place (an indexed assignment traced by torch.compile
//    becomes a copy of the whole slot tensor per layer).
//  - decode_attention (float32): one query token per row over that row's own slot columns; grouped query
//    heads read their K/V head once (no repeat, no mask tensor).
//
// These ops write through raw pointers, so each one checks the shapes it relies on first.
//
// Shapes: x [M, K]; packed weights [N / 16, K, 16]; slots [layers, slots, kv_heads, capacity, head_dim].
//
// The AVX-512 code is compiled for that target only (a pragma, not a global -m flag): the library loads
// on any x86-64 CPU, and Python calls `linear` / `decode_attention` only where torch reports AVX-512.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;    // output features per packed block: one AVX-512 register of floats
constexpr int64_t kPrefetch = 8;  // k steps ahead: software prefetch on each weight stream

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

// 16 weights as float32: float32 as they are, bfloat16 widened (exact: a bfloat16 is a float32's top half).
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const at::BFloat16* w) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// out[m, (nb + j) * 16 : +16] = x[m, :] . w_block[nb + j] for M rows and NB consecutive blocks.
template <typename W, int M, int NB>
inline void tile(const float* x, int64_t K, const W* w, float* out, int64_t ldo, int64_t nb) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const W* wb = w + nb * K * kBlock;
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + (j * K + k + kPrefetch) * kBlock), _MM_HINT_T0);
      wv[j] = load16(wb + (j * K + k) * kBlock);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(xb, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(out + m * ldo + (nb + j) * kBlock, acc[m][j]);
}

// Blocks [nb0, nb1) for M <= 8 rows: as many blocks at a time as the 32 registers hold accumulators for.
template <typename W, int M>
void rows(const float* x, int64_t K, const W* w, float* out, int64_t ldo, int64_t nb0, int64_t nb1) {
  constexpr int NB = M <= 4 ? 4 : 2;
  int64_t nb = nb0;
  for (; nb + NB <= nb1; nb += NB) tile<W, M, NB>(x, K, w, out, ldo, nb);
  for (; nb < nb1; ++nb) tile<W, M, 1>(x, K, w, out, ldo, nb);
}

template <typename W>
using RowsFn = void (*)(const float*, int64_t, const W*, float*, int64_t, int64_t, int64_t);
template <typename W>
constexpr RowsFn<W> kRows[8] = {rows<W, 1>, rows<W, 2>, rows<W, 3>, rows<W, 4>,
                                rows<W, 5>, rows<W, 6>, rows<W, 7>, rows<W, 8>};
constexpr int64_t kRowTile = 8;  // rows per pass over a group of blocks
constexpr int64_t kGroup = 4;    // blocks per group: read from memory once, reused from cache by each row tile

inline float dot(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kBlock <= d; i += kBlock) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// e^x for 16 floats (Cephes' expf: a degree-6 polynomial after range reduction, ~1 ulp).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

// One row's query heads that share K/V head h attend to that head's first n columns.
// q: [groups, d]; k, v: [capacity, d] of the slot; out: [groups, d]; p: scratch of n floats.
void attend(const float* q, const float* k, const float* v, float* out, float* p, int64_t groups, int64_t n,
            int64_t d, float scale) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* qg = q + g * d;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, p[j] = dot(qg, k + j * d, d) * scale);
    __m512 sum16 = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += kBlock) {  // p = exp(p - max), 16 columns at a time
      const __mmask16 live = j + kBlock <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + j), _mm512_set1_ps(mx)));
      _mm512_mask_storeu_ps(p + j, live, e);
      sum16 = _mm512_add_ps(sum16, _mm512_maskz_mov_ps(live, e));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sum16);
    float* og = out + g * d;
    std::fill(og, og + d, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float w = p[j] * inv;
      const float* vj = v + j * d;
      for (int64_t i = 0; i < d; ++i) og[i] += w * vj[i];
    }
  }
}

#pragma GCC pop_options

// [N, K] -> [N / 16, K, 16]: each block of 16 output features contiguous over K.
at::Tensor pack_linear(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "pack_linear: expected a 2-D float32 or bfloat16 weight, got ", weight.scalar_type());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kBlock == 0, "pack_linear: output features must be a multiple of 16, got ", n);
  return weight.reshape({n / kBlock, kBlock, k}).transpose(1, 2).contiguous();
}

// The packed GEMM in float32: xp [M, K] float32, wp packed [N / 16, K, 16], op [M, N] float32.
template <typename W>
void gemm(const float* xp, const W* wp, float* op, int64_t m_total, int64_t k, int64_t blocks) {
  const int64_t n = blocks * kBlock;
  // Threads split the weight (each block is read from memory once, by one thread), every thread does all
  // rows: a group of blocks at a time, 8 rows at a time over it.
  at::parallel_for(0, blocks, kGroup, [&](int64_t b0, int64_t b1) {  // an even share of blocks per thread
    for (int64_t nb = b0; nb < b1; nb += kGroup) {
      const int64_t nb_end = std::min(nb + kGroup, b1);
      for (int64_t m0 = 0; m0 < m_total; m0 += kRowTile) {
        const int64_t rows_here = std::min(kRowTile, m_total - m0);
        kRows<W>[rows_here - 1](xp + m0 * k, k, wp, op + m0 * n, n, nb, nb_end);
      }
    }
  });
}

// x [..., K] @ weight.T (+ bias) with the weight packed by pack_linear -> [..., N], in x's dtype. The
// products accumulate in float32; bfloat16 (weights and input) rounds once, at the end, as oneDNN does.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlock && packed.is_contiguous(),
              "linear: expected a weight packed by pack_linear [N / 16, K, 16], got ", packed.sizes());
  const int64_t k = packed.size(1), blocks = packed.size(0), n = blocks * kBlock;
  const auto dtype = packed.scalar_type();
  TORCH_CHECK(x.scalar_type() == dtype && x.size(-1) == k, "linear: expected ", dtype, " input [..., ", k, "], got ",
              x.scalar_type(), " ", x.sizes());
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();  // [M, K]
  const int64_t m_total = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty({m_total, n}, x2.options());  // [M, N] float32
  if (dtype == at::kBFloat16)
    gemm(x2.data_ptr<float>(), packed.data_ptr<at::BFloat16>(), out.data_ptr<float>(), m_total, k, blocks);
  else
    gemm(x2.data_ptr<float>(), packed.data_ptr<float>(), out.data_ptr<float>(), m_total, k, blocks);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "linear: expected a bias [", n, "], got ", bias->sizes());
    out.add_(*bias);
  }
  return out.to(dtype).view(out_shape);
}

// Rows [0, b) of `layer` in slots [layers, slots, kv_heads, capacity, head_dim], with `per_row` [b] and
// `x` [b, heads, head_dim] (heads: kv_heads, or a multiple of it for the queries).
void check_rows(const char* op, const at::Tensor& slots, const at::Tensor& values, int64_t layer,
                const at::Tensor& per_row, const at::Tensor& x) {
  TORCH_CHECK(slots.dim() == 5 && values.sizes() == slots.sizes(), op, ": expected keys and values of one shape "
              "[layers, slots, kv_heads, capacity, head_dim], got ", slots.sizes(), " and ", values.sizes());
  TORCH_CHECK(0 <= layer && layer < slots.size(0), op, ": layer ", layer, " of ", slots.size(0));
  TORCH_CHECK(x.dim() == 3 && x.size(0) <= slots.size(1) && x.size(1) % slots.size(2) == 0 &&
              x.size(2) == slots.size(4), op, ": rows ", x.sizes(), " do not fit slots ", slots.sizes());
  TORCH_CHECK(per_row.dim() == 1 && per_row.size(0) == x.size(0), op, ": expected one column per row, got ",
              per_row.sizes(), " for ", x.size(0), " rows");
}

// Row r's new key/value into slot r at column columns[r] of `layer`, in place. k, v: [b, kv_heads, head_dim].
void write_kv(at::Tensor keys, at::Tensor values, int64_t layer, const at::Tensor& columns, const at::Tensor& k,
              const at::Tensor& v) {
  if (!keys.device().is_cpu()) {  // elsewhere: torch's indexed copy
    using at::indexing::Slice;
    const at::Tensor rows = at::arange(k.size(0), columns.options());
    keys.select(0, layer).index_put_({rows, Slice(), columns}, k);
    values.select(0, layer).index_put_({rows, Slice(), columns}, v);
    return;
  }
  check_rows("write_kv", keys, values, layer, columns, k);
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(1) == keys.size(2), "write_kv: expected k and v [b, ",
              keys.size(2), ", ", keys.size(4), "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "write_kv: slots must be contiguous");
  TORCH_CHECK(k.scalar_type() == keys.scalar_type() && v.scalar_type() == keys.scalar_type(), "write_kv: dtype");
  const at::Tensor kc = k.contiguous(), vc = v.contiguous(), cols = columns.to(at::kLong).contiguous();
  const int64_t b = kc.size(0), kv_heads = kc.size(1), d = kc.size(2), capacity = keys.size(3);
  const int64_t item = keys.element_size(), row_bytes = d * item;
  const int64_t* cp = cols.data_ptr<int64_t>();
  for (auto [slots, src] : {std::pair{&keys, &kc}, std::pair{&values, &vc}}) {
    char* base = static_cast<char*>(slots->data_ptr()) + layer * slots->stride(0) * item;
    const char* from = static_cast<const char*>(src->data_ptr());
    for (int64_t r = 0; r < b; ++r) {
      TORCH_CHECK(cp[r] >= 0 && cp[r] < capacity, "write_kv: column ", cp[r], " outside the slot");
      for (int64_t h = 0; h < kv_heads; ++h)
        std::memcpy(base + (r * slots->stride(1) + h * slots->stride(2) + cp[r] * d) * item,
                    from + (r * kv_heads + h) * row_bytes, row_bytes);
    }
  }
}

// q [b, heads, head_dim] attends to columns [0, lengths[r]) of slot r of `layer` -> [b, heads, head_dim].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t layer,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat, "decode_attention: float32 only");
  check_rows("decode_attention", keys, values, layer, lengths, q);
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "decode_attention: slots must be contiguous");
  const at::Tensor qc = q.contiguous();
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  for (int64_t r = 0; r < len.size(0); ++r) {
    const int64_t n = len.data_ptr<int64_t>()[r];
    TORCH_CHECK(1 <= n && n <= keys.size(3), "decode_attention: row ", r, " sees ", n, " columns, the slot has ",
                keys.size(3));
  }
  const int64_t b = qc.size(0), heads = qc.size(1), d = qc.size(2);
  const int64_t kv_heads = keys.size(2), groups = heads / kv_heads;
  const int64_t slot_stride = keys.stride(1), head_stride = keys.stride(2);
  const float* kbase = keys.data_ptr<float>() + layer * keys.stride(0);
  const float* vbase = values.data_ptr<float>() + layer * values.stride(0);
  const float* qp = qc.data_ptr<float>();
  const int64_t* lp = len.data_ptr<int64_t>();
  at::Tensor out = at::empty_like(qc);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, b * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / kv_heads, h = t % kv_heads, n = lp[r];
      p.resize(n);
      const int64_t offset = (r * heads + h * groups) * d;
      attend(qp + offset, kbase + r * slot_stride + h * head_stride, vbase + r * slot_stride + h * head_stride,
             op + offset, p.data(), groups, n, d, static_cast<float>(scale));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(prefix_server, m) {
  m.def("pack_linear(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
  m.def("write_kv(Tensor(a!) keys, Tensor(b!) values, int layer, Tensor columns, Tensor k, Tensor v) -> ()");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, int layer, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefix_server, CPU, m) {
  m.impl("linear", linear);
  m.impl("decode_attention", decode_attention);
}

// ATen ops only: any device.
TORCH_LIBRARY_IMPL(prefix_server, CompositeExplicitAutograd, m) {
  m.impl("pack_linear", pack_linear);
  m.impl("write_kv", write_kv);
}
