// SELL-P kernel for y = x W^T (+ b): SELL whose slices start with permute layers, a batch-1
// layout with few gathers.
//
// Rows are sorted as in SELL and cut into slices of 16 (row_order maps lanes to rows); the
// columns are cut into blocks of 32. A slice's nonzeros go two ways:
//  * Layers. In each block where it has a nonzero (a *group*), a slice stores K layers, K fixed
//    per slice: layer k holds the k-th nonzero each of its 16 rows has in the block. The block's
//    32 columns of x are two vector registers, loaded once per group, and one two-register
//    permute (vpermt2ps) gives each lane the column its value multiplies; a layer is then 4
//    instructions (lane bytes widened, permute, FMA with its values) where 16 gathered columns
//    are 16 scalar loads and the inserts that build the vectors. On Zen 4 a gathered nonzero
//    costs ~0.8 cycles whichever way it is built (scalar inserts, bextr, vgatherdps, broadcast
//    and blend, scalar FMAs, measured); a layer ~2, and the first one of a block holds ~15.5
//    nonzeros at 90% sparsity, the second ~13.5, the fourth ~6.4.
//  * Entries: the nonzeros beyond a slice's K in a block, as SELL entries 16 lanes wide (two
//    8-lane gathers each).
// pack_sellp picks K per slice with a cost model (an entry costs ~4 layers): 4-6 at 90%, 11-13
// at 70%. K is fixed per slice, so a slice's groups run one loop compiled for its K (1-16), its
// layers unrolled whole: the loop over layers with a run-time K left a loop exit per group, which
// cost most where K is small (95%-sparse MiniLM shapes at batch 1, one Zen 5 core: 8.0-8.5 ->
// 6.5-6.9 us a call at 384x1536, 9.7-10.3 -> 8.5-8.8 at 1536x384; no change at 70% and 90%).
// With one block index per layer instead of per group (x loaded for every layer) the kernel took
// 1.4-1.5x the time. 16-lane vgatherdps for the entries took 1.1-1.5x the time of 8-lane scalar
// gathers on that Zen 5, as on Zen 4.
// Standalone harness, one core, batch 1, random MiniLM shapes (384x1536 and 1536x384), time as a
// fraction of SELL-8's: 0.55-0.61 at 90%, 0.42-0.43 at 70%, 0.47 at 50%, 0.73-0.82 at 95%; the
// SELL-P of 8-row slices and 8-column blocks this replaces took 0.81-0.83 at 90%.
//
// Batch > 1 runs the batch-1 product row by row: the layout is for batch 1, and the backend
// takes it only where its timing table says it is fastest.
//
// Each slice's pointers are checked before the slice is read (a slice's layers must be a
// multiple of its groups), and int32 blocks and column indices too; int16 ones are masked (see
// column_mask) against an x padded to the masks' range, and the permute reads only the low 5 bits
// of a lane byte. So malformed data gives an error, or for int16 indices changed behind the ops'
// check a wrong result, never an out-of-bounds read.
#include "sparse_common.h"

namespace graphopt {
namespace {

using namespace detail;

constexpr int kRows = 16;   // rows per slice
constexpr int kBlock = 32;  // columns per block

#ifdef __AVX512F__
inline __m512 load16_as_float(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_as_float(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// acc + values * (lane r: x block column lanes[r] & 31), the block's columns in xa (0-15), xb (16-31).
template <typename V>
inline __m512 layer(__m512 xa, __m512 xb, const uint8_t* lanes, const V* val, __m512 acc) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lanes)));
  return _mm512_fmadd_ps(load16_as_float(val), _mm512_permutex2var_ps(xa, idx, xb), acc);
}
#endif

#ifdef __AVX512F__
// The layers of n_groups groups of K layers each, K a compile-time constant (KC > 0) or the run-time k
// (KC == 0), into four accumulators: a layer's FMA waits on its permute, and the permute on the lane
// bytes.
template <int KC, typename I, typename V>
inline void layer_groups(const float* x, const I* block, const uint8_t* lanes, const V* val, int64_t n_groups,
                         int64_t k, uint32_t mask, __m512 a[4]) {
  for (int64_t g = 0; g < n_groups; ++g) {
    const float* xg = x + kBlock * column(block[g], mask);
    const __m512 xa = _mm512_loadu_ps(xg), xb = _mm512_loadu_ps(xg + 16);
    if constexpr (KC > 0) {
      // Unrolled whole: no loop branch whose trip count changes from slice to slice.
#pragma GCC unroll 32
      for (int j = 0; j < KC; ++j) a[j % 4] = layer(xa, xb, lanes + j * kRows, val + j * kRows, a[j % 4]);
      lanes += KC * kRows;
      val += KC * kRows;
    } else {
      int64_t j = 0;
      for (; j + 4 <= k; j += 4, lanes += 4 * kRows, val += 4 * kRows) {
        a[0] = layer(xa, xb, lanes, val, a[0]);
        a[1] = layer(xa, xb, lanes + kRows, val + kRows, a[1]);
        a[2] = layer(xa, xb, lanes + 2 * kRows, val + 2 * kRows, a[2]);
        a[3] = layer(xa, xb, lanes + 3 * kRows, val + 3 * kRows, a[3]);
      }
      for (; j < k; ++j, lanes += kRows, val += kRows) a[0] = layer(xa, xb, lanes, val, a[0]);
    }
  }
}
#endif

// Adds to lo (lanes 0-7) and hi (8-15) the products of a slice's n_groups groups of k layers
// each: group g reads block block[g] of x, and its layers are the next k of lanes and val.
template <typename I, typename V>
inline void layers_dot(const float* x, const I* block, const uint8_t* lanes, const V* val, int64_t n_groups,
                       int64_t k, uint32_t mask, v8f& lo, v8f& hi) {
#ifdef __AVX512F__
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  switch (k) {
#define GRAPHOPT_LAYERS_K(K) \
    case K: layer_groups<K>(x, block, lanes, val, n_groups, k, mask, a); break;
    GRAPHOPT_LAYERS_K(1) GRAPHOPT_LAYERS_K(2) GRAPHOPT_LAYERS_K(3) GRAPHOPT_LAYERS_K(4)
    GRAPHOPT_LAYERS_K(5) GRAPHOPT_LAYERS_K(6) GRAPHOPT_LAYERS_K(7) GRAPHOPT_LAYERS_K(8)
    GRAPHOPT_LAYERS_K(9) GRAPHOPT_LAYERS_K(10) GRAPHOPT_LAYERS_K(11) GRAPHOPT_LAYERS_K(12)
    GRAPHOPT_LAYERS_K(13) GRAPHOPT_LAYERS_K(14) GRAPHOPT_LAYERS_K(15) GRAPHOPT_LAYERS_K(16)
#undef GRAPHOPT_LAYERS_K
    default: layer_groups<0>(x, block, lanes, val, n_groups, k, mask, a);
  }
  float sums[kRows];
  _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  lo += load8(sums);
  hi += load8(sums + 8);
#else
  for (int64_t g = 0; g < n_groups; ++g) {
    const float* xg = x + kBlock * column(block[g], mask);
    for (int64_t j = 0; j < k; ++j, lanes += kRows, val += kRows) {
      v8f a, b;
      for (int r = 0; r < 8; ++r) {
        a[r] = xg[lanes[r] & (kBlock - 1)];
        b[r] = xg[lanes[8 + r] & (kBlock - 1)];
      }
      lo += load8_as_float(val) * a;
      hi += load8_as_float(val + 8) * b;
    }
  }
#endif
}

// lo (lanes 0-7) and hi (8-15): the sums of a slice's n entries' products, each entry 16 column
// indices c and 16 values v, gathered 8 lanes at a time (see gather8). One loop for both halves:
// the entry count changes from slice to slice, so each loop's exit is a likely mispredict (a loop
// per half measured 0-5% slower at batch 1 on one Zen 5 core, MiniLM shapes: about the noise).
template <typename I, typename V>
inline void entries_dot(const float* x, const I* c, const V* v, int64_t n, uint32_t mask, v8f& lo, v8f& hi) {
  lo = v8f{};
  hi = v8f{};
  for (int64_t k = 0; k < n; ++k, c += kRows, v += kRows) {
    lo += load8_as_float(v) * gather8<I, true>(x, c, mask);
    hi += load8_as_float(v + 8) * gather8<I, true>(x, c + 8, mask);
  }
}

// What a 16-lane entry costs in layers (~4 measured, see pack_sellp), to balance the slices
// across threads.
constexpr int64_t kEntryCostInLayers = 4;

// L: the layers (row_ptr: the slices' offsets in groups, col_idx: each group's block, layer_ptr,
// lanes, values); E: the entries (row_ptr: offsets in entries, col_idx, values). Both share
// row_order.
template <typename I, typename V>
void sellp_rows(const SparseProblem& L, const SparseProblem& E, IndexErrors& layer_err, IndexErrors& entry_err) {
  const I* block = static_cast<const I*>(L.col_idx);
  const V* lval = static_cast<const V*>(L.values);
  const I* col = static_cast<const I*>(E.col_idx);
  const V* eval = static_cast<const V*>(E.values);
  const int32_t* order = L.row_order;
  const int64_t n_blocks = (L.in + kBlock - 1) / kBlock, slices = L.n_groups;
  const uint32_t bmask = column_mask<I>(n_blocks), cmask = column_mask<I>(L.in);
  // x padded with zeros to whole blocks and, for int16, to both masks' ranges.
  const int64_t stride = std::max(kBlock * (n_blocks + column_guard<I>(n_blocks)), L.in + column_guard<I>(L.in));
  const int64_t n_lanes = kRows * slices;
  const Scratch sums = lane_sums(L.m, n_lanes);
  std::vector<int64_t> work(slices + 1);
  for (int64_t s = 0; s <= slices; ++s) work[s] = int64_t{L.layer_ptr[s]} + kEntryCostInLayers * E.row_ptr[s];
  parallel_rows(work.data(), slices, (L.layers + 2 * E.nnz) * kRows * L.m, [&](int64_t begin, int64_t end) {
    Scratch copy(0);
    const float* xs = local_rows(L, stride, copy);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t g0 = L.row_ptr[s], g1 = L.row_ptr[s + 1], l0 = L.layer_ptr[s], l1 = L.layer_ptr[s + 1];
      const int64_t e0 = E.row_ptr[s], e1 = E.row_ptr[s + 1];
      if (g0 < 0 || g0 > g1 || g1 > L.nnz || l0 < 0 || l0 > l1 || l1 > L.layers ||
          (g1 == g0 ? l1 != l0 : (l1 - l0) % (g1 - g0) != 0)) {
        layer_err.bad_row_ptr.store(true, std::memory_order_relaxed);
        continue;
      }
      if (e0 < 0 || e0 > e1 || e1 > E.nnz) {
        entry_err.bad_row_ptr.store(true, std::memory_order_relaxed);
        continue;
      }
      if (sizeof(I) == 4 && max_index(block + g0, g1 - g0) > static_cast<uint32_t>(n_blocks - 1)) {
        layer_err.bad_col_idx.store(true, std::memory_order_relaxed);
        continue;
      }
      if (sizeof(I) == 4 && max_index(col + kRows * e0, kRows * (e1 - e0)) > static_cast<uint32_t>(L.in - 1)) {
        entry_err.bad_col_idx.store(true, std::memory_order_relaxed);
        continue;
      }
      const int64_t k = g1 > g0 ? (l1 - l0) / (g1 - g0) : 0;
      const I* c = col + kRows * e0;
      const V* v = eval + kRows * e0;
      for (int64_t b = 0; b < L.m; ++b) {
        const float* x = xs + b * stride;
        v8f lo, hi;
        entries_dot(x, c, v, e1 - e0, cmask, lo, hi);
        layers_dot(x, block + g0, L.lanes + kRows * l0, lval + kRows * l0, g1 - g0, k, bmask, lo, hi);
        store8(sums.get() + b * n_lanes + kRows * s, lo);
        store8(sums.get() + b * n_lanes + kRows * s + 8, hi);
      }
    }
  });
  store_lanes(sums.get(), n_lanes, order, L, entry_err);
}

}  // namespace

void sellp_forward(const SparseProblem& layers, const SparseProblem& entries, IndexErrors& layer_err,
                   IndexErrors& entry_err) {
  detail::with_types(layers, [&](auto i, auto v) {
    sellp_rows<decltype(i), decltype(v)>(layers, entries, layer_err, entry_err);
  });
}

}  // namespace graphopt
