// How a launch's parameters are declared, for every op in csrc/.
//
// Each op lists its launch parameters once, as X(type, name) entries of a macro
// (PCD_KERNELS_<OP>_PARAMS in pcd_kernels/<op>.h). The list declares the op's parameter struct
// here in C++ and binds every field by name in python/bind_<op>.cpp, and the Python wrapper
// fills the bound struct by field name: adding a parameter is one line in the list.
//
// The numbers Python and C++ exchange (element types here, pixel_contrastive's negatives modes
// in its header) are X(enumerator, Python name, number) lists for the same reason: the enum and
// its Python names come from one list, and tests/test_csrc.py checks the numbers against
// Python's. Plain C++: the binding layer includes this without CUDA.
#pragma once

#include <cstdint>

// A field of a parameter struct; every field starts at 0 (pointers: absent).
#define PCD_KERNELS_FIELD(type, name) type name{};
// An enumerator of an X(enumerator, Python name, number) list.
#define PCD_KERNELS_ENUMERATOR(enumerator, name, number) enumerator = number,

// Element types of a launch's tensors, numbered as pcd_kernels.backends.cuda._extension.DTYPE_CODES.
// The kernels take float16 and bfloat16 (check_dtype in dispatch.cuh); float32 keeps its code for
// the numbers' sake.
#define PCD_KERNELS_DTYPES(X) \
  X(kFloat32, float32, 0)     \
  X(kFloat16, float16, 1)     \
  X(kBFloat16, bfloat16, 2)

// Where a launch runs and on what: the fields every parameter struct starts with.
#define PCD_KERNELS_LAUNCH_PARAMS(X)                                            \
  X(int, device)            /* CUDA device ordinal the pointers live on */      \
  X(std::uintptr_t, stream) /* cudaStream_t; the launch is asynchronous on it */ \
  X(::pcd_kernels::DType, dtype)

namespace pcd_kernels {

enum class DType : int { PCD_KERNELS_DTYPES(PCD_KERNELS_ENUMERATOR) };

}  // namespace pcd_kernels
