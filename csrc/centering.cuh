// Teacher centering over a materialised [M, K] logit / probability matrix (plain CUDA launchers),
// the non-fused path of the DINO / iBOT heads. See virchow_fast/ops/reference.py.
//
// softmax_center: probs[m, k] = softmax_k((logits[m, k] - center[k]) / temp); one block per row,
//   two reads of the row (online max / sum, then write), fp32 out. Traffic: 2 M K e + M K 4.
// One Sinkhorn-Knopp iteration is sinkhorn_col_sums, the caller's all-reduce of col, then
// sinkhorn_normalize_rows:
//   col[k] = sum_m q[m, k]                                   (read M K 4)
//   q[m, k] *= col_scale / col[k], then rows to row_target   (read 2 M K 4, write M K 4, in place)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace vf {

cudaError_t softmax_center(const void* logits, const float* center, float* probs, int64_t rows,
                           int64_t cols, float temp, DType dtype, cudaStream_t stream);

cudaError_t sinkhorn_col_sums(const float* q, float* col, int64_t rows, int64_t cols, cudaStream_t stream);

cudaError_t sinkhorn_normalize_rows(float* q, const float* col, int64_t rows, int64_t cols, float col_scale,
                                    float row_target, cudaStream_t stream);

}  // namespace vf
