// Causal prefill attention, general path: any head_dim up to 256, any storage
// type. Online softmax (flash attention) with f32 scores and accumulators;
// one warp per query row, eight rows per block sharing key/value tiles of 32
// rows staged in shared memory as f32. This is the path for small heads and
// for f32 runs; the tensor-core path for head_dim 128 is in flash.cu.
//
// Semantics (PrefillShape): query row i of sequence n sits at absolute
// position q_offset + i and attends to keys 0 ..= q_offset + i, clipped to
// skv. K/V rows of sequence n start at n * kv_stride and hold kv_heads heads
// (grouped-query attention: query head h reads K/V head h / (heads /
// kv_heads)). Outputs: o with the query layout, and the natural-log
// log-sum-exp of the scaled scores, [nseq, heads, sq]; a row with no keys
// gets o = 0 and lse = -inf.

#define PREFILL_WARPS 8
#define PREFILL_TILE 32
#define PREFILL_MAX_D 256
// Dynamic shared memory for head_dim d: K and V tiles of PREFILL_TILE rows of
// pitch d + 1 and one query row per warp, as f32 (the layout below; the host
// asks for this much, src/backend/cuda/contract.rs).
#define PREFILL_SMEM_BYTES(d) ((2 * PREFILL_TILE * ((d) + 1) + PREFILL_WARPS * (d)) * 4)

template <typename T>
__device__ void prefill_general_impl(const T* q, const T* k, const T* v, T* out, float* lse, int sq, int skv,
                                     int kv_stride, int heads, int kv_heads, int d, int q_offset, float scale_log2) {
    extern __shared__ float smem[];
    const int pitch = d + 1;  // odd pitch: lane j reading row j hits distinct banks
    float* ks = smem;
    float* vs = ks + PREFILL_TILE * pitch;
    float* qs = vs + PREFILL_TILE * pitch;

    int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    int h = blockIdx.y, n = blockIdx.z;
    int i = blockIdx.x * PREFILL_WARPS + warp;
    bool row_valid = i < sq;
    u64 width = (u64)heads * d;
    u64 kv_width = (u64)kv_heads * d;
    int hk = h / (heads / kv_heads);  // the K/V head this query head reads
    float* qw = qs + warp * d;

    if (row_valid) {
        const T* qr = q + ((u64)n * sq + i) * width + (u64)h * d;
        for (int c = lane; c < d; c += 32) qw[c] = to_f32(qr[c]) * scale_log2;
    }
    // Keys this row may see, and the most any row of the block may see.
    int row_keys = row_valid ? min(q_offset + i + 1, skv) : 0;
    int last_row = min(blockIdx.x * PREFILL_WARPS + PREFILL_WARPS, sq) - 1;
    int block_keys = min(q_offset + last_row + 1, skv);

    float m = FAPOOL_NEG_INF, l = 0.0f;
    float acc[PREFILL_MAX_D / 32];
#pragma unroll
    for (int c = 0; c < PREFILL_MAX_D / 32; ++c) acc[c] = 0.0f;

    const T* kb = k + (u64)n * kv_stride * kv_width + (u64)hk * d;
    const T* vb = v + (u64)n * kv_stride * kv_width + (u64)hk * d;
    for (int t0 = 0; t0 < block_keys; t0 += PREFILL_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < PREFILL_TILE * d; e += blockDim.x) {
            int r = e / d, c = e % d;
            int j = t0 + r;
            bool in = j < skv;
            ks[r * pitch + c] = in ? to_f32(kb[(u64)j * kv_width + c]) : 0.0f;
            vs[r * pitch + c] = in ? to_f32(vb[(u64)j * kv_width + c]) : 0.0f;
        }
        __syncthreads();
        if (t0 >= row_keys) continue;  // warp-uniform: nothing left for this row
        int j = t0 + lane;
        float s = FAPOOL_NEG_INF;
        if (j < row_keys) {
            float dot = 0.0f;
            const float* kr = ks + lane * pitch;
            for (int c = 0; c < d; ++c) dot += qw[c] * kr[c];
            s = dot;
        }
        float mx = fmaxf(m, warp_max(s));  // finite: key t0 < row_keys exists
        float alpha = fast_exp2(m - mx);
        float p = fast_exp2(s - mx);
        l = l * alpha + warp_sum(p);
#pragma unroll
        for (int c = 0; c < PREFILL_MAX_D / 32; ++c) acc[c] *= alpha;
        int nj = min(PREFILL_TILE, row_keys - t0);
        for (int jj = 0; jj < nj; ++jj) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const float* vr = vs + jj * pitch;
#pragma unroll
            for (int c = 0; c < PREFILL_MAX_D / 32; ++c)
                if (lane + 32 * c < d) acc[c] += pj * vr[lane + 32 * c];
        }
        m = mx;
    }
    if (!row_valid) return;
    T* orow = out + ((u64)n * sq + i) * width + (u64)h * d;
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int c = 0; c < PREFILL_MAX_D / 32; ++c)
        if (lane + 32 * c < d) orow[lane + 32 * c] = from_f32<T>(acc[c] * inv);
    if (lane == 0) lse[((u64)n * heads + h) * sq + i] = l > 0.0f ? (m + log2f(l)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
}

#define PREFILL(T, SUFFIX)                                                                         \
    extern "C" __global__ void __launch_bounds__(PREFILL_WARPS * 32)                               \
        prefill_general_##SUFFIX(const T* q, const T* k, const T* v, T* out, float* lse, int sq,   \
                                 int skv, int kv_stride, int heads, int kv_heads, int d,           \
                                 int q_offset, float scale_log2) {                                 \
        prefill_general_impl<T>(q, k, v, out, lse, sq, skv, kv_stride, heads, kv_heads, d,        \
                                q_offset, scale_log2);                                             \
    }

FAPOOL_FOR_EACH_TYPE(PREFILL)
