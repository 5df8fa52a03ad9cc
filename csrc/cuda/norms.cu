// RMSNorm and LayerNorm on CUDA. Forward: one block per row, fp32 statistics. Backward: a fixed grid
// of blocks strides over rows, each block accumulating its weight/bias gradient partial sums in its
// own workspace row, which sum_partials reduces afterwards (deterministic, no atomics).
#include "common.cuh"

namespace mlite::cuda {
namespace {

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* x, const float* w, T* y, float* rstd, int64_t h, float eps) {
  const T* xr = x + int64_t(blockIdx.x) * h;
  T* yr = y + int64_t(blockIdx.x) * h;
  float sumsq = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const float v = to_float(xr[i]);
    sumsq += v * v;
  }
  const float rs = rsqrtf(block_reduce(sumsq, Sum()) / float(h) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) yr[i] = from_float<T>(to_float(xr[i]) * rs * w[i]);
}

// dx = rstd·(g − x̂·mean(g·x̂)) with g = dy·w, x̂ = x·rstd; partial dw += dy·x̂.
template <typename T>
__global__ void rms_norm_bwd_kernel(const T* dy, const T* x, const float* w, const float* rstd, T* dx,
                                    float* partials, int64_t rows, int64_t h) {
  float* dw_part = partials + int64_t(blockIdx.x) * h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) dw_part[i] = 0.f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * h;
    const T* dyr = dy + r * h;
    T* dxr = dx + r * h;
    const float rs = rstd[r];
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) dot += to_float(dyr[i]) * w[i] * to_float(xr[i]);
    const float c = block_reduce(dot, Sum()) * rs * rs * rs / float(h);
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      const float xi = to_float(xr[i]), dyi = to_float(dyr[i]);
      dxr[i] = from_float<T>(rs * dyi * w[i] - c * xi);
      dw_part[i] += dyi * xi * rs;
    }
  }
}

template <typename T>
__global__ void layer_norm_fwd_kernel(const T* x, const float* w, const float* b, T* y, float* mean,
                                      float* rstd, int64_t h, float eps) {
  const T* xr = x + int64_t(blockIdx.x) * h;
  T* yr = y + int64_t(blockIdx.x) * h;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) sum += to_float(xr[i]);
  const float mu0 = block_reduce(sum, Sum()) / float(h);
  // Second pass over the cached row: variance of x − mu0 (no E[x²] − E[x]² cancellation) and
  // Σ(x − mu0), which corrects the rounding error of mu0 (corrected two-pass algorithm).
  float sumd = 0.f, sumsq = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const float d = to_float(xr[i]) - mu0;
    sumd += d;
    sumsq += d * d;
  }
  sumd = block_reduce(sumd, Sum());
  sumsq = block_reduce(sumsq, Sum());
  const float mu = mu0 + sumd / float(h);
  const float rs = rsqrtf((sumsq - sumd * sumd / float(h)) / float(h) + eps);
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = mu;
    rstd[blockIdx.x] = rs;
  }
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x)
    yr[i] = from_float<T>((to_float(xr[i]) - mu) * rs * w[i] + b[i]);
}

// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)); partial dw += dy·x̂ (columns [0, h)), db += dy ([h, 2h)).
template <typename T>
__global__ void layer_norm_bwd_kernel(const T* dy, const T* x, const float* w, const float* mean,
                                      const float* rstd, T* dx, float* partials, int64_t rows, int64_t h) {
  float* dw_part = partials + int64_t(blockIdx.x) * 2 * h;
  float* db_part = dw_part + h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) dw_part[i] = db_part[i] = 0.f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * h;
    const T* dyr = dy + r * h;
    T* dxr = dx + r * h;
    const float mu = mean[r], rs = rstd[r];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      const float g = to_float(dyr[i]) * w[i];
      sum_g += g;
      sum_gx += g * (to_float(xr[i]) - mu) * rs;
    }
    const float mean_g = block_reduce(sum_g, Sum()) / float(h);
    const float mean_gx = block_reduce(sum_gx, Sum()) / float(h);
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      const float dyi = to_float(dyr[i]);
      const float xhat = (to_float(xr[i]) - mu) * rs;
      dxr[i] = from_float<T>(rs * (dyi * w[i] - mean_g - xhat * mean_gx));
      dw_part[i] += dyi * xhat;
      db_part[i] += dyi;
    }
  }
}

}  // namespace

int64_t column_sum_workspace(int64_t rows, int64_t width) { return reduce_blocks(rows) * width; }

int rms_norm_fwd(DType t, const void* x, const float* w, void* y, float* rstd, int64_t rows, int64_t h,
                 float eps, void* stream) {
  if (rows == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_fwd_kernel<T><<<unsigned(rows), row_threads(h), 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(x), w, static_cast<T*>(y), rstd, h, eps);
  });
}

int rms_norm_bwd(DType t, const void* dy, const void* x, const float* w, const float* rstd, void* dx,
                 float* dw, float* workspace, int64_t rows, int64_t h, void* stream) {
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_bwd_kernel<T><<<unsigned(reduce_blocks(rows)), row_threads(h), 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), w, rstd, static_cast<T*>(dx), workspace, rows, h);
    launch_sum_partials(workspace, dw, rows, h, cudaStream_t(stream));
  });
}

int layer_norm_fwd(DType t, const void* x, const float* w, const float* b, void* y, float* mean,
                   float* rstd, int64_t rows, int64_t h, float eps, void* stream) {
  if (rows == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    layer_norm_fwd_kernel<T><<<unsigned(rows), row_threads(h), 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(x), w, b, static_cast<T*>(y), mean, rstd, h, eps);
  });
}

int layer_norm_bwd(DType t, const void* dy, const void* x, const float* w, const float* mean,
                   const float* rstd, void* dx, float* dwb, float* workspace, int64_t rows, int64_t h,
                   void* stream) {
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    layer_norm_bwd_kernel<T><<<unsigned(reduce_blocks(rows)), row_threads(h), 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), w, mean, rstd, static_cast<T*>(dx), workspace,
        rows, h);
    launch_sum_partials(workspace, dwb, rows, 2 * h, cudaStream_t(stream));
  });
}

}  // namespace mlite::cuda
