// Launcher API of the CUDA kernels: plain C++ (no CUDA or torch headers), raw device pointers to
// contiguous row-major data, fp32 statistics, weights and biases. Each launcher enqueues its kernels on
// `stream` (a cudaStream_t) on the current device and returns the cudaError_t of the launch (0 on
// success). Empty inputs (no rows, or h = 0) launch nothing; a gradient summed over zero rows is 0.
#pragma once

#include <cstdint>

namespace mlite::cuda {

// Element type of the activations (x, y, dy, dx); everything else is fp32.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

int rms_norm_fwd(DType t, const void* x, const float* w, void* y, float* rstd, int64_t rows,
                 int64_t h, float eps, void* stream);
// Floats of scratch memory rms_norm_bwd needs for these arguments (its grid depends on the device,
// the dtype and the pointers' alignment).
int64_t rms_norm_bwd_workspace(DType t, const void* dy, const void* x, const float* w, const void* dx,
                               int64_t rows, int64_t h);
int rms_norm_bwd(DType t, const void* dy, const void* x, const float* w, const float* rstd, void* dx,
                 float* dw, float* workspace, int64_t rows, int64_t h, void* stream);

int layer_norm_fwd(DType t, const void* x, const float* w, const float* b, void* y, float* mean,
                   float* rstd, int64_t rows, int64_t h, float eps, void* stream);
int64_t layer_norm_bwd_workspace(DType t, const void* dy, const void* x, const float* w, const void* dx,
                                 int64_t rows, int64_t h);
// dwb: [2, h] = (dw, db).
int layer_norm_bwd(DType t, const void* dy, const void* x, const float* w, const float* mean,
                   const float* rstd, void* dx, float* dwb, float* workspace, int64_t rows,
                   int64_t h, void* stream);

// x, y: [rows = b·s, n, d]; cos, sin: [s, d/2]; inverse = backward (rotation by −θ).
int rotary(DType t, const void* x, const float* cos, const float* sin, void* y, int64_t rows,
           int64_t s, int64_t n, int64_t d, bool inverse, void* stream);

int swiglu_fwd(DType t, const void* x, void* y, int64_t rows, int64_t f, void* stream);
int swiglu_bwd(DType t, const void* dy, const void* x, void* dx, int64_t rows, int64_t f,
               void* stream);

// bias: [f]; dbias: [f] or nullptr (then workspace may be nullptr too).
int bias_gelu_fwd(DType t, const void* x, const float* bias, void* y, int64_t rows, int64_t f,
                  void* stream);
int64_t bias_gelu_bwd_workspace(DType t, const void* dy, const void* x, const float* bias,
                                const void* dx, int64_t rows, int64_t f);
int bias_gelu_bwd(DType t, const void* dy, const void* x, const float* bias, void* dx, float* dbias,
                  float* workspace, int64_t rows, int64_t f, void* stream);

// x, y, dy, dx: [batch, sq, sk]; query i sees keys j ≤ i + sk − sq.
int causal_softmax_fwd(DType t, const void* x, void* y, int64_t batch, int64_t sq, int64_t sk,
                       float scale, void* stream);
int causal_softmax_bwd(DType t, const void* dy, const void* y, void* dx, int64_t batch, int64_t sq,
                       int64_t sk, float scale, void* stream);

}  // namespace mlite::cuda
