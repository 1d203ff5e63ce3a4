// Depthwise causal conv1d (kernel K <= 4, bias, left zero padding K-1) + SiLU over xBC, with the
// carried state = the last K-1 conv *inputs* (pre-conv), layout [B, C, K-1].
//
// xBC is read in place from the in_proj output: row (b, t) starts at xbc + (b*T + t) * ld.
// mask (nullable, int [B, T]): 0 marks left padding; padded inputs are zeroed before the conv and
// padded outputs after it (nemoh.oracle / the torch executor do the same).
// Rounding as the torch executor: conv accumulated in fp32 and rounded to T, then SiLU, rounded.
#include "common.cuh"

#define KMAX 4

template <typename T>
__device__ __forceinline__ float conv_in(const T* xbc, int ld, const int* mask, int b, int t, int T_, int c) {
    const float v = to_f(xbc[((i64)b * T_ + t) * ld + c]);
    return (mask == nullptr || mask[(i64)b * T_ + t] != 0) ? v : 0.f;
}

// Prefill: grid (ceil(C/128), ceil(T/tt), B), block 128; each thread walks tt time steps of one
// channel with a sliding window of K inputs in registers. The state is read here and rewritten
// by conv1d_state_update afterwards (a separate launch: blocks of later time tiles must not
// overwrite the state that the first tile still reads).
template <typename T>
__device__ void conv1d_prefill_impl(const T* __restrict__ xbc, int ld, const T* __restrict__ w,
                                    const T* __restrict__ bias, const T* __restrict__ state,
                                    const int* __restrict__ mask, T* __restrict__ out, int T_, int C, int K,
                                    int tt) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.z;
    const int t0 = blockIdx.y * tt;
    if (c >= C || t0 >= T_) return;
    const int t1 = min(T_, t0 + tt);
    float wk[KMAX], win[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
        // right-align the K taps in the KMAX window: tap k of K sits at KMAX-K+k
        const int kk = k - (KMAX - K);
        wk[k] = kk >= 0 ? to_f(w[(i64)c * K + kk]) : 0.f;
        win[k] = 0.f;
    }
    const float bv = bias != nullptr ? to_f(bias[c]) : 0.f;
    // window before t0: full[t0 .. t0+K-2] = inputs at times t0-K+1 .. t0-1
#pragma unroll
    for (int k = 0; k < KMAX - 1; ++k) {
        const int t = t0 - (KMAX - 1) + k;  // time of window slot k
        float v = 0.f;
        if (t >= 0) {
            v = conv_in(xbc, ld, mask, b, t, T_, c);
        } else if (t >= -(K - 1)) {
            v = to_f(state[((i64)b * C + c) * (K - 1) + (t + K - 1)]);
        }
        win[k] = v;
    }
    for (int t = t0; t < t1; ++t) {
        win[KMAX - 1] = conv_in(xbc, ld, mask, b, t, T_, c);
        float acc = bv;
#pragma unroll
        for (int k = 0; k < KMAX; ++k) acc = fmaf(wk[k], win[k], acc);
        float y = round_t<T>(acc);
        y = silu_f(y);
        const bool keep = mask == nullptr || mask[(i64)b * T_ + t] != 0;
        out[((i64)b * T_ + t) * C + c] = from_f<T>(keep ? y : 0.f);
#pragma unroll
        for (int k = 0; k < KMAX - 1; ++k) win[k] = win[k + 1];
    }
}

// After a prefill of T tokens: state[j] = full[T + j], j < K-1, where full = [state | masked x].
// One thread per (b, c); in place is safe because slot j reads slot T + j > j, not yet written.
template <typename T>
__device__ void conv1d_state_update_impl(const T* __restrict__ xbc, int ld, T* __restrict__ state,
                                         const int* __restrict__ mask, int B, int T_, int C, int K) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)B * C) return;
    const int b = (int)(i / C), c = (int)(i % C);
    T* s = state + i * (K - 1);
    for (int j = 0; j < K - 1; ++j) {
        const int f = T_ + j;  // index into full
        s[j] = f < K - 1 ? s[f] : from_f<T>(conv_in(xbc, ld, mask, b, f - (K - 1), T_, c));
    }
}

// Decode: one token. One thread per (b, c): conv over [state | x], then shift x into the state.
// mask (nullable, int [B]).
template <typename T>
__device__ void conv1d_step_impl(const T* __restrict__ xbc, int ld, const T* __restrict__ w,
                                 const T* __restrict__ bias, T* __restrict__ state, const int* __restrict__ mask,
                                 T* __restrict__ out, int B, int C, int K) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)B * C) return;
    const int b = (int)(i / C), c = (int)(i % C);
    const bool keep = mask == nullptr || mask[b] != 0;
    const float x = keep ? to_f(xbc[(i64)b * ld + c]) : 0.f;
    T* s = state + i * (K - 1);
    float acc = bias != nullptr ? to_f(bias[c]) : 0.f;
    for (int k = 0; k < K - 1; ++k) acc = fmaf(to_f(w[(i64)c * K + k]), to_f(s[k]), acc);
    acc = fmaf(to_f(w[(i64)c * K + K - 1]), x, acc);
    for (int k = 0; k < K - 2; ++k) s[k] = s[k + 1];
    s[K - 2] = from_f<T>(x);
    const float y = silu_f(round_t<T>(acc));
    out[(i64)b * C + c] = from_f<T>(keep ? y : 0.f);
}

#define NEMOH_INST(T, S)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        conv1d_prefill_##S(const T* xbc, int ld, const T* w, const T* bias, const T* state,           \
                           const int* mask, T* out, int T_, int C, int K, int tt) {                   \
        conv1d_prefill_impl<T>(xbc, ld, w, bias, state, mask, out, T_, C, K, tt);                     \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        conv1d_state_update_##S(const T* xbc, int ld, T* state, const int* mask, int B, int T_, int C, \
                                int K) {                                                              \
        conv1d_state_update_impl<T>(xbc, ld, state, mask, B, T_, C, K);                               \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        conv1d_step_##S(const T* xbc, int ld, const T* w, const T* bias, T* state, const int* mask,    \
                        T* out, int B, int C, int K) {                                                \
        conv1d_step_impl<T>(xbc, ld, w, bias, state, mask, out, B, C, K);                             \
    }
NEMOH_FOR_EACH_DTYPE(NEMOH_INST)
#undef NEMOH_INST
