// Bindings of the pixel_attention launchers (csrc/pixel_attention.cu): the AttentionMap,
// AttentionRows and PixelAttentionParams structs (fields as in pcd_kernels/pixel_attention.h), the kernels' limits
// and one launcher per kernel taking the params.
#include "bind_params.h"
#include "pcd_kernels/pixel_attention.h"

using namespace pcd_kernels_bindings;

void bind_pixel_attention(py::module_& m) {
  m.attr("pixel_attention_max_head_dim") = pcd_kernels::kAttentionMaxHeadDim;
  m.attr("pixel_attention_tile") = pcd_kernels::kAttentionTile;
  m.attr("pixel_attention_max_blocks") = pcd_kernels::kAttentionMaxBlocks;
  {
    auto cls = bind_struct<pcd_kernels::AttentionMap>(m, "AttentionMap",
                                                       "A (B, C, L) map: device pointer and strides in elements.");
    PCD_KERNELS_ATTENTION_MAP(PCD_BIND_FIELD)
  }
  {
    auto cls = bind_struct<pcd_kernels::AttentionRows>(
        m, "AttentionRows",
        "An operand as rows: device pointer (16-byte aligned) and (batch, head, position) strides in elements, "
        "multiples of 8.");
    PCD_KERNELS_ATTENTION_ROWS(PCD_BIND_FIELD)
  }
  auto cls = bind_struct<pcd_kernels::PixelAttentionParams>(
      m, "PixelAttentionParams", "What the pixel_attention launchers read; maps a kernel does not use may be absent.");
  PCD_KERNELS_PIXEL_ATTENTION_PARAMS(PCD_BIND_FIELD)
  PCD_BIND_LAUNCHER(pixel_attention_forward, "Attention output (B, heads*d, LQ) and lse2 (B*heads, LQ) float32.")
  PCD_BIND_LAUNCHER(pixel_attention_backward_delta, "delta (B*heads, LQ) float32 = rowsum(grad_out * out).")
  PCD_BIND_LAUNCHER(pixel_attention_backward_kv, "grad_k and grad_v, written through their strides.")
  PCD_BIND_LAUNCHER(pixel_attention_backward_q, "grad_q, written through its strides.")
}
