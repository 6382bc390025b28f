// The extension's self-test: proves that the build targets this GPU and that launches work.
#pragma once

#include <cstdint>

namespace pcd_kernels {

// CUDA runtime version the extension was compiled against, e.g. 13000 for 13.0.
int cuda_runtime_version();

// Number of CUDA devices the runtime can see; throws std::runtime_error when the driver is missing.
int device_count();

// Launches a one-thread kernel on `stream` (a cudaStream_t passed as an integer) of `device` that
// writes `value + 1` to device memory, and returns what it reads back. Throws std::runtime_error
// naming the failing step, e.g. when the binary carries no code for this GPU's architecture.
int probe(int device, std::uintptr_t stream, int value);

}  // namespace pcd_kernels
