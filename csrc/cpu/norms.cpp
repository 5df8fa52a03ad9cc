// RMSNorm and LayerNorm on CPU: one row per task, OpenMP across rows; statistics and the weight/bias
// gradients accumulate in acc_t (per-thread partial sums, added up once at the end).
#include "kernels.h"

namespace mlite::cpu {

template <typename T>
void rms_norm_fwd(const T* x, const acc_t<T>* w, T* y, acc_t<T>* rstd, int64_t rows, int64_t h,
                  double eps, int threads) {
  using A = acc_t<T>;
  for_rows<A>(rows, h, threads, 0, nullptr, [=](int64_t r, A*) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    A sumsq = 0;
#pragma omp simd reduction(+ : sumsq)
    for (int64_t i = 0; i < h; ++i) sumsq += load<A>(xr[i]) * load<A>(xr[i]);
    const A rs = A(1) / std::sqrt(sumsq / A(h) + A(eps));
    rstd[r] = rs;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) yr[i] = store<T>(load<A>(xr[i]) * rs * w[i]);
  });
}

// With x̂ = x·rstd and g = dy·w: dx = rstd·(g − x̂·mean(g·x̂)), dw = Σ_rows dy·x̂.
template <typename T>
void rms_norm_bwd(const T* dy, const T* x, const acc_t<T>* w, const acc_t<T>* rstd, T* dx,
                  acc_t<T>* dw, int64_t rows, int64_t h, int threads) {
  using A = acc_t<T>;
  for_rows<A>(rows, h, threads, h, dw, [=](int64_t r, A* dw_part) {
    const T* xr = x + r * h;
    const T* dyr = dy + r * h;
    T* dxr = dx + r * h;
    const A rs = rstd[r];
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < h; ++i) dot += load<A>(dyr[i]) * w[i] * load<A>(xr[i]);
    const A c = dot * rs * rs * rs / A(h);
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) {
      const A xi = load<A>(xr[i]), dyi = load<A>(dyr[i]);
      dxr[i] = store<T>(rs * dyi * w[i] - c * xi);
      dw_part[i] += dyi * xi * rs;
    }
  });
}

template <typename T>
void layer_norm_fwd(const T* x, const acc_t<T>* w, const acc_t<T>* b, T* y, acc_t<T>* mean,
                    acc_t<T>* rstd, int64_t rows, int64_t h, double eps, int threads) {
  using A = acc_t<T>;
  for_rows<A>(rows, h, threads, 0, nullptr, [=](int64_t r, A*) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < h; ++i) sum += load<A>(xr[i]);
    const A mu0 = sum / A(h);
    // Second pass over the (cached) row: the variance of x − mu0 (no E[x²] − E[x]² cancellation),
    // and Σ(x − mu0), which corrects the rounding error of mu0 (the corrected two-pass algorithm).
    A sumd = 0, sumsq = 0;
#pragma omp simd reduction(+ : sumd, sumsq)
    for (int64_t i = 0; i < h; ++i) {
      const A d = load<A>(xr[i]) - mu0;
      sumd += d;
      sumsq += d * d;
    }
    const A mu = mu0 + sumd / A(h);
    const A rs = A(1) / std::sqrt((sumsq - sumd * sumd / A(h)) / A(h) + A(eps));
    mean[r] = mu;
    rstd[r] = rs;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) yr[i] = store<T>((load<A>(xr[i]) - mu) * rs * w[i] + b[i]);
  });
}

// With x̂ = (x − mean)·rstd and g = dy·w: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),
// dw = Σ_rows dy·x̂, db = Σ_rows dy.
template <typename T>
void layer_norm_bwd(const T* dy, const T* x, const acc_t<T>* w, const acc_t<T>* mean,
                    const acc_t<T>* rstd, T* dx, acc_t<T>* dwb, int64_t rows, int64_t h, int threads) {
  using A = acc_t<T>;
  for_rows<A>(rows, h, threads, 2 * h, dwb, [=](int64_t r, A* part) {
    const T* xr = x + r * h;
    const T* dyr = dy + r * h;
    T* dxr = dx + r * h;
    const A mu = mean[r], rs = rstd[r];
    A sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t i = 0; i < h; ++i) {
      const A g = load<A>(dyr[i]) * w[i];
      sum_g += g;
      sum_gx += g * (load<A>(xr[i]) - mu) * rs;
    }
    const A mean_g = sum_g / A(h), mean_gx = sum_gx / A(h);
    A* dw_part = part;
    A* db_part = part + h;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) {
      const A dyi = load<A>(dyr[i]);
      const A xhat = (load<A>(xr[i]) - mu) * rs;
      dxr[i] = store<T>(rs * (dyi * w[i] - mean_g - xhat * mean_gx));
      dw_part[i] += dyi * xhat;
      db_part[i] += dyi;
    }
  });
}

MLITE_INSTANTIATE_CPU(rms_norm_fwd)
MLITE_INSTANTIATE_CPU(rms_norm_bwd)
MLITE_INSTANTIATE_CPU(layer_norm_fwd)
MLITE_INSTANTIATE_CPU(layer_norm_bwd)

}  // namespace mlite::cpu
