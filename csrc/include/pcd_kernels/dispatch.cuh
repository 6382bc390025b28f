// What every launcher in csrc/ shares on the host: errors, the element-type switch and the launch.
//
// Errors: arguments a launcher cannot take throw std::invalid_argument, CUDA failures
// std::runtime_error, each naming the op, kernel or API call (CUDA's with its own message);
// pybind11 turns them into Python's ValueError and RuntimeError. Nothing here depends on Python
// or libtorch.
#pragma once

#include <cuda_runtime.h>

#include <cutlass/numeric_types.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "pcd_kernels/params.h"

namespace pcd_kernels {

[[noreturn]] inline void invalid_argument(const std::string& message) {
  throw std::invalid_argument("pcd_kernels: " + message);
}

// Throws unless status is cudaSuccess; `kernel` names what `call` acted on, if anything.
inline void check_cuda(cudaError_t status, const char* call, const char* kernel = nullptr) {
  if (status == cudaSuccess) return;
  // Clear the sticky "last error" so the next call does not report this one again.
  cudaGetLastError();
  std::string what = call;
  if (kernel != nullptr) what += std::string("(") + kernel + ")";
  throw std::runtime_error("pcd_kernels: " + what + " failed: " + cudaGetErrorName(status) + " (" +
                           cudaGetErrorString(status) + ")");
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Throws unless `dtype` is one the kernels take, float16 or bfloat16 (float32 inputs go to the
// Triton or torch backends), naming the op's kernels.
inline void check_dtype(DType dtype, const char* op) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    invalid_argument(std::string(op) + " CUDA kernels take dtype code 1 (float16) or 2 (bfloat16), got " +
                     std::to_string(static_cast<int>(dtype)));
  }
}

// Calls f(TypeTag<T>{}) for the element type T of `dtype`, cutlass::half_t or cutlass::bfloat16_t
// (CuTe's half_t and bfloat16_t).
template <typename F>
void by_dtype(DType dtype, const char* op, F&& f) {
  check_dtype(dtype, op);
  if (dtype == DType::kFloat16) return f(TypeTag<cutlass::half_t>{});
  return f(TypeTag<cutlass::bfloat16_t>{});
}

template <typename T>
T* device_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// kernel<<<grid, block, smem, stream>>>(args...), nothing for an empty grid (which CUDA refuses);
// throws naming `name` when CUDA does not take the launch.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, std::size_t smem, std::uintptr_t stream,
            const char* name, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (smem > 0) {  // beyond 48 KiB of dynamic shared memory a kernel must opt in
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cudaFuncSetAttribute", name);
  }
  kernel<<<grid, block, smem, reinterpret_cast<cudaStream_t>(stream)>>>(std::forward<Args>(args)...);
  check_cuda(cudaGetLastError(), name);
}

}  // namespace pcd_kernels
