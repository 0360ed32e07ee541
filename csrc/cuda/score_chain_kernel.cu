// CUDA reductions behind the scoring ops (the GEMMs before them are cuBLAS,
// called from the torch glue).

#include <cuda_runtime.h>

#include "cuda/launchers.h"

namespace patchslim::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kRowsPerBlock = kThreads / kWarp;

// One thread per output column, walking the K rows: consecutive threads read
// consecutive addresses of each row.
__global__ void column_dot_kernel(const float* __restrict__ x, const float* __restrict__ y,
                                  float* __restrict__ out, int64_t rows, int64_t cols,
                                  int64_t x_batch_stride, int64_t x_row_stride,
                                  int64_t y_batch_stride, int64_t y_row_stride) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (i >= cols) return;
  const float* xb = x + b * x_batch_stride + i;
  const float* yb = y + b * y_batch_stride + i;
  float acc = 0.f;
  for (int64_t k = 0; k < rows; ++k) acc = fmaf(xb[k * x_row_stride], yb[k * y_row_stride], acc);
  out[b * cols + i] = acc;
}

// One warp per (image, token) row, lanes striding over the depth of every head.
__global__ void row_dot_kernel(const float* __restrict__ x, const float* __restrict__ y,
                               const float* __restrict__ scale, float* __restrict__ out,
                               int64_t total_rows, int64_t heads, int64_t tokens, int64_t depth,
                               int64_t xs0, int64_t xs1, int64_t xs2, int64_t ys0, int64_t ys1,
                               int64_t ys2) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= total_rows) return;
  const int64_t b = r / tokens;
  const int64_t i = r % tokens;
  float acc = 0.f;
  for (int64_t h = 0; h < heads; ++h) {
    const float* xr = x + b * xs0 + h * xs1 + i * xs2;
    const float* yr = y + b * ys0 + h * ys1 + i * ys2;
    for (int64_t d = threadIdx.x; d < depth; d += kWarp) acc = fmaf(xr[d], yr[d], acc);
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (threadIdx.x == 0) out[r] = scale[r] * acc;
}

}  // namespace

cudaError_t column_dot(const float* x, const float* y, float* out, int64_t batch, int64_t rows,
                       int64_t cols, int64_t x_batch_stride, int64_t x_row_stride,
                       int64_t y_batch_stride, int64_t y_row_stride, cudaStream_t stream) {
  if (batch == 0 || cols == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>((cols + kThreads - 1) / kThreads),
                  static_cast<unsigned int>(batch));
  column_dot_kernel<<<grid, kThreads, 0, stream>>>(x, y, out, rows, cols, x_batch_stride,
                                                   x_row_stride, y_batch_stride, y_row_stride);
  return cudaGetLastError();
}

cudaError_t row_dot(const float* x, const float* y, const float* scale, float* out, int64_t batch,
                    int64_t heads, int64_t tokens, int64_t depth, const int64_t x_strides[3],
                    const int64_t y_strides[3], cudaStream_t stream) {
  const int64_t total_rows = batch * tokens;
  if (total_rows == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned int>((total_rows + kRowsPerBlock - 1) / kRowsPerBlock);
  row_dot_kernel<<<blocks, dim3(kWarp, kRowsPerBlock), 0, stream>>>(
      x, y, scale, out, total_rows, heads, tokens, depth, x_strides[0], x_strides[1], x_strides[2],
      y_strides[0], y_strides[1], y_strides[2]);
  return cudaGetLastError();
}

}  // namespace patchslim::cuda
