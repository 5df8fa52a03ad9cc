// Rotary position embedding on CPU (rotate-half pairs i and i + d/2), OpenMP across (batch, position).
#include "kernels.h"

namespace mlite::cpu {

template <typename T>
void rotary(const T* x, const acc_t<T>* cos, const acc_t<T>* sin, T* y, int64_t rows, int64_t s,
            int64_t n, int64_t d, bool inverse, int threads) {
  using A = acc_t<T>;
  const int64_t half = d / 2;
  // The backward pass rotates by −θ: the transpose of a rotation.
  const A sign = inverse ? A(-1) : A(1);
  for_rows<A>(rows, n * d, threads, 0, nullptr, [=](int64_t r, A*) {
    const A* c = cos + (r % s) * half;
    const A* sn = sin + (r % s) * half;
    for (int64_t head = 0; head < n; ++head) {
      const T* xr = x + (r * n + head) * d;
      T* yr = y + (r * n + head) * d;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const A x1 = load<A>(xr[i]), x2 = load<A>(xr[i + half]);
        const A si = sign * sn[i];
        yr[i] = store<T>(x1 * c[i] - x2 * si);
        yr[i + half] = store<T>(x2 * c[i] + x1 * si);
      }
    }
  });
}

MLITE_INSTANTIATE_CPU(rotary)

}  // namespace mlite::cpu
