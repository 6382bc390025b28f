// pybind11 bindings for csrc/: pcd_kernels._C.
//
// The module takes plain integers (device pointers, sizes, strides, the cudaStream_t from
// torch.cuda.current_stream().cuda_stream) and never includes libtorch, so one build works with
// any torch version. std::runtime_error from csrc/ reaches Python as RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "pcd_kernels/probe.h"

namespace py = pybind11;

// Each op binds its launchers in python/bind_<op>.cpp.
void bind_pixel_contrastive(py::module_& m);
void bind_pixel_attention(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "pcd_kernels CUDA extension (kernels in csrc/, bindings in python/)";
  m.def("cuda_runtime_version", &pcd_kernels::cuda_runtime_version,
        "CUDA runtime version the extension was compiled against (e.g. 13000).");
  m.def("device_count", &pcd_kernels::device_count,
        "Number of CUDA devices visible to the extension's runtime.");
  m.def("probe", &pcd_kernels::probe, py::arg("device"), py::arg("stream"), py::arg("value"),
        "Launch a one-thread kernel on `stream` of `device` that returns value + 1; raises "
        "RuntimeError naming the failing step.",
        py::call_guard<py::gil_scoped_release>());
  bind_pixel_contrastive(m);
  bind_pixel_attention(m);
#ifdef PCD_KERNELS_CUDA_ARCHS
  m.attr("cuda_architectures") = PCD_KERNELS_CUDA_ARCHS;
#endif
}
