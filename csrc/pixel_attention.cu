// pixel_attention (DESIGN.md 3.4): flash-attention-2 style tensor-core kernels on channel-major maps.
//
// q (B, heads * d, LQ), k and v (B, heads * d, LK) are read through their strides in place; a tile
// is copied to shared memory either as [position][channel] (rows are vectors: the A operand of
// Q K^T, or its B operand, "n-major") or as [channel][position] (the B operand of P V, whose k
// dimension is the positions: exactly the channel-major layout). Head dims are zero-padded on chip
// to DP = 16, 32, 64 or 128; every MMA is tiles::mma_16x8x16 (m16n8k16 for 16-bit types, 3xTF32
// for float32) with float32 accumulation.
//
// * attention_forward_kernel: one block of 4 warps per (query tile of 64, batch * head); warp w
//   owns query rows [16w, 16w + 16) of the tile. Loop over key tiles of 64: S = Q K^T (registers),
//   base-2 scaling, keys >= LK masked to -inf, online softmax per row (tiles::OnlineLse), P written
//   to shared memory in the element type, O += P V. Epilogue O / l through shared memory to the
//   output (coalesced along positions), lse2 = max + log2(sum) per query.
// * attention_delta_kernel: delta = rowsum(dO * O) per query and head, one thread per query.
// * attention_backward_kv_kernel: one block per (key tile of 64, batch * head); warp w owns keys
//   [16w, 16w + 16). Loop over query tiles of BM: S^T = K Q^T, P^T = exp2(S^T - lse2), dV += P^T dO,
//   dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q; dK scaled by `scale` at the end.
// * attention_backward_q_kernel: one block per (query tile of 64, batch * head), loop over key tiles
//   of BN: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K; dQ scaled at the end.
// Every gradient element has exactly one writer: deterministic, no atomics.
//
// Fragment ownership (tiles.cuh): in a 16x8 accumulator tile, lane 4g + t holds row g (entries
// 0, 1) and row g + 8 (entries 2, 3), columns 2t and 2t + 1. The warp's rows g and g + 8 are
// therefore always those of this lane, whichever n8 tile: the per-row softmax state lives in two
// registers per lane and row reductions are tiles::quad_max / quad_sum.
//
// Grid: blockIdx.x enumerates (tile, batch * head) with the tile fastest (blocks of one head are
// adjacent, so its keys and values stay in L2); at most 2^31 - 1 blocks. All global offsets are
// 64-bit; positions and channels are ints (checked on the host).
#include "pcd_kernels/pixel_attention.h"

#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "pcd_kernels/dispatch.cuh"
#include "pcd_kernels/tiles.cuh"

namespace pcd_kernels {
namespace {

using tiles::from_float;
using tiles::to_float;

constexpr int kTile = static_cast<int>(kAttentionTile);  // rows per block: queries (forward, dQ), keys (dK/dV)
constexpr int kWarps = kTile / 16;                        // 16 rows per warp
constexpr int kThreads = 32 * kWarps;
constexpr int kDeltaRows = kThreads;  // queries per block of the delta kernel (one per thread)
constexpr double kLog2e = 1.4426950408889634;

// The inner tile the backward kernels loop over (queries for dK/dV, keys for dQ): smaller for wide
// heads, where each thread already holds 16 x DP (dQ) or 2 x 16 x DP (dK, dV) float accumulators,
// and smaller still for float32, whose 3xTF32 operand splitting needs registers of its own (the
// sizes keep every instantiation free of local-memory spills: cuobjdump --dump-resource-usage).
template <typename T, int DP>
constexpr int inner_tile() {
  if (sizeof(T) == 4) return DP == 128 ? 16 : DP == 64 ? 32 : 64;
  return DP == 128 ? 32 : 64;
}

// Row padding of shared tiles, in elements: 16 bytes, so that the fragment loads of the 8 lane
// groups (rows g = 0..7, 32-bit words t = 0..3) hit 32 different banks and rows stay 16-byte aligned.
template <typename T>
constexpr int pad() {
  return 16 / static_cast<int>(sizeof(T));
}

// A (B, C, L) map on the device.
struct Map {
  const void* data;
  std::int64_t sb, sc, sl;
};

struct Params {
  Map q, k, v, o, dout, dq, dk, dv;  // (unused ones are null)
  float* lse2;                       // (B * heads, LQ)
  float* delta;                      // (B * heads, LQ)
  std::int64_t heads;
  int head_dim, lq, lk, n_tiles;     // n_tiles: tiles per (batch, head), the fastest grid index
  float scale2;                      // scale * log2(e): logits in base 2
  float scale;
};

// A block's tile and its head bh = batch * heads + h (blockIdx.x enumerates them tile fastest).
__device__ __forceinline__ int block_tile(const Params& p) {
  return static_cast<int>(blockIdx.x % static_cast<unsigned>(p.n_tiles));
}
__device__ __forceinline__ std::int64_t block_head(const Params& p) {
  return blockIdx.x / static_cast<unsigned>(p.n_tiles);
}

// Element (batch, head h, channel 0, position 0) of head `bh` = batch * heads + h.
template <typename T>
__device__ __forceinline__ T* head_ptr(const Map& m, std::int64_t bh, std::int64_t heads, int head_dim) {
  return const_cast<T*>(static_cast<const T*>(m.data)) + (bh / heads) * m.sb +
         (bh % heads) * static_cast<std::int64_t>(head_dim) * m.sc;
}

// Copies positions [pos0, pos0 + POS) x channels [0, DP) of one head into a shared tile:
// tile[p * ld + c] ([position][channel]) or, TRANSPOSED, tile[c * ld + p] ([channel][position]).
// Positions >= n_pos and channels >= head_dim are 0 (padding). Consecutive threads take
// consecutive positions (coalesced for the channel-major layout, position stride 1) unless the
// channels are the contiguous direction (channels-last), then consecutive channels.
template <typename T, int POS, int DP, bool TRANSPOSED>
__device__ __forceinline__ void load_tile(T* tile, int ld, const T* src, std::int64_t sl, std::int64_t sc,
                                          int pos0, int n_pos, int head_dim) {
  const bool channel_fast = sc == 1 && sl != 1;
  for (int i = threadIdx.x; i < POS * DP; i += kThreads) {
    const int p = channel_fast ? i / DP : i % POS;
    const int c = channel_fast ? i % DP : i / POS;
    const int pos = pos0 + p;
    T x = from_float<T>(0.f);
    if (pos < n_pos && c < head_dim) x = src[static_cast<std::int64_t>(pos) * sl + static_cast<std::int64_t>(c) * sc];
    tile[TRANSPOSED ? c * ld + p : p * ld + c] = x;
  }
}

// The reverse of load_tile for a [position][channel] tile: writes positions < n_pos, channels <
// head_dim.
template <typename T, int POS, int DP>
__device__ __forceinline__ void store_tile(const T* tile, int ld, T* dst, std::int64_t sl, std::int64_t sc, int pos0,
                                           int n_pos, int head_dim) {
  const bool channel_fast = sc == 1 && sl != 1;
  for (int i = threadIdx.x; i < POS * DP; i += kThreads) {
    const int p = channel_fast ? i / DP : i % POS;
    const int c = channel_fast ? i % DP : i / POS;
    const int pos = pos0 + p;
    if (pos < n_pos && c < head_dim) {
      dst[static_cast<std::int64_t>(pos) * sl + static_cast<std::int64_t>(c) * sc] = tile[p * ld + c];
    }
  }
}

// dst[0], dst[1] = a, b in the element type (dst 4-byte aligned for 16-bit T, 8-byte for float).
__device__ __forceinline__ void store_pair(float* dst, float a, float b) {
  *reinterpret_cast<float2*>(dst) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(__half* dst, float a, float b) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}

// Writes a warp's 16 x N accumulator tiles to the shared rows `rows` (16 rows, leading dim ld),
// each value times row_factor[0] (row g) or row_factor[1] (row g + 8).
template <typename T, int N>
__device__ __forceinline__ void store_fragments(T* rows, int ld, const float (&acc)[N / 8][4], float f0, float f1) {
  const int g = tiles::lane_group(), t = tiles::lane_in_group();
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
    store_pair(rows + g * ld + 8 * n + 2 * t, acc[n][0] * f0, acc[n][1] * f0);
    store_pair(rows + (g + 8) * ld + 8 * n + 2 * t, acc[n][2] * f1, acc[n][3] * f1);
  }
}

// acc (16 x N) += A (16 x K, rows at a, leading dim lda) * B^T, B's N rows at b (leading dim ldb),
// k contiguous in both. One warp.
// (float32: the k loop is unrolled by 2 only, or ptxas hoists the operand loads and 3xTF32 splits
// of every k step and spills next to the dK, dV accumulators.)
template <typename T, int N, int K>
__device__ __forceinline__ void warp_gemm(float (&acc)[N / 8][4], const T* a, int lda, const T* b, int ldb) {
  constexpr int kUnroll = sizeof(T) == 4 ? 2 : K / 16;
#pragma unroll kUnroll
  for (int kk = 0; kk < K; kk += 16) {
#pragma unroll
    for (int n = 0; n < N / 8; ++n) tiles::mma_16x8x16(acc[n], a + kk, lda, b + 8 * n * ldb + kk, ldb);
  }
}

// Column of accumulator entry j of n8 tile n for this lane (rows: g for j < 2, g + 8 otherwise).
__device__ __forceinline__ int fragment_col(int n, int j) { return 8 * n + 2 * tiles::lane_in_group() + (j & 1); }

// acc[n][j] = f(acc[n][j], n, j) for each of this lane's entries of a warp's 16 x 8NT accumulators.
template <int NT, typename F>
__device__ __forceinline__ void for_each_entry(float (&acc)[NT][4], F&& f) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[n][j] = f(acc[n][j], n, j);
  }
}

// --- shared memory per kernel, in bytes -------------------------------------------------------

template <typename T, int DP>
constexpr std::size_t forward_smem() {
  constexpr int LD = DP + pad<T>(), LDN = kTile + pad<T>();
  return (2 * kTile * LD + DP * LDN + kTile * LDN) * sizeof(T);
}

template <typename T, int DP>
constexpr std::size_t backward_kv_smem() {
  constexpr int BM = inner_tile<T, DP>(), LD = DP + pad<T>(), LDM = BM + pad<T>();
  return (2 * kTile * LD + 2 * BM * LD + 2 * DP * LDM + kTile * LDM) * sizeof(T) + 2 * BM * sizeof(float);
}

template <typename T, int DP>
constexpr std::size_t backward_q_smem() {
  constexpr int BN = inner_tile<T, DP>(), LD = DP + pad<T>(), LDN = BN + pad<T>();
  return (2 * kTile * LD + 2 * BN * LD + DP * LDN + kTile * LDN) * sizeof(T);
}

// --- kernels -------------------------------------------------------------------------------

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const Params p) {
  constexpr int LD = DP + pad<T>();     // [position][channel] tiles
  constexpr int LDN = kTile + pad<T>();  // [channel][key] and P tiles
  extern __shared__ __align__(16) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);  // [kTile queries][LD]; the output tile at the end
  T* ks = qs + kTile * LD;              // [kTile keys][LD]
  T* vt = ks + kTile * LD;              // [DP][LDN keys]
  T* ps = vt + DP * LDN;                // [kTile queries][LDN keys], warp w writes rows 16w..16w+15

  const std::int64_t bh = block_head(p);
  const int q0 = block_tile(p) * kTile;
  const int warp = threadIdx.x / 32, g = tiles::lane_group(), t = tiles::lane_in_group();
  const T* q = head_ptr<T>(p.q, bh, p.heads, p.head_dim);
  const T* k = head_ptr<T>(p.k, bh, p.heads, p.head_dim);
  const T* v = head_ptr<T>(p.v, bh, p.heads, p.head_dim);

  load_tile<T, kTile, DP, false>(qs, LD, q, p.q.sl, p.q.sc, q0, p.lq, p.head_dim);
  float o[DP / 8][4] = {};
  tiles::OnlineLse row[2];  // rows g and g + 8 of the warp's 16
  T* p_rows = ps + warp * 16 * LDN;
  for (int k0 = 0; k0 < p.lk; k0 += kTile) {
    __syncthreads();  // the Q tile is stored; every warp is done with the previous K and V tiles
    load_tile<T, kTile, DP, false>(ks, LD, k, p.k.sl, p.k.sc, k0, p.lk, p.head_dim);
    load_tile<T, kTile, DP, true>(vt, LDN, v, p.v.sl, p.v.sc, k0, p.lk, p.head_dim);
    __syncthreads();

    float s[kTile / 8][4] = {};
    warp_gemm<T, kTile, DP>(s, qs + warp * 16 * LD, LD, ks, LD);
    float tile_max[2] = {-INFINITY, -INFINITY};
    for_each_entry(s, [&](float x, int n, int j) {
      // select, not multiply: a NaN logit stays NaN, a missing key is exactly -inf
      x = k0 + fragment_col(n, j) < p.lk ? x * p.scale2 : -INFINITY;
      tile_max[j >> 1] = fmaxf(tile_max[j >> 1], x);
      return x;
    });
    float factor[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) factor[r] = row[r].rescale_to(tiles::quad_max(tile_max[r]));
    for_each_entry(s, [&](float x, int, int j) {
      x = exp2f(x - row[j >> 1].max);  // NaN logits give NaN weights: NaN in, NaN out
      sum[j >> 1] += x;
      return x;
    });
#pragma unroll
    for (int r = 0; r < 2; ++r) row[r].sum += tiles::quad_sum(sum[r]);
    for_each_entry(o, [&](float x, int, int j) { return x * factor[j >> 1]; });
    store_fragments<T, kTile>(p_rows, LDN, s, 1.f, 1.f);
    __syncwarp();  // P rows are read by every lane of the warp
    warp_gemm<T, DP, kTile>(o, p_rows, LDN, vt, LDN);
  }

  // Epilogue: O / l staged as [query][channel] in the warp's own rows of the Q tile.
  __syncthreads();
  store_fragments<T, DP>(qs + warp * 16 * LD, LD, o, 1.f / row[0].sum, 1.f / row[1].sum);
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = q0 + warp * 16 + g + 8 * r;
      if (query < p.lq) p.lse2[bh * p.lq + query] = row[r].lse2();
    }
  }
  __syncthreads();
  store_tile<T, kTile, DP>(qs, LD, head_ptr<T>(p.o, bh, p.heads, p.head_dim), p.o.sl, p.o.sc, q0, p.lq,
                           p.head_dim);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const Params p) {
  const std::int64_t bh = block_head(p);
  const int query = block_tile(p) * kDeltaRows + static_cast<int>(threadIdx.x);
  if (query >= p.lq) return;
  const T* o = head_ptr<T>(p.o, bh, p.heads, p.head_dim) + query * p.o.sl;
  const T* dout = head_ptr<T>(p.dout, bh, p.heads, p.head_dim) + query * p.dout.sl;
  float acc = 0.f;
  for (int c = 0; c < p.head_dim; ++c) acc += to_float(o[c * p.o.sc]) * to_float(dout[c * p.dout.sc]);
  p.delta[bh * p.lq + query] = acc;
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attention_backward_kv_kernel(const Params p) {
  constexpr int BM = inner_tile<T, DP>();  // queries per step
  constexpr int LD = DP + pad<T>(), LDM = BM + pad<T>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);  // [kTile keys][LD]; dK staging at the end
  T* vs = ks + kTile * LD;              // [kTile keys][LD]; dV staging at the end
  T* qs = vs + kTile * LD;              // [BM queries][LD]
  T* dos = qs + BM * LD;                // [BM queries][LD]
  T* qt = dos + BM * LD;                // [DP][LDM queries]
  T* dot = qt + DP * LDM;               // [DP][LDM queries]
  T* ps = dot + DP * LDM;               // [kTile keys][LDM queries]: P^T, then dS^T; warp-private rows
  float* lse2_s = reinterpret_cast<float*>(ps + kTile * LDM);  // [BM]
  float* delta_s = lse2_s + BM;                                 // [BM]

  const std::int64_t bh = block_head(p);
  const int k0 = block_tile(p) * kTile;
  const int warp = threadIdx.x / 32;
  const T* q = head_ptr<T>(p.q, bh, p.heads, p.head_dim);
  const T* dout = head_ptr<T>(p.dout, bh, p.heads, p.head_dim);
  const float* lse2 = p.lse2 + bh * p.lq;
  const float* delta = p.delta + bh * p.lq;

  load_tile<T, kTile, DP, false>(ks, LD, head_ptr<T>(p.k, bh, p.heads, p.head_dim), p.k.sl, p.k.sc, k0, p.lk,
                                 p.head_dim);
  load_tile<T, kTile, DP, false>(vs, LD, head_ptr<T>(p.v, bh, p.heads, p.head_dim), p.v.sl, p.v.sc, k0, p.lk,
                                 p.head_dim);
  float dk[DP / 8][4] = {}, dv[DP / 8][4] = {};
  T* rows = ps + warp * 16 * LDM;
  for (int q0 = 0; q0 < p.lq; q0 += BM) {
    __syncthreads();  // K, V stored; every warp is done with the previous query tile
    load_tile<T, BM, DP, false>(qs, LD, q, p.q.sl, p.q.sc, q0, p.lq, p.head_dim);
    load_tile<T, BM, DP, true>(qt, LDM, q, p.q.sl, p.q.sc, q0, p.lq, p.head_dim);
    load_tile<T, BM, DP, false>(dos, LD, dout, p.dout.sl, p.dout.sc, q0, p.lq, p.head_dim);
    load_tile<T, BM, DP, true>(dot, LDM, dout, p.dout.sl, p.dout.sc, q0, p.lq, p.head_dim);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      const bool ok = q0 + i < p.lq;
      lse2_s[i] = ok ? lse2[q0 + i] : 0.f;
      delta_s[i] = ok ? delta[q0 + i] : 0.f;
    }
    __syncthreads();

    // P^T = exp2(scale2 * K Q^T - lse2), queries >= LQ exactly 0
    float pt[BM / 8][4] = {};
    warp_gemm<T, BM, DP>(pt, ks + warp * 16 * LD, LD, qs, LD);
    for_each_entry(pt, [&](float x, int n, int j) {
      const int col = fragment_col(n, j);
      return q0 + col < p.lq ? exp2f(x * p.scale2 - lse2_s[col]) : 0.f;
    });
    store_fragments<T, BM>(rows, LDM, pt, 1.f, 1.f);
    __syncwarp();
    warp_gemm<T, DP, BM>(dv, rows, LDM, dot, LDM);  // dV += P^T dO

    // dS^T = P^T (V dO^T - delta)
    float ds[BM / 8][4] = {};
    warp_gemm<T, BM, DP>(ds, vs + warp * 16 * LD, LD, dos, LD);
    for_each_entry(ds, [&](float x, int n, int j) {
      const int col = fragment_col(n, j);
      return q0 + col < p.lq ? pt[n][j] * (x - delta_s[col]) : 0.f;
    });
    __syncwarp();  // every lane has read P^T
    store_fragments<T, BM>(rows, LDM, ds, 1.f, 1.f);
    __syncwarp();
    warp_gemm<T, DP, BM>(dk, rows, LDM, qt, LDM);  // dK += dS^T Q
  }

  // Epilogue: dK * scale and dV staged as [key][channel] in the K and V tiles.
  __syncthreads();
  store_fragments<T, DP>(ks + warp * 16 * LD, LD, dk, p.scale, p.scale);
  store_fragments<T, DP>(vs + warp * 16 * LD, LD, dv, 1.f, 1.f);
  __syncthreads();
  store_tile<T, kTile, DP>(ks, LD, head_ptr<T>(p.dk, bh, p.heads, p.head_dim), p.dk.sl, p.dk.sc, k0, p.lk,
                           p.head_dim);
  store_tile<T, kTile, DP>(vs, LD, head_ptr<T>(p.dv, bh, p.heads, p.head_dim), p.dv.sl, p.dv.sc, k0, p.lk,
                           p.head_dim);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attention_backward_q_kernel(const Params p) {
  constexpr int BN = inner_tile<T, DP>();  // keys per step
  constexpr int LD = DP + pad<T>(), LDN = BN + pad<T>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);  // [kTile queries][LD]; dQ staging at the end
  T* dos = qs + kTile * LD;             // [kTile queries][LD]
  T* ks = dos + kTile * LD;             // [BN keys][LD]
  T* vs = ks + BN * LD;                 // [BN keys][LD]
  T* kt = vs + BN * LD;                 // [DP][LDN keys]
  T* ps = kt + DP * LDN;                // [kTile queries][LDN keys]: dS, warp-private rows

  const std::int64_t bh = block_head(p);
  const int q0 = block_tile(p) * kTile;
  const int warp = threadIdx.x / 32, g = tiles::lane_group();
  const T* k = head_ptr<T>(p.k, bh, p.heads, p.head_dim);
  const T* v = head_ptr<T>(p.v, bh, p.heads, p.head_dim);

  load_tile<T, kTile, DP, false>(qs, LD, head_ptr<T>(p.q, bh, p.heads, p.head_dim), p.q.sl, p.q.sc, q0, p.lq,
                                 p.head_dim);
  load_tile<T, kTile, DP, false>(dos, LD, head_ptr<T>(p.dout, bh, p.heads, p.head_dim), p.dout.sl, p.dout.sc, q0,
                                 p.lq, p.head_dim);
  float lse2[2], delta[2];  // rows g and g + 8
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int query = q0 + warp * 16 + g + 8 * r;
    lse2[r] = query < p.lq ? p.lse2[bh * p.lq + query] : 0.f;
    delta[r] = query < p.lq ? p.delta[bh * p.lq + query] : 0.f;
  }
  float dq[DP / 8][4] = {};
  T* rows = ps + warp * 16 * LDN;
  for (int k0 = 0; k0 < p.lk; k0 += BN) {
    __syncthreads();  // Q, dO stored; every warp is done with the previous key tile
    load_tile<T, BN, DP, false>(ks, LD, k, p.k.sl, p.k.sc, k0, p.lk, p.head_dim);
    load_tile<T, BN, DP, true>(kt, LDN, k, p.k.sl, p.k.sc, k0, p.lk, p.head_dim);
    load_tile<T, BN, DP, false>(vs, LD, v, p.v.sl, p.v.sc, k0, p.lk, p.head_dim);
    __syncthreads();

    float s[BN / 8][4] = {}, ds[BN / 8][4] = {};
    warp_gemm<T, BN, DP>(s, qs + warp * 16 * LD, LD, ks, LD);    // Q K^T
    warp_gemm<T, BN, DP>(ds, dos + warp * 16 * LD, LD, vs, LD);  // dP = dO V^T
    for_each_entry(ds, [&](float x, int n, int j) {
      const int r = j >> 1;
      return k0 + fragment_col(n, j) < p.lk ? exp2f(s[n][j] * p.scale2 - lse2[r]) * (x - delta[r]) : 0.f;
    });
    store_fragments<T, BN>(rows, LDN, ds, 1.f, 1.f);
    __syncwarp();
    warp_gemm<T, DP, BN>(dq, rows, LDN, kt, LDN);  // dQ += dS K
  }

  __syncthreads();
  store_fragments<T, DP>(qs + warp * 16 * LD, LD, dq, p.scale, p.scale);
  __syncthreads();
  store_tile<T, kTile, DP>(qs, LD, head_ptr<T>(p.dq, bh, p.heads, p.head_dim), p.dq.sl, p.dq.sc, q0, p.lq,
                           p.head_dim);
}

// --- host side -------------------------------------------------------------------------------

template <int DP>
using Dim = std::integral_constant<int, DP>;

// Calls f(Dim<DP>{}) for the head dim padded on chip, DP = 16, 32, 64 or 128.
template <typename F>
void by_head_dim(std::int64_t head_dim, F&& f) {
  if (head_dim <= 16) return f(Dim<16>{});
  if (head_dim <= 32) return f(Dim<32>{});
  if (head_dim <= 64) return f(Dim<64>{});
  return f(Dim<128>{});
}

enum class Pass { kForward, kDelta, kBackwardKV, kBackwardQ };

struct KernelLaunch {
  void (*kernel)(Params);
  std::size_t smem;  // dynamic shared memory per block, bytes
  const char* name;
};

// The kernel of pass P for element type T and head dim DP (the delta pass has one for every DP).
template <Pass P, typename T, int DP>
KernelLaunch kernel_of() {
  if constexpr (P == Pass::kForward) {
    return {attention_forward_kernel<T, DP>, forward_smem<T, DP>(), "pixel_attention attention_forward_kernel"};
  } else if constexpr (P == Pass::kDelta) {
    return {attention_delta_kernel<T>, 0, "pixel_attention attention_delta_kernel"};
  } else if constexpr (P == Pass::kBackwardKV) {
    return {attention_backward_kv_kernel<T, DP>, backward_kv_smem<T, DP>(),
            "pixel_attention attention_backward_kv_kernel"};
  } else {
    return {attention_backward_q_kernel<T, DP>, backward_q_smem<T, DP>(),
            "pixel_attention attention_backward_q_kernel"};
  }
}

std::int64_t cdiv(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

void check_sizes(const PixelAttentionParams& a) {
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

// Blocks for `tiles` tiles per (batch, head): checked against the grid's x limit.
unsigned grid_blocks(std::int64_t tiles, std::int64_t batch_heads) {
  if (tiles > 0 && batch_heads > kAttentionMaxBlocks / tiles) {
    invalid_argument("pixel_attention: batch x heads x tiles of " + std::to_string(kAttentionTile) +
                     " positions must be at most 2^31 - 1 blocks, got " + std::to_string(batch_heads) + " x " +
                     std::to_string(tiles));
  }
  return static_cast<unsigned>(tiles * batch_heads);
}

Map device_map(const AttentionMap& m) {
  return Map{reinterpret_cast<const void*>(m.data), m.stride_b, m.stride_c, m.stride_l};
}

// Pass P over the launch's maps: one block per tile of `tile` positions (of `positions`) and
// (batch, head). Maps a pass does not use may be absent.
template <Pass P>
void run(const PixelAttentionParams& a, std::int64_t positions, int tile) {
  by_dtype(a.dtype, [](auto) {});  // an unknown dtype code is reported first
  check_sizes(a);
  check_cuda(cudaSetDevice(a.device), "cudaSetDevice");
  Params p{};
  p.q = device_map(a.q);
  p.k = device_map(a.k);
  p.v = device_map(a.v);
  p.o = device_map(a.out);
  p.dout = device_map(a.grad_out);
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
  by_dtype(a.dtype, [&](auto tag) {
    by_head_dim(a.head_dim, [&](auto dim) {
      const KernelLaunch k = kernel_of<P, typename decltype(tag)::type, decltype(dim)::value>();
      launch(k.kernel, blocks, kThreads, k.smem, a.stream, k.name, p);
    });
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
