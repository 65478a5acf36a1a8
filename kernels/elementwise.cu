// Element-wise kernels: GELU (tanh approximation), GELU- and SiLU-gated
// products, residual add, a pseudo-random fill for benchmark inputs, and the
// split of fused QKV rows with the rotary embedding of q and k. Each thread handles runs of eight elements with 16-byte
// accesses; the first threads also take the tail that is not a multiple of
// eight. Buffers come straight from the allocator, so they are 16-byte aligned.

__device__ __forceinline__ float gelu_tanh(float x) {
    const float c = 0.7978846f;  // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

struct GeluTanh {
    __device__ float operator()(float x) const { return gelu_tanh(x); }
};
struct Silu {
    __device__ float operator()(float x) const { return silu(x); }
};

// gate = act(gate) * up over n elements (the gated FFNs' product).
template <typename T, typename Act> __device__ void gated_product(T* gate, const T* up, u64 n, Act act) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 chunks = n / 8;
    for (u64 c = tid; c < chunks; c += stride) {
        float g[8], u[8];
        load8(gate + c * 8, g);
        load8(up + c * 8, u);
#pragma unroll
        for (int i = 0; i < 8; ++i) g[i] = act(g[i]) * u[i];
        store8<T>(gate + c * 8, g);
    }
    for (u64 i = chunks * 8 + tid; i < n; i += stride) gate[i] = from_f32<T>(act(to_f32(gate[i])) * to_f32(up[i]));
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
        gated_product<T>(gate, up, n, GeluTanh{});                                                 \
    }                                                                                              \
    extern "C" __global__ void silu_mul_##SUFFIX(T* gate, const T* up, u64 n) {                   \
        gated_product<T>(gate, up, n, Silu{});                                                     \
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

// Splits fused QKV rows ([q | k | v], q_width + 2 kv_width wide) into q, k
// and v, rotating every head of q and k (RoPE, the half-split form: element
// i < head_dim/2 of a head pairs with i + head_dim/2, both turning by
// pos * inv_freq[i]) in the same pass. One block per row (grid-stride): the
// row's cosines and sines are taken once, in f64 as the reference takes
// them, into shared memory. A row's position is the decode step's (`step`
// non-null), else, with j = row % per_seq, seg0_start + j in the first
// segment (j < seg0_len) or seg1_start + j - seg0_len in the second (a pool
// block's zigzag pair). head_dim <= 2 * ROPE_MAX_HALF, even; the widths are
// whole heads.
#define ROPE_MAX_HALF 128

template <typename T>
__device__ void split_qkv_rope_impl(T* q, T* k, T* v, const T* qkv, const double* inv_freq, const int* step,
                                    u64 rows, int q_width, int kv_width, int head_dim, int per_seq, int seg0_start,
                                    int seg0_len, int seg1_start) {
    __shared__ float s_cos[ROPE_MAX_HALF], s_sin[ROPE_MAX_HALF];
    const int half = head_dim / 2;
    const u64 width = (u64)q_width + 2 * (u64)kv_width;
    const int pairs = (q_width + kv_width) / 2;  // rotated pairs of q and k in a row
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        long long pos;
        if (step) {
            pos = step[FAPOOL_STEP_POS];
        } else {
            const int j = (int)(r % (u64)per_seq);
            pos = j < seg0_len ? (long long)seg0_start + j : (long long)seg1_start + (j - seg0_len);
        }
        __syncthreads();  // the previous row's readers are done with the table
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            double sn, cs;
            sincos((double)pos * inv_freq[i], &sn, &cs);
            s_cos[i] = (float)cs;
            s_sin[i] = (float)sn;
        }
        __syncthreads();
        const T* src = qkv + r * width;
        for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
            const int head = p / half, i = p % half;
            const int col = head * head_dim + i;  // in q | k
            const float a = to_f32(src[col]), b = to_f32(src[col + half]);
            const float c = s_cos[i], s = s_sin[i];
            T* dst = col < q_width ? q + r * (u64)q_width + col : k + r * (u64)kv_width + (col - q_width);
            dst[0] = from_f32<T>(a * c - b * s);
            dst[half] = from_f32<T>(b * c + a * s);
        }
        for (int c = threadIdx.x; c < kv_width; c += blockDim.x) v[r * (u64)kv_width + c] = src[q_width + kv_width + c];
    }
}

#define SPLIT_QKV_ROPE(T, SUFFIX)                                                                       \
    extern "C" __global__ void split_qkv_rope_##SUFFIX(T* q, T* k, T* v, const T* qkv,                 \
                                                       const double* inv_freq, const int* step, u64 rows,  \
                                                       int q_width, int kv_width, int head_dim,            \
                                                       int per_seq, int seg0_start, int seg0_len,          \
                                                       int seg1_start) {                                   \
        split_qkv_rope_impl<T>(q, k, v, qkv, inv_freq, step, rows, q_width, kv_width, head_dim, per_seq,  \
                               seg0_start, seg0_len, seg1_start);                                          \
    }

FAPOOL_FOR_EACH_TYPE(SPLIT_QKV_ROPE)
