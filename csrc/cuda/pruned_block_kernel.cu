// CUDA row kernels of the pruned block: scaled softmax and its backward (a warp
// per row), bias+GELU and its backward, bias+residual (a thread per element).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launchers.h"
#include "cuda/device_utils.cuh"

namespace patchslim::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;
constexpr int kThreads = 256;
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

template <typename T>
__global__ void bias_gelu_kernel(RowView<T> hidden, const T* __restrict__ bias, int64_t total,
                                 int64_t cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t c = i % cols;
  T* h = hidden.row(i / cols) + c;
  const float x = to_float(*h) + to_float(bias[c]);
  *h = from_float<T>(x * normal_cdf(x));
}

template <typename T>
__global__ void bias_gelu_backward_kernel(RowView<const T> pre, const T* __restrict__ bias,
                                          RowView<T> grad, int64_t total, int64_t cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t r = i / cols;
  const int64_t c = i % cols;
  const float x = to_float(pre.row(r)[c]) + to_float(bias[c]);
  const float slope = normal_cdf(x) + x * kInvSqrt2Pi * __expf(-0.5f * x * x);
  T* g = grad.row(r) + c;
  *g = from_float<T>(to_float(*g) * slope);
}

template <typename T>
__global__ void bias_residual_kernel(RowView<T> out, const T* __restrict__ bias,
                                     RowView<const T> residual, int64_t total, int64_t cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t r = i / cols;
  const int64_t c = i % cols;
  T* o = out.row(r) + c;
  *o = from_float<T>(to_float(*o) + to_float(bias[c]) + to_float(residual.row(r)[c]));
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

unsigned int element_blocks(int64_t total) {
  return static_cast<unsigned int>((total + kThreads - 1) / kThreads);
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
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  bias_gelu_kernel<T><<<element_blocks(total), kThreads, 0, stream>>>(hidden, bias, total, cols);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_gelu_backward(RowView<const T> pre, const T* bias, RowView<T> grad, int64_t rows,
                               int64_t cols, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  bias_gelu_backward_kernel<T><<<element_blocks(total), kThreads, 0, stream>>>(pre, bias, grad,
                                                                               total, cols);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_residual(RowView<T> out, const T* bias, RowView<const T> residual, int64_t rows,
                          int64_t cols, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  bias_residual_kernel<T><<<element_blocks(total), kThreads, 0, stream>>>(out, bias, residual,
                                                                          total, cols);
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
