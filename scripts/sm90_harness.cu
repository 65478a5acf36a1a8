// Standalone checks and kernel-only timings of the Hopper kernels, built from
// the same sources NVRTC compiles (kernels/common.cuh, flash.cu,
// flash_sm90.cu, decode.cu), for iterating on a GPU machine without the Rust
// binary. It is a development tool, not part of fapool's build, tests or
// benchmarks: `fapool check-gpu` is what checks the kernels (against f64
// references, through the backend's own launch path) and `fapool bench
// kernels` what times them; this harness is where compile-time variants
// (-D below) and layout probes are tried, and where the kernel-only figures of
// docs/perf-notes.md (session 8) come from. Modes (first argument):
//   probe     the TMA tile against the 128-byte swizzle formula, and Q K^T
//             (shared-memory operands) and P V (register A, transposed V) on
//             wgmma against float64, each with the derived descriptor
//             encoding and its swap;
//   full      flash_sm90 and flash_sm90_ftz against flash128w4 (mma.sync) and
//             a float64 CPU reference on 12 shapes (offsets, ragged lengths,
//             several sequences, one row, no keys), outputs poisoned first;
//   time      kernel-only timings of the prefill kernels (causal and a pool
//             rank's block, 4K-64K) and of decode_rows / decode_bulk with
//             the combine (B = 1, 4, 16, 64 at 4K-64K);
//   tprefill, tdecode   one half of `time`; `all` = probe, full, time.
// Build (sm_90a; -DF3_STAGES=3, -DF3_PINGPONG=0 or -DF3_ASCENDING=0 for the
// variants of docs/perf-notes.md, session 8):
//   nvcc -gencode=arch=compute_90a,code=sm_90a -std=c++17 -O2 -Ikernels scripts/sm90_harness.cu -o sm90_harness
#include <cuda.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "common.cuh"
#include "flash.cu"
#include "flash_sm90.cu"
#include "decode.cu"

#define CK(x)                                                                                       \
    do {                                                                                            \
        cudaError_t e_ = (x);                                                                       \
        if (e_ != cudaSuccess) {                                                                    \
            printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); \
            fflush(stdout);                                                                         \
            exit(2);                                                                                \
        }                                                                                           \
    } while (0)

typedef CUresult (*EncodeFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                             const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                             CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static EncodeFn g_encode;

static unsigned short f2bf(float x) {
    unsigned u;
    memcpy(&u, &x, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
static float bf2f(unsigned short b) {
    unsigned u = (unsigned)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static TensorMap make_map(const void* base, bool bf16, int rows, int seq_stride, int heads, int nseq) {
    CUtensorMap m;
    cuuint64_t dims[4] = {128, (cuuint64_t)heads, (cuuint64_t)std::max(rows, 1), (cuuint64_t)nseq};
    cuuint64_t rb = 256ull * heads;
    cuuint64_t strides[3] = {256, rb, rb * (cuuint64_t)std::max(seq_stride, 1)};
    cuuint32_t box[4] = {64, 1, 128, 1};
    cuuint32_t es[4] = {1, 1, 1, 1};
    CUresult r = g_encode(&m, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                          const_cast<void*>(base), dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        printf("cuTensorMapEncodeTiled failed: %d\n", (int)r);
        exit(3);
    }
    TensorMap t;
    memcpy(&t, &m, sizeof(t));
    return t;
}

// ---- probes ------------------------------------------------------------------

__global__ void probe_tma(const __grid_constant__ TensorMap map, unsigned short* dump, int row0) {
    extern __shared__ unsigned char sm[];
    unsigned base = (cta_addr(sm) + 1023u) & ~1023u;
    unsigned bar = base + F3_TILE_BYTES;
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    bool ok = true;
    if (threadIdx.x == 0) tma_load_tile(base, &map, bar, 0, row0, 0);
    mbar_wait(bar, 0, ok);
    for (int i = threadIdx.x; i < F3_TILE_BYTES / 2; i += blockDim.x) {
        unsigned short v;
        asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(base + 2 * i));
        dump[i] = v;
    }
}

__device__ void store_acc(float* dst, const float (&a)[64]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = 0; i < 64; ++i) {
        int row = 16 * warp + (lane >> 2) + 8 * ((i >> 1) & 1);
        int col = 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
        dst[row * 128 + col] = a[i];
    }
}

template <typename T>
__global__ void probe_qk(const __grid_constant__ TensorMap mq, const __grid_constant__ TensorMap mk, float* S,
                         int lead, int stride) {
    extern __shared__ unsigned char sm[];
    unsigned base = (cta_addr(sm) + 1023u) & ~1023u;
    unsigned sq_ = base, sk = base + F3_TILE_BYTES, bar = base + 2 * F3_TILE_BYTES;
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    bool ok = true;
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(bar, 2 * F3_TILE_BYTES);
        tma_load(sq_, &mq, bar, 0, 0, 0, 0);
        tma_load(sq_ + F3_HALF_BYTES, &mq, bar, 64, 0, 0, 0);
        tma_load(sk, &mk, bar, 0, 0, 0, 0);
        tma_load(sk + F3_HALF_BYTES, &mk, bar, 64, 0, 0, 0);
    }
    mbar_wait(bar, 0, ok);
    float s[64];
    for (int i = 0; i < 64; ++i) s[i] = 0.f;
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const unsigned off = (kk >> 2) * F3_HALF_BYTES + (kk & 3) * 32;
        wgmma_ss(T(), s, gmma_desc(sq_ + off, lead, stride), gmma_desc(sk + off, lead, stride), kk > 0);
    }
    wg_commit();
    wg_wait<0>();
    reg_fence(s);
    store_acc(S, s);
}

template <typename T>
__global__ void probe_pv(const __grid_constant__ TensorMap mv, const unsigned short* P, float* O, int lead,
                         int stride) {
    extern __shared__ unsigned char sm[];
    unsigned base = (cta_addr(sm) + 1023u) & ~1023u;
    unsigned sv = base, bar = base + F3_TILE_BYTES;
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    bool ok = true;
    if (threadIdx.x == 0) tma_load_tile(sv, &mv, bar, 0, 0, 0);
    mbar_wait(bar, 0, ok);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned p[32];
    for (int i = 0; i < 32; ++i) {
        int e = 2 * i;
        int row = 16 * warp + (lane >> 2) + 8 * ((e >> 1) & 1);
        int col = 8 * (e >> 2) + 2 * (lane & 3);
        p[i] = (unsigned)P[row * 128 + col] | ((unsigned)P[row * 128 + col + 1] << 16);
    }
    float o[64];
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_rs(T(), o, &p[4 * kk], gmma_desc(sv + kk * 2048, lead, stride));
    wg_commit();
    wg_wait<0>();
    reg_fence(o);
    store_acc(O, o);
}

static double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (std::isnan(a[i])) return NAN;
        double d = a[i] - b[i];
        if (std::isinf(a[i]) && std::isinf(b[i]) && a[i] == b[i]) d = 0;
        num += d * d;
        den += std::isinf(b[i]) ? 0 : b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

static void run_probes() {
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    const int rows = 256;  // two tiles' worth, one head
    std::vector<unsigned short> q(rows * 128), k(rows * 128), v(rows * 128), p(64 * 128);
    for (auto& x : q) x = f2bf(nd(rng));
    for (auto& x : k) x = f2bf(nd(rng));
    for (auto& x : v) x = f2bf(nd(rng));
    for (auto& x : p) x = f2bf(std::fabs(nd(rng)) * 0.1f);
    unsigned short *dq, *dk, *dv, *dp, *dump;
    float *dS, *dO;
    CK(cudaMalloc(&dq, q.size() * 2));
    CK(cudaMalloc(&dk, k.size() * 2));
    CK(cudaMalloc(&dv, v.size() * 2));
    CK(cudaMalloc(&dp, p.size() * 2));
    CK(cudaMalloc(&dump, F3_TILE_BYTES));
    CK(cudaMalloc(&dS, 64 * 128 * 4));
    CK(cudaMalloc(&dO, 64 * 128 * 4));
    CK(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dp, p.data(), p.size() * 2, cudaMemcpyHostToDevice));
    TensorMap mq = make_map(dq, true, rows, rows, 1, 1), mk = make_map(dk, true, rows, rows, 1, 1),
              mv = make_map(dv, true, rows, rows, 1, 1);
    // TMA layout: tile rows 200.. (the last 56 rows read as zeros).
    CK(cudaFuncSetAttribute(probe_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, 80000));
    probe_tma<<<1, 128, 80000>>>(mq, dump, 200);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<unsigned short> h(F3_TILE_BYTES / 2);
    CK(cudaMemcpy(h.data(), dump, F3_TILE_BYTES, cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int r = 0; r < 128; ++r)
        for (int c = 0; c < 128; ++c) {
            int half = c / 64, cc = c % 64, chunk = cc / 8;
            int off = half * 16384 + r * 128 + ((chunk ^ (r % 8)) * 16) + (cc % 8) * 2;
            unsigned short want = (200 + r < rows) ? q[(200 + r) * 128 + c] : 0;
            if (h[off / 2] != want) ++bad;
        }
    printf("probe tma swizzle-128B layout: %s (%d of 16384 elements differ)\n", bad ? "FAIL" : "ok", bad);
    // Q K^T.
    std::vector<double> sref(64 * 128), oref(64 * 128);
    for (int r = 0; r < 64; ++r)
        for (int c = 0; c < 128; ++c) {
            double a = 0;
            for (int d = 0; d < 128; ++d) a += (double)bf2f(q[r * 128 + d]) * bf2f(k[c * 128 + d]);
            sref[r * 128 + c] = a;
            double o = 0;
            for (int j = 0; j < 128; ++j) o += (double)bf2f(p[r * 128 + j]) * bf2f(v[j * 128 + c]);
            oref[r * 128 + c] = o;
        }
    CK(cudaFuncSetAttribute(probe_qk<bf16>, cudaFuncAttributeMaxDynamicSharedMemorySize, 80000));
    CK(cudaFuncSetAttribute(probe_pv<bf16>, cudaFuncAttributeMaxDynamicSharedMemorySize, 80000));
    std::vector<float> hs(64 * 128);
    std::vector<double> g(64 * 128);
    int variants[2][2] = {{16, 1024}, {1024, 16}};
    for (auto& vv : variants) {
        probe_qk<bf16><<<1, 128, 80000>>>(mq, mk, dS, vv[0], vv[1]);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(hs.data(), dS, hs.size() * 4, cudaMemcpyDeviceToHost));
        for (int i = 0; i < 64 * 128; ++i) g[i] = hs[i];
        printf("probe QK^T (SS, K-major, lead %d stride %d): rel err %.3e\n", vv[0], vv[1], rel_l2(g, sref));
    }
    int pvar[2][2] = {{F3_HALF_BYTES, 1024}, {1024, F3_HALF_BYTES}};
    for (auto& vv : pvar) {
        probe_pv<bf16><<<1, 128, 80000>>>(mv, dp, dO, vv[0], vv[1]);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(hs.data(), dO, hs.size() * 4, cudaMemcpyDeviceToHost));
        for (int i = 0; i < 64 * 128; ++i) g[i] = hs[i];
        printf("probe PV (RS, V MN-major, lead %d stride %d): rel err %.3e\n", vv[0], vv[1], rel_l2(g, oref));
    }
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dp);
    cudaFree(dump);
    cudaFree(dS);
    cudaFree(dO);
}

// ---- the full kernel ---------------------------------------------------------

struct Shape {
    int nseq, sq, skv, stride, heads, q_offset;
};

static void cpu_ref(const std::vector<unsigned short>& q, const std::vector<unsigned short>& k,
                    const std::vector<unsigned short>& v, const Shape& s, int n, int h, std::vector<double>& o,
                    std::vector<double>& lse) {
    const int ld = s.heads * 128;
    const double scale = 1.0 / std::sqrt(128.0);
    o.assign((size_t)s.sq * 128, 0.0);
    lse.assign(s.sq, -INFINITY);
    std::vector<double> sc(s.skv);
    for (int i = 0; i < s.sq; ++i) {
        int lim = std::min(s.q_offset + i + 1, s.skv);
        if (lim <= 0) continue;
        const unsigned short* qr = &q[((size_t)n * s.sq + i) * ld + h * 128];
        double mx = -INFINITY;
        for (int j = 0; j < lim; ++j) {
            const unsigned short* kr = &k[((size_t)n * s.stride + j) * ld + h * 128];
            double a = 0;
            for (int d = 0; d < 128; ++d) a += (double)bf2f(qr[d]) * bf2f(kr[d]);
            sc[j] = a * scale;
            mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (int j = 0; j < lim; ++j) {
            sc[j] = std::exp(sc[j] - mx);
            sum += sc[j];
        }
        for (int j = 0; j < lim; ++j) {
            const unsigned short* vr = &v[((size_t)n * s.stride + j) * ld + h * 128];
            for (int d = 0; d < 128; ++d) o[(size_t)i * 128 + d] += sc[j] / sum * bf2f(vr[d]);
        }
        lse[i] = mx + std::log(sum);
    }
}

// flash_sm90_fwd_d128_bf16 or flash_sm90_ftz_fwd_d128_bf16.
typedef void (*Sm90Kernel)(const TensorMap, const TensorMap, const TensorMap, bf16*, float*, int, int, int, int, float);

static bool test_shape(const Shape& s, std::mt19937& rng, Sm90Kernel sm90, const char* name) {
    std::normal_distribution<float> nd;
    const size_t ld = (size_t)s.heads * 128;
    std::vector<unsigned short> q(s.nseq * s.sq * ld), k(s.nseq * s.stride * ld), v(k.size());
    for (auto& x : q) x = f2bf(nd(rng));
    for (auto& x : k) x = f2bf(nd(rng));
    for (auto& x : v) x = f2bf(nd(rng));
    unsigned short *dq, *dk, *dv, *o1, *o2;
    float *l1, *l2;
    size_t osz = q.size() * 2, lsz = (size_t)s.nseq * s.heads * s.sq * 4;
    CK(cudaMalloc(&dq, std::max<size_t>(osz, 16)));
    CK(cudaMalloc(&dk, std::max<size_t>(k.size() * 2, 16)));
    CK(cudaMalloc(&dv, std::max<size_t>(v.size() * 2, 16)));
    CK(cudaMalloc(&o1, std::max<size_t>(osz, 16)));
    CK(cudaMalloc(&o2, std::max<size_t>(osz, 16)));
    CK(cudaMalloc(&l1, std::max<size_t>(lsz, 16)));
    CK(cudaMalloc(&l2, std::max<size_t>(lsz, 16)));
    CK(cudaMemcpy(dq, q.data(), osz, cudaMemcpyHostToDevice));
    if (!k.empty()) {
        CK(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
    }
    CK(cudaMemset(o1, 0xff, osz));
    CK(cudaMemset(o2, 0xff, osz));
    CK(cudaMemset(l1, 0xff, lsz));
    CK(cudaMemset(l2, 0xff, lsz));
    float scale_log2 = 1.4426950408889634f / std::sqrt(128.0f);
    TensorMap tq = make_map(dq, true, s.sq, s.sq, s.heads, s.nseq), tk = make_map(dk, true, s.skv, s.stride, s.heads, s.nseq),
              tv = make_map(dv, true, s.skv, s.stride, s.heads, s.nseq);
    dim3 grid((s.sq + 127) / 128, s.heads, s.nseq);
    sm90<<<grid, F3_THREADS, F3_SMEM_BYTES>>>(tq, tk, tv, (bf16*)o1, l1, s.sq, s.skv, s.heads, s.q_offset, scale_log2);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    dim3 g2(s.heads, (s.sq + 127) / 128, s.nseq);
    flash_fwd_d128_w4m2_bf16<<<g2, 128, (128 + 256) * 256>>>((bf16*)dq, (bf16*)dk, (bf16*)dv, (bf16*)o2, l2, s.sq,
                                                              s.skv, s.stride, s.heads, s.q_offset, scale_log2);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<unsigned short> h1(q.size()), h2(q.size());
    std::vector<float> hl1(lsz / 4), hl2(lsz / 4);
    CK(cudaMemcpy(h1.data(), o1, osz, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h2.data(), o2, osz, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hl1.data(), l1, lsz, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hl2.data(), l2, lsz, cudaMemcpyDeviceToHost));
    std::vector<double> a(h1.size()), b(h1.size()), la(hl1.size()), lb(hl1.size());
    size_t nan = 0;
    for (size_t i = 0; i < h1.size(); ++i) {
        a[i] = bf2f(h1[i]);
        b[i] = bf2f(h2[i]);
        nan += std::isnan(a[i]);
    }
    for (size_t i = 0; i < hl1.size(); ++i) {
        la[i] = hl1[i];
        lb[i] = hl2[i];
        nan += std::isnan(la[i]);
    }
    double eo = rel_l2(a, b), el = rel_l2(la, lb);
    // CPU reference for the first and the last (sequence, head).
    double ec = 0;
    for (int pick = 0; pick < 2; ++pick) {
        int n = pick ? s.nseq - 1 : 0, h = pick ? s.heads - 1 : 0;
        std::vector<double> ro, rl, go(s.sq * 128), gl(s.sq);
        cpu_ref(q, k, v, s, n, h, ro, rl);
        for (int i = 0; i < s.sq; ++i) {
            for (int d = 0; d < 128; ++d) go[i * 128 + d] = a[((size_t)n * s.sq + i) * ld + h * 128 + d];
            gl[i] = la[((size_t)n * s.heads + h) * s.sq + i];
        }
        ec = std::max({ec, rel_l2(go, ro), rel_l2(gl, rl)});
        if (!(rel_l2(go, ro) < 1e-2)) {
            // Where: error per 64-row group (one consumer warpgroup).
            printf("   (seq %d head %d) per 64-row group O error:", n, h);
            for (int r0 = 0; r0 < s.sq; r0 += 64) {
                std::vector<double> x, y;
                for (int i = r0; i < std::min(r0 + 64, s.sq); ++i)
                    for (int d = 0; d < 128; ++d) {
                        x.push_back(go[i * 128 + d]);
                        y.push_back(ro[i * 128 + d]);
                    }
                printf(" %.1e", rel_l2(x, y));
            }
            printf("\n");
        }
    }
    bool pass = nan == 0 && ec < 1e-2 && eo < 1e-2 && el < 1e-3;
    printf("full %s nseq %d sq %d skv %d stride %d heads %d q_offset %d: vs flash128w4 O %.2e lse %.2e, vs CPU %.2e, NaN %zu: %s\n",
           name, s.nseq, s.sq, s.skv, s.stride, s.heads, s.q_offset, eo, el, ec, nan, pass ? "ok" : "FAIL");
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(o1);
    cudaFree(o2);
    cudaFree(l1);
    cudaFree(l2);
    return pass;
}

// ---- kernel-only timings ---------------------------------------------------------

template <typename F> static float median_ms(F f, int iters = 15) {
    f();
    f();
    CK(cudaDeviceSynchronize());
    std::vector<float> t;
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int i = 0; i < iters; ++i) {
        cudaEventRecord(a);
        f();
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        float ms;
        cudaEventElapsedTime(&ms, a, b);
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

__global__ void fill_bits(unsigned short* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned x = (unsigned)i * 2654435761u ^ seed;
        x ^= x >> 13;
        x *= 0x5bd1e995u;
        x ^= x >> 15;
        float f = ((x & 0xffff) / 65536.0f - 0.5f) * 2.0f;
        p[i] = (unsigned short)(__float_as_uint(f) >> 16);
    }
}

static void time_prefill() {
    const int heads = 32;
    for (int S : {4096, 16384, 65536}) {
        size_t n = (size_t)S * heads * 128;
        unsigned short *q, *k, *v, *o;
        float* l;
        CK(cudaMalloc(&q, n * 2));
        CK(cudaMalloc(&k, n * 2));
        CK(cudaMalloc(&v, n * 2));
        CK(cudaMalloc(&o, n * 2));
        CK(cudaMalloc(&l, (size_t)S * heads * 4));
        fill_bits<<<1024, 256>>>(q, n, 1);
        fill_bits<<<1024, 256>>>(k, n, 2);
        fill_bits<<<1024, 256>>>(v, n, 3);
        float sl2 = 1.4426950408889634f / std::sqrt(128.0f);
        TensorMap tq = make_map(q, true, S, S, heads, 1), tk = make_map(k, true, S, S, heads, 1), tv = make_map(v, true, S, S, heads, 1);
        for (int quarter = 0; quarter < 2; ++quarter) {
            int sq = quarter ? S / 4 : S, off = S - sq;
            double flops = 4.0 * 128 * heads * ((double)sq * off + (double)sq * sq / 2);
            float t1 = median_ms([&] {
                flash_sm90_fwd_d128_bf16<<<dim3((sq + 127) / 128, heads, 1), F3_THREADS, F3_SMEM_BYTES>>>(
                    tq, tk, tv, (bf16*)o, l, sq, S, heads, off, sl2);
            });
            float t2 = median_ms([&] {
                flash_fwd_d128_w4m2_bf16<<<dim3(heads, (sq + 127) / 128, 1), 128, (128 + 256) * 256>>>(
                    (bf16*)q, (bf16*)k, (bf16*)v, (bf16*)o, l, sq, S, S, heads, off, sl2);
            });
            float t3 = median_ms([&] {
                flash_sm90_ftz_fwd_d128_bf16<<<dim3((sq + 127) / 128, heads, 1), F3_THREADS, F3_SMEM_BYTES>>>(
                    tq, tk, tv, (bf16*)o, l, sq, S, heads, off, sl2);
            });
            CK(cudaGetLastError());
            printf("prefill S %d %s: flash_sm90 %.3f ms %.1f TFLOP/s | flash_sm90_ftz %.3f ms %.1f TFLOP/s | flash128w4 %.3f ms %.1f TFLOP/s\n",
                   S, quarter ? "last quarter" : "causal", t1, flops / t1 / 1e9, t3, flops / t3 / 1e9, t2, flops / t2 / 1e9);
        }
        cudaFree(q);
        cudaFree(k);
        cudaFree(v);
        cudaFree(o);
        cudaFree(l);
    }
}

// fapool's split count (decode_splits in src/backend/cuda/mod.rs), with the minimum rows per chunk as a parameter.
static int splits(int span, int groups, int slots, int min_rows) {
    int most = std::min((span + min_rows - 1) / min_rows, 4 * slots), best = 1;
    long best_cost = -1;
    for (int ns = 1; ns <= most; ++ns) {
        long cost = (((long)groups * ns + slots - 1) / slots) * ((span + ns - 1) / ns + 64);
        if (best_cost < 0 || cost < best_cost) best_cost = cost, best = ns;
    }
    return best;
}

static void time_decode() {
    const int heads = 32, d = 128;
    CK(cudaFuncSetAttribute(decode_bulk_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, 3 * 2 * 4 * 32 * 128 * 2 + 48));
    for (int B : {1, 4, 16, 64})
        for (int L : {4096, 16384, 65536}) {
            size_t n = (size_t)B * L * heads * d;
            unsigned short *kc, *vc, *q, *o;
            float *work, *l;
            CK(cudaMalloc(&kc, n * 2));
            CK(cudaMalloc(&vc, n * 2));
            CK(cudaMalloc(&q, (size_t)B * heads * d * 2));
            CK(cudaMalloc(&o, (size_t)B * heads * d * 2));
            CK(cudaMalloc(&l, (size_t)B * heads * 4));
            fill_bits<<<4096, 256>>>(kc, n, 7);
            fill_bits<<<4096, 256>>>(vc, n, 8);
            fill_bits<<<64, 256>>>(q, (size_t)B * heads * d, 9);
            float sl2 = 1.4426950408889634f / std::sqrt(128.0f);
            double bytes = 2.0 * n * 2;
            printf("decode B %2d L %5d:", B, L);
            for (int min_rows : {64, 32}) {
                if (min_rows == 32 && L > 4096 && B > 1) continue;
                int ns0 = splits(L, B, 132, min_rows), chunk = (L + ns0 - 1) / ns0, ns = (L + chunk - 1) / chunk;
                CK(cudaMalloc(&work, (size_t)B * heads * ns * (d + 1) * 4));
                float *po = work, *pl = work + (size_t)B * heads * ns * d;
                int cthreads = 32 * std::min(8, std::max(1, (ns + 3) / 4));
                for (int bulk = 0; bulk < 2; ++bulk) {
                    float t = median_ms([&] {
                        if (bulk)
                            decode_bulk_bf16<<<dim3(ns, 1, B), 544, 3 * 2 * 4 * 32 * 128 * 2 + 48>>>(
                                (bf16*)q, (bf16*)kc, (bf16*)vc, po, pl, L, L, nullptr, heads, d, 32, chunk, sl2);
                        else
                            decode_rows_bf16<<<dim3(ns, 1, B), 512>>>((bf16*)q, (bf16*)kc, (bf16*)vc, po, pl, L, L,
                                                                     nullptr, heads, d, 32, chunk, sl2);
                        decode_combine_bf16<<<dim3(heads, B), cthreads>>>(po, pl, (bf16*)o, l, ns, heads, d);
                    });
                    CK(cudaGetLastError());
                    printf(" | %s %d splits: %.1f us %.2f TB/s", bulk ? "bulk" : "rows", ns, t * 1e3, bytes / t / 1e9);
                }
                cudaFree(work);
            }
            printf("\n");
            cudaFree(kc);
            cudaFree(vc);
            cudaFree(q);
            cudaFree(o);
            cudaFree(l);
        }
}

int main(int argc, char** argv) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult qr;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &qr));
    if (!fn) {
        printf("no cuTensorMapEncodeTiled\n");
        return 3;
    }
    g_encode = (EncodeFn)fn;
    const char* what = argc > 1 ? argv[1] : "all";
    bool all = !strcmp(what, "all");
    if (all || !strcmp(what, "probe")) run_probes();
    if (all || !strcmp(what, "full")) {
        CK(cudaFuncSetAttribute(flash_sm90_fwd_d128_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, F3_SMEM_BYTES));
        CK(cudaFuncSetAttribute(flash_sm90_ftz_fwd_d128_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, F3_SMEM_BYTES));
        CK(cudaFuncSetAttribute(flash_fwd_d128_w4m2_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, (128 + 256) * 256));
        std::mt19937 rng(11);
        Shape shapes[] = {{1, 128, 128, 128, 1, 100000}, {1, 128, 128, 128, 1, 0}, {1, 256, 256, 256, 2, 0},
                          {1, 1000, 1000, 1000, 2, 0}, {1, 200, 480, 512, 4, 280}, {2, 333, 333, 333, 3, 0},
                          {1, 100, 480, 512, 2, 450}, {1, 70, 0, 64, 2, 0}, {3, 130, 1337, 1400, 2, 1207},
                          {1, 300, 2000, 2048, 2, 1700}, {2, 1, 700, 768, 2, 699}, {1, 257, 300, 320, 2, 43}};
        int fails = 0;
        for (auto& s : shapes) {
            fails += !test_shape(s, rng, flash_sm90_fwd_d128_bf16, "flash_sm90");
            fails += !test_shape(s, rng, flash_sm90_ftz_fwd_d128_bf16, "flash_sm90_ftz");
        }
        printf("full kernel: %d of %d (kernel, shape) pairs failed\n", fails, (int)(2 * sizeof(shapes) / sizeof(shapes[0])));
    }
    if (all || !strcmp(what, "time") || !strcmp(what, "tprefill")) {
        printf("variant: stages %d, ping-pong %d, ascending %d, smem %d B\n", F3_STAGES, F3_PINGPONG, F3_ASCENDING, (int)F3_SMEM_BYTES);
        CK(cudaFuncSetAttribute(flash_sm90_fwd_d128_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, F3_SMEM_BYTES));
        CK(cudaFuncSetAttribute(flash_sm90_ftz_fwd_d128_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, F3_SMEM_BYTES));
        CK(cudaFuncSetAttribute(flash_fwd_d128_w4m2_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, (128 + 256) * 256));
        time_prefill();
        if (strcmp(what, "tprefill")) time_decode();
    }
    if (!strcmp(what, "tdecode")) {
        time_decode();
    }
    return 0;
}
