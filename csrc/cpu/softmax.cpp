// Scaled causal softmax on CPU: one (batch, query) row per task; only the visible keys are read and
// exponentiated (about half the work of masking a full row), the masked tail is written as zeros.
#include <limits>

#include "kernels.h"

namespace mlite::cpu {

// Keys visible to query i: j < i + sk − sq + 1 (bottom-right aligned, as the reference's triu).
inline int64_t visible_keys(int64_t i, int64_t sq, int64_t sk) {
  return std::min(sk, i + sk - sq + 1);
}

template <typename T>
void causal_softmax_fwd(const T* x, T* y, int64_t batch, int64_t sq, int64_t sk, double scale,
                        int threads) {
  using A = acc_t<T>;
  const A sc = A(scale);
  for_rows<A>(batch * sq, sk, threads, sk, nullptr, [=](int64_t r, A* e) {
    const T* xr = x + r * sk;
    T* yr = y + r * sk;
    const int64_t n = visible_keys(r % sq, sq, sk);
    if (n <= 0) {  // no visible key: softmax over an empty set
      for (int64_t j = 0; j < sk; ++j) yr[j] = store<T>(std::numeric_limits<A>::quiet_NaN());
      return;
    }
    A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, load<A>(xr[j]) * sc);
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      e[j] = Math<A>::exp(load<A>(xr[j]) * sc - m);
      sum += e[j];
    }
    const A inv = A(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yr[j] = store<T>(e[j] * inv);
    for (int64_t j = n; j < sk; ++j) yr[j] = store<T>(A(0));
  });
}

// dx = scale · y · (dy − Σ_j dy_j·y_j); zero where masked.
template <typename T>
void causal_softmax_bwd(const T* dy, const T* y, T* dx, int64_t batch, int64_t sq, int64_t sk,
                        double scale, int threads) {
  using A = acc_t<T>;
  const A sc = A(scale);
  for_rows<A>(batch * sq, sk, threads, 0, nullptr, [=](int64_t r, A*) {
    const T* dyr = dy + r * sk;
    const T* yr = y + r * sk;
    T* dxr = dx + r * sk;
    const int64_t n = std::max<int64_t>(visible_keys(r % sq, sq, sk), 0);
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) dot += load<A>(dyr[j]) * load<A>(yr[j]);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dxr[j] = store<T>(sc * load<A>(yr[j]) * (load<A>(dyr[j]) - dot));
    for (int64_t j = n; j < sk; ++j) dxr[j] = store<T>(A(0));
  });
}

MLITE_INSTANTIATE_CPU(causal_softmax_fwd)
MLITE_INSTANTIATE_CPU(causal_softmax_bwd)

}  // namespace mlite::cpu
