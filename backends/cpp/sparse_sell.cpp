// SELL-8 kernels for y = x W^T (+ b): W [out, in] as a sliced ELLPACK matrix (SELL-C-sigma
// of Kreutzer et al., 2014, with C = 8 and sigma = all rows).
//
// Rows are sorted by nonzero count (longest first) and cut into slices of 8; slice s holds
// its 8 rows side by side, padded with zeros to its longest row: entry k of the slice is 8
// column indices and 8 values, one per row. So one slice entry is one 8-lane gather of x
// and one FMA into an accumulator whose lanes *are* the 8 rows: no per-row tail and no
// horizontal reduction. It exists for short rows, where CSR's per-row work dominates
// (1536x384 at 90% is ~38 nonzeros a row):
//  * batch 1: measured 23 us against CSR's 35 us on one core (standalone harness);
//  * batch >= 2 (sell_tiles): x is transposed into [in, TB] tiles as for CSR, and slice entry
//    k adds v[k][r] * xt[c[k][r], 8q:8q+8] into row r's accumulator: 8 independent FMA chains
//    per 8 batch columns, no per-row reduction, tail or FMA-latency stall. CSR instead pays
//    ~30 ns a row for those (measured at 15 batch rows: 1536x384 at 90%, 110 us for 59k
//    nonzeros against 62 us for as many on 384x1536's 4x longer rows).
//
// row_order[8 s + r] is the output row of lane r of slice s, or -1 for the padding lanes of
// the last slice. Each slice's pointer is checked before the slice is read, and its int32
// column indices too (one vectorised max over data the slice then reads from L1); int16 ones
// are masked (see column_mask). So malformed data gives an error, or for int16 indices
// changed behind the ops' check a wrong result, and never an out-of-bounds read.
#include "sparse_common.h"

namespace graphopt {
namespace {

using namespace detail;

// Slice s's entries: its n entries start at column indices c and values v. False, with the
// error recorded, for a bad slice pointer or int32 column index, and the slice is skipped.
template <typename I, typename V>
bool checked_slice(const SparseProblem& p, int64_t s, IndexErrors& err, const I*& c, const V*& v, int64_t& n) {
  const int64_t k0 = p.row_ptr[s], k1 = p.row_ptr[s + 1];
  if (k0 < 0 || k0 > k1 || k1 > p.nnz) {
    err.bad_row_ptr.store(true, std::memory_order_relaxed);
    return false;
  }
  c = static_cast<const I*>(p.col_idx) + 8 * k0;
  v = static_cast<const V*>(p.values) + 8 * k0;
  n = k1 - k0;
  if (sizeof(I) == 4 && max_index(c, 8 * n) > static_cast<uint32_t>(p.in - 1)) {
    err.bad_col_idx.store(true, std::memory_order_relaxed);
    return false;
  }
  return true;
}

// Both kernels leave each slice's sums in lane order, sums[b * n_lanes + 8 s + r], and store
// them to y after the threads join (store_lanes): sorted rows scatter every thread's stores
// over all of y's cache lines (batch 8, 1536x384 at 90% on 2 threads: 72 us, against 40 on one;
// 42 with the lanes stored after the join and x's tiles made by each thread).

template <typename I, typename V>
void sell_rows(const SparseProblem& p, IndexErrors& err) {
  const uint32_t mask = column_mask<I>(p.in);
  const int64_t n_lanes = 8 * p.n_groups;
  const Scratch sums = lane_sums(p.m, n_lanes);
  parallel_rows(p.row_ptr, p.n_groups, p.nnz * 8 * p.m, [&](int64_t begin, int64_t end) {
    Scratch copy(0);
    int64_t stride;
    const float* x = rows_for_gather<I>(p, copy, stride);
    for (int64_t s = begin; s < end; ++s) {
      const I* c;
      const V* v;
      int64_t n;
      if (!checked_slice(p, s, err, c, v, n)) continue;
      for (int64_t b = 0; b < p.m; ++b)
        store8(sums.get() + b * n_lanes + 8 * s, sell_entries_dot(x + b * stride, c, v, n, mask));
    }
  });
  store_lanes(sums.get(), n_lanes, p.row_order, p, err);
}

// Slice entries are processed LR lanes (rows) at a time with all NV vectors of the tile:
// LR * NV = 8 accumulators, so each nonzero costs one broadcast and NV loads and FMAs (as in
// CSR) and the registers hold accumulators, loads and broadcasts without spilling.
template <int TB, typename I, typename V>
void sell_tiles(const SparseProblem& p, IndexErrors& err) {
  constexpr int NV = TB / 8;
  constexpr int LR = 8 / NV > 0 ? 8 / NV : 1;
  const uint32_t mask = column_mask<I>(p.in);
  const int64_t tiles = (p.m + TB - 1) / TB;
  const int64_t n_lanes = 8 * p.n_groups;
  const Scratch sums = lane_sums(p.m, n_lanes);
  parallel_rows(p.row_ptr, p.n_groups, p.nnz * 8 * p.m, [&](int64_t begin, int64_t end) {
    const Scratch buf = local_tiles(p, p.in, column_guard<I>(p.in), TB);
    for (int64_t s = begin; s < end; ++s) {
      const I* c;
      const V* v;
      int64_t n;
      if (!checked_slice(p, s, err, c, v, n)) continue;
      for (int64_t t = 0; t < tiles; ++t) {
        const float* xtt = buf.get() + t * p.in * TB;
        for (int r0 = 0; r0 < 8; r0 += LR) {
          v8f acc[LR][NV];
          for (int r = 0; r < LR; ++r)
            for (int q = 0; q < NV; ++q) acc[r][q] = v8f{};
          for (int64_t k = 0; k < n; ++k) {
#pragma GCC unroll 8
            for (int r = 0; r < LR; ++r) {
              const float wr = to_float(v[8 * k + r0 + r]);
              const float* xr = xtt + static_cast<int64_t>(column(c[8 * k + r0 + r], mask)) * TB;
#pragma GCC unroll 8
              for (int q = 0; q < NV; ++q) acc[r][q] += wr * load8(xr + 8 * q);
            }
          }
          for (int r = 0; r < LR; ++r) {
            float* const lane = sums.get() + 8 * s + r0 + r;
            for (int q = 0; q < NV; ++q) {
              const int64_t b0 = t * TB + 8 * q;
              for (int j = 0; j < 8 && b0 + j < p.m; ++j) lane[(b0 + j) * n_lanes] = acc[r][q][j];
            }
          }
        }
      }
    }
  });
  store_lanes(sums.get(), n_lanes, p.row_order, p, err);
}

template <typename I, typename V>
void sell_dispatch(const SparseProblem& p, IndexErrors& err) {
  if (p.m == 1) return sell_rows<I, V>(p, err);
  with_tile_width(p.m, p.in, [&](auto tb) { sell_tiles<decltype(tb)::value, I, V>(p, err); });
}

}  // namespace

void sell_forward(const SparseProblem& p, IndexErrors& err) {
  detail::with_types(p, [&](auto i, auto v) { sell_dispatch<decltype(i), decltype(v)>(p, err); });
}

}  // namespace graphopt
