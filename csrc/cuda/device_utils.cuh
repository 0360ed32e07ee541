#pragma once

// Helpers shared by the CUDA kernels: float <-> storage type conversions, 16-byte
// vector loads and stores, and warp reductions.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launchers.h"

namespace patchslim::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte access: 4 float32, 8 float16 or bfloat16.
template <typename T>
constexpr int kPack = 16 / sizeof(T);

// N elements of T loaded or stored as one access (N * sizeof(T) bytes, aligned to it).
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T values[N];
};

// p[0, N) as float32; p must be aligned to N elements.
template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const auto packed = *reinterpret_cast<const Packed<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(packed.values[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Packed<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.values[i] = from_float<T>(in[i]);
  *reinterpret_cast<Packed<T, N>*>(p) = packed;
}

inline bool aligned_16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Whether every row of `rows` starts on a 16-byte boundary and holds whole packs of
// kPack<T> elements: what the vector path of the row kernels needs.
template <typename T>
bool rows_packable(const RowView<T>& rows, int64_t cols) {
  constexpr int pack = kPack<std::remove_const_t<T>>;
  return aligned_16(rows.data) && cols % pack == 0 && rows.row_stride % pack == 0 &&
         rows.batch_stride % pack == 0;
}

// Calls launch(std::integral_constant<int, N>{}) with N = kPack<T> where `packable`,
// else N = 1: the kernels' elements per access.
template <typename T, typename Launch>
void with_pack_size(bool packable, Launch&& launch) {
  if (packable) {
    launch(std::integral_constant<int, kPack<T>>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

}  // namespace patchslim::cuda
