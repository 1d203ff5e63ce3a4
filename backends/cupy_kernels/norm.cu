// RMSNorm with the residual add fused, and the gated grouped RMSNorm of the Mamba2 mixer.
#include "common.cuh"

// add_rmsnorm: one block per row m of D values.
//   if delta: x[m] = T(x[m] + delta[m])          (the block's residual add, in place)
//   h[m] = T(w * (x * rsqrt(mean(x^2) + eps)))    (fp32 inside, as nemoh.oracle.rmsnorm)
//   rowmask (nullable, int per row): 0 writes a zero row to h (padding rows entering a Mamba
//   mixer are zeroed before in_proj, as the torch executor does).
template <typename T>
__device__ void add_rmsnorm_impl(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ w,
                                 T* __restrict__ h, const int* __restrict__ rowmask, int D, float eps) {
    __shared__ float sh[32];
    const i64 base = (i64)blockIdx.x * D;
    float ss = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = to_f(x[base + d]);
        if (delta != nullptr) {
            const T r = from_f<T>(v + to_f(delta[base + d]));
            x[base + d] = r;
            v = to_f(r);
        }
        ss = fmaf(v, v, ss);
    }
    const float total = block_sum(ss, sh);
    const float r = rsqrtf(total / (float)D + eps);
    const bool keep = rowmask == nullptr || rowmask[blockIdx.x] != 0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float v = to_f(x[base + d]);  // this thread's own (already rounded) value
        h[base + d] = keep ? from_f<T>(to_f(w[d]) * (v * r)) : from_f<T>(0.f);
    }
}

// gated_rmsnorm: grid (M, G); block normalises group g of row m.
//   v = y * silu(z)       (y fp32 from the scan, z in T read from the in_proj output, row stride ldz)
//   out = T(w * (v * rsqrt(mean_over_group(v^2) + eps)))
template <typename T>
__device__ void gated_rmsnorm_impl(const float* __restrict__ y, const T* __restrict__ z, int ldz,
                                   const T* __restrict__ w, T* __restrict__ out, int d_inner, int gs,
                                   float eps) {
    __shared__ float sh[32];
    const i64 m = blockIdx.x;
    const int g0 = blockIdx.y * gs;
    float ss = 0.f;
    for (int i = threadIdx.x; i < gs; i += blockDim.x) {
        const int c = g0 + i;
        const float v = y[m * d_inner + c] * silu_f(to_f(z[m * ldz + c]));
        ss = fmaf(v, v, ss);
    }
    const float total = block_sum(ss, sh);
    const float r = rsqrtf(total / (float)gs + eps);
    for (int i = threadIdx.x; i < gs; i += blockDim.x) {
        const int c = g0 + i;
        const float v = y[m * d_inner + c] * silu_f(to_f(z[m * ldz + c]));
        out[m * d_inner + c] = from_f<T>(to_f(w[c]) * (v * r));
    }
}

#define NEMOH_INST(T, S)                                                                              \
    extern "C" __global__ void __launch_bounds__(1024)                                                \
        add_rmsnorm_##S(T* x, const T* delta, const T* w, T* h, const int* rowmask, int D, float eps) { \
        add_rmsnorm_impl<T>(x, delta, w, h, rowmask, D, eps);                                         \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(1024)                                                \
        gated_rmsnorm_##S(const float* y, const T* z, int ldz, const T* w, T* out, int d_inner,       \
                          int gs, float eps) {                                                        \
        gated_rmsnorm_impl<T>(y, z, ldz, w, out, d_inner, gs, eps);                                   \
    }
NEMOH_FOR_EACH_DTYPE(NEMOH_INST)
#undef NEMOH_INST
