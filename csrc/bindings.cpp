// Torch glue for the csrc/ kernels: the `virchow_fast_cuda` custom-op library (schemas + CUDA kernels).
// Its own namespace: the Triton backend registers `virchow_fast_triton`, and both load into one process.
// Fake (meta) kernels and autograd are registered from Python in virchow_fast/ops/cuda_ops.py,
// which set_python_module names so that torch imports it when it needs them.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "centering.cuh"
#include "layer_norm.cuh"

namespace {

vf::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return vf::DType::kFloat32;
    case at::kHalf: return vf::DType::kFloat16;
    case at::kBFloat16: return vf::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "virchow_fast: dtype ", t.scalar_type(), " not supported (fp32, fp16, bf16)");
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "virchow_fast::", what, ": ", cudaGetErrorString(err));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "virchow_fast: ", name, " must be a CUDA tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  const auto xc = x.contiguous();
  const auto w = weight.to(at::kFloat).contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  TORCH_CHECK(w.numel() == cols, "layer_norm_fwd: weight has ", w.numel(), " elements, x has ", cols, " columns");
  auto y = at::empty_like(xc);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check(vf::layer_norm_fwd(xc.data_ptr(), w.data_ptr<float>(), b ? b->data_ptr<float>() : nullptr, y.data_ptr(),
                           mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, static_cast<int>(cols),
                           static_cast<float>(eps), dtype_of(x), at::cuda::getCurrentCUDAStream()),
        "layer_norm_fwd (rows wider than 2048, or not a multiple of 16 bytes and wider than 512?)");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  const auto xc = x.contiguous();
  const auto dyc = dy.to(x.scalar_type()).contiguous();
  const auto w = weight.to(at::kFloat).contiguous();
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  auto dx = at::empty_like(xc);
  // bounded partials: at most two blocks of 4 rows per SM, never more than the rows need
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(2 * sms, (rows + 3) / 4)));
  auto part = at::empty({2, parts, cols}, x.options().dtype(at::kFloat));
  // separate buffers: the schema promises outputs that do not alias each other
  auto dw = at::empty({cols}, x.options().dtype(at::kFloat));
  auto db = at::empty({cols}, x.options().dtype(at::kFloat));
  check(vf::layer_norm_bwd(dyc.data_ptr(), xc.data_ptr(), w.data_ptr<float>(), mean.data_ptr<float>(),
                           rstd.data_ptr<float>(), dx.data_ptr(), part[0].data_ptr<float>(),
                           part[1].data_ptr<float>(), parts, dw.data_ptr<float>(), db.data_ptr<float>(), rows,
                           static_cast<int>(cols), dtype_of(x), at::cuda::getCurrentCUDAStream()),
        "layer_norm_bwd");
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

at::Tensor softmax_center(const at::Tensor& logits, const at::Tensor& center, double temp) {
  check_cuda(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "softmax_center: logits must be [M, K]");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto t = logits.contiguous();
  const auto c = center.to(at::kFloat).contiguous();
  TORCH_CHECK(c.numel() == t.size(1), "softmax_center: center must have K elements");
  auto probs = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  check(vf::softmax_center(t.data_ptr(), c.data_ptr<float>(), probs.data_ptr<float>(), t.size(0), t.size(1),
                           static_cast<float>(temp), dtype_of(t), at::cuda::getCurrentCUDAStream()),
        "softmax_center");
  return probs;
}

at::Tensor sinkhorn_col_sums(const at::Tensor& q) {
  check_cuda(q, "q");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "sinkhorn_col_sums: q must be a contiguous fp32 [M, K]");
  const c10::cuda::CUDAGuard guard(q.device());
  auto col = at::empty({q.size(1)}, q.options());
  check(vf::sinkhorn_col_sums(q.data_ptr<float>(), col.data_ptr<float>(), q.size(0), q.size(1),
                              at::cuda::getCurrentCUDAStream()),
        "sinkhorn_col_sums");
  return col;
}

void sinkhorn_normalize_rows_(at::Tensor& q, const at::Tensor& col, double col_scale, double row_target) {
  check_cuda(q, "q");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "sinkhorn_normalize_rows_: q must be a contiguous fp32 [M, K]");
  TORCH_CHECK(col.scalar_type() == at::kFloat && col.numel() == q.size(1), "sinkhorn_normalize_rows_: col [K] fp32");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto c = col.contiguous();
  check(vf::sinkhorn_normalize_rows(q.data_ptr<float>(), c.data_ptr<float>(), q.size(0), q.size(1),
                                    static_cast<float>(col_scale), static_cast<float>(row_target),
                                    at::cuda::getCurrentCUDAStream()),
        "sinkhorn_normalize_rows_");
}

}  // namespace

TORCH_LIBRARY(virchow_fast_cuda, m) {
  m.set_python_module("virchow_fast.ops.cuda_ops");
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("softmax_center(Tensor logits, Tensor center, float temp) -> Tensor");
  m.def("sinkhorn_col_sums(Tensor q) -> Tensor");
  m.def("sinkhorn_normalize_rows_(Tensor(a!) q, Tensor col, float col_scale, float row_target) -> ()");
}

TORCH_LIBRARY_IMPL(virchow_fast_cuda, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("softmax_center", &softmax_center);
  m.impl("sinkhorn_col_sums", &sinkhorn_col_sums);
  m.impl("sinkhorn_normalize_rows_", &sinkhorn_normalize_rows_);
}

// `import virchow_fast._C` loads this library (and with it the registrations above); no Python API.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "virchow_fast CUDA custom ops (torch.ops.virchow_fast_cuda)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
