// Mixture-of-experts kernels: the router's softmax top-k, the permutation
// that groups (token, expert) assignments by expert (count, offsets, place),
// the copy of token rows to their slots, and the weighted combine of the
// expert outputs back into token rows.
//
// Expert ids and slots are f32 buffers holding integral values (the host's
// convention for index buffers, exact below 2^24); a negative slot is a
// dropped assignment. Assignment a belongs to token a / k.

#define MOE_ROUTER_THREADS 256
#define MOE_MAX_EXPERTS 256
#define MOE_MAX_TOP_K 8
#define MOE_CHUNK 1024
#define MOE_CHUNK_THREADS 256
#define MOE_ROWS_THREADS 256

// (v, e) beats (bv, be): a larger value, or an equal one at a lower index;
// NaN ranks below every number (so every lane agrees on one order), and an
// index of -1 is no candidate.
__device__ __forceinline__ bool moe_beats(float v, int e, float bv, int be) {
    if (e < 0) return false;
    if (be < 0) return true;
    if (isnan(v) || isnan(bv)) return isnan(bv) && (!isnan(v) || e < be);
    return v > bv || (v == bv && e < be);
}

// One warp per row of `experts` logits: k rounds of a warp-wide argmax over
// the experts not yet taken (lane l holds experts l, l + 32, ...), then the
// chosen probabilities renormalised: exp(l_j - l_max) over their sum.
template <typename T>
__device__ void router_row(const T* logits, float* ids, float* weights, u64 rows, int experts, int k) {
    const int warps = MOE_ROUTER_THREADS / 32;
    const int lane = threadIdx.x & 31;
    const u64 row = (u64)blockIdx.x * warps + threadIdx.x / 32;
    if (row >= rows) return;
    const T* l = logits + row * (u64)experts;
    float v[MOE_MAX_EXPERTS / 32];
#pragma unroll
    for (int i = 0; i < MOE_MAX_EXPERTS / 32; ++i) {
        int e = lane + 32 * i;
        v[i] = e < experts ? to_f32(l[e]) : 0.0f;
    }
    unsigned taken = 0;
    float chosen_v[MOE_MAX_TOP_K];
    int chosen_e[MOE_MAX_TOP_K];
    for (int j = 0; j < k; ++j) {
        float bv = 0.0f;
        int be = -1;
#pragma unroll
        for (int i = 0; i < MOE_MAX_EXPERTS / 32; ++i) {
            int e = lane + 32 * i;
            bool open = e < experts && !((taken >> i) & 1u);
            if (open && moe_beats(v[i], e, bv, be)) {
                bv = v[i];
                be = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (moe_beats(ov, oe, bv, be)) {
                bv = ov;
                be = oe;
            }
        }
        if (be >= 0 && (be & 31) == lane) taken |= 1u << (be >> 5);
        chosen_v[j] = bv;
        chosen_e[j] = be;
    }
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += expf(chosen_v[j] - chosen_v[0]);
    for (int j = lane; j < k; j += 32) {
        float p = 0.0f;
        int e = 0;
        // Registers are indexed by a loop counter, not by the lane.
        for (int i = 0; i < k; ++i) {
            if (i == j) {
                p = expf(chosen_v[i] - chosen_v[0]);
                e = chosen_e[i];
            }
        }
        ids[row * k + j] = (float)e;
        weights[row * k + j] = p / sum;
    }
}

#define ROUTER(T, SUFFIX)                                                                          \
    extern "C" __global__ void __launch_bounds__(MOE_ROUTER_THREADS)                               \
        router_top_k_##SUFFIX(const T* logits, float* ids, float* weights, u64 rows, int experts, int k) { \
        router_row<T>(logits, ids, weights, rows, experts, k);                                     \
    }

FAPOOL_FOR_EACH_TYPE(ROUTER)

// The expert of assignment a, or -1 for an id outside 0..experts.
__device__ __forceinline__ int moe_expert(const float* ids, u64 a, u64 n, int experts) {
    if (a >= n) return -1;
    float f = ids[a];
    return (f >= 0.0f && f < (float)experts) ? (int)f : -1;
}

// Per chunk of MOE_CHUNK assignments, how many go to each expert:
// counts[chunk * experts + e].
extern "C" __global__ void __launch_bounds__(MOE_CHUNK_THREADS) expert_count(const float* ids, int* counts, u64 n, int experts) {
    __shared__ int hist[MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const u64 base = (u64)blockIdx.x * MOE_CHUNK;
    for (int i = threadIdx.x; i < MOE_CHUNK; i += blockDim.x) {
        int e = moe_expert(ids, base + i, n, experts);
        if (e >= 0) atomicAdd(&hist[e], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[(u64)blockIdx.x * experts + e] = hist[e];
}

// One block, thread e for expert e: turns the chunk counts into each chunk's
// first rank within the expert (an exclusive scan over the chunks), writes
// the expert's total before capacity to `totals`, and the first row of each
// expert's kept rows to `starts` (experts in index order). capacity < 0: none.
extern "C" __global__ void __launch_bounds__(MOE_MAX_EXPERTS)
    expert_offsets(int* counts, int* totals, int* starts, int chunks, int experts, int capacity) {
    __shared__ int kept[MOE_MAX_EXPERTS];
    const int e = threadIdx.x;
    if (e < experts) {
        int total = 0;
        for (int c = 0; c < chunks; ++c) {
            int x = counts[(u64)c * experts + e];
            counts[(u64)c * experts + e] = total;
            total += x;
        }
        totals[e] = total;
        kept[e] = capacity < 0 ? total : min(total, capacity);
    }
    __syncthreads();
    if (e == 0) {
        int at = 0;
        for (int i = 0; i < experts; ++i) {
            starts[i] = at;
            at += kept[i];
        }
    }
}

// One block per chunk: every assignment's rank within its expert, keeping
// the assignments' order (rounds of MOE_CHUNK_THREADS in order; within a
// round, warps in order and lanes in order), and from it its slot, or -1
// past the capacity.
extern "C" __global__ void __launch_bounds__(MOE_CHUNK_THREADS)
    expert_place(const float* ids, float* slots, const int* counts, const int* starts, u64 n, int experts, int capacity) {
    const int warps = MOE_CHUNK_THREADS / 32;
    __shared__ int in_warp[MOE_CHUNK_THREADS / 32][MOE_MAX_EXPERTS];
    __shared__ int running[MOE_MAX_EXPERTS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) running[e] = 0;
    const u64 chunk = blockIdx.x;
    for (int round = 0; round < MOE_CHUNK / MOE_CHUNK_THREADS; ++round) {
        for (int i = threadIdx.x; i < warps * MOE_MAX_EXPERTS; i += blockDim.x) in_warp[i / MOE_MAX_EXPERTS][i % MOE_MAX_EXPERTS] = 0;
        __syncthreads();
        const u64 a = chunk * MOE_CHUNK + (u64)round * MOE_CHUNK_THREADS + threadIdx.x;
        const int e = moe_expert(ids, a, n, experts);
        const unsigned same = __match_any_sync(0xffffffffu, e);
        const int before = __popc(same & ((1u << lane) - 1u));
        if (e >= 0 && before == 0) in_warp[warp][e] = __popc(same);
        __syncthreads();
        if (e >= 0) {
            int rank = counts[chunk * experts + e] + running[e] + before;
            for (int w = 0; w < warp; ++w) rank += in_warp[w][e];
            slots[a] = (capacity < 0 || rank < capacity) ? (float)(starts[e] + rank) : -1.0f;
        } else if (a < n) {
            slots[a] = -1.0f;
        }
        __syncthreads();
        for (int x = threadIdx.x; x < experts; x += blockDim.x) {
            int sum = 0;
            for (int w = 0; w < warps; ++w) sum += in_warp[w][x];
            running[x] += sum;
        }
        __syncthreads();
    }
}

// One warp per assignment: row a / k of `x` to row slots[a] of `out`
// (16-byte copies when rows are multiples of 16 bytes); dropped ones, and
// slots past the `kept` rows of `out`, skipped.
extern "C" __global__ void __launch_bounds__(MOE_ROWS_THREADS)
    permute_rows(unsigned char* out, const unsigned char* x, const float* slots, u64 n, int k, u64 row_bytes, u64 kept) {
    const int warps = MOE_ROWS_THREADS / 32;
    const int lane = threadIdx.x & 31;
    const bool vec = (row_bytes & 15) == 0;
    for (u64 a = (u64)blockIdx.x * warps + threadIdx.x / 32; a < n; a += (u64)gridDim.x * warps) {
        const float s = slots[a];
        if (!(s >= 0.0f && s < (float)kept)) continue;
        const unsigned char* src = x + (a / k) * row_bytes;
        unsigned char* dst = out + (u64)s * row_bytes;
        if (vec) {
            for (u64 i = (u64)lane * 16; i < row_bytes; i += 32 * 16) *reinterpret_cast<uint4*>(dst + i) = *reinterpret_cast<const uint4*>(src + i);
        } else {
            for (u64 i = lane; i < row_bytes; i += 32) dst[i] = src[i];
        }
    }
}

// One warp per token row: the sum over its k assignments of weight times
// expert row, in f32, written once in the storage type (zero when every
// assignment was dropped). Slots past the `y_rows` rows of `y` count as dropped.
template <typename T>
__device__ void combine_row(T* out, const T* y, const float* slots, const float* weights, u64 rows, int k, u64 cols, u64 y_rows) {
    const int warps = MOE_ROWS_THREADS / 32;
    const int lane = threadIdx.x & 31;
    const bool vec = (cols % 8) == 0;
    for (u64 t = (u64)blockIdx.x * warps + threadIdx.x / 32; t < rows; t += (u64)gridDim.x * warps) {
        T* o = out + t * cols;
        if (vec) {
            for (u64 c = (u64)lane * 8; c < cols; c += 32 * 8) {
                float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                for (int j = 0; j < k; ++j) {
                    const float s = slots[t * k + j];
                    if (!(s >= 0.0f && s < (float)y_rows)) continue;
                    const float w = weights[t * k + j];
                    float v[8];
                    load8(y + (u64)s * cols + c, v);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += w * v[i];
                }
                store8<T>(o + c, acc);
            }
        } else {
            for (u64 c = lane; c < cols; c += 32) {
                float acc = 0.0f;
                for (int j = 0; j < k; ++j) {
                    const float s = slots[t * k + j];
                    if (s >= 0.0f && s < (float)y_rows) acc += weights[t * k + j] * to_f32(y[(u64)s * cols + c]);
                }
                o[c] = from_f32<T>(acc);
            }
        }
    }
}

#define COMBINE(T, SUFFIX)                                                                         \
    extern "C" __global__ void __launch_bounds__(MOE_ROWS_THREADS)                                 \
        combine_rows_##SUFFIX(T* out, const T* y, const float* slots, const float* weights, u64 rows, int k, u64 cols, u64 y_rows) { \
        combine_row<T>(out, y, slots, weights, rows, k, cols, y_rows);                             \
    }

FAPOOL_FOR_EACH_TYPE(COMBINE)
