// Merge of two partial attention results by their log-sum-exp (natural log):
//   o = (e^(a-m) o + e^(b-m) o2) / (e^(a-m) + e^(b-m)),  lse = m + ln(sum)
// with m = max(a, b). Rows where both are -inf (no keys on either side) are
// left as they are, as the CPU reference does. One warp per row, so the
// row's lse is read by every lane before lane 0 overwrites it.

#define MERGE(T, SUFFIX)                                                                           \
    extern "C" __global__ void merge_partials_##SUFFIX(T* o, float* lse, const T* o2,              \
                                                       const float* lse2, u64 rows, u64 d) {       \
        u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;                              \
        int lane = threadIdx.x & 31;                                                               \
        if (warp >= rows) return;                                                                  \
        float a = lse[warp], b = lse2[warp];                                                       \
        float m = fmaxf(a, b);                                                                     \
        if (m == FAPOOL_NEG_INF) return;                                                           \
        float wa = expf(a - m), wb = expf(b - m);                                                  \
        float sum = wa + wb;                                                                       \
        for (u64 c = lane; c < d; c += 32) {                                                       \
            u64 i = warp * d + c;                                                                  \
            o[i] = from_f32<T>((wa * to_f32(o[i]) + wb * to_f32(o2[i])) / sum);                    \
        }                                                                                          \
        __syncwarp();                                                                              \
        if (lane == 0) lse[warp] = m + logf(sum);                                                  \
    }

FAPOOL_FOR_EACH_TYPE(MERGE)
