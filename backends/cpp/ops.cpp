// CPU implementations of the graphopt::{csr,bsr,sell,sellp}_linear{,_int8} ops, graphopt::attention
// and graphopt::gelu.
//
// The schemas live in backends/cpp/ops.py (torch.library, namespace "graphopt"); this file
// only implements them with TORCH_LIBRARY_IMPL, because a second TORCH_LIBRARY for one
// namespace terminates the process (measured, torch 2.13). Argument checks here are the
// ones that protect memory: shapes, dtypes and index ranges (the kernels check row pointers
// and column indices as they go, except CSR's, SELL's and SELL-P's column indices (blocks), checked here once
// per index tensor), so a tampered weight file gives an error, never an out-of-bounds read.
// At the end, the same ops as C entry points for code compiled by AOTInductor.
#include "sparse_common.h"

#include <ATen/EmptyTensor.h>
#include <ATen/core/DimVector.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace graphopt {
namespace {

struct Prepared {
  at::Tensor x;  // [*lead, in] contiguous fp32, read as [m, in]
  at::Tensor y;  // [*lead, out]
  std::optional<at::Tensor> bias;
  SparseProblem p;
};

// Checks column indices (int16 or int32, contiguous, nnz * lanes of them); the kernels or
// check_columns check their values.
void check_indices(const char* op, const at::Tensor& col_idx, int64_t nnz, int64_t lanes,
                   const char* name = "col_idx") {
  TORCH_CHECK(col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt, op, ": ", name,
              " must be int16 or int32, got ", col_idx.scalar_type());
  TORCH_CHECK(col_idx.dim() == (lanes == 1 ? 1 : 2) && col_idx.is_contiguous() && col_idx.numel() == nnz * lanes,
              op, ": ", name, " must be contiguous with one entry per stored value (", nnz * lanes, ")");
}

// Checks that a row pointer over n_groups spans [0, nnz]; the kernels check the steps between.
void check_span(const char* op, const int32_t* rp, int64_t n_groups, int64_t nnz, const char* name = "row_ptr") {
  TORCH_CHECK(rp[0] == 0 && rp[n_groups] == nnz, op, ": ", name, " must start at 0 and end at ", nnz, ", got ",
              rp[0], " and ", rp[n_groups]);
}

// Checks a row pointer (CSR's rows, BSR's block rows, SELL's slices) and its column indices.
// lanes > 1 (SELL): col_idx is [nnz, lanes], one index per lane of each stored entry.
const int32_t* checked_pointers(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                int64_t n_groups, int64_t nnz, int64_t lanes = 1) {
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.is_contiguous(),
              op, ": row_ptr must be a contiguous 1-D int32 tensor (pack with pack_csr/pack_bsr)");
  TORCH_CHECK(row_ptr.numel() == n_groups + 1, op, ": row_ptr has ", row_ptr.numel(),
              " entries, expected ", n_groups + 1);
  check_indices(op, col_idx, nnz, lanes);
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  check_span(op, rp, n_groups, nnz);
  return rp;
}

// x, y, scales and bias of an op, and the problem's shapes; rp, col_idx and values must have
// been checked.
Prepared prepare_io(const char* op, const at::Tensor& x, const int32_t* rp, const at::Tensor& col_idx,
                    const at::Tensor& values, const std::optional<at::Tensor>& scales,
                    const std::optional<at::Tensor>& bias, int64_t out_features, int64_t n_groups, int64_t nnz) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type(),
              "; cast the activations with .float()");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  const int64_t in = x.size(-1);
  TORCH_CHECK(nnz == 0 || in > 0, op, ": x has no features but the weight has stored values");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->numel() == out_features && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 tensor of shape [", out_features, "]");
  }
  if (scales) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 1 &&
                    scales->numel() == out_features && scales->is_contiguous(),
                op, ": scales must be a contiguous float32 tensor of shape [", out_features, "]");
  }
  Prepared r;
  r.bias = bias;
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  // The kernels read x's memory as [m, in] directly: a reshape is two more dispatcher calls
  // (reshape and its view) per op. With the attention op's mask strides below, the MiniLM
  // forward makes 53 dispatcher calls instead of 152 (torch.profiler, 1 sentence).
  r.x = x.contiguous();
  at::DimVector shape(x.sizes());  // inline storage: no heap allocation per call
  shape.back() = out_features;
  // Outputs here are allocated with at::detail::empty_cpu, not at::empty: that goes through the
  // dispatcher, ~0.25 us of a ~4 us batch-1 call from Python (8x8 weight, 21 interleaved rounds).
  r.y = at::Tensor(at::detail::empty_cpu(shape, at::kFloat));
  SparseProblem& p = r.p;
  p.x = r.x.data_ptr<float>();
  p.y = r.y.data_ptr<float>();
  p.row_ptr = rp;
  p.col_idx = col_idx.data_ptr();
  p.values = values.data_ptr();
  p.scales = scales ? scales->data_ptr<float>() : nullptr;
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.m = m;
  p.in = in;
  p.out = out_features;
  p.n_groups = n_groups;
  p.nnz = nnz;
  p.idx16 = col_idx.scalar_type() == at::kShort;
  p.val8 = values.scalar_type() == at::kChar;
  return r;
}

Prepared prepare(const char* op, const at::Tensor& x, const at::Tensor& row_ptr,
                 const at::Tensor& col_idx, const at::Tensor& values,
                 const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                 int64_t out_features, int64_t n_groups, int64_t nnz, int64_t lanes = 1) {
  const int32_t* rp = checked_pointers(op, row_ptr, col_idx, n_groups, nnz, lanes);
  return prepare_io(op, x, rp, col_idx, values, scales, bias, out_features, n_groups, nnz);
}

// The output of a weight with no stored values: just the bias.
const at::Tensor& bias_only(Prepared& r) {
  if (r.bias) {
    r.y.copy_(r.bias->expand_as(r.y));
  } else {
    r.y.zero_();
  }
  return r.y;
}

// Fills in the output of a weight with no stored values, or of no batch rows: true if it did.
bool trivial(Prepared& r) {
  if (r.p.m != 0 && r.p.nnz != 0) return false;
  bias_only(r);
  return true;
}

// SELL's and SELL-P's row_order [lanes * slices] (int32; its values are checked by the kernels).
const int32_t* checked_row_order(const char* op, const at::Tensor& row_order, int64_t slices, int64_t lanes) {
  TORCH_CHECK(row_order.scalar_type() == at::kInt && row_order.dim() == 1 && row_order.is_contiguous() &&
                  row_order.numel() == slices * lanes,
              op, ": row_order must be a contiguous 1-D int32 tensor of ", slices * lanes, " entries");
  return row_order.data_ptr<int32_t>();
}

// index_name: the tensor of column indices (SELL-P: of column blocks), for the message.
void raise_errors(const char* op, const IndexErrors& err, int64_t col_limit, const char* index_name = "col_idx") {
  TORCH_CHECK(!err.bad_row_order.load(), op,
              ": row_order holds a row outside [-1, out_features); the packed weight is corrupt");
  TORCH_CHECK(!err.bad_row_ptr.load(), op,
              ": row_ptr decreases or leaves [0, nnz]; the packed weight is corrupt, pack it again");
  TORCH_CHECK(!err.bad_col_idx.load(), op, ": ", index_name, " holds an index outside [0, ", col_limit,
              "); the packed weight does not match in_features of x, or is corrupt");
}

// The largest column index (read as unsigned) of each index tensor the CSR, SELL and SELL-P ops
// have seen, kept while the tensor's storage lives and its version counter (bumped by every
// in-place write through torch) stays the same: model weights are read once, not on every
// call. Inference tensors have no version counter and are read every time. An entry holds a
// weak reference to the storage, so its address cannot be reused by another storage while
// the entry exists; entries of freed storages are dropped as new ones come.
class LargestIndexCache {
 public:
  uint32_t largest(const at::Tensor& col_idx) {
    c10::TensorImpl* impl = col_idx.unsafeGetTensorImpl();
    if (impl->is_inference()) return scan(col_idx);
    const Key key{col_idx.storage().unsafeGetStorageImpl(), col_idx.storage_offset(), col_idx.numel(),
                  col_idx.scalar_type(), impl->version_counter().current_version()};
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const Entry& e : entries_)
        if (e.key == key && !e.storage.expired()) return e.largest;
    }
    const uint32_t largest = scan(col_idx);
    std::lock_guard<std::mutex> lock(mu_);
    std::erase_if(entries_, [&](const Entry& e) {
      return e.storage.expired() || (e.key.storage == key.storage && e.key.offset == key.offset);
    });
    entries_.push_back({key, col_idx.storage().getWeakStorageImpl(), largest});
    return largest;
  }

 private:
  struct Key {
    const c10::StorageImpl* storage;
    int64_t offset, numel;
    at::ScalarType dtype;
    uint32_t version;
    bool operator==(const Key&) const = default;
  };
  struct Entry {
    Key key;
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    uint32_t largest;
  };
  static uint32_t scan(const at::Tensor& col_idx) {
    if (col_idx.scalar_type() == at::kShort) return detail::max_index(col_idx.data_ptr<int16_t>(), col_idx.numel());
    return detail::max_index(col_idx.data_ptr<int32_t>(), col_idx.numel());
  }
  std::mutex mu_;
  std::vector<Entry> entries_;
};

// Raises the kernels' error for a column index outside [0, in), reading col_idx only when the
// cache has not seen it at this version.
void check_columns(const char* op, const at::Tensor& col_idx, int64_t in, const char* index_name = "col_idx") {
  static LargestIndexCache cache;
  IndexErrors err;
  err.bad_col_idx = cache.largest(col_idx) >= static_cast<uint64_t>(in);
  raise_errors(op, err, in, index_name);
}

at::Tensor csr_impl(const char* op, const at::Tensor& x, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const at::Tensor& values,
                    const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                    int64_t out_features) {
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D [nnz], got shape ", values.sizes());
  Prepared r = prepare(op, x, row_ptr, col_idx, values, scales, bias, out_features, out_features,
                       values.numel());
  if (trivial(r)) return r.y;
  check_columns(op, col_idx, r.p.in);
  IndexErrors err;
  csr_forward(r.p, err);
  raise_errors(op, err, r.p.in);
  return r.y;
}

at::Tensor bsr_impl(const char* op, const at::Tensor& x, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const at::Tensor& values,
                    const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                    int64_t out_features) {
  TORCH_CHECK(values.dim() == 3 && values.size(1) > 0 && values.size(2) > 0, op,
              ": values must be [n_blocks, R, C] with R, C >= 1, got shape ", values.sizes());
  const int64_t R = values.size(1), C = values.size(2);
  TORCH_CHECK(R <= 64 && C <= 64, op, ": block shape ", R, "x", C, " is larger than 64x64");
  Prepared r = prepare(op, x, row_ptr, col_idx, values, scales, bias, out_features,
                       (out_features + R - 1) / R, values.size(0));
  if (trivial(r)) return r.y;
  IndexErrors err;
  bsr_forward(r.p, static_cast<int>(R), static_cast<int>(C), err);
  raise_errors(op, err, (r.p.in + C - 1) / C);
  return r.y;
}

at::Tensor sell_impl(const char* op, const at::Tensor& x, const at::Tensor& slice_ptr,
                     const at::Tensor& row_order, const at::Tensor& col_idx, const at::Tensor& values,
                     const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                     int64_t out_features) {
  TORCH_CHECK(values.dim() == 2 && values.size(1) == 8, op,
              ": values must be [entries, 8] (pack with pack_sell), got shape ", values.sizes());
  const int64_t slices = (out_features + 7) / 8;
  const int32_t* order = checked_row_order(op, row_order, slices, 8);
  Prepared r = prepare(op, x, slice_ptr, col_idx, values, scales, bias, out_features, slices,
                       values.size(0), 8);
  r.p.row_order = order;
  if (trivial(r)) return r.y;
  check_columns(op, col_idx, r.p.in);
  IndexErrors err;
  sell_forward(r.p, err);
  raise_errors(op, err, r.p.in);
  return r.y;
}

at::Tensor sellp_impl(const char* op, const at::Tensor& x, const at::Tensor& slice_ptr, const at::Tensor& layer_block,
                      const at::Tensor& layer_lanes, const at::Tensor& row_order, const at::Tensor& col_idx,
                      const at::Tensor& values, const std::optional<at::Tensor>& scales,
                      const std::optional<at::Tensor>& bias, int64_t out_features) {
  constexpr int64_t lanes = 16, block = 32;  // rows per slice, columns per block (sparse_sellp.cpp)
  const int64_t slices = (out_features + lanes - 1) / lanes;
  TORCH_CHECK(slice_ptr.scalar_type() == at::kInt && slice_ptr.dim() == 2 && slice_ptr.size(0) == 3 &&
                  slice_ptr.size(1) == slices + 1 && slice_ptr.is_contiguous(),
              op, ": slice_ptr must be a contiguous int32 tensor of shape [3, ", slices + 1, "] (pack with pack_sellp)");
  const int32_t* group_ptr = slice_ptr.data_ptr<int32_t>();
  const int32_t* layer_ptr = group_ptr + slices + 1;
  const int32_t* entry_ptr = layer_ptr + slices + 1;
  const int64_t groups = group_ptr[slices], layers = layer_ptr[slices], entries = entry_ptr[slices];
  TORCH_CHECK(layers >= 0 && entries >= 0 && values.dim() == 2 && values.size(0) == layers + entries &&
                  values.size(1) == lanes,
              op, ": values must be [layers + entries, 16] = [", layers, " + ", entries, ", 16], got shape ",
              values.sizes());
  check_span(op, group_ptr, slices, groups, "slice_ptr[0]");
  check_span(op, layer_ptr, slices, layers, "slice_ptr[1]");
  check_span(op, entry_ptr, slices, entries, "slice_ptr[2]");
  check_indices(op, layer_block, groups, 1, "layer_block");
  check_indices(op, col_idx, entries, lanes);
  TORCH_CHECK(layer_block.scalar_type() == col_idx.scalar_type(), op, ": layer_block (", layer_block.scalar_type(),
              ") and col_idx (", col_idx.scalar_type(), ") must have one dtype");
  TORCH_CHECK(layer_lanes.scalar_type() == at::kByte && layer_lanes.dim() == 2 && layer_lanes.size(0) == layers &&
                  layer_lanes.size(1) == lanes && layer_lanes.is_contiguous(),
              op, ": layer_lanes must be a contiguous uint8 tensor of shape [", layers, ", 16]");
  const int32_t* order = checked_row_order(op, row_order, slices, lanes);
  Prepared r = prepare_io(op, x, group_ptr, layer_block, values, scales, bias, out_features, slices, groups);
  r.p.row_order = order;
  r.p.layer_ptr = layer_ptr;
  r.p.lanes = layer_lanes.data_ptr<uint8_t>();
  r.p.layers = layers;
  SparseProblem e = r.p;
  e.row_ptr = entry_ptr;
  e.col_idx = col_idx.data_ptr();
  e.values = static_cast<const char*>(r.p.values) + layers * lanes * values.element_size();
  e.nnz = entries;
  if (r.p.m == 0 || layers + entries == 0) return bias_only(r);
  const int64_t n_blocks = (r.p.in + block - 1) / block;
  check_columns(op, layer_block, n_blocks, "layer_block");
  check_columns(op, col_idx, r.p.in);
  IndexErrors layer_err, entry_err;
  sellp_forward(r.p, e, layer_err, entry_err);
  raise_errors(op, layer_err, n_blocks, "layer_block");
  raise_errors(op, entry_err, r.p.in);
  return r.y;
}

at::Tensor sellp_linear(const at::Tensor& x, const at::Tensor& slice_ptr, const at::Tensor& layer_block,
                        const at::Tensor& layer_lanes, const at::Tensor& row_order, const at::Tensor& col_idx,
                        const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features) {
  const char* op = "graphopt::sellp_linear";
  TORCH_CHECK(values.scalar_type() == at::kFloat, op, ": values must be float32, got ",
              values.scalar_type(), "; int8 weights go to graphopt::sellp_linear_int8");
  return sellp_impl(op, x, slice_ptr, layer_block, layer_lanes, row_order, col_idx, values, std::nullopt, bias,
                    out_features);
}

at::Tensor sellp_linear_int8(const at::Tensor& x, const at::Tensor& slice_ptr, const at::Tensor& layer_block,
                             const at::Tensor& layer_lanes, const at::Tensor& row_order, const at::Tensor& col_idx,
                             const at::Tensor& values, const at::Tensor& scales,
                             const std::optional<at::Tensor>& bias, int64_t out_features) {
  const char* op = "graphopt::sellp_linear_int8";
  TORCH_CHECK(values.scalar_type() == at::kChar, op, ": values must be int8, got ",
              values.scalar_type());
  return sellp_impl(op, x, slice_ptr, layer_block, layer_lanes, row_order, col_idx, values, scales, bias,
                    out_features);
}

at::Tensor sell_linear(const at::Tensor& x, const at::Tensor& slice_ptr, const at::Tensor& row_order,
                       const at::Tensor& col_idx, const at::Tensor& values,
                       const std::optional<at::Tensor>& bias, int64_t out_features) {
  const char* op = "graphopt::sell_linear";
  TORCH_CHECK(values.scalar_type() == at::kFloat, op, ": values must be float32, got ",
              values.scalar_type(), "; int8 weights go to graphopt::sell_linear_int8");
  return sell_impl(op, x, slice_ptr, row_order, col_idx, values, std::nullopt, bias, out_features);
}

at::Tensor sell_linear_int8(const at::Tensor& x, const at::Tensor& slice_ptr, const at::Tensor& row_order,
                            const at::Tensor& col_idx, const at::Tensor& values, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, int64_t out_features) {
  const char* op = "graphopt::sell_linear_int8";
  TORCH_CHECK(values.scalar_type() == at::kChar, op, ": values must be int8, got ",
              values.scalar_type());
  return sell_impl(op, x, slice_ptr, row_order, col_idx, values, scales, bias, out_features);
}

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const std::optional<at::Tensor>& bias,
                      int64_t out_features) {
  const char* op = "graphopt::csr_linear";
  TORCH_CHECK(values.scalar_type() == at::kFloat, op, ": values must be float32, got ",
              values.scalar_type(), "; int8 weights go to graphopt::csr_linear_int8");
  return csr_impl(op, x, row_ptr, col_idx, values, std::nullopt, bias, out_features);
}

at::Tensor csr_linear_int8(const at::Tensor& x, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, const at::Tensor& values,
                           const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  const char* op = "graphopt::csr_linear_int8";
  TORCH_CHECK(values.scalar_type() == at::kChar, op, ": values must be int8, got ",
              values.scalar_type());
  return csr_impl(op, x, row_ptr, col_idx, values, scales, bias, out_features);
}

at::Tensor bsr_linear(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const std::optional<at::Tensor>& bias,
                      int64_t out_features) {
  const char* op = "graphopt::bsr_linear";
  TORCH_CHECK(values.scalar_type() == at::kFloat, op, ": values must be float32, got ",
              values.scalar_type(), "; int8 weights go to graphopt::bsr_linear_int8");
  return bsr_impl(op, x, row_ptr, col_idx, values, std::nullopt, bias, out_features);
}

at::Tensor bsr_linear_int8(const at::Tensor& x, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, const at::Tensor& values,
                           const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  const char* op = "graphopt::bsr_linear_int8";
  TORCH_CHECK(values.scalar_type() == at::kChar, op, ": values must be int8, got ",
              values.scalar_type());
  return bsr_impl(op, x, row_ptr, col_idx, values, scales, bias, out_features);
}

// [batch, heads, tokens, dim] strides of a 4-D tensor whose last dimension is contiguous.
void strides3(const at::Tensor& t, int64_t out[3]) {
  for (int i = 0; i < 3; ++i) out[i] = t.stride(i);
}

// Beyond this many keys torch's flash attention (blocked, MKL) is as fast as ours or faster
// (one thread, 12 heads of 32: 1.0x at 128 keys, 0.94x at 256; 2.2x at 15, 1.35x at 64 x 8).
constexpr int64_t kMaxAttentionKeys = 128;

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const std::optional<at::Tensor>& attn_mask, double scale) {
  const char* op = "graphopt::attention";
  for (const at::Tensor* t : {&q_in, &k_in, &v_in}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4, op,
                ": q, k and v must be 4-D float32 CPU tensors [batch, heads, tokens, head_dim], got ",
                t->scalar_type(), " of shape ", t->sizes());
  }
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2), D = q_in.size(3), K = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B && k_in.size(1) == H && v_in.size(1) == H &&
                  k_in.size(3) == D && v_in.size(2) == K && v_in.size(3) == D,
              op, ": q ", q_in.sizes(), ", k ", k_in.sizes(), " and v ", v_in.sizes(),
              " must agree in batch, heads and head_dim, and k and v in tokens");
  TORCH_CHECK(D % 8 == 0, op, ": head_dim must be a multiple of 8, got ", D);
  // The kernel reads rows in place: only a strided last dimension needs a copy.
  const auto rows = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = rows(q_in), k = rows(k_in), v = rows(v_in);
  // The mask is read through broadcast strides (0 along its size-1 dimensions) computed
  // here rather than through an expanded view: expand is two dispatcher calls per layer.
  at::Tensor mask;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  if (attn_mask) {
    TORCH_CHECK(attn_mask->scalar_type() == at::kFloat, op, ": attn_mask must be an additive float32 mask, got ",
                attn_mask->scalar_type());
    TORCH_CHECK(attn_mask->dim() <= 4, op, ": attn_mask must have at most 4 dimensions, got ", attn_mask->dim());
    const int64_t target[4] = {B, H, S, K};
    for (int i = 0; i < 4; ++i) {
      const int64_t d = i - (4 - attn_mask->dim());
      const int64_t size = d < 0 ? 1 : attn_mask->size(d);
      TORCH_CHECK(size == target[i] || size == 1, op, ": attn_mask of shape ", attn_mask->sizes(),
                  " does not broadcast to [", B, ", ", H, ", ", S, ", ", K, "]");
      mask_stride[i] = size == 1 ? 0 : attn_mask->stride(d);
    }
    mask = *attn_mask;
    if (K > 1 && mask_stride[3] != 1) {  // the kernel reads a mask row as contiguous keys
      mask = attn_mask->expand({B, H, S, K}).contiguous();
      for (int i = 0; i < 3; ++i) mask_stride[i] = mask.stride(i);
    }
  }
  // [batch, tokens, heads, dim] in memory, returned as a [batch, heads, tokens, dim] view (as
  // torch's flash attention does): the usual transpose + flatten after attention is then free.
  at::Tensor out(at::detail::empty_strided_cpu({B, H, S, D}, {S * H * D, D, H * D, 1}, at::kFloat));
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_();
  if (K > kMaxAttentionKeys) return out.copy_(at::scaled_dot_product_attention(q, k, v, attn_mask, 0.0, false, scale));
  AttentionProblem p{};
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  p.mask = attn_mask ? mask.data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.batch = B;
  p.heads = H;
  p.queries = S;
  p.keys = K;
  p.head_dim = D;
  strides3(q, p.q_stride);
  strides3(k, p.k_stride);
  strides3(v, p.v_stride);
  strides3(out, p.out_stride);
  std::copy(mask_stride, mask_stride + 3, p.mask_stride);
  p.scale = static_cast<float>(scale);
  attention_forward(p);
  return out;
}

at::Tensor gelu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "graphopt::gelu: x must be a float32 CPU "
              "tensor, got ", x_in.scalar_type(), " on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y(at::detail::empty_cpu(x.sizes(), at::kFloat));
  gelu_forward(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
  return y;
}

}  // namespace
}  // namespace graphopt

TORCH_LIBRARY_IMPL(graphopt, CPU, m) {
  m.impl("csr_linear", &graphopt::csr_linear);
  m.impl("csr_linear_int8", &graphopt::csr_linear_int8);
  m.impl("bsr_linear", &graphopt::bsr_linear);
  m.impl("bsr_linear_int8", &graphopt::bsr_linear_int8);
  m.impl("sell_linear", &graphopt::sell_linear);
  m.impl("sell_linear_int8", &graphopt::sell_linear_int8);
  m.impl("sellp_linear", &graphopt::sellp_linear);
  m.impl("sellp_linear_int8", &graphopt::sellp_linear_int8);
  m.impl("attention", &graphopt::attention);
  m.impl("gelu", &graphopt::gelu);
}

// C entry points for code compiled by AOTInductor (its "C shim" convention: tensors as
// AtenTensorHandle, an optional tensor as a pointer to one or null, the result through
// ret0, errors as a return code). Registered with custom_ops_to_c_shims (backend.py), they
// let compiled models call the kernels directly instead of through the proxy executor's
// boxed dispatcher call (MiniLM int8, batch 1: ~4% of the forward, measured). The compiled
// code finds these symbols in this library, which load_extension makes globally visible.
namespace {

at::Tensor from_shim(AtenTensorHandle h) { return torch::aot_inductor::resolve_tensor_dispatch_flags(h); }
std::optional<at::Tensor> from_shim(AtenTensorHandle* h) {
  return torch::aot_inductor::resolve_tensor_dispatch_flags(h);
}
int64_t from_shim(int64_t v) { return v; }
double from_shim(double v) { return v; }

template <typename Op, typename... Args>
AOTITorchError call_from_shim(Op op, AtenTensorHandle* ret0, Args... args) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(op(from_shim(args)...));
  });
  return AOTI_TORCH_SUCCESS;
}

}  // namespace

using Handle = AtenTensorHandle;

extern "C" {
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_csr_linear(Handle x, Handle row_ptr, Handle col_idx,
                                                           Handle values, Handle* bias,
                                                           int64_t out_features, Handle* ret0) {
  return call_from_shim(graphopt::csr_linear, ret0, x, row_ptr, col_idx, values, bias, out_features);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_csr_linear_int8(Handle x, Handle row_ptr, Handle col_idx,
                                                                Handle values, Handle scales, Handle* bias,
                                                                int64_t out_features, Handle* ret0) {
  return call_from_shim(graphopt::csr_linear_int8, ret0, x, row_ptr, col_idx, values, scales, bias,
                        out_features);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_bsr_linear(Handle x, Handle row_ptr, Handle col_idx,
                                                           Handle values, Handle* bias,
                                                           int64_t out_features, Handle* ret0) {
  return call_from_shim(graphopt::bsr_linear, ret0, x, row_ptr, col_idx, values, bias, out_features);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_bsr_linear_int8(Handle x, Handle row_ptr, Handle col_idx,
                                                                Handle values, Handle scales, Handle* bias,
                                                                int64_t out_features, Handle* ret0) {
  return call_from_shim(graphopt::bsr_linear_int8, ret0, x, row_ptr, col_idx, values, scales, bias,
                        out_features);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_sell_linear(Handle x, Handle slice_ptr, Handle row_order,
                                                            Handle col_idx, Handle values, Handle* bias,
                                                            int64_t out_features, Handle* ret0) {
  return call_from_shim(graphopt::sell_linear, ret0, x, slice_ptr, row_order, col_idx, values, bias,
                        out_features);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_sell_linear_int8(Handle x, Handle slice_ptr, Handle row_order,
                                                                 Handle col_idx, Handle values, Handle scales,
                                                                 Handle* bias, int64_t out_features,
                                                                 Handle* ret0) {
  return call_from_shim(graphopt::sell_linear_int8, ret0, x, slice_ptr, row_order, col_idx, values, scales,
                        bias, out_features);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_sellp_linear(Handle x, Handle slice_ptr, Handle layer_block,
                                                             Handle layer_lanes, Handle row_order, Handle col_idx,
                                                             Handle values, Handle* bias, int64_t out_features,
                                                             Handle* ret0) {
  return call_from_shim(graphopt::sellp_linear, ret0, x, slice_ptr, layer_block, layer_lanes, row_order, col_idx,
                        values, bias, out_features);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_sellp_linear_int8(Handle x, Handle slice_ptr, Handle layer_block,
                                                                  Handle layer_lanes, Handle row_order,
                                                                  Handle col_idx, Handle values, Handle scales,
                                                                  Handle* bias, int64_t out_features,
                                                                  Handle* ret0) {
  return call_from_shim(graphopt::sellp_linear_int8, ret0, x, slice_ptr, layer_block, layer_lanes, row_order,
                        col_idx, values, scales, bias, out_features);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_attention(Handle q, Handle k, Handle v, Handle* attn_mask,
                                                          double scale, Handle* ret0) {
  return call_from_shim(graphopt::attention, ret0, q, k, v, attn_mask, scale);
}
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_gelu(Handle x, Handle* ret0) {
  return call_from_shim(graphopt::gelu, ret0, x);
}
}  // extern "C"
