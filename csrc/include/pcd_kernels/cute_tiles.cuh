// The building blocks every kernel in csrc/ shares, on CUTLASS's CuTe (device code only): the
// sm_80-class pipeline's pieces (16-byte cp.async tile loads into swizzled shared memory, products
// fed by ldmatrix into mma.sync), the accumulator views, and the row reductions of the online
// softmax.
//
// Fragment ownership (PTX ISA, mma.m16n8k16; wgmma's m64nNk16 repeats it per warp): lane
// 4 g + t holds rows g and g + 8 of its warp's 16, columns 2t and 2t + 1 of each 8. A row is
// therefore spread over the 4 lanes of one group, and row reductions are two xor-shuffles
// (quad_max, quad_sum). The kernels never compute these maps by hand: they partition identity
// tensors with their TiledMMA (fragment_coords) and read (row, column) from them.
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>

namespace pcd_kernels {
namespace cute_tiles {

using namespace cute;

// mma.sync's atom for a 16-bit element type, float32 accumulation.
template <typename T>
struct MmaAtom;
template <>
struct MmaAtom<cute::half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct MmaAtom<cute::bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};

constexpr int kVec = 8;  // 16-bit elements per 16-byte copy

// Rows [row0, row0 + kRows) x channels [col0, col0 + kWidth) of a row-major matrix (row stride
// ld elements, every row 16-byte aligned) into a shared tile, issued as 16-byte cp.async by all
// kThreads threads. A 16-byte piece is copied when its row is below hi and it starts below
// col_end (what lies past col_end within the piece must be zeros in the matrix itself); every
// other piece is zero-filled (source size 0: nothing is read, but the address stays inside the
// matrix).
template <int kThreads, int kRows, int kWidth, typename T, typename Tile>
__device__ __forceinline__ void load_rows(Tile tile, const T* rows, std::int64_t ld, int row0, int hi, int col0,
                                          std::int64_t col_end) {
  constexpr int kPerRow = kWidth / kVec;
  constexpr int kIters = kRows * kPerRow / kThreads;
  static_assert(kRows * kPerRow % kThreads == 0, "every thread issues the same number of copies");
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = i / kPerRow, c = (i % kPerRow) * kVec;
    const int row = row0 + r;
    const std::int64_t col = col0 + c;
    const bool ok = row < hi && col < col_end;
    const T* src = ok ? rows + static_cast<std::int64_t>(row) * ld + col : rows;
    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*reinterpret_cast<const cute::uint128_t*>(src),
                                                            *reinterpret_cast<cute::uint128_t*>(&tile(r, c)), ok);
  }
}

// Runs steps [0, steps) of a tile pipeline. issue(s) starts step s's copies (cp.async, closed by
// one commit group) into stage s % stages; body(s) runs once they have landed and every thread
// sees them, between two barriers (every thread must call this). With 2 stages step s + 1's copies
// are in flight while body(s) runs (into the stage step s - 1 used, which the barrier ending step
// s - 1 freed); with 1 (a device that allows a block less shared memory) they start after it.
// `stages` may be a compile-time Int<N> (no branch left then). publish() runs on each thread
// between its copies' landing and the barrier that shares them
// (wgmma, which reads through the async proxy, needs a fence there).
template <typename Stages, typename Issue, typename Body, typename Publish>
__device__ __forceinline__ void run_pipeline(int steps, Stages stages, Issue&& issue, Body&& body, Publish&& publish) {
  if (steps > 0) issue(0);
  for (int s = 0; s < steps; ++s) {
    if (stages > 1 && s + 1 < steps) {
      issue(s + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    publish();
    __syncthreads();
    body(s);
    __syncthreads();
    if (stages == 1 && s + 1 < steps) issue(s + 1);
  }
}

// acc += A . B^T, both from shared memory (fragments of step k + 1 load while step k
// multiplies); sB_plain is sB without its swizzle, for the fragment's shape (a transposed view's
// swizzle is no layout a fragment can take).
template <typename TiledMma, typename Acc, typename SA, typename SB, typename SBPlain, typename CopyA, typename CopyB>
__device__ __forceinline__ void gemm_smem(Acc& acc, const TiledMma& mma, const SA& sA, const SB& sB,
                                          const SBPlain& sB_plain, const CopyA& copy_a, const CopyB& copy_b) {
  const int tid = threadIdx.x;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor rA = thr_mma.partition_fragment_A(sA);
  Tensor rB = thr_mma.partition_fragment_B(sB_plain);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor tsA = thr_a.partition_S(sA);
  Tensor trA = thr_a.retile_D(rA);
  Tensor tsB = thr_b.partition_S(sB);
  Tensor trB = thr_b.retile_D(rB);
  copy(copy_a, tsA(_, _, 0), trA(_, _, 0));
  copy(copy_b, tsB(_, _, 0), trB(_, _, 0));
#pragma unroll
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(copy_a, tsA(_, _, k + 1), trA(_, _, k + 1));
      copy(copy_b, tsB(_, _, k + 1), trB(_, _, k + 1));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A . B^T with A in registers (an MMA A fragment, (values, M, K)) and B from shared memory.
template <typename TiledMma, typename Acc, typename RA, typename SB, typename SBPlain, typename CopyB>
__device__ __forceinline__ void gemm_regs(Acc& acc, const TiledMma& mma, const RA& rA, const SB& sB,
                                          const SBPlain& sB_plain, const CopyB& copy_b) {
  const int tid = threadIdx.x;
  Tensor rB = mma.get_thread_slice(tid).partition_fragment_B(sB_plain);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor tsB = thr_b.partition_S(sB);
  Tensor trB = thr_b.retile_D(rB);
  static_assert(decltype(size<2>(rA))::value == decltype(size<2>(rB))::value, "A and B share the k steps");
  copy(copy_b, tsB(_, _, 0), trB(_, _, 0));
#pragma unroll
  for (int k = 0; k < size<2>(rB); ++k) {
    if (k + 1 < size<2>(rB)) copy(copy_b, tsB(_, _, k + 1), trB(_, _, k + 1));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// An accumulator layout as (row, column): mma.sync's m16n8 (4, M, N) as ((2, M), (2, N)),
// wgmma's ((2, 2, N / 8), M, N) as ((2, M), (2, N / 8, N)).
template <typename Layout>
__host__ __device__ __forceinline__ auto rowcol(Layout layout) {
  if constexpr (decltype(rank<0>(layout))::value == 3) {
    return make_layout(make_layout(get<0, 1>(layout), get<1>(layout)),
                       make_layout(get<0, 0>(layout), get<0, 2>(layout), get<2>(layout)));
  } else {
    auto split = logical_divide(layout, Shape<_2>{});  // ((2, 2), M, N)
    return make_layout(make_layout(get<0, 1>(split), get<1>(split)), make_layout(get<0, 0>(split), get<2>(split)));
  }
}

// An mma.sync accumulator layout (4, M, N) as m16n8k16's A operand ((4, 2), M, N / 2): the
// columns of n8 blocks 2j and 2j + 1 are k step j's (the accumulator's pairs are the A fragment's).
template <typename Layout>
__host__ __device__ __forceinline__ auto acc_as_a(Layout layout) {
  auto split = logical_divide(layout, Shape<Underscore, Underscore, _2>{});  // (4, M, (2, N / 2))
  return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split), get<2, 1>(split));
}

// (row, column) within a kM x kN tile of each of this thread's accumulator entries of Mma,
// viewed as rowcol.
template <typename Mma, int kM, int kN>
__device__ __forceinline__ auto fragment_coords() {
  Mma mma;
  Tensor c = mma.get_thread_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
  return make_tensor(c.data(), rowcol(c.layout()));
}

// --- row reductions over a lane group and the online logsumexp ------------------------------

__device__ __forceinline__ int lane_in_group() { return threadIdx.x & 3; }

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

  // What exps are taken relative to: the maximum, or 0 while it is -inf (where a row starts at
  // -inf and its first tiles' logits overflowed to -inf), so that exp2(-inf - shift) = 0, not
  // exp2(-inf + inf) = NaN. With the finite kMaxInit it is the maximum.
  __device__ __forceinline__ static float shift_of(float m) { return m == -INFINITY ? 0.f : m; }
  __device__ __forceinline__ float shift() const { return shift_of(max); }

  // Fold in a tile's row maximum (already reduced over the quad) and return the factor the
  // previous sum and any accumulator of this row must be rescaled by (0 while the maximum was
  // -inf: nothing was summed yet).
  __device__ __forceinline__ float rescale_to(float tile_max) {
    const float new_max = fmaxf(max, tile_max);
    const float factor = exp2f(max - shift_of(new_max));
    sum *= factor;
    max = new_max;
    return factor;
  }
  __device__ __forceinline__ float lse2() const { return max + log2f(sum); }  // once per row: exact log2f
};

}  // namespace cute_tiles
}  // namespace pcd_kernels
