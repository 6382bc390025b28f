#include "pcd_kernels/dispatch.cuh"
#include "pcd_kernels/probe.h"

namespace pcd_kernels {
namespace {

__global__ void probe_kernel(int* out, int value) { *out = value + 1; }

// Frees the probe's device int however probe() returns.
struct AsyncFree {
  void* ptr;
  cudaStream_t stream;
  ~AsyncFree() { cudaFreeAsync(ptr, stream); }
};

}  // namespace

int cuda_runtime_version() { return CUDART_VERSION; }

int device_count() {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
}

int probe(int device, std::uintptr_t stream_handle, int value) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int* out = nullptr;
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&out), sizeof(int), stream), "cudaMallocAsync");
  const AsyncFree free_out{out, stream};
  launch(probe_kernel, 1, 1, 0, stream_handle, "probe_kernel", out, value);
  int result = 0;
  check_cuda(cudaMemcpyAsync(&result, out, sizeof(int), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync",
             "probe_kernel result");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", "probe_kernel");
  return result;
}

}  // namespace pcd_kernels
