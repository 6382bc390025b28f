// CUDA kernels of pixel_contrastive_loss (DESIGN.md 3.1) on CUTLASS's CuTe: an sm_80-class
// pipeline (cp.async into swizzled shared memory, ldmatrix, mma.sync) built for every architecture,
// and on sm_90a, where one chunk holds C, the same three kernels fed by TMA with each tile's exps
// beside the next tile's wgmma (forward_tma_kernel, anchor_backward_tma_kernel,
// key_backward_tma_kernel; launch_preferring_tma chooses).
//
// Three kernels, none storing anything of size anchors x keys, every output element written by
// exactly one thread (no atomics: deterministic). A block of 4 warps owns 64 rows ("own": anchors,
// or keys in the key pass; 16 per warp) and streams 64-row tiles of the other side:
//
// * forward_kernel: S = anchors . keys^T per key tile, folded into an online base-2 logsumexp per
//   anchor. Writes loss and lse2.
// * anchor_backward_kernel: recomputes S per key tile, forms q = p - [k is i's positive] in
//   registers and accumulates q @ k_hat with q as the A operand straight from the accumulators
//   (no shared-memory round trip), plus d_i = sum_k q_ik logit2_ik for the normalisation epilogue.
// * key_backward_kernel: a block owns 64 keys, streams the anchors that see them, accumulates
//   sum_i (g_i / g_max) q_ik a_hat_i and e_k likewise.
//
// Channels run in chunks of kC (64, 128 or 256; the smallest that holds C, else 256). When one
// chunk holds C the own rows stay in shared memory for the whole loop and a backward block writes
// every gradient channel from one pass: 4 N K C multiply-adds in all (S, then q @ k). For C > 256
// a backward block writes one 256-channel slice (grid z) and streams that slice last, so the
// second product reads it where the first left it; S is then recomputed once per slice.
//
// Operands are prepared by the host (backends/cuda/pixel_contrastive.py): contiguous rows of
// row_stride (C rounded up to 8, so every row starts 16-byte aligned) elements, multiplied by their
// inverse norm when normalising (rounded once to the element type, as the Triton kernels do in
// registers), masked rows zero, channels past C zero. Asynchronous copies move bytes unchanged, so
// the normalisation cannot be fused into the loads as it was when tiles passed through registers.
// Rows past a source's end are zero-filled by the copy itself (source size 0), so nothing outside
// a source reaches an MMA: a NaN there cannot reach anyone else's sums. Masked and out-of-range
// keys get logit -inf.
//
// The gradient through x / max(||x||, eps) is applied in the epilogue: dx = inv * G - proj *
// (x_hat . G) * x_hat with proj = inv where ||x|| >= eps (else 0) and x_hat . G = g * d * ln 2
// from the per-row sums above.
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "pcd_kernels/dispatch.cuh"
#include "pcd_kernels/pixel_contrastive.h"
#include "pcd_kernels/cute_tiles.cuh"
#include "pcd_kernels/tma.cuh"

namespace pcd_kernels {
namespace {

using namespace cute;
using namespace cute_tiles;

constexpr int kRows = 64;      // own rows of a block: anchors (forward, anchor pass) or keys
constexpr int kCols = 64;      // rows of one streamed tile: keys, or anchors in the key pass
constexpr int kMaxChunk = 256;
constexpr float kLn2 = 0.6931471805599453f;
// Per-column values of a streamed tile in shared memory (read by every thread of the epilogue):
// kColumnValues arrays of 64 floats per stage.
constexpr int kColumnValues = 3;

// Which instructions the device code of this compilation pass uses: warpgroup MMAs (wgmma)
// reading both operands from shared memory where the pass targets sm_90a, else mma.sync fed by
// ldmatrix (sm_80 and every later architecture). The host pass sees the latter; it only reads
// kThreads and kTileElems, which both share.
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
#define PCD_KERNELS_WGMMA 1
#else
#define PCD_KERNELS_WGMMA 0
#endif
// Whether it holds the TMA kernels (forward_tma_kernel, anchor_backward_tma_kernel,
// key_backward_tma_kernel): sm_90a device code. Elsewhere they are traps the host never launches.
#if defined(__CUDA_ARCH__) && PCD_KERNELS_WGMMA && defined(CUTE_ARCH_TMA_SM90_ENABLED)
#define PCD_KERNELS_TMA 1
#else
#define PCD_KERNELS_TMA 0
#endif

// Layouts, MMAs and the two products of one (element type, channel chunk, column groups)
// instance: scores(S, own, tile) accumulates S += own . tile^T (64 x 64), product(out, w, tile)
// out += w . tile (64 x kC). The forward runs 4 warps (one warpgroup; S for 64 anchors x 64
// keys); the backward kernels 8, in 2 column groups, so that the gradient accumulators (64 x kC
// float32 per block) take kC / 4 registers per thread rather than kC / 2: each group computes
// half of S's columns and half of out's, and they trade the weights through shared memory.
// column_group(col) names the group that holds column col of S.
template <typename T, int kC, int kGroups>
struct Traits {
  static constexpr int kChunk = kC;
  static constexpr int kThreads = 128 * kGroups;
  static constexpr int kTileElems = kRows * kC;
  static constexpr TypeTag<T> kElement() { return {}; }
  static_assert(kRows == kCols, "own and streamed tiles share one layout");
  static_assert(kC % 64 == 0 && kC <= kMaxChunk, "chunks are whole swizzle atoms");

#if PCD_KERNELS_WGMMA
  // GMMA's 128-byte swizzle: 8 rows x 64 channels (128 bytes), 16-byte groups XOR-swizzled by
  // row, as wgmma's shared-memory descriptors read it.
  using SmemAtom = GMMA::Layout_K_SW128_Atom<T>;
  using SmemRows = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kC>>{}));  // (row, channel)
  // The same tile as (channel, row): out's B operand, channel-major ("MN-major") for wgmma.
  using SmemRowsT = decltype(composition(SmemRows{}, make_layout(Shape<Int<kC>, Int<kCols>>{}, GenRowMajor{})));
  using SmemWeights = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kCols>>{}));
  // One warpgroup per column group: 64 rows x (64 / kGroups) columns of S, x (kC / kGroups) of out.
  using ScoresMma = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kCols / kGroups>, _16>, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<_1, Int<kGroups>, _1>>{}));
  using OutMma = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kC / kGroups>, _16>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_1, Int<kGroups>, _1>>{}));
  __device__ static int column_group(int col) { return col / (kCols / kGroups); }
#else
  // 8 rows x 64 channels, 16-byte groups XOR-swizzled by row: the 8 rows an ldmatrix reads, and
  // the 8 16-byte pieces a warp's cp.async writes per row, fall in 8 different bank groups.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemRows = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kC>>{}));  // (row, channel)
  // The same tile as (channel, row): out's B operand, read with ldmatrix.trans.
  using SmemRowsT = decltype(composition(SmemRows{}, make_layout(Shape<Int<kC>, Int<kCols>>{}, GenRowMajor{})));
  using SmemWeights = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kCols>>{}));
  // 4 warps along the rows, 16 each, kGroups along the columns; 16 columns per warp and MMA step
  // (one ldmatrix.x4 of B). The column groups hold alternate 8-column groups.
  using ScoresMma = TiledMMA<MMA_Atom<typename MmaAtom<T>::type>, Layout<Shape<_4, Int<kGroups>, _1>>,
                             Tile<Int<kRows>, Int<16 * kGroups>, _16>>;
  using OutMma = ScoresMma;
  __device__ static int column_group(int col) { return (col / 8) % kGroups; }
#endif
};

// Shared memory of a block: own rows (1 buffer when one chunk holds C, else 2), 2 streamed, the
// weights (backward), 2 stages of per-column values and the per-row partial sums of the column
// warps (backward). Carved in this order.
template <typename Tr>
struct Smem {
  static constexpr bool kBackward = Tr::kThreads > 128;
  static constexpr int kRowValues = 3;
  using T = typename decltype(Tr::kElement())::type;

  // elements of the own and streamed tiles, where the weights start
  __host__ __device__ static int own_and_streamed(int chunks) { return ((chunks > 1 ? 2 : 1) + 2) * Tr::kTileElems; }
  __host__ __device__ static std::size_t bytes(int chunks) {
    return static_cast<std::size_t>(own_and_streamed(chunks)) * sizeof(T) +
           (kBackward ? kRows * kCols * sizeof(T) : 0) + 2 * kColumnValues * kCols * sizeof(float) +
           (kBackward ? 2 * kRowValues * kRows * sizeof(float) : 0);
  }
};

// Rows [row0, row0 + 64) x channels [c0, c0 + kC) of an operand into a swizzled tile; rows >= hi
// and channels >= ld are zero-filled.
template <typename Tr, typename T, typename Tile>
__device__ __forceinline__ void load_rows(Tile tile, const T* rows, std::int64_t ld, int row0, int hi, int c0) {
  cute_tiles::load_rows<Tr::kThreads, kRows, Tr::kChunk>(tile, rows, ld, row0, hi, c0, ld);
}

#if PCD_KERNELS_WGMMA
// acc += A . B^T (gemm_shared) issued and committed, not waited for: wait_mma(acc) waits. Until then acc's
// registers belong to the tensor cores (the fences keep the compiler off them).
template <typename Mma, typename Acc, typename SA, typename SB>
__device__ __forceinline__ void gemm_shared_async(Acc& acc, const SA& sA, const SB& sB) {
  Mma mma;
  auto thr_mma = mma.get_thread_slice(threadIdx.x);
  Tensor rA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));
  Tensor rB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
#pragma unroll
  for (int k = 0; k < size<2>(rA); ++k) gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  warpgroup_commit_batch();
  warpgroup_fence_operand(acc);
}

// Waits until at most kPending of this warpgroup's committed wgmma batches are still running
// (0: all done); acc is the result the caller reads next.
template <int kPending = 0, typename Acc>
__device__ __forceinline__ void wait_mma(Acc& acc) {
  warpgroup_wait<kPending>();
  warpgroup_fence_operand(acc);
}

// acc += A . B^T, both operands read from shared memory by wgmma, which reads through the async
// proxy: whatever filled them (cp.async, stores) was fenced for it before the last barrier.
template <typename Mma, typename Acc, typename SA, typename SB>
__device__ __forceinline__ void gemm_shared(Acc& acc, const SA& sA, const SB& sB) {
  gemm_shared_async<Mma>(acc, sA, sB);
  wait_mma(acc);
}

// Makes this thread's shared-memory writes (cp.async, stores) visible to wgmma's reads once a
// barrier follows.
__device__ __forceinline__ void fence_for_mma() { cutlass::arch::fence_view_async_shared(); }
#else
__device__ __forceinline__ void fence_for_mma() {}  // ldmatrix reads what the barrier published
#endif

// S += own . tile^T over one chunk (64 x 64).
template <typename Tr, typename Acc, typename Tile>
__device__ __forceinline__ void scores(Acc& S, const Tile& own, const Tile& tile) {
#if PCD_KERNELS_WGMMA
  gemm_shared<typename Tr::ScoresMma>(S, own, tile);
#else
  typename Tr::ScoresMma mma;
  using LoadAtom = Copy_Atom<SM75_U32x4_LDSM_N, typename Smem<Tr>::T>;
  gemm_smem(S, mma, own, tile, tile, make_tiled_copy_A(LoadAtom{}, mma), make_tiled_copy_B(LoadAtom{}, mma));
#endif
}

// out += w . tile (64 x kC): the weights w (64 x 64) times the streamed rows' slice.
template <typename Tr, typename Out, typename W, typename Tile>
__device__ __forceinline__ void product(Out& out, const W& w, const Tile& tile) {
  Tensor tile_t = make_tensor(tile.data(), typename Tr::SmemRowsT{});
#if PCD_KERNELS_WGMMA
  gemm_shared<typename Tr::OutMma>(out, w, tile_t);
#else
  typename Tr::OutMma mma;
  using T = typename Smem<Tr>::T;
  // (a transposed view's swizzle is no layout a fragment can take: the fragment's shape comes
  // from the view without it)
  Tensor tile_t_plain = make_tensor(tile.data(), get_nonswizzle_portion(typename Tr::SmemRowsT{}));
  gemm_smem(out, mma, w, tile_t, tile_t_plain, make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, mma),
            make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, T>{}, mma));
#endif
}

// Which key tiles a source contributes and how its positives are found.
enum class Keys { kPlain, kTeacher, kPositiveOnly };

// The operands, numbered for Params<T>::rows_of / valid_of.
enum Operand : int { kAnchorRows, kTeacherRows, kExtraRows, kQueueRows };

// Rows [lo, end) of an operand streamed in 64-row tiles; rows >= hi are zero. (The operand's
// pointers stay in the kernel's parameters: a schedule holding them would hold 12 more
// registers through the whole loop.)
template <typename T>
struct Source {
  int lo = 0, end = 0, hi = 0;
  Operand operand = kTeacherRows;
  Keys kind = Keys::kPlain;

  __device__ __forceinline__ int tiles() const { return end > lo ? (end - lo + kCols - 1) / kCols : 0; }
};

// The order a block streams its tiles in: every tile of source 0, then 1, then 2, and within a
// tile the chunks [z + 1, ..., z] (mod chunks) so that a backward block's slice z comes last.
// (Three named sources rather than an array: a runtime index into an array of structs would put
// the schedule in local memory.)
template <typename T>
struct Schedule {
  Source<T> src0, src1, src2;
  int n_sources = 0;
  int chunks = 1;
  int z = 0;

  __device__ __forceinline__ Source<T> source(int i) const { return i == 0 ? src0 : i == 1 ? src1 : src2; }
  __device__ __forceinline__ int steps() const {
    const int n = src0.tiles() + (n_sources > 1 ? src1.tiles() + src2.tiles() : 0);
    return n * chunks;
  }
  // The source, first row and channel chunk of step s; `first` / `last` when it starts / ends
  // its tile.
  __device__ __forceinline__ void at(int s, int& source, int& row0, int& chunk, bool& first, bool& last) const {
    int tile = s / chunks;
    const int j = s % chunks;
    const int t0 = src0.tiles(), t1 = src1.tiles();
    source = tile < t0 ? 0 : tile < t0 + t1 ? 1 : 2;
    tile -= source == 0 ? 0 : source == 1 ? t0 : t0 + t1;
    row0 = (source == 0 ? src0.lo : source == 1 ? src1.lo : src2.lo) + tile * kCols;
    chunk = (z + 1 + j) % chunks;
    first = j == 0;
    last = j == chunks - 1;
  }
};

template <typename T>
struct Params {
  const T *anchors, *teacher, *extra, *queue;  // prepared operands, row stride ld
  const float *inv_anchors, *inv_teacher, *inv_queue;
  const std::uint8_t *valid, *valid_extra;
  Negatives negatives;
  int n_rows, hw, C, n_extra, n_queue;
  std::int64_t ld;
  int chunks;
  float logit_scale, inv_temperature;

  __device__ __forceinline__ const T* rows_of(Operand o) const {
    return o == kAnchorRows ? anchors : o == kTeacherRows ? teacher : o == kExtraRows ? extra : queue;
  }
  // 1 where row `row` of operand o exists below hi and is not masked
  __device__ __forceinline__ bool ok(Operand o, int row, int hi) const {
    const std::uint8_t* v = o == kExtraRows ? valid_extra : o == kQueueRows ? nullptr : valid;
    return row >= 0 && row < hi && (v == nullptr || v[row] != 0);
  }
};

// The anchors a block owns: rows [row0, row0 + 64) of segment [lo, hi) (an image in "image"
// mode, the batch otherwise).
struct Segment {
  int lo, hi, row0;
};

template <typename T>
__device__ __forceinline__ Segment anchor_segment(const Params<T>& p) {
  Segment s;
  const bool image = p.negatives == Negatives::kImage;
  s.lo = image ? static_cast<int>(blockIdx.y) * p.hw : 0;
  s.hi = image ? s.lo + p.hw : p.n_rows;
  s.row0 = s.lo + static_cast<int>(blockIdx.x) * kRows;
  return s;
}

// The key sources of an anchor block: the teacher pixels of its segment (in "none" mode only the
// tile of its own positives), the extra keys ("batch" mode) and the queue rows. Without a student
// gradient ("none" mode, teacher gradient only) the positives' tile is all it takes.
template <typename T>
__device__ __forceinline__ Schedule<T> anchor_schedule(const Params<T>& p, const Segment& seg, bool positives_only) {
  Schedule<T> sch;
  const bool none = p.negatives == Negatives::kNone;
  Source<T>& t = sch.src0;
  t.operand = kTeacherRows;
  t.hi = seg.hi;
  t.lo = none ? seg.row0 : seg.lo;
  t.end = none ? seg.row0 + 1 : seg.hi;
  t.kind = none ? Keys::kPositiveOnly : Keys::kTeacher;
  sch.src1.operand = kExtraRows;
  sch.src1.end = sch.src1.hi = p.negatives == Negatives::kBatch ? p.n_extra : 0;
  sch.src2.operand = kQueueRows;
  sch.src2.end = sch.src2.hi = p.n_queue;
  sch.n_sources = positives_only ? 1 : 3;
  sch.chunks = p.chunks;
  return sch;
}

// The pipeline every kernel runs: own rows [own0, own0 + 64) of `own` (rows < own_hi), and the
// schedule's tiles through two shared-memory stages, the copy of step s + 1 in flight while step
// s multiplies. When a step's copies are issued, columns(v, source, row0) runs on threads 0..63
// (thread c for streamed row row0 + c) and fills its kColumnValues values v; they reach shared
// memory (col[64 j + c]) only after step s's tile_done, so that their global loads' latency hides
// behind step s's MMAs rather than holding up the barrier that starts step s. Per step: S
// (64 x 64 float32, this thread's fragment) accumulates own . tile^T over the step's chunk, and
// on a tile's last step tile_done(S, source, row0, tile, col) runs, `tile` the streamed rows'
// shared tile holding the schedule's slice z.
template <typename Tr, typename T, typename Columns, typename F>
__device__ __forceinline__ void stream_tiles(T* smem, const Params<T>& p, Operand own_rows, int own0, int own_hi,
                                             const Schedule<T>& sch, Columns&& columns, F&& tile_done) {
  using SmemRows = typename Tr::SmemRows;
  constexpr int kC = Tr::kChunk;
  const int own_stages = sch.chunks > 1 ? 2 : 1;
  T* own_smem = smem;
  T* str_smem = smem + own_stages * Tr::kTileElems;
  float* col_smem = reinterpret_cast<float*>(str_smem + 2 * Tr::kTileElems + (Smem<Tr>::kBackward ? kRows * kCols : 0));
  auto own_tile = [&](int stage) { return make_tensor(make_smem_ptr(own_smem + stage * Tr::kTileElems), SmemRows{}); };
  auto str_tile = [&](int stage) { return make_tensor(make_smem_ptr(str_smem + stage * Tr::kTileElems), SmemRows{}); };

  const int steps = sch.steps();
  float values[kColumnValues] = {0.f, 0.f, 0.f};  // the column values of the step last issued
  auto issue = [&](int s) {
    int source, row0, chunk;
    bool first, last;
    sch.at(s, source, row0, chunk, first, last);
    if (sch.chunks > 1) {
      load_rows<Tr>(own_tile(s % 2), p.rows_of(own_rows), p.ld, own0, own_hi, chunk * kC);
    } else if (s == 0) {
      load_rows<Tr>(own_tile(0), p.rows_of(own_rows), p.ld, own0, own_hi, 0);
    }
    const Source<T> src = sch.source(source);
    load_rows<Tr>(str_tile(s % 2), p.rows_of(src.operand), p.ld, row0, src.hi, chunk * kC);
    cp_async_fence();
    const bool has_values = last && threadIdx.x < kCols;
    if (has_values) columns(values, source, row0);
    return has_values;
  };
  // Stage s % 2's column values: its last reader was step s - 2's tile_done, before the barrier
  // that ended step s - 2; its next is step s's, after the barrier that starts it.
  auto store_values = [&](int s) {
#pragma unroll
    for (int j = 0; j < kColumnValues; ++j) col_smem[((s % 2) * kColumnValues + j) * kCols + threadIdx.x] = values[j];
  };

  Tensor S = partition_fragment_C(typename Tr::ScoresMma{}, Shape<Int<kRows>, Int<kCols>>{});
  // cute_tiles::run_pipeline's loop, written out: as a call with the body a lambda, the anchor
  // kernel at 256 channels spilled 8 bytes on sm_80 (255 registers either way).
  if (steps > 0 && issue(0)) store_values(0);
  for (int s = 0; s < steps; ++s) {
    bool next_values = false;
    if (s + 1 < steps) {
      next_values = issue(s + 1);  // into the stage step s - 1 used; the barrier ending step s - 1 freed it
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_for_mma();
    __syncthreads();
    int source, row0, chunk;
    bool first, last;
    sch.at(s, source, row0, chunk, first, last);
    if (first) clear(S);
    scores<Tr>(S, own_tile(sch.chunks > 1 ? s % 2 : 0), str_tile(s % 2));
    if (last) tile_done(S, source, row0, str_tile(s % 2), col_smem + (s % 2) * kColumnValues * kCols);
    if (next_values) store_values(s + 1);
    __syncthreads();
  }
}

// This thread's weights (float32 accumulators of S's layout, or zeros where !nonzero) into the
// weights tile in the element type.
template <typename Tr, typename Acc>
__device__ __forceinline__ void store_weights(typename Smem<Tr>::T* w_smem, const Acc& weights, bool nonzero) {
  using T = typename Smem<Tr>::T;
  typename Tr::ScoresMma mma;
  Tensor sW = make_tensor(make_smem_ptr(w_smem), typename Tr::SmemWeights{});
  const Tensor at = mma.get_thread_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kCols>>{}));
#pragma unroll
  for (int i = 0; i < size(weights); ++i) sW(get<0>(at(i)), get<1>(at(i))) = static_cast<T>(nonzero ? weights(i) : 0.f);
}

// out += weights @ tile for the weights of a tile (float32 accumulators of S's layout): they go
// to shared memory in the element type, where every warp reads the 16 rows x 64 columns it
// multiplies (each warp computed half of those columns), then the product with the streamed
// rows' slice (read transposed). Every thread calls it (it holds a barrier).
template <typename Tr, typename Acc, typename Out, typename Tile>
__device__ __forceinline__ void weights_times_rows(Out& out, const Acc& weights, typename Smem<Tr>::T* w_smem,
                                                   const Tile& tile) {
  store_weights<Tr>(w_smem, weights, true);
  fence_for_mma();
  __syncthreads();
  product<Tr>(out, make_tensor(make_smem_ptr(w_smem), typename Tr::SmemWeights{}), tile);
}

// Sums each own row's values over the column warps of a backward block: v[m][j] holds this
// thread's (quad-summed) share of value j of its m-th row. Every thread calls it (it holds
// barriers); rows are those of coords (fragment_coords).
template <typename Tr, int kValues, typename Coords>
__device__ __forceinline__ void sum_over_column_warps(float (&v)[2][kValues], float* part, const Coords& coords) {
  static_assert(kValues <= Smem<Tr>::kRowValues, "room for the row values");
  const int half = Tr::column_group(get<1>(coords(0, 0)));
  __syncthreads();  // the previous users of the area are done
  if (lane_in_group() == 0) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int j = 0; j < kValues; ++j) part[(half * kValues + j) * kRows + get<0>(coords(m, 0))] = v[m][j];
    }
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < 2; ++m) {
#pragma unroll
    for (int j = 0; j < kValues; ++j) {
      const int r = get<0>(coords(m, 0));
      v[m][j] = part[j * kRows + r] + part[(kValues + j) * kRows + r];
    }
  }
}

// 1 where key `key` of the schedule's source exists and is not masked, else 0.
template <typename T>
__device__ __forceinline__ float key_flag(const Params<T>& p, const Schedule<T>& sch, int source, int key) {
  const Source<T> src = sch.source(source);
  return p.ok(src.operand, key, src.hi) ? 1.f : 0.f;
}

template <typename T>
__device__ __forceinline__ auto key_columns(const Params<T>& p, const Schedule<T>& sch) {
  return [&p, &sch](float (&v)[kColumnValues], int source, int key0) {
    v[0] = key_flag(p, sch, source, key0 + static_cast<int>(threadIdx.x));
  };
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <typename T, int kC>
using ForwardTraits = Traits<T, kC, 1>;
template <typename T, int kC>
using BackwardTraits = Traits<T, kC, 2>;

// What a forward thread accumulates for its 2 anchor rows: their online lse2 and its share of
// their positive logit2 (quad-summed at the end).
struct ForwardRows {
  OnlineLse online[2];
  float pos[2] = {0.f, 0.f};

};

// Folds one key tile's scores S (this thread's fragment; `col` the tile's per-key 1 / 0 for
// valid / not) into the rows' online lse2 and positives.
template <typename Tr, typename T, typename Acc>
__device__ __forceinline__ void fold_scores(ForwardRows& rows, Acc& S, const Params<T>& p, const Segment& seg,
                                            const Schedule<T>& sch, int source, int key0, const float* col) {
  const auto coords = fragment_coords<typename Tr::ScoresMma, kRows, kCols>();  // (2 rows, 16 columns) of this thread
  constexpr int kN = decltype(size<1>(coords))::value;
  const Keys kind = source == 0 ? sch.src0.kind : Keys::kPlain;
  Tensor s = make_tensor(S.data(), rowcol(S.layout()));
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int row = seg.row0 + get<0>(coords(m, 0));
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      const int c = get<1>(coords(m, n));
      float v = col[c] != 0.f ? s(m, n) * p.logit_scale : -INFINITY;
      const bool positive = key0 + c == row;
      if (kind != Keys::kPlain && positive) rows.pos[m] += v;
      if (kind == Keys::kPositiveOnly) v = -INFINITY;  // folded in at the end, once
      s(m, n) = v;
      tile_max = fmaxf(tile_max, v);
    }
    rows.online[m].rescale_to(quad_max(tile_max));
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kN; ++n) sum += exp2f(s(m, n) - rows.online[m].max);  // NaN stays NaN
    rows.online[m].sum += quad_sum(sum);
  }
}

// Writes loss and lse2 of the rows (0 at masked anchors).
template <typename Tr, typename T>
__device__ __forceinline__ void write_forward(ForwardRows& rows, const Params<T>& p, const Segment& seg, float* loss,
                                              float* lse2_out) {
  const auto coords = fragment_coords<typename Tr::ScoresMma, kRows, kCols>();
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const float positive = quad_sum(rows.pos[m]);
    OnlineLse& online = rows.online[m];
    if (p.negatives == Negatives::kNone) {
      // "none": the positive is a key of its own, counted once here (fmaxf ignores a NaN
      // positive, exp2f(NaN) then carries it into the sum).
      const float new_max = fmaxf(online.max, positive);
      online.sum = online.sum * exp2f(online.max - new_max) + exp2f(positive - new_max);
      online.max = new_max;
    }
    const int row = seg.row0 + get<0>(coords(m, 0));
    if (lane_in_group() == 0 && row < seg.hi) {
      const bool valid = p.valid == nullptr || p.valid[row] != 0;
      const float lse2 = online.lse2();
      loss[row] = valid ? (lse2 - positive) * kLn2 : 0.f;
      lse2_out[row] = valid ? lse2 : 0.f;
    }
  }
}

template <typename T, int kC>
__global__ void __launch_bounds__(ForwardTraits<T, kC>::kThreads, 1)
    forward_kernel(const __grid_constant__ Params<T> p, float* loss, float* lse2_out) {
  using Tr = ForwardTraits<T, kC>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // (GMMA's 128-byte swizzle repeats every 1 KB)
  const Segment seg = anchor_segment(p);
  const Schedule<T> sch = anchor_schedule(p, seg, false);
  ForwardRows rows;
  stream_tiles<Tr>(reinterpret_cast<T*>(smem_raw), p, kAnchorRows, seg.row0, seg.hi, sch, key_columns(p, sch),
                   [&](auto& S, int source, int key0, const auto&, const float* col) {
                     fold_scores<Tr>(rows, S, p, seg, sch, source, key0, col);
                   });
  write_forward<Tr>(rows, p, seg, loss, lse2_out);
}

// The operands as TMA tensor maps (tma.cuh), for the TMA kernels; an absent or empty operand's map
// is never read. With by_image the anchors' and teacher's maps are segmented by image (hw rows):
// a tile of an image's pixels then reads zeros past the image's end, and the grid's y is the image.
struct TensorMaps {
  CUtensorMap anchors, teacher, extra, queue;
  int by_image;

#if PCD_KERNELS_TMA
  __device__ __forceinline__ const CUtensorMap* of(Operand o) const {
    return o == kAnchorRows ? &anchors : o == kTeacherRows ? &teacher : o == kExtraRows ? &extra : &queue;
  }
  // The map coordinates (row within its segment, segment) of operand o's row row0 (in this block's
  // image when segmented).
  __device__ __forceinline__ void coords(Operand o, int row0, int hw, int& row, int& segment) const {
    const bool segmented = by_image != 0 && (o == kAnchorRows || o == kTeacherRows);
    segment = segmented ? static_cast<int>(blockIdx.y) : 0;
    row = segmented ? row0 - segment * hw : row0;
  }
  // One thread: copy operand o's 64-row tile at row0 into smem, completing on barrier.
  template <int kBoxes, typename T>
  __device__ __forceinline__ void load(Operand o, int row0, int hw, std::uint64_t* barrier, T* smem) const {
    int row, segment;
    coords(o, row0, hw, row, segment);
    tma::load_row_tile<kBoxes>(of(o), barrier, smem, row, segment);
  }
  // Thread 0: a TMA kernel's step s, operand o's tile at row0 into stage_smem (and with step 0 the
  // own rows' tile at own0 into own_smem), completing on full[s % kStages].
  template <int kBoxes, int kStages, typename T>
  __device__ __forceinline__ void load_step(std::uint64_t* full, int s, Operand own, int own0, T* own_smem, Operand o,
                                            int row0, T* stage_smem, int hw) const {
    if (threadIdx.x != 0) return;
    std::uint64_t* barrier = &full[s % kStages];
    tma::expect_boxes(barrier, (s == 0 ? 2 : 1) * kBoxes);
    if (s == 0) load<kBoxes>(own, own0, hw, barrier, own_smem);
    load<kBoxes>(o, row0, hw, barrier, stage_smem);
  }
#endif
};

// Shared memory of forward_tma_kernel: the anchors' tile, kKeyStages key tiles, one more stage of
// 64 key flags, an mbarrier per key stage. 3 key stages where tiles are narrower than 256
// channels; at 256, 2 (99 KB: two blocks per SM, whose MMAs and exps interleave too, where 3
// stages would leave room for one).
template <typename Tr>
struct TmaForwardSmem {
  static constexpr int kKeyStages = Tr::kChunk == kMaxChunk ? 2 : 3;
  static constexpr int kFlagStages = kKeyStages + 1;
  static constexpr std::size_t kFlagsOffset = (1 + kKeyStages) * Tr::kTileElems * sizeof(typename Smem<Tr>::T);
  static constexpr std::size_t kBarriersOffset = kFlagsOffset + kFlagStages * kCols * sizeof(float);
  static constexpr std::size_t kBytes = kBarriersOffset + kKeyStages * sizeof(std::uint64_t);
  // every sm_90 GPU allows a block 227 KB (so the host asks no device for it)
  static_assert(kBytes <= 227 * 1024, "forward_tma_kernel's shared memory fits an sm_90 block");
};

// Whether this compilation pass holds the TMA kernels' code (PCD_KERNELS_TMA), as a device
// variable the host reads from the module loaded for its GPU: a plain sm_90 build runs on the same
// GPUs and reports the same binary version, but holds only the kernels' traps.
}  // namespace
__device__ int kTmaKernelsBuilt = PCD_KERNELS_TMA;  // (external linkage: kept in every cubin)
namespace {

// The TMA kernels' loop over steps [0, steps) with two accumulators: start(S0, 0), then
// step(S_now, S_next, s) for each s < steps - 1 (S_now holds step s's, S_next receives step
// s + 1's) and finish(S, steps - 1). Unrolled by 2 with the tail peeled, so that each wgmma and its
// wait lie in straight-line code: under separate conditions ptxas could not pair them and would
// serialise every wgmma (C7514).
template <typename Acc, typename Start, typename Step, typename Finish>
__device__ __forceinline__ void run_alternating(int steps, Acc& S0, Acc& S1, Start&& start, Step&& step,
                                                Finish&& finish) {
  start(S0, 0);
  int s = 0;
  for (; s + 2 < steps; s += 2) {
    step(S0, S1, s);
    step(S1, S0, s + 1);
  }
  if (s + 1 < steps) {
    step(S0, S1, s);
    finish(S1, s + 1);
  } else {
    finish(S0, s);
  }
}

// The forward for sm_90a when one chunk holds C: forward_kernel's work with Hopper's copies, and
// the exps of each key tile overlapping the next tile's MMA.
//
// * Tiles arrive by TMA (one thread issues kC / 64 boxes per tile) into a ring of L = kKeyStages
//   stages, each completing on its mbarrier, whose phase the threads wait on: no per-thread copy
//   instructions, and rows past an operand's end, or in "image" mode an image's, are zero-filled
//   (TensorMaps). Keys past a segment's end get logit -inf all the same (a select), their
//   anchors' rows are not written.
// * Step s: issue tile s + 1's S wgmma, wait until only it is running (tile s's S is complete),
//   barrier (every warp's MMA has read tile s's stage, every thread has read tile s - 1's flags),
//   refill that stage with tile s + L, then fold tile s's S (the exps, on the multi-function unit,
//   while the tensor cores compute tile s + 1), then store tile s + L's flags (loaded from global
//   memory before the fold, so that the load's latency hides behind it). The fold reads the
//   accumulator the next step's wgmma overwrites, so the compiler cannot move the exps past that
//   wgmma, nor before the wait they depend on. Two accumulators; a tile has L - 1 steps to land.
template <typename T, int kC>
__global__ void __launch_bounds__(ForwardTraits<T, kC>::kThreads, 1)
    forward_tma_kernel(const __grid_constant__ Params<T> p, const __grid_constant__ TensorMaps maps, float* loss,
                       float* lse2_out) {
#if PCD_KERNELS_TMA
  using Tr = ForwardTraits<T, kC>;
  using Sm = TmaForwardSmem<Tr>;
  using SmemRows = typename Tr::SmemRows;
  constexpr int kBoxes = kC / tma::kBoxChannels;
  constexpr int kStages = Sm::kKeyStages;
  constexpr int kFlagStages = Sm::kFlagStages;
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // (the 128-byte swizzle repeats every 1 KB)
  T* own_smem = reinterpret_cast<T*>(smem_raw);
  T* key_smem = own_smem + Tr::kTileElems;
  float* flags = reinterpret_cast<float*>(smem_raw + Sm::kFlagsOffset);
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(smem_raw + Sm::kBarriersOffset);
  const Segment seg = anchor_segment(p);
  const Schedule<T> sch = anchor_schedule(p, seg, false);
  const int steps = sch.steps();  // one chunk: a step is a key tile; at least the positives' tile

  tma::init_stage_barriers<kStages>(full);

  // Key tile s (and, with tile 0, the anchors' tile) into stage s % L by TMA; returns its flag
  // for key threadIdx.x (threads < 64), for the caller to store into flag stage s % (L + 1).
  auto issue = [&](int s) {
    int source, row0, chunk;
    bool first, last;
    sch.at(s, source, row0, chunk, first, last);
    maps.load_step<kBoxes, kStages>(full, s, kAnchorRows, seg.row0, own_smem, sch.source(source).operand, row0,
                                    key_smem + (s % kStages) * Tr::kTileElems, p.hw);
    return threadIdx.x < kCols ? key_flag(p, sch, source, row0 + static_cast<int>(threadIdx.x)) : 0.f;
  };
  auto store_flag = [&](int s, float flag) {
    if (threadIdx.x < kCols) flags[(s % kFlagStages) * kCols + threadIdx.x] = flag;
  };
  const Tensor own = make_tensor(make_smem_ptr(own_smem), SmemRows{});
  auto start_scores = [&](auto& S, int s) {  // S = anchors . key tile s^T, issued, not waited for
    tma::wait_phase(&full[s % kStages], (s / kStages) & 1);
    clear(S);
    gemm_shared_async<typename Tr::ScoresMma>(
        S, own, make_tensor(make_smem_ptr(key_smem + (s % kStages) * Tr::kTileElems), SmemRows{}));
  };
  ForwardRows rows;
  auto fold = [&](auto& S, int s) {
    int source, row0, chunk;
    bool first, last;
    sch.at(s, source, row0, chunk, first, last);
    fold_scores<Tr>(rows, S, p, seg, sch, source, row0, flags + (s % kFlagStages) * kCols);
  };
  // Step s < steps - 1: S_now receives tile s's scores (issued a step ago), S_next tile s + 1's.
  auto step = [&](auto& S_now, auto& S_next, int s) {
    start_scores(S_next, s + 1);
    wait_mma<1>(S_now);
    __syncthreads();
    const bool refill = s + kStages < steps;
    const float flag = refill ? issue(s + kStages) : 0.f;
    fold(S_now, s);
    if (refill) store_flag(s + kStages, flag);
  };

  using Acc = decltype(partition_fragment_C(typename Tr::ScoresMma{}, Shape<Int<kRows>, Int<kCols>>{}));
  Acc S0, S1;
#pragma unroll
  for (int t = 0; t < kStages; ++t) {
    if (t < steps) store_flag(t, issue(t));
  }
  __syncthreads();  // the flags of the first tiles
  run_alternating(steps, S0, S1, start_scores, step, [&](auto& S, int s) {
    wait_mma(S);
    fold(S, s);
  });
  write_forward<Tr>(rows, p, seg, loss, lse2_out);
#else
  __trap();  // the host launches this kernel only where its sm_90a code exists (tma_refusal)
#endif
}

// Calls f(acc, m, row, col) for each of this thread's output accumulators whose row (its m-th,
// 0 or 1) is below hi and whose channel col (slice z of kC channels) is below C.
template <typename Tr, typename Out, typename F>
__device__ __forceinline__ void for_each_output(const Out& out, int row0, int hi, int oc, int C, F&& f) {
  const Tensor o = make_tensor(out.data(), rowcol(out.layout()));
  const auto coords = fragment_coords<typename Tr::OutMma, kRows, Tr::kChunk>();
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int row = row0 + get<0>(coords(m, 0));
    if (row >= hi) continue;
#pragma unroll
    for (int n = 0; n < decltype(size<1>(coords))::value; ++n) {
      const int col = oc + get<1>(coords(m, n));
      if (col < C) f(o(m, n), m, row, col);
    }
  }
}

__device__ __forceinline__ float to_float(cute::half_t x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(cute::bfloat16_t x) { return static_cast<float>(x); }

// ------------------------------------------------------------------------------------------
// The backward kernels' pipeline on sm_90a
// ------------------------------------------------------------------------------------------

// Shared memory of a TMA backward block: the own rows' tile, a ring of kStages streamed tiles, the
// weights, kStages stages of per-column values, the per-row partial sums (Smem's), an mbarrier
// per stage. 173 KB at 256 channels, 93 KB at 128; one block per SM either way (the registers:
// 160 to 210 per thread), as the cp.async kernels.
template <typename Tr>
struct TmaBackwardSmem {
  using T = typename Smem<Tr>::T;
  static constexpr int kStages = 4;
  // a tile is waited for L - 2 steps after its copy is issued (stream_tiles_tma)
  static_assert(kStages >= 3, "the ring holds the tile in use, the next one, and one landing");
  static constexpr std::size_t kTileBytes = Tr::kTileElems * sizeof(T);
  static constexpr std::size_t kWeightsOffset = (1 + kStages) * kTileBytes;
  static constexpr std::size_t kColumnsOffset = kWeightsOffset + kRows * kCols * sizeof(T);
  static constexpr std::size_t kRowPartOffset = kColumnsOffset + kStages * kColumnValues * kCols * sizeof(float);
  static constexpr std::size_t kBarriersOffset = kRowPartOffset + 2 * Smem<Tr>::kRowValues * kRows * sizeof(float);
  static constexpr std::size_t kBytes = kBarriersOffset + kStages * sizeof(std::uint64_t);
  static_assert(kBytes <= 227 * 1024, "a TMA backward block's shared memory fits an sm_90 block");
};

// Where a backward block's weights tile and per-row partial sums lie: after the cp.async
// pipeline's tiles (chunks decides how many), or at TmaBackwardSmem's offsets.
template <typename Tr, bool kTma>
__device__ __forceinline__ typename Smem<Tr>::T* weights_smem(unsigned char* smem, int chunks) {
  using T = typename Smem<Tr>::T;
  if constexpr (kTma) return reinterpret_cast<T*>(smem + TmaBackwardSmem<Tr>::kWeightsOffset);
  return reinterpret_cast<T*>(smem) + Smem<Tr>::own_and_streamed(chunks);
}
template <typename Tr, bool kTma>
__device__ __forceinline__ float* row_part_smem(unsigned char* smem, int chunks) {
  if constexpr (kTma) return reinterpret_cast<float*>(smem + TmaBackwardSmem<Tr>::kRowPartOffset);
  return reinterpret_cast<float*>(smem + Smem<Tr>::bytes(chunks)) - 2 * Smem<Tr>::kRowValues * kRows;
}

// stream_tiles' work for a backward block on sm_90a when one chunk holds C, with the products
// done here: the own rows' tile (own0, of operand own_rows) and the schedule's tiles by TMA, each
// tile's exps overlapping the next tile's S, out += W . tile accumulated for every tile whose
// weights(S, source, row0, col) (which turns S into the tile's weights in place) returns true;
// a tile for which it returns false adds nothing (its stage is zeroed: 0 times a NaN there
// would be NaN). columns(v, source, row0) as in stream_tiles.
//
// Tiles land in a ring of L = kStages stages by TMA, rows past an operand's end, or an image's
// when the maps are segmented, read as zeros (the product sums over the streamed rows: another
// image's NaN must not reach them). Step s, with S(s) issued a step earlier:
// * wait for tile s + 1, issue S(s + 1);
// * wait until only it runs: S(s) and product(s - 1), committed before it, are complete;
// * barrier: every warp's product(s - 1) is done with tile s - 1's stage and the weights tile,
//   every thread with tile s - 1's column values; refill that stage with tile s - 1 + L;
// * weights(S(s)) (the exps, on the multi-function unit while the tensor cores run S(s + 1)) into
//   the weights tile; store tile s - 1 + L's column values (their global loads issued with its
//   copy, their latency behind the exps);
// * fence, barrier (both column groups' weights), issue product(s) (not waited for).
// A tile has L - 2 steps to land; two S accumulators alternate (run_alternating).
template <typename Tr, typename T, typename Columns, typename Weights, typename Out>
__device__ __forceinline__ void stream_tiles_tma(unsigned char* smem_raw, const Params<T>& p, const TensorMaps& maps,
                                                 Operand own_rows, int own0, const Schedule<T>& sch, Columns&& columns,
                                                 Weights&& weights, Out& out) {
#if PCD_KERNELS_TMA
  using Sm = TmaBackwardSmem<Tr>;
  using SmemRows = typename Tr::SmemRows;
  constexpr int kBoxes = Tr::kChunk / tma::kBoxChannels;
  constexpr int kStages = Sm::kStages;
  T* own_smem = reinterpret_cast<T*>(smem_raw);
  T* str_smem = own_smem + Tr::kTileElems;
  T* w_smem = weights_smem<Tr, true>(smem_raw, 1);
  float* col_smem = reinterpret_cast<float*>(smem_raw + Sm::kColumnsOffset);
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(smem_raw + Sm::kBarriersOffset);
  const int steps = sch.steps();  // one chunk: a step is a tile; at least one
  auto stage = [&](int s) { return str_smem + (s % kStages) * Tr::kTileElems; };

  tma::init_stage_barriers<kStages>(full);

  float values[kColumnValues] = {0.f, 0.f, 0.f};  // the column values of the tile last issued
  auto issue = [&](int s) {  // tile s (with tile 0 the own rows) into stage s % L
    int source, row0, chunk;
    bool first, last;
    sch.at(s, source, row0, chunk, first, last);
    maps.load_step<kBoxes, kStages>(full, s, own_rows, own0, own_smem, sch.source(source).operand, row0, stage(s),
                                    p.hw);
    if (threadIdx.x < kCols) columns(values, source, row0);
  };
  auto store_values = [&](int s) {
    if (threadIdx.x < kCols) {
#pragma unroll
      for (int j = 0; j < kColumnValues; ++j) col_smem[((s % kStages) * kColumnValues + j) * kCols + threadIdx.x] = values[j];
    }
  };
  const Tensor own = make_tensor(make_smem_ptr(own_smem), SmemRows{});
  auto start_scores = [&](auto& S, int s) {  // S = own . tile s^T, issued, not waited for
    tma::wait_phase(&full[s % kStages], (s / kStages) & 1);
    clear(S);
    gemm_shared_async<typename Tr::ScoresMma>(S, own, make_tensor(make_smem_ptr(stage(s)), SmemRows{}));
  };
  // S(s) complete and every warp past the barrier after it: tile s's weights, product(s) issued.
  auto start_product = [&](auto& S, int s, bool refilled) {
    int source, row0, chunk;
    bool first, last;
    sch.at(s, source, row0, chunk, first, last);
    const bool nonzero = weights(S, source, row0, col_smem + (s % kStages) * kColumnValues * kCols);
    store_weights<Tr>(w_smem, S, nonzero);
    if (!nonzero) {  // S(s), its last reader, is complete
      uint4* tile = reinterpret_cast<uint4*>(stage(s));
      for (int i = threadIdx.x; i < Tr::kTileElems / kVec; i += Tr::kThreads) tile[i] = make_uint4(0, 0, 0, 0);
    }
    if (refilled) store_values(s - 1 + kStages);
    fence_for_mma();
    __syncthreads();
    gemm_shared_async<typename Tr::OutMma>(out, make_tensor(make_smem_ptr(w_smem), typename Tr::SmemWeights{}),
                                           make_tensor(make_smem_ptr(stage(s)), typename Tr::SmemRowsT{}));
  };
  auto step = [&](auto& S_now, auto& S_next, int s) {  // s < steps - 1
    start_scores(S_next, s + 1);
    wait_mma<1>(S_now);
    __syncthreads();
    const bool refill = s >= 1 && s - 1 + kStages < steps;
    if (refill) issue(s - 1 + kStages);
    start_product(S_now, s, refill);
  };
  auto last_step = [&](auto& S_now, int s) {
    wait_mma(S_now);
    __syncthreads();
    start_product(S_now, s, false);
    wait_mma(out);
  };

  using Acc = decltype(partition_fragment_C(typename Tr::ScoresMma{}, Shape<Int<kRows>, Int<kCols>>{}));
  Acc S0, S1;
#pragma unroll
  for (int t = 0; t < kStages; ++t) {
    if (t < steps) {
      issue(t);
      store_values(t);
    }
  }
  __syncthreads();  // the first tiles' column values
  // (out's initial values in its registers before any wgmma: else the compiler copies them there
  // after S(0) is issued, and ptxas waits for S(0) to allow that)
  warpgroup_fence_operand(out);
  run_alternating(steps, S0, S1, start_scores, step, last_step);
#else
  __trap();  // the host launches the TMA kernels only where their sm_90a code exists (tma_refusal)
#endif
}

// ------------------------------------------------------------------------------------------
// Anchor backward
// ------------------------------------------------------------------------------------------

// anchor_backward_kernel's work, its tiles streamed by stream_tiles (cp.async), or with kTma by
// stream_tiles_tma (`maps` then the operands').
template <typename T, int kC, bool kTma>
__device__ __forceinline__ void anchor_backward(const Params<T>& p, const TensorMaps* maps, const float* lse2,
                                                const float* grad, const float* proj_a, const float* proj_t, T* grad_a,
                                                T* grad_t) {
  using Tr = BackwardTraits<T, kC>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // (GMMA's 128-byte swizzle repeats every 1 KB)
  T* w_smem = weights_smem<Tr, kTma>(smem_raw, p.chunks);
  float* row_part = row_part_smem<Tr, kTma>(smem_raw, p.chunks);
  // "none" mode: each anchor's positive logit2 and p - 1, written by the one thread holding the
  // positive (in shared memory: 4 registers less through the loop), after the 2 x 64 partial sums
  float* positives = row_part + 2 * kRows;
  const Segment seg = anchor_segment(p);
  Schedule<T> sch = anchor_schedule(p, seg, grad_a == nullptr);
  sch.z = static_cast<int>(blockIdx.z);
  const int oc = sch.z * kC;
  const auto coords = fragment_coords<typename Tr::ScoresMma, kRows, kCols>();
  constexpr int kN = decltype(size<1>(coords))::value;

  Tensor out = partition_fragment_C(typename Tr::OutMma{}, Shape<Int<kRows>, Int<kC>>{});  // sum_k q_ik k_hat_k, slice z
  clear(out);
  // Per own anchor, read from shared memory at each tile (4 registers less through the loop): 1
  // where it exists and is not masked, and its lse2; after the partial sums and the positives.
  // The pipeline's first barrier publishes them.
  float* own_rows = row_part + 4 * kRows;
  if (threadIdx.x < kRows) {
    const int row = seg.row0 + static_cast<int>(threadIdx.x);
    const bool ok = p.ok(kAnchorRows, row, seg.hi);
    own_rows[threadIdx.x] = ok ? 1.f : 0.f;
    own_rows[kRows + threadIdx.x] = ok ? lse2[row] : 0.f;
  }
  float d[2] = {0.f, 0.f};  // this lane's share of sum_k q logit2

  // A key tile's S into the weights q (in place); whether they multiply the tile's rows.
  auto tile_weights = [&](auto& S, int source, int key0, const float* col) {
    const Keys kind = source == 0 ? sch.src0.kind : Keys::kPlain;
    Tensor s = make_tensor(S.data(), rowcol(S.layout()));
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const int row = seg.row0 + get<0>(coords(m, 0));
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        const int c = get<1>(coords(m, n));
        const bool ok = own_rows[get<0>(coords(m, 0))] != 0.f && col[c] != 0.f;
        const bool positive = kind != Keys::kPlain && key0 + c == row;
        const float v = s(m, n) * p.logit_scale;
        const float prob = exp2f(v - own_rows[kRows + get<0>(coords(m, 0))]);
        float q = positive ? prob - 1.f : (kind == Keys::kPositiveOnly ? 0.f : prob);
        q = ok ? q : 0.f;
        // a positives-only tile: the other pixels are no keys of this anchor (q * NaN would be NaN)
        d[m] += ok && (kind != Keys::kPositiveOnly || positive) ? q * v : 0.f;
        if (kind == Keys::kPositiveOnly && positive) {  // one thread per row, every row of the tile
          positives[get<0>(coords(m, 0))] = ok ? v : 0.f;
          positives[kRows + get<0>(coords(m, 0))] = q;
        }
        s(m, n) = q;
      }
    }
    // The epilogue adds a positives-only tile's (p - 1) t_hat_i to row i alone: weights 0 times
    // another pixel's NaN or Inf in an MMA over the tile would reach every anchor of the tile.
    return kind != Keys::kPositiveOnly && grad_a != nullptr;
  };
  if constexpr (kTma) {
    stream_tiles_tma<Tr>(smem_raw, p, *maps, kAnchorRows, seg.row0, sch, key_columns(p, sch), tile_weights, out);
  } else {
    stream_tiles<Tr>(reinterpret_cast<T*>(smem_raw), p, kAnchorRows, seg.row0, seg.hi, sch, key_columns(p, sch),
                     [&](auto& S, int source, int key0, const auto& tile, const float* col) {
                       if (tile_weights(S, source, key0, col)) weights_times_rows<Tr>(out, S, w_smem, tile);
                     });
  }

  const bool normalize = p.inv_anchors != nullptr;
  const bool none = p.negatives == Negatives::kNone;
  float d_row[2][1];
#pragma unroll
  for (int m = 0; m < 2; ++m) d_row[m][0] = quad_sum(d[m]);  // every lane takes part in the shuffles
  sum_over_column_warps<Tr>(d_row, row_part, coords);  // (its barriers publish `positives` too)
  float sums[2][3];  // per row: sum_k q logit2, and "none" mode's positive logit2 and p - 1
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    sums[m][0] = d_row[m][0];
    sums[m][1] = none ? positives[get<0>(coords(m, 0))] : 0.f;
    sums[m][2] = none ? positives[kRows + get<0>(coords(m, 0))] : 0.f;
  }
  // Per row: grad_a = a_scale * (acc + pw * t_hat) - a_proj * a_hat and grad_t = t_scale * a_hat
  // - t_proj * t_hat ("none" mode's positive (p - 1) t_hat_i was left out of the tile MMAs; the
  // teacher pixel is its anchor's key alone), 0 at masked anchors.
  // (g is read only now: a register less through the loop)
  bool row_ok[2];
  float gi[2], a_scale[2], a_proj[2], t_scale[2], t_proj[2], pw[2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int row = seg.row0 + get<0>(coords(m, 0));
    row_ok[m] = p.ok(kAnchorRows, row, seg.hi);
    const bool ok = row_ok[m];
    gi[m] = ok ? grad[row] : 0.f;
    const float coef = ok ? gi[m] * p.inv_temperature : 0.f;
    const float inv_a = normalize && ok ? p.inv_anchors[row] : 1.f;
    const float inv_t = normalize && ok && grad_t != nullptr ? p.inv_teacher[row] : 1.f;
    pw[m] = none ? sums[m][2] : 0.f;
    a_scale[m] = inv_a * coef;
    a_proj[m] = normalize && ok && grad_a != nullptr ? proj_a[row] * (gi[m] * sums[m][0] * kLn2) : 0.f;
    t_scale[m] = inv_t * coef * pw[m];
    t_proj[m] = normalize && ok && grad_t != nullptr ? proj_t[row] * (gi[m] * pw[m] * sums[m][1] * kLn2) : 0.f;
  }
  for_each_output<Tr>(out, seg.row0, seg.hi, oc, p.C, [&](float acc, int m, int row, int col) {
    const std::int64_t at = static_cast<std::int64_t>(row) * p.ld + col;
    const float a_hat = to_float(p.anchors[at]);
    const float t_hat = none ? to_float(p.teacher[at]) : 0.f;
    const std::int64_t base = static_cast<std::int64_t>(row) * p.C + col;
    // (a select, not a product with 0: a masked anchor's acc is NaN when a key is)
    if (grad_a != nullptr) {
      grad_a[base] = static_cast<T>(row_ok[m] ? a_scale[m] * (acc + pw[m] * t_hat) - a_proj[m] * a_hat : 0.f);
    }
    if (grad_t != nullptr) grad_t[base] = static_cast<T>(row_ok[m] ? t_scale[m] * a_hat - t_proj[m] * t_hat : 0.f);
  });
}

template <typename T, int kC>
__global__ void __launch_bounds__(BackwardTraits<T, kC>::kThreads, 1)
    anchor_backward_kernel(const __grid_constant__ Params<T> p, const float* lse2, const float* grad, const float* proj_a,
                           const float* proj_t, T* grad_a, T* grad_t) {
  anchor_backward<T, kC, false>(p, nullptr, lse2, grad, proj_a, proj_t, grad_a, grad_t);
}

// anchor_backward_kernel on sm_90a where one chunk holds C: tiles by TMA, each tile's exps beside
// the next tile's S (stream_tiles_tma).
template <typename T, int kC>
__global__ void __launch_bounds__(BackwardTraits<T, kC>::kThreads, 1)
    anchor_backward_tma_kernel(const __grid_constant__ Params<T> p, const __grid_constant__ TensorMaps maps,
                               const float* lse2, const float* grad, const float* proj_a, const float* proj_t, T* grad_a,
                               T* grad_t) {
#if PCD_KERNELS_TMA
  anchor_backward<T, kC, true>(p, &maps, lse2, grad, proj_a, proj_t, grad_a, grad_t);
#else
  __trap();  // the host launches this kernel only where its sm_90a code exists (tma_refusal)
#endif
}

// ------------------------------------------------------------------------------------------
// Key backward
// ------------------------------------------------------------------------------------------

// key_backward_kernel's work, its tiles streamed by stream_tiles (cp.async), or with kTma by
// stream_tiles_tma (`maps` then the operands').
template <typename T, int kC, bool kTma>
__device__ __forceinline__ void key_backward(const Params<T>& p, const TensorMaps* maps, bool keys_are_teacher,
                                             const float* lse2, const float* grad_scaled, const float* grad_max,
                                             const float* proj_k, T* grad_k) {
  using Tr = BackwardTraits<T, kC>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // (GMMA's 128-byte swizzle repeats every 1 KB)
  T* w_smem = weights_smem<Tr, kTma>(smem_raw, p.chunks);
  float* row_part = row_part_smem<Tr, kTma>(smem_raw, p.chunks);
  // The block's keys and the anchors that see them: the pixels of image blockIdx.y and its
  // anchors ("image" mode), else all teacher pixels or queue rows, and every anchor.
  const T* keys = keys_are_teacher ? p.teacher : p.queue;
  const float* inv_k = keys_are_teacher ? p.inv_teacher : p.inv_queue;
  int lo = 0, hi = keys_are_teacher ? p.n_rows : p.n_queue;
  Schedule<T> sch;
  Source<T>& anchors = sch.src0;
  anchors.operand = kAnchorRows;
  anchors.end = anchors.hi = p.n_rows;
  if (keys_are_teacher && p.negatives == Negatives::kImage) {
    lo = anchors.lo = static_cast<int>(blockIdx.y) * p.hw;
    hi = anchors.end = anchors.hi = lo + p.hw;
  }
  sch.n_sources = 1;
  sch.chunks = p.chunks;
  sch.z = static_cast<int>(blockIdx.z);
  const int oc = sch.z * kC;
  const int key0 = lo + static_cast<int>(blockIdx.x) * kRows;
  const auto coords = fragment_coords<typename Tr::ScoresMma, kRows, kCols>();
  constexpr int kN = decltype(size<1>(coords))::value;

  Tensor out = partition_fragment_C(typename Tr::OutMma{}, Shape<Int<kRows>, Int<kC>>{});  // sum_i w_ik a_hat_i, slice z
  clear(out);
  float e_sum[2] = {0.f, 0.f};  // this lane's share of sum_i (g_i / g_max) q_ik logit2_ik

  // per streamed anchor: 1 where it exists, its lse2, its g / g_max
  auto anchor_columns = [&](float (&v)[kColumnValues], int, int a0) {
    const int a = a0 + static_cast<int>(threadIdx.x);
    const bool ok = p.ok(kAnchorRows, a, anchors.hi);
    v[0] = ok ? 1.f : 0.f;
    v[1] = ok ? lse2[a] : 0.f;
    v[2] = ok ? grad_scaled[a] : 0.f;
  };
  // An anchor tile's S into the weights (in place); every tile multiplies.
  auto tile_weights = [&](auto& S, int, int a0, const float* col) {
    Tensor s = make_tensor(S.data(), rowcol(S.layout()));
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const int key = key0 + get<0>(coords(m, 0));
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        const int c = get<1>(coords(m, n));
        const bool ok = col[c] != 0.f;
        const float v = s(m, n) * p.logit_scale;
        const float prob = exp2f(v - col[kCols + c]);
        const bool positive = keys_are_teacher && a0 + c == key;
        const float w = ok ? col[2 * kCols + c] * (positive ? prob - 1.f : prob) : 0.f;
        e_sum[m] += ok ? w * v : 0.f;
        s(m, n) = w;
      }
    }
    return true;
  };
  const Operand own_rows = keys_are_teacher ? kTeacherRows : kQueueRows;
  if constexpr (kTma) {
    stream_tiles_tma<Tr>(smem_raw, p, *maps, own_rows, key0, sch, anchor_columns, tile_weights, out);
  } else {
    stream_tiles<Tr>(reinterpret_cast<T*>(smem_raw), p, own_rows, key0, hi, sch, anchor_columns,
                     [&](auto& S, int source, int a0, const auto& tile, const float* col) {
                       tile_weights(S, source, a0, col);
                       weights_times_rows<Tr>(out, S, w_smem, tile);
                     });
  }

  const bool normalize = inv_k != nullptr;
  const float g_max = *grad_max;
  float e_k[2][1];
#pragma unroll
  for (int m = 0; m < 2; ++m) e_k[m][0] = quad_sum(e_sum[m]);
  sum_over_column_warps<Tr>(e_k, row_part, coords);
  // Per key: grad_k = scale * acc - proj * k_hat, 0 at masked keys.
  const std::uint8_t* key_valid = keys_are_teacher ? p.valid : nullptr;
  bool key_ok[2];
  float scale[2], proj[2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int key = key0 + get<0>(coords(m, 0));
    key_ok[m] = key < hi && (key_valid == nullptr || key_valid[key] != 0);
    scale[m] = g_max * p.inv_temperature * (normalize && key_ok[m] ? inv_k[key] : 1.f);
    proj[m] = normalize && key_ok[m] ? proj_k[key] * (e_k[m][0] * g_max * kLn2) : 0.f;
  }
  for_each_output<Tr>(out, key0, hi, oc, p.C, [&](float acc, int m, int key, int col) {
    const float k_hat = normalize ? to_float(keys[static_cast<std::int64_t>(key) * p.ld + col]) : 0.f;
    grad_k[static_cast<std::int64_t>(key) * p.C + col] = static_cast<T>(key_ok[m] ? scale[m] * acc - proj[m] * k_hat : 0.f);
  });
}

template <typename T, int kC>
__global__ void __launch_bounds__(BackwardTraits<T, kC>::kThreads, 1)
    key_backward_kernel(const __grid_constant__ Params<T> p, bool keys_are_teacher, const float* lse2,
                        const float* grad_scaled, const float* grad_max, const float* proj_k, T* grad_k) {
  key_backward<T, kC, false>(p, nullptr, keys_are_teacher, lse2, grad_scaled, grad_max, proj_k, grad_k);
}

// key_backward_kernel on sm_90a where one chunk holds C: tiles by TMA, each tile's exps beside the
// next tile's S (stream_tiles_tma).
template <typename T, int kC>
__global__ void __launch_bounds__(BackwardTraits<T, kC>::kThreads, 1)
    key_backward_tma_kernel(const __grid_constant__ Params<T> p, const __grid_constant__ TensorMaps maps,
                            bool keys_are_teacher, const float* lse2, const float* grad_scaled, const float* grad_max,
                            const float* proj_k, T* grad_k) {
#if PCD_KERNELS_TMA
  key_backward<T, kC, true>(p, &maps, keys_are_teacher, lse2, grad_scaled, grad_max, proj_k, grad_k);
#else
  __trap();  // the host launches this kernel only where its sm_90a code exists (tma_refusal)
#endif
}

// ------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------

int ceil_div(std::int64_t a, std::int64_t b) { return static_cast<int>((a + b - 1) / b); }

bool is_known(Negatives negatives) {
  return negatives == Negatives::kNone || negatives == Negatives::kImage || negatives == Negatives::kBatch;
}

// PCD_KERNELS_CUDA_TMA, read at each launch (launch_preferring_tma): "0", "1" or "" (unset); any
// other value is a ValueError, raised by check_params before any CUDA call.
std::string tma_choice() {
  const char* choice_env = std::getenv("PCD_KERNELS_CUDA_TMA");
  const std::string choice = choice_env != nullptr ? choice_env : "";
  if (choice != "" && choice != "0" && choice != "1") {
    invalid_argument("PCD_KERNELS_CUDA_TMA must be 0 (the cp.async kernels), 1 (require the TMA kernels) or unset "
                     "(the TMA kernels where they can run), got '" + choice + "'");
  }
  return choice;
}

void check_params(const PixelContrastiveParams& in) {
  tma_choice();
  if (!is_known(in.negatives)) {
    invalid_argument("pixel_contrastive: negatives code must be 0 (none), 1 (image) or 2 (batch), got " +
                     std::to_string(static_cast<int>(in.negatives)));
  }
  check_dtype(in.dtype, "pixel_contrastive");
  const std::int64_t limit = (std::int64_t{1} << 31) - kRows * 2;
  if (in.n_rows > limit || in.n_queue > limit || in.n_extra > limit || in.channels > limit) {
    invalid_argument("pixel_contrastive CUDA kernels take fewer than 2^31 rows and channels");
  }
  if (in.channels < 1 || in.n_rows < 1) {
    invalid_argument("pixel_contrastive CUDA launchers need n_rows >= 1 and C >= 1");
  }
  if (in.row_stride < in.channels || in.row_stride % kVec != 0) {
    invalid_argument("pixel_contrastive CUDA kernels read operand rows of row_stride >= C elements, a multiple of " +
                     std::to_string(kVec) + " (16-byte aligned rows), got " + std::to_string(in.row_stride));
  }
  for (const std::uintptr_t operand : {in.anchors, in.teacher, in.extra, in.queue}) {
    if (operand % 16 != 0) {  // 16-byte asynchronous copies
      invalid_argument("pixel_contrastive CUDA kernels read operands that start 16-byte aligned, got address " +
                       std::to_string(operand));
    }
  }
  if (in.channels > std::int64_t{65535} * kMaxChunk) {  // grid z counts gradient slices
    invalid_argument("pixel_contrastive CUDA kernels take at most 16776960 channels");
  }
  if (in.negatives == Negatives::kImage) {
    if (in.hw < 1 || in.n_rows % in.hw != 0) {
      invalid_argument("pixel_contrastive: n_rows must be a multiple of hw >= 1 in 'image' mode");
    }
    if (in.n_rows / in.hw > 65535) invalid_argument("pixel_contrastive CUDA kernels take at most 65535 images");
  }
}

// The channel chunk a launch prefers: the smallest of 64, 128, 256 that holds C, else 256.
int chunk_width(std::int64_t channels) { return channels <= 64 ? 64 : channels <= 128 ? 128 : kMaxChunk; }

// The shared memory a block of the forward (kGroups 1) or a backward kernel (2) takes with chunks
// of kc channels.
template <typename T, int kGroups>
std::size_t block_smem(std::int64_t channels, int kc) {
  auto bytes = [&](auto chunk) {
    return Smem<Traits<T, decltype(chunk)::value, kGroups>>::bytes(ceil_div(channels, decltype(chunk)::value));
  };
  return kc == 64 ? bytes(Int<64>{}) : kc == 128 ? bytes(Int<128>{}) : bytes(Int<kMaxChunk>{});
}

// What the device allows a block of shared memory (opting in beyond 48 KB).
int shared_memory_per_block(int device) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return optin;
}

template <typename T>
Params<T> kernel_params(const PixelContrastiveParams& in, int kc) {
  Params<T> p;
  p.anchors = device_ptr<const T>(in.anchors);
  p.teacher = device_ptr<const T>(in.teacher);
  p.extra = device_ptr<const T>(in.extra);
  p.queue = device_ptr<const T>(in.queue);
  p.inv_anchors = device_ptr<const float>(in.inv_anchors);
  p.inv_teacher = device_ptr<const float>(in.inv_teacher);
  p.inv_queue = device_ptr<const float>(in.inv_queue);
  p.valid = device_ptr<const std::uint8_t>(in.valid);
  p.valid_extra = device_ptr<const std::uint8_t>(in.valid_extra);
  p.negatives = in.negatives;
  p.n_rows = static_cast<int>(in.n_rows);
  p.hw = static_cast<int>(in.hw);
  p.C = static_cast<int>(in.channels);
  p.n_extra = static_cast<int>(in.n_extra);
  p.n_queue = static_cast<int>(in.n_queue);
  p.ld = in.row_stride;
  p.chunks = ceil_div(in.channels, kc);
  p.logit_scale = in.logit_scale;
  p.inv_temperature = in.inv_temperature;
  return p;
}

// Calls f(TypeTag<T>{}, Int<kC>{}, smem bytes) for the launch's element type and channel chunk:
// the preferred chunk, or a narrower one where the device allows a block less shared memory
// (99 KB on sm_86/89/120 GPUs, where the 256-channel backward needs 107 KB), more chunks then.
template <int kGroups, typename F>
void by_instance(const PixelContrastiveParams& in, F&& f) {
  const std::size_t optin = static_cast<std::size_t>(shared_memory_per_block(in.device));
  auto with_chunk = [&](auto tag) {
    using T = typename decltype(tag)::type;
    int kc = chunk_width(in.channels);
    while (kc > 64 && block_smem<T, kGroups>(in.channels, kc) > optin) kc /= 2;
    const std::size_t bytes = block_smem<T, kGroups>(in.channels, kc);
    if (bytes > optin) {
      invalid_argument("pixel_contrastive kernels need " + std::to_string(bytes) +
                       " bytes of shared memory per block, the device allows " + std::to_string(optin));
    }
    switch (kc) {
      case 64:
        return f(tag, Int<64>{}, bytes);
      case 128:
        return f(tag, Int<128>{}, bytes);
      default:
        return f(tag, Int<kMaxChunk>{}, bytes);
    }
  };
  by_dtype(in.dtype, "pixel_contrastive", with_chunk);
}

// Whether the module loaded for `device` holds the TMA kernels' code (kTmaKernelsBuilt): "" if it
// does, else why not. Read once per device (a synchronous copy); not while `stream` is being
// captured into a CUDA graph, where the copy is not allowed (that launch then takes the cp.async
// kernel; torch.compile's CUDA graphs run each function eagerly before capturing it).
std::string tma_kernels_built(int device, std::uintptr_t stream) {
  static std::atomic<int> built[64];  // 0 unknown, 1 no, 2 yes (each writer writes the same)
  if (device < 0 || device >= 64) return "device " + std::to_string(device) + " is past the 64 this check counts";
  int state = built[device].load(std::memory_order_relaxed);
  if (state == 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(reinterpret_cast<cudaStream_t>(stream), &capture), "cudaStreamIsCapturing");
    if (capture != cudaStreamCaptureStatusNone) {
      return "the first launch on this GPU is being captured into a CUDA graph, before the extension's sm_90a code "
             "could be checked";
    }
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    int value = 0;
    check_cuda(cudaMemcpyFromSymbol(&value, kTmaKernelsBuilt, sizeof(value)), "cudaMemcpyFromSymbol(kTmaKernelsBuilt)");
    state = value != 0 ? 2 : 1;
    built[device].store(state, std::memory_order_relaxed);
  }
  return state == 2 ? "" : "the extension was built without sm_90a code (PCD_KERNELS_CUDA_ARCHS)";
}

// Why the TMA kernels cannot run this launch ("" when they can, with `maps` filled; by_image: the
// grid's y is the image, and the anchors' and teacher's maps are segmented by image): they need
// one chunk to hold C, an sm_90 GPU running this module's sm_90a code (a build without 90a has
// only traps there), and the driver to encode the operands' tensor maps.
template <typename T>
std::string tma_refusal(const PixelContrastiveParams& in, int chunks, bool by_image, TensorMaps& maps) {
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, in.device),
             "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  if (major != 9) return "the GPU is not sm_90 (compute capability major " + std::to_string(major) + ")";
  const std::string built = tma_kernels_built(in.device, in.stream);
  if (!built.empty()) return built;
  // (on sm_90 by_instance keeps 256-channel chunks: the block's shared memory allows them)
  if (chunks != 1) return "C = " + std::to_string(in.channels) + " takes more than one 256-channel chunk";
  std::memset(&maps, 0, sizeof(maps));
  maps.by_image = by_image ? 1 : 0;
  const bool bf16 = std::is_same<T, cutlass::bfloat16_t>::value;
  auto map = [&](CUtensorMap& m, std::uintptr_t base, std::int64_t rows, bool segmented) {
    return rows == 0 || tma::row_tile_map(&m, reinterpret_cast<const void*>(base), rows, segmented ? in.hw : rows,
                                          in.channels, in.row_stride, bf16);
  };
  if (!(map(maps.anchors, in.anchors, in.n_rows, by_image) && map(maps.teacher, in.teacher, in.n_rows, by_image) &&
        map(maps.extra, in.extra, in.negatives == Negatives::kBatch ? in.n_extra : 0, false) &&
        map(maps.queue, in.queue, in.n_queue, false))) {
    return "the driver did not encode the operands' tensor maps (cuTensorMapEncodeTiled)";
  }
  return "";
}

// Launches tma_kernel(p, maps, args...) where the TMA kernels can run (tma_refusal), else
// kernel(p, args...); `what` names the pass in errors. PCD_KERNELS_CUDA_TMA (read at each call):
// "0" keeps the cp.async kernels, the fallback while the TMA kernels have not run on a GPU; "1"
// requires the TMA kernel, a RuntimeError saying why where it cannot run (make gpu-smoke's checks
// of them, which must not pass on the other kernels); tma_choice() refuses any other value. A TMA
// kernel asks for as much of the unified L1 / shared memory as shared memory:
// two blocks of 99 KB (the forward at 256 channels) fit an SM only then (the driver may otherwise
// size it for one block).
template <typename T, typename... TmaParams, typename... KernelParams, typename... Args>
void launch_preferring_tma(const PixelContrastiveParams& in, const Params<T>& p, dim3 grid, int threads, bool by_image,
                           const char* what, void (*tma_kernel)(TmaParams...), std::size_t tma_smem,
                           const char* tma_name, void (*kernel)(KernelParams...), std::size_t smem, const char* name,
                           Args... args) {
  const std::string choice = tma_choice();
  TensorMaps maps;
  const std::string refusal = choice == "0" ? "PCD_KERNELS_CUDA_TMA=0" : tma_refusal<T>(in, p.chunks, by_image, maps);
  if (refusal.empty()) {
    check_cuda(cudaFuncSetAttribute(tma_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    cudaSharedmemCarveoutMaxShared),
               "cudaFuncSetAttribute(PreferredSharedMemoryCarveout)", tma_name);
    launch(tma_kernel, grid, threads, tma_smem, in.stream, tma_name, p, maps, args...);
    return;
  }
  if (choice == "1") {
    throw std::runtime_error(std::string("pixel_contrastive: PCD_KERNELS_CUDA_TMA=1 asks for the TMA ") + what +
                             ", which cannot run: " + refusal);
  }
  launch(kernel, grid, threads, smem, in.stream, name, p, args...);
}

// Blocks of kRows rows over `rows` rows, or over each image's pixels when by_image, times z.
dim3 row_grid(const PixelContrastiveParams& in, std::int64_t rows, bool by_image, int z) {
  if (by_image) return dim3(ceil_div(in.hw, kRows), static_cast<int>(in.n_rows / in.hw), z);
  return dim3(ceil_div(rows, kRows), 1, z);
}

}  // namespace

// Each launcher runs its TMA kernel where it can (launch_preferring_tma), else its cp.async kernel.
void pixel_contrastive_forward(const PixelContrastiveParams& in) {
  check_params(in);
  by_instance<1>(in, [&](auto tag, auto kc, std::size_t smem) {
    using T = typename decltype(tag)::type;
    constexpr int kC = decltype(kc)::value;
    using Tr = ForwardTraits<T, kC>;
    const bool by_image = in.negatives == Negatives::kImage;
    launch_preferring_tma(in, kernel_params<T>(in, kC), row_grid(in, in.n_rows, by_image, 1), Tr::kThreads, by_image,
                          "forward", forward_tma_kernel<T, kC>, TmaForwardSmem<Tr>::kBytes,
                          "pixel_contrastive forward_tma_kernel", forward_kernel<T, kC>, smem,
                          "pixel_contrastive forward_kernel", device_ptr<float>(in.loss), device_ptr<float>(in.lse2));
  });
}

void pixel_contrastive_backward_anchors(const PixelContrastiveParams& in) {
  check_params(in);
  if (in.grad_teacher != 0 && in.negatives != Negatives::kNone) {
    invalid_argument("pixel_contrastive anchor backward writes the teacher gradient in negatives='none' mode only");
  }
  if (in.grad_anchors == 0 && in.grad_teacher == 0) return;
  by_instance<2>(in, [&](auto tag, auto kc, std::size_t smem) {
    using T = typename decltype(tag)::type;
    constexpr int kC = decltype(kc)::value;
    using Tr = BackwardTraits<T, kC>;
    const Params<T> p = kernel_params<T>(in, kC);
    const bool by_image = in.negatives == Negatives::kImage;
    launch_preferring_tma(in, p, row_grid(in, in.n_rows, by_image, p.chunks), Tr::kThreads, by_image,
                          "anchor backward", anchor_backward_tma_kernel<T, kC>, TmaBackwardSmem<Tr>::kBytes,
                          "pixel_contrastive anchor_backward_tma_kernel", anchor_backward_kernel<T, kC>, smem,
                          "pixel_contrastive anchor_backward_kernel", device_ptr<const float>(in.lse2),
                          device_ptr<const float>(in.grad), device_ptr<const float>(in.proj_anchors),
                          device_ptr<const float>(in.proj_teacher), device_ptr<T>(in.grad_anchors),
                          device_ptr<T>(in.grad_teacher));
  });
}

void pixel_contrastive_backward_keys(const PixelContrastiveParams& in) {
  check_params(in);
  if (in.keys_are_teacher && in.negatives == Negatives::kNone) {
    invalid_argument("pixel_contrastive key backward: teacher keys exist in 'image' and 'batch' modes only");
  }
  if (!in.keys_are_teacher && in.n_queue == 0) return;
  const bool by_image = in.keys_are_teacher && in.negatives == Negatives::kImage;
  const std::int64_t keys = in.keys_are_teacher ? in.n_rows : in.n_queue;
  by_instance<2>(in, [&](auto tag, auto kc, std::size_t smem) {
    using T = typename decltype(tag)::type;
    constexpr int kC = decltype(kc)::value;
    using Tr = BackwardTraits<T, kC>;
    const Params<T> p = kernel_params<T>(in, kC);
    launch_preferring_tma(in, p, row_grid(in, keys, by_image, p.chunks), Tr::kThreads, by_image, "key backward",
                          key_backward_tma_kernel<T, kC>, TmaBackwardSmem<Tr>::kBytes,
                          "pixel_contrastive key_backward_tma_kernel", key_backward_kernel<T, kC>, smem,
                          "pixel_contrastive key_backward_kernel", in.keys_are_teacher,
                          device_ptr<const float>(in.lse2), device_ptr<const float>(in.grad_scaled),
                          device_ptr<const float>(in.grad_max), device_ptr<const float>(in.proj_keys),
                          device_ptr<T>(in.grad_keys));
  });
}

}  // namespace pcd_kernels
