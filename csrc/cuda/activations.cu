// SwiGLU and bias-GeLU (tanh approximation) on CUDA: one read and one write per element instead of
// PyTorch's chain of elementwise kernels. The bias gradient is reduced like the norms' weight gradient.
#include "common.cuh"

namespace mlite::cuda {
namespace {

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// x: [rows, 2f] = [gate | up]; thread (row r, column i) computes y[r, i] (grid: row_column_grid).
template <typename T>
__global__ void swiglu_fwd_kernel(const T* x, T* y, int64_t rows, int64_t f) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= f) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float g = to_float(x[r * 2 * f + i]), u = to_float(x[r * 2 * f + f + i]);
    y[r * f + i] = from_float<T>(g * sigmoid(g) * u);
  }
}

// d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g))).
template <typename T>
__global__ void swiglu_bwd_kernel(const T* dy, const T* x, T* dx, int64_t rows, int64_t f) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= f) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t gi = r * 2 * f + i, ui = gi + f;
    const float g = to_float(x[gi]), u = to_float(x[ui]), d = to_float(dy[r * f + i]);
    const float sig = sigmoid(g);
    dx[gi] = from_float<T>(d * u * sig * (1.f + g * (1.f - sig)));
    dx[ui] = from_float<T>(d * g * sig);
  }
}

// gelu(v) = v/2 · (1 + tanh(k·(v + 0.044715·v³))), k = √(2/π).
constexpr float kGeluK = 0.7978845608028654f;
constexpr float kGeluC = 0.044715f;

template <typename T>
__global__ void bias_gelu_fwd_kernel(const T* x, const float* bias, T* y, int64_t rows, int64_t f) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= f) return;
  const float b = bias[i];
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float v = to_float(x[r * f + i]) + b;
    y[r * f + i] = from_float<T>(0.5f * v * (1.f + tanhf(kGeluK * (v + kGeluC * v * v * v))));
  }
}

// Blocks stride over rows, threads over columns; with partials, each block sums dx over its rows
// into its workspace row (the bias gradient before sum_partials).
template <typename T>
__global__ void bias_gelu_bwd_kernel(const T* dy, const T* x, const float* bias, T* dx, float* partials,
                                     int64_t rows, int64_t f) {
  float* part = partials ? partials + int64_t(blockIdx.x) * f : nullptr;
  for (int64_t i = threadIdx.x; i < f; i += blockDim.x) {
    float acc = 0.f;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
      const int64_t e = r * f + i;
      const float v = to_float(x[e]) + bias[i];
      const float t = tanhf(kGeluK * (v + kGeluC * v * v * v));
      const float dt = (1.f - t * t) * kGeluK * (1.f + 3.f * kGeluC * v * v);
      const float g = to_float(dy[e]) * 0.5f * (1.f + t + v * dt);
      dx[e] = from_float<T>(g);
      acc += g;
    }
    if (part) part[i] = acc;
  }
}

}  // namespace

int swiglu_fwd(DType t, const void* x, void* y, int64_t rows, int64_t f, void* stream) {
  if (rows * f == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    swiglu_fwd_kernel<T><<<row_column_grid(rows, f), kColumnThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), rows, f);
  });
}

int swiglu_bwd(DType t, const void* dy, const void* x, void* dx, int64_t rows, int64_t f, void* stream) {
  if (rows * f == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    swiglu_bwd_kernel<T><<<row_column_grid(rows, f), kColumnThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), rows, f);
  });
}

int bias_gelu_fwd(DType t, const void* x, const float* bias, void* y, int64_t rows, int64_t f, void* stream) {
  if (rows * f == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    bias_gelu_fwd_kernel<T><<<row_column_grid(rows, f), kColumnThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(x), bias, static_cast<T*>(y), rows, f);
  });
}

int bias_gelu_bwd(DType t, const void* dy, const void* x, const float* bias, void* dx, float* dbias,
                  float* workspace, int64_t rows, int64_t f, void* stream) {
  if (f == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    bias_gelu_bwd_kernel<T><<<unsigned(reduce_blocks(rows)), row_threads(f), 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), bias, static_cast<T*>(dx),
        dbias ? workspace : nullptr, rows, f);
    if (dbias) launch_sum_partials(workspace, dbias, rows, f, cudaStream_t(stream));
  });
}

}  // namespace mlite::cuda
