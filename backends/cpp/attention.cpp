// Scaled dot-product attention for short sequences: out = softmax(q k^T * scale + mask) v.
//
// Why our own: at Transformer-encoder sizes on one sentence (12 heads, 15 tokens, 32 features
// a head) torch's CPU attention (flash or math) spends most of its time outside arithmetic:
// ~50-80 us a call for ~350k multiply-adds, about as long as a 90%-sparse 384x1536 layer, six
// times per MiniLM forward. Here each (batch, head) pair is one task on plain strided
// pointers: k is transposed into a [D, keys] panel, scores come from broadcast-FMAs over
// key vectors (no horizontal sums), softmax uses a vectorised exp, and the output row is a
// broadcast-FMA over value rows. Rows whose mask is -inf everywhere give zeros, like torch.
#include "sparse_common.h"

#include <limits>

namespace graphopt {
namespace {

using namespace detail;

// Scores of QB queries against the key vectors [8 * c0, 8 * (c0 + NC)) of the panel kt
// ([D, keys_pad]): s[i][...] = sum_d q_i[d] * kt[d][...]. QB * NC accumulators in registers.
template <int QB, int NC>
inline void score_block(const float* const q[QB], const float* kt, int64_t keys_pad, int64_t d_len,
                        int64_t c0, float* const s[QB]) {
  v8f acc[QB][NC];
  for (int i = 0; i < QB; ++i)
    for (int c = 0; c < NC; ++c) acc[i][c] = v8f{};
  for (int64_t d = 0; d < d_len; ++d) {
    const float* row = kt + d * keys_pad + 8 * c0;
    v8f kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = load8(row + 8 * c);
    for (int i = 0; i < QB; ++i) {
      const float qd = q[i][d];
      for (int c = 0; c < NC; ++c) acc[i][c] += qd * kv[c];
    }
  }
  for (int i = 0; i < QB; ++i)
    for (int c = 0; c < NC; ++c) store8(s[i] + 8 * (c0 + c), acc[i][c]);
}

// out_i[d0 : d0 + 8 NV] = sum_j p_i[j] * v_j[d0 : ...] for QB queries over `keys` value rows.
template <int QB, int NV>
inline void value_block(const float* const p[QB], const float* v, int64_t v_row, int64_t keys, int64_t d0,
                        const float inv[QB], float* const out[QB]) {
  v8f acc[QB][NV];
  for (int i = 0; i < QB; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = v8f{};
  for (int64_t j = 0; j < keys; ++j) {
    const float* row = v + j * v_row + d0;
    v8f vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load8(row + 8 * c);
    for (int i = 0; i < QB; ++i) {
      const float pj = p[i][j];
      for (int c = 0; c < NV; ++c) acc[i][c] += pj * vv[c];
    }
  }
  for (int i = 0; i < QB; ++i)
    for (int c = 0; c < NV; ++c) store8(out[i] + d0 + 8 * c, acc[i][c] * inv[i]);
}

// Softmax of one row of scores in place (keys_pad entries, the padding already -inf);
// returns 1 / sum of the exponentials, or 0 for a row that is -inf everywhere.
inline float softmax_row(float* s, int64_t keys_pad) {
  v8f mx = v8f{} - std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < keys_pad; j += 8) {
    const v8f t = load8(s + j);
    mx = mx > t ? mx : t;
  }
  float m = mx[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, mx[i]);
  if (m == -std::numeric_limits<float>::infinity()) {
    std::fill(s, s + keys_pad, 0.f);
    return 0.f;
  }
  v8f sum = v8f{};
  for (int64_t j = 0; j < keys_pad; j += 8) {
    const v8f e = exp8(load8(s + j) - m);
    store8(s + j, e);
    sum += e;
  }
  float total = 0.f;
  for (int i = 0; i < 8; ++i) total += sum[i];
  return 1.f / total;
}

template <int QB>
void head(const AttentionProblem& p, int64_t b, int64_t h, float* kt, float* scores) {
  const int64_t keys = p.keys, keys_pad = (keys + 7) / 8 * 8, d_len = p.head_dim;
  const float* k = p.k + b * p.k_stride[0] + h * p.k_stride[1];
  const float* v = p.v + b * p.v_stride[0] + h * p.v_stride[1];
  // kt = k^T, zero-padded to whole key vectors, 8 x 8 blocks at a time.
  for (int64_t j0 = 0; j0 < keys_pad; j0 += 8) {
    for (int64_t d0 = 0; d0 < d_len; d0 += 8) {
      v8f r[8];
      for (int j = 0; j < 8; ++j) r[j] = j0 + j < keys ? load8(k + (j0 + j) * p.k_stride[2] + d0) : v8f{};
      transpose8(r);
      for (int d = 0; d < 8; ++d) store8(kt + (d0 + d) * keys_pad + j0, r[d]);
    }
  }
  for (int64_t i0 = 0; i0 < p.queries; i0 += QB) {
    // A short last block repeats the last query (computed, not stored): one code path.
    const float* q[QB];
    const float* mrow[QB];
    float* s[QB];
    float* out[QB];
    const int nq = static_cast<int>(std::min<int64_t>(QB, p.queries - i0));
    for (int i = 0; i < QB; ++i) {
      const int64_t qi = i0 + std::min(i, nq - 1);
      q[i] = p.q + b * p.q_stride[0] + h * p.q_stride[1] + qi * p.q_stride[2];
      mrow[i] = p.mask ? p.mask + b * p.mask_stride[0] + h * p.mask_stride[1] + qi * p.mask_stride[2] : nullptr;
      s[i] = scores + i * keys_pad;
      out[i] = p.out + b * p.out_stride[0] + h * p.out_stride[1] + qi * p.out_stride[2];
    }
    int64_t c = 0;
    for (; c + 2 <= keys_pad / 8; c += 2) score_block<QB, 2>(q, kt, keys_pad, d_len, c, s);
    if (c < keys_pad / 8) score_block<QB, 1>(q, kt, keys_pad, d_len, c, s);
    float inv[QB];
    for (int i = 0; i < QB; ++i) {
      const float* m = mrow[i];
      int64_t j = 0;
      for (; j + 8 <= keys; j += 8) store8(s[i] + j, load8(s[i] + j) * p.scale + (m ? load8(m + j) : v8f{}));
      for (; j < keys; ++j) s[i][j] = s[i][j] * p.scale + (m ? m[j] : 0.f);
      for (; j < keys_pad; ++j) s[i][j] = -std::numeric_limits<float>::infinity();
      inv[i] = softmax_row(s[i], keys_pad);
    }
    // Two queries at a time: QB * 4 value accumulators would not fit AVX2's 16 registers.
    for (int i = 0; i < QB; i += 2) {
      const int qb = std::min(2, nq - i);
      if (qb <= 0) break;
      const float* pp[2] = {s[i], s[i + std::min(1, qb - 1)]};
      const float ii[2] = {inv[i], inv[i + std::min(1, qb - 1)]};
      float* oo[2] = {out[i], out[i + std::min(1, qb - 1)]};
      int64_t d0 = 0;
      for (; d0 + 32 <= d_len; d0 += 32) value_block<2, 4>(pp, v, p.v_stride[2], keys, d0, ii, oo);
      for (; d0 < d_len; d0 += 8) value_block<2, 1>(pp, v, p.v_stride[2], keys, d0, ii, oo);
    }
  }
}

}  // namespace

void attention_forward(const AttentionProblem& p) {
  constexpr int QB = 4;
  const int64_t keys_pad = (p.keys + 7) / 8 * 8;
  const int64_t pairs = p.batch * p.heads;
  parallel_range(pairs, pairs * p.queries * keys_pad * p.head_dim * 2, [&](int64_t begin, int64_t end) {
    Scratch kt(p.head_dim * keys_pad), scores(QB * keys_pad);
    for (int64_t t = begin; t < end; ++t) head<QB>(p, t / p.heads, t % p.heads, kt.get(), scores.get());
  });
}

}  // namespace graphopt
