// Dense decode GEMV (weights read once for up to 8 token rows), the squared-ReLU epilogue, the
// rounded elementwise add and a row gather. Prefill matmuls go to cuBLAS (cublasGemmEx, fp32
// accumulation) from the host.
#include "common.cuh"

// grid ceil(R/8), block 256 = 8 warps, warp per output row r:
//   y[m, r] = T(W[r, :] . x[m, :]) for m < M <= 8; act=1 applies squared ReLU (rounded again).
template <typename T>
__device__ void gemv_impl(const T* __restrict__ W, const T* __restrict__ x, int ldx, T* __restrict__ y, int ldy,
                          int R, int Cc, int M, int act, int vec) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= R) return;
    const T* wr = W + (i64)r * Cc;
    float acc[GEMV_MMAX];
#pragma unroll
    for (int m = 0; m < GEMV_MMAX; ++m) acc[m] = 0.f;
    if (vec) {
        const int VN = Vec<T>::N;
        const uint4* w4 = reinterpret_cast<const uint4*>(wr);
        for (int i = lane; i < Cc / VN; i += 32) {
            const uint4 a = __ldg(w4 + i);
            const T* pa = reinterpret_cast<const T*>(&a);
#pragma unroll
            for (int m = 0; m < GEMV_MMAX; ++m) {
                if (m < M) {
                    const uint4 bx = __ldg(reinterpret_cast<const uint4*>(x + (i64)m * ldx) + i);
                    const T* pb = reinterpret_cast<const T*>(&bx);
#pragma unroll
                    for (int j = 0; j < VN; ++j) acc[m] = fmaf(to_f(pa[j]), to_f(pb[j]), acc[m]);
                }
            }
        }
    } else {
        for (int i = lane; i < Cc; i += 32) {
            const float a = to_f(wr[i]);
#pragma unroll
            for (int m = 0; m < GEMV_MMAX; ++m)
                if (m < M) acc[m] = fmaf(a, to_f(x[(i64)m * ldx + i]), acc[m]);
        }
    }
    gemv_store<T>(acc, M, lane, act, y, ldy, r);
}

// x[i] = T(relu(x[i])^2), in place (prefill epilogue after a cuBLAS up projection).
template <typename T>
__device__ void relu2_impl(T* __restrict__ x, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        x[i] = from_f<T>(relu2_f(to_f(x[i])));
}

// out[i] = T(a[i] + b[i])
template <typename T>
__device__ void add_impl(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
}

// grid n, block 256: out[i, :] = src[rows[i], :] (token rows of the pairs sorted by expert)
template <typename T>
__device__ void gather_rows_impl(const T* __restrict__ src, const int* __restrict__ rows, T* __restrict__ out, int D) {
    const i64 i = blockIdx.x;
    const i64 r = rows[i];
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[i * D + d] = src[r * D + d];
}

#define NEMOH_INST(T, S)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        gemv_##S(const T* W, const T* x, int ldx, T* y, int ldy, int R, int Cc, int M, int act, int vec) { \
        gemv_impl<T>(W, x, ldx, y, ldy, R, Cc, M, act, vec);                                          \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) relu2_##S(T* x, i64 n) { relu2_impl<T>(x, n); } \
    extern "C" __global__ void __launch_bounds__(256) add_##S(const T* a, const T* b, T* out, i64 n) {  \
        add_impl<T>(a, b, out, n);                                                                    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        gather_rows_##S(const T* src, const int* rows, T* out, int D) {                               \
        gather_rows_impl<T>(src, rows, out, D);                                                       \
    }
NEMOH_FOR_EACH_DTYPE(NEMOH_INST)
#undef NEMOH_INST
