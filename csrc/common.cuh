// Types shared by the csrc/ launchers' headers and the torch glue (host-safe: no device code).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace vf {

// Element type of the activation pointers (the torch glue maps at::ScalarType onto it).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace vf
