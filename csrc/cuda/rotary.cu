// Rotary position embedding on CUDA (rotate-half pairs i and i + d/2): one thread per V consecutive
// pairs of a head and row, 16-byte vectors where the heads are aligned.
#include "common.cuh"

namespace mlite::cuda {
namespace {

// Row r of x is [n, d] at position r mod s; column vector c < n·half/V covers pairs i = i0 … i0 + V − 1
// of head c / (half/V), i.e. elements head·d + i and head·d + i + half. One 32-bit division per
// vector and one 64-bit modulo per row (grid: row_column_grid). sign = −1 rotates by −θ (backward).
template <typename T, int V>
__global__ void rotary_kernel(const T* x, const float* cos, const float* sin, T* y, int64_t rows, int64_t s,
                              int64_t n, int64_t half, float sign) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_head = half / V;
  if (c >= n * per_head) return;
  const unsigned head = unsigned(c) / unsigned(per_head);
  const int64_t i0 = (c - int64_t(head) * per_head) * V;
  const int64_t first = int64_t(head) * 2 * half + i0;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t table = (r % s) * half + i0;
    float cs[V], sn[V], x1[V], x2[V], y1[V], y2[V];
    load_params<V>(cos + table, cs);
    load_params<V>(sin + table, sn);
    const int64_t row = r * n * 2 * half;
    load_vec<T, V>(x + row + first, x1);
    load_vec<T, V>(x + row + first + half, x2);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float si = sign * sn[e];
      y1[e] = x1[e] * cs[e] - x2[e] * si;
      y2[e] = x2[e] * cs[e] + x1[e] * si;
    }
    store_vec<T, V>(y + row + first, y1);
    store_vec<T, V>(y + row + first + half, y2);
  }
}

}  // namespace

int rotary(DType t, const void* x, const float* cos, const float* sin, void* y, int64_t rows, int64_t s,
           int64_t n, int64_t d, bool inverse, void* stream) {
  if (rows * n * d == 0) return 0;
  const int64_t half = d / 2;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = half % kVec16<T> == 0 && aligned16({x, cos, sin, y});
    with_vec_width<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      rotary_kernel<T, V><<<row_column_grid(rows, n * (half / V)), kColumnThreads, 0, cudaStream_t(stream)>>>(
          static_cast<const T*>(x), cos, sin, static_cast<T*>(y), rows, s, n, half, inverse ? -1.f : 1.f);
    });
  });
}

}  // namespace mlite::cuda
