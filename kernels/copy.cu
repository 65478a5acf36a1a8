// Row copies, independent of the element type (they move bytes):
// - `copy_rows_strided`: `rows` rows of `row_bytes` between two pitched
//   layouts (splitting fused QKV into q, k and v);
// - `copy_row_runs`: runs of consecutive rows, for gathering and scattering
//   sequence blocks. Runs are described by a table of
//   (src_row, dst_row, len, first_flat_row) and every block copies one flat row.
// Both use 16-byte accesses when every address and length allows it.

extern "C" __global__ void copy_rows_strided(unsigned char* dst, u64 dst_pitch, const unsigned char* src,
                                             u64 src_pitch, u64 row_bytes, u64 rows) {
    bool vec = ((reinterpret_cast<u64>(dst) | reinterpret_cast<u64>(src) | dst_pitch | src_pitch | row_bytes) & 15) == 0;
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        unsigned char* d = dst + r * dst_pitch;
        const unsigned char* s = src + r * src_pitch;
        if (vec) {
            for (u64 c = threadIdx.x; c < row_bytes / 16; c += blockDim.x)
                reinterpret_cast<uint4*>(d)[c] = reinterpret_cast<const uint4*>(s)[c];
        } else {
            for (u64 c = threadIdx.x; c < row_bytes; c += blockDim.x) d[c] = s[c];
        }
    }
}

extern "C" __global__ void copy_row_runs(unsigned char* dst, const unsigned char* src, u64 row_bytes,
                                         const u64* runs, int nruns, u64 total_rows) {
    bool vec = ((reinterpret_cast<u64>(dst) | reinterpret_cast<u64>(src) | row_bytes) & 15) == 0;
    for (u64 flat = blockIdx.x; flat < total_rows; flat += gridDim.x) {
        // Last run whose first flat row is <= flat (runs are in flat order).
        int lo = 0, hi = nruns - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (runs[4 * mid + 3] <= flat) lo = mid; else hi = mid - 1;
        }
        u64 off = flat - runs[4 * lo + 3];
        unsigned char* d = dst + (runs[4 * lo + 1] + off) * row_bytes;
        const unsigned char* s = src + (runs[4 * lo] + off) * row_bytes;
        if (vec) {
            for (u64 c = threadIdx.x; c < row_bytes / 16; c += blockDim.x)
                reinterpret_cast<uint4*>(d)[c] = reinterpret_cast<const uint4*>(s)[c];
        } else {
            for (u64 c = threadIdx.x; c < row_bytes; c += blockDim.x) d[c] = s[c];
        }
    }
}
