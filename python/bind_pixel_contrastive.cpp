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
  def_launcher(m, "pixel_contrastive_forward", &pcd_kernels::pixel_contrastive_forward,
               "Per-anchor loss and base-2 lse (float32, 0 at masked anchors) of pixel_contrastive_loss.");
  def_launcher(m, "pixel_contrastive_backward_anchors", &pcd_kernels::pixel_contrastive_backward_anchors,
               "Student gradient (and the teacher's in negatives='none' mode) of pixel_contrastive_loss.");
  def_launcher(m, "pixel_contrastive_backward_keys", &pcd_kernels::pixel_contrastive_backward_keys,
               "Gradient of the teacher keys ('image'/'batch') or of the queue rows of pixel_contrastive_loss.");
}
