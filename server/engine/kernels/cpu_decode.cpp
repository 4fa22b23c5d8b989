// CPU kernels for the compiled decode step (AVX-512), registered as torch ops `prefix_server::*`.
//
// Why these exist (measured on the 2-core AVX-512 VM the project is developed on, SmolLM2-135M; the
// figures are in README.md, "Performance: the compiled decode step"):
//  - linear (float32 and bfloat16 weights; linear_int8: int8 weights with float32 scales per group of K): MKL's
//    float32 GEMM is poor at the few rows of a decode step.
//    A decode step reads every weight once, so the kernel streams each weight block once and multiplies
//    it into every row while it is in registers.
//  - linear_a16 and linear_q8 (int8 weights times activations rounded to int16 / int8, AVX-512 VNNI):
//    widening each int8 weight to float32 (linear_int8) costs more than reading it; integer dot products
//    (32 or 64 multiply-adds per instruction) let one row stream the weights at memory speed.
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
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;    // output features per packed block: one AVX-512 register of floats
// Software prefetch on each weight stream, in k steps: into L1 just ahead, and, for 4 rows or more, into L2
// further ahead. With 8 or more rows a k step takes ~8 cycles of FMAs, and the hardware's prefetch (which
// stops at 4 KB page ends) ran too short: the L2 prefetch made all linears of the default model ~10%
// faster at 8 and 16 rows on the 2-core Xeon, float32 and bfloat16 (/tmp microbenchmark, builds
// alternating); at 1 row, which streams at memory speed anyway, it cost bfloat16 ~5%, so fewer rows skip it.
constexpr int64_t kPrefetch = 8;
constexpr int64_t kPrefetchL2 = 64;
constexpr int kPrefetchL2Rows = 4;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

// 16 weights as float32: float32 as they are, bfloat16 widened (exact: a bfloat16 is a float32's top half).
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const at::BFloat16* w) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
// int8 (weight-only quantized): the integer as a float (exact), then times its group's scale (tile).
inline __m512 load16(const int8_t* w) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}

// int8 weights' scales, packed like the weights: [N / 16, groups, 16], one per `size` consecutive k of
// each output feature. Float weights have none (p null, one group of all K).
struct Scales {
  const float* p;
  int64_t groups, size;
};
template <typename W>
constexpr bool kScaled = std::is_same_v<W, int8_t>;

// out[m, (nb + j) * 16 : +16] = x[m, :] . w_block[nb + j] for M rows and NB consecutive blocks.
template <typename W, int M, int NB>
inline void tile(const float* x, int64_t K, const W* w, const Scales& s, float* out, int64_t ldo, int64_t nb) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const W* wb = w + nb * K * kBlock;
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += s.size) {
    __m512 sv[NB];  // int8: each block's 16 scales of this group, loaded once per `size` k
    if constexpr (kScaled<W>)
      for (int j = 0; j < NB; ++j) sv[j] = _mm512_loadu_ps(s.p + ((nb + j) * s.groups + g) * kBlock);
    const int64_t k1 = std::min(K, k0 + s.size);
    for (int64_t k = k0; k < k1; ++k) {
      __m512 wv[NB];
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(wb + (j * K + k + kPrefetch) * kBlock), _MM_HINT_T0);
        if constexpr (M >= kPrefetchL2Rows)
          _mm_prefetch(reinterpret_cast<const char*>(wb + (j * K + k + kPrefetchL2) * kBlock), _MM_HINT_T1);
        wv[j] = load16(wb + (j * K + k) * kBlock);
        if constexpr (kScaled<W>) wv[j] = _mm512_mul_ps(wv[j], sv[j]);
      }
      for (int m = 0; m < M; ++m) {
        const __m512 xb = _mm512_set1_ps(x[m * K + k]);
        for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(xb, wv[j], acc[m][j]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(out + m * ldo + (nb + j) * kBlock, acc[m][j]);
}

// Blocks [nb0, nb1) for M <= 8 rows: as many blocks at a time as the 32 registers hold accumulators for.
template <typename W, int M>
void rows(const float* x, int64_t K, const W* w, const Scales& s, float* out, int64_t ldo, int64_t nb0, int64_t nb1) {
  constexpr int NB = M <= 4 ? 4 : 2;
  int64_t nb = nb0;
  for (; nb + NB <= nb1; nb += NB) tile<W, M, NB>(x, K, w, s, out, ldo, nb);
  for (; nb < nb1; ++nb) tile<W, M, 1>(x, K, w, s, out, ldo, nb);
}

template <typename W>
using RowsFn = void (*)(const float*, int64_t, const W*, const Scales&, float*, int64_t, int64_t, int64_t);
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

constexpr int64_t kMaxD = 256;  // head dims the vectorised paths take
constexpr int64_t kPrefetchUnitBytes = 512 * 1024;  // keys and values asked for ahead per unit: a share of L2

// The shared prefix's attention, for the nq queries of a unit at once, one query per SIMD lane: the
// queries are transposed once per unit into qt [d, NQ] (NQ = nq rounded up to 16, zero-padded), so a
// score is a broadcast of one key element times a register of 16 queries: no transpose of keys, no
// horizontal sum, and the prefix's scores st [P, NQ] get their max, exp and sum 16 queries at a time.

// st[j * NQ + i] = scale * q_i . k_j for the n <= 16 keys of one page (tokens j0 .. j0 + n): KB keys at a
// time against NV registers of queries (KB x NV accumulators, each key element loaded once per row).
template <int NV, int KB, typename T>
void prefix_scores(const HeadPages<T>& kp, const int64_t* table, int64_t j0, int64_t n, const float* qt, float scale,
                   float* st, float* kbuf) {
  constexpr int64_t NQ = NV * kBlock;
  const int64_t d = kp.d;
  const float* k[kBlock];
  for (int64_t j = 0; j < n; ++j) k[j] = widen(kp.at(table, j0 + j), kbuf + j * d, d);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t jb = 0; jb < n; jb += KB) {
    const float* kk[KB];
    for (int a = 0; a < KB; ++a) kk[a] = k[std::min<int64_t>(jb + a, n - 1)];  // past n: computed, not stored
    __m512 acc[KB][NV];
    for (auto& r : acc)
      for (auto& v : r) v = _mm512_setzero_ps();
    for (int64_t x = 0; x < d; ++x) {
      __m512 qv[NV];
      for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(qt + x * NQ + v * kBlock);
      for (int a = 0; a < KB; ++a) {
        const __m512 kx = _mm512_set1_ps(kk[a][x]);
        for (int v = 0; v < NV; ++v) acc[a][v] = _mm512_fmadd_ps(kx, qv[v], acc[a][v]);
      }
    }
    for (int a = 0; a < KB && jb + a < n; ++a)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(st + (j0 + jb + a) * NQ + v * kBlock, _mm512_mul_ps(acc[a][v], sc));
  }
}

// o[i] += sum over the n values of one page of p[j * NQ + i] * v_j: QB queries at a time, their R
// registers of output each held for the page (QB x R accumulators, each value loaded once for QB queries).
template <int R, int QB, typename T>
void prefix_values(const HeadPages<T>& vp, const int64_t* table, int64_t j0, int64_t n, int64_t nq, int64_t NQ,
                   const float* p, float* o, float* vbuf) {
  constexpr int64_t d = R * kBlock;
  const float* v[kBlock];
  for (int64_t j = 0; j < n; ++j) v[j] = widen(vp.at(table, j0 + j), vbuf + j * d, d);
  for (int64_t i0 = 0; i0 < nq; i0 += QB) {
    const int64_t qb = std::min<int64_t>(QB, nq - i0);
    __m512 acc[QB][R];
    for (int m = 0; m < QB; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = m < qb ? _mm512_loadu_ps(o + (i0 + m) * d + r * kBlock) : _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      __m512 vv[R];
      for (int r = 0; r < R; ++r) vv[r] = _mm512_loadu_ps(v[j] + r * kBlock);
      for (int m = 0; m < QB; ++m) {  // lanes past nq hold zeros (padded queries): read, never stored
        const __m512 w = _mm512_set1_ps(p[(j0 + j) * NQ + i0 + m]);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(w, vv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < qb; ++m)
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(o + (i0 + m) * d + r * kBlock, acc[m][r]);
  }
}

template <typename T>
using ScoresFn = void (*)(const HeadPages<T>&, const int64_t*, int64_t, int64_t, const float*, float, float*, float*);
template <typename T>
constexpr ScoresFn<T> kScores[4] = {prefix_scores<1, 16, T>, prefix_scores<2, 8, T>, prefix_scores<3, 4, T>,
                                    prefix_scores<4, 4, T>};  // <= 16 accumulators, a page in whole blocks

// Per-unit scratch, reused across the units a thread runs.
struct Scratch {
  std::vector<float> qt, st, so, o, m, inv, buf;
};

// p[0, n) = exp(p - mx); returns their sum.
inline float exp_from(float* p, int64_t n, float mx) {
  __m512 sum16 = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += kBlock) {
    const __mmask16 live = j + kBlock <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + j), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(p + j, live, e);
    sum16 = _mm512_add_ps(sum16, _mm512_maskz_mov_ps(live, e));
  }
  return _mm512_reduce_add_ps(sum16);
}

// A unit of work: rows [r0, r1) that share one prefix (P tokens on their first pages; P = 0: one row),
// their query heads of K/V head h. The prefix's keys and values are read once for all of them (widened
// once for bfloat16), then each row's own tokens. One softmax per query over both parts.
// q: [b, heads, d] float32; out: [b, heads, d] float32.
template <typename T>
void attend_unit(const float* q, float* out, const HeadPages<T>& kp, const HeadPages<T>& vp, const int64_t* tables,
                 int64_t table_width, const int64_t* prefix_lens, const int64_t* own_lens, int64_t r0, int64_t r1,
                 int64_t h, int64_t heads, int64_t groups, float scale, Scratch& w) {
  const int64_t d = kp.d, ps = kp.page_size, nq = (r1 - r0) * groups;
  const int64_t P = prefix_lens[r0], own_start = (P + ps - 1) / ps;  // own tokens start on this table entry
  const int64_t NQ = (nq + kBlock - 1) / kBlock * kBlock;
  int64_t max_own = 0;
  for (int64_t r = r0; r < r1; ++r) max_own = std::max(max_own, own_lens[r]);
  auto query = [&](int64_t i) { return q + ((r0 + i / groups) * heads + h * groups + i % groups) * d; };
  auto own_len = [&](int64_t i) { return own_lens[r0 + i / groups]; };
  const int64_t* shared = tables + r0 * table_width;
  w.st.resize(P * NQ);
  w.so.resize(nq * max_own);
  w.o.assign(nq * d, 0.f);
  w.m.assign(NQ, -INFINITY);
  w.inv.assign(NQ, 0.f);
  w.buf.resize(kBlock * std::max<int64_t>(d, kMaxD));
  const bool vector_d = d % kBlock == 0 && d <= kMaxD;

  // The unit's keys and values lie on scattered pages, cold after the step's weight stream: ask for them
  // (into L2) before reading any, so that their misses overlap instead of coming a token at a time (16 rows
  // of one task, 30 layers, caches flushed between layers: 16-token prefix 6.1-6.3 -> 5.1 ms, 250-token
  // 9.7-9.8 -> 7.5-8.6 ms; a /tmp microbenchmark, builds alternating). At most kPrefetchUnitBytes, in
  // reading order: a long context asked for whole would evict its own first lines from L2 before they
  // are read (16 rows of 4,000 own tokens: 269-326 ms per 30 layers uncapped, 271-273 capped, 262 with no
  // prefetch, where the pages are long sequential runs the hardware prefetches anyway).
  int64_t budget = kPrefetchUnitBytes;
  auto prefetch = [&](const int64_t* table, int64_t n) {
    const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
    for (int64_t j = 0; j < n && budget > 0; ++j, budget -= 2 * row_bytes)
      for (int64_t x = 0; x < row_bytes; x += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(kp.at(table, j)) + x, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(vp.at(table, j)) + x, _MM_HINT_T1);
      }
  };
  prefetch(shared, P);
  for (int64_t r = r0; r < r1; ++r) prefetch(tables + r * table_width + own_start, own_lens[r]);

  // 1. Scores: the prefix's st [P, NQ] (one query per lane), each row's own so [nq, max_own].
  if (P > 0) {
    w.qt.assign(d * NQ, 0.f);
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t x = 0; x < d; ++x) w.qt[x * NQ + i] = query(i)[x];
    if (vector_d && NQ <= 4 * kBlock) {
      for (int64_t j0 = 0; j0 < P; j0 += ps)
        kScores<T>[NQ / kBlock - 1](kp, shared, j0, std::min(ps, P - j0), w.qt.data(), scale, w.st.data(), w.buf.data());
    } else {
      for (int64_t j = 0; j < P; ++j) {
        const float* k = widen(kp.at(shared, j), w.buf.data(), d);
        for (int64_t i = 0; i < NQ; ++i) w.st[j * NQ + i] = i < nq ? dot(query(i), k, d) * scale : 0.f;
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* own = tables + r * table_width + own_start;
    for (int64_t j = 0; j < own_lens[r]; ++j) {
      const float* k = widen(kp.at(own, j), w.buf.data(), d);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = (r - r0) * groups + g;
        w.so[i * max_own + j] = dot(query(i), k, d) * scale;
      }
    }
  }

  // 2. Softmax: each query's max over both parts, then exp and 1 / sum.
  for (int64_t i0 = 0; i0 < NQ; i0 += kBlock) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < P; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(w.st.data() + j * NQ + i0));
    _mm512_storeu_ps(w.m.data() + i0, mx);
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < own_len(i); ++j) w.m[i] = std::max(w.m[i], w.so[i * max_own + j]);
  for (int64_t i0 = 0; i0 < NQ; i0 += kBlock) {
    const __m512 mx = _mm512_loadu_ps(w.m.data() + i0);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < P; ++j) {
      float* row = w.st.data() + j * NQ + i0;
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row), mx));
      _mm512_storeu_ps(row, e);
      sum = _mm512_add_ps(sum, e);
    }
    _mm512_storeu_ps(w.inv.data() + i0, sum);
  }
  for (int64_t i = 0; i < nq; ++i)
    w.inv[i] = 1.f / (w.inv[i] + exp_from(w.so.data() + i * max_own, own_len(i), w.m[i]));

  // 3. Values: the prefix's a page at a time for all queries, then each row's own.
  if (P > 0) {
    for (int64_t j0 = 0; j0 < P; j0 += ps) {
      const int64_t n = std::min(ps, P - j0);
      if (d == 4 * kBlock) {
        prefix_values<4, 4>(vp, shared, j0, n, nq, NQ, w.st.data(), w.o.data(), w.buf.data());
      } else if (d == 8 * kBlock) {
        prefix_values<8, 2>(vp, shared, j0, n, nq, NQ, w.st.data(), w.o.data(), w.buf.data());
      } else {
        for (int64_t j = j0; j < j0 + n; ++j) {
          const float* v = widen(vp.at(shared, j), w.buf.data(), d);
          for (int64_t i = 0; i < nq; ++i) axpy(w.st[j * NQ + i], v, w.o.data() + i * d, d);
        }
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* own = tables + r * table_width + own_start;
    for (int64_t j = 0; j < own_lens[r]; ++j) {
      const float* v = widen(vp.at(own, j), w.buf.data(), d);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = (r - r0) * groups + g;
        axpy(w.so[i * max_own + j], v, w.o.data() + i * d, d);
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* dst = out + (query(i) - q);
    for (int64_t x = 0; x < d; ++x) dst[x] = w.o[i * d + x] * w.inv[i];
  }
}

#pragma GCC pop_options

// [N, K] -> [N / 16, K, 16]: each block of 16 output features contiguous over K.
at::Tensor pack_linear(const at::Tensor& weight) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kChar),
              "pack_linear: expected a 2-D float32, bfloat16 or int8 weight, got ", dtype, " ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kBlock == 0, "pack_linear: output features must be a multiple of 16, got ", n);
  return weight.reshape({n / kBlock, kBlock, k}).transpose(1, 2).contiguous();
}

// How every packed GEMM splits its work: threads split the weight (each block is read from memory once, by
// one thread), every thread does all rows: a group of kGroup blocks at a time, kRowTile rows at a time over
// it. fn(m0, rows, nb0, nb1) computes rows [m0, m0 + rows) of blocks [nb0, nb1).
template <typename Fn>
void over_tiles(int64_t blocks, int64_t m_total, const Fn& fn) {
  at::parallel_for(0, blocks, kGroup, [&](int64_t b0, int64_t b1) {  // an even share of blocks per thread
    for (int64_t nb = b0; nb < b1; nb += kGroup) {
      const int64_t nb_end = std::min(nb + kGroup, b1);
      for (int64_t m0 = 0; m0 < m_total; m0 += kRowTile) fn(m0, std::min(kRowTile, m_total - m0), nb, nb_end);
    }
  });
}

// The packed GEMM in float32: xp [M, K] float32, wp packed [N / 16, K, 16], op [M, N] float32.
template <typename W>
void gemm(const float* xp, const W* wp, const Scales& s, float* op, int64_t m_total, int64_t k, int64_t blocks) {
  const int64_t n = blocks * kBlock;
  over_tiles(blocks, m_total, [&](int64_t m0, int64_t rows, int64_t nb0, int64_t nb1) {
    kRows<W>[rows - 1](xp + m0 * k, k, wp, s, op + m0 * n, n, nb0, nb1);
  });
}

// Every linear after its checks: x [..., K] (float32 or bfloat16) as float32 [M, K] through `run(x, out, M)`
// (a packed GEMM) into float32 [M, N], plus the bias, in x's dtype and leading shape.
template <typename Run>
at::Tensor packed_gemm(const char* op, const at::Tensor& x, int64_t n, const std::optional<at::Tensor>& bias,
                       const Run& run) {
  const int64_t k = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();  // [M, K]
  const int64_t m_total = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty({m_total, n}, x2.options());  // [M, N] float32
  if (m_total > 0) run(x2.data_ptr<float>(), out.data_ptr<float>(), m_total);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": expected a bias [", n, "], got ", bias->sizes());
    out.add_(*bias);
  }
  return out.to(x.scalar_type()).view(out_shape);
}

// linear and linear_int8: packed_gemm over `gemm`.
template <typename W>
at::Tensor float_gemm(const char* op, const at::Tensor& x, const W* wp, const Scales& s, int64_t blocks,
                      const std::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1);
  return packed_gemm(op, x, blocks * kBlock, bias, [&](const float* xp, float* out, int64_t m_total) {
    gemm(xp, wp, s, out, m_total, k, blocks);
  });
}

// x [..., K] @ weight.T (+ bias) with the weight packed by pack_linear -> [..., N], in x's dtype. The
// products accumulate in float32; bfloat16 (weights and input) rounds once, at the end, as oneDNN does.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlock && packed.is_contiguous(),
              "linear: expected a weight packed by pack_linear [N / 16, K, 16], got ", packed.sizes());
  const int64_t k = packed.size(1), blocks = packed.size(0);
  const auto dtype = packed.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "linear: expected a float32 or bfloat16 packed weight (int8 weights go to linear_int8), got ", dtype);
  TORCH_CHECK(x.scalar_type() == dtype && x.size(-1) == k, "linear: expected ", dtype, " input [..., ", k, "], got ",
              x.scalar_type(), " ", x.sizes());
  if (dtype == at::kBFloat16)
    return float_gemm("linear", x, packed.data_ptr<at::BFloat16>(), Scales{nullptr, 1, k}, blocks, bias);
  return float_gemm("linear", x, packed.data_ptr<float>(), Scales{nullptr, 1, k}, blocks, bias);
}

// x [..., K] @ dequantized(packed int8 weight).T (+ bias) -> [..., N], in x's dtype (float32 or bfloat16):
// weight-only int8 with a float32 scale per output feature and group of K / groups consecutive k
// (scales packed by pack_linear from [N, groups]: [N / 16, groups, 16]). Each weight vector is widened
// and scaled in registers, then accumulated in float32 as the float weights are.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlock && packed.is_contiguous() && packed.scalar_type() == at::kChar,
              "linear_int8: expected an int8 weight packed by pack_linear [N / 16, K, 16], got ",
              packed.scalar_type(), " ", packed.sizes());
  const int64_t k = packed.size(1), blocks = packed.size(0);
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.size(-1) == k,
              "linear_int8: expected a float32 or bfloat16 input [..., ", k, "], got ", dtype, " ", x.sizes());
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == blocks && scales.size(2) == kBlock && scales.is_contiguous() &&
                  scales.scalar_type() == at::kFloat && scales.size(1) > 0 && k % scales.size(1) == 0,
              "linear_int8: expected float32 scales packed by pack_linear [", blocks, ", groups dividing ", k,
              ", 16], got ", scales.scalar_type(), " ", scales.sizes());
  const Scales s{scales.data_ptr<float>(), scales.size(1), k / scales.size(1)};
  return float_gemm("linear_int8", x, packed.data_ptr<int8_t>(), s, blocks, bias);
}

// ---- Integer dot products (AVX-512 VNNI): linear_a16 and linear_q8 --------------------------------------------
// The int8 weights (one float32 scale per 32 k, as for linear_int8) times the activations rounded per row and
// 32 k to integers (scale = max |x| / levels, to nearest), multiplied into exact int32 sums, then each group's
// sum times both scales into the float32 accumulators. Two kernels, one code:
//  - linear_a16 (`--quantize int8`): activations to int16 (levels 32767: a relative error of ~1e-5, below
//    bfloat16's 4e-3, so the result is weight-only int8's), `vpdpwssd`: 2 products per lane per instruction.
//    Weights packed int8 [N / 16, K / 2, 16, 2] (block, pair of k, feature, k): 32 bytes per block and pair,
//    widened to 32 int16 in a register.
//  - linear_q8 (`--quantize w8a8`): llama.cpp's Q8_0 x Q8_0, activations to int8 (levels 127), `vpdpbusd`:
//    4 products per lane. It multiplies unsigned by signed bytes, so the weights are stored as w + 128
//    (1..255) and each activation group's sum times 128 is taken back out:
//    sum((w + 128) * xq) - 128 * sum(xq) = sum(w * xq). Weights packed uint8 [N / 16, K / 4, 16, 4].
// One row streams the weights at memory speed with either; at 16 rows and more q8 is ~1.5x faster (64
// products per instruction against 32: docs/internals.md). Each 32-bit lane holds one output feature's
// `per_lane` consecutive k; a row's `per_lane` activations are broadcast to all 16 lanes.

constexpr int64_t kQ = 32;            // k per scale group, weights and activations
constexpr int64_t kPrefetchQ8 = 32;  // 64-byte lines ahead on each weight stream (measured: 8 to 32 is ~5%)
// From 4 rows on, also 128 lines (8 KB) ahead into L2, as the float tile does (kPrefetchL2): all linears of
// the default model, q8, 8 rows 8.9 -> 7.6-7.9 ms, 16 rows 12.5-13.4 -> 11.1-12.0 (256 lines: the same; a16
// and one row unchanged; `python -m loadtest.bench_int8_kernels`, an Intel Xeon, builds alternating).
constexpr int64_t kPrefetchQ8L2 = 128;

struct A16 {
  using X = int16_t;  // activations
  using W = int8_t;   // packed weights
  static constexpr int64_t per_lane = 2;
  static constexpr float levels = 32767.f;
  static constexpr float offset = 0.f;  // the weights' offset as stored
};
struct Q8 {
  using X = int8_t;
  using W = uint8_t;
  static constexpr int64_t per_lane = 4;
  static constexpr float levels = 127.f;
  static constexpr float offset = 128.f;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,fma")

inline __m512i load_weights(const int8_t* p) {  // 32 int8 -> 32 int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i load_weights(const uint8_t* p) { return _mm512_loadu_si512(p); }  // 64 uint8
inline __m512i dot_lanes(__m512i acc, __m512i w, __m512i x, A16) { return _mm512_dpwssd_epi32(acc, w, x); }
inline __m512i dot_lanes(__m512i acc, __m512i w, __m512i x, Q8) { return _mm512_dpbusd_epi32(acc, w, x); }
inline void store16(int16_t* dst, __m512i v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtsepi32_epi16(v));
}
inline void store16(int8_t* dst, __m512i v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(v));
}

// x [M, K] float32 -> xq [M, K] (P::X), scale [M, K / 32], corr [M, K / 32] = -offset * scale * sum(xq).
template <typename P>
void quantize_rows(const float* x, int64_t m_total, int64_t k, typename P::X* xq, float* scale, float* corr) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t i = 0; i < m_total * (k / kQ); ++i) {
    const float* src = x + i * kQ;  // rows are contiguous: group i of the flattened [M * G]
    const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, abs_mask), _mm512_and_ps(b, abs_mask)));
    const float s = amax / P::levels, inv = amax > 0.f ? P::levels / amax : 0.f;
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));  // to nearest, ties to even
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
    store16(xq + i * kQ, qa);
    store16(xq + i * kQ + 16, qb);
    scale[i] = s;
    corr[i] = -P::offset * s * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

template <typename P>
struct IntRows {  // M rows of quantized activations
  const typename P::X* q;
  const float *scale, *corr;
};

// out[m, (nb + j) * 16 : +16] for M rows and NB consecutive blocks: per scale group, 32 / per_lane dot
// instructions per row and block into int32 (|sum| < 32 * 255 * 127 or 32 * 127 * 32767 < 2^31), then
// acc += (sum * x_scale + corr) * w_scales.
template <typename P, int M, int NB>
inline void tile_int(const IntRows<P>& x, int64_t K, const typename P::W* w, const float* ws, float* out,
                     int64_t ldo, int64_t nb) {
  constexpr int64_t steps = kQ / P::per_lane, step_bytes = kBlock * P::per_lane;  // per group; per step
  const int64_t groups = K / kQ, block_bytes = K * kBlock;
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const typename P::W* wb = w + nb * block_bytes;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[M][NB];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NB; ++j) dot[m][j] = _mm512_setzero_si512();
    for (int64_t t = g * steps; t < (g + 1) * steps; ++t) {
      __m512i wv[NB];
      for (int j = 0; j < NB; ++j) {
        const typename P::W* p = wb + j * block_bytes + t * step_bytes;
        _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchQ8 * 64), _MM_HINT_T0);
        if constexpr (M >= kPrefetchL2Rows)
          _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchQ8L2 * 64), _MM_HINT_T1);
        wv[j] = load_weights(p);
      }
      for (int m = 0; m < M; ++m) {
        int32_t lane;  // this row's per_lane activations, 4 bytes
        std::memcpy(&lane, x.q + m * K + t * P::per_lane, 4);
        const __m512i xb = _mm512_set1_epi32(lane);
        for (int j = 0; j < NB; ++j) dot[m][j] = dot_lanes(dot[m][j], wv[j], xb, P{});
      }
    }
    __m512 sw[NB];
    for (int j = 0; j < NB; ++j) sw[j] = _mm512_loadu_ps(ws + ((nb + j) * groups + g) * kBlock);
    for (int m = 0; m < M; ++m) {
      const __m512 sx = _mm512_set1_ps(x.scale[m * groups + g]), c = _mm512_set1_ps(x.corr[m * groups + g]);
      for (int j = 0; j < NB; ++j)
        acc[m][j] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][j]), sx, c), sw[j], acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(out + m * ldo + (nb + j) * kBlock, acc[m][j]);
}

// Blocks [nb0, nb1) for M <= 8 rows, NB at a time (2 x M x NB accumulators in the 32 registers). Measured on
// the default model's shapes (q8): one block at a time is best for one row (one sequential weight stream per
// thread: 3.8 ms vs 4.3 ms for 2 or 4) and for 8 rows (5.4 ms vs 6.0-6.4 ms for 2 x 4 rows or 6 + 2).
template <typename P, int M>
void rows_int(const IntRows<P>& x, int64_t K, const typename P::W* w, const float* ws, float* out, int64_t ldo,
              int64_t nb0, int64_t nb1) {
  constexpr int NB = M == 1 ? 1 : M <= 2 ? 4 : M <= 4 ? 2 : 1;
  int64_t nb = nb0;
  for (; nb + NB <= nb1; nb += NB) tile_int<P, M, NB>(x, K, w, ws, out, ldo, nb);
  for (; nb < nb1; ++nb) tile_int<P, M, 1>(x, K, w, ws, out, ldo, nb);
}

template <typename P>
void gemm_int(const float* xp, const typename P::W* wp, const float* ws, float* op, int64_t m_total, int64_t k,
              int64_t blocks) {
  using RowsFn = void (*)(const IntRows<P>&, int64_t, const typename P::W*, const float*, float*, int64_t, int64_t,
                          int64_t);
  static constexpr RowsFn kRowsInt[8] = {rows_int<P, 1>, rows_int<P, 2>, rows_int<P, 3>, rows_int<P, 4>,
                                         rows_int<P, 5>, rows_int<P, 6>, rows_int<P, 7>, rows_int<P, 8>};
  const int64_t groups = k / kQ, n = blocks * kBlock;
  std::vector<typename P::X> q(m_total * k);
  std::vector<float> scale(m_total * groups), corr(m_total * groups);
  quantize_rows<P>(xp, m_total, k, q.data(), scale.data(), corr.data());
  over_tiles(blocks, m_total, [&](int64_t m0, int64_t rows, int64_t nb0, int64_t nb1) {
    const IntRows<P> x{q.data() + m0 * k, scale.data() + m0 * groups, corr.data() + m0 * groups};
    kRowsInt[rows - 1](x, k, wp, ws, op + m0 * n, n, nb0, nb1);
  });
}

#pragma GCC pop_options

bool has_vnni() { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"); }

// int8 [N, K] -> P's packed layout (above).
template <typename P>
at::Tensor pack_int(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, op, ": expected a 2-D int8 weight, got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kBlock == 0 && k % kQ == 0, op, ": expected output features a multiple of 16 and input "
              "features a multiple of 32, got [", n, ", ", k, "]");
  const at::Tensor stored = P::offset == 0.f ? weight : (weight.to(at::kShort) + 128).to(at::kByte);  // 1..255
  return stored.reshape({n / kBlock, kBlock, k / P::per_lane, P::per_lane}).permute({0, 2, 1, 3}).contiguous();
}
at::Tensor pack_a16(const at::Tensor& weight) { return pack_int<A16>("pack_a16", weight); }
at::Tensor pack_q8(const at::Tensor& weight) { return pack_int<Q8>("pack_q8", weight); }

// x [..., K] @ (int8 weight * scales).T (+ bias) -> [..., N] in x's dtype (float32 or bfloat16), x rounded to
// P's integers per row and 32 k. packed: P's layout from pack_a16 / pack_q8; scales: float32 [N / 16, K / 32,
// 16] (pack_linear of [N, K / 32]).
template <typename P>
at::Tensor linear_int(const char* op, const char* pack, const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  constexpr bool unsigned_weights = std::is_same_v<typename P::W, uint8_t>;
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlock && packed.size(3) == P::per_lane &&
                  packed.is_contiguous() && packed.scalar_type() == (unsigned_weights ? at::kByte : at::kChar) &&
                  packed.size(1) % (kQ / P::per_lane) == 0,
              op, ": expected ", unsigned_weights ? "a uint8" : "an int8", " weight packed by ", pack, " [N / 16, K / ",
              P::per_lane, ", 16, ", P::per_lane, "], got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(has_vnni(), op, ": this CPU has no AVX-512 VNNI");
  const int64_t k = packed.size(1) * P::per_lane, blocks = packed.size(0), n = blocks * kBlock;
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.size(-1) == k, op,
              ": expected a float32 or bfloat16 input [..., ", k, "], got ", dtype, " ", x.sizes());
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == blocks && scales.size(1) == k / kQ && scales.size(2) == kBlock &&
                  scales.is_contiguous() && scales.scalar_type() == at::kFloat,
              op, ": expected float32 scales packed by pack_linear [", blocks, ", ", k / kQ, ", 16], got ",
              scales.scalar_type(), " ", scales.sizes());
  const auto* wp = static_cast<const typename P::W*>(packed.data_ptr());
  return packed_gemm(op, x, n, bias, [&](const float* xp, float* out, int64_t m_total) {
    gemm_int<P>(xp, wp, scales.data_ptr<float>(), out, m_total, k, blocks);
  });
}
at::Tensor linear_a16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                      const std::optional<at::Tensor>& bias) {
  return linear_int<A16>("linear_a16", "pack_a16", x, packed, scales, bias);
}
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  return linear_int<Q8>("linear_q8", "pack_q8", x, packed, scales, bias);
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
      Scratch w;
      for (int64_t u = u0; u < u1; ++u) {
        const auto [r0, r1] = groups[u / kv_heads];
        const int64_t h = u % kv_heads;
        const HeadPages<T> kp{kbase + h * keys.stride(2), keys.stride(1), page_size, d};
        const HeadPages<T> vp{vbase + h * values.stride(2), values.stride(1), page_size, d};
        attend_unit(qf.data_ptr<float>(), out.data_ptr<float>(), kp, vp, tp, width, pp, op, r0, r1, h, heads, per_kv,
                    static_cast<float>(scale), w);
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
  m.def("linear_int8(Tensor x, Tensor packed, Tensor scales, Tensor? bias) -> Tensor");
  m.def("pack_q8(Tensor weight) -> Tensor");
  m.def("linear_q8(Tensor x, Tensor packed, Tensor scales, Tensor? bias) -> Tensor");
  m.def("pack_a16(Tensor weight) -> Tensor");
  m.def("linear_a16(Tensor x, Tensor packed, Tensor scales, Tensor? bias) -> Tensor");
  m.def("has_vnni() -> bool", has_vnni);  // no tensors: one kernel for every backend
  m.def("write_kv(Tensor(a!) keys, Tensor(b!) values, int layer, Tensor slots, Tensor k, Tensor v) -> ()");
  m.def("paged_attention(Tensor q, Tensor keys, Tensor values, int layer, Tensor block_tables, Tensor prefix_lens, "
        "Tensor own_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefix_server, CPU, m) {
  m.impl("linear", linear);
  m.impl("linear_int8", linear_int8);
  m.impl("linear_q8", linear_q8);
  m.impl("linear_a16", linear_a16);
  m.impl("paged_attention", paged_attention);
}

// ATen ops only: any device.
TORCH_LIBRARY_IMPL(prefix_server, CompositeExplicitAutograd, m) {
  m.impl("pack_linear", pack_linear);
  m.impl("pack_q8", pack_q8);
  m.impl("pack_a16", pack_a16);
  m.impl("write_kv", write_kv);
}
