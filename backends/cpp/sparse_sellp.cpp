// SELL-P kernel for y = x W^T (+ b): SELL with permutes, a batch-1 layout without gathers.
//
// Slice s is rows 8s .. 8s+7 (lane r = row 8s + r). The columns are cut into blocks of 8, and
// each layer of a slice reads one block: its 8 columns of x are one vector load, and one
// permute (vpermps) gives each lane the column its value multiplies. So a layer is ~4
// instructions where SELL's entry is 8 scalar loads and the inserts that build a vector (the
// gathers cost ~0.8 cycles a nonzero on Zen 3 whichever way they are built: scalar inserts,
// bextr, vgatherdps, broadcast and blend, scalar FMAs, measured). The price is padding: a
// slice needs as many layers in a block as the most nonzeros any of its 8 rows has there,
// ~3 nonzeros a layer at 90% sparsity, ~4.5 at 70%. One core, random weights, batch 1
// (standalone harness against sparse_sell.cpp): 1.28-1.56x as fast at 70%, 1.01-1.27x at 90%.
//
// Batch > 1 runs the batch-1 product row by row: the layout is for batch 1, and the backend
// takes it only where its timing table says it is fastest.
//
// Each slice's pointer is checked before the slice is read, and int32 layer blocks too;
// int16 ones are masked (see column_mask) against an x padded to the mask's range, and the
// permute reads only the low 3 bits of a lane byte. So malformed data gives an error, or for
// int16 blocks changed behind the ops' check a wrong result, never an out-of-bounds read.
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

template <typename I, typename V>
void sellp_rows(const SparseProblem& p, IndexErrors& err) {
  const I* block = static_cast<const I*>(p.col_idx);
  const V* val = static_cast<const V*>(p.values);
  const int64_t n_blocks = (p.in + 7) / 8;
  const uint32_t mask = column_mask<I>(n_blocks);
  // x padded with zeros to whole blocks (and for int16, to the mask's range of blocks).
  const int64_t stride = 8 * (n_blocks + column_guard<I>(n_blocks));
  const Scratch xp = padded_rows(p, stride);
  parallel_rows(p.row_ptr, p.n_groups, p.nnz * 8 * p.m, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t k0 = p.row_ptr[s], k1 = p.row_ptr[s + 1];
      if (k0 < 0 || k0 > k1 || k1 > p.nnz) {
        err.bad_row_ptr.store(true, std::memory_order_relaxed);
        continue;
      }
      if (sizeof(I) == 4 && max_index(block + k0, k1 - k0) > static_cast<uint32_t>(n_blocks - 1)) {
        err.bad_col_idx.store(true, std::memory_order_relaxed);
        continue;
      }
      const int nr = static_cast<int>(std::min<int64_t>(8, p.out - 8 * s));
      for (int64_t b = 0; b < p.m; ++b) {
        const float* x = xp.get() + b * stride;
        // Four accumulators: a layer's FMA waits on its permute, and the permute on two loads.
        v8f acc[4] = {v8f{}, v8f{}, v8f{}, v8f{}};
        int64_t k = k0;
        for (; k + 4 <= k1; k += 4) {
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const int64_t blk = column(block[k + j], mask);
            acc[j] += load8_as_float(val + 8 * (k + j)) * permute8(load8(x + 8 * blk), p.lanes + 8 * (k + j));
          }
        }
        for (; k < k1; ++k) {
          const int64_t blk = column(block[k], mask);
          acc[0] += load8_as_float(val + 8 * k) * permute8(load8(x + 8 * blk), p.lanes + 8 * k);
        }
        const v8f sums = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        float* y = p.y + b * p.out + 8 * s;
        for (int r = 0; r < nr; ++r) y[r] = finish(sums[r], p.scales, p.bias, 8 * s + r);
      }
    }
  });
}

}  // namespace

void sellp_forward(const SparseProblem& p, IndexErrors& err) {
  detail::with_types(p, [&](auto i, auto v) { sellp_rows<decltype(i), decltype(v)>(p, err); });
}

}  // namespace graphopt
