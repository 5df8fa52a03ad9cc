// Rotary position embedding on CUDA (rotate-half pairs i and i + d/2): one thread per pair.
#include "common.cuh"

namespace mlite::cuda {
namespace {

// pairs = rows·n·(d/2); pair p is element i = p mod half of head vector p / half, whose position
// is (vector / n) mod s. sign = −1 rotates by −θ (the backward pass).
template <typename T>
__global__ void rotary_kernel(const T* x, const float* cos, const float* sin, T* y, int64_t pairs,
                              int64_t s, int64_t n, int64_t half, float sign) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs; p += stride) {
    const int64_t i = p % half, vec = p / half;
    const int64_t table = ((vec / n) % s) * half + i;
    const float c = cos[table], sn = sign * sin[table];
    const T* xv = x + vec * 2 * half;
    T* yv = y + vec * 2 * half;
    const float x1 = to_float(xv[i]), x2 = to_float(xv[i + half]);
    yv[i] = from_float<T>(x1 * c - x2 * sn);
    yv[i + half] = from_float<T>(x2 * c + x1 * sn);
  }
}

}  // namespace

int rotary(DType t, const void* x, const float* cos, const float* sin, void* y, int64_t rows, int64_t s,
           int64_t n, int64_t d, bool inverse, void* stream) {
  const int64_t pairs = rows * n * (d / 2);
  if (pairs == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T><<<elementwise_blocks(pairs), 256, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(x), cos, sin, static_cast<T*>(y), pairs, s, n, d / 2, inverse ? -1.f : 1.f);
  });
}

}  // namespace mlite::cuda
