// Token embedding plus sinusoidal absolute positions (none where `freq` is
// null: models with rotary positions rotate q and k instead). The frequencies come
// from the host (computed in f64 exactly as the CPU reference does), and the
// angle and its sine are taken in f64: at positions of tens of thousands an
// f32 angle would be off by several milliradians.
//
// `embed_step` embeds one token per sequence from the decode step's scalars
// in device memory (int32: FAPOOL_STEP_POS the position, FAPOOL_STEP_TOKENS + n
// the token of sequence n), so a recorded step replays at the next position.

template <typename T>
__device__ void embed_impl(T* out, const T* table, const unsigned* tokens, const double* freq, u64 rows, u64 d,
                           u64 n, u64 pos0) {
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        u64 tok = tokens[row];
        double pos = (double)(pos0 + row % n);
        for (u64 c = threadIdx.x; c < d; c += blockDim.x) {
            float enc = 0.0f;
            if (freq) {
                double angle = pos * freq[c / 2];
                enc = (float)((c % 2 == 0) ? sin(angle) : cos(angle));
            }
            out[row * d + c] = from_f32<T>(to_f32(table[tok * d + c]) + enc);
        }
    }
}

#define EMBED(T, SUFFIX)                                                                           \
    extern "C" __global__ void embed_##SUFFIX(T* out, const T* table, const unsigned* tokens,      \
                                              const double* freq, u64 rows, u64 d, u64 n,          \
                                              u64 pos0) {                                          \
        embed_impl<T>(out, table, tokens, freq, rows, d, n, pos0);                                 \
    }                                                                                              \
    extern "C" __global__ void embed_step_##SUFFIX(T* out, const T* table, const int* step,        \
                                                   const double* freq, u64 rows, u64 d) {          \
        embed_impl<T>(out, table, reinterpret_cast<const unsigned*>(step + FAPOOL_STEP_TOKENS),     \
                      freq, rows, d, 1, (u64)step[FAPOOL_STEP_POS]);                               \
    }

FAPOOL_FOR_EACH_TYPE(EMBED)
