// MoE: sigmoid router with fp32 correction bias and group-limited top-k, the gathered expert
// GEMV for decode, and the weighted combine.
//
// Routing (nemoh.oracle.moe_router): logits = h . W_gate in fp32; s = sigmoid(logits);
// choice = s + bias (bias fp32, used for the choice only); keep the topk_group groups with the
// best sum of their top-2 choice values; pick top_k experts by choice; weights = s of the chosen
// experts, normalised (+1e-20) if norm, times the scaling factor. Ties go to the lower index.
#include "common.cuh"

#define MOE_EMAX 1024
#define MOE_GMAX 64
#define MOE_KMAX 32

// Block-wide argmax over vals[0..E): highest value, lowest index on ties. All threads get it.
__device__ __forceinline__ int block_argmax(const float* vals, int E, float* shv, int* shi) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const float v = vals[e];
        if (v > bv || (v == bv && e < bi)) { bv = v; bi = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { shv[w] = bv; shi[w] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < nw; ++i)
            if (shv[i] > shv[0] || (shv[i] == shv[0] && shi[i] < shi[0])) { shv[0] = shv[i]; shi[0] = shi[i]; }
    }
    __syncthreads();
    const int r = shi[0];
    __syncthreads();
    return r == 0x7fffffff ? 0 : r;  // all NaN: still a valid index, never out of bounds
}

// grid M, block 256: route token m. Outputs w [M, k] fp32 and idx [M, k] int (choice order).
template <typename T>
__device__ void moe_router_impl(const T* __restrict__ h, const T* __restrict__ Wg, const float* __restrict__ bias,
                                float* __restrict__ out_w, int* __restrict__ out_idx, int D, int E, int top_k,
                                int n_group, int topk_group, int norm, float scaling) {
    __shared__ float sc[MOE_EMAX], ch[MOE_EMAX];
    __shared__ float gs[MOE_GMAX];
    __shared__ int keep[MOE_GMAX], sel[MOE_KMAX];
    __shared__ float shv[32];
    __shared__ int shi[32];
    const i64 m = blockIdx.x;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int e = w; e < E; e += nw) {
        float acc = 0.f;
        for (int d = lane; d < D; d += 32) acc = fmaf(to_f(h[m * D + d]), to_f(Wg[(i64)e * D + d]), acc);
        acc = warp_sum(acc);
        if (lane == 0) {
            const float s = 1.f / (1.f + expf(-acc));
            sc[e] = s;
            ch[e] = s + bias[e];
        }
    }
    __syncthreads();
    if (n_group > 1) {
        const int per = E / n_group;
        if ((int)threadIdx.x < n_group) {
            const int g = threadIdx.x;
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; ++e) {
                const float v = ch[e];
                if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
            }
            gs[g] = per >= 2 ? b1 + b2 : b1;
            keep[g] = 0;
        }
        __syncthreads();
        for (int j = 0; j < topk_group; ++j) {
            const int g = block_argmax(gs, n_group, shv, shi);
            if (threadIdx.x == 0) { keep[g] = 1; gs[g] = -INFINITY; }
            __syncthreads();
        }
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            if (!keep[e / per]) ch[e] = -INFINITY;
        __syncthreads();
    }
    for (int j = 0; j < top_k; ++j) {
        const int e = block_argmax(ch, E, shv, shi);
        if (threadIdx.x == 0) { sel[j] = e; ch[e] = -INFINITY; }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int j = 0; j < top_k; ++j) sum += sc[sel[j]];
        for (int j = 0; j < top_k; ++j) {
            float v = sc[sel[j]];
            if (norm) v = v / (sum + 1e-20f);
            out_w[m * top_k + j] = v * scaling;
            out_idx[m * top_k + j] = sel[j];
        }
    }
}

// Gathered expert GEMV (decode): grid (ceil(R/8), pairs), block 256 = 8 warps, warp per output
// row. Pair i = (token m, slot j) uses expert e = idx[i] and activation row x[i / xdiv]
// (xdiv = top_k for up_proj, reading token rows; 1 for down_proj, reading the pair's own row).
// y[i, r] = T(W[e, r, :] . x); act=1 applies squared ReLU after that rounding (rounded again).
template <typename T>
__device__ void moe_gemv_impl(const T* __restrict__ W, const int* __restrict__ idx, const T* __restrict__ x,
                              int ldx, int xdiv, T* __restrict__ y, int R, int Cc, int act, int vec) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int i = blockIdx.y;
    if (r >= R) return;
    const int e = idx[i];
    const float acc = warp_dot<T>(W + ((i64)e * R + r) * Cc, x + (i64)(i / xdiv) * ldx, Cc, vec != 0);
    if ((threadIdx.x & 31) == 0) {
        float v = round_t<T>(acc);
        if (act) v = relu2_f(v);
        y[(i64)i * R + r] = from_f<T>(v);
    }
}

// grid M, block 256: out[m] = T(sum_j w[m, j] * y[pos(m, j)]) accumulated in fp32, in slot order.
// pos (nullable): row of pair (m, j) in y when the pairs were sorted by expert for prefill.
template <typename T>
__device__ void moe_combine_impl(const float* __restrict__ w, const T* __restrict__ y, const int* __restrict__ pos,
                                 T* __restrict__ out, int L, int top_k) {
    const i64 m = blockIdx.x;
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < top_k; ++j) {
            const i64 i = m * top_k + j;
            const i64 row = pos == nullptr ? i : (i64)pos[i];
            acc = fmaf(w[i], to_f(y[row * L + l]), acc);
        }
        out[m * L + l] = from_f<T>(acc);
    }
}

#define NEMOH_INST(T, S)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        moe_router_##S(const T* h, const T* Wg, const float* bias, float* out_w, int* out_idx, int D,  \
                       int E, int top_k, int n_group, int topk_group, int norm, float scaling) {      \
        moe_router_impl<T>(h, Wg, bias, out_w, out_idx, D, E, top_k, n_group, topk_group, norm,      \
                           scaling);                                                                  \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        moe_gemv_##S(const T* W, const int* idx, const T* x, int ldx, int xdiv, T* y, int R, int Cc,   \
                     int act, int vec) {                                                              \
        moe_gemv_impl<T>(W, idx, x, ldx, xdiv, y, R, Cc, act, vec);                                   \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        moe_combine_##S(const float* w, const T* y, const int* pos, T* out, int L, int top_k) {       \
        moe_combine_impl<T>(w, y, pos, out, L, top_k);                                                \
    }
NEMOH_FOR_EACH_DTYPE(NEMOH_INST)
#undef NEMOH_INST
