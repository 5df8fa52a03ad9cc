// RMSNorm and LayerNorm on CUDA, one kernel template for both (RMSNorm is LayerNorm without the mean
// and the bias). A block handles one row at a time and strides over rows; the grid is what fits on
// the GPU at once (SM count × resident blocks). Rows are read with 16-byte vector loads where they are
// aligned and held in registers (RowRegisters), so each row is read from memory once per kernel;
// statistics in fp32.
//
// Backward: the weight/bias gradient partial sums of a block's rows stay in registers (each thread
// owns the same columns of every row) and are written once, to the block's row of a [blocks, P·h]
// workspace that sum_partials reduces afterwards: deterministic, no atomics. Rows longer than one tile
// (h > 8192 elements) accumulate in the workspace row instead.
#include "common.cuh"

namespace mlite::cuda {
namespace {

// fp32 registers per thread per row: the forward holds one row, the backward two (x, dy) plus the
// weight and 1–2 partial sums per element.
constexpr int kFwdSmall = 8, kFwdLarge = 32, kBwdElements = 8;

// y = (x − mean)·rstd·w + b (LayerNorm; corrected two-pass mean and variance) or x·rstd·w (RMSNorm).
template <typename T, int V, int N, bool kLayerNorm>
__global__ void __launch_bounds__(1024)
    norm_fwd_kernel(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t rows,
                    int64_t h, float eps) {
  const int64_t nvec = h / V;
  RowRegisters<T, V, N> xs(nvec);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * h;
    xs.start_row(nvec);
    float mu = 0.f, rs;
    if constexpr (kLayerNorm) {
      float sum = 0.f;
      xs.vectors(xr, [&](int k, int64_t) {
#pragma unroll
        for (int e = 0; e < V; ++e) sum += xs.v[k][e];
      });
      const float mu0 = block_reduce(sum, Sum()) / float(h);
      // Variance of x − mu0 (no E[x²] − E[x]² cancellation) and Σ(x − mu0), which corrects the
      // rounding error of mu0.
      float sumd = 0.f, sumsq = 0.f;
      xs.vectors(xr, [&](int k, int64_t) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float d = xs.v[k][e] - mu0;
          sumd += d;
          sumsq += d * d;
        }
      });
      sumd = block_reduce(sumd, Sum());
      sumsq = block_reduce(sumsq, Sum());
      mu = mu0 + sumd / float(h);
      rs = rsqrtf((sumsq - sumd * sumd / float(h)) / float(h) + eps);
    } else {
      float sumsq = 0.f;
      xs.vectors(xr, [&](int k, int64_t) {
#pragma unroll
        for (int e = 0; e < V; ++e) sumsq += xs.v[k][e] * xs.v[k][e];
      });
      rs = rsqrtf(block_reduce(sumsq, Sum()) / float(h) + eps);
    }
    if (threadIdx.x == 0) {
      rstd[r] = rs;
      if constexpr (kLayerNorm) mean[r] = mu;
    }
    xs.vectors(xr, [&](int k, int64_t j) {
      float wv[V], bv[V], out[V];
      load_params<V>(w + j * V, wv);
      if constexpr (kLayerNorm) load_params<V>(b + j * V, bv);
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = (xs.v[k][e] - mu) * rs * wv[e] + (kLayerNorm ? bv[e] : 0.f);
      store_vec<T, V>(y + r * h + j * V, out);
    });
  }
}

// With x̂ = (x − mean)·rstd (mean = 0 for RMSNorm) and g = dy·w:
//   dx = rstd·(g − mean(g) − x̂·mean(g·x̂))   (RMSNorm: without the mean(g) term),
//   partial dw += dy·x̂ (columns [0, h)), db += dy ([h, 2h), LayerNorm only).
template <typename T, int V, int N, bool kLayerNorm>
__global__ void __launch_bounds__(1024)
    norm_bwd_kernel(const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,
                    float* partials, int64_t rows, int64_t h) {
  constexpr int P = kLayerNorm ? 2 : 1;
  const int64_t nvec = h / V;
  RowRegisters<T, V, N> xs(nvec), gs(nvec);
  const bool one_tile = xs.tiles <= 1;  // then this thread's columns are the same in every row
  // RMSNorm keeps its weights in registers too; LayerNorm, with twice the partial sums, reads them
  // from L1 (holding them as well would spill at 1024 threads), and so does the scalar path.
  constexpr bool kWeightsInRegisters = !kLayerNorm && V > 1;
  float* part = partials + int64_t(blockIdx.x) * P * h;
  float wreg[N][V], acc[P][N][V];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int64_t j = xs.index(0, k);
    if (kWeightsInRegisters && one_tile && j < nvec) {
      load_params<V>(w + j * V, wreg[k]);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) wreg[k][e] = 0.f;
    }
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[p][k][e] = 0.f;
  }
  if (!one_tile) {  // the partial sums accumulate in the workspace row: zero it first
    for (int64_t i = threadIdx.x; i < P * h; i += blockDim.x) part[i] = 0.f;
    __syncthreads();
  }
  auto weights = [&](int k, int64_t j, float (&wv)[V]) {
    if (kWeightsInRegisters && one_tile) {
#pragma unroll
      for (int e = 0; e < V; ++e) wv[e] = wreg[k][e];
    } else {
      load_params<V>(w + j * V, wv);
    }
  };

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * h;
    const T* dyr = dy + r * h;
    const float mu = kLayerNorm ? mean[r] : 0.f, rs = rstd[r];
    xs.start_row(nvec);
    gs.start_row(nvec);
    float sum_g = 0.f, sum_gx = 0.f;
    xs.vectors(xr, [&](int k, int64_t j) {
      float wv[V];
      weights(k, j, wv);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float g = gs.v[k][e] * wv[e];
        sum_g += g;
        sum_gx += g * (xs.v[k][e] - mu) * rs;
      }
    }, &gs, dyr);
    const float mean_gx = block_reduce(sum_gx, Sum()) / float(h);
    const float mean_g = kLayerNorm ? block_reduce(sum_g, Sum()) / float(h) : 0.f;
    xs.vectors(xr, [&](int k, int64_t j) {
      float wv[V], out[V];
      weights(k, j, wv);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float g = gs.v[k][e];
        const float xhat = (xs.v[k][e] - mu) * rs;
        out[e] = rs * (g * wv[e] - mean_g - xhat * mean_gx);
        if (one_tile) {
          acc[0][k][e] += g * xhat;
          if constexpr (kLayerNorm) acc[P - 1][k][e] += g;
        } else {
          part[j * V + e] += g * xhat;
          if constexpr (kLayerNorm) part[h + j * V + e] += g;
        }
      }
      store_vec<T, V>(dx + r * h + j * V, out);
    }, &gs, dyr);
  }
  if (!one_tile) return;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int64_t j = xs.index(0, k);
    if (j >= nvec) continue;
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int e = 0; e < V; ++e) part[p * h + j * V + e] = acc[p][k][e];
  }
}

template <typename T> bool vectorise(int64_t h, std::initializer_list<const void*> pointers) {
  return h % kVec16<T> == 0 && aligned16(pointers);
}

template <typename T, bool kLayerNorm>
void launch_fwd(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t rows, int64_t h,
                float eps, cudaStream_t stream) {
  auto launch = [&](auto width, auto count) {
    constexpr int V = decltype(width)::value, N = decltype(count)::value;
    auto kernel = norm_fwd_kernel<T, V, N, kLayerNorm>;
    const int threads = row_block_threads(h / V, N);
    kernel<<<unsigned(resident_blocks(kernel, threads, rows)), threads, 0, stream>>>(x, w, b, y, mean, rstd, rows,
                                                                                   h, eps);
  };
  const bool vec = vectorise<T>(h, {x, w, b, y});
  if (h <= 1024 * kFwdSmall) {
    with_row_layout<T, kFwdSmall>(vec, launch);
  } else {
    with_row_layout<T, kFwdLarge>(vec, launch);
  }
}

// Calls f(kernel, threads, blocks) with the backward kernel and grid for these arguments: the one
// decision behind both the workspace size and the launch.
template <typename T, bool kLayerNorm, typename F>
void with_bwd_plan(const void* dy, const void* x, const float* w, const void* dx, int64_t rows, int64_t h, F&& f) {
  with_row_layout<T, kBwdElements>(vectorise<T>(h, {dy, x, w, dx}), [&](auto width, auto count) {
    constexpr int V = decltype(width)::value, N = decltype(count)::value;
    auto kernel = norm_bwd_kernel<T, V, N, kLayerNorm>;
    const int threads = row_block_threads(h / V, N);
    f(kernel, threads, resident_blocks(kernel, threads, rows));
  });
}

template <bool kLayerNorm>
int64_t bwd_workspace(DType t, const void* dy, const void* x, const float* w, const void* dx, int64_t rows,
                      int64_t h) {
  int64_t floats = 0;
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    with_bwd_plan<T, kLayerNorm>(dy, x, w, dx, rows, h,
                                 [&](auto, int, int64_t blocks) { floats = blocks * (kLayerNorm ? 2 : 1) * h; });
  });
  return floats;
}

template <bool kLayerNorm>
int launch_bwd(DType t, const void* dy, const void* x, const float* w, const float* mean, const float* rstd,
               void* dx, float* grads, float* workspace, int64_t rows, int64_t h, cudaStream_t stream) {
  const int64_t width = (kLayerNorm ? 2 : 1) * h;
  if (h == 0) return 0;
  if (rows == 0) return zero_floats(grads, width, stream);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    with_bwd_plan<T, kLayerNorm>(dy, x, w, dx, rows, h, [&](auto kernel, int threads, int64_t blocks) {
      kernel<<<unsigned(blocks), threads, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), w,
                                                       mean, rstd, static_cast<T*>(dx), workspace, rows, h);
      launch_sum_partials(workspace, grads, blocks, width, stream);
    });
  });
}

}  // namespace

int rms_norm_fwd(DType t, const void* x, const float* w, void* y, float* rstd, int64_t rows, int64_t h,
                 float eps, void* stream) {
  if (rows == 0 || h == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    launch_fwd<T, false>(static_cast<const T*>(x), w, nullptr, static_cast<T*>(y), nullptr, rstd, rows, h, eps,
                         cudaStream_t(stream));
  });
}

int64_t rms_norm_bwd_workspace(DType t, const void* dy, const void* x, const float* w, const void* dx,
                               int64_t rows, int64_t h) {
  return bwd_workspace<false>(t, dy, x, w, dx, rows, h);
}

int rms_norm_bwd(DType t, const void* dy, const void* x, const float* w, const float* rstd, void* dx,
                 float* dw, float* workspace, int64_t rows, int64_t h, void* stream) {
  return launch_bwd<false>(t, dy, x, w, nullptr, rstd, dx, dw, workspace, rows, h, cudaStream_t(stream));
}

int layer_norm_fwd(DType t, const void* x, const float* w, const float* b, void* y, float* mean,
                   float* rstd, int64_t rows, int64_t h, float eps, void* stream) {
  if (rows == 0 || h == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    launch_fwd<T, true>(static_cast<const T*>(x), w, b, static_cast<T*>(y), mean, rstd, rows, h, eps,
                        cudaStream_t(stream));
  });
}

int64_t layer_norm_bwd_workspace(DType t, const void* dy, const void* x, const float* w, const void* dx,
                                 int64_t rows, int64_t h) {
  return bwd_workspace<true>(t, dy, x, w, dx, rows, h);
}

int layer_norm_bwd(DType t, const void* dy, const void* x, const float* w, const float* mean,
                   const float* rstd, void* dx, float* dwb, float* workspace, int64_t rows, int64_t h,
                   void* stream) {
  return launch_bwd<true>(t, dy, x, w, mean, rstd, dx, dwb, workspace, rows, h, cudaStream_t(stream));
}

}  // namespace mlite::cuda
