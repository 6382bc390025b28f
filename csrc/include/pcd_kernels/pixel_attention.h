// Launch API of the pixel_attention kernels (csrc/pixel_attention.cu), DESIGN.md 3.3.
//
// Multi-head softmax attention over the positions of channel-major maps: q is (B, heads * d, LQ),
// k and v are (B, heads * d, LK), each with arbitrary (batch, channel, position) strides in
// elements; head h is channels [h * d, (h + 1) * d). Pointers are device addresses passed as
// integers, `dtype` is 0 = float32 (3xTF32 tensor-core products), 1 = float16, 2 = bfloat16 (all
// tensors of one call share it; lse and delta are float32), `stream` is a cudaStream_t as an
// integer. Everything runs asynchronously on `stream` of `device`; errors (bad arguments, launch
// failures) throw std::invalid_argument / std::runtime_error naming the kernel.
#pragma once

#include <cstdint>

namespace pcd_kernels {

// A (B, C, L) map: its device address and its strides in elements.
struct AttentionMap {
  std::uintptr_t data = 0;
  std::int64_t stride_b = 0, stride_c = 0, stride_l = 0;
};

struct AttentionShape {
  std::int64_t batch = 0, heads = 0, head_dim = 0, lq = 0, lk = 0;
};

// The largest head dim the kernels take (padded on chip to 16, 32, 64 or 128).
constexpr std::int64_t kAttentionMaxHeadDim = 128;
// Query tile of the forward and dQ kernels, key tile of the dK/dV kernel; the grid has one block
// per (tile, batch * head), at most 2^31 - 1 blocks.
constexpr std::int64_t kAttentionTile = 64;
constexpr std::int64_t kAttentionMaxBlocks = 2147483647;

// out (B, heads * d, LQ) and lse (B * heads, LQ) float32 (base-2 logsumexp of scale * q.k per
// query). scale is the logit scale (the kernels use scale * log2(e) with exp2).
void pixel_attention_forward(const AttentionMap& q, const AttentionMap& k, const AttentionMap& v,
                             const AttentionMap& out, std::uintptr_t lse, const AttentionShape& shape,
                             double scale, int dtype, int device, std::uintptr_t stream);

// delta (B * heads, LQ) float32 = rowsum(grad_out * out), the softmax-backward row term.
void pixel_attention_backward_delta(const AttentionMap& out, const AttentionMap& grad_out, std::uintptr_t delta,
                                    const AttentionShape& shape, int dtype, int device, std::uintptr_t stream);

// grad_k, grad_v (B, heads * d, LK): one block per (key tile, batch * head) looping over query tiles.
void pixel_attention_backward_kv(const AttentionMap& q, const AttentionMap& k, const AttentionMap& v,
                                 const AttentionMap& grad_out, std::uintptr_t lse, std::uintptr_t delta,
                                 const AttentionMap& grad_k, const AttentionMap& grad_v, const AttentionShape& shape,
                                 double scale, int dtype, int device, std::uintptr_t stream);

// grad_q (B, heads * d, LQ): one block per (query tile, batch * head) looping over key tiles.
void pixel_attention_backward_q(const AttentionMap& q, const AttentionMap& k, const AttentionMap& v,
                                const AttentionMap& grad_out, std::uintptr_t lse, std::uintptr_t delta,
                                const AttentionMap& grad_q, const AttentionShape& shape, double scale, int dtype,
                                int device, std::uintptr_t stream);

}  // namespace pcd_kernels
