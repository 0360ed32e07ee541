// CUDA kernels of patchslim::prefix_layer_norm: one warp per row, float32
// accumulation for every input type.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/launchers.h"
#include "cuda/device_utils.cuh"

namespace patchslim::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels


// The row kernels take N consecutive elements per lane and access (N = kPack<T>, one
// 16-byte access, where rows and parameters are aligned to it; else 1); the row is
// read three times, from L1 after the first.
template <int N, typename T>
__global__ void forward_kernel(RowView<const T> input, T* __restrict__ output, float* __restrict__ mean,
                               float* __restrict__ rstd, const T* __restrict__ weight,
                               const T* __restrict__ bias, int64_t rows, int64_t C, float eps) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const T* x = input.row(r);
  float sum = 0.f;
  for (int64_t c = threadIdx.x * N; c < C; c += kWarp * N) {
    float v[N];
    load_floats<N>(x + c, v);
#pragma unroll
    for (int i = 0; i < N; ++i) sum += v[i];
  }
  const float mu = warp_sum(sum) / static_cast<float>(C);
  float sq = 0.f;
  for (int64_t c = threadIdx.x * N; c < C; c += kWarp * N) {
    float v[N];
    load_floats<N>(x + c, v);
#pragma unroll
    for (int i = 0; i < N; ++i) sq += (v[i] - mu) * (v[i] - mu);
  }
  const float rs = rsqrtf(warp_sum(sq) / static_cast<float>(C) + eps);
  T* y = output + r * C;
  for (int64_t c = threadIdx.x * N; c < C; c += kWarp * N) {
    float v[N], w[N], b[N];
    load_floats<N>(x + c, v);
    load_floats<N>(weight + c, w);
    load_floats<N>(bias + c, b);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = (v[i] - mu) * rs * w[i] + b[i];
    store_floats<N>(y + c, v);
  }
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <int N, typename T>
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
  // Both passes read the lane's packs of g·w and x̂ at column c.
  const auto load = [&](int64_t c, float (&gw)[N], float (&xhat)[N]) {
    float w[N];
    load_floats<N>(g + c, gw);
    load_floats<N>(weight + c, w);
    load_floats<N>(x + c, xhat);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      gw[i] *= w[i];
      xhat[i] = (xhat[i] - mu) * rs;
    }
  };
  float sum_gw = 0.f;
  float sum_gw_xhat = 0.f;
  for (int64_t c = threadIdx.x * N; c < C; c += kWarp * N) {
    float gw[N], xhat[N];
    load(c, gw, xhat);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      sum_gw += gw[i];
      sum_gw_xhat += gw[i] * xhat[i];
    }
  }
  const float mean_gw = warp_sum(sum_gw) / static_cast<float>(C);
  const float mean_gw_xhat = warp_sum(sum_gw_xhat) / static_cast<float>(C);
  T* dx = grad_input.row(r);
  for (int64_t c = threadIdx.x * N; c < C; c += kWarp * N) {
    float gw[N], xhat[N];
    load(c, gw, xhat);
#pragma unroll
    for (int i = 0; i < N; ++i) xhat[i] = rs * (gw[i] - mean_gw - xhat[i] * mean_gw_xhat);
    store_floats<N>(dx + c, xhat);
  }
}

// Column sums Σ_r g·x̂ and Σ_r g in two passes, deterministic: the rows are cut into
// splits of about kRowsPerSplit; a block owns 32 columns of one split, its 8 warps
// stride over the split's rows and combine through shared memory into that split's
// partial sums; then a thread per column adds the splits' partials in order. (One block
// per 32 columns over all rows left 24 blocks for DeiT-B's 768 channels on a 132-SM GPU.)
constexpr int64_t kRowsPerSplit = 256;
constexpr int64_t kMaxSplits = 65535;  // gridDim.y's limit

int64_t row_splits(int64_t rows) {
  return std::min((rows + kRowsPerSplit - 1) / kRowsPerSplit, kMaxSplits);
}

template <typename T>
__global__ void backward_params_partial_kernel(const T* __restrict__ grad_output,
                                               RowView<const T> input,
                                               const float* __restrict__ mean,
                                               const float* __restrict__ rstd,
                                               float* __restrict__ partial_weight,
                                               float* __restrict__ partial_bias, int64_t rows,
                                               int64_t rows_per_split, int64_t C) {
  __shared__ float shared_w[kRowsPerBlock][kWarp + 1];
  __shared__ float shared_b[kRowsPerBlock][kWarp + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t end = min(rows, (split + 1) * rows_per_split);
  float dw = 0.f;
  float db = 0.f;
  if (c < C) {
    // The input row's (batch, row) walked along instead of divided out per element.
    int64_t r = split * rows_per_split + threadIdx.y;
    int64_t batch = r / input.rows_per_batch;
    int64_t row = r % input.rows_per_batch;
    for (; r < end; r += kRowsPerBlock) {
      const T* x_row = input.data + batch * input.batch_stride + row * input.row_stride;
      const float x = to_float(x_row[c]);
      const float g = to_float(grad_output[r * C + c]);
      dw += g * (x - mean[r]) * rstd[r];
      db += g;
      for (row += kRowsPerBlock; row >= input.rows_per_batch; row -= input.rows_per_batch) {
        ++batch;
      }
    }
  }
  shared_w[threadIdx.y][threadIdx.x] = dw;
  shared_b[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int i = 1; i < kRowsPerBlock; ++i) {
      dw += shared_w[i][threadIdx.x];
      db += shared_b[i][threadIdx.x];
    }
    partial_weight[split * C + c] = dw;
    partial_bias[split * C + c] = db;
  }
}

__global__ void backward_params_final_kernel(const float* __restrict__ partial_weight,
                                             const float* __restrict__ partial_bias,
                                             float* __restrict__ grad_weight,
                                             float* __restrict__ grad_bias, int64_t splits,
                                             int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float dw = 0.f;
  float db = 0.f;
  for (int64_t split = 0; split < splits; ++split) {
    dw += partial_weight[split * C + c];
    db += partial_bias[split * C + c];
  }
  grad_weight[c] = dw;
  grad_bias[c] = db;
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
  const bool packable = rows_packable(input, channels) && aligned_16(output) &&
                        aligned_16(weight) && aligned_16(bias);
  with_pack_size<T>(packable, [&](auto pack) {
    forward_kernel<decltype(pack)::value, T>
        <<<row_blocks(rows), dim3(kWarp, kRowsPerBlock), 0, stream>>>(
            input, output, mean, rstd, weight, bias, rows, channels, eps);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t prefix_layer_norm_backward(const T* grad_output, RowView<const T> input,
                                       const float* mean, const float* rstd, const T* weight,
                                       RowView<T> grad_input, float* grad_weight, float* grad_bias,
                                       float* scratch, int64_t rows, int64_t channels,
                                       cudaStream_t stream) {
  if (rows == 0 || channels == 0) return cudaSuccess;
  const dim3 block(kWarp, kRowsPerBlock);
  const bool packable = rows_packable(input, channels) && rows_packable(grad_input, channels) &&
                        aligned_16(grad_output) && aligned_16(weight);
  with_pack_size<T>(packable, [&](auto pack) {
    backward_input_kernel<decltype(pack)::value, T><<<row_blocks(rows), block, 0, stream>>>(
        grad_output, input, mean, rstd, weight, grad_input, rows, channels);
  });
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const int64_t splits = row_splits(rows);
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  float* partial_weight = scratch;
  float* partial_bias = scratch + splits * channels;
  const dim3 partial_grid(static_cast<unsigned int>((channels + kWarp - 1) / kWarp),
                          static_cast<unsigned int>(splits));
  backward_params_partial_kernel<T><<<partial_grid, block, 0, stream>>>(
      grad_output, input, mean, rstd, partial_weight, partial_bias, rows, rows_per_split,
      channels);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  constexpr int kColumnThreads = 256;
  backward_params_final_kernel<<<static_cast<unsigned int>((channels + kColumnThreads - 1) /
                                                           kColumnThreads),
                                 kColumnThreads, 0, stream>>>(partial_weight, partial_bias,
                                                              grad_weight, grad_bias, splits,
                                                              channels);
  return cudaGetLastError();
}

int64_t prefix_layer_norm_backward_scratch(int64_t rows, int64_t channels) {
  return 2 * row_splits(rows) * channels;
}

#define PATCHSLIM_INSTANTIATE(T)                                                                    \
  template cudaError_t prefix_layer_norm_forward<T>(RowView<const T>, T*, float*, float*, const T*, \
                                                    const T*, int64_t, int64_t, float, cudaStream_t); \
  template cudaError_t prefix_layer_norm_backward<T>(const T*, RowView<const T>, const float*,     \
                                                     const float*, const T*, RowView<T>, float*,    \
                                                     float*, float*, int64_t, int64_t, cudaStream_t);
PATCHSLIM_INSTANTIATE(float)
PATCHSLIM_INSTANTIATE(__half)
PATCHSLIM_INSTANTIATE(__nv_bfloat16)
#undef PATCHSLIM_INSTANTIATE

}  // namespace patchslim::cuda
