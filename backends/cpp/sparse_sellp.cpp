// SELL-P kernel for y = x W^T (+ b): SELL whose slices start with permute layers, a batch-1
// layout with fewer gathers.
//
// Rows are sorted and cut into slices of 8 as in SELL (row_order maps lanes to rows). The
// columns are cut into blocks of 8, and a slice's nonzeros go two ways:
//  * Layers. Each layer reads one block: its 8 columns of x are one vector load, and one
//    permute (vpermps) gives each lane the column its value multiplies, so a layer is ~4
//    instructions where a SELL entry is 8 scalar loads and the inserts that build a vector
//    (the gathers cost ~0.8 cycles a nonzero on Zen 3 whichever way they are built: scalar
//    inserts, bextr, vgatherdps, broadcast and blend, scalar FMAs, measured). Layer k of a
//    block holds the k-th nonzero each row has there, so a slice with K layers in a block
//    covers up to K nonzeros of each of its rows there, and pays for lanes whose row has
//    fewer: at 90% sparsity the first layer of a block holds ~4.6 nonzeros, a second ~1.5.
//  * Entries: the nonzeros beyond a slice's layers, as SELL entries (8 gathered columns).
// pack_sellp picks each slice's layers per block from a cost model (an entry costs ~2.75
// layers): one layer a block at 90% sparsity, two or three at 70%, four or five at 50%.
// Batch 1, random MiniLM shapes, through the op (1 and 2 threads, 15-21 interleaved rounds):
// at 90% 0.93-1.03x SELL's time; at 70% 0.73-0.81x SELL's and 0.94-0.97x that of layers only
// (the SELL-P of before, which this generalises: layers=8); at 50% 0.70-0.81x SELL's.
//
// Batch > 1 runs the batch-1 product row by row: the layout is for batch 1, and the backend
// takes it only where its timing table says it is fastest.
//
// Each slice's pointers are checked before the slice is read, and int32 layer blocks and
// column indices too; int16 ones are masked (see column_mask) against an x padded to the
// masks' range, and the permute reads only the low 3 bits of a lane byte. So malformed data
// gives an error, or for int16 indices changed behind the ops' check a wrong result, never an
// out-of-bounds read.
#include "sparse_common.h"

namespace graphopt {
namespace {

using namespace detail;

// Lane r of the result: xb[lanes[r] & 7], for one layer's 8 lane bytes.
inline v8f permute8(v8f xb, const uint8_t* lanes) {
#ifdef GRAPHOPT_AVX2
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lanes)));
  return (v8f)_mm256_permutevar8x32_ps((__m256)xb, idx);
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = xb[lanes[i] & 7];
  return r;
#endif
}

// Sum of n layers' products for the slice's 8 rows. Apart from sell_entries_dot, with their own
// accumulators and pointers: in one loop nest GCC spilled the entries' loop counter to the stack.
template <typename I, typename V>
inline v8f layers_dot(const float* x, const I* block, const uint8_t* lanes, const V* val, int64_t n, uint32_t mask) {
  // Four accumulators: a layer's FMA waits on its permute, and the permute on two loads.
  v8f acc[4] = {v8f{}, v8f{}, v8f{}, v8f{}};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      acc[j] += load8_as_float(val + 8 * (k + j)) * permute8(load8(x + 8 * column(block[k + j], mask)), lanes + 8 * (k + j));
    }
  }
  for (; k < n; ++k) acc[0] += load8_as_float(val + 8 * k) * permute8(load8(x + 8 * column(block[k], mask)), lanes + 8 * k);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// What an entry costs in layers (~2.75 measured, see pack_sellp), to balance the slices across
// threads.
constexpr int64_t kEntryCostInLayers = 3;

// L: the layers (row_ptr = layer pointer of each slice, col_idx = layer blocks, lanes,
// values); E: the entries (row_ptr = entry pointer, col_idx, values). Both share row_order.
template <typename I, typename V>
void sellp_rows(const SparseProblem& L, const SparseProblem& E, IndexErrors& layer_err, IndexErrors& entry_err) {
  const I* block = static_cast<const I*>(L.col_idx);
  const V* lval = static_cast<const V*>(L.values);
  const I* col = static_cast<const I*>(E.col_idx);
  const V* eval = static_cast<const V*>(E.values);
  const int32_t* order = L.row_order;
  const int64_t n_blocks = (L.in + 7) / 8, slices = L.n_groups;
  const uint32_t bmask = column_mask<I>(n_blocks), cmask = column_mask<I>(L.in);
  // x padded with zeros to whole blocks and, for int16, to both masks' ranges.
  const int64_t stride = std::max(8 * (n_blocks + column_guard<I>(n_blocks)), L.in + column_guard<I>(L.in));
  const Scratch xp = padded_rows(L, stride);
  std::fill(L.y, L.y + L.m * L.out, 0.f);  // lanes of a skipped slice stay defined
  std::vector<int64_t> work(slices + 1);
  for (int64_t s = 0; s <= slices; ++s) work[s] = int64_t{L.row_ptr[s]} + kEntryCostInLayers * E.row_ptr[s];
  parallel_rows(work.data(), slices, (L.nnz + 2 * E.nnz) * 8 * L.m, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t k0 = L.row_ptr[s], k1 = L.row_ptr[s + 1], e0 = E.row_ptr[s], e1 = E.row_ptr[s + 1];
      if (k0 < 0 || k0 > k1 || k1 > L.nnz) {
        layer_err.bad_row_ptr.store(true, std::memory_order_relaxed);
        continue;
      }
      if (e0 < 0 || e0 > e1 || e1 > E.nnz) {
        entry_err.bad_row_ptr.store(true, std::memory_order_relaxed);
        continue;
      }
      if (sizeof(I) == 4 && max_index(block + k0, k1 - k0) > static_cast<uint32_t>(n_blocks - 1)) {
        layer_err.bad_col_idx.store(true, std::memory_order_relaxed);
        continue;
      }
      if (sizeof(I) == 4 && max_index(col + 8 * e0, 8 * (e1 - e0)) > static_cast<uint32_t>(L.in - 1)) {
        entry_err.bad_col_idx.store(true, std::memory_order_relaxed);
        continue;
      }
      for (int64_t b = 0; b < L.m; ++b) {
        const float* x = xp.get() + b * stride;
        const v8f sums = layers_dot(x, block + k0, L.lanes + 8 * k0, lval + 8 * k0, k1 - k0, bmask) +
                         sell_entries_dot(x, col + 8 * e0, eval + 8 * e0, e1 - e0, cmask);
        store_slice(sums, order + 8 * s, L, b, entry_err);
      }
    }
  });
}

}  // namespace

void sellp_forward(const SparseProblem& layers, const SparseProblem& entries, IndexErrors& layer_err,
                   IndexErrors& entry_err) {
  detail::with_types(layers, [&](auto i, auto v) {
    sellp_rows<decltype(i), decltype(v)>(layers, entries, layer_err, entry_err);
  });
}

}  // namespace graphopt
