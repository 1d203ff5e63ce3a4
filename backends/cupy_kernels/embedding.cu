// Embedding gather: x[m, :] = W[ids[m], :].
// One block per token row; 16-byte copies when the row is a multiple of 16 bytes.
// Ids are validated by nemoh.runtime before any backend sees them; an out-of-range id still
// never reads out of bounds here (its row is written as zeros).
#include "common.cuh"

template <typename T>
__device__ void embedding_impl(const int* __restrict__ ids, const T* __restrict__ W, T* __restrict__ out,
                               int D, int V) {
    const int m = blockIdx.x;
    const int id = ids[m];
    T* dst = out + (i64)m * D;
    if (id < 0 || id >= V) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) dst[d] = from_f<T>(0.f);
        return;
    }
    const T* src = W + (i64)id * D;
    if ((D * (int)sizeof(T)) % 16 == 0) {
        const uint4* s4 = reinterpret_cast<const uint4*>(src);
        uint4* d4 = reinterpret_cast<uint4*>(dst);
        for (int i = threadIdx.x; i < D * (int)sizeof(T) / 16; i += blockDim.x) d4[i] = __ldg(s4 + i);
    } else {
        for (int d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
    }
}

#define NEMOH_INST(T, S)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                 \
        embedding_##S(const int* ids, const T* W, T* out, int D, int V) {                             \
        embedding_impl<T>(ids, W, out, D, V);                                                         \
    }
NEMOH_FOR_EACH_DTYPE(NEMOH_INST)
#undef NEMOH_INST
