// C++ launch API of the pixel_contrastive_loss kernels (csrc/pixel_contrastive.cu, DESIGN.md 3.1).
//
// Plain integers only: device pointers and the cudaStream_t travel as std::uintptr_t, so neither
// this header nor its callers (python/bind_pixel_contrastive.cpp) need CUDA, Python or libtorch.
// Every launcher throws std::runtime_error naming the kernel when CUDA reports an error.
//
// Notation: anchors are student pixels, pixel keys teacher pixels, both as contiguous
// (n_rows, C) matrices in (b, h, w) order; extra keys are other ranks' teacher pixels
// (negatives="batch" only, no gradient); queue rows are read through both of their strides.
// Logits are base 2: logit2_ik = a_hat_i . k_hat_k * logit_scale with
// logit_scale = log2(e) / temperature.
#pragma once

#include <cstdint>

namespace pcd_kernels {

// What every pixel_contrastive kernel reads. A pointer of 0 means "absent".
struct PixelContrastiveInputs {
  int device = 0;         // CUDA device ordinal the pointers live on
  std::uintptr_t stream = 0;  // cudaStream_t
  int dtype = 0;          // element type of anchors, pixels, extra, queue and the gradients:
                          // 0 float32 (3xTF32 tensor cores), 1 float16, 2 bfloat16
  int mode = 0;           // negatives: 0 "none", 1 "image", 2 "batch"
  std::int64_t n_rows = 0;    // B * H * W
  std::int64_t hw = 0;        // H * W (the image length, "image" mode)
  std::int64_t channels = 0;  // C
  std::uintptr_t anchors = 0;  // (n_rows, C) contiguous
  std::uintptr_t pixels = 0;   // (n_rows, C) contiguous
  std::uintptr_t extra = 0;    // (n_extra, C), strides below; used in "batch" mode only
  std::int64_t n_extra = 0, extra_stride_row = 0, extra_stride_col = 0;
  std::uintptr_t queue = 0;    // (n_queue, C), any strides
  std::int64_t n_queue = 0, queue_stride_row = 0, queue_stride_col = 0;
  // float32 inverse norms 1 / max(||x||, eps) per row; all 0 (absent) when normalize=False.
  std::uintptr_t inv_anchors = 0, inv_pixels = 0, inv_extra = 0, inv_queue = 0;
  std::uintptr_t valid = 0;        // uint8 per pixel (n_rows), nonzero = valid; 0 = no mask
  std::uintptr_t valid_extra = 0;  // uint8 per extra key; 0 = all valid
  float logit_scale = 0.f;         // log2(e) / temperature
  float inv_temperature = 0.f;     // 1 / temperature
};

// Per-anchor loss (natural log) and base-2 lse, float32 (n_rows), 0 at masked anchors.
void pixel_contrastive_forward(const PixelContrastiveInputs& in, std::uintptr_t loss, std::uintptr_t lse2);

// The anchor side of the backward, grad = d(sum g * loss) with g float32 (n_rows), 0 at masked
// anchors. Writes grad_anchors (n_rows, C) contiguous in the element type when nonzero, and in
// "none" mode grad_pixels (the teacher gradient: it involves only each anchor's positive) when
// nonzero. proj_* are float32 per row: inv^2 where ||x|| >= eps, else 0 (only read when
// normalising).
void pixel_contrastive_backward_anchors(const PixelContrastiveInputs& in, std::uintptr_t lse2,
                                        std::uintptr_t grad, std::uintptr_t proj_anchors,
                                        std::uintptr_t proj_pixels, std::uintptr_t grad_anchors,
                                        std::uintptr_t grad_pixels);

// The key side: gradient of the teacher pixels ("image"/"batch" modes, keys_are_pixels) or of
// the queue rows into a contiguous (rows, C) buffer in the element type. grad_scaled = g / g_max
// (float32, n_rows, 0 at masked anchors), g_max a float32 device scalar; proj_keys as above.
void pixel_contrastive_backward_keys(const PixelContrastiveInputs& in, bool keys_are_pixels,
                                     std::uintptr_t lse2, std::uintptr_t grad_scaled,
                                     std::uintptr_t grad_max, std::uintptr_t proj_keys,
                                     std::uintptr_t grad_keys);

}  // namespace pcd_kernels
