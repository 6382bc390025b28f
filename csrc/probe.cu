#include "pcd_kernels/cuda_check.h"
#include "pcd_kernels/probe.h"

namespace pcd_kernels {
namespace {

__global__ void probe_kernel(int* out, int value) { *out = value + 1; }

}  // namespace

int cuda_runtime_version() { return CUDART_VERSION; }

int device_count() {
  int count = 0;
  PCD_CUDA_CHECK(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
}

int probe(int device, std::uintptr_t stream_handle, int value) {
  PCD_CUDA_CHECK(cudaSetDevice(device), "cudaSetDevice");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int* out = nullptr;
  PCD_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&out), sizeof(int), stream), "cudaMallocAsync");
  probe_kernel<<<1, 1, 0, stream>>>(out, value);
  cudaError_t launch = cudaGetLastError();
  int result = 0;
  cudaError_t copy = cudaSuccess;
  if (launch == cudaSuccess) {
    copy = cudaMemcpyAsync(&result, out, sizeof(int), cudaMemcpyDeviceToHost, stream);
  }
  cudaFreeAsync(out, stream);
  PCD_CUDA_CHECK(launch, "probe_kernel launch");
  PCD_CUDA_CHECK(copy, "probe_kernel copy back");
  PCD_CUDA_CHECK(cudaStreamSynchronize(stream), "probe_kernel");
  return result;
}

}  // namespace pcd_kernels
