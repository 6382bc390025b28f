// The tile library every tensor-core kernel in csrc/ is built from (device code only).
//
// Operands live in shared memory; a warp computes 16x8 output fragments with mma.sync:
//   * float16 / bfloat16: one m16n8k16 MMA per 16-wide k step, float32 accumulation;
//   * float32: "3xTF32": each operand is split into a TF32 head and a TF32 tail
//     (x = head + tail, head = cvt.rna.tf32(x)), and head*head + head*tail + tail*head is summed
//     with m16n8k8 TF32 MMAs. The dropped tail*tail term is below 2^-22 relative, so results are
//     as accurate as an FP32 dot product to within a few ulps, at three times TF32's cost.
//
// Fragment ownership (PTX ISA, mma.m16n8k16 / m16n8k8): lane = 4 * g + t (g = lane / 4, the
// "group", t = lane % 4). Accumulator acc[0..1] is row g, columns 2t and 2t+1; acc[2..3] is row
// g + 8, the same columns. A row of a 16x8 tile is therefore spread over the 4 lanes of one group,
// and row reductions (max, sum) are two xor-shuffles (quad_max / quad_sum).
//
// Shared-memory layouts the MMA helpers read:
//   A: 16 rows x 16 k, row-major, leading dimension lda (elements), k contiguous;
//   B: 8 columns (n) x 16 k, "n-major", leading dimension ldb, k contiguous.
// So C = A B^T for two row-major matrices whose rows are vectors (logits = anchors . keys^T),
// and C = P V for a V stored transposed (features x keys). lda and ldb must be even and the
// pointers 4-byte aligned for 16-bit types.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace pcd_kernels {
namespace tiles {

// --- element conversions -------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    static_assert(std::is_same_v<T, float>, "element types: float, __half, __nv_bfloat16");
    return x;
  }
}

__device__ __forceinline__ uint32_t tf32_head(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// --- raw MMAs ------------------------------------------------------------------------------

// d += a b^T by the PTX instruction `op`: all three MMAs below take four f32 accumulators, four
// A and two B registers.
#define PCD_TILES_MMA(op, d, a, b)                                                                \
  asm volatile(op " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                       \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __half) {
  PCD_TILES_MMA("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", d, a, b);
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __nv_bfloat16) {
  PCD_TILES_MMA("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", d, a, b);
}

__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  PCD_TILES_MMA("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", d, a, b);
}

#undef PCD_TILES_MMA

// --- one 16x8x16 step from shared memory -----------------------------------------------------

__device__ __forceinline__ int lane_group() { return (threadIdx.x & 31) >> 2; }
__device__ __forceinline__ int lane_in_group() { return threadIdx.x & 3; }

// acc += A[16 x 16] * B[8 x 16]^T (layouts above), T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&acc)[4], const T* a, int lda, const T* b, int ldb) {
  const int g = lane_group(), t = lane_in_group();
  uint32_t af[4], bf[2];
  af[0] = *reinterpret_cast<const uint32_t*>(a + g * lda + 2 * t);
  af[1] = *reinterpret_cast<const uint32_t*>(a + (g + 8) * lda + 2 * t);
  af[2] = *reinterpret_cast<const uint32_t*>(a + g * lda + 2 * t + 8);
  af[3] = *reinterpret_cast<const uint32_t*>(a + (g + 8) * lda + 2 * t + 8);
  bf[0] = *reinterpret_cast<const uint32_t*>(b + g * ldb + 2 * t);
  bf[1] = *reinterpret_cast<const uint32_t*>(b + g * ldb + 2 * t + 8);
  mma_16816(acc, af, bf, T{});
}

// float32 operands: 3xTF32 over two k8 halves.
template <>
__device__ __forceinline__ void mma_16x8x16<float>(float (&acc)[4], const float* a, int lda, const float* b,
                                                   int ldb) {
  const int g = lane_group(), t = lane_in_group();
#pragma unroll
  for (int kk = 0; kk < 16; kk += 8) {
    const float av[4] = {a[g * lda + kk + t], a[(g + 8) * lda + kk + t], a[g * lda + kk + t + 4],
                         a[(g + 8) * lda + kk + t + 4]};
    const float bv[2] = {b[g * ldb + kk + t], b[g * ldb + kk + t + 4]};
    uint32_t a_head[4], a_tail[4], b_head[2], b_tail[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a_head[i] = tf32_head(av[i]);
      a_tail[i] = tf32_head(av[i] - __uint_as_float(a_head[i]));
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      b_head[i] = tf32_head(bv[i]);
      b_tail[i] = tf32_head(bv[i] - __uint_as_float(b_head[i]));
    }
    // small terms first: they are added to the accumulator before the large one
    mma_1688_tf32(acc, a_tail, b_head);
    mma_1688_tf32(acc, a_head, b_tail);
    mma_1688_tf32(acc, a_head, b_head);
  }
}

// --- row reductions over a lane group ------------------------------------------------------

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// A finite "minus infinity" for running maxima: a row whose keys are all masked then gives
// exp2(-inf - m) = 0 rather than exp2(-inf + inf) = NaN.
constexpr float kMaxInit = -1.0e30f;

// Online logsumexp state of one row, base 2: the row's lse2 is max + log2(sum).
struct OnlineLse {
  float max = kMaxInit;
  float sum = 0.f;

  // Fold in a tile's row maximum (already reduced over the quad) and return the factor the
  // previous sum and any accumulator of this row must be rescaled by.
  __device__ __forceinline__ float rescale_to(float tile_max) {
    const float new_max = fmaxf(max, tile_max);
    const float factor = exp2f(max - new_max);
    sum *= factor;
    max = new_max;
    return factor;
  }
  __device__ __forceinline__ float lse2() const { return max + log2f(sum); }  // once per row: exact log2f
};

// --- global -> shared tiles ----------------------------------------------------------------

// Copies rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of a strided matrix into a
// row-major shared tile (leading dimension ld), multiplying each row by row_scale[row] when
// row_scale is given (fused L2 normalisation) and converting to T. Out-of-range elements are 0.
// Every thread of the block takes part; consecutive threads read consecutive columns.
template <typename T, typename Src, int ROWS, int COLS>
__device__ __forceinline__ void load_rows(T* tile, int ld, const Src* src, int64_t row_stride, int64_t col_stride,
                                          int row0, int n_rows, int col0, int n_cols,
                                          const float* row_scale) {
  for (int i = threadIdx.x; i < ROWS * COLS; i += blockDim.x) {
    const int r = i / COLS, c = i % COLS;
    const int row = row0 + r, col = col0 + c;
    float v = 0.f;
    if (row < n_rows && col < n_cols) {
      v = to_float(src[row * row_stride + col * col_stride]);
      if (row_scale != nullptr) v *= row_scale[row];
    }
    tile[r * ld + c] = from_float<T>(v);
  }
}

// The transpose: rows of the source become columns of the shared tile, tile[c * ld + r] =
// src[row0 + r, col0 + c]. Consecutive threads read consecutive source rows, which is the
// contiguous direction of a channel-major (features x positions) map read position-wise.
template <typename T, typename Src, int ROWS, int COLS>
__device__ __forceinline__ void load_rows_transposed(T* tile, int ld, const Src* src, int64_t row_stride,
                                                     int64_t col_stride, int row0, int n_rows, int col0,
                                                     int n_cols) {
  for (int i = threadIdx.x; i < ROWS * COLS; i += blockDim.x) {
    const int r = i % ROWS, c = i / ROWS;
    const int row = row0 + r, col = col0 + c;
    float v = 0.f;
    if (row < n_rows && col < n_cols) v = to_float(src[row * row_stride + col * col_stride]);
    tile[c * ld + r] = from_float<T>(v);
  }
}

}  // namespace tiles
}  // namespace pcd_kernels
