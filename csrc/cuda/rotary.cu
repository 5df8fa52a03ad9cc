// Rotary position embedding on CUDA (rotate-half pairs i and i + d/2): one thread per pair and row.
#include "common.cuh"

namespace mlite::cuda {
namespace {

// Row r of x is [n, d] at position r mod s; column c < n·d/2 is pair i = c mod half of head c / half,
// i.e. elements (head·d + i, head·d + i + half) = (c + head·half, c + head·half + half). One 32-bit
// division per element and one 64-bit modulo per row (grid: row_column_grid). sign = −1 rotates by −θ
// (the backward pass).
template <typename T>
__global__ void rotary_kernel(const T* x, const float* cos, const float* sin, T* y, int64_t rows, int64_t s,
                              int64_t n, int64_t half, float sign) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n * half) return;
  const unsigned head = unsigned(c) / unsigned(half);
  const int64_t i = c - int64_t(head) * half;
  const int64_t first = c + int64_t(head) * half;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t table = (r % s) * half + i;
    const float cs = cos[table], sn = sign * sin[table];
    const T* xr = x + r * n * 2 * half;
    T* yr = y + r * n * 2 * half;
    const float x1 = to_float(xr[first]), x2 = to_float(xr[first + half]);
    yr[first] = from_float<T>(x1 * cs - x2 * sn);
    yr[first + half] = from_float<T>(x2 * cs + x1 * sn);
  }
}

}  // namespace

int rotary(DType t, const void* x, const float* cos, const float* sin, void* y, int64_t rows, int64_t s,
           int64_t n, int64_t d, bool inverse, void* stream) {
  if (rows * n * d == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T><<<row_column_grid(rows, n * (d / 2)), kColumnThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(x), cos, sin, static_cast<T*>(y), rows, s, n, d / 2, inverse ? -1.f : 1.f);
  });
}

}  // namespace mlite::cuda
