// Row copies, independent of the element type (they move bytes):
// - `copy_rows_strided`: `rows` rows of `row_bytes` between two pitched
//   layouts (splitting fused QKV into q, k and v);
// - `copy_row_runs`: runs of consecutive rows, for gathering and scattering
//   sequence blocks. Runs are described by a table of
//   (src_row, dst_row, len, first_flat_row).
//   `copy_row_runs_inline` takes a table of up to 8 runs by value (no upload,
//   so it can be recorded in a graph);
// - `store_rows_at`: row n of src to row `at` of sequence n of a
//   [nseq, cap] cache, `at` read from the decode step's scalars
//   (FAPOOL_STEP_STORE_AT; negative: store nothing).
// All use 16-byte accesses when every address and length allows it. Rows
// (and runs of rows) are cut into tiles of COPY_TILE_BYTES and the blocks
// stride over the tiles, so a few long rows spread over the whole GPU as
// well as many short ones do (a 268 MB row no longer goes to one block);
// each thread issues its loads of a tile before its stores.

#define INLINE_RUNS 8
#define COPY_TILE_BYTES 16384
struct RunTable {
    u64 v[4 * INLINE_RUNS];
};

// Whether 16-byte accesses are possible for rows of `row_bytes` (and pitches).
__device__ __forceinline__ bool aligned16(const void* a, const void* b, u64 bytes) {
    return ((reinterpret_cast<u64>(a) | reinterpret_cast<u64>(b) | bytes) & 15) == 0;
}

// Bytes [from, to) of a row, by the whole block.
__device__ __forceinline__ void copy_span(unsigned char* d, const unsigned char* s, u64 from, u64 to, bool vec) {
    if (vec) {
        const uint4* sv = reinterpret_cast<const uint4*>(s + from);
        uint4* dv = reinterpret_cast<uint4*>(d + from);
        u64 n = (to - from) / 16;
        for (u64 base = 0; base < n; base += 4 * (u64)blockDim.x) {
            uint4 w[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                u64 j = base + threadIdx.x + (u64)k * blockDim.x;
                if (j < n) w[k] = sv[j];
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                u64 j = base + threadIdx.x + (u64)k * blockDim.x;
                if (j < n) dv[j] = w[k];
            }
        }
    } else {
        for (u64 c = from + threadIdx.x; c < to; c += blockDim.x) d[c] = s[c];
    }
}

__device__ __forceinline__ void copy_row(unsigned char* d, const unsigned char* s, u64 row_bytes, bool vec) {
    copy_span(d, s, 0, row_bytes, vec);
}

__device__ __forceinline__ u64 tiles_per_row(u64 row_bytes) { return (row_bytes + COPY_TILE_BYTES - 1) / COPY_TILE_BYTES; }

// The rows of a run are consecutive in both buffers, so a run is one span
// of len * row_bytes bytes: the runs are copied as one stream of bytes cut
// into tiles (a tile may end one run and begin the next), whatever the row
// size, so short rows move as fast as long ones.
__device__ void copy_runs_impl(unsigned char* dst, const unsigned char* src, u64 row_bytes, const u64* runs,
                               int nruns, u64 total_rows) {
    bool vec = aligned16(dst, src, row_bytes);
    u64 total = total_rows * row_bytes;
    for (u64 t = blockIdx.x; t * COPY_TILE_BYTES < total; t += gridDim.x) {
        u64 from = t * COPY_TILE_BYTES, to = min(from + COPY_TILE_BYTES, total);
        // Last run whose first byte is <= from (runs are in flat order).
        int lo = 0, hi = nruns - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (runs[4 * mid + 3] * row_bytes <= from) lo = mid; else hi = mid - 1;
        }
        for (; from < to && lo < nruns; ++lo) {
            u64 start = runs[4 * lo + 3] * row_bytes, end = start + runs[4 * lo + 2] * row_bytes;
            u64 upto = min(to, end);
            copy_span(dst + runs[4 * lo + 1] * row_bytes, src + runs[4 * lo] * row_bytes, from - start, upto - start, vec);
            from = upto;
        }
    }
}

extern "C" __global__ void copy_rows_strided(unsigned char* dst, u64 dst_pitch, const unsigned char* src,
                                             u64 src_pitch, u64 row_bytes, u64 rows) {
    bool vec = aligned16(dst, src, dst_pitch | src_pitch | row_bytes);
    u64 per_row = tiles_per_row(row_bytes);
    for (u64 t = blockIdx.x; t < rows * per_row; t += gridDim.x) {
        u64 r = t / per_row, from = (t % per_row) * COPY_TILE_BYTES;
        copy_span(dst + r * dst_pitch, src + r * src_pitch, from, min(from + COPY_TILE_BYTES, row_bytes), vec);
    }
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
