// Shared helpers for the nemoh CuPy kernels (compiled by NVRTC; see backends/cupy_compile.py).
//
// Precision rules mirror backends/torch_backend.py: activations are stored in the compute dtype T
// (float or __nv_bfloat16); every reduction, norm, softmax and the SSM run in fp32; a value is
// rounded to T exactly where the torch executor rounds it (after each linear, after the conv, after
// the activation, after each add).
//
// Kernels are templates over T, instantiated once per dtype with extern "C" names
// `<kernel>_<suffix>` (suffix f32 or bf16) so that the host can look them up without C++ mangling.
#pragma once
#include <cuda_bf16.h>

typedef long long i64;

// NVRTC compiles without the C math headers: INFINITY is not defined there.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define NEMOH_FOR_EACH_DTYPE(M) M(float, f32) M(__nv_bfloat16, bf16)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// round through T and back: the value torch would hold after storing an intermediate in dtype T
template <typename T> __device__ __forceinline__ float round_t(float x) { return to_f(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; `sh` holds >= 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (int)threadIdx.x < nw ? sh[threadIdx.x] : 0.f;
    if (w == 0) v = warp_sum(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    const float r = sh[0];
    __syncthreads();  // sh may be reused right after
    return r;
}

// torch: F.silu(x) = x * sigmoid(x); F.softplus(x) (beta 1, threshold 20)
__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float relu2_f(float x) { const float r = fmaxf(x, 0.f); return r * r; }

// 16-byte vectors: 4 floats or 8 bf16 values
template <typename T> struct Vec;
template <> struct Vec<float> { static const int N = 4; };
template <> struct Vec<__nv_bfloat16> { static const int N = 8; };

// Dot product of one weight row with one activation row, accumulated in fp32 by one warp.
// `vec` (host-checked: n % Vec<T>::N == 0 and both rows 16-byte aligned) enables 16-byte loads.
template <typename T>
__device__ __forceinline__ float warp_dot(const T* __restrict__ w, const T* __restrict__ x, int n, bool vec) {
    const int lane = threadIdx.x & 31;
    float acc = 0.f;
    if (vec) {
        const int VN = Vec<T>::N;
        const uint4* w4 = reinterpret_cast<const uint4*>(w);
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        for (int i = lane; i < n / VN; i += 32) {
            uint4 a = __ldg(w4 + i), b = __ldg(x4 + i);
            const T* pa = reinterpret_cast<const T*>(&a);
            const T* pb = reinterpret_cast<const T*>(&b);
#pragma unroll
            for (int j = 0; j < VN; ++j) acc = fmaf(to_f(pa[j]), to_f(pb[j]), acc);
        }
    } else {
        for (int i = lane; i < n; i += 32) acc = fmaf(to_f(w[i]), to_f(x[i]), acc);
    }
    return warp_sum(acc);
}
