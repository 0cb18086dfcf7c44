// CSR kernels for y = x W^T (+ b): W [out, in] stored row-wise as (row_ptr, col_idx, values).
//
// Two layouts of the same product, picked by batch size:
//  * batch 1: one sparse dot product per output row, gathering x[col] eight nonzeros at a
//    time (gather8). x (a few KB) stays in L1.
//  * batch >= 2: x is transposed once per call into tiles of TB batch rows, [in, TB]; every
//    nonzero W[o, i] then multiplies one contiguous TB-float row of the tile, so the inner
//    loop is a broadcast + vector FMA and each weight row is read once per tile.
// Both finish 8 output rows at a time (one transpose, vector scale/bias/store): with ~40
// nonzeros per row at 90% sparsity, per-row overhead otherwise costs as much as the row.
// pack_csr pads each row with zeros to a multiple of 8 nonzeros, so the row tails below
// (dot_scalar, the tail of row_tile) only run when row_multiple is not a multiple of 8.
// Rows are split across threads by nonzero count (see sparse_common.h).
// Each group's row pointers are checked before the group is read; int32 column indices
// too, and int16 ones are masked (see column_mask).
#include "sparse_common.h"

namespace graphopt {
namespace {

using namespace detail;

// The nonzeros of rows o0 .. o0 + nr - 1 (nr <= 8; the rest get empty rows) from the row
// pointer, checked: eight pointers with two vector loads and one compare. A row whose
// pointers are out of order or out of range is recorded and left empty.
inline void checked_row_ptrs8(const SparseProblem& p, int64_t o0, int nr, IndexErrors& err,
                              int64_t start[8], int64_t len[8]) {
  const int32_t* rp = p.row_ptr + o0;
#ifdef GRAPHOPT_AVX2
  if (nr == 8 && rp[0] >= 0 && rp[8] <= p.nnz) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rp));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rp + 1));
    const __m256i decreasing = _mm256_cmpgt_epi32(a, b);
    if (_mm256_testz_si256(decreasing, decreasing)) {
      const __m256i n = _mm256_sub_epi32(b, a);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(start), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(a)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(start + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(len), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(n)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(len + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(n, 1)));
      return;
    }
  }
#endif
  for (int r = 0; r < 8; ++r) {
    const int64_t s = r < nr ? rp[r] : 0, e = r < nr ? rp[r + 1] : 0;
    const bool ok = s >= 0 && s <= e && e <= p.nnz;
    if (!ok) err.bad_row_ptr.store(true, std::memory_order_relaxed);
    start[r] = ok ? s : 0;
    len[r] = ok ? e - s : 0;
  }
}

// Scalar part of a sparse dot product: the last n % 8 nonzeros of a row.
template <typename I, typename V>
inline float dot_scalar(const I* col, const V* val, int64_t k, int64_t n, const float* x, uint32_t mask) {
  float s0 = 0.f, s1 = 0.f;
  for (; k + 2 <= n; k += 2) {
    s0 += to_float(val[k]) * x[column(col[k], mask)];
    s1 += to_float(val[k + 1]) * x[column(col[k + 1], mask)];
  }
  if (k < n) s0 += to_float(val[k]) * x[column(col[k], mask)];
  return s0 + s1;
}

// Sparse dot product of one weight row with x, as a vector whose lanes sum to the result:
// eight nonzeros at a time (gather8), two accumulators so that consecutive FMAs do not wait
// on each other.
template <typename I, typename V>
inline v8f dot_row(const I* col, const V* val, int64_t n, const float* x, uint32_t mask) {
  int64_t k = 0;
  v8f a0 = v8f{}, a1 = v8f{};
  for (; k + 16 <= n; k += 16) {
    a0 += load8_as_float(val + k) * gather8(x, col + k, mask);
    a1 += load8_as_float(val + k + 8) * gather8(x, col + k + 8, mask);
  }
  if (k + 8 <= n) {
    a0 += load8_as_float(val + k) * gather8(x, col + k, mask);
    k += 8;
  }
  v8f r = a0 + a1;
  r[0] += dot_scalar(col, val, k, n, x, mask);
  return r;
}

// checked_row_ptrs8, and with int32 indices also each row's column indices (a row with one
// outside [0, in) is recorded and left empty); int16 ones are masked (see column_mask).
template <typename I>
inline void checked_group(const SparseProblem& p, const I* col, int64_t o0, int nr, IndexErrors& err,
                          int64_t start[8], int64_t len[8]) {
  checked_row_ptrs8(p, o0, nr, err, start, len);
  if constexpr (sizeof(I) == 4) {
    for (int r = 0; r < nr; ++r) {
      if (max_index(col + start[r], len[r]) > static_cast<uint32_t>(p.in - 1)) {
        err.bad_col_idx.store(true, std::memory_order_relaxed);
        len[r] = 0;
      }
    }
  }
}

template <typename I, typename V>
void csr_gather(const SparseProblem& p, IndexErrors& err) {
  const I* col = static_cast<const I*>(p.col_idx);
  const V* val = static_cast<const V*>(p.values);
  const uint32_t mask = column_mask<I>(p.in);
  parallel_rows<8>(p.row_ptr, p.out, p.nnz * p.m, [&](int64_t begin, int64_t end) {
    Scratch copy(0);
    int64_t stride;
    const float* x = rows_for_gather<I>(p, copy, stride);
    for (int64_t o0 = begin; o0 < end; o0 += 8) {
      const int nr = static_cast<int>(std::min<int64_t>(8, end - o0));
      int64_t start[8], len[8];
      checked_group(p, col, o0, nr, err, start, len);
      for (int64_t b = 0; b < p.m; ++b) {
        v8f acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = dot_row(col + start[r], val + start[r], len[r], x + b * stride, mask);
        const v8f sums = reduce8(acc);
        if (nr == 8) {
          const v8f sc = p.scales ? load8(p.scales + o0) : v8f{} + 1.f;
          const v8f bi = p.bias ? load8(p.bias + o0) : v8f{};
          store8(p.y + b * p.out + o0, sums * sc + bi);
        } else {
          for (int r = 0; r < nr; ++r) p.y[b * p.out + o0 + r] = finish(sums[r], p.scales, p.bias, o0 + r);
        }
      }
    }
  });
}

// res[0:NV] = sum_k val[k] * xt[col[k] & mask, 0:TB] for one weight row and one tile.
template <int TB, typename I, typename V>
inline void row_tile(const I* col, const V* val, int64_t n, const float* xt, uint32_t mask, v8f* res) {
  static_assert(TB % 8 == 0, "batch tiles are whole 8-float vectors");
  constexpr int NV = TB / 8;
  // S independent accumulator sets keep 8 vector FMA chains in flight: one chain would
  // wait on FMA latency (4 cycles) instead of issuing 2 per cycle.
  constexpr int S = NV >= 8 ? 1 : 8 / NV;
  v8f acc[S][NV];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) acc[s][q] = v8f{};
  int64_t k = 0;
  // Chunks of 8 nonzeros (S divides 8); int8 values are converted 8 at a time, and int16
  // indices read four to a 64-bit load: the loop is bound by loads (x rows, value broadcasts,
  // indices), and shifts are cheaper (36 MiniLM-shaped layers at 15 and 120 rows: -4 to -5%).
  for (; k + 8 <= n; k += 8) {
    alignas(32) float vconv[8];
    if constexpr (sizeof(V) == 1) store8(vconv, load8_as_float(val + k));
    uint64_t idx4[2];
    if constexpr (sizeof(I) == 2) std::memcpy(idx4, col + k, sizeof idx4);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const float v = sizeof(V) == 1 ? vconv[j] : to_float(val[k + j]);
      const int64_t c = sizeof(I) == 2 ? static_cast<int64_t>((idx4[j / 4] >> (16 * (j % 4))) & mask)
                                       : static_cast<int64_t>(col[k + j]);
      const float* xr = xt + c * TB;
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) acc[j % S][q] += v * load8(xr + 8 * q);
    }
  }
  // The tail also spreads over the accumulator sets: on one set its FMAs would form a
  // serial chain, which costs more than the loop above on short rows.
#pragma GCC unroll 8
  for (int j = 0; j < 7; ++j) {
    if (k + j >= n) break;
    const float v = to_float(val[k + j]);
    const float* xr = xt + static_cast<int64_t>(column(col[k + j], mask)) * TB;
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) acc[j % S][q] += v * load8(xr + 8 * q);
  }
  // Pairwise, so the reduction is log2(S) additions deep.
#pragma GCC unroll 8
  for (int w = 1; w < S; w *= 2)
#pragma GCC unroll 8
    for (int s = 0; s + w < S; s += 2 * w)
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) acc[s][q] += acc[s + w][q];
#pragma GCC unroll 8
  for (int q = 0; q < NV; ++q) res[q] = acc[0][q];
}

// The last tile is allocated with column_guard rows after it, for the mask.
template <int TB, typename I, typename V>
void csr_tiles(const SparseProblem& p, IndexErrors& err) {
  constexpr int NV = TB / 8;
  const I* col = static_cast<const I*>(p.col_idx);
  const V* val = static_cast<const V*>(p.values);
  const uint32_t mask = column_mask<I>(p.in);
  const int64_t tiles = (p.m + TB - 1) / TB;
  parallel_rows<8>(p.row_ptr, p.out, p.nnz * p.m, [&](int64_t begin, int64_t end) {
    const Scratch buf = local_tiles(p, p.in, column_guard<I>(p.in), TB);
    const float* xt = buf.get();
    // Blocks of rows whose weights fit in L2 (~192 KB), then tile by tile: a tile of x
    // (sized to stay in L2 too) serves the whole block while its weights are reused
    // from L2. Row-major order would cycle every tile through L2 for each row; pure
    // tile-major re-streams all weights per tile from DRAM on big layers (measured both).
    const int64_t block_nnz = 192 * 1024 / (sizeof(I) + sizeof(V));
    for (int64_t rb = begin; rb < end;) {
      int64_t re = rb;
      const int64_t first = std::max<int64_t>(0, p.row_ptr[rb]);
      while (re < end && (re == rb || p.row_ptr[re] - first < block_nnz)) re = std::min(end, re + 8);
      for (int64_t t = 0; t < tiles; ++t) {
        const float* xtt = xt + t * p.in * TB;
        for (int64_t o0 = rb; o0 < re; o0 += 8) {
          const int nr = static_cast<int>(std::min<int64_t>(8, re - o0));
          v8f res[NV][8];
          int64_t start[8], len[8];
          // int32 indices are checked here, once per tile, rather than once per block before
          // the tiles: the check then brings these rows' indices into L1 for the products
          // (hoisted, 36 MiniLM-shaped layers in sequence ran 2-7% slower at 120 and 15 rows).
          checked_group(p, col, o0, nr, err, start, len);
          for (int r = 0; r < 8; ++r) {
            v8f row[NV];
            row_tile<TB>(col + start[r], val + start[r], len[r], xtt, mask, row);
            for (int q = 0; q < NV; ++q) res[q][r] = row[q];
          }
          for (int q = 0; q < NV; ++q) {
            const int64_t b0 = t * TB + 8 * q;
            if (b0 >= p.m) break;
            const int nb = static_cast<int>(std::min<int64_t>(8, p.m - b0));
            store_rows8(res[q], nr, nb, p.y, p.out, b0, o0, p.scales, p.bias);
          }
        }
      }
      rb = re;
    }
  });
}

template <typename I, typename V>
void csr_dispatch(const SparseProblem& p, IndexErrors& err) {
  if (p.m == 1) return csr_gather<I, V>(p, err);
  with_tile_width(p.m, p.in, [&](auto tb) { csr_tiles<decltype(tb)::value, I, V>(p, err); });
}

}  // namespace

void csr_forward(const SparseProblem& p, IndexErrors& err) {
  detail::with_types(p, [&](auto i, auto v) { csr_dispatch<decltype(i), decltype(v)>(p, err); });
}

}  // namespace graphopt
