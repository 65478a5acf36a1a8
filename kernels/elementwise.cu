// Element-wise kernels: GELU (tanh approximation), GELU-gated product,
// residual add, and a pseudo-random fill for benchmark inputs. Each thread handles runs of eight elements with 16-byte
// accesses; the first threads also take the tail that is not a multiple of
// eight. Buffers come straight from the allocator, so they are 16-byte aligned.

__device__ __forceinline__ float gelu_tanh(float x) {
    const float c = 0.7978846f;  // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

// A stateless hash of (seed, index): uniform bits without per-thread state.
__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

#define ELEMENTWISE(T, SUFFIX)                                                                     \
    extern "C" __global__ void gelu_##SUFFIX(T* x, u64 n) {                                       \
        u64 stride = (u64)gridDim.x * blockDim.x;                                                  \
        u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;                                      \
        u64 chunks = n / 8;                                                                        \
        for (u64 c = tid; c < chunks; c += stride) {                                               \
            float v[8];                                                                            \
            load8(x + c * 8, v);                                                                   \
            _Pragma("unroll") for (int i = 0; i < 8; ++i) v[i] = gelu_tanh(v[i]);                  \
            store8<T>(x + c * 8, v);                                                               \
        }                                                                                          \
        for (u64 i = chunks * 8 + tid; i < n; i += stride) x[i] = from_f32<T>(gelu_tanh(to_f32(x[i]))); \
    }                                                                                              \
    extern "C" __global__ void gelu_mul_##SUFFIX(T* gate, const T* up, u64 n) {                   \
        u64 stride = (u64)gridDim.x * blockDim.x;                                                  \
        u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;                                      \
        u64 chunks = n / 8;                                                                        \
        for (u64 c = tid; c < chunks; c += stride) {                                               \
            float g[8], u[8];                                                                      \
            load8(gate + c * 8, g);                                                                \
            load8(up + c * 8, u);                                                                  \
            _Pragma("unroll") for (int i = 0; i < 8; ++i) g[i] = gelu_tanh(g[i]) * u[i];           \
            store8<T>(gate + c * 8, g);                                                            \
        }                                                                                          \
        for (u64 i = chunks * 8 + tid; i < n; i += stride)                                         \
            gate[i] = from_f32<T>(gelu_tanh(to_f32(gate[i])) * to_f32(up[i]));                     \
    }                                                                                              \
    extern "C" __global__ void add_##SUFFIX(T* x, const T* y, u64 n) {                            \
        u64 stride = (u64)gridDim.x * blockDim.x;                                                  \
        u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;                                      \
        u64 chunks = n / 8;                                                                        \
        for (u64 c = tid; c < chunks; c += stride) {                                               \
            float a[8], b[8];                                                                      \
            load8(x + c * 8, a);                                                                   \
            load8(y + c * 8, b);                                                                   \
            _Pragma("unroll") for (int i = 0; i < 8; ++i) a[i] += b[i];                            \
            store8<T>(x + c * 8, a);                                                               \
        }                                                                                          \
        for (u64 i = chunks * 8 + tid; i < n; i += stride) x[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i])); \
    }                                                                                              \
    extern "C" __global__ void fill_uniform_##SUFFIX(T* x, u64 n, u64 seed, float scale) {        \
        u64 stride = (u64)gridDim.x * blockDim.x;                                                  \
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {             \
            float u = (float)(splitmix64(seed * 0x2545f4914f6cdd1dull + i) >> 40) * (1.0f / 16777216.0f); \
            x[i] = from_f32<T>((2.0f * u - 1.0f) * scale);                                         \
        }                                                                                          \
    }

FAPOOL_FOR_EACH_TYPE(ELEMENTWISE)
