// Device helpers shared by the CUDA kernels: fp32 conversion of the element types, block-wide
// reductions, dtype dispatch, and the two-stage column sum used for weight and bias gradients.
// Only CUDA headers: every .cu compiles with plain nvcc, without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace mlite::cuda {

// Explicit conversions only: torch's extension build defines __CUDA_NO_HALF_OPERATORS__.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct Sum {
  static constexpr float identity = 0.f;
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  static constexpr float identity = -INFINITY;
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces v over the block (blockDim.x a multiple of 32) and returns the result to every thread.
// Safe to call several times in a row: the first barrier waits for readers of the previous call.
template <typename Op> __device__ float block_reduce(float v, Op op) {
  __shared__ float warp_results[32];
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? warp_results[lane] : Op::identity;
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Threads per block for a row of n elements: a power of two from 32 to 512, ~4 elements a thread.
inline int row_threads(int64_t n) {
  int threads = 32;
  while (threads < 512 && int64_t(threads) * 4 < n) threads *= 2;
  return threads;
}

// Grid of the row-wise elementwise kernels, 256 threads per block: x covers the columns of a row,
// y strides over rows (at most 65535 of them at once). Indexing by (row, column) this way avoids a
// 64-bit division per element, which would make these memory-bound kernels compute-bound.
constexpr int kColumnThreads = 256;
inline dim3 row_column_grid(int64_t rows, int64_t cols) {
  return dim3(unsigned((cols + kColumnThreads - 1) / kColumnThreads), unsigned(rows < 65535 ? rows : 65535));
}

// Backward kernels that reduce over rows run this many blocks, each owning one row of a
// [blocks, width] fp32 partial-sum workspace; sum_partials then adds the rows up.
inline int64_t reduce_blocks(int64_t rows) { return rows < 256 ? (rows > 0 ? rows : 1) : 256; }

static __global__ void sum_partials(const float* partials, float* out, int64_t blocks, int64_t width) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= width) return;
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) acc += partials[b * width + c];
  out[c] = acc;
}

inline void launch_sum_partials(const float* partials, float* out, int64_t rows, int64_t width,
                                cudaStream_t stream) {
  sum_partials<<<unsigned((width + 255) / 256), 256, 0, stream>>>(partials, out, reduce_blocks(rows), width);
}

// Calls f(T{}) with the element type named by t; returns the launch status.
template <typename F> int dispatch(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); break;
    case DType::f16: f(__half{}); break;
    case DType::bf16: f(__nv_bfloat16{}); break;
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}

}  // namespace mlite::cuda
