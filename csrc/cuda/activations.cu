// SwiGLU and bias-GeLU (tanh approximation) on CUDA: one read and one write per element instead of
// PyTorch's chain of elementwise kernels, in 16-byte vectors where the rows are aligned. 64-bit
// offsets throughout (inputs beyond 2^31 elements). The bias gradient is reduced like the norms'
// weight gradient: per-block partial sums kept in registers, then sum_partials.
#include "common.cuh"

namespace mlite::cuda {
namespace {

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }

// x: [rows, 2f] = [gate | up]; thread (row r, column vector c) computes y[r, cV : cV + V]
// (grid: row_column_grid over f / V column vectors).
template <typename T, int V>
__global__ void swiglu_fwd_kernel(const T* x, T* y, int64_t rows, int64_t f) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= f / V) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float g[V], u[V], out[V];
    load_vec<T, V>(x + r * 2 * f + c * V, g);
    load_vec<T, V>(x + r * 2 * f + f + c * V, u);
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = g[e] * sigmoid(g[e]) * u[e];
    store_vec<T, V>(y + r * f + c * V, out);
  }
}

// d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g))).
template <typename T, int V>
__global__ void swiglu_bwd_kernel(const T* dy, const T* x, T* dx, int64_t rows, int64_t f) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= f / V) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t gate = r * 2 * f + c * V, up = gate + f;
    float g[V], u[V], d[V], dg[V], du[V];
    load_vec<T, V>(x + gate, g);
    load_vec<T, V>(x + up, u);
    load_vec<T, V>(dy + r * f + c * V, d);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float sig = sigmoid(g[e]);
      dg[e] = d[e] * u[e] * sig * (1.f + g[e] * (1.f - sig));
      du[e] = d[e] * g[e] * sig;
    }
    store_vec<T, V>(dx + gate, dg);
    store_vec<T, V>(dx + up, du);
  }
}

// gelu(v) = v/2 · (1 + tanh(k·(v + 0.044715·v³))), k = √(2/π).
constexpr float kGeluK = 0.7978845608028654f;
constexpr float kGeluC = 0.044715f;

template <typename T, int V>
__global__ void bias_gelu_fwd_kernel(const T* x, const float* bias, T* y, int64_t rows, int64_t f) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= f / V) return;
  float b[V];
  load_params<V>(bias + c * V, b);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float v[V];
    load_vec<T, V>(x + r * f + c * V, v);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float s = v[e] + b[e];
      v[e] = 0.5f * s * (1.f + tanhf(kGeluK * (s + kGeluC * s * s * s)));
    }
    store_vec<T, V>(y + r * f + c * V, v);
  }
}

// Blocks stride over rows, threads over column vectors; with partials, each block sums dx over its
// rows in registers and writes them once to its workspace row (the bias gradient before sum_partials).
template <typename T, int V>
__global__ void __launch_bounds__(1024) bias_gelu_bwd_kernel(const T* dy, const T* x, const float* bias, T* dx,
                                                             float* partials, int64_t rows, int64_t f) {
  float* part = partials ? partials + int64_t(blockIdx.x) * f : nullptr;
  for (int64_t c = threadIdx.x; c < f / V; c += blockDim.x) {
    float b[V], acc[V];
    load_params<V>(bias + c * V, b);
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
      float v[V], d[V];
      load_vec<T, V>(x + r * f + c * V, v);
      load_vec<T, V>(dy + r * f + c * V, d);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float s = v[e] + b[e];
        const float t = tanhf(kGeluK * (s + kGeluC * s * s * s));
        const float dt = (1.f - t * t) * kGeluK * (1.f + 3.f * kGeluC * s * s);
        d[e] *= 0.5f * (1.f + t + s * dt);
        acc[e] += d[e];
      }
      store_vec<T, V>(dx + r * f + c * V, d);
    }
    if (part) {
#pragma unroll
      for (int e = 0; e < V; ++e) part[c * V + e] = acc[e];
    }
  }
}

template <typename T> bool vectorise(int64_t f, std::initializer_list<const void*> pointers) {
  return f % kVec16<T> == 0 && aligned16(pointers);
}

// Calls f(kernel, threads, blocks) with the bias-GeLU backward kernel and its grid (shared by the
// workspace size and the launch).
template <typename T, typename F>
void with_bias_gelu_bwd_plan(const void* dy, const void* x, const float* bias, const void* dx, int64_t rows,
                             int64_t f, F&& fn) {
  with_vec_width<T>(vectorise<T>(f, {dy, x, bias, dx}), [&](auto width) {
    constexpr int V = decltype(width)::value;
    auto kernel = bias_gelu_bwd_kernel<T, V>;
    const int threads = row_block_threads(f / V, 1, 32);
    fn(kernel, threads, resident_blocks(kernel, threads, rows));
  });
}

}  // namespace

int swiglu_fwd(DType t, const void* x, void* y, int64_t rows, int64_t f, void* stream) {
  if (rows * f == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    with_vec_width<T>(vectorise<T>(f, {x, y}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      swiglu_fwd_kernel<T, V><<<row_column_grid(rows, f / V), kColumnThreads, 0, cudaStream_t(stream)>>>(
          static_cast<const T*>(x), static_cast<T*>(y), rows, f);
    });
  });
}

int swiglu_bwd(DType t, const void* dy, const void* x, void* dx, int64_t rows, int64_t f, void* stream) {
  if (rows * f == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    with_vec_width<T>(vectorise<T>(f, {dy, x, dx}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      swiglu_bwd_kernel<T, V><<<row_column_grid(rows, f / V), kColumnThreads, 0, cudaStream_t(stream)>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), rows, f);
    });
  });
}

int bias_gelu_fwd(DType t, const void* x, const float* bias, void* y, int64_t rows, int64_t f, void* stream) {
  if (rows * f == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    with_vec_width<T>(vectorise<T>(f, {x, bias, y}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      bias_gelu_fwd_kernel<T, V><<<row_column_grid(rows, f / V), kColumnThreads, 0, cudaStream_t(stream)>>>(
          static_cast<const T*>(x), bias, static_cast<T*>(y), rows, f);
    });
  });
}

int64_t bias_gelu_bwd_workspace(DType t, const void* dy, const void* x, const float* bias, const void* dx,
                                int64_t rows, int64_t f) {
  int64_t floats = 0;
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    with_bias_gelu_bwd_plan<T>(dy, x, bias, dx, rows, f, [&](auto, int, int64_t blocks) { floats = blocks * f; });
  });
  return floats;
}

int bias_gelu_bwd(DType t, const void* dy, const void* x, const float* bias, void* dx, float* dbias,
                  float* workspace, int64_t rows, int64_t f, void* stream) {
  if (f == 0) return 0;
  if (rows == 0) return dbias ? zero_floats(dbias, f, cudaStream_t(stream)) : 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    with_bias_gelu_bwd_plan<T>(dy, x, bias, dx, rows, f, [&](auto kernel, int threads, int64_t blocks) {
      kernel<<<unsigned(blocks), threads, 0, cudaStream_t(stream)>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), bias, static_cast<T*>(dx),
          dbias ? workspace : nullptr, rows, f);
      if (dbias) launch_sum_partials(workspace, dbias, blocks, f, cudaStream_t(stream));
    });
  });
}

}  // namespace mlite::cuda
