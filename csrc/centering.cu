// Teacher centering kernels over a materialised [M, K] matrix; see centering.cuh for the contract.
#include "centering.cuh"

#include "device.cuh"

namespace vf {
namespace {

constexpr int kRowThreads = 512;  // one block per row of K (65536-131072) columns
constexpr int kColThreads = 256;

// One block per row: online (max, sum) of x = (t - c) / temp over the row, then write exp(x - max) / sum.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
softmax_center_kernel(const T* __restrict__ logits,     // [rows, cols]
                      const float* __restrict__ center,  // [cols]
                      float* __restrict__ probs,         // [rows, cols]
                      int64_t cols, float inv_temp) {
  __shared__ float shared[64];
  const T* row = logits + static_cast<int64_t>(blockIdx.x) * cols;
  float* out = probs + static_cast<int64_t>(blockIdx.x) * cols;
  float m = -INFINITY, s = 0.f;
  for (int64_t k = static_cast<int64_t>(threadIdx.x) * VEC; k < cols; k += static_cast<int64_t>(blockDim.x) * VEC) {
    const Vec<T, VEC> t = *reinterpret_cast<const Vec<T, VEC>*>(row + k);
    const Vec<float, VEC> c = *reinterpret_cast<const Vec<float, VEC>*>(center + k);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {  // one exp per element
      const float x = (to_float(t.v[j]) - c.v[j]) * inv_temp;
      if (x > m) {
        s = s * __expf(m - x) + 1.f;
        m = x;
      } else {
        s += __expf(x - m);
      }
    }
  }
  block_lse(m, s, shared);
  const float inv_s = 1.f / s;
  for (int64_t k = static_cast<int64_t>(threadIdx.x) * VEC; k < cols; k += static_cast<int64_t>(blockDim.x) * VEC) {
    const Vec<T, VEC> t = *reinterpret_cast<const Vec<T, VEC>*>(row + k);
    const Vec<float, VEC> c = *reinterpret_cast<const Vec<float, VEC>*>(center + k);
    Vec<float, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = __expf((to_float(t.v[j]) - c.v[j]) * inv_temp - m) * inv_s;
    *reinterpret_cast<Vec<float, VEC>*>(out + k) = o;
  }
}

// Each thread owns VEC adjacent columns and walks down the rows (coalesced, no atomics).
template <int VEC>
__global__ void __launch_bounds__(kColThreads)
col_sums_kernel(const float* __restrict__ q,  // [rows, cols]
                float* __restrict__ col,      // [cols]
                int64_t rows, int64_t cols) {
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (k >= cols) return;
  float acc[VEC] = {};
  for (int64_t m = 0; m < rows; ++m) {
    const Vec<float, VEC> v = *reinterpret_cast<const Vec<float, VEC>*>(q + m * cols + k);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += v.v[j];
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) col[k + j] = acc[j];
}

// One block per row: q *= col_scale / col (columns), then the row scaled to sum to row_target.
template <int VEC>
__global__ void __launch_bounds__(kRowThreads)
normalize_rows_kernel(float* __restrict__ q,          // [rows, cols], in place
                      const float* __restrict__ col,  // [cols]
                      int64_t cols, float col_scale, float row_target) {
  __shared__ float shared[32];
  float* row = q + static_cast<int64_t>(blockIdx.x) * cols;
  float s = 0.f;
  for (int64_t k = static_cast<int64_t>(threadIdx.x) * VEC; k < cols; k += static_cast<int64_t>(blockDim.x) * VEC) {
    const Vec<float, VEC> v = *reinterpret_cast<const Vec<float, VEC>*>(row + k);
    const Vec<float, VEC> c = *reinterpret_cast<const Vec<float, VEC>*>(col + k);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += v.v[j] * col_scale / c.v[j];
  }
  const float scale = row_target / block_sum(s, shared);
  for (int64_t k = static_cast<int64_t>(threadIdx.x) * VEC; k < cols; k += static_cast<int64_t>(blockDim.x) * VEC) {
    Vec<float, VEC> v = *reinterpret_cast<const Vec<float, VEC>*>(row + k);
    const Vec<float, VEC> c = *reinterpret_cast<const Vec<float, VEC>*>(col + k);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = v.v[j] * col_scale / c.v[j] * scale;
    *reinterpret_cast<Vec<float, VEC>*>(row + k) = v;
  }
}

template <typename T>
cudaError_t softmax_center_typed(const void* logits, const float* center, float* probs, int64_t rows,
                                 int64_t cols, float inv_temp, cudaStream_t stream) {
  constexpr int vec = 16 / sizeof(T);
  const T* t = static_cast<const T*>(logits);
  // 16-byte loads of the logits need cols % vec == 0; the fp32 center / probs then take vec too.
  // (alignment of the fp32 side: vec * 4 bytes)
  if (cols % vec == 0 && aligned_to(logits, 16) && aligned_to(center, 4 * vec) && aligned_to(probs, 4 * vec))
    softmax_center_kernel<T, vec><<<rows, kRowThreads, 0, stream>>>(t, center, probs, cols, inv_temp);
  else
    softmax_center_kernel<T, 1><<<rows, kRowThreads, 0, stream>>>(t, center, probs, cols, inv_temp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t softmax_center(const void* logits, const float* center, float* probs, int64_t rows, int64_t cols,
                           float temp, DType dtype, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const float inv_temp = 1.f / temp;
  switch (dtype) {
    case DType::kFloat32: return softmax_center_typed<float>(logits, center, probs, rows, cols, inv_temp, stream);
    case DType::kFloat16: return softmax_center_typed<__half>(logits, center, probs, rows, cols, inv_temp, stream);
    case DType::kBFloat16:
      return softmax_center_typed<__nv_bfloat16>(logits, center, probs, rows, cols, inv_temp, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t sinkhorn_col_sums(const float* q, float* col, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  if (cols % 4 == 0 && aligned16(q) && aligned16(col)) {
    const int64_t threads = cols / 4;
    col_sums_kernel<4><<<(threads + kColThreads - 1) / kColThreads, kColThreads, 0, stream>>>(q, col, rows, cols);
  } else {
    col_sums_kernel<1><<<(cols + kColThreads - 1) / kColThreads, kColThreads, 0, stream>>>(q, col, rows, cols);
  }
  return cudaGetLastError();
}

cudaError_t sinkhorn_normalize_rows(float* q, const float* col, int64_t rows, int64_t cols, float col_scale,
                                    float row_target, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (cols % 4 == 0 && aligned16(q) && aligned16(col))
    normalize_rows_kernel<4><<<rows, kRowThreads, 0, stream>>>(q, col, cols, col_scale, row_target);
  else
    normalize_rows_kernel<1><<<rows, kRowThreads, 0, stream>>>(q, col, cols, col_scale, row_target);
  return cudaGetLastError();
}

}  // namespace vf
