// pixel_attention (DESIGN.md 3.4): flash-attention-2 style kernels on CUTLASS's CuTe, with an
// sm_80-class pipeline (cp.async into swizzled shared memory, ldmatrix, mma.sync m16n8k16 with
// float32 accumulation) built for every architecture.
//
// Operands are prepared by the host (backends/cuda/pixel_attention.py): per (batch, head,
// position) a row of head_dim contiguous elements, 16-byte aligned, zeros up to a multiple of 8
// (pixel_attention.h: AttentionRows). Tiles of 64 rows x DP channels (head_dim padded to 32, 64
// or 128) are copied with 16-byte cp.async into shared memory laid out in 8-row swizzle atoms
// (16-byte groups XOR-swizzled by row: the rows an ldmatrix reads and those a warp's copies
// write fall in different banks); rows past an operand's end and channels past head_dim are
// zero-filled by the copy itself. The streamed tiles of a block run through two stages: the copy
// of step s + 1 is in flight while step s multiplies.
//
// * forward_kernel: 4 warps per (query tile of 64, batch * head), 16 query rows per warp. Per key
//   tile of 64: S = Q K^T, keys >= LK masked to -inf, base-2 online softmax per row, P rounded to
//   the element type and kept in registers as the A operand of O += P V (V read transposed with
//   ldmatrix.trans). Epilogue: O / l through shared memory to the output map; lse2 per query.
// * delta_kernel: delta = rowsum(dO * O) per query and head, one thread per query.
// * backward_kernel<kKeys = true> (dK, dV): 8 warps per (key tile of 64, batch * head) looping
//   over query tiles of 64: S^T = K Q^T, dP^T = V dO^T, P^T = exp2(S^T scale2 - lse2), dS^T =
//   P^T (dP^T - delta); dV += P^T dO, dK += dS^T Q, dK times scale at the end.
// * backward_kernel<kKeys = false> (dQ): 8 warps per (query tile of 64, batch * head) looping
//   over key tiles of 64: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K, times scale.
//   The backward blocks are 4 warps along the rows x 2 column groups: each group computes half of
//   S's columns and half of the gradients' channels (DP / 4 accumulator registers per gradient
//   and thread, not DP / 2), and they trade the weights (P, dS) through shared memory.
// Every output element has exactly one writer: deterministic, no atomics.
//
// Grid: blockIdx.x enumerates (tile, batch * head) with the tile fastest (blocks of one head are
// adjacent, so its keys and values stay in L2); at most 2^31 - 1 blocks. All global offsets are
// 64-bit; positions and channels are ints (checked on the host).
#include "pcd_kernels/pixel_attention.h"

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include <cstdint>
#include <string>

#include "pcd_kernels/dispatch.cuh"
#include "pcd_kernels/cute_tiles.cuh"

namespace pcd_kernels {
namespace {

using namespace cute;
using namespace cute_tiles;

constexpr int kTile = static_cast<int>(kAttentionTile);  // rows of every tile: queries or keys
static_assert(kVec == kAttentionRowAlign, "operand rows start 16-byte aligned");
constexpr int kForwardThreads = 128;
constexpr int kBackwardThreads = 256;
constexpr int kDeltaRows = 128;  // queries per block of the delta kernel (one per thread)
constexpr double kLog2e = 1.4426950408889634;

// Layouts and MMAs of one (element type, padded head dim) instance.
template <typename T, int DP>
struct Traits {
  static_assert(DP == 32 || DP == 64 || DP == 128, "head dims are padded to 32, 64 or 128");
  static constexpr int kTileElems = kTile * DP;
  // 8 rows x min(DP, 64) channels, 16-byte groups XOR-swizzled by row (Swizzle<3, 3, 3> over 64
  // channels, <2, 3, 3> over 32): ldmatrix's 8 rows of one group, and the 16-byte pieces a warp's
  // cp.async writes, fall in 8 different bank groups.
  static constexpr int kAtomCols = DP < 64 ? DP : 64;
  using SmemAtom = decltype(composition(Swizzle<DP < 64 ? 2 : 3, 3, 3>{},
                                        Layout<Shape<_8, Int<kAtomCols>>, Stride<Int<kAtomCols>, _1>>{}));
  using SmemRows = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kTile>, Int<DP>>{}));  // (position, channel)
  // The same tile as (channel, position): the B operand of the products over positions
  // (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K), read with ldmatrix.trans.
  using SmemRowsT = decltype(composition(SmemRows{}, make_layout(Shape<Int<DP>, Int<kTile>>{}, GenRowMajor{})));
  // The weights (P, dS) of the backward blocks: 64 x 64.
  using SmemWeights = decltype(tile_to_shape(
      composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}), Shape<Int<kTile>, Int<kTile>>{}));
  // Forward: 4 warps along the rows, 16 each, 16 columns per warp and MMA step (one ldmatrix.x4
  // of B). Backward: 4 x 2 warps, the column groups holding alternate 8-column groups.
  using ForwardMma = TiledMMA<MMA_Atom<typename MmaAtom<T>::type>, Layout<Shape<_4, _1, _1>>, Tile<_64, _16, _16>>;
  using BackwardMma = TiledMMA<MMA_Atom<typename MmaAtom<T>::type>, Layout<Shape<_4, _2, _1>>, Tile<_64, _32, _16>>;
};

template <typename Tr>
__host__ __device__ constexpr std::size_t forward_smem() {
  return 5 * Tr::kTileElems * 2;  // Q; K and V in 2 stages (16-bit elements)
}

template <typename Tr, bool kKeys>
__host__ __device__ constexpr std::size_t backward_smem(int stages) {
  // own 2 tiles, streamed 2 x stages, the weights (P and dS, or dS), per-column values (lse2,
  // delta) x stages
  return ((2 + 2 * stages) * Tr::kTileElems + (kKeys ? 2 : 1) * kTile * kTile) * 2 +
         (kKeys ? stages * 2 * kTile * sizeof(float) : 0);
}

// An operand's rows and an output map (pixel_attention.h), on the device.
struct Rows {
  const void* data;
  std::int64_t sb, sh, sl;
};
struct Map {
  void* data;
  std::int64_t sb, sc, sl;
};

struct Params {
  Rows q, k, v, dout;
  Map o, dq, dk, dv;
  float* lse2;   // (B * heads, LQ)
  float* delta;  // (B * heads, LQ)
  std::int64_t heads;
  int head_dim, lq, lk, n_tiles;  // n_tiles: tiles per (batch, head), the fastest grid index
  int stages;                     // of the backward's streamed tiles: 2, or 1 where shared memory is short
  float scale2;                   // scale * log2(e): logits in base 2
  float scale;
};

// A block's tile and its head bh = batch * heads + h (blockIdx.x enumerates them tile fastest).
__device__ __forceinline__ int block_tile(const Params& p) {
  return static_cast<int>(blockIdx.x % static_cast<unsigned>(p.n_tiles));
}
__device__ __forceinline__ std::int64_t block_head(const Params& p) { return blockIdx.x / static_cast<unsigned>(p.n_tiles); }

// Row 0 of head bh of an operand.
template <typename T>
__device__ __forceinline__ const T* head_rows(const Rows& r, std::int64_t bh, std::int64_t heads) {
  return static_cast<const T*>(r.data) + (bh / heads) * r.sb + (bh % heads) * r.sh;
}

// Element (channel 0, position 0) of head bh of a map.
template <typename T>
__device__ __forceinline__ T* head_map(const Map& m, std::int64_t bh, std::int64_t heads, int head_dim) {
  return static_cast<T*>(m.data) + (bh / heads) * m.sb + (bh % heads) * static_cast<std::int64_t>(head_dim) * m.sc;
}

// Rows [row0, row0 + 64) x channels [0, DP) of one head into a swizzled tile; rows >= hi and
// channels >= head_dim are zero-filled (channels in [head_dim, head_dim rounded up to 8) are zeros
// in the operand itself).
template <int kThreads, int DP, typename T, typename Tile>
__device__ __forceinline__ void load_rows(Tile tile, const T* rows, std::int64_t ld, int row0, int hi, int head_dim) {
  cute_tiles::load_rows<kThreads, kTile, DP>(tile, rows, ld, row0, hi, 0, head_dim);
}

// Positions [pos0, pos0 + 64) (those < n_pos) x channels [0, head_dim) of a (position, channel)
// shared tile to a map. Consecutive threads take consecutive positions (coalesced for the
// channel-major layout) unless channels are the map's contiguous direction.
template <int kThreads, int DP, typename T, typename Tile>
__device__ __forceinline__ void store_tile(const Tile& tile, T* dst, const Map& m, int pos0, int n_pos, int head_dim) {
  const bool channel_fast = m.sc == 1 && m.sl != 1;
  for (int i = threadIdx.x; i < kTile * DP; i += kThreads) {
    const int r = channel_fast ? i / DP : i % kTile;
    const int c = channel_fast ? i % DP : i / kTile;
    const int pos = pos0 + r;
    if (pos < n_pos && c < head_dim) dst[static_cast<std::int64_t>(pos) * m.sl + static_cast<std::int64_t>(c) * m.sc] = tile(r, c);
  }
}

// S += rows_a . rows_b^T over the channels: both (position, channel) tiles.
template <typename Mma, typename Acc, typename TileA, typename TileB>
__device__ __forceinline__ void scores(Acc& S, const TileA& a, const TileB& b) {
  using T = typename TileA::value_type;
  Mma mma;
  using LoadAtom = Copy_Atom<SM75_U32x4_LDSM_N, T>;
  gemm_smem(S, mma, a, b, b, make_tiled_copy_A(LoadAtom{}, mma), make_tiled_copy_B(LoadAtom{}, mma));
}

// out += w . tile over the positions: w (64 x 64) from shared memory, tile (position, channel)
// read transposed.
template <typename Tr, typename Mma, typename Out, typename W, typename Tile>
__device__ __forceinline__ void product(Out& out, const W& w, const Tile& tile) {
  using T = typename Tile::value_type;
  Mma mma;
  Tensor tile_t = make_tensor(tile.data(), typename Tr::SmemRowsT{});
  Tensor tile_t_plain = make_tensor(tile.data(), get_nonswizzle_portion(typename Tr::SmemRowsT{}));
  gemm_smem(out, mma, w, tile_t, tile_t_plain, make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, mma),
            make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, T>{}, mma));
}

// (row, column) within a 64 x kN tile of each of this thread's accumulator entries, viewed as rowcol.
template <typename Mma, int kN>
__device__ __forceinline__ auto fragment_coords() {
  return cute_tiles::fragment_coords<Mma, kTile, kN>();
}

// Writes a 64 x kN accumulator (of Mma's layout) to a shared tile in its element type, row m of
// this thread's (0 or 1) times factor[m].
template <typename Mma, int kN, typename Acc, typename Tile>
__device__ __forceinline__ void accumulator_to_tile(const Acc& acc, Tile& tile, const float (&factor)[2]) {
  using T = typename Tile::value_type;
  const auto coords = fragment_coords<Mma, kN>();
  const Tensor a = make_tensor(acc.data(), rowcol(acc.layout()));
  static_assert(decltype(size<0>(a))::value == 2, "two rows per thread");
#pragma unroll
  for (int m = 0; m < 2; ++m) {
#pragma unroll
    for (int n = 0; n < size<1>(a); ++n) tile(get<0>(coords(m, n)), get<1>(coords(m, n))) = static_cast<T>(a(m, n) * factor[m]);
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <typename T, int DP>
__global__ void __launch_bounds__(kForwardThreads, 1) forward_kernel(const __grid_constant__ Params p) {
  using Tr = Traits<T, DP>;
  using Mma = typename Tr::ForwardMma;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  // tile 0: Q (the output at the end); 1 + 2 stage: K; 2 + 2 stage: V
  auto tile_at = [&](int i) { return make_tensor(make_smem_ptr(smem + i * Tr::kTileElems), typename Tr::SmemRows{}); };

  const std::int64_t bh = block_head(p);
  const int q0 = block_tile(p) * kTile;
  const T* k = head_rows<T>(p.k, bh, p.heads);
  const T* v = head_rows<T>(p.v, bh, p.heads);
  const int steps = (p.lk + kTile - 1) / kTile;
  auto issue = [&](int s) {
    if (s == 0) load_rows<kForwardThreads, DP>(tile_at(0), head_rows<T>(p.q, bh, p.heads), p.q.sl, q0, p.lq, p.head_dim);
    load_rows<kForwardThreads, DP>(tile_at(1 + 2 * (s % 2)), k, p.k.sl, s * kTile, p.lk, p.head_dim);
    load_rows<kForwardThreads, DP>(tile_at(2 + 2 * (s % 2)), v, p.v.sl, s * kTile, p.lk, p.head_dim);
    cp_async_fence();
  };

  Mma mma;
  Tensor O = partition_fragment_C(mma, Shape<Int<kTile>, Int<DP>>{});
  clear(O);
  Tensor o = make_tensor(O.data(), rowcol(O.layout()));
  const auto coords = fragment_coords<Mma, kTile>();  // (2 rows, 16 columns) of this thread's S
  constexpr int kN = decltype(size<1>(coords))::value;
  // -inf, not OnlineLse's finite kMaxInit: rows whose logits all lie below -1e30 (bf16 can reach
  // that) still get a softmax rather than exp2(x + 1e30) = 0 everywhere and O = 0 / 0. (A tile
  // whose logits all overflowed to -inf leaves the maximum at -inf; OnlineLse's shift keeps its
  // exps 0, not NaN.)
  OnlineLse row[2] = {{-INFINITY, 0.f}, {-INFINITY, 0.f}};
  auto copy_vt = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, T>{}, mma);

  run_pipeline(steps, Int<2>{}, issue, [&](int s) {
    const int k0 = s * kTile;
    Tensor S = partition_fragment_C(mma, Shape<Int<kTile>, Int<kTile>>{});
    clear(S);
    scores<Mma>(S, tile_at(0), tile_at(1 + 2 * (s % 2)));
    Tensor sc = make_tensor(S.data(), rowcol(S.layout()));
    float factor[2];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        // select, not multiply: a NaN logit stays NaN, a missing key is exactly -inf
        const float x = k0 + get<1>(coords(m, n)) < p.lk ? sc(m, n) * p.scale2 : -INFINITY;
        sc(m, n) = x;
        tile_max = fmaxf(tile_max, x);
      }
      factor[m] = row[m].rescale_to(quad_max(tile_max));
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        const float x = exp2f(sc(m, n) - row[m].shift());  // NaN logits give NaN weights: NaN in, NaN out
        sc(m, n) = x;
        sum += x;
      }
      row[m].sum += quad_sum(sum);
#pragma unroll
      for (int n = 0; n < size<1>(o); ++n) o(m, n) *= factor[m];
    }
    // P in the element type, as the A operand of O += P V
    Tensor P = make_tensor<T>(S.layout());
#pragma unroll
    for (int i = 0; i < size(S); ++i) P(i) = static_cast<T>(S(i));
    Tensor pa = make_tensor(P.data(), acc_as_a(P.layout()));
    Tensor vt = make_tensor(tile_at(2 + 2 * (s % 2)).data(), typename Tr::SmemRowsT{});
    Tensor vt_plain = make_tensor(vt.data(), get_nonswizzle_portion(typename Tr::SmemRowsT{}));
    gemm_regs(O, mma, pa, vt, vt_plain, copy_vt);
  }, [] {});

  // Epilogue: O / l staged as (query, channel) in the Q tile, then to the output map.
  cp_async_wait<0>();
  __syncthreads();
  const float inv[2] = {1.f / row[0].sum, 1.f / row[1].sum};
  Tensor staged = tile_at(0);
  accumulator_to_tile<Mma, DP>(O, staged, inv);
  if (lane_in_group() == 0) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const int query = q0 + get<0>(coords(m, 0));
      if (query < p.lq) p.lse2[bh * p.lq + query] = row[m].lse2();
    }
  }
  __syncthreads();
  store_tile<kForwardThreads, DP>(staged, head_map<T>(p.o, bh, p.heads, p.head_dim), p.o, q0, p.lq, p.head_dim);
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kDeltaRows) delta_kernel(const __grid_constant__ Params p) {
  const std::int64_t bh = block_head(p);
  const int query = block_tile(p) * kDeltaRows + static_cast<int>(threadIdx.x);
  if (query >= p.lq) return;
  const T* o = head_map<T>(p.o, bh, p.heads, p.head_dim) + query * p.o.sl;
  const T* dout = head_rows<T>(p.dout, bh, p.heads) + query * p.dout.sl;
  float acc = 0.f;
  for (int c = 0; c < p.head_dim; ++c) acc += static_cast<float>(o[c * p.o.sc]) * static_cast<float>(dout[c]);
  p.delta[bh * p.lq + query] = acc;
}

// kKeys: a block owns 64 keys (own rows K, V) and streams the queries (Q, dO), writing dK and dV;
// else it owns 64 queries (Q, dO) and streams the keys (K, V), writing dQ. Either way the first
// product is own1 . str1^T (S^T or S), the second own2 . str2^T (dP^T or dP).
template <typename T, int DP, bool kKeys>
__global__ void __launch_bounds__(kBackwardThreads, 1) backward_kernel(const __grid_constant__ Params p) {
  using Tr = Traits<T, DP>;
  using Mma = typename Tr::BackwardMma;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  // tiles 0, 1: own1, own2 (the gradients at the end); 2 + 2 stage: str1; 3 + 2 stage: str2
  auto tile_at = [&](int i) { return make_tensor(make_smem_ptr(smem + i * Tr::kTileElems), typename Tr::SmemRows{}); };
  T* w_smem = smem + (2 + 2 * p.stages) * Tr::kTileElems;
  Tensor sP = make_tensor(make_smem_ptr(w_smem), typename Tr::SmemWeights{});  // P (kKeys), as (own row, streamed row)
  Tensor sdS = make_tensor(make_smem_ptr(w_smem + (kKeys ? kTile * kTile : 0)), typename Tr::SmemWeights{});
  float* col_smem = reinterpret_cast<float*>(w_smem + (kKeys ? 2 : 1) * kTile * kTile);  // [stage][lse2, delta][64]

  const std::int64_t bh = block_head(p);
  const int own0 = block_tile(p) * kTile;
  const int own_hi = kKeys ? p.lk : p.lq, str_hi = kKeys ? p.lq : p.lk;
  const Rows& own1 = kKeys ? p.k : p.q;
  const Rows& own2 = kKeys ? p.v : p.dout;
  const Rows& str1 = kKeys ? p.q : p.k;
  const Rows& str2 = kKeys ? p.dout : p.v;
  const T* str1_rows = head_rows<T>(str1, bh, p.heads);
  const T* str2_rows = head_rows<T>(str2, bh, p.heads);
  const float* lse2 = p.lse2 + bh * p.lq;
  const float* delta = p.delta + bh * p.lq;
  const int steps = (str_hi + kTile - 1) / kTile;
  auto issue = [&](int s) {
    if (s == 0) {
      load_rows<kBackwardThreads, DP>(tile_at(0), head_rows<T>(own1, bh, p.heads), own1.sl, own0, own_hi, p.head_dim);
      load_rows<kBackwardThreads, DP>(tile_at(1), head_rows<T>(own2, bh, p.heads), own2.sl, own0, own_hi, p.head_dim);
    }
    const int row0 = s * kTile;
    load_rows<kBackwardThreads, DP>(tile_at(2 + 2 * (s % p.stages)), str1_rows, str1.sl, row0, str_hi, p.head_dim);
    load_rows<kBackwardThreads, DP>(tile_at(3 + 2 * (s % p.stages)), str2_rows, str2.sl, row0, str_hi, p.head_dim);
    cp_async_fence();
    if (kKeys && threadIdx.x < kTile) {  // per streamed query: lse2, delta
      const int query = row0 + static_cast<int>(threadIdx.x);
      float* col = col_smem + (s % p.stages) * 2 * kTile;
      col[threadIdx.x] = query < p.lq ? lse2[query] : 0.f;
      col[kTile + threadIdx.x] = query < p.lq ? delta[query] : 0.f;
    }
  };

  Mma mma;
  Tensor acc1 = partition_fragment_C(mma, Shape<Int<kTile>, Int<DP>>{});  // dK or dQ
  Tensor acc2 = partition_fragment_C(mma, Shape<Int<kTile>, Int<DP>>{});  // dV (kKeys)
  clear(acc1);
  clear(acc2);
  const auto coords = fragment_coords<Mma, kTile>();  // (2 rows, 8 columns) of this thread's S
  constexpr int kN = decltype(size<1>(coords))::value;
  float row_lse2[2] = {0.f, 0.f}, row_delta[2] = {0.f, 0.f};  // per own query (dQ)
  if (!kKeys) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const int query = own0 + get<0>(coords(m, 0));
      row_lse2[m] = query < p.lq ? lse2[query] : 0.f;
      row_delta[m] = query < p.lq ? delta[query] : 0.f;
    }
  }

  run_pipeline(steps, p.stages, issue, [&](int s) {
    const int row0 = s * kTile;
    const auto t1 = tile_at(2 + 2 * (s % p.stages));
    const auto t2 = tile_at(3 + 2 * (s % p.stages));
    {
      Tensor S1 = partition_fragment_C(mma, Shape<Int<kTile>, Int<kTile>>{});
      Tensor S2 = partition_fragment_C(mma, Shape<Int<kTile>, Int<kTile>>{});
      clear(S1);
      clear(S2);
      scores<Mma>(S1, tile_at(0), t1);  // S^T = K Q^T, or S = Q K^T
      scores<Mma>(S2, tile_at(1), t2);  // dP^T = V dO^T, or dP = dO V^T
      Tensor s1 = make_tensor(S1.data(), rowcol(S1.layout()));
      Tensor s2 = make_tensor(S2.data(), rowcol(S2.layout()));
      const float* col = col_smem + (s % p.stages) * 2 * kTile;
#pragma unroll
      for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          const int r = get<0>(coords(m, n)), c = get<1>(coords(m, n));
          const bool ok = row0 + c < str_hi;  // a streamed row that exists (a query for kKeys, a key else)
          const float l = kKeys ? col[c] : row_lse2[m];
          const float d = kKeys ? col[kTile + c] : row_delta[m];
          const float prob = exp2f(s1(m, n) * p.scale2 - l);
          if (kKeys) sP(r, c) = static_cast<T>(ok ? prob : 0.f);
          sdS(r, c) = static_cast<T>(ok ? prob * (s2(m, n) - d) : 0.f);
        }
      }
    }
    __syncthreads();  // the weights are in shared memory
    if (kKeys) product<Tr, Mma>(acc2, sP, t2);  // dV += P^T dO
    product<Tr, Mma>(acc1, sdS, t1);             // dK += dS^T Q, or dQ += dS K
  }, [] {});

  // Epilogue: the gradients staged as (row, channel) in the own tiles, then to their maps.
  cp_async_wait<0>();
  __syncthreads();
  Tensor g1 = tile_at(0);
  Tensor g2 = tile_at(1);
  accumulator_to_tile<Mma, DP>(acc1, g1, {p.scale, p.scale});
  if (kKeys) accumulator_to_tile<Mma, DP>(acc2, g2, {1.f, 1.f});
  __syncthreads();
  const Map& m1 = kKeys ? p.dk : p.dq;
  store_tile<kBackwardThreads, DP>(g1, head_map<T>(m1, bh, p.heads, p.head_dim), m1, own0, own_hi, p.head_dim);
  if (kKeys) store_tile<kBackwardThreads, DP>(g2, head_map<T>(p.dv, bh, p.heads, p.head_dim), p.dv, own0, own_hi, p.head_dim);
}

// ------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------

enum class Pass { kForward, kDelta, kBackwardKV, kBackwardQ };

std::int64_t cdiv(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

void check_sizes(const PixelAttentionParams& a) {
  check_dtype(a.dtype, "pixel_attention");
  if (a.batch < 0 || a.heads < 1 || a.head_dim < 1 || a.lq < 0 || a.lk < 0) {
    invalid_argument("pixel_attention: invalid sizes (batch " + std::to_string(a.batch) + ", heads " +
                     std::to_string(a.heads) + ", head_dim " + std::to_string(a.head_dim) + ", LQ " +
                     std::to_string(a.lq) + ", LK " + std::to_string(a.lk) + ")");
  }
  if (a.head_dim > kAttentionMaxHeadDim) {
    invalid_argument("pixel_attention: head dims up to " + std::to_string(kAttentionMaxHeadDim) + ", got " +
                     std::to_string(a.head_dim));
  }
  constexpr std::int64_t kMaxPositions = 2147483647 - 2 * kAttentionTile;  // int position arithmetic
  if (a.lq > kMaxPositions || a.lk > kMaxPositions || a.heads * a.head_dim > 2147483647) {
    invalid_argument("pixel_attention: positions and channels must be below 2^31");
  }
}

// The kernels copy 16-byte pieces of an operand's rows.
void check_rows(const AttentionRows& r, const char* name) {
  const auto aligned = [](std::int64_t x) { return x % kAttentionRowAlign == 0; };
  if (r.data == 0 || r.data % 16 != 0 || !aligned(r.stride_b) || !aligned(r.stride_h) || !aligned(r.stride_l)) {
    invalid_argument(std::string("pixel_attention CUDA kernels read ") + name +
                     " as rows at a 16-byte aligned address with strides that are multiples of " +
                     std::to_string(kAttentionRowAlign) + " elements (AttentionRows)");
  }
}

// Blocks for `tiles` tiles per (batch, head): checked against the grid's x limit.
unsigned grid_blocks(std::int64_t tiles, std::int64_t batch_heads) {
  if (tiles > 0 && batch_heads > kAttentionMaxBlocks / tiles) {
    invalid_argument("pixel_attention: batch x heads x tiles of " + std::to_string(kAttentionTile) +
                     " positions must be at most 2^31 - 1 blocks, got " + std::to_string(batch_heads) + " x " +
                     std::to_string(tiles));
  }
  return static_cast<unsigned>(tiles * batch_heads);
}

Rows device_rows(const AttentionRows& r) {
  return Rows{reinterpret_cast<const void*>(r.data), r.stride_b, r.stride_h, r.stride_l};
}
Map device_map(const AttentionMap& m) { return Map{reinterpret_cast<void*>(m.data), m.stride_b, m.stride_c, m.stride_l}; }

// Calls f(TypeTag<T>{}, Int<DP>{}) for the launch's element type and padded head dim.
template <typename F>
void by_instance(const PixelAttentionParams& a, F&& f) {
  auto with_dim = [&](auto tag) {
    if (a.head_dim <= 32) return f(tag, Int<32>{});
    if (a.head_dim <= 64) return f(tag, Int<64>{});
    return f(tag, Int<128>{});
  };
  by_dtype(a.dtype, "pixel_attention", with_dim);
}

// The shared memory of a launch, checked against what the device allows a block.
int shared_memory_per_block(const PixelAttentionParams& a) {
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return optin;
}

std::size_t plan_smem(const PixelAttentionParams& a, std::size_t bytes) {
  const int optin = shared_memory_per_block(a);
  if (bytes > static_cast<std::size_t>(optin)) {
    invalid_argument("pixel_attention kernels need " + std::to_string(bytes) +
                     " bytes of shared memory per block, the device allows " + std::to_string(optin));
  }
  return bytes;
}

// Pass P: one block per tile of `tile` positions (of `positions`) and (batch, head). Tensors a
// pass does not use may be absent.
template <Pass P>
void run(const PixelAttentionParams& a, std::int64_t positions, int tile) {
  check_sizes(a);
  if (P == Pass::kForward) {
    check_rows(a.q, "q");
    check_rows(a.k, "k");
    check_rows(a.v, "v");
  } else if (P == Pass::kDelta) {
    check_rows(a.grad_out, "grad_out");
  } else {
    check_rows(a.q, "q");
    check_rows(a.k, "k");
    check_rows(a.v, "v");
    check_rows(a.grad_out, "grad_out");
  }
  Params p{};
  p.q = device_rows(a.q);
  p.k = device_rows(a.k);
  p.v = device_rows(a.v);
  p.dout = device_rows(a.grad_out);
  p.o = device_map(a.out);
  p.dq = device_map(a.grad_q);
  p.dk = device_map(a.grad_k);
  p.dv = device_map(a.grad_v);
  p.lse2 = device_ptr<float>(a.lse2);
  p.delta = device_ptr<float>(a.delta);
  p.heads = a.heads;
  p.head_dim = static_cast<int>(a.head_dim);
  p.lq = static_cast<int>(a.lq);
  p.lk = static_cast<int>(a.lk);
  p.scale = static_cast<float>(a.scale);
  p.scale2 = static_cast<float>(a.scale * kLog2e);
  const std::int64_t tiles = cdiv(positions, tile);
  p.n_tiles = static_cast<int>(tiles);
  const unsigned blocks = grid_blocks(tiles, a.batch * a.heads);
  if (blocks == 0) return;
  check_cuda(cudaSetDevice(a.device), "cudaSetDevice");
  by_instance(a, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int DP = decltype(dim)::value;
    using Tr = Traits<T, DP>;
    if constexpr (P == Pass::kForward) {
      launch(forward_kernel<T, DP>, blocks, kForwardThreads, plan_smem(a, forward_smem<Tr>()), a.stream,
             "pixel_attention forward_kernel", p);
    } else if constexpr (P == Pass::kDelta) {
      launch(delta_kernel<T>, blocks, kDeltaRows, 0, a.stream, "pixel_attention delta_kernel", p);
    } else {
      constexpr bool kKeys = P == Pass::kBackwardKV;
      // one stage of streamed tiles where two do not fit (head dims over 64 on GPUs that allow a
      // block 99 KB: sm_86, sm_89, sm_120)
      const std::size_t optin = static_cast<std::size_t>(shared_memory_per_block(a));
      p.stages = backward_smem<Tr, kKeys>(2) <= optin ? 2 : 1;
      launch(backward_kernel<T, DP, kKeys>, blocks, kBackwardThreads, plan_smem(a, backward_smem<Tr, kKeys>(p.stages)),
             a.stream, kKeys ? "pixel_attention backward_kernel (dK, dV)" : "pixel_attention backward_kernel (dQ)", p);
    }
  });
}

}  // namespace

void pixel_attention_forward(const PixelAttentionParams& params) {
  if (params.lq > 0 && params.batch * params.heads > 0 && params.lk == 0) {
    invalid_argument("pixel_attention: the key map must have at least one position");
  }
  run<Pass::kForward>(params, params.lq, kTile);
}

void pixel_attention_backward_delta(const PixelAttentionParams& params) {
  run<Pass::kDelta>(params, params.lq, kDeltaRows);
}

// LQ = 0: the kernel writes zeros.
void pixel_attention_backward_kv(const PixelAttentionParams& params) {
  run<Pass::kBackwardKV>(params, params.lk, kTile);
}

// LK = 0: the kernel writes zeros.
void pixel_attention_backward_q(const PixelAttentionParams& params) {
  run<Pass::kBackwardQ>(params, params.lq, kTile);
}

}  // namespace pcd_kernels
