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

// Eight consecutive elements as f32: one 16-byte load for the 16-bit types,
// two for f32. `p` must be 16-byte aligned.
__device__ __forceinline__ void load8(const bf16* p, float v[8]) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void load8(const f16* p, float v[8]) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f16 lo, hi;
        lo.bits = (unsigned short)(w[i] & 0xffffu);
        hi.bits = (unsigned short)(w[i] >> 16);
        v[2 * i] = to_f32(lo);
        v[2 * i + 1] = to_f32(hi);
    }
}
__device__ __forceinline__ void load8(const float* p, float v[8]) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
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

// Instantiates `NAME_bf16`, `NAME_f16` and `NAME_f32` from a macro that
// expands to an `extern "C"` kernel for one type.
#define FAPOOL_FOR_EACH_TYPE(M) M(bf16, bf16) M(f16, f16) M(float, f32)
