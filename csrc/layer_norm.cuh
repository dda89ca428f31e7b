// LayerNorm over the last dim, forward and backward, fp32 statistics (plain CUDA launchers).
//
// x, y, dy, dx: [rows, cols] contiguous, element type `dtype`; weight, bias: [cols] fp32 (bias may be
// null); mean, rstd: [rows] fp32. One warp owns a row and keeps it in registers (16-byte vector
// loads when cols and the pointers allow, scalar otherwise). Limits: cols <= 2048 with vector loads
// (cols a multiple of 16 bytes), cols <= 512 without.
// Traffic: forward reads x, writes y (2 R C e); backward reads x, dy, writes dx (3 R C e) and
// bounded dW/db partials (2 * parts * C fp32, parts <= a few per SM) summed by a second kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace vf {

bool layer_norm_supported(int cols, DType dtype, bool vectorised);

cudaError_t layer_norm_fwd(const void* x, const float* weight, const float* bias, void* y, float* mean,
                           float* rstd, int64_t rows, int cols, float eps, DType dtype, cudaStream_t stream);

// dw_part, db_part: [parts, cols] fp32 scratch; dw, db: [cols] fp32 out (db may be null).
cudaError_t layer_norm_bwd(const void* dy, const void* x, const float* weight, const float* mean,
                           const float* rstd, void* dx, float* dw_part, float* db_part, int parts,
                           float* dw, float* db, int64_t rows, int cols, DType dtype, cudaStream_t stream);

}  // namespace vf
