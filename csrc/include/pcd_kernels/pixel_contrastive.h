// C++ launch API of the pixel_contrastive_loss kernels (csrc/pixel_contrastive.cu, DESIGN.md 3.1).
//
// Plain integers only: device pointers and the cudaStream_t travel as std::uintptr_t, so neither
// this header nor its callers (python/bind_pixel_contrastive.cpp) need CUDA, Python or libtorch.
// Arguments the kernels cannot take throw std::invalid_argument, CUDA errors std::runtime_error,
// both naming the kernel.
//
// Notation: anchors are student pixels, teacher rows the teacher's pixels, both (n_rows) rows in
// (b, h, w) order, given as prepared operands (below); extra keys are other ranks' teacher pixels
// (negatives="batch" only, no gradient), queue rows a memory bank of teacher pixels. The kernels
// run in float16 and bfloat16 (float32 inputs go to the Triton or torch backends).
// Logits are base 2: logit2_ik = a_hat_i . k_hat_k * logit_scale with
// logit_scale = log2(e) / temperature; lse2 is a base-2 logsumexp (pcd_kernels/_conventions.py).
#pragma once

#include <cstdint>

#include "pcd_kernels/params.h"

// The keys of an anchor besides the queue rows, numbered as pcd_kernels._conventions.NEGATIVES_MODES.
#define PCD_KERNELS_NEGATIVES(X) \
  X(kNone, none, 0)   /* its own teacher pixel (the positive) only */ \
  X(kImage, image, 1) /* the teacher pixels of its image */           \
  X(kBatch, batch, 2) /* the teacher pixels of the batch, and the extra keys */

// What the launchers read, grouped by the launchers that read them. n_* are row counts, strides
// count elements, float32 per-row arrays have one entry per row of their matrix.
#define PCD_KERNELS_PIXEL_CONTRASTIVE_PARAMS(X)                                                     \
  PCD_KERNELS_LAUNCH_PARAMS(X) /* dtype: of anchors, teacher, extra, queue and the gradients */     \
  X(::pcd_kernels::Negatives, negatives)                                                            \
  X(std::int64_t, n_rows)   /* B * H * W */                                                         \
  X(std::int64_t, hw)       /* H * W, the image length ("image" mode) */                            \
  X(std::int64_t, channels) /* C */                                                                 \
  /* The operands: contiguous rows of row_stride elements, x * inv rounded to dtype when      */ \
  /* normalising, masked rows 0, channels past C 0 (pcd_kernels/backends/cuda/pixel_contrastive.py) */ \
  X(std::int64_t, row_stride) /* C rounded up to a multiple of 8: 16-byte aligned rows */       \
  X(std::uintptr_t, anchors)  /* (n_rows, row_stride) */                                        \
  X(std::uintptr_t, teacher)  /* (n_rows, row_stride) */                                        \
  X(std::uintptr_t, extra)    /* (n_extra, row_stride); read in "batch" mode only */            \
  X(std::int64_t, n_extra)                                                                      \
  X(std::uintptr_t, queue) /* (n_queue, row_stride) */                                          \
  X(std::int64_t, n_queue)                                                                      \
  /* float32 1 / max(||x||, eps) per row, read by the epilogues; absent when normalize=False */ \
  X(std::uintptr_t, inv_anchors)                                                                \
  X(std::uintptr_t, inv_teacher)                                                                \
  X(std::uintptr_t, inv_queue)                                                                  \
  X(std::uintptr_t, valid)       /* uint8 per pixel, nonzero = valid; absent: all valid */          \
  X(std::uintptr_t, valid_extra) /* uint8 per extra key; absent: all valid */                       \
  X(float, logit_scale)          /* log2(e) / temperature */                                        \
  X(float, inv_temperature)      /* 1 / temperature */                                              \
  /* float32 (n_rows), 0 at masked anchors: the forward writes them, the backward reads lse2 */     \
  X(std::uintptr_t, loss) /* natural log */                                                         \
  X(std::uintptr_t, lse2)                                                                           \
  /* anchor backward */                                                                             \
  X(std::uintptr_t, grad) /* float32 g = d(result) / d(loss) (n_rows), 0 at masked anchors */       \
  X(std::uintptr_t, proj_anchors) /* float32 inv where ||x|| >= eps, else 0 (normalising only) */ \
  X(std::uintptr_t, proj_teacher) /* likewise */                                                   \
  X(std::uintptr_t, grad_anchors) /* (n_rows, C) contiguous; absent: not written */                 \
  X(std::uintptr_t, grad_teacher) /* "none" mode only; absent: not written */                       \
  /* key backward */                                                                                \
  X(bool, keys_are_teacher)   /* the keys are the teacher rows ("image"/"batch"), else the queue */ \
  X(std::uintptr_t, grad_scaled) /* float32 g / g_max (n_rows), 0 at masked anchors */              \
  X(std::uintptr_t, grad_max)    /* float32 device scalar g_max */                                  \
  X(std::uintptr_t, proj_keys)                                                                      \
  X(std::uintptr_t, grad_keys) /* (rows, C) contiguous */

namespace pcd_kernels {

enum class Negatives : int { PCD_KERNELS_NEGATIVES(PCD_KERNELS_ENUMERATOR) };

struct PixelContrastiveParams {
  PCD_KERNELS_PIXEL_CONTRASTIVE_PARAMS(PCD_KERNELS_FIELD)
};

// Per-anchor loss and lse2.
void pixel_contrastive_forward(const PixelContrastiveParams& params);

// The anchor side of the backward, grad_* = d(sum g * loss): the student gradient and, in "none"
// mode, the teacher's (it involves only each anchor's positive).
void pixel_contrastive_backward_anchors(const PixelContrastiveParams& params);

// The key side: the gradient of the teacher rows ("image"/"batch" modes) or of the queue rows.
// Key-side weights are g / g_max (half precision's range holds them when a mean makes every g
// about 1 / anchors); the result is multiplied by g_max at the end.
void pixel_contrastive_backward_keys(const PixelContrastiveParams& params);

}  // namespace pcd_kernels
