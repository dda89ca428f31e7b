// LayerNorm forward / backward kernels; see layer_norm.cuh for the contract.
#include "layer_norm.cuh"

#include "device.cuh"

namespace vf {
namespace {

constexpr int kWarps = 4;  // rows per block (one warp per row)
// Vectors per lane kept in registers: up to 16 x 4 fp32 or 8 x 8 fp16/bf16 (more spills in the
// backward, ptxas -warn-spills): rows up to 2048 wide either way (ViT-G is 1664).
constexpr int max_nv(int vec) { return vec >= 8 ? 8 : 16; }

// Lane `lane` owns the VEC-wide column groups (i * 32 + lane) * VEC, i < NV.
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(kWarps * 32)
ln_fwd_kernel(const T* __restrict__ x,          // [rows, cols]
              const float* __restrict__ weight,  // [cols]
              const float* __restrict__ bias,    // [cols] or null
              T* __restrict__ y,                 // [rows, cols]
              float* __restrict__ mean,          // [rows]
              float* __restrict__ rstd,          // [rows]
              int64_t rows, int cols, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * cols;
  float v[NV][VEC];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * 32 + lane) * VEC;
    if (c < cols) {
      const Vec<T, VEC> t = *reinterpret_cast<const Vec<T, VEC>*>(xr + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[i][j] = to_float(t.v[j]);
        sum += v[i][j];
      }
    }
  }
  const float mu = warp_sum(sum) / cols;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if ((i * 32 + lane) * VEC < cols) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[i][j] - mu;
        sq += d * d;
      }
    }
  }
  const float rs = rsqrtf(warp_sum(sq) / cols + eps);  // two-pass variance: the row is in registers
  T* yr = y + row * cols;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * 32 + lane) * VEC;
    if (c < cols) {
      Vec<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float b = bias != nullptr ? bias[c + j] : 0.f;
        o.v[j] = from_float<T>((v[i][j] - mu) * rs * weight[c + j] + b);
      }
      *reinterpret_cast<Vec<T, VEC>*>(yr + c) = o;
    }
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Grid-stride over rows; each lane accumulates dW / db for its own columns in registers, the block
// folds its warps into shared memory and writes one partial row: parts = gridDim.x.
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(kWarps * 32)
ln_bwd_kernel(const T* __restrict__ dy,         // [rows, cols]
              const T* __restrict__ x,          // [rows, cols]
              const float* __restrict__ weight,  // [cols]
              const float* __restrict__ mean,    // [rows]
              const float* __restrict__ rstd,    // [rows]
              T* __restrict__ dx,                // [rows, cols]
              float* __restrict__ dw_part,       // [gridDim.x, cols]
              float* __restrict__ db_part,       // [gridDim.x, cols] or null
              int64_t rows, int cols) {
  extern __shared__ float smem[];  // [2, cols]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float dw[NV][VEC] = {}, db[NV][VEC] = {};
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const float mu = mean[row], rs = rstd[row];
    // keep the raw vectors (half the registers of fp32 copies for fp16/bf16); recompute x_hat, g below
    Vec<T, VEC> tx[NV], tg[NV];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = (i * 32 + lane) * VEC;
      if (c < cols) {
        tx[i] = *reinterpret_cast<const Vec<T, VEC>*>(x + row * cols + c);
        tg[i] = *reinterpret_cast<const Vec<T, VEC>*>(dy + row * cols + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = to_float(tg[i].v[j]), xh = (to_float(tx[i].v[j]) - mu) * rs, g = d * weight[c + j];
          s1 += g;
          s2 += g * xh;
          dw[i][j] += d * xh;
          db[i][j] += d;
        }
      }
    }
    s1 = warp_sum(s1) / cols;
    s2 = warp_sum(s2) / cols;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = (i * 32 + lane) * VEC;
      if (c < cols) {
        Vec<T, VEC> o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xh = (to_float(tx[i].v[j]) - mu) * rs, g = to_float(tg[i].v[j]) * weight[c + j];
          o.v[j] = from_float<T>(rs * (g - s1 - xh * s2));
        }
        *reinterpret_cast<Vec<T, VEC>*>(dx + row * cols + c) = o;
      }
    }
  }
  // fold the warps one after another (deterministic, no atomics)
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int c = (i * 32 + lane) * VEC;
        if (c < cols) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            smem[c + j] = (w == 0 ? 0.f : smem[c + j]) + dw[i][j];
            smem[cols + c + j] = (w == 0 ? 0.f : smem[cols + c + j]) + db[i][j];
          }
        }
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    dw_part[static_cast<int64_t>(blockIdx.x) * cols + c] = smem[c];
    if (db_part != nullptr) db_part[static_cast<int64_t>(blockIdx.x) * cols + c] = smem[cols + c];
  }
}

// dw[c] = sum_p dw_part[p, c] (coalesced over c), same for db.
__global__ void ln_bwd_reduce_kernel(const float* __restrict__ dw_part, const float* __restrict__ db_part,
                                     int parts, int cols, float* __restrict__ dw, float* __restrict__ db) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float a = 0.f, b = 0.f;
  for (int p = 0; p < parts; ++p) {
    a += dw_part[static_cast<int64_t>(p) * cols + c];
    if (db_part != nullptr) b += db_part[static_cast<int64_t>(p) * cols + c];
  }
  dw[c] = a;
  if (db != nullptr) db[c] = b;
}

int lanes_needed(int cols, int vec) { return (cols + 32 * vec - 1) / (32 * vec); }

// Smallest instantiated NV covering the row (exact up to 8, then even); 0 if none does.
int pick_nv(int cols, int vec) {
  const int need = lanes_needed(cols, vec);
  if (need > max_nv(vec)) return 0;
  return need <= 8 ? need : (need + 1) / 2 * 2;
}

template <typename T, int VEC>
cudaError_t fwd_vec(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t rows,
                    int cols, float eps, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  switch (pick_nv(cols, VEC)) {
#define VF_CASE(NV) \
  case NV:                                                                                      \
    if constexpr (NV <= max_nv(VEC))                                                            \
      ln_fwd_kernel<T, VEC, NV><<<grid, block, 0, stream>>>(x, w, b, y, mean, rstd, rows, cols, eps); \
    break;
    VF_CASE(1) VF_CASE(2) VF_CASE(3) VF_CASE(4) VF_CASE(5) VF_CASE(6) VF_CASE(7) VF_CASE(8) \
    VF_CASE(10) VF_CASE(12) VF_CASE(14) VF_CASE(16)
#undef VF_CASE
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t bwd_vec(const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,
                    float* dw_part, float* db_part, int parts, int64_t rows, int cols, cudaStream_t stream) {
  const size_t smem = 2 * static_cast<size_t>(cols) * sizeof(float);
  const dim3 grid(parts), block(kWarps * 32);
  switch (pick_nv(cols, VEC)) {
#define VF_CASE(NV)                                                                               \
  case NV:                                                                                        \
    if constexpr (NV <= max_nv(VEC))                                                              \
      ln_bwd_kernel<T, VEC, NV><<<grid, block, smem, stream>>>(dy, x, w, mean, rstd, dx, dw_part, db_part, \
                                                             rows, cols);                         \
    break;
    VF_CASE(1) VF_CASE(2) VF_CASE(3) VF_CASE(4) VF_CASE(5) VF_CASE(6) VF_CASE(7) VF_CASE(8) \
    VF_CASE(10) VF_CASE(12) VF_CASE(14) VF_CASE(16)
#undef VF_CASE
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
bool can_vectorise(int cols, const void* a, const void* b, const void* c) {
  constexpr int vec = 16 / sizeof(T);
  return cols % vec == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

template <typename T>
cudaError_t fwd_typed(const void* x, const float* w, const float* b, void* y, float* mean, float* rstd,
                      int64_t rows, int cols, float eps, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  if (can_vectorise<T>(cols, x, y, w) && (b == nullptr || aligned16(b)))
    return fwd_vec<T, 16 / sizeof(T)>(xt, w, b, yt, mean, rstd, rows, cols, eps, stream);
  return fwd_vec<T, 1>(xt, w, b, yt, mean, rstd, rows, cols, eps, stream);
}

template <typename T>
cudaError_t bwd_typed(const void* dy, const void* x, const float* w, const float* mean, const float* rstd,
                      void* dx, float* dw_part, float* db_part, int parts, int64_t rows, int cols,
                      cudaStream_t stream) {
  const T *dyt = static_cast<const T*>(dy), *xt = static_cast<const T*>(x);
  T* dxt = static_cast<T*>(dx);
  if (can_vectorise<T>(cols, dy, x, dx) && aligned16(w))
    return bwd_vec<T, 16 / sizeof(T)>(dyt, xt, w, mean, rstd, dxt, dw_part, db_part, parts, rows, cols, stream);
  return bwd_vec<T, 1>(dyt, xt, w, mean, rstd, dxt, dw_part, db_part, parts, rows, cols, stream);
}

}  // namespace

bool layer_norm_supported(int cols, DType dtype, bool vectorised) {
  const int elem = dtype == DType::kFloat32 ? 4 : 2;
  return cols > 0 && pick_nv(cols, vectorised ? 16 / elem : 1) > 0;
}

cudaError_t layer_norm_fwd(const void* x, const float* weight, const float* bias, void* y, float* mean,
                           float* rstd, int64_t rows, int cols, float eps, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return fwd_typed<float>(x, weight, bias, y, mean, rstd, rows, cols, eps, stream);
    case DType::kFloat16: return fwd_typed<__half>(x, weight, bias, y, mean, rstd, rows, cols, eps, stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(x, weight, bias, y, mean, rstd, rows, cols, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t layer_norm_bwd(const void* dy, const void* x, const float* weight, const float* mean,
                           const float* rstd, void* dx, float* dw_part, float* db_part, int parts, float* dw,
                           float* db, int64_t rows, int cols, DType dtype, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      err = bwd_typed<float>(dy, x, weight, mean, rstd, dx, dw_part, db_part, parts, rows, cols, stream);
      break;
    case DType::kFloat16:
      err = bwd_typed<__half>(dy, x, weight, mean, rstd, dx, dw_part, db_part, parts, rows, cols, stream);
      break;
    case DType::kBFloat16:
      err = bwd_typed<__nv_bfloat16>(dy, x, weight, mean, rstd, dx, dw_part, db_part, parts, rows, cols, stream);
      break;
  }
  if (err != cudaSuccess) return err;
  ln_bwd_reduce_kernel<<<(cols + 255) / 256, 256, 0, stream>>>(dw_part, db_part, parts, cols, dw, db);
  return cudaGetLastError();
}

}  // namespace vf
