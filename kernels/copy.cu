// Row copies, independent of the element type (they move bytes):
// - `copy_rows_strided`: `rows` rows of `row_bytes` between two pitched
//   layouts (splitting fused QKV into q, k and v);
// - `copy_row_runs`: runs of consecutive rows, for gathering and scattering
//   sequence blocks. Runs are described by a table of
//   (src_row, dst_row, len, first_flat_row) and every block copies one flat row.
//   `copy_row_runs_inline` takes a table of up to 8 runs by value (no upload,
//   so it can be recorded in a graph);
// - `store_rows_at`: row n of src to row `at` of sequence n of a
//   [nseq, cap] cache, `at` read from the decode step's scalars
//   (FAPOOL_STEP_STORE_AT; negative: store nothing).
// All use 16-byte accesses when every address and length allows it.

#define INLINE_RUNS 8
struct RunTable {
    u64 v[4 * INLINE_RUNS];
};

// Whether 16-byte accesses are possible for rows of `row_bytes` (and pitches).
__device__ __forceinline__ bool aligned16(const void* a, const void* b, u64 bytes) {
    return ((reinterpret_cast<u64>(a) | reinterpret_cast<u64>(b) | bytes) & 15) == 0;
}

__device__ __forceinline__ void copy_row(unsigned char* d, const unsigned char* s, u64 row_bytes, bool vec) {
    if (vec) {
        for (u64 c = threadIdx.x; c < row_bytes / 16; c += blockDim.x)
            reinterpret_cast<uint4*>(d)[c] = reinterpret_cast<const uint4*>(s)[c];
    } else {
        for (u64 c = threadIdx.x; c < row_bytes; c += blockDim.x) d[c] = s[c];
    }
}

__device__ void copy_runs_impl(unsigned char* dst, const unsigned char* src, u64 row_bytes, const u64* runs,
                               int nruns, u64 total_rows) {
    bool vec = aligned16(dst, src, row_bytes);
    for (u64 flat = blockIdx.x; flat < total_rows; flat += gridDim.x) {
        // Last run whose first flat row is <= flat (runs are in flat order).
        int lo = 0, hi = nruns - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (runs[4 * mid + 3] <= flat) lo = mid; else hi = mid - 1;
        }
        u64 off = flat - runs[4 * lo + 3];
        copy_row(dst + (runs[4 * lo + 1] + off) * row_bytes, src + (runs[4 * lo] + off) * row_bytes, row_bytes, vec);
    }
}

extern "C" __global__ void copy_rows_strided(unsigned char* dst, u64 dst_pitch, const unsigned char* src,
                                             u64 src_pitch, u64 row_bytes, u64 rows) {
    bool vec = aligned16(dst, src, dst_pitch | src_pitch | row_bytes);
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) copy_row(dst + r * dst_pitch, src + r * src_pitch, row_bytes, vec);
}

extern "C" __global__ void copy_row_runs(unsigned char* dst, const unsigned char* src, u64 row_bytes,
                                         const u64* runs, int nruns, u64 total_rows) {
    copy_runs_impl(dst, src, row_bytes, runs, nruns, total_rows);
}

extern "C" __global__ void copy_row_runs_inline(unsigned char* dst, const unsigned char* src, u64 row_bytes,
                                                const __grid_constant__ RunTable runs, int nruns,
                                                u64 total_rows) {
    copy_runs_impl(dst, src, row_bytes, runs.v, nruns, total_rows);
}

extern "C" __global__ void store_rows_at(unsigned char* dst, const unsigned char* src, u64 row_bytes, u64 nseq,
                                         u64 cap, const int* step) {
    int at = step[FAPOOL_STEP_STORE_AT];
    if (at < 0 || (u64)at >= cap) return;
    bool vec = aligned16(dst, src, row_bytes);
    for (u64 n = blockIdx.x; n < nseq; n += gridDim.x)
        copy_row(dst + (n * cap + (u64)at) * row_bytes, src + n * row_bytes, row_bytes, vec);
}
