// Python bindings of the fused ops: the only file that includes torch. Each function checks its
// tensors, allocates the outputs and calls the CPU kernel for the input's dtype, or, in a build with
// -DWITH_CUDA, the CUDA launcher when the input lives on a GPU. Inputs are 2-D/3-D/4-D contiguous
// tensors shaped by the Python front ends (megatron_lite/ops/csrc.py); weights and biases are taken in
// the accumulation dtype (fp32, or fp64 for fp64 inputs) and their gradients are returned in it.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "cpu/kernels.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "cuda/launch.h"
#endif

namespace {

namespace cpu = mlite::cpu;
using Tensors = std::vector<at::Tensor>;

void check_input(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (the Python front end copies it)");
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but the input is on ", x.device());
}

// An output gradient must be contiguous, of the given shape and of the saved input's dtype and device.
void check_grad(const at::Tensor& grad, at::IntArrayRef shape, const at::Tensor& saved, const char* op) {
  check_device(grad, saved, op, "the gradient");
  TORCH_CHECK(grad.sizes() == shape && grad.scalar_type() == saved.scalar_type() && grad.is_contiguous(),
              op, ": gradient ", grad.sizes(), " ", grad.scalar_type(), " does not match the expected contiguous ",
              shape, " ", saved.scalar_type());
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A statistic saved by the forward (mean, rstd): n values in x's accumulation dtype on x's device.
void check_saved(const at::Tensor& t, const at::Tensor& x, int64_t n, const char* op, const char* name) {
  check_device(t, x, op, name);
  TORCH_CHECK(t.scalar_type() == acc_type(x) && t.numel() == n && t.is_contiguous(), op, ": ", name, " must be ",
              n, " contiguous ", acc_type(x), " values, got ", t.sizes(), " ", t.scalar_type());
}

// A weight, bias, cos or sin table (on x's device, floating point) in x's accumulation dtype, contiguous.
at::Tensor as_acc(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_device(t, x, op, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
  return t.to(acc_type(x)).contiguous();
}

at::Tensor acc_empty(at::IntArrayRef shape, const at::Tensor& x) {
  return at::empty(shape, x.options().dtype(acc_type(x)));
}

// A weight or bias of n elements (checked: the kernels index it by column) via as_acc.
at::Tensor param(const at::Tensor& t, const at::Tensor& x, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == n, op, ": ", name, " has ", t.numel(), " elements, expected ", n,
              " (the size of the last dim)");
  return as_acc(t, x, op, name);
}

// Optional bias as a tensor: zeros when absent, so the kernels need no second code path.
at::Tensor bias_or_zeros(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n, const char* op) {
  return bias.has_value() ? param(*bias, x, n, op, "bias") : at::zeros({n}, x.options().dtype(acc_type(x)));
}

template <typename T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
template <typename T> cpu::acc_t<T>* acc_ptr(const at::Tensor& t) { return ptr<cpu::acc_t<T>>(t); }

int threads() { return at::get_num_threads(); }

// Calls f(T{}) with T the CPU element type of x (float, double or bf16).
template <typename F> void cpu_dispatch(const at::Tensor& x, const char* op, F&& f) {
  TORCH_CHECK(x.device().is_cpu(), op, ": tensor on ", x.device(),
              " but this build of the extension has no CUDA kernels");
  switch (x.scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(cpu::bf16{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type(), " on CPU (float32, float64, bfloat16)");
  }
}

#ifdef WITH_CUDA
namespace gpu = mlite::cuda;

// Device guard, element type and stream of one CUDA launch.
struct CudaCall {
  c10::cuda::CUDAGuard guard;
  gpu::DType dtype;
  void* stream;
  const char* op;
  CudaCall(const at::Tensor& x, const char* op_name)
      : guard(x.device()), stream(c10::cuda::getCurrentCUDAStream().stream()), op(op_name) {
    switch (x.scalar_type()) {
      case at::kFloat: dtype = gpu::DType::f32; break;
      case at::kHalf: dtype = gpu::DType::f16; break;
      case at::kBFloat16: dtype = gpu::DType::bf16; break;
      default: TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type(), " on CUDA (float32, float16, bfloat16)");
    }
  }
  void check(int err) const {
    TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(cudaError_t(err)));
  }
  at::Tensor workspace(const at::Tensor& x, int64_t floats) const {
    return at::empty({floats}, x.options().dtype(at::kFloat));
  }
};
#define MLITE_ON_CUDA(x) if ((x).is_cuda())
#else
#define MLITE_ON_CUDA(x) if (false)
#endif

// ---- RMSNorm: x [rows, h], weight [h] ----
Tensors rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_input(x, "rms_norm", "x", 2);
  const int64_t rows = x.size(0), h = x.size(1);
  auto w = param(weight, x, h, "rms_norm", "weight");
  auto y = at::empty_like(x);
  auto rstd = acc_empty({rows}, x);
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "rms_norm");
    c.check(gpu::rms_norm_fwd(c.dtype, x.data_ptr(), ptr<float>(w), y.data_ptr(), ptr<float>(rstd),
                              rows, h, float(eps), c.stream));
#endif
    return {y, rstd};
  }
  cpu_dispatch(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    cpu::rms_norm_fwd<T>(ptr<T>(x), acc_ptr<T>(w), ptr<T>(y), acc_ptr<T>(rstd), rows, h, eps, threads());
  });
  return {y, rstd};
}

Tensors rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& rstd) {
  check_input(x, "rms_norm backward", "x", 2);
  check_grad(dy, x.sizes(), x, "rms_norm backward");
  const int64_t rows = x.size(0), h = x.size(1);
  check_saved(rstd, x, rows, "rms_norm backward", "rstd");
  auto w = param(weight, x, h, "rms_norm backward", "weight");
  auto dx = at::empty_like(x);
  auto dw = acc_empty({h}, x);
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "rms_norm backward");
    auto ws = c.workspace(x, gpu::rms_norm_bwd_workspace(c.dtype, dy.data_ptr(), x.data_ptr(), ptr<float>(w),
                                                         dx.data_ptr(), rows, h));
    c.check(gpu::rms_norm_bwd(c.dtype, dy.data_ptr(), x.data_ptr(), ptr<float>(w), ptr<float>(rstd),
                              dx.data_ptr(), ptr<float>(dw), ptr<float>(ws), rows, h, c.stream));
#endif
    return {dx, dw};
  }
  cpu_dispatch(x, "rms_norm backward", [&](auto tag) {
    using T = decltype(tag);
    cpu::rms_norm_bwd<T>(ptr<T>(dy), ptr<T>(x), acc_ptr<T>(w), acc_ptr<T>(rstd), ptr<T>(dx),
                         acc_ptr<T>(dw), rows, h, threads());
  });
  return {dx, dw};
}

// ---- LayerNorm: x [rows, h], weight/bias [h]; backward returns (dx, dw, db) ----
Tensors layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, double eps) {
  check_input(x, "layer_norm", "x", 2);
  const int64_t rows = x.size(0), h = x.size(1);
  auto w = param(weight, x, h, "layer_norm", "weight");
  auto b = bias_or_zeros(bias, x, h, "layer_norm");
  auto y = at::empty_like(x);
  auto mean = acc_empty({rows}, x);
  auto rstd = acc_empty({rows}, x);
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "layer_norm");
    c.check(gpu::layer_norm_fwd(c.dtype, x.data_ptr(), ptr<float>(w), ptr<float>(b), y.data_ptr(),
                                ptr<float>(mean), ptr<float>(rstd), rows, h, float(eps), c.stream));
#endif
    return {y, mean, rstd};
  }
  cpu_dispatch(x, "layer_norm", [&](auto tag) {
    using T = decltype(tag);
    cpu::layer_norm_fwd<T>(ptr<T>(x), acc_ptr<T>(w), acc_ptr<T>(b), ptr<T>(y), acc_ptr<T>(mean),
                           acc_ptr<T>(rstd), rows, h, eps, threads());
  });
  return {y, mean, rstd};
}

Tensors layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& mean, const at::Tensor& rstd) {
  check_input(x, "layer_norm backward", "x", 2);
  check_grad(dy, x.sizes(), x, "layer_norm backward");
  const int64_t rows = x.size(0), h = x.size(1);
  check_saved(mean, x, rows, "layer_norm backward", "mean");
  check_saved(rstd, x, rows, "layer_norm backward", "rstd");
  auto w = param(weight, x, h, "layer_norm backward", "weight");
  auto dx = at::empty_like(x);
  auto dwb = acc_empty({2, h}, x);
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "layer_norm backward");
    auto ws = c.workspace(x, gpu::layer_norm_bwd_workspace(c.dtype, dy.data_ptr(), x.data_ptr(), ptr<float>(w),
                                                           dx.data_ptr(), rows, h));
    c.check(gpu::layer_norm_bwd(c.dtype, dy.data_ptr(), x.data_ptr(), ptr<float>(w), ptr<float>(mean),
                                ptr<float>(rstd), dx.data_ptr(), ptr<float>(dwb), ptr<float>(ws),
                                rows, h, c.stream));
#endif
    return {dx, dwb[0], dwb[1]};
  }
  cpu_dispatch(x, "layer_norm backward", [&](auto tag) {
    using T = decltype(tag);
    cpu::layer_norm_bwd<T>(ptr<T>(dy), ptr<T>(x), acc_ptr<T>(w), acc_ptr<T>(mean), acc_ptr<T>(rstd),
                           ptr<T>(dx), acc_ptr<T>(dwb), rows, h, threads());
  });
  return {dx, dwb[0], dwb[1]};
}

// ---- Rotary: x [b, s, n, d], cos/sin [s, d/2]; inverse = backward ----
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  check_input(x, "rotary", "x", 4);
  const int64_t b = x.size(0), s = x.size(1), n = x.size(2), d = x.size(3);
  TORCH_CHECK(d % 2 == 0, "rotary: head dim ", d, " must be even");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == s && cos.size(1) == d / 2,
              "rotary: cos/sin must be [s, d/2] = [", s, ", ", d / 2, "], got ", cos.sizes());
  auto c = as_acc(cos, x, "rotary", "cos"), sn = as_acc(sin, x, "rotary", "sin");
  auto y = at::empty_like(x);
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall call(x, "rotary");
    call.check(gpu::rotary(call.dtype, x.data_ptr(), ptr<float>(c), ptr<float>(sn), y.data_ptr(), b * s,
                           s, n, d, inverse, call.stream));
#endif
    return y;
  }
  cpu_dispatch(x, "rotary", [&](auto tag) {
    using T = decltype(tag);
    cpu::rotary<T>(ptr<T>(x), acc_ptr<T>(c), acc_ptr<T>(sn), ptr<T>(y), b * s, s, n, d, inverse, threads());
  });
  return y;
}

// ---- SwiGLU: x [rows, 2f] -> y [rows, f] ----
at::Tensor swiglu_fwd(const at::Tensor& x) {
  check_input(x, "swiglu", "x", 2);
  TORCH_CHECK(x.size(1) % 2 == 0, "swiglu: last dim ", x.size(1), " must be even ([gate | up])");
  const int64_t rows = x.size(0), f = x.size(1) / 2;
  auto y = at::empty({rows, f}, x.options());
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "swiglu");
    c.check(gpu::swiglu_fwd(c.dtype, x.data_ptr(), y.data_ptr(), rows, f, c.stream));
#endif
    return y;
  }
  cpu_dispatch(x, "swiglu", [&](auto tag) {
    using T = decltype(tag);
    cpu::swiglu_fwd<T>(ptr<T>(x), ptr<T>(y), rows, f, threads());
  });
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& dy, const at::Tensor& x) {
  check_input(x, "swiglu backward", "x", 2);
  const int64_t rows = x.size(0), f = x.size(1) / 2;
  check_grad(dy, {rows, f}, x, "swiglu backward");
  auto dx = at::empty_like(x);
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "swiglu backward");
    c.check(gpu::swiglu_bwd(c.dtype, dy.data_ptr(), x.data_ptr(), dx.data_ptr(), rows, f, c.stream));
#endif
    return dx;
  }
  cpu_dispatch(x, "swiglu backward", [&](auto tag) {
    using T = decltype(tag);
    cpu::swiglu_bwd<T>(ptr<T>(dy), ptr<T>(x), ptr<T>(dx), rows, f, threads());
  });
  return dx;
}

// ---- bias-GeLU: x [rows, f], bias [f] or None; backward returns (dx, dbias or empty) ----
at::Tensor bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_input(x, "bias_gelu", "x", 2);
  const int64_t rows = x.size(0), f = x.size(1);
  auto b = bias_or_zeros(bias, x, f, "bias_gelu");
  auto y = at::empty_like(x);
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "bias_gelu");
    c.check(gpu::bias_gelu_fwd(c.dtype, x.data_ptr(), ptr<float>(b), y.data_ptr(), rows, f, c.stream));
#endif
    return y;
  }
  cpu_dispatch(x, "bias_gelu", [&](auto tag) {
    using T = decltype(tag);
    cpu::bias_gelu_fwd<T>(ptr<T>(x), acc_ptr<T>(b), ptr<T>(y), rows, f, threads());
  });
  return y;
}

Tensors bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                      bool want_dbias) {
  check_input(x, "bias_gelu backward", "x", 2);
  check_grad(dy, x.sizes(), x, "bias_gelu backward");
  const int64_t rows = x.size(0), f = x.size(1);
  auto b = bias_or_zeros(bias, x, f, "bias_gelu backward");
  auto dx = at::empty_like(x);
  auto dbias = want_dbias ? acc_empty({f}, x) : at::Tensor();
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "bias_gelu backward");
    auto ws = want_dbias ? c.workspace(x, gpu::bias_gelu_bwd_workspace(c.dtype, dy.data_ptr(), x.data_ptr(),
                                                                         ptr<float>(b), dx.data_ptr(), rows, f))
                         : at::Tensor();
    c.check(gpu::bias_gelu_bwd(c.dtype, dy.data_ptr(), x.data_ptr(), ptr<float>(b), dx.data_ptr(),
                               want_dbias ? ptr<float>(dbias) : nullptr,
                               want_dbias ? ptr<float>(ws) : nullptr, rows, f, c.stream));
#endif
    return {dx, dbias};
  }
  cpu_dispatch(x, "bias_gelu backward", [&](auto tag) {
    using T = decltype(tag);
    cpu::bias_gelu_bwd<T>(ptr<T>(dy), ptr<T>(x), acc_ptr<T>(b), ptr<T>(dx),
                          want_dbias ? acc_ptr<T>(dbias) : nullptr, rows, f, threads());
  });
  return {dx, dbias};
}

// ---- Scaled causal softmax: [batch·heads, sq, sk] ----
at::Tensor causal_softmax_fwd(const at::Tensor& x, double scale) {
  check_input(x, "causal_softmax", "scores", 3);
  const int64_t batch = x.size(0), sq = x.size(1), sk = x.size(2);
  auto y = at::empty_like(x);
  MLITE_ON_CUDA(x) {
#ifdef WITH_CUDA
    CudaCall c(x, "causal_softmax");
    c.check(gpu::causal_softmax_fwd(c.dtype, x.data_ptr(), y.data_ptr(), batch, sq, sk, float(scale), c.stream));
#endif
    return y;
  }
  cpu_dispatch(x, "causal_softmax", [&](auto tag) {
    using T = decltype(tag);
    cpu::causal_softmax_fwd<T>(ptr<T>(x), ptr<T>(y), batch, sq, sk, scale, threads());
  });
  return y;
}

at::Tensor causal_softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale) {
  check_input(y, "causal_softmax backward", "y", 3);
  check_grad(dy, y.sizes(), y, "causal_softmax backward");
  const int64_t batch = y.size(0), sq = y.size(1), sk = y.size(2);
  auto dx = at::empty_like(y);
  MLITE_ON_CUDA(y) {
#ifdef WITH_CUDA
    CudaCall c(y, "causal_softmax backward");
    c.check(gpu::causal_softmax_bwd(c.dtype, dy.data_ptr(), y.data_ptr(), dx.data_ptr(), batch, sq, sk,
                                    float(scale), c.stream));
#endif
    return dx;
  }
  cpu_dispatch(y, "causal_softmax backward", [&](auto tag) {
    using T = decltype(tag);
    cpu::causal_softmax_bwd<T>(ptr<T>(dy), ptr<T>(y), ptr<T>(dx), batch, sq, sk, scale, threads());
  });
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_lite fused kernels (CPU, and CUDA when built with WITH_CUDA)";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("rms_norm_fwd", &rms_norm_fwd);
  m.def("rms_norm_bwd", &rms_norm_bwd);
  m.def("layer_norm_fwd", &layer_norm_fwd);
  m.def("layer_norm_bwd", &layer_norm_bwd);
  m.def("rotary", &rotary);
  m.def("swiglu_fwd", &swiglu_fwd);
  m.def("swiglu_bwd", &swiglu_bwd);
  m.def("bias_gelu_fwd", &bias_gelu_fwd);
  m.def("bias_gelu_bwd", &bias_gelu_bwd);
  m.def("causal_softmax_fwd", &causal_softmax_fwd);
  m.def("causal_softmax_bwd", &causal_softmax_bwd);
}
