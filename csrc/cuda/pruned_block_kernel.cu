// CUDA row kernels of the pruned block, a warp per row: scaled softmax and its
// backward, bias+GELU and its backward, bias+residual.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launchers.h"
#include "cuda/device_utils.cuh"

namespace patchslim::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

template <typename T>
__global__ void softmax_forward_kernel(RowView<T> scores, int64_t rows, int64_t cols, float scale) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  T* row = scores.row(r);
  float best = -INFINITY;
  for (int64_t c = threadIdx.x; c < cols; c += kWarp) best = fmaxf(best, to_float(row[c]) * scale);
  best = warp_max(best);
  float total = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += kWarp) total += __expf(to_float(row[c]) * scale - best);
  const float inverse = 1.f / warp_sum(total);
  for (int64_t c = threadIdx.x; c < cols; c += kWarp) {
    row[c] = from_float<T>(__expf(to_float(row[c]) * scale - best) * inverse);
  }
}

template <typename T>
__global__ void softmax_backward_kernel(RowView<const T> probs, RowView<T> grad, int64_t rows,
                                        int64_t cols, float scale) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const T* p = probs.row(r);
  T* g = grad.row(r);
  float dot = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += kWarp) dot += to_float(g[c]) * to_float(p[c]);
  dot = warp_sum(dot);
  for (int64_t c = threadIdx.x; c < cols; c += kWarp) {
    g[c] = from_float<T>(scale * to_float(p[c]) * (to_float(g[c]) - dot));
  }
}

__device__ __forceinline__ float normal_cdf(float x) { return 0.5f * erfcf(-x * kInvSqrt2); }

// The element kernels below take a warp per row, each lane N consecutive elements at a
// time (N = kPack<T>, one 16-byte access, where every row and the bias are aligned to
// it; else 1). Row addresses are worked out once per row. The first kernels took a
// thread per element, four 64-bit divisions each (RowView::row and the column) and
// 2-byte loads: with them DeiT-B's in-place block took 2.63 ms on an H200 at batch 256
// in bf16, 1.87 ms with these (the dense block: 1.91 ms).

template <int N, typename T>
__global__ void bias_gelu_kernel(RowView<T> hidden, const T* __restrict__ bias, int64_t rows,
                                 int64_t cols) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  T* h = hidden.row(r);
  for (int64_t c = threadIdx.x * N; c < cols; c += kWarp * N) {
    float x[N], b[N];
    load_floats<N>(h + c, x);
    load_floats<N>(bias + c, b);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float v = x[i] + b[i];
      x[i] = v * normal_cdf(v);
    }
    store_floats<N>(h + c, x);
  }
}

template <int N, typename T>
__global__ void bias_gelu_backward_kernel(RowView<const T> pre, const T* __restrict__ bias,
                                          RowView<T> grad, int64_t rows, int64_t cols) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const T* p = pre.row(r);
  T* g = grad.row(r);
  for (int64_t c = threadIdx.x * N; c < cols; c += kWarp * N) {
    float x[N], b[N], dy[N];
    load_floats<N>(p + c, x);
    load_floats<N>(bias + c, b);
    load_floats<N>(g + c, dy);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float v = x[i] + b[i];
      dy[i] *= normal_cdf(v) + v * kInvSqrt2Pi * __expf(-0.5f * v * v);
    }
    store_floats<N>(g + c, dy);
  }
}

template <int N, typename T>
__global__ void bias_residual_kernel(RowView<T> out, const T* __restrict__ bias,
                                     RowView<const T> residual, int64_t rows, int64_t cols) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  T* o = out.row(r);
  const T* res = residual.row(r);
  for (int64_t c = threadIdx.x * N; c < cols; c += kWarp * N) {
    float y[N], b[N], x[N];
    load_floats<N>(o + c, y);
    load_floats<N>(bias + c, b);
    load_floats<N>(res + c, x);
#pragma unroll
    for (int i = 0; i < N; ++i) y[i] += b[i] + x[i];
    store_floats<N>(o + c, y);
  }
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

}  // namespace

template <typename T>
cudaError_t softmax_forward(RowView<T> scores, int64_t rows, int64_t cols, float scale,
                            cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  softmax_forward_kernel<T><<<row_blocks(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(
      scores, rows, cols, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t softmax_backward(RowView<const T> probs, RowView<T> grad, int64_t rows, int64_t cols,
                             float scale, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  softmax_backward_kernel<T><<<row_blocks(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(
      probs, grad, rows, cols, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_gelu_forward(RowView<T> hidden, const T* bias, int64_t rows, int64_t cols,
                              cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  with_pack_size<T>(rows_packable(hidden, cols) && aligned_16(bias), [&](auto pack) {
    bias_gelu_kernel<decltype(pack)::value, T>
        <<<row_blocks(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(hidden, bias, rows, cols);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_gelu_backward(RowView<const T> pre, const T* bias, RowView<T> grad, int64_t rows,
                               int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const bool packable = rows_packable(pre, cols) && rows_packable(grad, cols) && aligned_16(bias);
  with_pack_size<T>(packable, [&](auto pack) {
    bias_gelu_backward_kernel<decltype(pack)::value, T>
        <<<row_blocks(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(pre, bias, grad, rows, cols);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_residual(RowView<T> out, const T* bias, RowView<const T> residual, int64_t rows,
                          int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const bool packable =
      rows_packable(out, cols) && rows_packable(residual, cols) && aligned_16(bias);
  with_pack_size<T>(packable, [&](auto pack) {
    bias_residual_kernel<decltype(pack)::value, T>
        <<<row_blocks(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(out, bias, residual, rows,
                                                                      cols);
  });
  return cudaGetLastError();
}

#define PATCHSLIM_INSTANTIATE(T)                                                                  \
  template cudaError_t softmax_forward<T>(RowView<T>, int64_t, int64_t, float, cudaStream_t);      \
  template cudaError_t softmax_backward<T>(RowView<const T>, RowView<T>, int64_t, int64_t, float,  \
                                           cudaStream_t);                                          \
  template cudaError_t bias_gelu_forward<T>(RowView<T>, const T*, int64_t, int64_t, cudaStream_t); \
  template cudaError_t bias_gelu_backward<T>(RowView<const T>, const T*, RowView<T>, int64_t,      \
                                             int64_t, cudaStream_t);                               \
  template cudaError_t bias_residual<T>(RowView<T>, const T*, RowView<const T>, int64_t, int64_t,  \
                                        cudaStream_t);
PATCHSLIM_INSTANTIATE(float)
PATCHSLIM_INSTANTIATE(__half)
PATCHSLIM_INSTANTIATE(__nv_bfloat16)
#undef PATCHSLIM_INSTANTIATE

}  // namespace patchslim::cuda
