// Error handling shared by every kernel launcher in csrc/.
//
// Launchers throw std::runtime_error carrying the kernel (or API call) name and CUDA's own
// message; the pybind11 layer in python/ turns that into a Python RuntimeError. Nothing here
// depends on Python or libtorch.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pcd_kernels {

inline void throw_on_cuda_error(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    // Clear the sticky "last error" so the next call does not report this one again.
    cudaGetLastError();
    throw std::runtime_error(std::string("pcd_kernels: ") + what + " failed: " +
                             cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
  }
}

}  // namespace pcd_kernels

#define PCD_CUDA_CHECK(expr, what) ::pcd_kernels::throw_on_cuda_error((expr), (what))
