// CUDA kernels of patchslim::prefix_layer_norm: one warp per row, float32
// accumulation for every input type.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launchers.h"
#include "cuda/device_utils.cuh"

namespace patchslim::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels


template <typename T>
__global__ void forward_kernel(RowView<const T> input, T* __restrict__ output, float* __restrict__ mean,
                               float* __restrict__ rstd, const T* __restrict__ weight,
                               const T* __restrict__ bias, int64_t rows, int64_t C, float eps) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const T* x = input.row(r);
  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kWarp) sum += to_float(x[c]);
  const float mu = warp_sum(sum) / static_cast<float>(C);
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kWarp) {
    const float d = to_float(x[c]) - mu;
    sq += d * d;
  }
  const float rs = rsqrtf(warp_sum(sq) / static_cast<float>(C) + eps);
  T* y = output + r * C;
  for (int64_t c = threadIdx.x; c < C; c += kWarp) {
    y[c] = from_float<T>((to_float(x[c]) - mu) * rs * to_float(weight[c]) + to_float(bias[c]));
  }
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <typename T>
__global__ void backward_input_kernel(const T* __restrict__ grad_output, RowView<const T> input,
                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                      const T* __restrict__ weight, RowView<T> grad_input,
                                      int64_t rows, int64_t C) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const T* g = grad_output + r * C;
  const T* x = input.row(r);
  const float mu = mean[r];
  const float rs = rstd[r];
  float sum_gw = 0.f;
  float sum_gw_xhat = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kWarp) {
    const float gw = to_float(g[c]) * to_float(weight[c]);
    sum_gw += gw;
    sum_gw_xhat += gw * (to_float(x[c]) - mu) * rs;
  }
  const float mean_gw = warp_sum(sum_gw) / static_cast<float>(C);
  const float mean_gw_xhat = warp_sum(sum_gw_xhat) / static_cast<float>(C);
  T* dx = grad_input.row(r);
  for (int64_t c = threadIdx.x; c < C; c += kWarp) {
    const float xhat = (to_float(x[c]) - mu) * rs;
    const float gw = to_float(g[c]) * to_float(weight[c]);
    dx[c] = from_float<T>(rs * (gw - mean_gw - xhat * mean_gw_xhat));
  }
}

// Column sums Σ_r g·x̂ and Σ_r g: a block owns 32 columns; its 8 warps stride
// over the rows and combine through shared memory.
template <typename T>
__global__ void backward_params_kernel(const T* __restrict__ grad_output, RowView<const T> input,
                                       const float* __restrict__ mean, const float* __restrict__ rstd,
                                       float* __restrict__ grad_weight, float* __restrict__ grad_bias,
                                       int64_t rows, int64_t C) {
  __shared__ float partial_w[kRowsPerBlock][kWarp + 1];
  __shared__ float partial_b[kRowsPerBlock][kWarp + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  float dw = 0.f;
  float db = 0.f;
  if (c < C) {
    for (int64_t r = threadIdx.y; r < rows; r += kRowsPerBlock) {
      const float g = to_float(grad_output[r * C + c]);
      dw += g * (to_float(input.row(r)[c]) - mean[r]) * rstd[r];
      db += g;
    }
  }
  partial_w[threadIdx.y][threadIdx.x] = dw;
  partial_b[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int i = 1; i < kRowsPerBlock; ++i) {
      dw += partial_w[i][threadIdx.x];
      db += partial_b[i][threadIdx.x];
    }
    grad_weight[c] = dw;
    grad_bias[c] = db;
  }
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

}  // namespace

template <typename T>
cudaError_t prefix_layer_norm_forward(RowView<const T> input, T* output, float* mean, float* rstd,
                                      const T* weight, const T* bias, int64_t rows, int64_t channels,
                                      float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  forward_kernel<T><<<row_blocks(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(
      input, output, mean, rstd, weight, bias, rows, channels, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t prefix_layer_norm_backward(const T* grad_output, RowView<const T> input,
                                       const float* mean, const float* rstd, const T* weight,
                                       RowView<T> grad_input, float* grad_weight, float* grad_bias,
                                       int64_t rows, int64_t channels, cudaStream_t stream) {
  if (rows == 0 || channels == 0) return cudaSuccess;
  const dim3 block(kWarp, kRowsPerBlock);
  backward_input_kernel<T><<<row_blocks(rows), block, 0, stream>>>(grad_output, input, mean, rstd,
                                                                  weight, grad_input, rows, channels);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const auto column_blocks = static_cast<unsigned int>((channels + kWarp - 1) / kWarp);
  backward_params_kernel<T><<<column_blocks, block, 0, stream>>>(grad_output, input, mean, rstd,
                                                                grad_weight, grad_bias, rows, channels);
  return cudaGetLastError();
}

#define PATCHSLIM_INSTANTIATE(T)                                                                    \
  template cudaError_t prefix_layer_norm_forward<T>(RowView<const T>, T*, float*, float*, const T*, \
                                                    const T*, int64_t, int64_t, float, cudaStream_t); \
  template cudaError_t prefix_layer_norm_backward<T>(const T*, RowView<const T>, const float*,     \
                                                     const float*, const T*, RowView<T>, float*,    \
                                                     float*, int64_t, int64_t, cudaStream_t);
PATCHSLIM_INSTANTIATE(float)
PATCHSLIM_INSTANTIATE(__half)
PATCHSLIM_INSTANTIATE(__nv_bfloat16)
#undef PATCHSLIM_INSTANTIATE

}  // namespace patchslim::cuda
