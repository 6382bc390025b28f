// Bindings of the pixel_contrastive launchers (csrc/pixel_contrastive.cu): the Negatives enum,
// the PixelContrastiveParams struct (fields as in pcd_kernels/pixel_contrastive.h) and one
// launcher per kernel taking it.
#include "bind_params.h"
#include "pcd_kernels/pixel_contrastive.h"

using namespace pcd_kernels_bindings;

void bind_pixel_contrastive(py::module_& m) {
  auto e = bind_enum<pcd_kernels::Negatives>(m, "Negatives");
  PCD_KERNELS_NEGATIVES(PCD_BIND_ENUMERATOR)
  auto cls = bind_struct<pcd_kernels::PixelContrastiveParams>(
      m, "PixelContrastiveParams",
      "What the pixel_contrastive launchers read: device pointers (0 = absent), sizes, strides in elements.");
  PCD_KERNELS_PIXEL_CONTRASTIVE_PARAMS(PCD_BIND_FIELD)
  PCD_BIND_LAUNCHER(pixel_contrastive_forward, "Per-anchor loss and lse2 (float32, 0 at masked anchors).")
  PCD_BIND_LAUNCHER(pixel_contrastive_backward_anchors, "The student gradient, and the teacher's in 'none' mode.")
  PCD_BIND_LAUNCHER(pixel_contrastive_backward_keys, "The gradient of the teacher keys or of the queue rows.")
}
