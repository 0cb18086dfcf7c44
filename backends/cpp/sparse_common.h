// Shared pieces of graphopt's kernels (sparse x dense linear layers, attention, GELU):
// threading plan, the transposed-activation layout, SIMD helpers and the kernel entry points.
//
// Hand-written because no maintained library multiplies a sparse weight by a dense
// activation fast on CPU for Transformer shapes: torch.sparse and scipy stay slower than
// dense MKL/oneDNN below about 90% sparsity (measured), MKL's sparse BLAS is not exposed
// by torch, and DeepSparse is closed and unmaintained.
#pragma once

// Kernel files include no torch header: the torch headers cost ~10 s of compile time per
// file, and the kernels only need raw pointers.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GRAPHOPT_AVX2 1
#endif

namespace graphopt {

// Problem description shared by all kernels. Weight rows are output features.
struct SparseProblem {
  const float* x;          // [m, in] row-major activations
  float* y;                // [m, out] row-major result
  const int32_t* row_ptr;  // [n_row_groups + 1]
  const void* col_idx;     // int16 or int32 [nnz] (CSR) / [n_blocks] (BSR, in block units)
  const void* values;      // float or int8 [nnz] / [n_blocks, R, C]
  const float* scales;     // [out] per-row dequantisation scales, or nullptr
  const float* bias;       // [out] or nullptr
  const int32_t* row_order = nullptr;  // SELL: output row of each slice lane, -1 = padding
  // SELL-P's layers (row_ptr: the slices' offsets in groups, col_idx: each group's block):
  const int32_t* layer_ptr = nullptr;  // the slices' offsets in layers
  const uint8_t* lanes = nullptr;      // [layers, 16] each lane's column within its group's block
  int64_t layers = 0;
  int64_t m;               // batch rows (all leading dims of x flattened)
  int64_t in;              // in_features
  int64_t out;             // out_features
  int64_t n_groups;        // CSR: out; BSR: ceil(out / R); SELL: ceil(out / 8) slices; SELL-P: ceil(out / 16)
  int64_t nnz;             // CSR: nonzeros; BSR: stored blocks; SELL: slice entries; SELL-P: groups or entries
  bool idx16;              // col_idx is int16
  bool val8;               // values are int8 (then scales != nullptr)
};

// Set by a kernel that met malformed index data; checked after the parallel region
// because exceptions must not leave an OpenMP region.
struct IndexErrors {
  std::atomic<bool> bad_row_ptr{false};
  std::atomic<bool> bad_col_idx{false};
  std::atomic<bool> bad_row_order{false};
};

// Scaled dot-product attention on strided [batch, heads, tokens, head_dim] views (last dim
// contiguous): out = softmax(q k^T * scale + mask) v, per (batch, head) pair.
struct AttentionProblem {
  const float* q;
  const float* k;
  const float* v;
  const float* mask;  // additive, [batch, heads, queries, keys] strides (0 = broadcast), or nullptr
  float* out;
  int64_t batch, heads, queries, keys, head_dim;  // head_dim a multiple of 8
  int64_t q_stride[3], k_stride[3], v_stride[3], mask_stride[3], out_stride[3];  // batch, head, token
  float scale;
};

void attention_forward(const AttentionProblem& p);
// y[i] = GELU(x[i]) (the exact, erf form), i < n.
void gelu_forward(const float* x, float* y, int64_t n);
void csr_forward(const SparseProblem& p, IndexErrors& err);
void bsr_forward(const SparseProblem& p, int block_r, int block_c, IndexErrors& err);
void sell_forward(const SparseProblem& p, IndexErrors& err);
// SELL-P: `layers` and `entries` share x, y, row_order and the shapes; their errors are kept
// apart so that a message can name the bad tensor (layer_block or col_idx).
void sellp_forward(const SparseProblem& layers, const SparseProblem& entries, IndexErrors& layer_err,
                   IndexErrors& entry_err);

namespace detail {

// Below this many multiply-adds per thread, waking a second thread (~1-2 us with libgomp's
// spinning pool) costs about what it saves: ~24k multiply-adds is 3-5 us on one core.
// Chosen from that estimate; the shared development machine was too noisy to tune it.
constexpr int64_t kParallelMinWork = 24 * 1024;
// Per-row cost, in nonzeros, used to balance rows across threads.
constexpr int64_t kRowCost = 8;

// torch's CPU build uses OpenMP (the same libgomp, by soname), and torch.set_num_threads
// sets omp_set_num_threads, so this follows torch's thread setting; inside a parallel
// region (a caller already split the work) it stays on one thread.
inline int plan_threads(int64_t work) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  const int64_t by_work = std::max<int64_t>(1, work / kParallelMinWork);
  return static_cast<int>(std::min<int64_t>(omp_get_max_threads(), by_work));
#else
  (void)work;
  return 1;
#endif
}

// Calls f(I{}, V{}) with the problem's index type (int16_t / int32_t) and value type
// (int8_t / float), so each kernel family instantiates its four variants in one place.
template <typename F>
inline void with_types(const SparseProblem& p, F&& f) {
  if (p.idx16) {
    if (p.val8) f(int16_t{}, int8_t{}); else f(int16_t{}, float{});
  } else {
    if (p.val8) f(int32_t{}, int8_t{}); else f(int32_t{}, float{});
  }
}

// Uninitialised 64-byte-aligned float scratch.
struct Scratch {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64 * 64;
    ptr.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!ptr) throw std::bad_alloc();
  }
  float* get() const { return ptr.get(); }
};

// Splits row groups [0, n) into nt parts of equal (nonzeros + kRowCost * rows), with inner
// boundaries on multiples of Align: 8 for CSR, whose kernels finish 8 rows with one vector
// store. Only those that need it align: a SELL-P weight of 384 rows is 24 slices, and with
// boundaries on multiples of 8 two threads split it 8/16, one doing twice the other's work.
// A malformed row_ptr only unbalances the split; the kernels check each row.
template <int Align, typename R>
inline std::vector<int64_t> split_rows(const R* rp, int64_t n, int nt) {
  std::vector<int64_t> b(nt + 1, n);
  b[0] = 0;
  const int64_t total = static_cast<int64_t>(rp[n]) + kRowCost * n;
  for (int t = 1; t < nt; ++t) {
    const int64_t target = total * t / nt;
    int64_t lo = b[t - 1], hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(rp[mid]) + kRowCost * mid < target) lo = mid + 1; else hi = mid;
    }
    b[t] = std::min(n, std::max(b[t - 1], (lo + Align / 2) / Align * Align));
  }
  return b;
}

// Calls f(std::integral_constant<int, TB>{}) with the batch-tile width for m rows of in
// features: the widest tile that covers the batch and keeps [in, TB] floats within ~256 KB,
// half of a Zen 3 / Skylake-SP L2 (a quarter of Zen 4's 1 MB), beside the streaming weights.
template <typename F>
inline void with_tile_width(int64_t m, int64_t in, F&& f) {
  const int64_t fit = (256 * 1024 / 4) / std::max<int64_t>(in, 1);
  if (m <= 8) return f(std::integral_constant<int, 8>{});
  if (m <= 16 || fit < 32) return f(std::integral_constant<int, 16>{});
  if (m <= 32 || fit < 64) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 64>{});
}

// Runs f(begin, end) over balanced row-group ranges, on one thread when the work is small.
// rp: the row groups' cumulative work (a row pointer, or any nondecreasing prefix sum);
// inner range boundaries are multiples of Align (see split_rows).
template <int Align = 1, typename R, typename F>
inline void parallel_rows(const R* rp, int64_t n, int64_t work, const F& f) {
  const int nt = plan_threads(work);
  if (nt <= 1 || n < 2) {
    f(int64_t{0}, n);
    return;
  }
  const std::vector<int64_t> b = split_rows<Align>(rp, n, nt);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    for (int t = omp_get_thread_num(); t < nt; t += omp_get_num_threads()) f(b[t], b[t + 1]);
  }
#else
  for (int t = 0; t < nt; ++t) f(b[t], b[t + 1]);
#endif
}

template <typename F>
inline void parallel_range(int64_t n, int64_t work, const F& f) {
  const int nt = static_cast<int>(std::min<int64_t>(plan_threads(work), n));
  if (nt <= 1) {
    f(int64_t{0}, n);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    for (int t = omp_get_thread_num(); t < nt; t += omp_get_num_threads())
      f(n * t / nt, n * (t + 1) / nt);
  }
#else
  for (int t = 0; t < nt; ++t) f(n * t / nt, n * (t + 1) / nt);
#endif
}

// Eight floats in a GCC/Clang vector: the batch-tile loops are written with it rather
// than with intrinsics so that they compile for any x86 level (two SSE registers without
// AVX), and because GCC scalarises plain float accumulator arrays instead (measured).
// Needs -ffp-contract=fast to become FMAs under -std=c++20.
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

template <typename V>
inline float to_float(V v) { return static_cast<float>(v); }

// Largest index in col[0:n], read as unsigned so that negative ones count as huge. The
// kernels check each row with it before using the row (an out-of-range row is skipped
// and reported), which keeps bounds checks out of the inner loops; it is a vectorised
// pass over data that the row then reads from L1 anyway.
inline uint32_t max_index(const int16_t* c, int64_t n) {
  uint16_t m = 0;
  int64_t i = 0;
#ifdef GRAPHOPT_AVX2
  // GCC leaves this reduction scalar (cmov per element); rows are short, so it showed.
  if (n >= 16) {
    __m256i v = _mm256_setzero_si256();
    for (; i + 16 <= n; i += 16) v = _mm256_max_epu16(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i)));
    __m128i h = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    // max of 8 unsigned 16-bit lanes = ~min of their complements.
    h = _mm_minpos_epu16(_mm_xor_si128(h, _mm_set1_epi16(-1)));
    m = static_cast<uint16_t>(~_mm_cvtsi128_si32(h));
  }
#endif
  for (; i < n; ++i) m = std::max(m, static_cast<uint16_t>(c[i]));
  return m;
}
inline uint32_t max_index(const int32_t* c, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, static_cast<uint32_t>(c[i]));
  return m;
}

#ifdef GRAPHOPT_AVX2
inline __m256 load_val8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_val8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

#ifdef GRAPHOPT_AVX2
// In-register transpose of 8 rows of 8 floats.
inline void transpose8x8(__m256 r[8]) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// Batch tiles of the transposed activations: tile t holds rows [t*TB, t*TB+TB) of x as an
// [in_pad, TB] row-major block, zero-padded. Each weight nonzero W[o, i] then needs one
// contiguous TB-float row of a tile, so the inner loop is a plain vector FMA.
inline void transpose_tiles(const float* x, int64_t m, int64_t in, int64_t in_pad, int tb,
                            float* xt) {
  const int64_t groups = (m + 7) / 8;  // 8 batch rows at a time
  [[maybe_unused]] const int64_t in8 = in / 8 * 8;
  parallel_range(groups, m * in * 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * 8;
      float* dst = xt + (b0 / tb) * in_pad * tb + (b0 % tb);
      const float* src[8];
      for (int j = 0; j < 8; ++j) src[j] = b0 + j < m ? x + (b0 + j) * in : nullptr;
      int64_t i = 0;
#ifdef GRAPHOPT_AVX2
      for (; i < in8; i += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = src[j] ? _mm256_loadu_ps(src[j] + i) : _mm256_setzero_ps();
        transpose8x8(r);
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(dst + (i + q) * tb, r[q]);
      }
#endif
      for (; i < in_pad; ++i)
        for (int j = 0; j < 8; ++j) dst[i * tb + j] = (src[j] && i < in) ? src[j][i] : 0.f;
    }
  });
}

// Writes one output element: y = acc * scale + bias.
inline float finish(float acc, const float* scales, const float* bias, int64_t o) {
  if (scales) acc *= scales[o];
  if (bias) acc += bias[o];
  return acc;
}

// r[i][j] <- r[j][i] for an 8 x 8 block held as 8 vectors.
inline void transpose8(v8f r[8]) {
#ifdef GRAPHOPT_AVX2
  __m256 m[8];
  for (int i = 0; i < 8; ++i) m[i] = (__m256)r[i];
  transpose8x8(m);
  for (int i = 0; i < 8; ++i) r[i] = (v8f)m[i];
#else
  float t[8][8];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) t[j][i] = r[i][j];
  for (int i = 0; i < 8; ++i) r[i] = load8(t[i]);
#endif
}

// Lane r of the result is the sum of the lanes of v[r].
inline v8f reduce8(const v8f v[8]) {
#ifdef GRAPHOPT_AVX2
  const __m256 t0 = _mm256_hadd_ps((__m256)v[0], (__m256)v[1]);
  const __m256 t1 = _mm256_hadd_ps((__m256)v[2], (__m256)v[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)v[4], (__m256)v[5]);
  const __m256 t3 = _mm256_hadd_ps((__m256)v[6], (__m256)v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return (v8f)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  v8f r;
  for (int i = 0; i < 8; ++i) {
    float s = 0.f;
    for (int j = 0; j < 8; ++j) s += v[i][j];
    r[i] = s;
  }
  return r;
#endif
}

// e^x for eight floats (Cephes' expf: 2^n * p(r), |r| <= ln2/2, degree-5 polynomial; rel.
// error ~1e-7 on [-87, 88], 0 below -87.3). Torch's own vectorised exp is the same method.
inline v8f exp8(v8f x) {
#ifdef GRAPHOPT_AVX2
  __m256 v = _mm256_max_ps(_mm256_min_ps((__m256)x, _mm256_set1_ps(88.3762626647949f)),
                           _mm256_set1_ps(-87.3365447504f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
  v = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), v);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(v, v), _mm256_add_ps(v, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  // Below the clamp the result is 0, as exp underflows (fully masked keys contribute nothing).
  const __m256 tiny = _mm256_cmp_ps((__m256)x, _mm256_set1_ps(-87.3365447504f), _CMP_LT_OQ);
  return (v8f)_mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = std::exp(x[i]);
  return r;
#endif
}

// Column indices of int16 are not checked by the kernels on every call: the ops check each
// index tensor once (ops.cpp; a pass over the indices on every call cost ~7% of a 15-row
// product and ~13% of a one-row one). For memory safety the kernels read column c & mask
// instead, mask = 2^k - 1 >= in - 1, of x or x's tiles padded to 2^k columns (rows): an
// index changed behind the ops' check (through .data, or numpy) gives a wrong result, never
// a read outside the buffers. int32 indices are checked as the kernels go, and not masked.
template <typename I>
inline uint32_t column_mask(int64_t in) {
  if constexpr (sizeof(I) == 4) return ~0u;
  return std::bit_ceil(static_cast<uint32_t>(std::clamp<int64_t>(in - 1, 0, 0xffff)) + 1) - 1;
}

// Columns (rows of a tile) that a buffer of `in` needs after it for column_mask<I>(in).
template <typename I>
inline int64_t column_guard(int64_t in) {
  if constexpr (sizeof(I) == 4) return 0;
  return std::max<int64_t>(0, int64_t{column_mask<I>(in)} + 1 - in);
}

// Column c & mask (int16 indices; see column_mask), or column c (int32).
template <typename I>
inline uint32_t column(I c, uint32_t mask) {
  return sizeof(I) == 2 ? static_cast<uint16_t>(c) & mask : static_cast<uint32_t>(c);
}

// A copy [m, in_pad] of x with each row zero-padded from in to in_pad columns.
inline Scratch padded_rows(const SparseProblem& p, int64_t in_pad) {
  Scratch xp(p.m * in_pad);
  float* d = xp.get();
  for (int64_t b = 0; b < p.m; ++b) {
    std::memcpy(d + b * in_pad, p.x + b * p.in, p.in * sizeof(float));
    std::fill(d + b * in_pad + p.in, d + (b + 1) * in_pad, 0.f);
  }
  return xp;
}

// Copies of x for the kernels' threads. Each is made inside parallel_rows' body, by the thread
// that reads it, so that it sits in that thread's cache: read from the thread that made it,
// the randomly indexed rows cross cores, and two threads then took longer than one (batch 8,
// CSR 384x1536 at 90%: 36.4 against 32.6 us; 22.2 us with a copy each).

// Whether this is the thread that called the op (it has x in its cache).
inline bool on_calling_thread() {
#ifdef _OPENMP
  return omp_get_thread_num() == 0;
#else
  return true;
#endif
}

// x transposed into [in_pad, TB] tiles (see transpose_tiles), followed by `guard` rows.
inline Scratch local_tiles(const SparseProblem& p, int64_t in_pad, int64_t guard, int TB) {
  const int64_t tiles = (p.m + TB - 1) / TB;
  Scratch buf((tiles * in_pad + guard) * TB);
  transpose_tiles(p.x, p.m, p.in, in_pad, TB, buf.get());
  return buf;
}

// x's rows with stride floats each, zero-padded past in: x itself on the calling thread when
// stride == in, else a copy into `copy`.
inline const float* local_rows(const SparseProblem& p, int64_t stride, Scratch& copy) {
  if (stride == p.in && on_calling_thread()) return p.x;
  copy = padded_rows(p, stride);
  return copy.get();
}

// The rows of x that gather8 reads with indices of type I (local_rows): for int16, padded
// for column_mask. Sets the rows' stride.
template <typename I>
inline const float* rows_for_gather(const SparseProblem& p, Scratch& copy, int64_t& stride) {
  stride = p.in + column_guard<I>(p.in);
  return local_rows(p, stride, copy);
}

// x[c[0]], ..., x[c[7]] as a vector, from eight scalar loads; int16 indices are read as
// c & mask (see column_mask), int32 ones the caller has checked against x's length. Not
// AVX2's vgatherdps: on Zen 3 that is slower than scalar loads inserted into a vector (0.47
// against 0.27 ns a nonzero in a sparse dot product, measured on an earlier Zen 3 host);
// int16 indices are read four to a 64-bit load, which frees load slots (0.32 -> 0.27 ns).
// With Bextr (and BMI1), each int16 index is one bextr instruction (shift and mask, no register
// copy): 0.85-0.93x the time of shift-and-mask in the batch-1 SELL kernel, but 1.01-1.06x in
// CSR's (its row tails hold more registers; random 90%/70% MiniLM shapes, one core).
template <typename I, bool Bextr = false>
inline v8f gather8(const float* x, const I* c, uint32_t mask) {
  if constexpr (sizeof(I) == 2) {
    uint64_t lo, hi;
    std::memcpy(&lo, c, sizeof lo);
    std::memcpy(&hi, c + 4, sizeof hi);
#if defined(__BMI__) && defined(GRAPHOPT_AVX2)  // immintrin.h is included with AVX2
    if constexpr (Bextr) {
      // Kept in registers: GCC otherwise folds the loads into the bextrs, 8 loads instead of 2.
      asm("" : "+r"(lo), "+r"(hi));
      const unsigned bits = std::popcount(mask);
      return v8f{x[_bextr_u64(lo, 0, bits)], x[_bextr_u64(lo, 16, bits)], x[_bextr_u64(lo, 32, bits)],
                 x[_bextr_u64(lo, 48, bits)], x[_bextr_u64(hi, 0, bits)], x[_bextr_u64(hi, 16, bits)],
                 x[_bextr_u64(hi, 32, bits)], x[_bextr_u64(hi, 48, bits)]};
    }
#endif
    return v8f{x[lo & mask], x[(lo >> 16) & mask], x[(lo >> 32) & mask], x[(lo >> 48) & mask],
               x[hi & mask], x[(hi >> 16) & mask], x[(hi >> 32) & mask], x[(hi >> 48) & mask]};
  } else {
    const uint32_t* u = reinterpret_cast<const uint32_t*>(c);
    return v8f{x[u[0]], x[u[1]], x[u[2]], x[u[3]], x[u[4]], x[u[5]], x[u[6]], x[u[7]]};
  }
}

// Eight values as floats (int8 values converted with one vector instruction).
template <typename V>
inline v8f load8_as_float(const V* p) {
  if constexpr (sizeof(V) == 4) {
    return load8(reinterpret_cast<const float*>(p));
  } else {
#ifdef GRAPHOPT_AVX2
    return (v8f)load_val8(p);
#else
    v8f r;
    for (int i = 0; i < 8; ++i) r[i] = static_cast<float>(p[i]);
    return r;
#endif
  }
}

// Sum of n SELL entries' products for 8 rows of a slice (lane r = row r): each entry holds 8
// column indices c and 8 values v, one per lane. Two accumulators so that consecutive FMAs do
// not wait on each other; indices through bextr (see gather8).
template <typename I, typename V>
inline v8f sell_entries_dot(const float* x, const I* c, const V* v, int64_t n, uint32_t mask) {
  v8f a0 = v8f{}, a1 = v8f{};
  int64_t k = 0;
  for (; k + 2 <= n; k += 2) {
    a0 += load8_as_float(v + 8 * k) * gather8<I, true>(x, c + 8 * k, mask);
    a1 += load8_as_float(v + 8 * (k + 1)) * gather8<I, true>(x, c + 8 * (k + 1), mask);
  }
  if (k < n) a0 += load8_as_float(v + 8 * k) * gather8<I, true>(x, c + 8 * k, mask);
  return a0 + a1;
}

// A zeroed [m, n_lanes] buffer of lane sums for store_lanes: the lanes of a slice skipped for
// bad data stay 0.
inline Scratch lane_sums(int64_t m, int64_t n_lanes) {
  Scratch sums(m * n_lanes);
  std::fill_n(sums.get(), m * n_lanes, 0.f);
  return sums;
}

// Stores lane sums to their output rows, after the threads that computed them have joined:
// sums[b * n_lanes + i] is lane i's sum for batch row b, and rows[i] its output row (SELL's
// row_order: -1 for padding lanes; one outside [0, out) is recorded as an error). y is zeroed
// first, so rows no lane names stay defined.
// Why after the join: sorted rows put every thread's lanes on every cache line of y, and
// scattered stores from two cores then pass the lines back and forth; at batch 1 this made
// two threads slower than one (SELL-P 384x1536 at 90%: 13.1 against 10.6 us; 1536x384: 20.3
// against 13.2). Storing after the join, with each thread's own copy of x, took that to 11.3
// and 13.3 us.
// p's fields are copied into the loop's closure by value: read through p, stores through y could
// alias them and GCC reloaded four of them for every lane (~1 us of a 10 us SELL-P call at 384
// rows); through references captured by the closure it still reloaded scales and bias.
inline void store_lanes(const float* sums, int64_t n_lanes, const int32_t* rows, const SparseProblem& p,
                        IndexErrors& err) {
  float* const y = p.y;
  const float* const scales = p.scales;
  const float* const bias = p.bias;
  const int64_t out = p.out;
  // By batch rows: one thread at batch 1, where the threads' sums are ~1.5 KB.
  parallel_range(p.m, p.m * n_lanes, [=, &err](int64_t b0, int64_t b1) {
    bool bad = false;
    std::fill(y + b0 * out, y + b1 * out, 0.f);
    for (int64_t b = b0; b < b1; ++b) {
      float* const yb = y + b * out;
      const float* const sb = sums + b * n_lanes;
      for (int64_t i = 0; i < n_lanes; ++i) {
        const int64_t o = rows[i];
        if (static_cast<uint64_t>(o) >= static_cast<uint64_t>(out)) {  // padding (-1), or bad
          bad |= o >= 0;
          continue;
        }
        yb[o] = finish(sb[i], scales, bias, o);
      }
    }
    if (bad) err.bad_row_order.store(true, std::memory_order_relaxed);
  });
}

// Finishes a block of outputs: res[r][j] is output row o0 + r (r < nr) for batch row
// b0 + j (j < nb). One transpose turns it into 8 contiguous outputs per batch row, so
// scale and bias are applied and stored as vectors instead of 64 strided scalars.
inline void store_rows8(v8f res[8], int nr, int nb, float* y, int64_t out, int64_t b0, int64_t o0,
                        const float* scales, const float* bias) {
  transpose8(res);
  if (nr == 8) {
    const v8f sc = scales ? load8(scales + o0) : v8f{} + 1.f;
    const v8f bi = bias ? load8(bias + o0) : v8f{};
    for (int j = 0; j < nb; ++j) store8(y + (b0 + j) * out + o0, res[j] * sc + bi);
    return;
  }
  for (int j = 0; j < nb; ++j)
    for (int r = 0; r < nr; ++r) y[(b0 + j) * out + o0 + r] = finish(res[j][r], scales, bias, o0 + r);
}

}  // namespace detail
}  // namespace graphopt
