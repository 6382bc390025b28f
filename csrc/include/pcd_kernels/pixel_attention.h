// Launch API of the pixel_attention kernels (csrc/pixel_attention.cu), DESIGN.md 3.4.
//
// Multi-head softmax attention over the positions of channel-major maps: q is (B, heads * d, LQ),
// k and v are (B, heads * d, LK); head h is channels [h * d, (h + 1) * d). The kernels read their
// operands (q, k, v, grad_out) as AttentionRows: for each (batch, head, position) a row of d
// contiguous elements, 16-byte aligned, followed by zeros up to the next multiple of 8 elements
// (the host copies a map into that layout unless it already is one: channels-last with d a
// multiple of 8). They write their outputs (out, grad_q, grad_k, grad_v) through AttentionMaps,
// (B, C, L) maps with arbitrary strides, and read `out` the same way (the delta pass). Pointers
// are device addresses passed as integers; all tensors of one call share the element type
// `dtype` (float16 or bfloat16), lse2 and delta are float32. Everything runs asynchronously on
// `stream` of `device`; arguments the kernels cannot take throw std::invalid_argument, CUDA
// errors std::runtime_error, both naming the kernel.
#pragma once

#include <cstdint>

#include "pcd_kernels/params.h"

// A (B, C, L) map: its device address and its strides in elements.
#define PCD_KERNELS_ATTENTION_MAP(X) \
  X(std::uintptr_t, data)            \
  X(std::int64_t, stride_b)          \
  X(std::int64_t, stride_c)          \
  X(std::int64_t, stride_l)

// An operand as rows: row (b, h, l) starts at data + b * stride_b + h * stride_h + l * stride_l
// (elements); data 16-byte aligned, every stride a multiple of 8.
#define PCD_KERNELS_ATTENTION_ROWS(X) \
  X(std::uintptr_t, data)             \
  X(std::int64_t, stride_b)           \
  X(std::int64_t, stride_h)           \
  X(std::int64_t, stride_l)

// What the launchers read; each launcher's comment below names the tensors it reads and writes.
#define PCD_KERNELS_PIXEL_ATTENTION_PARAMS(X)                                                     \
  PCD_KERNELS_LAUNCH_PARAMS(X)                                                                    \
  X(std::int64_t, batch)                                                                          \
  X(std::int64_t, heads)                                                                          \
  X(std::int64_t, head_dim)                                                                       \
  X(std::int64_t, lq)                                                                             \
  X(std::int64_t, lk)                                                                             \
  X(double, scale) /* the logit scale; the kernels use scale * log2(e) with exp2 */               \
  X(::pcd_kernels::AttentionRows, q)                                                              \
  X(::pcd_kernels::AttentionRows, k)                                                              \
  X(::pcd_kernels::AttentionRows, v)                                                              \
  X(::pcd_kernels::AttentionRows, grad_out)                                                       \
  X(::pcd_kernels::AttentionMap, out)                                                             \
  X(::pcd_kernels::AttentionMap, grad_q)                                                          \
  X(::pcd_kernels::AttentionMap, grad_k)                                                          \
  X(::pcd_kernels::AttentionMap, grad_v)                                                          \
  X(std::uintptr_t, lse2)  /* (B * heads, LQ): base-2 logsumexp of scale * q.k per query */       \
  X(std::uintptr_t, delta) /* (B * heads, LQ): rowsum(grad_out * out), the softmax-backward term */

namespace pcd_kernels {

struct AttentionMap {
  PCD_KERNELS_ATTENTION_MAP(PCD_KERNELS_FIELD)
};

struct AttentionRows {
  PCD_KERNELS_ATTENTION_ROWS(PCD_KERNELS_FIELD)
};

struct PixelAttentionParams {
  PCD_KERNELS_PIXEL_ATTENTION_PARAMS(PCD_KERNELS_FIELD)
};

// The largest head dim the kernels take (padded on chip to 32, 64 or 128).
constexpr std::int64_t kAttentionMaxHeadDim = 128;
// Query tile of the forward and dQ kernels, key tile of the dK/dV kernel; the grid has one block
// per (tile, batch * head), at most 2^31 - 1 blocks.
constexpr std::int64_t kAttentionTile = 64;
constexpr std::int64_t kAttentionMaxBlocks = 2147483647;
// Elements of one asynchronous copy (16 bytes): AttentionRows' alignment and stride unit.
constexpr std::int64_t kAttentionRowAlign = 8;

// Reads q, k, v; writes out (B, heads * d, LQ) and lse2.
void pixel_attention_forward(const PixelAttentionParams& params);

// Reads out, grad_out; writes delta.
void pixel_attention_backward_delta(const PixelAttentionParams& params);

// Reads q, k, v, grad_out, lse2, delta; writes grad_k and grad_v (B, heads * d, LK): one block per
// (key tile, batch * head) looping over query tiles.
void pixel_attention_backward_kv(const PixelAttentionParams& params);

// Reads q, k, v, grad_out, lse2, delta; writes grad_q (B, heads * d, LQ): one block per
// (query tile, batch * head) looping over key tiles.
void pixel_attention_backward_q(const PixelAttentionParams& params);

}  // namespace pcd_kernels
