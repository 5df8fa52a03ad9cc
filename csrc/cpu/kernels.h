// CPU kernels of the fused ops: raw pointers to contiguous row-major data, instantiated for
// T = float, double and bf16 (accumulation in acc_t<T>: fp32, or fp64 for double). `threads` is the
// OpenMP thread count (the bindings pass torch.get_num_threads()). Shapes are in rows × columns.
#pragma once

#include <cstdint>

#include "common.h"

namespace mlite::cpu {

// y = x / sqrt(mean(x²) + eps) · w. x, y: [rows, h]; w: [h]; rstd: [rows] (saved for backward).
template <typename T>
void rms_norm_fwd(const T* x, const acc_t<T>* w, T* y, acc_t<T>* rstd, int64_t rows, int64_t h,
                  double eps, int threads);
// dx: [rows, h]; dw: [h] (summed over rows).
template <typename T>
void rms_norm_bwd(const T* dy, const T* x, const acc_t<T>* w, const acc_t<T>* rstd, T* dx,
                  acc_t<T>* dw, int64_t rows, int64_t h, int threads);

// y = (x − mean) / sqrt(var + eps) · w + b. mean, rstd: [rows].
template <typename T>
void layer_norm_fwd(const T* x, const acc_t<T>* w, const acc_t<T>* b, T* y, acc_t<T>* mean,
                    acc_t<T>* rstd, int64_t rows, int64_t h, double eps, int threads);
// dwb: [2, h] = (dw, db), summed over rows.
template <typename T>
void layer_norm_bwd(const T* dy, const T* x, const acc_t<T>* w, const acc_t<T>* mean,
                    const acc_t<T>* rstd, T* dx, acc_t<T>* dwb, int64_t rows, int64_t h, int threads);

// Rotate-half rotary embedding. x, y: [rows = b·s, n, d]; cos, sin: [s, d/2]; row r uses position
// r mod s. inverse = true applies the transposed rotation (the backward pass).
template <typename T>
void rotary(const T* x, const acc_t<T>* cos, const acc_t<T>* sin, T* y, int64_t rows, int64_t s,
            int64_t n, int64_t d, bool inverse, int threads);

// x: [rows, 2f] = [gate | up]; y = silu(gate) · up: [rows, f]; dx: [rows, 2f].
template <typename T>
void swiglu_fwd(const T* x, T* y, int64_t rows, int64_t f, int threads);
template <typename T>
void swiglu_bwd(const T* dy, const T* x, T* dx, int64_t rows, int64_t f, int threads);

// y = gelu_tanh(x + bias). x, y, dx: [rows, f]; bias: [f]; dbias: [f] or nullptr (not wanted).
template <typename T>
void bias_gelu_fwd(const T* x, const acc_t<T>* bias, T* y, int64_t rows, int64_t f, int threads);
template <typename T>
void bias_gelu_bwd(const T* dy, const T* x, const acc_t<T>* bias, T* dx, acc_t<T>* dbias,
                   int64_t rows, int64_t f, int threads);

// Scaled causal softmax over the last dim. x, y, dy, dx: [batch, sq, sk]; query i sees keys
// j ≤ i + sk − sq; masked entries are 0 (a row that sees no key is NaN, as in PyTorch).
template <typename T>
void causal_softmax_fwd(const T* x, T* y, int64_t batch, int64_t sq, int64_t sk, double scale,
                        int threads);
template <typename T>
void causal_softmax_bwd(const T* dy, const T* y, T* dx, int64_t batch, int64_t sq, int64_t sk,
                        double scale, int threads);

}  // namespace mlite::cpu

// Explicit instantiation of a kernel template for the three CPU dtypes (used in the kernel files).
#define MLITE_INSTANTIATE_CPU(fn)                                        \
  template decltype(fn<float>) fn<float>;                                \
  template decltype(fn<double>) fn<double>;                              \
  template decltype(fn<mlite::cpu::bf16>) fn<mlite::cpu::bf16>;
