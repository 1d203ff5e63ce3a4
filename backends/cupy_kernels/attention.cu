// GQA attention without positional encoding: causal, padded keys masked, scale from the host
// (head_dim^-0.5), softmax in fp32 (online, flash style), output rounded to T.
//
// KV cache: k/v [B, Smax, KV, Dh] in T, key mask int [B, Smax] (1 = a real token).
// `len` (device int) = tokens cached before this forward; the T new tokens go to [len, len+T).
// Reading the length from device memory keeps a captured CUDA graph valid as the context grows.
// Query head q reads KV head q / (Q/KV). A query that sees no key (a padding row) outputs zeros.
#include "common.cuh"

#define ATT_DMAX 128
#define ATT_TK 32
#define ATT_QROWS 16      // query rows per prefill block (4 warps x 4 rows)
#define ATT_GROUP_MAX 16  // query heads per KV head in decode (4 warps x at most 4 heads)

// grid (B*T), block 128: append the new k, v rows at len + t and their mask bits.
template <typename T>
__device__ void kv_append_impl(const T* __restrict__ k, const T* __restrict__ v, int ldkv, T* __restrict__ kc,
                               T* __restrict__ vc, int* __restrict__ kmask, const int* __restrict__ mask,
                               const int* __restrict__ len, int T_, int Smax, int KVD) {
    const int b = blockIdx.x / T_, t = blockIdx.x % T_;
    const int pos = len[0] + t;
    if (pos >= Smax) return;  // the host grows the cache before; never write out of bounds
    const i64 src = ((i64)b * T_ + t) * ldkv;
    const i64 dst = ((i64)b * Smax + pos) * KVD;
    for (int e = threadIdx.x; e < KVD; e += blockDim.x) {
        kc[dst + e] = k[src + e];
        vc[dst + e] = v[src + e];
    }
    if (threadIdx.x == 0) kmask[(i64)b * Smax + pos] = mask == nullptr ? 1 : (mask[(i64)b * T_ + t] != 0);
}

// Prefill: grid (ceil(T/16), Q, B), block 128 = 4 warps; warp w owns query rows 4w..4w+3 of the
// block's 16. Key tiles of 32 are staged in shared memory as fp32; lane j scores key j of the
// tile; lane d accumulates output dims d, d+32, d+64, d+96.
template <typename T>
__device__ void attn_prefill_impl(const T* __restrict__ q, int ldq, const T* __restrict__ kc,
                                  const T* __restrict__ vc, const int* __restrict__ kmask,
                                  const int* __restrict__ len, T* __restrict__ out, int T_, int Q, int KV, int Dh,
                                  int Smax, float scale) {
    __shared__ float Qs[ATT_QROWS][ATT_DMAX];
    __shared__ float Ks[ATT_TK][ATT_DMAX + 1];
    __shared__ float Vs[ATT_TK][ATT_DMAX + 1];
    __shared__ int km[ATT_TK];
    const int qh = blockIdx.y, b = blockIdx.z, t0 = blockIdx.x * ATT_QROWS;
    const int kvh = qh / (Q / KV);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int S0 = len[0];
    const int tn = min(ATT_QROWS, T_ - t0);
    for (int e = threadIdx.x; e < ATT_QROWS * Dh; e += blockDim.x) {
        const int r = e / Dh, d = e % Dh;
        Qs[r][d] = r < tn ? to_f(q[((i64)b * T_ + t0 + r) * ldq + qh * Dh + d]) : 0.f;
    }
    float m[4], l[4], o[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) o[i][j] = 0.f;
    }
    const int kend = S0 + t0 + tn;  // keys [0, kend) can be visible to some row of this block
    for (int k0 = 0; k0 < kend; k0 += ATT_TK) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TK * Dh; e += blockDim.x) {
            const int j = e / Dh, d = e % Dh, key = k0 + j;
            const i64 src = (((i64)b * Smax + key) * KV + kvh) * Dh + d;
            Ks[j][d] = key < kend ? to_f(kc[src]) : 0.f;
            Vs[j][d] = key < kend ? to_f(vc[src]) : 0.f;
        }
        if (threadIdx.x < ATT_TK) {
            const int key = k0 + threadIdx.x;
            km[threadIdx.x] = key < kend ? kmask[(i64)b * Smax + key] : 0;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = 4 * w + i;
            if (r >= tn) continue;  // warp-uniform
            const int key = k0 + lane;
            const bool vis = key <= S0 + t0 + r && km[lane] != 0;
            float sc = -INFINITY;
            if (vis) {
                float dot = 0.f;
                for (int d = 0; d < Dh; ++d) dot = fmaf(Qs[r][d], Ks[lane][d], dot);
                sc = dot * scale;
            }
            const float mn = fmaxf(m[i], warp_max(sc));
            if (mn == -INFINITY) continue;  // nothing visible yet for this row
            const float p = vis ? expf(sc - mn) : 0.f;
            const float corr = expf(m[i] - mn);  // 0 when m was -inf
            l[i] = l[i] * corr + warp_sum(p);
#pragma unroll
            for (int j = 0; j < 4; ++j) o[i][j] *= corr;
            for (int jj = 0; jj < ATT_TK; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                if (pj == 0.f) continue;  // warp-uniform
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int d = lane + 32 * j;
                    if (d < Dh) o[i][j] = fmaf(pj, Vs[jj][d], o[i][j]);
                }
            }
            m[i] = mn;
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = 4 * w + i;
        if (r >= tn) continue;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int d = lane + 32 * j;
            if (d < Dh) out[((i64)b * T_ + t0 + r) * Q * Dh + qh * Dh + d] = from_f<T>(o[i][j] * inv);
        }
    }
}

// Decode, split over the keys (flash-decoding): grid (NS, KV, B), block 128 = 4 warps. The block
// scores keys [split*per, ...) of the S0+1 cached keys for every query head of KV head kvh (warp
// w takes heads w, w+4, ... of the group, at most 16 per group) and writes unnormalised partial
// results part[b, q, split] = (o[0..Dh), m, l) for attn_decode_combine.
template <typename T>
__device__ void attn_decode_split_impl(const T* __restrict__ q, const T* __restrict__ kc,
                                       const T* __restrict__ vc, const int* __restrict__ kmask,
                                       const int* __restrict__ len, float* __restrict__ part, int Q, int KV, int Dh,
                                       int Smax, int NS, float scale) {
    __shared__ float Qs[ATT_GROUP_MAX][ATT_DMAX];
    __shared__ float Ks[ATT_TK][ATT_DMAX + 1];
    __shared__ float Vs[ATT_TK][ATT_DMAX + 1];
    __shared__ int km[ATT_TK];
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int grp = Q / KV;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int Sk = len[0] + 1;
    const int per = ((Sk + NS - 1) / NS + ATT_TK - 1) / ATT_TK * ATT_TK;
    const int kb = split * per, ke = min(Sk, kb + per);
    for (int e = threadIdx.x; e < grp * Dh; e += blockDim.x) {
        const int gi = e / Dh, d = e % Dh;
        Qs[gi][d] = to_f(q[(i64)b * Q * Dh + (kvh * grp + gi) * Dh + d]);
    }
    float m[4], l[4], o[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) o[i][j] = 0.f;
    }
    for (int k0 = kb; k0 < ke; k0 += ATT_TK) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TK * Dh; e += blockDim.x) {
            const int j = e / Dh, d = e % Dh, key = k0 + j;
            const i64 src = (((i64)b * Smax + key) * KV + kvh) * Dh + d;
            Ks[j][d] = key < ke ? to_f(kc[src]) : 0.f;
            Vs[j][d] = key < ke ? to_f(vc[src]) : 0.f;
        }
        if (threadIdx.x < ATT_TK) {
            const int key = k0 + threadIdx.x;
            km[threadIdx.x] = key < ke ? kmask[(i64)b * Smax + key] : 0;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int gi = w + 4 * i;
            if (gi >= grp) continue;  // warp-uniform
            const bool vis = km[lane] != 0;  // every cached key precedes the query
            float sc = -INFINITY;
            if (vis) {
                float dot = 0.f;
                for (int d = 0; d < Dh; ++d) dot = fmaf(Qs[gi][d], Ks[lane][d], dot);
                sc = dot * scale;
            }
            const float mn = fmaxf(m[i], warp_max(sc));
            if (mn == -INFINITY) continue;
            const float p = vis ? expf(sc - mn) : 0.f;
            const float corr = expf(m[i] - mn);
            l[i] = l[i] * corr + warp_sum(p);
#pragma unroll
            for (int j = 0; j < 4; ++j) o[i][j] *= corr;
            for (int jj = 0; jj < ATT_TK; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                if (pj == 0.f) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int d = lane + 32 * j;
                    if (d < Dh) o[i][j] = fmaf(pj, Vs[jj][d], o[i][j]);
                }
            }
            m[i] = mn;
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int gi = w + 4 * i;
        if (gi >= grp) continue;
        float* dst = part + (((i64)b * Q + kvh * grp + gi) * NS + split) * (Dh + 2);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int d = lane + 32 * j;
            if (d < Dh) dst[d] = o[i][j];
        }
        if (lane == 0) {
            dst[Dh] = m[i];
            dst[Dh + 1] = l[i];
        }
    }
}

// grid (Q, B), block >= Dh: out[b, q, d] = sum_s o_s[d] e^(m_s - M) / sum_s l_s e^(m_s - M).
template <typename T>
__device__ void attn_decode_combine_impl(const float* __restrict__ part, T* __restrict__ out, int Q, int Dh,
                                         int NS) {
    const int qh = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const float* src = part + ((i64)b * Q + qh) * NS * (Dh + 2);
    float M = -INFINITY;
    for (int s = 0; s < NS; ++s) M = fmaxf(M, src[s * (Dh + 2) + Dh]);
    float L = 0.f, acc = 0.f;
    if (M != -INFINITY) {
        for (int s = 0; s < NS; ++s) {
            const float ms = src[s * (Dh + 2) + Dh];
            if (ms == -INFINITY) continue;
            const float e = expf(ms - M);
            L = fmaf(src[s * (Dh + 2) + Dh + 1], e, L);
            if (d < Dh) acc = fmaf(src[s * (Dh + 2) + d], e, acc);
        }
    }
    if (d < Dh) out[(i64)b * Q * Dh + qh * Dh + d] = from_f<T>(L > 0.f ? acc / L : 0.f);
}

#define NEMOH_INST(T, S)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        kv_append_##S(const T* k, const T* v, int ldkv, T* kc, T* vc, int* kmask, const int* mask,     \
                      const int* len, int T_, int Smax, int KVD) {                                    \
        kv_append_impl<T>(k, v, ldkv, kc, vc, kmask, mask, len, T_, Smax, KVD);                       \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        attn_prefill_##S(const T* q, int ldq, const T* kc, const T* vc, const int* kmask,             \
                         const int* len, T* out, int T_, int Q, int KV, int Dh, int Smax, float scale) { \
        attn_prefill_impl<T>(q, ldq, kc, vc, kmask, len, out, T_, Q, KV, Dh, Smax, scale);            \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        attn_decode_split_##S(const T* q, const T* kc, const T* vc, const int* kmask, const int* len, \
                              float* part, int Q, int KV, int Dh, int Smax, int NS, float scale) {    \
        attn_decode_split_impl<T>(q, kc, vc, kmask, len, part, Q, KV, Dh, Smax, NS, scale);           \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        attn_decode_combine_##S(const float* part, T* out, int Q, int Dh, int NS) {                   \
        attn_decode_combine_impl<T>(part, out, Q, Dh, NS);                                            \
    }
NEMOH_FOR_EACH_DTYPE(NEMOH_INST)
#undef NEMOH_INST
