// Shared helpers of the CPU kernels: the bfloat16 storage type, fp32/fp64 accumulation, a vectorisable
// exp, and the row-parallel loop. Plain C++ (no torch headers), so each kernel file compiles in seconds.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mlite::cpu {

// bfloat16 as stored by torch (the upper 16 bits of an IEEE float); same layout as c10::BFloat16.
struct bf16 {
  uint16_t bits;
};

// Accumulation type: fp32 for fp32/bf16 inputs, fp64 for fp64 (gradcheck needs full double precision).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

template <typename A, typename T> inline A load(T v) { return A(v); }
template <typename A> inline A load(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return A(f);
}

template <typename T> inline T store(float v) { return T(v); }
template <typename T> inline T store(double v) { return T(v); }
// Round to nearest even, branch-free so the loops around it vectorise; NaN stays a quiet NaN.
template <> inline bf16 store<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16{uint16_t(v != v ? 0x7fc0u : rounded)};
}

// exp for fp32 without a libm call, so `omp simd` loops vectorise: 2^n · e^r with |r| ≤ ln2/2 and a
// degree-6 Taylor polynomial (relative error ~1e-7). Inputs below -87.3 give exactly 0.
inline float fast_exp(float x) {
  float xc = x < -87.3f ? -87.3f : x; xc = xc > 88.7f ? 88.7f : xc;
  // Round to nearest by adding and subtracting 1.5·2^23 (std::floor/nearbyint block vectorisation).
  const float n = (xc * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = xc - n * 0.693145752f - n * 1.42860677e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.f : p * scale;
}

template <typename A> struct Math;
template <> struct Math<float> {
  static float exp(float x) { return fast_exp(x); }
  static float tanh(float x) { return 1.f - 2.f / (1.f + fast_exp(2.f * x)); }
};
template <> struct Math<double> {
  static double exp(double x) { return std::exp(x); }
  static double tanh(double x) { return std::tanh(x); }
};

// Runs f(row, scratch) for every row (f should capture by value, see below), rows spread over `threads` OpenMP threads; each thread owns a
// zeroed scratch buffer of `scratch` accumulators. With `column_sums`, the per-thread buffers are
// summed into it afterwards: that is how weight and bias gradients are reduced across rows without
// atomics. Small problems run on the calling thread (a parallel region costs a few microseconds).
template <typename A, typename F>
void for_rows(int64_t rows, int64_t row_work, int threads, int64_t scratch, A* column_sums, F f) {
  const bool parallel = threads > 1 && rows > 1 && rows * row_work >= (int64_t(1) << 15);
  const int used = parallel ? int(std::min<int64_t>(threads, rows)) : 1;
  std::vector<A> buffers(size_t(used) * size_t(scratch), A(0));
#pragma omp parallel num_threads(used) if (parallel)
  {
    A* mine = buffers.data() + int64_t(omp_get_thread_num()) * scratch;
    // A per-thread copy of the (by-value) closure: its pointers become locals, so the compiler hoists
    // them out of the inner loops instead of reloading them (which turned contiguous loads into gathers).
    F body = f;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) body(r, mine);
  }
  if (column_sums == nullptr) return;
  for (int64_t j = 0; j < scratch; ++j) column_sums[j] = A(0);
  for (int t = 0; t < used; ++t) {
    const A* part = buffers.data() + int64_t(t) * scratch;
#pragma omp simd
    for (int64_t j = 0; j < scratch; ++j) column_sums[j] += part[j];
  }
}

}  // namespace mlite::cpu
