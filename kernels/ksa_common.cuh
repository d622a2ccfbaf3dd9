// Device code shared by the forward (ksa_fwd.cu) and backward (ksa_bwd.cu)
// kernels: the element-type operations (mma, packing), cp.async/ldmatrix/
// shared-memory wrappers, exp2/log2, and the layout arithmetic (`Geo`) in
// gathered coordinates (see ksa_fwd.cu's header comment).
#pragma once

#include <stdint.h>

// Keys per key tile and threads per CTA (4 warps), in both directions.
#define KSA_BK 64
#define KSA_THREADS 128

namespace ksa {

struct Bf16 {};
struct F16 {};

template <typename T> struct Ops;

template <> struct Ops<Bf16> {
    // Exponent field of each 16-bit half of a packed pair, and its lowest bit.
    static constexpr uint32_t EXP = 0x7f807f80u, EXP_ONE = 0x00800080u;
    // acc + x * 0 per half: NaN where x is NaN or infinite (or acc is NaN), else +-0.
    static __device__ __forceinline__ uint32_t fma_zero(uint32_t x, uint32_t acc) {
        uint32_t d;
        asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(x), "r"(0u), "r"(acc));
        return d;
    }
    static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // Packs (lo, hi) into two bf16 (lo in the low half), round to nearest even.
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        uint32_t d;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
        return d;
    }
    // Unpacks two bf16 (lo in the low half): a bf16 is the high half of an f32.
    static __device__ __forceinline__ void unpack(uint32_t x, float& lo, float& hi) {
        lo = __uint_as_float(x << 16);
        hi = __uint_as_float(x & 0xffff0000u);
    }
};

template <> struct Ops<F16> {
    static constexpr uint32_t EXP = 0x7c007c00u, EXP_ONE = 0x04000400u;
    static __device__ __forceinline__ uint32_t fma_zero(uint32_t x, uint32_t acc) {
        uint32_t d;
        asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(x), "r"(0u), "r"(acc));
        return d;
    }
    static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        uint32_t d;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
        return d;
    }
    static __device__ __forceinline__ void unpack(uint32_t x, float& lo, float& hi) {
        asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;\n}\n"
            : "=f"(lo), "=f"(hi)
            : "r"(x));
    }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void st_shared_zero16(uint32_t dst) {
    asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};\n" ::"r"(dst), "r"(0) : "memory");
}

__device__ __forceinline__ void st_shared_u32(uint32_t dst, uint32_t x) {
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(dst), "r"(x) : "memory");
}
__device__ __forceinline__ void st_shared_v4(uint32_t dst, uint4 x) {
    asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(dst), "r"(x.x), "r"(x.y),
                 "r"(x.z), "r"(x.w)
                 : "memory");
}
__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t src) {
    uint32_t x;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(x) : "r"(src) : "memory");
    return x;
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t src) {
    uint4 x;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                 : "r"(src)
                 : "memory");
    return x;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// ---- Non-finite inputs (docs/robustness.md): masked keys never influence a row.
// The score mask is a select, but the tensor-core products multiply a masked
// pair's zero probability (or dS) by its row of V, K, Q or dO, and 0 * inf is
// NaN. A non-finite element in a tile is rare, so edge tiles check for one
// (a scan of the staged tile plus one barrier) and only then take a slow
// path that sums the allowed pairs only; full tiles have no masked pair.

// Nonzero when this thread's share of the CHUNKS 16-byte chunks at `base` (the
// CTA's threads stride over them) holds a NaN or an infinity: one packed
// `acc + x * 0` per 32-bit word, and only NaN halves of acc have bits besides
// the sign.
template <typename T, int CHUNKS>
__device__ __forceinline__ uint32_t tile_non_finite(uint32_t base) {
    uint32_t acc = 0;
#pragma unroll
    for (int i = threadIdx.x; i < CHUNKS; i += KSA_THREADS) {
        const uint4 x = ld_shared_v4(base + static_cast<uint32_t>(i) * 16);
        acc = Ops<T>::fma_zero(x.x, Ops<T>::fma_zero(x.y, acc));
        acc = Ops<T>::fma_zero(x.z, Ops<T>::fma_zero(x.w, acc));
    }
    return acc & 0x7fff7fffu;
}

// A packed pair with each NaN or infinite half replaced by 0: an all-ones
// exponent plus one carries into the half's sign bit (no carry crosses halves),
// which becomes a mask of that half.
template <typename T> __device__ __forceinline__ uint32_t finite_or_zero(uint32_t x) {
    const uint32_t top = ((x & Ops<T>::EXP) + Ops<T>::EXP_ONE) & 0x80008000u;
    return x & ~((top >> 15) * 0xffffu);
}

// Replaces every NaN or infinite element of the CHUNKS 16-byte chunks at
// `base` by 0 (the CTA's threads stride over them; the caller puts barriers
// around it).
template <typename T, int CHUNKS> __device__ __forceinline__ void zero_non_finite(uint32_t base) {
#pragma unroll
    for (int i = threadIdx.x; i < CHUNKS; i += KSA_THREADS) {
        const uint32_t at = base + static_cast<uint32_t>(i) * 16;
        uint4 x = ld_shared_v4(at);
        x.x = finite_or_zero<T>(x.x);
        x.y = finite_or_zero<T>(x.y);
        x.z = finite_or_zero<T>(x.z);
        x.w = finite_or_zero<T>(x.w);
        st_shared_v4(at, x);
    }
}

// Whether `pred` holds on any thread of the CTA. Every thread calls it (it
// contains a barrier); `flags` is one shared word per warp, and the caller
// puts a barrier between two calls (the next call's writes must not overtake
// this call's reads). A vote plus a barrier: `__syncthreads_or` would be one
// instruction, but ptx-emu does not execute `bar.red` and this costs one
// shared store per warp more.
__device__ __forceinline__ bool cta_any(bool pred, volatile uint32_t* flags) {
    const uint32_t any = __any_sync(0xffffffffu, pred);
    if ((threadIdx.x & 31) == 0) flags[threadIdx.x >> 5] = any;
    __syncthreads();
    return (flags[0] | flags[1] | flags[2] | flags[3]) != 0;
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float lg2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// The layout arithmetic of one launch (all sizes < 2^31).
struct Geo {
    uint32_t n_slots, n_sum, chunk, summaries, window, mode;

    // Slot of gathered row g (query or key).
    __device__ __forceinline__ uint32_t slot(uint32_t g) const {
        if (mode != 0) return g;
        if (g < n_sum) return g + (g / summaries + 1) * chunk;
        uint32_t t = g - n_sum;
        return t + (t / chunk) * summaries;
    }
    // Allowed keys of query row g: [r[0], r[1]) and [r[2], r[3]) (gathered).
    // Rows outside the layout get empty ranges.
    __device__ __forceinline__ void ranges(uint32_t g, uint32_t (&r)[4]) const {
        r[0] = r[1] = r[2] = r[3] = 0;
        if (g >= n_slots) return;
        if (mode != 0) {
            r[1] = g + 1;
            return;
        }
        if (g < n_sum) {
            uint32_t c = g / summaries;
            r[0] = c * summaries;
            r[1] = g + 1;
            r[2] = n_sum + c * chunk;
            r[3] = r[2] + chunk;
        } else {
            uint32_t t = g - n_sum;
            uint32_t c = t / chunk;
            uint32_t w0 = c > window ? c - window : 0;
            r[1] = w0 * summaries;
            r[2] = n_sum + w0 * chunk;
            r[3] = g + 1;
        }
    }
};

}  // namespace ksa
