// Device helpers shared by the CUDA kernels: fp32 conversion of the element types, 16-byte vector
// loads and stores, a row held in registers, block-wide reductions, launch geometry from the SM count
// and occupancy, dtype dispatch, and the column sum that finishes weight and bias gradients.
// Only CUDA headers: every .cu compiles with plain nvcc, without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "launch.h"

namespace mlite::cuda {

// Explicit conversions only: torch's extension build defines __CUDA_NO_HALF_OPERATORS__.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- Vectors: V consecutive elements moved as one 16-byte access (V = 16 / sizeof(T)), or V = 1 ----

template <typename T> constexpr int kVec16 = int(16 / sizeof(T));  // 4 for fp32, 8 for fp16/bf16

template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V> __device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = to_float(pack.v[e]);
}

template <typename T, int V> __device__ __forceinline__ void store_vec(T* p, const float (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int e = 0; e < V; ++e) pack.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// V fp32 parameters (weights, biases, cos/sin) at p, in 16-byte loads when V is a multiple of 4.
template <int V> __device__ __forceinline__ void load_params(const float* p, float (&out)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(p)[q];
      out[4 * q] = f.x, out[4 * q + 1] = f.y, out[4 * q + 2] = f.z, out[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = p[e];
  }
}

// Whether every pointer is 16-byte aligned (the launchers then use V = kVec16; rows must also be a
// whole number of vectors, so that every row starts aligned).
inline bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// ---- Rows held in registers ----
//
// A block works on one row of h = nvec·V elements at a time. Thread t owns the vectors t + k·B of each
// tile of N·B vectors (B = blockDim.x, k < N); a row that fits in one tile (nvec ≤ N·B) is read from
// memory once and kept in registers for every pass over it. Longer rows take several tiles, and a
// pass reloads a tile only if it is not the one in registers (passes alternate direction, so the
// tile a pass ended on starts the next one).
template <typename T, int V, int N> struct RowRegisters {
  float v[N][V];
  int64_t nvec, tile_vectors;
  int tiles, loaded;

  __device__ __forceinline__ explicit RowRegisters(int64_t vectors)
      : nvec(vectors), tile_vectors(int64_t(N) * blockDim.x),
        tiles(int((vectors + int64_t(N) * blockDim.x - 1) / (int64_t(N) * blockDim.x))), loaded(-1) {}

  // Index of this thread's k-th vector of tile t (≥ nvec: past the end of the row).
  __device__ __forceinline__ int64_t index(int t, int k) const {
    return int64_t(t) * tile_vectors + int64_t(k) * blockDim.x + threadIdx.x;
  }

  __device__ __forceinline__ void load(const T* row, int t) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int64_t j = index(t, k);
      if (j < nvec) {
        load_vec<T, V>(row + j * V, v[k]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[k][e] = 0.f;
      }
    }
    loaded = t;
  }

  // A new row: nothing of it is in registers yet.
  __device__ __forceinline__ void start_row(int64_t vectors) {
    nvec = vectors;
    tiles = int((vectors + tile_vectors - 1) / tile_vectors);
    loaded = -1;
  }

  // f(k, j) for every vector j < nvec of the row, v[k] holding it: tile by tile, starting with the tile
  // already in registers. `also` (the same row of a second tensor at `also_row`, e.g. dy beside x) is
  // kept on the same tile.
  template <typename F>
  __device__ __forceinline__ void vectors(const T* row, F&& f, RowRegisters* also = nullptr,
                                          const T* also_row = nullptr) {
    const bool backwards = loaded == tiles - 1 && tiles > 1;
    for (int i = 0; i < tiles; ++i) {
      const int t = backwards ? tiles - 1 - i : i;
      if (t != loaded) load(row, t);
      if (also != nullptr && also->loaded != t) also->load(also_row, t);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int64_t j = index(t, k);
        if (j < nvec) f(k, j);
      }
    }
  }
};

// Threads for rows of nvec vectors with N vectors per thread and tile: a multiple of 32, at least
// `min_threads` (several warps per row), at most 1024 (then the row takes several tiles).
inline int row_block_threads(int64_t nvec, int n_per_thread, int min_threads = 128) {
  int64_t threads = (nvec + n_per_thread - 1) / n_per_thread;
  threads = (threads + 31) / 32 * 32;
  if (threads < min_threads) threads = min_threads;
  return int(threads > 1024 ? 1024 : threads);
}

// ---- Reductions ----

struct Sum {
  static constexpr float identity = 0.f;
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  static constexpr float identity = -INFINITY;
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces v over the block (blockDim.x a multiple of 32) and returns the result to every thread.
// Safe to call several times in a row: the first barrier waits for readers of the previous call.
template <typename Op> __device__ float block_reduce(float v, Op op) {
  __shared__ float warp_results[32];
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? warp_results[lane] : Op::identity;
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// ---- Launch geometry ----

// Streaming multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int counts[64] = {0};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= 64) device = 0;
  if (counts[device] == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    counts[device] = sms > 0 ? sms : 1;
  }
  return counts[device];
}

// Blocks of `threads` that fill the GPU once for `kernel` (SM count × resident blocks per SM), at
// most `work` (one per row, say) and at least 1: the grid of the kernels whose blocks stride over
// rows and keep per-block partial sums.
template <typename Kernel> int64_t resident_blocks(Kernel kernel, int threads, int64_t work) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess || per_sm < 1)
    per_sm = 1;
  const int64_t blocks = int64_t(per_sm) * sm_count();
  return work < 1 ? 1 : (work < blocks ? work : blocks);
}

// Grid of the row-wise elementwise kernels, 256 threads per block: x covers the column vectors of a
// row, y strides over rows (at most 65535 of them at once). Indexing by (row, column) this way avoids
// a 64-bit division per element, which would make these memory-bound kernels compute-bound.
constexpr int kColumnThreads = 256;
inline dim3 row_column_grid(int64_t rows, int64_t cols) {
  return dim3(unsigned((cols + kColumnThreads - 1) / kColumnThreads), unsigned(rows < 65535 ? rows : 65535));
}

// ---- Column sums of the per-block partials ----

// out[c] = Σ_b partials[b, c] over `blocks` rows of a [blocks, width] workspace. A block of 32 × 16
// threads owns 32 columns (coalesced 128-byte rows) and splits the rows among its 16 thread rows;
// the 16 partial sums are added in shared memory in a fixed order (deterministic).
constexpr int kSumColumns = 32, kSumRows = 16;
static __global__ void __launch_bounds__(kSumColumns * kSumRows)
    sum_partials(const float* partials, float* out, int64_t blocks, int64_t width) {
  __shared__ float sums[kSumRows][kSumColumns + 1];
  const int64_t c = int64_t(blockIdx.x) * kSumColumns + threadIdx.x;
  float acc = 0.f;
  if (c < width)
    for (int64_t b = threadIdx.y; b < blocks; b += kSumRows) acc += partials[b * width + c];
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < width) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kSumRows; ++i) total += sums[i][threadIdx.x];
    out[c] = total;
  }
}

inline void launch_sum_partials(const float* partials, float* out, int64_t blocks, int64_t width,
                                cudaStream_t stream) {
  if (width == 0) return;
  sum_partials<<<unsigned((width + kSumColumns - 1) / kSumColumns), dim3(kSumColumns, kSumRows), 0, stream>>>(
      partials, out, blocks, width);
}

// A gradient summed over zero rows is zero.
inline int zero_floats(float* out, int64_t n, cudaStream_t stream) {
  return n > 0 ? int(cudaMemsetAsync(out, 0, size_t(n) * sizeof(float), stream)) : 0;
}

// ---- Dispatch ----

// Calls f(T{}) with the element type named by t; false for an unknown t.
template <typename F> bool with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return true;
    case DType::f16: f(__half{}); return true;
    case DType::bf16: f(__nv_bfloat16{}); return true;
  }
  return false;
}

// with_dtype for a launcher: returns the launch status.
template <typename F> int dispatch(DType t, F&& f) {
  return with_dtype(t, f) ? int(cudaGetLastError()) : int(cudaErrorInvalidValue);
}

template <int V> using VecWidth = std::integral_constant<int, V>;

// Calls f(VecWidth<V>{}) with V = 16 / sizeof(T) when `vectorise` (aligned pointers, rows a whole
// number of vectors), else V = 1.
template <typename T, typename F> void with_vec_width(bool vectorise, F&& f) {
  if (vectorise) {
    f(VecWidth<kVec16<T>>{});
  } else {
    f(VecWidth<1>{});
  }
}

// Calls f(VecWidth<V>{}, VecWidth<N>{}) for rows held in registers: V as in with_vec_width and
// N = kElements / V vectors per thread and tile (kElements fp32 registers per thread per row), at
// most 8 (more scalar registers than that end up in local memory).
template <typename T, int kElements, typename F> void with_row_layout(bool vectorise, F&& f) {
  with_vec_width<T>(vectorise, [&](auto width) {
    constexpr int V = decltype(width)::value;
    constexpr int N = kElements / V < 1 ? 1 : (kElements / V > 8 ? 8 : kElements / V);
    f(width, VecWidth<N>{});
  });
}

}  // namespace mlite::cuda
