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

// token rows a decode GEMV reads its weights once for (linear.cu, quant.cu; cupy_backend.GEMV_MMAX)
#define GEMV_MMAX 8

// a warp's GEMV epilogue for output row r: each token row's lane partials summed across the warp, rounded to
// T, squared ReLU if `act` (rounded again), stored by lane 0 at y[m, r]
template <typename T>
__device__ __forceinline__ void gemv_store(const float* acc, int M, int lane, int act, T* __restrict__ y, int ldy,
                                           int r) {
#pragma unroll
    for (int m = 0; m < GEMV_MMAX; ++m) {
        if (m < M) {
            const float s = warp_sum(acc[m]);
            if (lane == 0) {
                float v = round_t<T>(s);
                if (act) v = relu2_f(v);
                y[(i64)m * ldy + r] = from_f<T>(v);
            }
        }
    }
}

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

// ModelOpt FP8 / NVFP4 number formats in plain code (no cuda_fp8.h: NVRTC and the CPU emulator alike).
// e4m3 (float8_e4m3fn): sign, 4 exponent bits (bias 7), 3 mantissa bits, no infinities, max 448,
// subnormals in steps of 2^-9. e2m1: codes 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign.

// one e4m3 byte -> its exact value (0x7f / 0xff: NaN)
__device__ __forceinline__ float e4m3_to_f(unsigned b) {
    const unsigned e = (b >> 3) & 15u, m = b & 7u;
    float v = e ? __int_as_float((int)(((e + 120u) << 23) | (m << 20))) : (float)m * 0.001953125f;
    if (e == 15u && m == 7u) v = __int_as_float(0x7fc00000);
    return (b & 0x80u) ? -v : v;
}

// x rounded to the nearest e4m3 value, ties to even (subnormals included). Callers clamp to +-448 first
// (the format has no value between 448 and the NaN at 480).
__device__ __forceinline__ float e4m3_round(float x) {
    const float a = fabsf(x);
    const int ea = ((__float_as_int(a) >> 23) & 255) - 127;
    const int e = ea < -6 ? -6 : ea;                                  // e4m3's smallest normal exponent: -6
    const float step = __int_as_float((e - 3 + 127) << 23);          // 3 mantissa bits: 2^(e-3), >= 2^-9
    return copysignf(rintf(a / step) * step, x);                     // a / step: exact (a power of two)
}

// e2m1 magnitude of code i (0..7): 0, 0.5, then (1 + m/2) * 2^(e-1), e = i >> 1, m = i & 1. Arithmetic, not a
// table: a dynamically indexed array would live in local memory
__device__ __forceinline__ float e2m1_mag(unsigned i) {
    return i < 2u ? 0.5f * (float)i : (1.f + 0.5f * (float)(i & 1u)) * __int_as_float((int)((126u + (i >> 1)) << 23));
}

// e2m1 code (low 4 bits) -> value
__device__ __forceinline__ float e2m1_to_f(unsigned c) {
    const float v = e2m1_mag(c & 7u);
    return (c & 8u) ? -v : v;
}

// |y| clamped to 6 and rounded to an e2m1 magnitude, ties to even (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
// 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), the sign of y kept: torch_backend's bucketize over the midpoints
__device__ __forceinline__ float e2m1_round(float y) {
    const float a = fminf(fabsf(y), 6.f);
    const int i = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.f);
    return copysignf(e2m1_mag((unsigned)i), y);
}
