// Greedy sampling: index of the largest value of each row, the first one on
// ties (as the CPU reference). One block per row; NaN never wins.

#define ARGMAX_THREADS 256

__device__ __forceinline__ void better(float& v, unsigned& i, float v2, unsigned i2) {
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

template <typename T> __device__ void argmax_row(const T* x, unsigned* out, u64 rows, u64 cols) {
    __shared__ float sv[ARGMAX_THREADS / 32];
    __shared__ unsigned si[ARGMAX_THREADS / 32];
    u64 row = blockIdx.x;
    if (row >= rows) return;
    const T* xr = x + row * cols;
    float v = FAPOOL_NEG_INF;
    unsigned idx = 0xffffffffu;
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) better(v, idx, to_f32(xr[c]), (unsigned)c);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        unsigned i2 = __shfl_xor_sync(0xffffffffu, idx, o);
        better(v, idx, v2, i2);
    }
    if ((threadIdx.x & 31) == 0) {
        sv[threadIdx.x / 32] = v;
        si[threadIdx.x / 32] = idx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); ++w) better(v, idx, sv[w], si[w]);
        // A row of NaN or -inf only: the CPU reference answers 0.
        out[row] = idx == 0xffffffffu ? 0u : idx;
    }
}

#define ARGMAX(T, SUFFIX)                                                                          \
    extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)                                   \
        argmax_##SUFFIX(const T* x, unsigned* out, u64 rows, u64 cols) {                           \
        argmax_row<T>(x, out, rows, cols);                                                         \
    }

FAPOOL_FOR_EACH_TYPE(ARGMAX)
