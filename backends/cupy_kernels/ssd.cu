// Mamba2 selective state space: the chunked (SSD) scan for prefill and the single-token update.
//
// Notation: B batch, T tokens, H heads, P head dim, G groups, N state size, l chunk length,
// nc = ceil(T / l) chunks. Head h reads group g(h) = h / (H/G) (contiguous heads share a group).
// Inputs are read in place: xbc is the conv output [B, T, C] with C = H*P + 2*G*N laid out
// [x | B | C]; dt_raw is the in_proj output's dt columns (row stride ld).
// Everything here is fp32, except the cumulative sums of dt*A, which are accumulated in fp64 so
// that the segment sums cum[t] - cum[s] do not cancel (fp32 cumulative sums over a chunk of 128+
// steps lose ~1e-4 relative in exp(seg); the torch executor avoids that with a masked cumsum).
//
//   dt    = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max)             [B, H, T]  (ssd_dt_cumsum)
//   cum   = cumsum within each chunk of dt*A (inclusive, fp64)               [B, H, T]
//   st[c] = sum_s exp(cum[end]-cum[s]) dt[s] x[s] (x) B[s]         [B, nc, H, P, N]  (ssd_chunk_state)
//   start[c] = state entering chunk c; final state -> ssm                         (ssd_state_passing)
//   y[t]  = exp(cum[t]) C[t].start + sum_{s<=t} exp(cum[t]-cum[s]) (C[t].B[s]) dt[s] x[s] + D x[t]
//                                                                    [B, T, H*P]  (ssd_chunk_scan)
#include "common.cuh"

#define SSD_PMAX 128
#define SSD_NMAX 128

// One thread per (b, h, chunk): discretised dt and the fp64 inclusive cumsum of dt*A.
template <typename T>
__device__ void ssd_dt_cumsum_impl(const T* __restrict__ dt_raw, int ld, const T* __restrict__ dt_bias,
                                   const float* __restrict__ A, float* __restrict__ dtd, double* __restrict__ cum,
                                   int B, int T_, int H, int chunk, float dt_min, float dt_max) {
    const int nc = (T_ + chunk - 1) / chunk;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)B * nc * H) return;
    const int h = (int)(i % H);
    const int c = (int)((i / H) % nc);
    const int b = (int)(i / ((i64)H * nc));
    const float a = A[h], bias = to_f(dt_bias[h]);
    const int t0 = c * chunk, t1 = min(T_, t0 + chunk);
    const i64 o = ((i64)b * H + h) * T_;
    double acc = 0.0;
    for (int t = t0; t < t1; ++t) {
        float v = softplus_f(to_f(dt_raw[((i64)b * T_ + t) * ld + h]) + bias);
        v = fminf(fmaxf(v, dt_min), dt_max);
        dtd[o + t] = v;
        acc += (double)(v * a);
        cum[o + t] = acc;
    }
}

// grid (H, B*nc), block 256 = 8 warps. Warp w owns p = w + 8i (i < 16), lane owns n = lane + 32j
// (j < 4): a [P x N] <= [128 x 128] tile in 64 accumulators per thread.
template <typename T>
__device__ void ssd_chunk_state_impl(const T* __restrict__ xbc, const float* __restrict__ dtd,
                                     const double* __restrict__ cum, float* __restrict__ states, int T_, int H,
                                     int P, int G, int N, int chunk) {
    __shared__ float Xs[32][SSD_PMAX];
    __shared__ float Bs[32][SSD_NMAX];
    __shared__ float coef[32];
    const int nc = (T_ + chunk - 1) / chunk;
    const int h = blockIdx.x, b = blockIdx.y / nc, c = blockIdx.y % nc;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int g = h / (H / G);
    const int Cd = H * P + 2 * G * N;
    const int c0 = c * chunk, cl = min(chunk, T_ - c0);
    const i64 bh = ((i64)b * H + h) * T_;
    const double cum_end = cum[bh + c0 + cl - 1];
    float acc[16][4];
#pragma unroll
    for (int i = 0; i < 16; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int s0 = 0; s0 < cl; s0 += 32) {
        const int sn = min(32, cl - s0);
        if (threadIdx.x < 32) {
            const int s = threadIdx.x;
            coef[s] = s < sn ? expf((float)(cum_end - cum[bh + c0 + s0 + s])) * dtd[bh + c0 + s0 + s] : 0.f;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < 32 * P; e += blockDim.x) {
            const int s = e / P, p = e % P;
            Xs[s][p] = s < sn ? to_f(xbc[((i64)b * T_ + c0 + s0 + s) * Cd + h * P + p]) * coef[s] : 0.f;
        }
        for (int e = threadIdx.x; e < 32 * N; e += blockDim.x) {
            const int s = e / N, n = e % N;
            Bs[s][n] = s < sn ? to_f(xbc[((i64)b * T_ + c0 + s0 + s) * Cd + H * P + g * N + n]) : 0.f;
        }
        __syncthreads();
        for (int s = 0; s < sn; ++s) {
            float bv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = (lane + 32 * j) < N ? Bs[s][lane + 32 * j] : 0.f;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const int p = w + 8 * i;
                const float xv = p < P ? Xs[s][p] : 0.f;
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv, bv[j], acc[i][j]);
            }
        }
        __syncthreads();
    }
    float* out = states + (((i64)b * nc + c) * H + h) * P * N;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const int p = w + 8 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = lane + 32 * j;
            if (p < P && n < N) out[(i64)p * N + n] = acc[i][j];
        }
    }
}

// One thread per (b, h, p, n): walk the chunks in order. On return states[c] holds the state
// entering chunk c, and ssm (read as the initial state) holds the final state.
__device__ void ssd_state_passing_impl(float* __restrict__ states, float* __restrict__ ssm,
                                       const double* __restrict__ cum, int B, int T_, int H, int PN, int chunk) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)B * H * PN) return;
    const int pn = (int)(i % PN);
    const int h = (int)((i / PN) % H);
    const int b = (int)(i / ((i64)PN * H));
    const int nc = (T_ + chunk - 1) / chunk;
    const i64 bh = ((i64)b * H + h) * T_;
    float s = ssm[i];
    for (int c = 0; c < nc; ++c) {
        const int last = min(T_, (c + 1) * chunk) - 1;
        const float decay = expf((float)cum[bh + last]);
        const i64 k = (((i64)b * nc + c) * H + h) * PN + pn;
        const float st = states[k];
        states[k] = s;
        s = fmaf(decay, s, st);
    }
    ssm[i] = s;
}

// grid (ceil(chunk/32), H, B*nc), block 256 = 8 warps. The block computes y for 32 query rows of
// one chunk and head: warp w owns rows w + 8i (i < 4), lane owns p = lane + 32j (j < 4).
template <typename T>
__device__ void ssd_chunk_scan_impl(const T* __restrict__ xbc, const float* __restrict__ dtd,
                                    const double* __restrict__ cum, const float* __restrict__ starts,
                                    const T* __restrict__ Dp, float* __restrict__ y, int T_, int H, int P, int G,
                                    int N, int chunk) {
    __shared__ float Cs[32][SSD_NMAX + 1];  // C rows of this tile, all N
    __shared__ float Ws[32][33];            // decayed C.B for (row, s) of the current s-tile
    __shared__ float Bt[32][33];            // B of the current s-tile, one 32-wide slice of N
    __shared__ float buf[SSD_PMAX * 33];    // start-state slice [P][33], then x tile [32][P+1]
    __shared__ double cum_t[32], cum_s[32];
    __shared__ float dt_s[32];
    const int nc = (T_ + chunk - 1) / chunk;
    const int h = blockIdx.y, b = blockIdx.z / nc, c = blockIdx.z % nc;
    const int c0 = c * chunk, cl = min(chunk, T_ - c0);
    const int t0 = blockIdx.x * 32;
    if (t0 >= cl) return;
    const int tn = min(32, cl - t0);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int g = h / (H / G);
    const int Cd = H * P + 2 * G * N;
    const int offB = H * P + g * N, offC = H * P + G * N + g * N;
    const i64 row0 = (i64)b * T_ + c0;  // token row of the chunk start
    const i64 bh = ((i64)b * H + h) * T_ + c0;

    for (int e = threadIdx.x; e < 32 * N; e += blockDim.x) {
        const int r = e / N, n = e % N;
        Cs[r][n] = r < tn ? to_f(xbc[(row0 + t0 + r) * Cd + offC + n]) : 0.f;
    }
    if (threadIdx.x < 32) cum_t[threadIdx.x] = threadIdx.x < tn ? cum[bh + t0 + threadIdx.x] : 0.0;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    // (a) contribution of the state entering the chunk: C[t] . start, decayed by exp(cum[t])
    const float* st = starts + (((i64)b * nc + c) * H + h) * P * N;
    for (int n0 = 0; n0 < N; n0 += 32) {
        __syncthreads();
        for (int e = threadIdx.x; e < P * 32; e += blockDim.x) {
            const int p = e / 32, nn = e % 32;
            buf[p * 33 + nn] = n0 + nn < N ? st[(i64)p * N + n0 + nn] : 0.f;
        }
        __syncthreads();
        for (int nn = 0; nn < 32 && n0 + nn < N; ++nn) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float cv = Cs[w + 8 * i][n0 + nn];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int p = lane + 32 * j;
                    if (p < P) acc[i][j] = fmaf(cv, buf[p * 33 + nn], acc[i][j]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = w + 8 * i;
        const float e = r < tn ? expf((float)cum_t[r]) : 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] *= e;
    }

    // (b) within the chunk: s-tiles up to the last row of this tile
    for (int s0 = 0; s0 < t0 + tn; s0 += 32) {
        const int sn = min(32, cl - s0);
        __syncthreads();
        if (threadIdx.x < 32) {
            const int s = threadIdx.x;
            cum_s[s] = s < sn ? cum[bh + s0 + s] : 0.0;
            dt_s[s] = s < sn ? dtd[bh + s0 + s] : 0.f;
        }
        float wacc[4] = {0.f, 0.f, 0.f, 0.f};  // W[row w + 8q][s = lane]
        for (int n0 = 0; n0 < N; n0 += 32) {
            __syncthreads();
            for (int e = threadIdx.x; e < 32 * 32; e += blockDim.x) {
                const int s = e / 32, nn = e % 32;
                Bt[s][nn] = (s < sn && n0 + nn < N) ? to_f(xbc[(row0 + s0 + s) * Cd + offB + n0 + nn]) : 0.f;
            }
            __syncthreads();
            const int nlim = min(32, N - n0);
            for (int nn = 0; nn < nlim; ++nn) {
                const float bv = Bt[lane][nn];
#pragma unroll
                for (int q = 0; q < 4; ++q) wacc[q] = fmaf(Cs[w + 8 * q][n0 + nn], bv, wacc[q]);
            }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int r = w + 8 * q, t = t0 + r, s = s0 + lane;
            const bool on = r < tn && lane < sn && s <= t;
            Ws[r][lane] = on ? wacc[q] * expf((float)(cum_t[r] - cum_s[lane])) * dt_s[lane] : 0.f;
        }
        for (int e = threadIdx.x; e < 32 * P; e += blockDim.x) {
            const int s = e / P, p = e % P;
            buf[s * (P + 1) + p] = s < sn ? to_f(xbc[(row0 + s0 + s) * Cd + h * P + p]) : 0.f;
        }
        __syncthreads();
        for (int s = 0; s < sn; ++s) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float wv = Ws[w + 8 * i][s];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int p = lane + 32 * j;
                    if (p < P) acc[i][j] = fmaf(wv, buf[s * (P + 1) + p], acc[i][j]);
                }
            }
        }
    }

    // (c) skip connection D x, then store fp32 y
    const float dh = to_f(Dp[h]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = w + 8 * i;
        if (r >= tn) continue;
        const i64 row = row0 + t0 + r;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int p = lane + 32 * j;
            if (p < P) y[row * H * P + h * P + p] = acc[i][j] + dh * to_f(xbc[row * Cd + h * P + p]);
        }
    }
}

// Decode: grid (H, B), block 128 = 4 warps. Warp w updates rows p = w, w+4, ... of the [P, N]
// state of head h; lane owns n = lane + 32j. y[p] = sum_n s[p, n] C[n] + D x[p].
template <typename T>
__device__ void ssd_step_impl(const T* __restrict__ xbc, int ldx, const T* __restrict__ dt_raw, int ld,
                              const T* __restrict__ dt_bias, const float* __restrict__ A, const T* __restrict__ Dp,
                              float* __restrict__ ssm, float* __restrict__ y, int H, int P, int G, int N,
                              float dt_min, float dt_max) {
    const int h = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int g = h / (H / G);
    const T* row = xbc + (i64)b * ldx;
    float dt = softplus_f(to_f(dt_raw[(i64)b * ld + h]) + to_f(dt_bias[h]));
    dt = fminf(fmaxf(dt, dt_min), dt_max);
    const float decay = expf(dt * A[h]);
    const float dh = to_f(Dp[h]);
    float bv[4], cv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = lane + 32 * j;
        bv[j] = n < N ? to_f(row[H * P + g * N + n]) : 0.f;
        cv[j] = n < N ? to_f(row[H * P + G * N + g * N + n]) : 0.f;
    }
    float* s = ssm + ((i64)b * H + h) * P * N;
    for (int p = w; p < P; p += nw) {
        const float x = to_f(row[h * P + p]);
        const float dx = dt * x;
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = lane + 32 * j;
            if (n < N) {
                const float v = fmaf(decay, s[(i64)p * N + n], dx * bv[j]);
                s[(i64)p * N + n] = v;
                part = fmaf(v, cv[j], part);
            }
        }
        part = warp_sum(part);
        if (lane == 0) y[(i64)b * H * P + h * P + p] = part + dh * x;
    }
}

#define NEMOH_INST(T, S)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        ssd_dt_cumsum_##S(const T* dt_raw, int ld, const T* dt_bias, const float* A, float* dtd,      \
                          double* cum, int B, int T_, int H, int chunk, float dt_min, float dt_max) {  \
        ssd_dt_cumsum_impl<T>(dt_raw, ld, dt_bias, A, dtd, cum, B, T_, H, chunk, dt_min, dt_max);     \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        ssd_chunk_state_##S(const T* xbc, const float* dtd, const double* cum, float* states, int T_,  \
                            int H, int P, int G, int N, int chunk) {                                  \
        ssd_chunk_state_impl<T>(xbc, dtd, cum, states, T_, H, P, G, N, chunk);                        \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        ssd_chunk_scan_##S(const T* xbc, const float* dtd, const double* cum, const float* starts,    \
                           const T* Dp, float* y, int T_, int H, int P, int G, int N, int chunk) {    \
        ssd_chunk_scan_impl<T>(xbc, dtd, cum, starts, Dp, y, T_, H, P, G, N, chunk);                  \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        ssd_step_##S(const T* xbc, int ldx, const T* dt_raw, int ld, const T* dt_bias, const float* A, \
                     const T* Dp, float* ssm, float* y, int H, int P, int G, int N, float dt_min,      \
                     float dt_max) {                                                                  \
        ssd_step_impl<T>(xbc, ldx, dt_raw, ld, dt_bias, A, Dp, ssm, y, H, P, G, N, dt_min, dt_max);   \
    }
NEMOH_FOR_EACH_DTYPE(NEMOH_INST)
#undef NEMOH_INST

extern "C" __global__ void __launch_bounds__(256)
    ssd_state_passing(float* states, float* ssm, const double* cum, int B, int T_, int H, int PN, int chunk) {
    ssd_state_passing_impl(states, ssm, cum, B, T_, H, PN, chunk);
}
