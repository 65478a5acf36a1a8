// Shared definitions for every fapool kernel file.
//
// NVRTC compiles each kernel file with this header prepended (the Rust side
// concatenates the two), so no CUDA SDK header is needed at run time: the
// 16-bit float types are plain bit containers with explicit conversions, and
// all arithmetic happens in f32.
//
// Every kernel exists once per storage type, with an `extern "C"` name ending
// in `_bf16`, `_f16` or `_f32`.

#define FAPOOL_NEG_INF __int_as_float(0xff800000)
#define FAPOOL_LOG2E 1.4426950408889634f
#define FAPOOL_LN2 0.6931471805599453f

typedef unsigned long long u64;

// The decode step's scalars (int32 in device memory, written by the host
// before each step; the host declares the same offsets in
// src/backend/cuda/contract.rs): position, cache row to store the new K/V at
// (negative: none), length to attend over, then one token per sequence.
#define FAPOOL_STEP_POS 0
#define FAPOOL_STEP_STORE_AT 1
#define FAPOOL_STEP_LEN 2
#define FAPOOL_STEP_TOKENS 4

struct bf16 {
    unsigned short bits;
};
struct f16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as the host's `half::bf16::from_f32` does, so that
// values written on the device and values uploaded from the host agree.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    unsigned u = __float_as_uint(x);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = 0x7fc0;
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

// Eight elements kept as raw bits until used: 4 registers for the 16-bit
// types instead of 8 floats, so twice as many rows can be in flight.
template <typename T> struct Raw8 { uint4 a; };
template <> struct Raw8<float> { uint4 a, b; };
template <typename T> __device__ __forceinline__ Raw8<T> ld_stream8(const T* p) {
    Raw8<T> r;
    r.a = __ldcs(reinterpret_cast<const uint4*>(p));
    return r;
}
template <> __device__ __forceinline__ Raw8<float> ld_stream8<float>(const float* p) {
    Raw8<float> r;
    r.a = __ldcs(reinterpret_cast<const uint4*>(p));
    r.b = __ldcs(reinterpret_cast<const uint4*>(p) + 1);
    return r;
}
template <typename T> __device__ __forceinline__ void zero8(Raw8<T>& r) { r.a = make_uint4(0, 0, 0, 0); }
template <> __device__ __forceinline__ void zero8<float>(Raw8<float>& r) { r.a = r.b = make_uint4(0, 0, 0, 0); }
__device__ __forceinline__ void unpack8(const Raw8<bf16>& r, float v[8]) {
    unsigned w[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack8(const Raw8<f16>& r, float v[8]) {
    unsigned w[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f16 lo, hi;
        lo.bits = (unsigned short)(w[i] & 0xffffu);
        hi.bits = (unsigned short)(w[i] >> 16);
        v[2 * i] = to_f32(lo);
        v[2 * i + 1] = to_f32(hi);
    }
}
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float v[8]) {
    unsigned w[8] = {r.a.x, r.a.y, r.a.z, r.a.w, r.b.x, r.b.y, r.b.z, r.b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __uint_as_float(w[i]);
}

// Eight consecutive elements as f32: one 16-byte load for the 16-bit types,
// two for f32. `p` must be 16-byte aligned.
template <typename T> __device__ __forceinline__ void load8(const T* p, float v[8]) {
    Raw8<T> r;
    r.a = reinterpret_cast<const uint4*>(p)[0];
    if constexpr (sizeof(T) == 4) r.b = reinterpret_cast<const uint4*>(p)[1];
    unpack8(r, v);
}

template <typename T> __device__ __forceinline__ void store8(T* p, const float v[8]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        T lo = from_f32<T>(v[2 * i]);
        T hi = from_f32<T>(v[2 * i + 1]);
        w[i] = (unsigned)lo.bits | ((unsigned)hi.bits << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
template <> __device__ __forceinline__ void store8<float>(float* p, const float v[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Eight elements starting at `p`, of which only the first `n` exist; the rest
// read as zero. Uses one vector load when all eight exist and `p` is aligned.
template <typename T> __device__ __forceinline__ void load8_guarded(const T* p, int n, float v[8]) {
    if (n >= 8 && ((reinterpret_cast<u64>(p) & 15) == 0)) {
        load8(p, v);
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = i < n ? to_f32(p[i]) : 0.0f;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// 2^x with the hardware approximation (2 ulp); -inf gives 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned cta_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // (undefined in a host compiler pass)
// mbarriers with transaction counts (sm_90), shared by the Hopper prefill
// kernel and the bulk-copy decode kernel.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_test(unsigned bar, unsigned parity) {
    unsigned done;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}
__device__ __forceinline__ u64 global_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// Waits for the phase of parity `parity` to complete. A wait that lasts
// 100 ms (legitimate ones take microseconds) is a bug in the pipeline: it
// clears `ok`, every later wait of the thread returns at once, and the
// consumers write NaN, so a check fails instead of the GPU hanging. (A trap
// here would keep ptxas from giving the Hopper prefill kernel's consumers
// their 240 registers: the kernel spills and wgmma is serialised.)
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity, bool& ok) {
    if (!ok || mbar_test(bar, parity)) return;
    const u64 t0 = global_ns();
    while (!mbar_test(bar, parity))
        if (global_ns() - t0 > 100000000ull) {
            ok = false;
            return;
        }
}
#endif

// Instantiates `NAME_bf16`, `NAME_f16` and `NAME_f32` from a macro that
// expands to an `extern "C"` kernel for one type.
#define FAPOOL_FOR_EACH_TYPE(M) M(bf16, bf16) M(f16, f16) M(float, f32)
