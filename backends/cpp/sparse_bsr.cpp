// Block-sparse (BSR) kernels for y = x W^T (+ b): W [out, in] cut into R x C blocks, of
// which only the nonzero ones are stored, as values [n_blocks, R, C] with one column index
// per block (in block units) and a row pointer per block row.
//
// Blocks pay twice over CSR: one index per R*C values, and no gathers: at batch 1 a
// block's C inputs are contiguous in x (C >= 8) or one input feeds R rows (C = 1); at
// batch >= 2 (transposed tiles, see sparse_csr.cpp) each block value multiplies a
// contiguous row of the tile. Common shapes are compiled for their exact (R, C); any other
// shape runs a generic scalar loop, correct but slower.
#include "sparse_common.h"

namespace graphopt {
namespace {

using namespace detail;

// The blocks [start, start + len) of block row g, or none (and a recorded error) when the
// row pointer or a block-column index is out of range.
template <typename I>
inline void checked_block_row(const SparseProblem& p, const I* col, int64_t g, uint32_t lim,
                              IndexErrors& err, int64_t& start, int64_t& len) {
  const int64_t s = p.row_ptr[g], e = p.row_ptr[g + 1];
  start = len = 0;
  if (s < 0 || s > e || e > p.nnz) {
    err.bad_row_ptr.store(true, std::memory_order_relaxed);
  } else if (max_index(col + s, e - s) > lim) {
    err.bad_col_idx.store(true, std::memory_order_relaxed);
  } else {
    start = s;
    len = e - s;
  }
}

// Input pattern matching a flattened block: lane l of vector q multiplies x[(8q + l) % C].
template <int C>
inline v8f x_pattern(const float* xb, int q) {
  if constexpr (C >= 8) {
    return load8(xb + (8 * q) % C);
  } else {
    v8f r;
    for (int l = 0; l < 8; ++l) r[l] = xb[l % C];
    return r;
  }
}

// Batch 1: per block row, accumulate the flattened R x C block products; then each output
// row is the sum of its C lanes. Block rows are finished in groups covering 8 output rows,
// so that rows of C >= 8 lanes are reduced with one vector transpose-add (a serial sum of
// 16 lanes per row costs as much as the row's products) and stored as one vector. Needs
// R * C to be a multiple of 8.
template <int R, int C, typename I, typename V>
void bsr_rows(const SparseProblem& p, IndexErrors& err) {
  static_assert((R * C) % 8 == 0, "flattened blocks are whole vectors");
  constexpr int NV = R * C / 8;
  constexpr int S = NV >= 4 ? 1 : 4 / NV;  // >= 4 FMA chains in flight
  constexpr int NX = C >= 8 ? C / 8 : 1;   // distinct x patterns per block
  constexpr int G = R >= 8 ? R : 8;        // output rows per group
  constexpr int BPG = G / R;               // block rows per group
  static_assert(G % R == 0, "R must divide 8 or be a multiple of 8");
  const I* col = static_cast<const I*>(p.col_idx);
  const V* val = static_cast<const V*>(p.values);
  const uint32_t lim = static_cast<uint32_t>((p.in + C - 1) / C - 1);
  parallel_rows<BPG>(p.row_ptr, p.n_groups, p.nnz * R * C, [&](int64_t begin, int64_t end) {
    Scratch copy(0);
    const float* x = local_rows(p, (p.in + C - 1) / C * C, copy);
    for (int64_t g0 = begin; g0 < end; g0 += BPG) {
      const int nbr = static_cast<int>(std::min<int64_t>(BPG, end - g0));
      const int64_t o0 = g0 * R;
      const int rows = static_cast<int>(std::min<int64_t>(nbr * R, p.out - o0));
      // rv[r]: a vector whose lanes sum to output row o0 + r.
      v8f rv[G];
      for (int i = 0; i < BPG; ++i) {
        int64_t s0 = 0, n = 0;
        if (i < nbr) checked_block_row(p, col, g0 + i, lim, err, s0, n);
        v8f acc[S][NV];
        for (int s = 0; s < S; ++s)
          for (int q = 0; q < NV; ++q) acc[s][q] = v8f{};
        const auto step = [&](int s, int64_t blk) {
          const float* xb = x + static_cast<int64_t>(col[blk]) * C;
          const V* vb = val + blk * (R * C);
          v8f xp[NX];
#pragma GCC unroll 4
          for (int q = 0; q < NX; ++q) xp[q] = x_pattern<C>(xb, q);
#pragma GCC unroll 8
          for (int q = 0; q < NV; ++q) acc[s][q] += load8_as_float(vb + 8 * q) * xp[q % NX];
        };
        int64_t k = 0;
        for (; k + S <= n; k += S)
#pragma GCC unroll 4
          for (int s = 0; s < S; ++s) step(s, s0 + k + s);
        for (; k < n; ++k) step(0, s0 + k);
        for (int q = 0; q < NV; ++q)
          for (int s = 1; s < S; ++s) acc[0][q] += acc[s][q];
        if constexpr (C >= 8) {
          // Row r owns vectors [r * C / 8, (r + 1) * C / 8).
          for (int r = 0; r < R; ++r) {
            v8f t = acc[0][r * NX];
            for (int q = 1; q < NX; ++q) t += acc[0][r * NX + q];
            rv[i * R + r] = t;
          }
        } else {
          // C < 8: each vector holds 8 / C rows; sum each row's C lanes (C - 1 adds).
          alignas(32) float flat[R * C];
          for (int q = 0; q < NV; ++q) store8(flat + 8 * q, acc[0][q]);
          for (int r = 0; r < R; ++r) {
            float t = flat[r * C];
            for (int cc = 1; cc < C; ++cc) t += flat[r * C + cc];
            rv[i * R + r] = v8f{};
            rv[i * R + r][0] = t;
          }
        }
      }
      for (int h = 0; h * 8 < rows; ++h) {
        const v8f sums = reduce8(&rv[8 * h]);
        const int nr = std::min(8, rows - 8 * h);
        const int64_t o = o0 + 8 * h;
        if (nr == 8) {
          const v8f sc = p.scales ? load8(p.scales + o) : v8f{} + 1.f;
          const v8f bi = p.bias ? load8(p.bias + o) : v8f{};
          store8(p.y + o, sums * sc + bi);
        } else {
          for (int r = 0; r < nr; ++r) p.y[o + r] = finish(sums[r], p.scales, p.bias, o + r);
        }
      }
    }
  });
}

// Batch >= 2 on transposed tiles: acc[r, 0:TB] += W[r, cc] * xt[c * C + cc, 0:TB]. Block
// rows are handled in groups covering G = max(8, R) output rows, finished 8 rows at a time.
template <int R, int C, int TB, typename I, typename V>
void bsr_tiles(const SparseProblem& p, IndexErrors& err) {
  constexpr int NV = TB / 8;
  constexpr int G = R >= 8 ? R : 8;
  constexpr int BPG = G / R;  // block rows per group
  // Independent accumulator sets over the C columns of a block, for >= 8 FMA chains.
  constexpr int S0 = 8 / (R * NV) > 0 ? 8 / (R * NV) : 1;
  constexpr int S = S0 < C ? S0 : C;
  static_assert(G % R == 0, "R must divide 8 or be a multiple of 8");
  const I* col = static_cast<const I*>(p.col_idx);
  const V* val = static_cast<const V*>(p.values);
  const int64_t in_pad = (p.in + C - 1) / C * C;
  const uint32_t lim = static_cast<uint32_t>(in_pad / C - 1);
  const int64_t tiles = (p.m + TB - 1) / TB;
  parallel_rows(p.row_ptr, p.n_groups, p.nnz * R * C * p.m, [&](int64_t begin, int64_t end) {
    const Scratch buf = local_tiles(p, in_pad, 0, TB);
    const float* xt = buf.get();
    // Row blocks whose weights fit in L2, then tiles (see csr_tiles for why).
    const int64_t block_blocks = 192 * 1024 / (sizeof(I) + R * C * sizeof(V));
    for (int64_t rb = begin; rb < end;) {
      int64_t re = rb;
      const int64_t first = std::max<int64_t>(0, p.row_ptr[rb]);
      while (re < end && (re == rb || p.row_ptr[re] - first < block_blocks)) re = std::min(end, re + BPG);
      for (int64_t t = 0; t < tiles; ++t) {
        const float* xtt = xt + t * in_pad * TB;
        for (int64_t g0 = rb; g0 < re; g0 += BPG) {
          const int nbr = static_cast<int>(std::min<int64_t>(BPG, re - g0));
          const int64_t o0 = g0 * R;
          const int rows = static_cast<int>(std::min<int64_t>(nbr * R, p.out - o0));
          v8f res[NV][G];
          for (int i = 0; i < BPG; ++i) {
            int64_t s0 = 0, n = 0;
            if (i < nbr) checked_block_row(p, col, g0 + i, lim, err, s0, n);
            v8f acc[S][R][NV];
            for (int s = 0; s < S; ++s)
              for (int r = 0; r < R; ++r)
                for (int q = 0; q < NV; ++q) acc[s][r][q] = v8f{};
            for (int64_t k = s0; k < s0 + n; ++k) {
              // int8 blocks are converted once per block: 8 values per vector instruction, or one
              // by one for blocks of fewer than 8 (1x4).
              alignas(32) float vconv[sizeof(V) == 1 ? R * C : 1];
              const float* vb;
              if constexpr (sizeof(V) == 1 && R * C % 8 == 0) {
                for (int q = 0; q < R * C / 8; ++q) store8(vconv + 8 * q, load8_as_float(val + k * (R * C) + 8 * q));
                vb = vconv;
              } else if constexpr (sizeof(V) == 1) {
                for (int i = 0; i < R * C; ++i) vconv[i] = to_float(val[k * (R * C) + i]);
                vb = vconv;
              } else {
                vb = reinterpret_cast<const float*>(val) + k * (R * C);
              }
              const float* xc = xtt + static_cast<int64_t>(col[k]) * C * TB;
#pragma GCC unroll 16
              for (int cc = 0; cc < C; ++cc) {
                v8f xr[NV];
#pragma GCC unroll 8
                for (int q = 0; q < NV; ++q) xr[q] = load8(xc + cc * TB + 8 * q);
#pragma GCC unroll 16
                for (int r = 0; r < R; ++r) {
                  const float v = vb[r * C + cc];
#pragma GCC unroll 8
                  for (int q = 0; q < NV; ++q) acc[cc % S][r][q] += v * xr[q];
                }
              }
            }
            for (int r = 0; r < R; ++r)
              for (int q = 0; q < NV; ++q) {
                v8f a = acc[0][r][q];
                for (int s = 1; s < S; ++s) a += acc[s][r][q];
                res[q][i * R + r] = a;
              }
          }
          for (int q = 0; q < NV; ++q) {
            const int64_t b0 = t * TB + 8 * q;
            if (b0 >= p.m) break;
            const int nb = static_cast<int>(std::min<int64_t>(8, p.m - b0));
            for (int h = 0; h * 8 < rows; ++h)
              store_rows8(&res[q][8 * h], std::min(8, rows - 8 * h), nb, p.y, p.out, b0, o0 + 8 * h,
                          p.scales, p.bias);
          }
        }
      }
      rb = re;
    }
  });
}

// Any block shape: plain loops, one batch row at a time.
template <typename I, typename V>
void bsr_generic(const SparseProblem& p, int R, int C, IndexErrors& err) {
  const I* col = static_cast<const I*>(p.col_idx);
  const V* val = static_cast<const V*>(p.values);
  const int64_t in_pad = (p.in + C - 1) / C * C;
  const uint32_t lim = static_cast<uint32_t>(in_pad / C - 1);
  parallel_rows(p.row_ptr, p.n_groups, p.nnz * R * C * p.m, [&](int64_t begin, int64_t end) {
    Scratch copy(0);
    const float* x = local_rows(p, in_pad, copy);
    std::vector<float> acc(R);
    for (int64_t g = begin; g < end; ++g) {
      int64_t s0, n;
      checked_block_row(p, col, g, lim, err, s0, n);
      for (int64_t b = 0; b < p.m; ++b) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t k = s0; k < s0 + n; ++k) {
          const float* xc = x + b * in_pad + static_cast<int64_t>(col[k]) * C;
          const V* vb = val + k * R * C;
          for (int r = 0; r < R; ++r)
            for (int cc = 0; cc < C; ++cc) acc[r] += to_float(vb[r * C + cc]) * xc[cc];
        }
        for (int r = 0; r < R && g * R + r < p.out; ++r)
          p.y[b * p.out + g * R + r] = finish(acc[r], p.scales, p.bias, g * R + r);
      }
    }
  });
}

template <int R, int C, typename V>
void bsr_fixed(const SparseProblem& p, IndexErrors& err) {
  using I = int16_t;
  // Batch-tile widths: 8, 16, and 32 where R rows of accumulators still fit in the 16
  // vector registers (every (R, C, TB) instance costs compile time). As for CSR, the
  // widest that covers the batch and keeps the [in, TB] tile within ~256 KB of L2.
  constexpr int kWide = R >= 8 ? 8 : (R >= 4 ? 16 : 32);
  // bsr_rows works on whole 8-float vectors of flattened blocks; smaller blocks (1x4) run
  // batch 1 on the narrowest tile instead, 1 lane in 8 used (measured 2x+ faster than the
  // generic loop on 1536x384).
  if (p.m == 1) {
    if constexpr (R * C % 8 != 0) {
      return bsr_tiles<R, C, 8, I, V>(p, err);
    } else {
      return bsr_rows<R, C, I, V>(p, err);
    }
  }
  const int64_t fit = (256 * 1024 / 4) / std::max<int64_t>(p.in, 1);
  if constexpr (kWide == 32) {
    if (p.m > 16 && fit >= 32) return bsr_tiles<R, C, 32, I, V>(p, err);
  }
  if constexpr (kWide >= 16) {
    if (p.m > 8) return bsr_tiles<R, C, 16, I, V>(p, err);
  }
  return bsr_tiles<R, C, 8, I, V>(p, err);
}

template <typename I, typename V>
void bsr_dispatch(const SparseProblem& p, int R, int C, IndexErrors& err) {
  // Compiled shapes take int16 block-column indices only: int32 ones mean more than
  // 32767 blocks across (in_features > 32767 * C), which no Transformer layer has.
  if constexpr (sizeof(I) == 2) {
    if (R == 1 && C == 4) return bsr_fixed<1, 4, V>(p, err);
    if (R == 1 && C == 8) return bsr_fixed<1, 8, V>(p, err);
    if (R == 1 && C == 16) return bsr_fixed<1, 16, V>(p, err);
    if (R == 4 && C == 4) return bsr_fixed<4, 4, V>(p, err);
    if (R == 8 && C == 1) return bsr_fixed<8, 1, V>(p, err);
    if (R == 16 && C == 1) return bsr_fixed<16, 1, V>(p, err);
  }
  bsr_generic<I, V>(p, R, C, err);
}

}  // namespace

void bsr_forward(const SparseProblem& p, int R, int C, IndexErrors& err) {
  detail::with_types(p, [&](auto i, auto v) { bsr_dispatch<decltype(i), decltype(v)>(p, R, C, err); });
}

}  // namespace graphopt
