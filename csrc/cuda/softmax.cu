// Scaled causal softmax on CUDA: one block per (batch, query) row; only the visible keys are read,
// the masked tail is written as zeros; max and sum in fp32.
#include "common.cuh"

namespace mlite::cuda {
namespace {

// Keys visible to query i: j < i + sk − sq + 1 (bottom-right aligned, as the PyTorch reference).
__device__ __forceinline__ int64_t visible_keys(int64_t i, int64_t sq, int64_t sk) {
  const int64_t n = i + sk - sq + 1;
  return n < sk ? n : sk;
}

template <typename T>
__global__ void causal_softmax_fwd_kernel(const T* x, T* y, int64_t sq, int64_t sk, float scale) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * sk;
  T* yr = y + r * sk;
  const int64_t n = visible_keys(r % sq, sq, sk);
  if (n <= 0) {  // no visible key: softmax over an empty set, NaN as in PyTorch
    for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) yr[j] = from_float<T>(NAN);
    return;
  }
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, to_float(xr[j]) * scale);
  m = block_reduce(m, Max());
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sum += expf(to_float(xr[j]) * scale - m);
  const float inv = 1.f / block_reduce(sum, Sum());
  for (int64_t j = threadIdx.x; j < sk; j += blockDim.x)
    yr[j] = from_float<T>(j < n ? expf(to_float(xr[j]) * scale - m) * inv : 0.f);
}

// dx = scale · y · (dy − Σ_j dy_j·y_j); zero where masked.
template <typename T>
__global__ void causal_softmax_bwd_kernel(const T* dy, const T* y, T* dx, int64_t sq, int64_t sk, float scale) {
  const int64_t r = blockIdx.x;
  const T* dyr = dy + r * sk;
  const T* yr = y + r * sk;
  T* dxr = dx + r * sk;
  const int64_t n = visible_keys(r % sq, sq, sk);
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += to_float(dyr[j]) * to_float(yr[j]);
  dot = block_reduce(dot, Sum());
  for (int64_t j = threadIdx.x; j < sk; j += blockDim.x)
    dxr[j] = from_float<T>(j < n ? scale * to_float(yr[j]) * (to_float(dyr[j]) - dot) : 0.f);
}

}  // namespace

int causal_softmax_fwd(DType t, const void* x, void* y, int64_t batch, int64_t sq, int64_t sk, float scale,
                       void* stream) {
  if (batch * sq == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    causal_softmax_fwd_kernel<T><<<unsigned(batch * sq), row_threads(sk), 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), sq, sk, scale);
  });
}

int causal_softmax_bwd(DType t, const void* dy, const void* y, void* dx, int64_t batch, int64_t sq, int64_t sk,
                       float scale, void* stream) {
  if (batch * sq == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    causal_softmax_bwd_kernel<T><<<unsigned(batch * sq), row_threads(sk), 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<T*>(dx), sq, sk, scale);
  });
}

}  // namespace mlite::cuda
