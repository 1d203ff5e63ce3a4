// ModelOpt checkpoints on the device: the NVFP4 decode GEMV (packed weights dequantized in the kernel),
// the NVFP4 -> dense dequantization (prefill: into a scratch buffer before cuBLAS) and the activation
// quantizers, FP8 (static per tensor) and NVFP4 (per 16-element block), bit-equal to the torch executor
// (backends/torch_backend.py `_act_fp8`, `_act_nvfp4`) in fp32 arithmetic.
//
// NVFP4 layout (ModelOpt): codes uint8 [R, C/2], element 2j in the LOW nibble of byte j; block scales
// e4m3 bytes [R, C/16], one per 16 consecutive elements of a row; gs = weight_scale_2 (fp32, per tensor).
// w[r, c] = T(e2m1(code) * scale * gs): the product e2m1 * scale is exact in fp32, one rounding by gs,
// then one to T (the value the torch executor holds after dequantizing in fp64 and casting to T; for
// bf16 the fp32 step can differ from its direct rounding only by double rounding at a bf16 tie).
#include "common.cuh"

// 16 weights of block b of row `qr`/`sr` (8 code bytes at qr + 8b, scale byte sr[b]), dequantized to T
template <typename T>
__device__ __forceinline__ void nvfp4_block(const unsigned char* __restrict__ qr, const unsigned char* __restrict__ sr,
                                            int b, float gs, int vec, float* w) {
    unsigned lo, hi;
    if (vec) {
        const uint2 q = __ldg(reinterpret_cast<const uint2*>(qr) + b);
        lo = q.x; hi = q.y;
    } else {
        const unsigned char* p = qr + 8 * (i64)b;
        lo = (unsigned)p[0] | ((unsigned)p[1] << 8) | ((unsigned)p[2] << 16) | ((unsigned)p[3] << 24);
        hi = (unsigned)p[4] | ((unsigned)p[5] << 8) | ((unsigned)p[6] << 16) | ((unsigned)p[7] << 24);
    }
    const float s = e4m3_to_f(sr[b]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // byte j of the 8 (little-endian): elements 2j (low nibble), 2j + 1
        const unsigned byte = ((j < 4 ? lo : hi) >> (8 * (j & 3))) & 255u;
        w[2 * j] = round_t<T>(e2m1_to_f(byte & 15u) * s * gs);
        w[2 * j + 1] = round_t<T>(e2m1_to_f(byte >> 4) * s * gs);
    }
}

// grid ceil(R/8), block 256 = 8 warps, warp per output row r, lane per 16-element block:
//   y[m, r] = T(W_hat[r, :] . x[m, :]) for m < M <= 8; act=1 applies squared ReLU (rounded again).
// vec (host-checked): codes 8-byte aligned, x rows and ldx 16-byte aligned -> 8-byte code and 16-byte x loads.
template <typename T>
__device__ void gemv_nvfp4_impl(const unsigned char* __restrict__ Wq, const unsigned char* __restrict__ Ws, float gs,
                                const T* __restrict__ x, int ldx, T* __restrict__ y, int ldy, int R, int Cc, int M,
                                int act, int vec) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= R) return;
    const int nb = Cc / 16;
    const unsigned char* qr = Wq + (i64)r * (Cc / 2);
    const unsigned char* sr = Ws + (i64)r * nb;
    float acc[GEMV_MMAX];
#pragma unroll
    for (int m = 0; m < GEMV_MMAX; ++m) acc[m] = 0.f;
    for (int b = lane; b < nb; b += 32) {
        float w[16];
        nvfp4_block<T>(qr, sr, b, gs, vec, w);
#pragma unroll
        for (int m = 0; m < GEMV_MMAX; ++m) {
            if (m < M) {
                const T* xb = x + (i64)m * ldx + 16 * (i64)b;
                if (vec) {
                    const int VN = Vec<T>::N;
#pragma unroll
                    for (int v = 0; v < 16 / VN; ++v) {
                        const uint4 bx = __ldg(reinterpret_cast<const uint4*>(xb) + v);
                        const T* pb = reinterpret_cast<const T*>(&bx);
#pragma unroll
                        for (int j = 0; j < VN; ++j) acc[m] = fmaf(w[v * VN + j], to_f(pb[j]), acc[m]);
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 16; ++j) acc[m] = fmaf(w[j], to_f(xb[j]), acc[m]);
                }
            }
        }
    }
    gemv_store<T>(acc, M, lane, act, y, ldy, r);
}

// grid-stride over the nb16 blocks of 16 weights: W[16 i + j] = the dequantized weight (prefill: cuBLAS reads W)
template <typename T>
__device__ void nvfp4_dequant_impl(const unsigned char* __restrict__ Wq, const unsigned char* __restrict__ Ws,
                                   float gs, T* __restrict__ W, i64 nb16) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < nb16; i += (i64)gridDim.x * blockDim.x) {
        float w[16];
        nvfp4_block<T>(Wq + 8 * i, Ws + i, 0, gs, 0, w);
#pragma unroll
        for (int j = 0; j < 16; ++j) W[16 * i + j] = from_f<T>(w[j]);
    }
}

// Activation quantizers. grid = rows, block 256. Row i reads x[(i / xdiv) * ldx ...] and uses scale
// sc[idx ? idx[i] : 0] (MoE: the expert of pair i; xdiv = top_k reads the pair's token row), writes
// out[i * ldo ...] (out may be x itself: each thread reads its values before writing them).

// NVFP4, thread per 16-element block; g = 1 / input_scale (fp32, from the host). As torch_backend._act_nvfp4:
//   s = e4m3(min(g * amax / 6, 448)); q = e2m1((x * g) / s) (0 where s == 0); out = T((q * s) / g)
template <typename T>
__device__ void act_nvfp4_impl(const T* x, int ldx, int xdiv, const int* idx, const float* g, T* out, int ldo,
                               int C) {
    const i64 i = blockIdx.x;
    const float gi = g[idx ? idx[i] : 0];
    const T* xr = x + (i64)(i / xdiv) * ldx;
    T* orow = out + i * ldo;
    for (int b = threadIdx.x; b < C / 16; b += blockDim.x) {
        float v[16], amax = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            v[j] = to_f(xr[16 * b + j]);
            amax = fmaxf(amax, fabsf(v[j]));
        }
        const float s = e4m3_round(fminf(gi * amax / 6.f, 448.f));
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const float q = s > 0.f ? e2m1_round(v[j] * gi / s) : 0.f;
            orow[16 * b + j] = from_f<T>(q * s / gi);
        }
    }
}

// FP8, static per tensor, thread per element; sc = input_scale. As torch_backend._act_fp8:
//   out = T(e4m3(clamp(x / s, -448, 448)) * s)
template <typename T>
__device__ void act_fp8_impl(const T* x, int ldx, int xdiv, const int* idx, const float* sc, T* out, int ldo, int C) {
    const i64 i = blockIdx.x;
    const float s = sc[idx ? idx[i] : 0];
    const T* xr = x + (i64)(i / xdiv) * ldx;
    T* orow = out + i * ldo;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        orow[c] = from_f<T>(e4m3_round(fminf(fmaxf(to_f(xr[c]) / s, -448.f), 448.f)) * s);
}

#define NEMOH_INST(T, S)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        gemv_nvfp4_##S(const unsigned char* Wq, const unsigned char* Ws, float gs, const T* x, int ldx, T* y,  \
                       int ldy, int R, int Cc, int M, int act, int vec) {                                     \
        gemv_nvfp4_impl<T>(Wq, Ws, gs, x, ldx, y, ldy, R, Cc, M, act, vec);                                   \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        nvfp4_dequant_##S(const unsigned char* Wq, const unsigned char* Ws, float gs, T* W, i64 nb16) {        \
        nvfp4_dequant_impl<T>(Wq, Ws, gs, W, nb16);                                                           \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        act_nvfp4_##S(const T* x, int ldx, int xdiv, const int* idx, const float* g, T* out, int ldo, int C) { \
        act_nvfp4_impl<T>(x, ldx, xdiv, idx, g, out, ldo, C);                                                 \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        act_fp8_##S(const T* x, int ldx, int xdiv, const int* idx, const float* sc, T* out, int ldo, int C) {  \
        act_fp8_impl<T>(x, ldx, xdiv, idx, sc, out, ldo, C);                                                  \
    }
NEMOH_FOR_EACH_DTYPE(NEMOH_INST)
#undef NEMOH_INST
