// CUDA kernels of pixel_contrastive_loss (DESIGN.md 3.1), on the tile library tiles.cuh.
//
// Three kernels, none storing anything of size anchors x keys, every output element written by
// exactly one thread (no atomics: deterministic):
//
// * forward_kernel: a block of 4 warps owns 64 anchors (16 per warp), streams 64-key tiles from
//   each key source (teacher pixels of the image / batch, other ranks' pixels, queue rows) and
//   keeps an online base-2 logsumexp per anchor. Writes loss and lse2.
// * anchor_backward_kernel: the same anchor tile recomputes each key tile's logits, forms
//   q = p - [k is i's positive] and accumulates q @ k_hat for one 128-channel slice of the
//   gradient (grid z), plus d_i = sum_k q_ik logit2_ik for the normalisation epilogue. In "none"
//   mode the positive's (p - 1) t_hat_i is added in the epilogue, and it also writes the teacher
//   gradient (it involves only the positive).
// * key_backward_kernel: a block owns 64 keys (teacher pixels or queue rows), loops over the
//   anchors that see them, accumulates sum_i (g_i / g_max) q_ik a_hat_i and e_k likewise.
//
// L2 normalisation is fused into the shared-memory loads: rows are multiplied by their inverse
// norm as they are converted to the tile's element type, so a logit is a_hat . k_hat and every
// element in shared memory is at most 1 in magnitude (no half-precision overflow even for a zero
// vector, whose inverse norm is 1e12). The gradient through x / max(||x||, eps) is applied in the
// epilogue: dx = inv * G - proj * (x_hat . G) * x with proj = inv^2 (0 where ||x|| < eps) and
// x_hat . G = g * d * ln 2 from the per-row sums above.
//
// Logits are summed over C in 64-channel chunks. The block's own 64 rows (anchors, or keys in
// the key pass) stay resident in shared memory for the whole key loop when they fit the budget,
// otherwise they are reloaded chunk by chunk. Masked and out-of-range rows are loaded as zeros
// (so a NaN there cannot reach anyone else's sums) and their logits are -inf.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "pcd_kernels/dispatch.cuh"
#include "pcd_kernels/pixel_contrastive.h"
#include "pcd_kernels/tiles.cuh"

namespace pcd_kernels {
namespace {

using tiles::from_float;
using tiles::to_float;

constexpr int kThreads = 128;    // 4 warps
constexpr int kRows = 64;        // rows a block owns: anchors (forward, anchor pass) or keys
constexpr int kCols = 64;        // rows of one streamed tile: keys, or anchors in the key pass
constexpr int kChunk = 64;       // channels per shared-memory chunk of the logits
constexpr float kLn2 = 0.6931471805599453f;
// Rows resident in shared memory only while a block needs at most this much: two blocks per SM
// on H100 (228 KB), one on A100 (164 KB).
constexpr std::size_t kResidentBudget = 112 * 1024;

// Leading dimension (elements) of every shared tile, whose rows are 64 elements: padded so that
// the 8 rows x 4 words an MMA fragment load touches fall in 32 different banks (a row is 36 or 68
// words, both = 4 mod 32).
// A backward block writes out_chunk gradient channels (grid z): 128 in 16-bit, 64 in float32,
// whose 3xTF32 MMAs need more registers per fragment.
template <typename T>
struct Tile {
  static constexpr int ld = sizeof(T) == 4 ? kChunk + 4 : kChunk + 8;
  static constexpr int elems = kRows * ld;  // one 64-row tile
  static constexpr int out_chunk = sizeof(T) == 4 ? 64 : 128;
  static constexpr int out_tiles = out_chunk / 8;
};
static_assert(kRows == kCols, "the shared tiles are square 64 x 64 (+ padding)");

// Rows [0, hi) of a strided matrix; row r exists when r < hi and valid[r] != 0 (no valid: all).
// Rows are multiplied by scale[r] when scale is given (the fused normalisation).
template <typename T>
struct Rows {
  const T* ptr;
  std::int64_t stride_row, stride_col;
  int hi;
  const float* scale;
  const std::uint8_t* valid;

  __device__ __forceinline__ bool ok(int row) const {
    return row >= 0 && row < hi && (valid == nullptr || valid[row] != 0);
  }
  __device__ __forceinline__ float raw(int row, int col) const {
    return to_float(ptr[static_cast<std::int64_t>(row) * stride_row + static_cast<std::int64_t>(col) * stride_col]);
  }
  __device__ __forceinline__ float row_scale(int row) const { return scale != nullptr ? scale[row] : 1.f; }
};

// Rows [row0, row0 + 64) x channels [col0, col0 + 64) into a row-major tile (ld Tile<T>::ld),
// scaled and converted; rows that do not exist and channels >= C are 0.
template <typename T>
__device__ __forceinline__ void load_tile(T* tile, const Rows<T>& src, int row0, int col0, int C) {
  constexpr int ld = Tile<T>::ld;
#pragma unroll 4
  for (int i = threadIdx.x; i < kRows * kChunk; i += kThreads) {
    const int r = i / kChunk, c = i % kChunk;
    const int row = row0 + r, col = col0 + c;
    float v = 0.f;
    if (col < C && src.ok(row)) v = src.raw(row, col) * src.row_scale(row);
    tile[r * ld + c] = from_float<T>(v);
  }
}

// The transpose of rows [row0, row0 + 64) x channels [col0, col0 + out_chunk):
// tile[c * ld + r] = x_hat[row0 + r, col0 + c], the "n-major" B operand of (weights @ rows).
// Consecutive threads read consecutive channels (coalesced for row-major sources).
template <typename T>
__device__ __forceinline__ void load_tile_transposed(T* tile, const Rows<T>& src, int row0, int col0, int C) {
  constexpr int ld = Tile<T>::ld, n_cols = Tile<T>::out_chunk;
#pragma unroll 4
  for (int i = threadIdx.x; i < kRows * n_cols; i += kThreads) {
    const int c = i % n_cols, r = i / n_cols;
    const int row = row0 + r, col = col0 + c;
    float v = 0.f;
    if (col < C && src.ok(row)) v = src.raw(row, col) * src.row_scale(row);
    tile[c * ld + r] = from_float<T>(v);
  }
}

// Shared memory of one block: its own rows (all chunks when resident, else one), the streamed
// tile's current chunk, and for the backward the transposed output slice of the streamed rows,
// the warps' weight rows and three per-column float arrays.
template <typename T>
struct Smem {
  T* own;
  T* streamed;
  T* streamed_t;  // backward only
  T* weights;     // backward only
  float* col_ok;  // 1 where the streamed row exists
  float* col_a;   // key pass: the anchors' lse2
  float* col_b;   // key pass: the anchors' g / g_max

  static std::size_t bytes(bool backward, int own_chunks) {
    std::size_t elems = static_cast<std::size_t>(own_chunks + 1) * Tile<T>::elems;
    if (backward) elems += static_cast<std::size_t>(Tile<T>::out_chunk) * Tile<T>::ld + Tile<T>::elems;
    return elems * sizeof(T) + 3 * kCols * sizeof(float);
  }

  __device__ static Smem carve(unsigned char* base, bool backward, int own_chunks) {
    Smem s;
    T* p = reinterpret_cast<T*>(base);
    s.own = p;
    p += static_cast<std::size_t>(own_chunks) * Tile<T>::elems;
    s.streamed = p;
    p += Tile<T>::elems;
    s.streamed_t = p;
    s.weights = p;
    if (backward) {
      p += static_cast<std::size_t>(Tile<T>::out_chunk) * Tile<T>::ld;
      s.weights = p;
      p += Tile<T>::elems;
    }
    float* f = reinterpret_cast<float*>(p);
    s.col_ok = f;
    s.col_a = f + kCols;
    s.col_b = f + 2 * kCols;
    return s;
  }
};

__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// Loads every chunk of the block's own rows (resident mode); visible after the next barrier.
template <typename T>
__device__ __forceinline__ void load_own(const Smem<T>& sm, const Rows<T>& own, int row0, int C) {
  for (int c0 = 0, chunk = 0; c0 < C; c0 += kChunk, ++chunk) {
    load_tile(sm.own + static_cast<std::size_t>(chunk) * Tile<T>::elems, own, row0, c0, C);
  }
}

// s[j][e] = own_hat[r] . streamed_hat[col] (raw dot of the scaled rows, float32) for this warp's
// 16 own rows r = 16 warp + g + 8 (e / 2) and streamed rows col = 8 j + 2 t + e % 2.
// first_chunk() runs, by every thread, between the loads and the barrier of the first chunk:
// work that must be visible after this call (column flags, the transposed output slice).
// Starts with a barrier, so the caller may rewrite nothing it shares until the next call.
template <typename T, typename F>
__device__ __forceinline__ void tile_scores(float (&s)[8][4], const Smem<T>& sm, bool resident,
                                            const Rows<T>& own, int own0, const Rows<T>& streamed,
                                            int col0, int C, F&& first_chunk) {
  constexpr int ld = Tile<T>::ld;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
  }
  for (int c0 = 0, chunk = 0; c0 < C; c0 += kChunk, ++chunk) {
    __syncthreads();  // every warp is done with the previous contents
    if (!resident) load_tile(sm.own, own, own0, c0, C);
    load_tile(sm.streamed, streamed, col0, c0, C);
    if (c0 == 0) first_chunk();
    __syncthreads();
    const T* a = sm.own + (resident ? static_cast<std::size_t>(chunk) * Tile<T>::elems : 0) + warp_id() * 16 * ld;
    const int k_end = min(kChunk, C - c0);  // channels past C are 0 in both tiles
    for (int k = 0; k < k_end; k += 16) {
#pragma unroll
      for (int j = 0; j < 8; ++j) tiles::mma_16x8x16<T>(s[j], a + k, ld, sm.streamed + j * 8 * ld + k, ld);
    }
  }
}

// Writes a warp's 16 x 64 weight fragment (row-major, ld) in the element type.
template <typename T>
__device__ __forceinline__ void store_weights(T* w, const float (&q)[8][4]) {
  constexpr int ld = Tile<T>::ld;
  const int g = tiles::lane_group(), t = tiles::lane_in_group();
  T* base = w + warp_id() * 16 * ld;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) base[(g + 8 * (e >> 1)) * ld + 8 * j + 2 * t + (e & 1)] = from_float<T>(q[j][e]);
  }
}

// out[jj] += weights (this warp's 16 x 64) @ streamed_t^T, for the output tiles jj with channels
// oc + 8 jj < C (the others are never stored).
template <typename T>
__device__ __forceinline__ void weights_times_rows(float (&out)[Tile<T>::out_tiles][4], const Smem<T>& sm, int oc,
                                                   int C) {
  constexpr int ld = Tile<T>::ld;
  const T* w = sm.weights + warp_id() * 16 * ld;
#pragma unroll
  for (int k = 0; k < kCols; k += 16) {
#pragma unroll
    for (int jj = 0; jj < Tile<T>::out_tiles; ++jj) {
      if (oc + 8 * jj < C) tiles::mma_16x8x16<T>(out[jj], w + k, ld, sm.streamed_t + jj * 8 * ld + k, ld);
    }
  }
}

// Calls f(acc, col) for each of this lane's accumulators of output row g + 8 h (out as
// weights_times_rows leaves it) whose channel col is below C: a backward block's epilogue.
template <int N, typename F>
__device__ __forceinline__ void for_each_output(const float (&out)[N][4], int h, int oc, int C, F&& f) {
  const int t = tiles::lane_in_group();
#pragma unroll
  for (int jj = 0; jj < N; ++jj) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = oc + 8 * jj + 2 * t + c;
      if (col < C) f(out[jj][2 * h + c], col);
    }
  }
}

// Which key tiles a source contributes and how its positives are found.
enum class Keys { kPlain, kTeacher, kPositiveOnly };

template <typename T>
struct Params {
  Rows<T> anchors, teacher, extra, queue;
  Negatives negatives;
  int n_rows, hw, C;
  bool resident;
  float logit_scale, inv_temperature;
};

// The anchors a block owns: rows [row0, row0 + 64) of segment [seg_lo, seg_hi) (an image in
// "image" mode, the batch otherwise). The anchors' Rows get hi = seg_hi.
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

// The key sources an anchor tile streams, in order: 0 = teacher pixels (in "none" mode only the
// one tile holding the anchors' own positives), 1 = extra keys ("batch" mode), 2 = queue rows.
// Sets the source's rows, the key tiles' range [lo, end) and how positives are found there.
template <typename T>
__device__ __forceinline__ void key_source(const Params<T>& p, const Segment& seg, int i, Rows<T>& rows, int& lo,
                                           int& end, Keys& kind) {
  if (i == 0) {
    const bool none = p.negatives == Negatives::kNone;
    rows = p.teacher;
    rows.hi = seg.hi;
    lo = none ? seg.row0 : seg.lo;
    end = none ? seg.row0 + 1 : seg.hi;
    kind = none ? Keys::kPositiveOnly : Keys::kTeacher;
  } else {
    rows = i == 1 ? p.extra : p.queue;  // extra.hi is 0 outside "batch" mode
    lo = 0;
    end = rows.hi;
    kind = Keys::kPlain;
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

struct ForwardState {
  tiles::OnlineLse online[2];  // rows g and g + 8 of the warp (identical in the 4 lanes of a quad)
  float pos[2];             // this lane's share of the positive logit (quad-summed at the end)
};

// Folds one key tile into the running logsumexp of the warp's rows; a kPositiveOnly tile only
// yields the positives' logits.
template <typename T>
__device__ __forceinline__ void forward_tile(ForwardState& st, const Smem<T>& sm, const Params<T>& p,
                                             const Rows<T>& own, int row0, const Rows<T>& keys, int key0,
                                             Keys kind) {
  float s[8][4];
  tile_scores(s, sm, p.resident, own, row0, keys, key0, p.C, [&] {
    if (threadIdx.x < kCols) sm.col_ok[threadIdx.x] = keys.ok(key0 + threadIdx.x) ? 1.f : 0.f;
  });
  const int g = tiles::lane_group(), t = tiles::lane_in_group();
  const int my_row0 = row0 + warp_id() * 16 + g;
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1, col = 8 * j + 2 * t + (e & 1);
      float v = sm.col_ok[col] != 0.f ? s[j][e] * p.logit_scale : -INFINITY;
      const bool positive = key0 + col == my_row0 + 8 * h;
      if (kind != Keys::kPlain && positive) st.pos[h] += v;
      if (kind == Keys::kPositiveOnly) v = -INFINITY;  // folded in by the caller, once
      s[j][e] = v;
      tile_max[h] = fmaxf(tile_max[h], v);
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st.online[h].rescale_to(tiles::quad_max(tile_max[h]));
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 2 * h; e < 2 * h + 2; ++e) sum += exp2f(s[j][e] - st.online[h].max);  // NaN stays NaN
    }
    st.online[h].sum += tiles::quad_sum(sum);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(Params<T> p, float* loss, float* lse2_out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int own_chunks = p.resident ? (p.C + kChunk - 1) / kChunk : 1;
  const Smem<T> sm = Smem<T>::carve(smem_raw, false, own_chunks);
  const Segment seg = anchor_segment(p);
  Rows<T> own = p.anchors;
  own.hi = seg.hi;
  if (p.resident) load_own(sm, own, seg.row0, p.C);

  ForwardState st;
  st.pos[0] = st.pos[1] = 0.f;
  for (int i = 0; i < 3; ++i) {
    Rows<T> keys;
    int lo, end;
    Keys kind;
    key_source(p, seg, i, keys, lo, end, kind);
    for (int key0 = lo; key0 < end; key0 += kCols) forward_tile(st, sm, p, own, seg.row0, keys, key0, kind);
  }

  const int g = tiles::lane_group();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float pos = tiles::quad_sum(st.pos[h]);
    if (p.negatives == Negatives::kNone) {
      // "none": the positive is a key of its own, counted once here (fmaxf ignores a NaN
      // positive, exp2f(NaN) then carries it into the sum).
      const float new_max = fmaxf(st.online[h].max, pos);
      st.online[h].sum = st.online[h].sum * exp2f(st.online[h].max - new_max) + exp2f(pos - new_max);
      st.online[h].max = new_max;
    }
    const int row = seg.row0 + warp_id() * 16 + g + 8 * h;
    if (tiles::lane_in_group() == 0 && row < seg.hi) {
      const bool valid = own.ok(row);
      const float lse2 = st.online[h].lse2();
      loss[row] = valid ? (lse2 - pos) * kLn2 : 0.f;
      lse2_out[row] = valid ? lse2 : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Anchor backward
// ------------------------------------------------------------------------------------------

template <typename T>
struct AnchorState {
  float out[Tile<T>::out_tiles][4];  // sum_k q_ik k_hat_k, channels [oc, oc + out_chunk)
  float d[2];                        // this lane's share of sum_k q_ik logit2_ik
  float pos[2], pos_weight[2];       // "none" mode: positive logit2 and p_positive - 1 (lane shares)
  float lse2[2];
  bool row_ok[2];
};

template <typename T>
__device__ __forceinline__ void anchor_tile(AnchorState<T>& st, const Smem<T>& sm, const Params<T>& p,
                                            const Rows<T>& own, int row0, const Rows<T>& keys, int key0,
                                            Keys kind, int oc) {
  float s[8][4];
  tile_scores(s, sm, p.resident, own, row0, keys, key0, p.C, [&] {
    if (threadIdx.x < kCols) sm.col_ok[threadIdx.x] = keys.ok(key0 + threadIdx.x) ? 1.f : 0.f;
    if (kind != Keys::kPositiveOnly) load_tile_transposed(sm.streamed_t, keys, key0, oc, p.C);
  });
  const int g = tiles::lane_group(), t = tiles::lane_in_group();
  const int my_row0 = row0 + warp_id() * 16 + g;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1, col = 8 * j + 2 * t + (e & 1);
      const bool ok = st.row_ok[h] && sm.col_ok[col] != 0.f;
      const bool positive = kind != Keys::kPlain && key0 + col == my_row0 + 8 * h;
      const float v = s[j][e] * p.logit_scale;
      const float prob = exp2f(v - st.lse2[h]);
      float q = positive ? prob - 1.f : (kind == Keys::kPositiveOnly ? 0.f : prob);
      q = ok ? q : 0.f;
      // a positives-only tile: the other pixels are no keys of this anchor (q * NaN would be NaN)
      st.d[h] += ok && (kind != Keys::kPositiveOnly || positive) ? q * v : 0.f;
      if (kind == Keys::kPositiveOnly && positive && ok) {
        st.pos[h] += v;
        st.pos_weight[h] += q;
      }
      s[j][e] = q;
    }
  }
  // The epilogue adds a positives-only tile's (p - 1) t_hat_i to row i alone: weights 0 times
  // another pixel's NaN or Inf in an MMA over the tile would reach every anchor of the tile.
  if (kind == Keys::kPositiveOnly) return;
  store_weights(sm.weights, s);
  __syncwarp();
  weights_times_rows(st.out, sm, oc, p.C);
  // the next tile_scores starts with a barrier before anything shared is rewritten
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    anchor_backward_kernel(Params<T> p, const float* lse2, const float* grad, const float* proj_a,
                           const float* proj_t, T* grad_a, T* grad_t) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int own_chunks = p.resident ? (p.C + kChunk - 1) / kChunk : 1;
  const Smem<T> sm = Smem<T>::carve(smem_raw, true, own_chunks);
  const Segment seg = anchor_segment(p);
  const int oc = static_cast<int>(blockIdx.z) * Tile<T>::out_chunk;
  Rows<T> own = p.anchors;
  own.hi = seg.hi;
  if (p.resident) load_own(sm, own, seg.row0, p.C);

  const int g = tiles::lane_group();
  AnchorState<T> st;
  float gi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = seg.row0 + warp_id() * 16 + g + 8 * h;
    st.row_ok[h] = own.ok(row);
    st.lse2[h] = st.row_ok[h] ? lse2[row] : 0.f;
    gi[h] = st.row_ok[h] ? grad[row] : 0.f;
    st.d[h] = st.pos[h] = st.pos_weight[h] = 0.f;
  }
#pragma unroll
  for (int jj = 0; jj < Tile<T>::out_tiles; ++jj) {
#pragma unroll
    for (int e = 0; e < 4; ++e) st.out[jj][e] = 0.f;
  }

  // Without grad_a ("none" mode, teacher gradient only) the positives' tile is all it takes.
  const int n_sources = grad_a != nullptr ? 3 : 1;
  for (int i = 0; i < n_sources; ++i) {
    Rows<T> keys;
    int lo, end;
    Keys kind;
    key_source(p, seg, i, keys, lo, end, kind);
    for (int key0 = lo; key0 < end; key0 += kCols) anchor_tile(st, sm, p, own, seg.row0, keys, key0, kind, oc);
  }

  const bool normalize = own.scale != nullptr;
  const bool none = p.negatives == Negatives::kNone;
  const Rows<T>& teacher = p.teacher;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = seg.row0 + warp_id() * 16 + g + 8 * h;
    const float d = tiles::quad_sum(st.d[h]);
    const float pos = tiles::quad_sum(st.pos[h]);
    const float pos_weight = tiles::quad_sum(st.pos_weight[h]);
    if (row >= seg.hi) continue;  // after the shuffles: every lane takes part in them
    const float coef = gi[h] * p.inv_temperature;
    const float inv_a = own.row_scale(row), inv_t = teacher.row_scale(row);
    const float pa = normalize && grad_a != nullptr ? proj_a[row] : 0.f;
    const float pt = normalize && grad_t != nullptr ? proj_t[row] : 0.f;
    const std::int64_t base = static_cast<std::int64_t>(row) * p.C;
    for_each_output(st.out, h, oc, p.C, [&](float acc, int col) {
      const float a_raw = own.raw(row, col);
      const float t_raw = none ? teacher.raw(row, col) : 0.f;
      if (grad_a != nullptr) {
        // "none" mode: the positive's share (p - 1) t_hat_i, left out of the tile MMAs
        float x = coef * (acc + (none ? pos_weight * inv_t * t_raw : 0.f));
        if (normalize) x = inv_a * x - pa * (gi[h] * d * kLn2) * a_raw;
        grad_a[base + col] = from_float<T>(st.row_ok[h] ? x : 0.f);
      }
      if (grad_t != nullptr) {  // "none" mode: the teacher pixel is its anchor's key alone
        float y = coef * pos_weight * inv_a * a_raw;
        if (normalize) y = inv_t * y - pt * (gi[h] * pos_weight * pos * kLn2) * t_raw;
        grad_t[base + col] = from_float<T>(st.row_ok[h] ? y : 0.f);
      }
    });
  }
}

// ------------------------------------------------------------------------------------------
// Key backward
// ------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    key_backward_kernel(Params<T> p, bool keys_are_teacher, const float* lse2, const float* grad_scaled,
                        const float* grad_max, const float* proj_k, T* grad_k) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int own_chunks = p.resident ? (p.C + kChunk - 1) / kChunk : 1;
  const Smem<T> sm = Smem<T>::carve(smem_raw, true, own_chunks);
  const int oc = static_cast<int>(blockIdx.z) * Tile<T>::out_chunk;

  // The block's keys and the anchors that see them.
  Rows<T> keys = keys_are_teacher ? p.teacher : p.queue;
  Rows<T> anchors = p.anchors;
  int key_lo = 0, a_lo = 0;
  if (keys_are_teacher && p.negatives == Negatives::kImage) {  // the pixels of image blockIdx.y and its anchors
    key_lo = a_lo = static_cast<int>(blockIdx.y) * p.hw;
    keys.hi = anchors.hi = key_lo + p.hw;
  }
  const int key0 = key_lo + static_cast<int>(blockIdx.x) * kRows;
  if (p.resident) load_own(sm, keys, key0, p.C);

  const int g = tiles::lane_group(), t = tiles::lane_in_group();
  const int my_key0 = key0 + warp_id() * 16 + g;
  float out[Tile<T>::out_tiles][4];
#pragma unroll
  for (int jj = 0; jj < Tile<T>::out_tiles; ++jj) {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[jj][e] = 0.f;
  }
  float e_sum[2] = {0.f, 0.f};  // this lane's share of sum_i (g_i / g_max) q_ik logit2_ik

  for (int a0 = a_lo; a0 < anchors.hi; a0 += kCols) {
    float s[8][4];
    tile_scores(s, sm, p.resident, keys, key0, anchors, a0, p.C, [&] {
      if (threadIdx.x < kCols) {
        const int row = a0 + threadIdx.x;
        const bool ok = anchors.ok(row);
        sm.col_ok[threadIdx.x] = ok ? 1.f : 0.f;
        sm.col_a[threadIdx.x] = ok ? lse2[row] : 0.f;
        sm.col_b[threadIdx.x] = ok ? grad_scaled[row] : 0.f;
      }
      load_tile_transposed(sm.streamed_t, anchors, a0, oc, p.C);
    });
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, col = 8 * j + 2 * t + (e & 1);
        const bool ok = sm.col_ok[col] != 0.f;
        const float v = s[j][e] * p.logit_scale;
        const float prob = exp2f(v - sm.col_a[col]);
        const bool positive = keys_are_teacher && a0 + col == my_key0 + 8 * h;
        const float w = ok ? sm.col_b[col] * (positive ? prob - 1.f : prob) : 0.f;
        e_sum[h] += ok ? w * v : 0.f;
        s[j][e] = w;
      }
    }
    store_weights(sm.weights, s);
    __syncwarp();
    weights_times_rows(out, sm, oc, p.C);
  }

  const bool normalize = keys.scale != nullptr;
  const float g_max = *grad_max;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float e_k = tiles::quad_sum(e_sum[h]);
    const int key = my_key0 + 8 * h;
    if (key >= keys.hi) continue;
    const bool key_ok = keys.ok(key);
    const float inv_k = keys.row_scale(key);
    const float pk = normalize ? proj_k[key] : 0.f;
    const std::int64_t base = static_cast<std::int64_t>(key) * p.C;
    for_each_output(out, h, oc, p.C, [&](float acc, int col) {
      float x = acc * (g_max * p.inv_temperature);
      if (normalize) x = inv_k * x - pk * (e_k * g_max * kLn2) * keys.raw(key, col);
      grad_k[base + col] = from_float<T>(key_ok ? x : 0.f);
    });
  }
}

// ------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------

int ceil_div(std::int64_t a, std::int64_t b) { return static_cast<int>((a + b - 1) / b); }

bool is_known(Negatives negatives) {
  return negatives == Negatives::kNone || negatives == Negatives::kImage || negatives == Negatives::kBatch;
}

void check_params(const PixelContrastiveParams& in) {
  if (!is_known(in.negatives)) {
    invalid_argument("pixel_contrastive: negatives code must be 0 (none), 1 (image) or 2 (batch), got " +
                     std::to_string(static_cast<int>(in.negatives)));
  }
  const std::int64_t limit = (std::int64_t{1} << 31) - kRows * 2;
  if (in.n_rows > limit || in.n_queue > limit || in.n_extra > limit || in.channels > limit) {
    invalid_argument("pixel_contrastive CUDA kernels take fewer than 2^31 rows and channels");
  }
  if (in.channels < 1 || in.n_rows < 1) {
    invalid_argument("pixel_contrastive CUDA launchers need n_rows >= 1 and C >= 1");
  }
  if (in.channels > std::int64_t{65535} * 64) {  // grid z counts gradient slices of 64 or 128 channels
    invalid_argument("pixel_contrastive CUDA kernels take at most 4194240 channels");
  }
  if (in.negatives == Negatives::kImage) {
    if (in.hw < 1 || in.n_rows % in.hw != 0) {
      invalid_argument("pixel_contrastive: n_rows must be a multiple of hw >= 1 in 'image' mode");
    }
    if (in.n_rows / in.hw > 65535) invalid_argument("pixel_contrastive CUDA kernels take at most 65535 images");
  }
}

// Shared memory a block needs, with its own rows resident when that fits the budget.
template <typename T>
std::size_t plan_smem(const PixelContrastiveParams& in, bool backward, bool* resident) {
  check_cuda(cudaSetDevice(in.device), "cudaSetDevice");
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, in.device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  const int chunks = ceil_div(in.channels, kChunk);
  const std::size_t all = Smem<T>::bytes(backward, chunks);
  *resident = all <= std::min<std::size_t>(kResidentBudget, static_cast<std::size_t>(optin));
  const std::size_t bytes = *resident ? all : Smem<T>::bytes(backward, 1);
  if (bytes > static_cast<std::size_t>(optin)) {
    invalid_argument("pixel_contrastive kernels need " + std::to_string(bytes) +
                     " bytes of shared memory per block, the device allows " + std::to_string(optin));
  }
  return bytes;
}

// What the kernels read of the launch parameters, and the shared memory a block needs.
template <typename T>
struct Plan {
  Params<T> params;
  std::size_t smem;
};

template <typename T>
Plan<T> make_plan(const PixelContrastiveParams& in, bool backward) {
  auto rows = [](std::uintptr_t p, std::int64_t sr, std::int64_t sc, std::int64_t n, std::uintptr_t scale,
                 std::uintptr_t valid) {
    return Rows<T>{device_ptr<const T>(p), sr, sc, static_cast<int>(n), device_ptr<const float>(scale),
                   device_ptr<const std::uint8_t>(valid)};
  };
  Plan<T> plan;
  Params<T>& p = plan.params;
  plan.smem = plan_smem<T>(in, backward, &p.resident);
  const std::int64_t C = in.channels;
  const bool batch = in.negatives == Negatives::kBatch;
  p.anchors = rows(in.anchors, C, 1, in.n_rows, in.inv_anchors, in.valid);
  p.teacher = rows(in.teacher, C, 1, in.n_rows, in.inv_teacher, in.valid);
  p.extra = rows(in.extra, in.extra_stride_row, in.extra_stride_col, batch ? in.n_extra : 0, in.inv_extra,
                 in.valid_extra);
  p.queue = rows(in.queue, in.queue_stride_row, in.queue_stride_col, in.n_queue, in.inv_queue, 0);
  p.negatives = in.negatives;
  p.n_rows = static_cast<int>(in.n_rows);
  p.hw = static_cast<int>(in.hw);
  p.C = static_cast<int>(C);
  p.logit_scale = in.logit_scale;
  p.inv_temperature = in.inv_temperature;
  return plan;
}

// Blocks of kRows rows over `rows` rows, or over each image's pixels when by_image, times z.
dim3 row_grid(const PixelContrastiveParams& in, std::int64_t rows, bool by_image, int z) {
  if (by_image) return dim3(ceil_div(in.hw, kRows), static_cast<int>(in.n_rows / in.hw), z);
  return dim3(ceil_div(rows, kRows), 1, z);
}

// Gradient slices of a backward block (grid z).
template <typename T>
int out_slices(const PixelContrastiveParams& in) {
  return ceil_div(in.channels, Tile<T>::out_chunk);
}

}  // namespace

void pixel_contrastive_forward(const PixelContrastiveParams& in) {
  check_params(in);
  by_dtype(in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Plan<T> run = make_plan<T>(in, false);
    launch(forward_kernel<T>, row_grid(in, in.n_rows, in.negatives == Negatives::kImage, 1), kThreads, run.smem,
           in.stream, "pixel_contrastive forward_kernel", run.params, device_ptr<float>(in.loss),
           device_ptr<float>(in.lse2));
  });
}

void pixel_contrastive_backward_anchors(const PixelContrastiveParams& in) {
  check_params(in);
  if (in.grad_teacher != 0 && in.negatives != Negatives::kNone) {
    invalid_argument("pixel_contrastive anchor backward writes the teacher gradient in negatives='none' mode only");
  }
  if (in.grad_anchors == 0 && in.grad_teacher == 0) return;
  by_dtype(in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Plan<T> run = make_plan<T>(in, true);
    launch(anchor_backward_kernel<T>, row_grid(in, in.n_rows, in.negatives == Negatives::kImage, out_slices<T>(in)),
           kThreads, run.smem, in.stream, "pixel_contrastive anchor_backward_kernel", run.params,
           device_ptr<const float>(in.lse2), device_ptr<const float>(in.grad), device_ptr<const float>(in.proj_anchors),
           device_ptr<const float>(in.proj_teacher), device_ptr<T>(in.grad_anchors), device_ptr<T>(in.grad_teacher));
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
  by_dtype(in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Plan<T> run = make_plan<T>(in, true);
    launch(key_backward_kernel<T>, row_grid(in, keys, by_image, out_slices<T>(in)), kThreads, run.smem, in.stream,
           "pixel_contrastive key_backward_kernel", run.params, in.keys_are_teacher, device_ptr<const float>(in.lse2),
           device_ptr<const float>(in.grad_scaled), device_ptr<const float>(in.grad_max),
           device_ptr<const float>(in.proj_keys), device_ptr<T>(in.grad_keys));
  });
}

}  // namespace pcd_kernels
