// SwiGLU and bias-GeLU (tanh approximation) on CPU: one pass over memory instead of PyTorch's
// chain of elementwise kernels; OpenMP across rows, exp/tanh inlined so the loops vectorise.
#include "kernels.h"

namespace mlite::cpu {

template <typename A> inline A sigmoid(A v) { return A(1) / (A(1) + Math<A>::exp(-v)); }

template <typename T>
void swiglu_fwd(const T* x, T* y, int64_t rows, int64_t f, int threads) {
  using A = acc_t<T>;
  for_rows<A>(rows, 2 * f, threads, 0, nullptr, [=](int64_t r, A*) {
    const T* gate = x + r * 2 * f;
    const T* up = gate + f;
    T* yr = y + r * f;
#pragma omp simd
    for (int64_t i = 0; i < f; ++i) {
      const A g = load<A>(gate[i]);
      yr[i] = store<T>(g * sigmoid(g) * load<A>(up[i]));
    }
  });
}

// d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g))).
template <typename T>
void swiglu_bwd(const T* dy, const T* x, T* dx, int64_t rows, int64_t f, int threads) {
  using A = acc_t<T>;
  for_rows<A>(rows, 3 * f, threads, 0, nullptr, [=](int64_t r, A*) {
    const T* gate = x + r * 2 * f;
    const T* up = gate + f;
    const T* dyr = dy + r * f;
    T* dgate = dx + r * 2 * f;
    T* dup = dgate + f;
#pragma omp simd
    for (int64_t i = 0; i < f; ++i) {
      const A g = load<A>(gate[i]), u = load<A>(up[i]), d = load<A>(dyr[i]);
      const A sig = sigmoid(g);
      dgate[i] = store<T>(d * u * sig * (A(1) + g * (A(1) - sig)));
      dup[i] = store<T>(d * g * sig);
    }
  });
}

// gelu(v) = v/2 · (1 + tanh(k·(v + 0.044715·v³))), k = √(2/π).
constexpr double kGeluK = 0.7978845608028654;
constexpr double kGeluC = 0.044715;

template <typename T>
void bias_gelu_fwd(const T* x, const acc_t<T>* bias, T* y, int64_t rows, int64_t f, int threads) {
  using A = acc_t<T>;
  for_rows<A>(rows, f, threads, 0, nullptr, [=](int64_t r, A*) {
    const T* xr = x + r * f;
    T* yr = y + r * f;
#pragma omp simd
    for (int64_t i = 0; i < f; ++i) {
      const A v = load<A>(xr[i]) + bias[i];
      const A t = Math<A>::tanh(A(kGeluK) * (v + A(kGeluC) * v * v * v));
      yr[i] = store<T>(A(0.5) * v * (A(1) + t));
    }
  });
}

template <typename T>
void bias_gelu_bwd(const T* dy, const T* x, const acc_t<T>* bias, T* dx, acc_t<T>* dbias,
                   int64_t rows, int64_t f, int threads) {
  using A = acc_t<T>;
  // dbias needs per-thread column sums; without it the scratch buffer is empty and never touched.
  const int64_t scratch = dbias ? f : 0;
  for_rows<A>(rows, f, threads, scratch, dbias, [=](int64_t r, A* part) {
    const T* xr = x + r * f;
    const T* dyr = dy + r * f;
    T* dxr = dx + r * f;
    auto grad = [=](int64_t i) {
      const A v = load<A>(xr[i]) + bias[i];
      const A t = Math<A>::tanh(A(kGeluK) * (v + A(kGeluC) * v * v * v));
      const A dt = (A(1) - t * t) * A(kGeluK) * (A(1) + A(3 * kGeluC) * v * v);
      return load<A>(dyr[i]) * A(0.5) * (A(1) + t + v * dt);
    };
    if (part) {
#pragma omp simd
      for (int64_t i = 0; i < f; ++i) {
        const A g = grad(i);
        dxr[i] = store<T>(g);
        part[i] += g;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < f; ++i) dxr[i] = store<T>(grad(i));
    }
  });
}

MLITE_INSTANTIATE_CPU(swiglu_fwd)
MLITE_INSTANTIATE_CPU(swiglu_bwd)
MLITE_INSTANTIATE_CPU(bias_gelu_fwd)
MLITE_INSTANTIATE_CPU(bias_gelu_bwd)

}  // namespace mlite::cpu
