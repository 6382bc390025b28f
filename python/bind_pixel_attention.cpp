// Bindings of the pixel_attention launchers (csrc/pixel_attention.cu).
//
// A map is passed as a tuple (device pointer, batch stride, channel stride, position stride) and the
// sizes as (batch, heads, head_dim, LQ, LK); pybind11 converts both to C++ values before the GIL is
// released. std::invalid_argument reaches Python as ValueError, std::runtime_error as RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <tuple>

#include "pcd_kernels/pixel_attention.h"

namespace py = pybind11;

namespace {

using MapTuple = std::tuple<std::uintptr_t, std::int64_t, std::int64_t, std::int64_t>;
using ShapeTuple = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t>;

pcd_kernels::AttentionMap to_map(const MapTuple& m) {
  pcd_kernels::AttentionMap map;
  std::tie(map.data, map.stride_b, map.stride_c, map.stride_l) = m;
  return map;
}

pcd_kernels::AttentionShape to_shape(const ShapeTuple& s) {
  pcd_kernels::AttentionShape shape;
  std::tie(shape.batch, shape.heads, shape.head_dim, shape.lq, shape.lk) = s;
  return shape;
}

}  // namespace

void bind_pixel_attention(py::module_& m) {
  m.attr("pixel_attention_max_head_dim") = pcd_kernels::kAttentionMaxHeadDim;
  m.attr("pixel_attention_tile") = pcd_kernels::kAttentionTile;
  m.attr("pixel_attention_max_blocks") = pcd_kernels::kAttentionMaxBlocks;
  m.def(
      "pixel_attention_forward",
      [](const MapTuple& q, const MapTuple& k, const MapTuple& v, const MapTuple& out, std::uintptr_t lse,
         const ShapeTuple& shape, double scale, int dtype, int device, std::uintptr_t stream) {
        pcd_kernels::pixel_attention_forward(to_map(q), to_map(k), to_map(v), to_map(out), lse, to_shape(shape),
                                             scale, dtype, device, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("shape"), py::arg("scale"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "Attention output (B, heads*d, LQ) and base-2 lse (B*heads, LQ) float32; maps are (ptr, stride_b, "
      "stride_c, stride_l), shape is (batch, heads, head_dim, LQ, LK).",
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "pixel_attention_backward_delta",
      [](const MapTuple& out, const MapTuple& grad_out, std::uintptr_t delta, const ShapeTuple& shape, int dtype,
         int device, std::uintptr_t stream) {
        pcd_kernels::pixel_attention_backward_delta(to_map(out), to_map(grad_out), delta, to_shape(shape), dtype,
                                                    device, stream);
      },
      py::arg("out"), py::arg("grad_out"), py::arg("delta"), py::arg("shape"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"), "delta (B*heads, LQ) float32 = rowsum(grad_out * out).",
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "pixel_attention_backward_kv",
      [](const MapTuple& q, const MapTuple& k, const MapTuple& v, const MapTuple& grad_out, std::uintptr_t lse,
         std::uintptr_t delta, const MapTuple& grad_k, const MapTuple& grad_v, const ShapeTuple& shape, double scale,
         int dtype, int device, std::uintptr_t stream) {
        pcd_kernels::pixel_attention_backward_kv(to_map(q), to_map(k), to_map(v), to_map(grad_out), lse, delta,
                                                 to_map(grad_k), to_map(grad_v), to_shape(shape), scale, dtype, device,
                                                 stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("grad_out"), py::arg("lse"), py::arg("delta"),
      py::arg("grad_k"), py::arg("grad_v"), py::arg("shape"), py::arg("scale"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"), "grad_k and grad_v written through their strides.",
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "pixel_attention_backward_q",
      [](const MapTuple& q, const MapTuple& k, const MapTuple& v, const MapTuple& grad_out, std::uintptr_t lse,
         std::uintptr_t delta, const MapTuple& grad_q, const ShapeTuple& shape, double scale, int dtype, int device,
         std::uintptr_t stream) {
        pcd_kernels::pixel_attention_backward_q(to_map(q), to_map(k), to_map(v), to_map(grad_out), lse, delta,
                                                to_map(grad_q), to_shape(shape), scale, dtype, device, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("grad_out"), py::arg("lse"), py::arg("delta"),
      py::arg("grad_q"), py::arg("shape"), py::arg("scale"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "grad_q written through its strides.", py::call_guard<py::gil_scoped_release>());
}
