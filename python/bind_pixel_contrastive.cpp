// Bindings of the pixel_contrastive launchers (csrc/pixel_contrastive.cu).
//
// Every function takes plain integers: device pointers (0 = absent), sizes, strides in elements,
// the dtype code of pcd_kernels.backends.cuda._extension.DTYPE_CODES and the cudaStream_t as an integer. The GIL is
// released while the launcher runs; std::runtime_error reaches Python as RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "pcd_kernels/pixel_contrastive.h"

namespace py = pybind11;

namespace {

using pcd_kernels::PixelContrastiveInputs;
using Ptr = std::uintptr_t;

PixelContrastiveInputs inputs(int device, Ptr stream, int dtype, int mode, std::int64_t n_rows, std::int64_t hw,
                              std::int64_t channels, Ptr anchors, Ptr pixels, Ptr extra, std::int64_t n_extra,
                              std::int64_t extra_stride_row, std::int64_t extra_stride_col, Ptr queue,
                              std::int64_t n_queue, std::int64_t queue_stride_row, std::int64_t queue_stride_col,
                              Ptr inv_anchors, Ptr inv_pixels, Ptr inv_extra, Ptr inv_queue, Ptr valid,
                              Ptr valid_extra, double logit_scale, double inv_temperature) {
  PixelContrastiveInputs in;
  in.device = device;
  in.stream = stream;
  in.dtype = dtype;
  in.mode = mode;
  in.n_rows = n_rows;
  in.hw = hw;
  in.channels = channels;
  in.anchors = anchors;
  in.pixels = pixels;
  in.extra = extra;
  in.n_extra = n_extra;
  in.extra_stride_row = extra_stride_row;
  in.extra_stride_col = extra_stride_col;
  in.queue = queue;
  in.n_queue = n_queue;
  in.queue_stride_row = queue_stride_row;
  in.queue_stride_col = queue_stride_col;
  in.inv_anchors = inv_anchors;
  in.inv_pixels = inv_pixels;
  in.inv_extra = inv_extra;
  in.inv_queue = inv_queue;
  in.valid = valid;
  in.valid_extra = valid_extra;
  in.logit_scale = static_cast<float>(logit_scale);
  in.inv_temperature = static_cast<float>(inv_temperature);
  return in;
}

// The argument names every launcher starts with, in the order of inputs() above.
#define PCD_INPUT_ARGS                                                                                          \
  py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("mode"), py::arg("n_rows"), py::arg("hw"),   \
      py::arg("channels"), py::arg("anchors"), py::arg("pixels"), py::arg("extra"), py::arg("n_extra"),        \
      py::arg("extra_stride_row"), py::arg("extra_stride_col"), py::arg("queue"), py::arg("n_queue"),          \
      py::arg("queue_stride_row"), py::arg("queue_stride_col"), py::arg("inv_anchors"), py::arg("inv_pixels"), \
      py::arg("inv_extra"), py::arg("inv_queue"), py::arg("valid"), py::arg("valid_extra"),                    \
      py::arg("logit_scale"), py::arg("inv_temperature")

#define PCD_INPUT_PARAMS                                                                                      \
  int device, Ptr stream, int dtype, int mode, std::int64_t n_rows, std::int64_t hw, std::int64_t channels,   \
      Ptr anchors, Ptr pixels, Ptr extra, std::int64_t n_extra, std::int64_t extra_stride_row,                \
      std::int64_t extra_stride_col, Ptr queue, std::int64_t n_queue, std::int64_t queue_stride_row,          \
      std::int64_t queue_stride_col, Ptr inv_anchors, Ptr inv_pixels, Ptr inv_extra, Ptr inv_queue, Ptr valid, \
      Ptr valid_extra, double logit_scale, double inv_temperature

#define PCD_INPUT_VALUES                                                                                      \
  inputs(device, stream, dtype, mode, n_rows, hw, channels, anchors, pixels, extra, n_extra, extra_stride_row, \
         extra_stride_col, queue, n_queue, queue_stride_row, queue_stride_col, inv_anchors, inv_pixels,        \
         inv_extra, inv_queue, valid, valid_extra, logit_scale, inv_temperature)

void forward(PCD_INPUT_PARAMS, Ptr loss, Ptr lse2) {
  pcd_kernels::pixel_contrastive_forward(PCD_INPUT_VALUES, loss, lse2);
}

void backward_anchors(PCD_INPUT_PARAMS, Ptr lse2, Ptr grad, Ptr proj_anchors, Ptr proj_pixels, Ptr grad_anchors,
                      Ptr grad_pixels) {
  pcd_kernels::pixel_contrastive_backward_anchors(PCD_INPUT_VALUES, lse2, grad, proj_anchors, proj_pixels,
                                                  grad_anchors, grad_pixels);
}

void backward_keys(PCD_INPUT_PARAMS, bool keys_are_pixels, Ptr lse2, Ptr grad_scaled, Ptr grad_max, Ptr proj_keys,
                   Ptr grad_keys) {
  pcd_kernels::pixel_contrastive_backward_keys(PCD_INPUT_VALUES, keys_are_pixels, lse2, grad_scaled, grad_max,
                                               proj_keys, grad_keys);
}

}  // namespace

void bind_pixel_contrastive(py::module_& m) {
  m.def("pixel_contrastive_forward", &forward, PCD_INPUT_ARGS, py::arg("loss"), py::arg("lse2"),
        "Per-anchor loss and base-2 lse (float32, 0 at masked anchors) of pixel_contrastive_loss.",
        py::call_guard<py::gil_scoped_release>());
  m.def("pixel_contrastive_backward_anchors", &backward_anchors, PCD_INPUT_ARGS, py::arg("lse2"), py::arg("grad"),
        py::arg("proj_anchors"), py::arg("proj_pixels"), py::arg("grad_anchors"), py::arg("grad_pixels"),
        "Student gradient (and the teacher's in negatives='none' mode) of pixel_contrastive_loss.",
        py::call_guard<py::gil_scoped_release>());
  m.def("pixel_contrastive_backward_keys", &backward_keys, PCD_INPUT_ARGS, py::arg("keys_are_pixels"),
        py::arg("lse2"), py::arg("grad_scaled"), py::arg("grad_max"), py::arg("proj_keys"), py::arg("grad_keys"),
        "Gradient of the teacher-pixel keys ('image'/'batch') or of the queue rows of pixel_contrastive_loss.",
        py::call_guard<py::gil_scoped_release>());
}
