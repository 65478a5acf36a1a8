// RMSNorm: one block per row. The sum of squares is taken in f32 over the
// row, then the row is read a second time (from L1/L2) to write the scaled
// output; rows of a few thousand elements fit the caches comfortably.

#define RMSNORM_THREADS 256

template <typename T>
__device__ void rmsnorm_row(T* out, const T* x, const T* w, u64 rows, u64 cols, float eps) {
    __shared__ float partial[RMSNORM_THREADS / 32];
    __shared__ float inv_rms;
    u64 row = blockIdx.x;
    if (row >= rows) return;
    const T* xr = x + row * cols;
    T* outr = out + row * cols;
    // Vector accesses need every row start aligned, i.e. cols a multiple of 8.
    bool vec = (cols % 8) == 0;
    float ss = 0.0f;
    if (vec) {
        for (u64 c = (u64)threadIdx.x * 8; c < cols; c += (u64)blockDim.x * 8) {
            float v[8];
            load8(xr + c, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
        }
    } else {
        for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = to_f32(xr[c]);
            ss += v * v;
        }
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int i = 0; i < (int)(blockDim.x / 32); ++i) total += partial[i];
        inv_rms = 1.0f / sqrtf(total / (float)cols + eps);
    }
    __syncthreads();
    float inv = inv_rms;
    if (vec) {
        for (u64 c = (u64)threadIdx.x * 8; c < cols; c += (u64)blockDim.x * 8) {
            float v[8], g[8];
            load8(xr + c, v);
            load8(w + c, g);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = v[i] * inv * g[i];
            store8<T>(outr + c, v);
        }
    } else {
        for (u64 c = threadIdx.x; c < cols; c += blockDim.x)
            outr[c] = from_f32<T>(to_f32(xr[c]) * inv * to_f32(w[c]));
    }
}

#define RMSNORM(T, SUFFIX)                                                                         \
    extern "C" __global__ void __launch_bounds__(RMSNORM_THREADS)                                  \
        rmsnorm_##SUFFIX(T* out, const T* x, const T* w, u64 rows, u64 cols, float eps) {          \
        rmsnorm_row<T>(out, x, w, rows, cols, eps);                                                \
    }

FAPOOL_FOR_EACH_TYPE(RMSNORM)
