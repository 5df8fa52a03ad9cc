// Scaled causal softmax on CUDA. A block handles one (batch, query) row at a time and strides over
// rows; only the visible keys are read (16-byte vectors where the rows are aligned) and held in
// registers across the max, sum and normalise passes, so a row is read once; the masked tail is
// written as zeros. Max and sum in fp32. Any batch count and row length: there is no
// batches-per-block constraint (unlike apex/TE's warp-per-row kernels).
#include "common.cuh"

namespace mlite::cuda {
namespace {

// fp32 registers per thread per row (forward: the scores; backward: y and dy, each).
constexpr int kFwdElements = 32, kBwdElements = 8;

// Keys visible to query i: j < i + sk − sq + 1 (bottom-right aligned, as the PyTorch reference).
__device__ __forceinline__ int64_t visible_keys(int64_t i, int64_t sq, int64_t sk) {
  const int64_t n = i + sk - sq + 1;
  return n < sk ? n : sk;
}

// Zeros over the vectors [first, sk/V) of a row: the masked tail.
template <typename T, int V> __device__ __forceinline__ void zero_tail(T* row, int64_t first, int64_t sk) {
  float zeros[V];
#pragma unroll
  for (int e = 0; e < V; ++e) zeros[e] = 0.f;
  for (int64_t j = first + threadIdx.x; j < sk / V; j += blockDim.x) store_vec<T, V>(row + j * V, zeros);
}

template <typename T, int V, int N>
__global__ void __launch_bounds__(1024)
    causal_softmax_fwd_kernel(const T* x, T* y, int64_t rows, int64_t sq, int64_t sk, float scale) {
  RowRegisters<T, V, N> row(0);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * sk;
    T* yr = y + r * sk;
    const int64_t n = visible_keys(r % sq, sq, sk);
    if (n <= 0) {  // no visible key: softmax over an empty set, NaN as in PyTorch
      for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) yr[j] = from_float<T>(NAN);
      continue;
    }
    const int64_t nv = (n + V - 1) / V;  // vectors holding the visible keys
    row.start_row(nv);
    auto visible = [&](int64_t j, int e) { return j * V + e < n; };
    float m = -INFINITY;
    row.vectors(xr, [&](int k, int64_t j) {
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (visible(j, e)) m = fmaxf(m, row.v[k][e] * scale);
    });
    m = block_reduce(m, Max());
    // A row that fits in registers keeps exp(s − m) there for the last pass; longer rows recompute it.
    const bool keep_exp = row.tiles == 1;
    auto exp_at = [&](int k, int64_t j, int e) { return visible(j, e) ? __expf(row.v[k][e] * scale - m) : 0.f; };
    float sum = 0.f;
    row.vectors(xr, [&](int k, int64_t j) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float p = exp_at(k, j, e);
        sum += p;
        if (keep_exp) row.v[k][e] = p;
      }
    });
    const float inv = 1.f / block_reduce(sum, Sum());
    row.vectors(xr, [&](int k, int64_t j) {
      float out[V];
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = (keep_exp ? row.v[k][e] : exp_at(k, j, e)) * inv;
      store_vec<T, V>(yr + j * V, out);
    });
    zero_tail<T, V>(yr, nv, sk);
  }
}

// dx = scale · y · (dy − Σ_j dy_j·y_j) over the visible keys; zero where masked.
template <typename T, int V, int N>
__global__ void __launch_bounds__(1024)
    causal_softmax_bwd_kernel(const T* dy, const T* y, T* dx, int64_t rows, int64_t sq, int64_t sk, float scale) {
  RowRegisters<T, V, N> ys(0), gs(0);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + r * sk;
    const T* dyr = dy + r * sk;
    T* dxr = dx + r * sk;
    const int64_t n = visible_keys(r % sq, sq, sk);
    const int64_t nv = n > 0 ? (n + V - 1) / V : 0;
    ys.start_row(nv);
    gs.start_row(nv);
    auto visible = [&](int64_t j, int e) { return j * V + e < n; };
    float dot = 0.f;
    ys.vectors(yr, [&](int k, int64_t j) {
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (visible(j, e)) dot += gs.v[k][e] * ys.v[k][e];
    }, &gs, dyr);
    dot = block_reduce(dot, Sum());
    ys.vectors(yr, [&](int k, int64_t j) {
      float out[V];
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = visible(j, e) ? scale * ys.v[k][e] * (gs.v[k][e] - dot) : 0.f;
      store_vec<T, V>(dxr + j * V, out);
    }, &gs, dyr);
    zero_tail<T, V>(dxr, nv, sk);
  }
}

// Launches kernel<T, V, N> for rows of sk elements: vectors when the rows are aligned, threads for the
// longest (last) row, one block per row up to what fits on the GPU.
template <typename T, int kElements, template <typename, int, int> class Kernel, typename... Args>
void launch_rows(bool vectorise, int64_t rows, int64_t sk, cudaStream_t stream, Args... args) {
  with_row_layout<T, kElements>(vectorise, [&](auto width, auto count) {
    constexpr int V = decltype(width)::value, N = decltype(count)::value;
    auto kernel = Kernel<T, V, N>::fn;
    const int threads = row_block_threads((sk + V - 1) / V, N);
    kernel<<<unsigned(resident_blocks(kernel, threads, rows)), threads, 0, stream>>>(args...);
  });
}

template <typename T, int V, int N> struct Forward {
  static constexpr auto fn = causal_softmax_fwd_kernel<T, V, N>;
};
template <typename T, int V, int N> struct Backward {
  static constexpr auto fn = causal_softmax_bwd_kernel<T, V, N>;
};

}  // namespace

int causal_softmax_fwd(DType t, const void* x, void* y, int64_t batch, int64_t sq, int64_t sk, float scale,
                       void* stream) {
  if (batch * sq == 0 || sk == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = sk % kVec16<T> == 0 && aligned16({x, y});
    launch_rows<T, kFwdElements, Forward>(vec, batch * sq, sk, cudaStream_t(stream), static_cast<const T*>(x),
                                          static_cast<T*>(y), batch * sq, sq, sk, scale);
  });
}

int causal_softmax_bwd(DType t, const void* dy, const void* y, void* dx, int64_t batch, int64_t sq, int64_t sk,
                       float scale, void* stream) {
  if (batch * sq == 0 || sk == 0) return 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = sk % kVec16<T> == 0 && aligned16({dy, y, dx});
    launch_rows<T, kBwdElements, Backward>(vec, batch * sq, sk, cudaStream_t(stream), static_cast<const T*>(dy),
                                           static_cast<const T*>(y), static_cast<T*>(dx), batch * sq, sq, sk,
                                           scale);
  });
}

}  // namespace mlite::cuda
