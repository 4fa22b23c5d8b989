// CPU kernels for the compiled decode step (AVX-512), registered as torch ops `prefix_server::*`.
//
// Why these exist (measured on the 2-core AVX-512 VM the project is developed on, SmolLM2-135M; the
// figures are in README.md, "Performance: the compiled decode step"):
//  - linear (float32 and bfloat16 weights): MKL's float32 GEMM is poor at the few rows of a decode step.
//    A decode step reads every weight once, so the kernel streams each weight block once and multiplies
//    it into every row while it is in registers.
//  - write_kv: writing the new K/V into the page pool in place (an indexed assignment traced by
//    torch.compile becomes a copy of the whole pool per layer).
//  - paged_attention (float32, bfloat16): one query token per row over that row's prefix pages and own
//    pages, through its block table; rows that share a prefix read its keys and values once per K/V head
//    (the shared-prefix idea of FlashInfer's cascade, Hydragen and ChunkAttention, for learned prefixes);
//    grouped query heads read their K/V head once (no repeat, no mask tensor).
//
// These ops write through raw pointers, so each one checks the shapes it relies on first.
//
// Shapes: x [M, K]; packed weights [N / 16, K, 16]; the pool [layers, pages, kv_heads, page_size, head_dim].
//
// The AVX-512 code is compiled for that target only (a pragma, not a global -m flag): the library loads
// on any x86-64 CPU, and Python calls `linear` / `paged_attention` only where torch reports AVX-512.

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

// A row of d values as float32: float32 rows as they are, bfloat16 rows widened into `buf`.
inline const float* widen(const float* src, float*, int64_t) { return src; }
inline const float* widen(const at::BFloat16* src, float* buf, int64_t d) {
  int64_t i = 0;
  for (; i + kBlock <= d; i += kBlock) _mm512_storeu_ps(buf + i, load16(src + i));
  for (; i < d; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

// out[0, d) += w * v[0, d)
inline void axpy(float w, const float* v, float* out, int64_t d) {
  const __m512 wv = _mm512_set1_ps(w);
  int64_t i = 0;
  for (; i + kBlock <= d; i += kBlock)
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(out + i)));
  for (; i < d; ++i) out[i] += w * v[i];
}

// p[0, n) = exp(p - max p), 16 at a time; returns their sum.
inline float exp_shifted(float* p, int64_t n) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, p[j]);
  __m512 sum16 = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += kBlock) {
    const __mmask16 live = j + kBlock <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + j), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(p + j, live, e);
    sum16 = _mm512_add_ps(sum16, _mm512_maskz_mov_ps(live, e));
  }
  return _mm512_reduce_add_ps(sum16);
}

// One K/V head of one layer in the pool: token j of a sequence whose pages are table[0..] sits at
// base + table[j / page_size] * page_stride + (j % page_size) * d.
template <typename T>
struct HeadPages {
  const T* base;
  int64_t page_stride, page_size, d;
  const T* at(const int64_t* table, int64_t j) const {
    return base + table[j / page_size] * page_stride + (j % page_size) * d;
  }
};

constexpr int64_t kMaxD = 256;  // head dims the page-at-a-time prefix path takes (16 registers of keys)

// Scores of nq queries against n <= 16 keys of one page (tokens j0 .. j0 + n of a sequence): the page's
// keys transposed once into kt [d, 16], then each query's 16 scores are d broadcast FMAs in one register
// (no horizontal sum per key). scores: s[i * stride + (0 .. n)].
template <typename T, typename Query>
void prefix_scores(const HeadPages<T>& kp, const int64_t* table, int64_t j0, int64_t n, int64_t nq, Query query,
                   float scale, float* s, int64_t stride, float* kt) {
  const int64_t d = kp.d;
  for (int64_t j = 0; j < kBlock; ++j) {
    float row[kMaxD];
    const float* k = j < n ? widen(kp.at(table, j0 + j), row, d) : nullptr;
    for (int64_t x = 0; x < d; ++x) kt[x * kBlock + j] = k ? k[x] : 0.f;
  }
  const __mmask16 live = n == kBlock ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 4 <= nq; i += 4) {  // 4 queries at a time, 2 chains each: 8 FMAs in flight, each kt row loaded once
    const float *q0 = query(i), *q1 = query(i + 1), *q2 = query(i + 2), *q3 = query(i + 3);
    __m512 a[8];
    for (auto& r : a) r = _mm512_setzero_ps();
    for (int64_t x = 0; x < d; x += 2) {
      const __m512 k0 = _mm512_loadu_ps(kt + x * kBlock), k1 = _mm512_loadu_ps(kt + (x + 1) * kBlock);
      a[0] = _mm512_fmadd_ps(_mm512_set1_ps(q0[x]), k0, a[0]);
      a[1] = _mm512_fmadd_ps(_mm512_set1_ps(q0[x + 1]), k1, a[1]);
      a[2] = _mm512_fmadd_ps(_mm512_set1_ps(q1[x]), k0, a[2]);
      a[3] = _mm512_fmadd_ps(_mm512_set1_ps(q1[x + 1]), k1, a[3]);
      a[4] = _mm512_fmadd_ps(_mm512_set1_ps(q2[x]), k0, a[4]);
      a[5] = _mm512_fmadd_ps(_mm512_set1_ps(q2[x + 1]), k1, a[5]);
      a[6] = _mm512_fmadd_ps(_mm512_set1_ps(q3[x]), k0, a[6]);
      a[7] = _mm512_fmadd_ps(_mm512_set1_ps(q3[x + 1]), k1, a[7]);
    }
    for (int64_t m = 0; m < 4; ++m)
      _mm512_mask_storeu_ps(s + (i + m) * stride, live, _mm512_mul_ps(_mm512_add_ps(a[2 * m], a[2 * m + 1]), sc));
  }
  for (; i < nq; ++i) {
    const float* qi = query(i);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t x = 0; x < d; x += 2) {
      acc0 = _mm512_fmadd_ps(_mm512_set1_ps(qi[x]), _mm512_loadu_ps(kt + x * kBlock), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_set1_ps(qi[x + 1]), _mm512_loadu_ps(kt + (x + 1) * kBlock), acc1);
    }
    _mm512_mask_storeu_ps(s + i * stride, live, _mm512_mul_ps(_mm512_add_ps(acc0, acc1), sc));
  }
}

// o[i] += sum over the page's n values of p[i * stride + j] * v_j, with o[i] held in registers for the page.
template <typename T>
void prefix_values(const HeadPages<T>& vp, const int64_t* table, int64_t j0, int64_t n, int64_t nq, const float* p,
                   int64_t stride, float* o, float* vbuf) {
  const int64_t d = vp.d, regs = d / kBlock;
  const float* v[kBlock];
  for (int64_t j = 0; j < n; ++j) v[j] = widen(vp.at(table, j0 + j), vbuf + j * d, d);
  int64_t i = 0;
  if (regs == 4) {  // head_dim 64: 2 queries at a time, 8 FMAs in flight, each value loaded once for both
    for (; i + 2 <= nq; i += 2) {
      float *o0 = o + i * d, *o1 = o0 + d;
      __m512 a[8];
      for (int64_t r = 0; r < 4; ++r) a[r] = _mm512_loadu_ps(o0 + r * kBlock), a[4 + r] = _mm512_loadu_ps(o1 + r * kBlock);
      for (int64_t j = 0; j < n; ++j) {
        const __m512 w0 = _mm512_set1_ps(p[i * stride + j]), w1 = _mm512_set1_ps(p[(i + 1) * stride + j]);
        for (int64_t r = 0; r < 4; ++r) {
          const __m512 vv = _mm512_loadu_ps(v[j] + r * kBlock);
          a[r] = _mm512_fmadd_ps(w0, vv, a[r]);
          a[4 + r] = _mm512_fmadd_ps(w1, vv, a[4 + r]);
        }
      }
      for (int64_t r = 0; r < 4; ++r) _mm512_storeu_ps(o0 + r * kBlock, a[r]), _mm512_storeu_ps(o1 + r * kBlock, a[4 + r]);
    }
  }
  for (; i < nq; ++i) {
    __m512 acc[kMaxD / kBlock];
    float* oi = o + i * d;
    for (int64_t r = 0; r < regs; ++r) acc[r] = _mm512_loadu_ps(oi + r * kBlock);
    for (int64_t j = 0; j < n; ++j) {
      const __m512 w = _mm512_set1_ps(p[i * stride + j]);
      for (int64_t r = 0; r < regs; ++r) acc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v[j] + r * kBlock), acc[r]);
    }
    for (int64_t r = 0; r < regs; ++r) _mm512_storeu_ps(oi + r * kBlock, acc[r]);
  }
}

// A unit of work: rows [r0, r1) that share one prefix (P tokens on their first pages; P = 0: one row),
// their query heads of K/V head h. The prefix's keys and values are read once for all of them (widened
// once for bfloat16), then each row's own tokens. Scores: s [nq, stride]; accumulators: o [nq, d].
// q: [b, heads, d] float32; out: [b, heads, d] float32.
template <typename T>
void attend_unit(const float* q, float* out, const HeadPages<T>& kp, const HeadPages<T>& vp, const int64_t* tables,
                 int64_t table_width, const int64_t* prefix_lens, const int64_t* own_lens, int64_t r0, int64_t r1,
                 int64_t h, int64_t heads, int64_t groups, float scale, std::vector<float>& s, std::vector<float>& o,
                 std::vector<float>& buf) {
  const int64_t d = kp.d, ps = kp.page_size, rows = r1 - r0, nq = rows * groups;
  const int64_t P = prefix_lens[r0], own_start = (P + ps - 1) / ps;  // own tokens start on this table entry
  int64_t max_own = 0;
  for (int64_t r = r0; r < r1; ++r) max_own = std::max(max_own, own_lens[r]);
  const int64_t stride = P + max_own;
  s.resize(nq * stride);
  o.assign(nq * d, 0.f);
  buf.resize(d);
  auto query = [&](int64_t i) { return q + ((r0 + i / groups) * heads + h * groups + i % groups) * d; };
  const int64_t* shared = tables + r0 * table_width;
  if (d % kBlock == 0 && d <= kMaxD) {  // the shared prefix, a page at a time: each key read once for all
    buf.resize(d * kBlock);
    for (int64_t j0 = 0; j0 < P; j0 += kp.page_size) {
      const int64_t n = std::min(kp.page_size, P - j0);
      prefix_scores(kp, shared, j0, n, nq, query, scale, s.data() + j0, stride, buf.data());
    }
  } else {
    for (int64_t j = 0; j < P; ++j) {
      const float* k = widen(kp.at(shared, j), buf.data(), d);
      for (int64_t i = 0; i < nq; ++i) s[i * stride + j] = dot(query(i), k, d) * scale;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {  // each row's own tokens
    const int64_t* own = tables + r * table_width + own_start;
    for (int64_t j = 0; j < own_lens[r]; ++j) {
      const float* k = widen(kp.at(own, j), buf.data(), d);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = (r - r0) * groups + g;
        s[i * stride + P + j] = dot(query(i), k, d) * scale;
      }
    }
  }
  std::vector<float> inv(nq);
  for (int64_t i = 0; i < nq; ++i) inv[i] = 1.f / exp_shifted(s.data() + i * stride, P + own_lens[r0 + i / groups]);
  if (d % kBlock == 0 && d <= kMaxD) {
    for (int64_t j0 = 0; j0 < P; j0 += vp.page_size)
      prefix_values(vp, shared, j0, std::min(vp.page_size, P - j0), nq, s.data() + j0, stride, o.data(), buf.data());
  } else {
    for (int64_t j = 0; j < P; ++j) {
      const float* v = widen(vp.at(shared, j), buf.data(), d);
      for (int64_t i = 0; i < nq; ++i) axpy(s[i * stride + j], v, o.data() + i * d, d);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* own = tables + r * table_width + own_start;
    for (int64_t j = 0; j < own_lens[r]; ++j) {
      const float* v = widen(vp.at(own, j), buf.data(), d);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = (r - r0) * groups + g;
        axpy(s[i * stride + P + j], v, o.data() + i * d, d);
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* dst = out + (query(i) - q);
    for (int64_t x = 0; x < d; ++x) dst[x] = o[i * d + x] * inv[i];
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

// The pool: keys and values [layers, pages, kv_heads, page_size, head_dim] of one shape, `layer` in it.
void check_pool(const char* op, const at::Tensor& keys, const at::Tensor& values, int64_t layer) {
  TORCH_CHECK(keys.dim() == 5 && values.sizes() == keys.sizes(), op, ": expected keys and values of one shape "
              "[layers, pages, kv_heads, page_size, head_dim], got ", keys.sizes(), " and ", values.sizes());
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), op, ": the pool must be contiguous");
  TORCH_CHECK(0 <= layer && layer < keys.size(0), op, ": layer ", layer, " of ", keys.size(0));
}

// Row r's new key/value into flat slot slots[r] (page * page_size + offset) of `layer`, in place.
// k, v: [b, kv_heads, head_dim].
void write_kv(at::Tensor keys, at::Tensor values, int64_t layer, const at::Tensor& slots, const at::Tensor& k,
              const at::Tensor& v) {
  check_pool("write_kv", keys, values, layer);
  const int64_t page_size = keys.size(3), num_slots = keys.size(1) * page_size;
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == keys.size(2) && k.size(2) == keys.size(4),
              "write_kv: expected k and v [b, ", keys.size(2), ", ", keys.size(4), "], got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0), "write_kv: expected one slot per row, got ",
              slots.sizes(), " for ", k.size(0), " rows");
  TORCH_CHECK(k.scalar_type() == keys.scalar_type() && v.scalar_type() == keys.scalar_type(), "write_kv: dtype");
  if (!keys.device().is_cpu()) {  // elsewhere: torch's indexed copy
    using at::indexing::Slice;
    const at::Tensor pages = at::floor_divide(slots, page_size), offsets = at::remainder(slots, page_size);
    keys.select(0, layer).index_put_({pages, Slice(), offsets}, k);
    values.select(0, layer).index_put_({pages, Slice(), offsets}, v);
    return;
  }
  const at::Tensor kc = k.contiguous(), vc = v.contiguous(), sc = slots.to(at::kLong).contiguous();
  const int64_t b = kc.size(0), kv_heads = kc.size(1), d = kc.size(2), item = keys.element_size();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r)
    TORCH_CHECK(0 <= sp[r] && sp[r] < num_slots, "write_kv: slot ", sp[r], " outside the pool's ", num_slots);
  for (auto [pool, src] : {std::pair{&keys, &kc}, std::pair{&values, &vc}}) {
    char* base = static_cast<char*>(pool->data_ptr()) + layer * pool->stride(0) * item;
    const char* from = static_cast<const char*>(src->data_ptr());
    for (int64_t r = 0; r < b; ++r) {
      const int64_t page = sp[r] / page_size, offset = sp[r] % page_size;
      for (int64_t h = 0; h < kv_heads; ++h)
        std::memcpy(base + (page * pool->stride(1) + h * pool->stride(2) + offset * d) * item,
                    from + (r * kv_heads + h) * d * item, d * item);
    }
  }
}

constexpr int64_t kGroupRows = 8;  // rows of one prefix per work unit: each unit reads the prefix once

// q [b, heads, head_dim] of `layer` attends, for row r, to the first prefix_lens[r] tokens on the pages of
// block_tables[r] (its prefix), then to own_lens[r] tokens starting on the next page (its own) -> [b, heads,
// head_dim] in q's dtype. Consecutive rows with the same prefix (length and first page) form a group whose
// prefix keys and values are read once per K/V head for up to kGroupRows rows.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t layer,
                           const at::Tensor& block_tables, const at::Tensor& prefix_lens, const at::Tensor& own_lens,
                           double scale) {
  check_pool("paged_attention", keys, values, layer);
  const auto dtype = keys.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "paged_attention: float32 or bfloat16, got ", dtype);
  TORCH_CHECK(q.scalar_type() == dtype && q.dim() == 3 && q.size(1) % keys.size(2) == 0 && q.size(2) == keys.size(4),
              "paged_attention: expected q [b, heads, ", keys.size(4), "] in ", dtype, " with heads a multiple of ",
              keys.size(2), ", got ", q.scalar_type(), " ", q.sizes());
  const int64_t b = q.size(0), page_size = keys.size(3), pages = keys.size(1);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == b && prefix_lens.sizes() == at::IntArrayRef{b} &&
              own_lens.sizes() == at::IntArrayRef{b}, "paged_attention: expected block_tables [", b,
              ", blocks] and lengths [", b, "], got ", block_tables.sizes(), ", ", prefix_lens.sizes(), ", ",
              own_lens.sizes());
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor plen = prefix_lens.to(at::kLong).contiguous(), olen = own_lens.to(at::kLong).contiguous();
  const int64_t width = tables.size(1);
  const int64_t *tp = tables.data_ptr<int64_t>(), *pp = plen.data_ptr<int64_t>(), *op = olen.data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r) {
    const int64_t blocks = (pp[r] + page_size - 1) / page_size + (op[r] + page_size - 1) / page_size;
    TORCH_CHECK(pp[r] >= 0 && op[r] >= 1 && blocks <= width, "paged_attention: row ", r, " has ", pp[r],
                " prefix and ", op[r], " own tokens: ", blocks, " pages, its block table has ", width);
    for (int64_t j = 0; j < blocks; ++j)
      TORCH_CHECK(0 <= tp[r * width + j] && tp[r * width + j] < pages, "paged_attention: page ", tp[r * width + j],
                  " outside the pool's ", pages);
  }
  std::vector<std::pair<int64_t, int64_t>> groups;  // [r0, r1): rows that share their prefix
  for (int64_t r = 0; r < b; ++r) {
    const bool joins = !groups.empty() && pp[r] > 0 && pp[r] == pp[groups.back().first] &&
                       tp[r * width] == tp[groups.back().first * width] &&
                       r - groups.back().first < kGroupRows;
    if (joins) groups.back().second = r + 1; else groups.emplace_back(r, r + 1);
  }
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(qf);
  const int64_t heads = qf.size(1), d = qf.size(2), kv_heads = keys.size(2), per_kv = heads / kv_heads;
  const int64_t units = static_cast<int64_t>(groups.size()) * kv_heads;
  auto run = [&](auto* pool_type) {
    using T = std::remove_pointer_t<decltype(pool_type)>;
    const T* kbase = keys.data_ptr<T>() + layer * keys.stride(0);
    const T* vbase = values.data_ptr<T>() + layer * values.stride(0);
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      std::vector<float> s, o, buf;
      for (int64_t u = u0; u < u1; ++u) {
        const auto [r0, r1] = groups[u / kv_heads];
        const int64_t h = u % kv_heads;
        const HeadPages<T> kp{kbase + h * keys.stride(2), keys.stride(1), page_size, d};
        const HeadPages<T> vp{vbase + h * values.stride(2), values.stride(1), page_size, d};
        attend_unit(qf.data_ptr<float>(), out.data_ptr<float>(), kp, vp, tp, width, pp, op, r0, r1, h, heads, per_kv,
                    static_cast<float>(scale), s, o, buf);
      }
    });
  };
  if (dtype == at::kBFloat16) run(static_cast<at::BFloat16*>(nullptr)); else run(static_cast<float*>(nullptr));
  return out.to(dtype);
}

}  // namespace

TORCH_LIBRARY(prefix_server, m) {
  m.def("pack_linear(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
  m.def("write_kv(Tensor(a!) keys, Tensor(b!) values, int layer, Tensor slots, Tensor k, Tensor v) -> ()");
  m.def("paged_attention(Tensor q, Tensor keys, Tensor values, int layer, Tensor block_tables, Tensor prefix_lens, "
        "Tensor own_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefix_server, CPU, m) {
  m.impl("linear", linear);
  m.impl("paged_attention", paged_attention);
}

// ATen ops only: any device.
TORCH_LIBRARY_IMPL(prefix_server, CompositeExplicitAutograd, m) {
  m.impl("pack_linear", pack_linear);
  m.impl("write_kv", write_kv);
}
