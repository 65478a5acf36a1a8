// Decode attention (one query per sequence) by split-KV, as in
// flash-decoding: the first `len` cache rows of each (sequence, head) are cut
// into `nsplit` chunks; `decode_partial` computes, for one chunk per block,
// the normalised partial output and its log-sum-exp, and `decode_combine`
// merges the chunks by their log-sum-exp. Memory-bound: every cache element
// is read once, with 16-byte loads.
//
// Layout: q is [nseq, heads * d]; the caches are [nseq, cap, heads * d]. A
// row of one head is handled by `tpr` threads (a power of two <= 32) of eight
// elements each, so d <= 256 and eight-element runs past d read as zero.
//
// With a non-null `len_ptr` the length is read from device memory (the
// decode step's scalars) and the grid is laid out for `cap` rows: chunks
// past the length write an empty partial (output 0, log-sum-exp -inf), which
// the combine ignores. A recorded step then replays at any length.

#define DECODE_THREADS 128
#define DECODE_UNROLL 4

template <typename T>
__device__ void decode_partial_impl(const T* q, const T* kc, const T* vc, float* part_o, float* part_lse,
                                    int cap, int len, const int* len_ptr, int heads, int d, int tpr, int chunk,
                                    float scale_log2) {
    if (len_ptr) len = min(*len_ptr, cap);
    // Per-group (m, l) and accumulators, for the block-level merge at the end.
    __shared__ float s_m[DECODE_THREADS];
    __shared__ float s_l[DECODE_THREADS];
    __shared__ float s_acc[DECODE_THREADS * 8];
    int split = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
    int nsplit = gridDim.x;
    int groups = DECODE_THREADS / tpr;
    int g = threadIdx.x / tpr;
    int sub = threadIdx.x % tpr;
    int c0 = sub * 8;
    int valid = d - c0;  // elements of this thread's run that exist (may be <= 0)
    u64 width = (u64)heads * d;

    float qv[8];
    if (valid > 0) {
        load8_guarded(q + (u64)n * width + (u64)h * d + c0, valid, qv);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) qv[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[i] *= scale_log2;

    int start = split * chunk;
    int end = min(len, start + chunk);
    const T* kbase = kc + (u64)n * cap * width + (u64)h * d + c0;
    const T* vbase = vc + (u64)n * cap * width + (u64)h * d + c0;

    float m = FAPOOL_NEG_INF, l = 0.0f;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;

    // Each group takes rows base+g, base+g+groups, ...; DECODE_UNROLL rows are
    // loaded before any is used, to keep enough bytes in flight. The trip
    // count is the same for every thread, since the shuffles below need the
    // whole warp.
    for (int base = start; base < end; base += groups * DECODE_UNROLL) {
        float kv[DECODE_UNROLL][8], vv[DECODE_UNROLL][8];
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; ++u) {
            int j = base + g + u * groups;
            if (j < end && valid > 0) {
                load8_guarded(kbase + (u64)j * width, valid, kv[u]);
                load8_guarded(vbase + (u64)j * width, valid, vv[u]);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) kv[u][i] = vv[u][i] = 0.0f;
            }
        }
        float s[DECODE_UNROLL];
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; ++u) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) dot += qv[i] * kv[u][i];
            for (int o = tpr / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o, tpr);
            s[u] = (base + g + u * groups < end) ? dot : FAPOOL_NEG_INF;
        }
        float mx = m;
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; ++u) mx = fmaxf(mx, s[u]);
        if (mx != FAPOOL_NEG_INF) {
            float alpha = fast_exp2(m - mx);  // 0 while m is still -inf
            l *= alpha;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
            for (int u = 0; u < DECODE_UNROLL; ++u) {
                float p = fast_exp2(s[u] - mx);
                l += p;
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i] += p * vv[u][i];
            }
            m = mx;
        }
    }

    // Merge the groups of the block.
    if (sub == 0) {
        s_m[g] = m;
        s_l[g] = l;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) s_acc[threadIdx.x * 8 + i] = acc[i];
    __syncthreads();
    float M = FAPOOL_NEG_INF;
    for (int i = 0; i < groups; ++i) M = fmaxf(M, s_m[i]);
    float L = 0.0f;
    if (M != FAPOOL_NEG_INF)
        for (int i = 0; i < groups; ++i) L += s_l[i] * fast_exp2(s_m[i] - M);
    u64 part = ((u64)n * heads + h) * nsplit + split;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float o = 0.0f;
        if (L > 0.0f) {
            int owner = c / 8;  // thread index within a group that holds column c
            for (int i = 0; i < groups; ++i) {
                float w = fast_exp2(s_m[i] - M);
                o += w * s_acc[(i * tpr + owner) * 8 + c % 8];
            }
            o /= L;
        }
        part_o[part * d + c] = o;
    }
    if (threadIdx.x == 0) part_lse[part] = L > 0.0f ? (M + log2f(L)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
}


#define DECODE_ROWS_THREADS 512
#define DECODE_ROWS_UNROLL 8

// Row-major variant for heads whose rows are whole 16-byte runs (head_dim a
// multiple of 8, `tpr = head_dim / 8` threads per head, and a block of
// `hg * tpr` threads, a multiple of 32, covering `hg` heads). A block reads
// each cache row of its heads as one contiguous run (8 KB for 32 x 128 in
// bf16) instead of one head's 256 bytes at a time, and every `tpr` lanes own
// one head for the whole chunk, so no merge inside the block is needed.
template <typename T>
__device__ void decode_rows_impl(const T* q, const T* kc, const T* vc, float* part_o, float* part_lse,
                                 int cap, int len, const int* len_ptr, int heads, int d, int hg, int chunk,
                                 float scale_log2) {
    if (len_ptr) len = min(*len_ptr, cap);
    int split = blockIdx.x, n = blockIdx.z;
    int nsplit = gridDim.x;
    int tpr = d / 8;
    int h = blockIdx.y * hg + threadIdx.x / tpr;
    bool live = h < heads;
    int hh = live ? h : heads - 1;  // out-of-range heads shadow the last one; their results are dropped
    int c0 = (threadIdx.x % tpr) * 8;
    u64 width = (u64)heads * d;

    float qv[8];
    load8(q + (u64)n * width + (u64)hh * d + c0, qv);
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[i] *= scale_log2;

    int start = split * chunk;
    int end = min(len, start + chunk);
    const T* kp = kc + (u64)n * cap * width + (u64)hh * d + c0;
    const T* vp = vc + (u64)n * cap * width + (u64)hh * d + c0;

    float m = FAPOOL_NEG_INF, l = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;

    for (int j = start; j < end; j += DECODE_ROWS_UNROLL) {
        Raw8<T> rk[DECODE_ROWS_UNROLL], rv[DECODE_ROWS_UNROLL];
#pragma unroll
        for (int u = 0; u < DECODE_ROWS_UNROLL; ++u) {
            if (j + u < end) {
                rk[u] = ld_stream8(kp + (u64)(j + u) * width);
                rv[u] = ld_stream8(vp + (u64)(j + u) * width);
            } else {
                zero8(rk[u]);
                zero8(rv[u]);
            }
        }
        float s[DECODE_ROWS_UNROLL];
        float mx = m;
#pragma unroll
        for (int u = 0; u < DECODE_ROWS_UNROLL; ++u) {
            float kv[8];
            unpack8(rk[u], kv);
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) dot += qv[i] * kv[i];
            for (int o = tpr / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o, tpr);
            s[u] = (j + u < end) ? dot : FAPOOL_NEG_INF;
            mx = fmaxf(mx, s[u]);
        }
        float alpha = fast_exp2(m - mx);
        l *= alpha;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
        for (int u = 0; u < DECODE_ROWS_UNROLL; ++u) {
            float p = fast_exp2(s[u] - mx);
            float vv[8];
            unpack8(rv[u], vv);
            l += p;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += p * vv[i];
        }
        m = mx;
    }
    if (!live) return;
    u64 part = ((u64)n * heads + h) * nsplit + split;
#pragma unroll
    for (int i = 0; i < 8; ++i) part_o[part * d + c0 + i] = l > 0.0f ? acc[i] / l : 0.0f;
    if (c0 == 0) part_lse[part] = l > 0.0f ? (m + log2f(l)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
}

template <typename T>
__device__ void decode_combine_impl(const float* part_o, const float* part_lse, T* out, float* lse,
                                    int nsplit, int heads, int d) {
    int h = blockIdx.x, n = blockIdx.y;
    u64 row = (u64)n * heads + h;
    const float* pl = part_lse + row * nsplit;
    float M = FAPOOL_NEG_INF;
    for (int s = 0; s < nsplit; ++s) M = fmaxf(M, pl[s]);
    float L = 0.0f;
    if (M != FAPOOL_NEG_INF)
        for (int s = 0; s < nsplit; ++s) L += expf(pl[s] - M);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float o = 0.0f;
        if (L > 0.0f) {
            for (int s = 0; s < nsplit; ++s) o += expf(pl[s] - M) * part_o[(row * nsplit + s) * d + c];
            o /= L;
        }
        out[row * d + c] = from_f32<T>(o);
    }
    if (threadIdx.x == 0) lse[row] = L > 0.0f ? M + logf(L) : FAPOOL_NEG_INF;
}

#define DECODE(T, SUFFIX)                                                                          \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS)                                   \
        decode_partial_##SUFFIX(const T* q, const T* kc, const T* vc, float* part_o,               \
                                float* part_lse, int cap, int len, const int* len_ptr, int heads,  \
                                int d, int tpr, int chunk, float scale_log2) {                     \
        decode_partial_impl<T>(q, kc, vc, part_o, part_lse, cap, len, len_ptr, heads, d, tpr,      \
                               chunk, scale_log2);                                                 \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(DECODE_ROWS_THREADS)                              \
        decode_rows_##SUFFIX(const T* q, const T* kc, const T* vc, float* part_o, float* part_lse,  \
                             int cap, int len, const int* len_ptr, int heads, int d, int hg,        \
                             int chunk, float scale_log2) {                                         \
        decode_rows_impl<T>(q, kc, vc, part_o, part_lse, cap, len, len_ptr, heads, d, hg, chunk,   \
                            scale_log2);                                                           \
    }                                                                                              \
    extern "C" __global__ void decode_combine_##SUFFIX(const float* part_o, const float* part_lse, \
                                                       T* out, float* lse, int nsplit, int heads,  \
                                                       int d) {                                    \
        decode_combine_impl<T>(part_o, part_lse, out, lse, nsplit, heads, d);                      \
    }

FAPOOL_FOR_EACH_TYPE(DECODE)
