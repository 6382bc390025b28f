// Hopper's tensor memory accelerator (TMA) for row tiles, and bounded waits on the mbarriers that
// its copies complete.
//
// Host: row_tile_map() describes a (rows, C) matrix of 16-bit elements with 16-byte aligned rows
// as a 3-D tensor map (channels, row within a segment, segment), segments of `segment_rows` rows
// (an image's pixels, or all rows as one segment), whose box is 64 rows x 64 channels (128 bytes)
// of one segment, written into shared memory
// in the 128-byte swizzle that GMMA's K-major SW128 layouts read: a tile of 64 rows x kC channels
// laid out as tile_to_shape(GMMA::Layout_K_SW128_Atom<T>, (64, kC)) is kC / 64 boxes, box j at
// element 4096 j (checked on the host against CuTe's layout: every element of kC = 64, 128, 256).
// Rows past the segment and channels past C are zero-filled by the copy: a tile that starts in one
// image holds nothing of the next. The driver's encoder is reached
// through the runtime (cudaGetDriverEntryPoint*): the module links no libcuda, so it still loads
// on machines without a driver.
//
// Device: a tile's copies complete on an mbarrier with the tile's byte count; wait_phase()
// spins on it with try_wait and traps after kWaitLimitNs, so a copy that never lands (a bad tensor
// map, a wrong byte count) costs a second and an error rather than a hung GPU.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>

namespace pcd_kernels {
namespace tma {

constexpr int kBoxRows = 64;
constexpr int kBoxChannels = 64;  // 128 bytes of 16-bit elements: the widest box the 128-byte swizzle takes
constexpr int kBoxElems = kBoxRows * kBoxChannels;
constexpr unsigned long long kWaitLimitNs = 1000ull * 1000ull * 1000ull;

// ---------------------------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------------------------

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled, or nullptr where the driver does not provide it.
inline EncodeTiled encoder() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t status = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (status != cudaSuccess) cudaGetLastError();  // not sticky: cleared, so no later check sees it
    if (status != cudaSuccess || found != cudaDriverEntryPointSuccess) return static_cast<EncodeTiled>(nullptr);
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A tensor map of rows [0, rows) x channels [0, channels) of `base` (16-bit elements, bfloat16
// when `bf16`, row stride `ld` elements) as rows / segment_rows segments, boxes of 64 x 64 x 1 in
// the 128-byte swizzle. False when the driver cannot encode it (the caller falls back to
// cp.async); rows > 0, segment_rows dividing rows and the alignment (16-byte base and row stride)
// are the caller's to ensure.
inline bool row_tile_map(CUtensorMap* map, const void* base, std::int64_t rows, std::int64_t segment_rows,
                         std::int64_t channels, std::int64_t ld, bool bf16) {
  const EncodeTiled encode = encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(channels), static_cast<cuuint64_t>(segment_rows),
                              static_cast<cuuint64_t>(rows / segment_rows)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(ld) * 2,  // bytes, of dimensions 1 and 2
                                 static_cast<cuuint64_t>(ld) * 2 * static_cast<cuuint64_t>(segment_rows)};
  const cuuint32_t box[3] = {kBoxChannels, kBoxRows, 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult status = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
                                 const_cast<void*>(base), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return status == CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// Device (sm_90a)
// ---------------------------------------------------------------------------------------------

#if defined(CUTE_ARCH_TMA_SM90_ENABLED)

__device__ __forceinline__ std::uint64_t global_time_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Initialises kStages mbarriers of one arrival each (thread 0) and makes them visible to every
// thread and to the copies (every thread calls it: it holds a barrier).
template <int kStages>
__device__ __forceinline__ void init_stage_barriers(std::uint64_t* full) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int b = 0; b < kStages; ++b) cutlass::arch::ClusterBarrier::init(&full[b], 1);
    cutlass::arch::fence_barrier_init();
    cutlass::arch::fence_view_async_shared();
  }
  __syncthreads();
}

// Waits until the mbarrier completes the phase of parity `phase`, trapping after kWaitLimitNs.
__device__ __forceinline__ void wait_phase(std::uint64_t* barrier, std::uint32_t phase) {
  if (cutlass::arch::ClusterBarrier::try_wait(barrier, phase)) return;
  const std::uint64_t start = global_time_ns();
  while (!cutlass::arch::ClusterBarrier::try_wait(barrier, phase)) {
    if (global_time_ns() - start > kWaitLimitNs) __trap();
  }
}

// One thread: expect `boxes` boxes' bytes on `barrier` (arriving once) ...
__device__ __forceinline__ void expect_boxes(std::uint64_t* barrier, int boxes) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(barrier,
                                                                 static_cast<std::uint32_t>(boxes * kBoxElems * 2));
}

// ... and copy rows [row0, row0 + 64) of segment `segment` x channels [0, 64 kBoxes) of `map`
// into `smem` (1024-byte aligned), box j at element 4096 j, completing on `barrier`.
template <int kBoxes, typename T>
__device__ __forceinline__ void load_row_tile(const CUtensorMap* map, std::uint64_t* barrier, T* smem, int row0,
                                              int segment) {
#pragma unroll
  for (int j = 0; j < kBoxes; ++j) {
    cute::SM90_TMA_LOAD_3D::copy(map, barrier, static_cast<std::uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL),
                                 smem + j * kBoxElems, j * kBoxChannels, row0, segment);
  }
}

#endif

}  // namespace tma
}  // namespace pcd_kernels
