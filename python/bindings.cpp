// pybind11 bindings for csrc/: pcd_kernels._C.
//
// Each op's launchers take its parameter struct, whose fields are plain integers (device pointers,
// sizes, strides, the cudaStream_t from torch.cuda.current_stream().cuda_stream) and floats; the
// module never includes libtorch, so one build works with any torch version.
// std::invalid_argument from csrc/ reaches Python as ValueError, std::runtime_error as RuntimeError.
#include <pybind11/pybind11.h>

#include "bind_params.h"
#include "pcd_kernels/params.h"
#include "pcd_kernels/probe.h"

using namespace pcd_kernels_bindings;

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
  auto e = bind_enum<pcd_kernels::DType>(m, "DType");
  PCD_KERNELS_DTYPES(PCD_BIND_ENUMERATOR)
  bind_pixel_contrastive(m);
  bind_pixel_attention(m);
#ifdef PCD_KERNELS_CUDA_ARCHS
  m.attr("cuda_architectures") = PCD_KERNELS_CUDA_ARCHS;
#endif
}
