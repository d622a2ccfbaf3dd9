// Split-KV ("flash-decoding") attention of ONE query token per sequence over
// that sequence's cached K/V. A sequence's keys for one KV head are a short
// list of contiguous row slices, the shape of KsaCache's key lists (summaries,
// the window text -- two pieces if kept as a ring that wraps --, the current
// chunk and the new token). Sequences are ragged.
//
// Two kernels:
//  * ksa_decode_{bf16,f16}_d{64,128}_g{1,2,4,8}: one CTA = (work item, KV head,
//    head chunk). A work item is one key range [k_begin, k_end) of one sequence
//    (its "split"), in the sequence's concatenated key order. The CTA serves up
//    to G query heads of the KV head's GQA group at once, so every K/V byte is
//    read once per KV head (groups larger than 8 use several head chunks).
//    Threads form NG = 128 / L groups of L = D/8 lanes; a group holds one key
//    row (16 bytes per lane: vectorized 16-byte loads), a batch of U keys per
//    iteration is in flight per group, consecutive groups take consecutive keys
//    (a warp reads 32*16 contiguous bytes per load). Each group keeps its own
//    online softmax (f32, exp2 with log2(e)-prescaled q); at the end the groups
//    of a warp merge with shuffles, then the 4 warps through shared memory.
//    Writes a partial output (f32, already normalized) and a partial
//    log-sum-exp (log2 units) per (work item, head).
//  * ksa_decode_combine_{bf16,f16}: one CTA (one warp) = (query head, sequence);
//    merges the sequence's splits into O (element type: what the output
//    projection consumes) and the final LSE (f32, natural log of the scaled
//    scores, as the prefill kernel writes it).
//
// Tables (built on the host by src/cuda/decode.rs, DecodeLaunch):
//   work[w]   = {seq, k_begin, k_end, slice_begin, slice_end}     (5 x u32)
//   slices[s] = {k, v, k_head_stride, v_head_stride, key_start, rows} (6 x u64;
//               device addresses, strides in elements, key_start = first key
//               of the slice in the sequence's key order)
//   seq_work[i] .. seq_work[i+1] = the work items of sequence i (u32)

#include <stdint.h>

#define KSA_DEC_THREADS 128
// Slice records staged in shared memory at a time.
#define KSA_DEC_TAB 16

namespace ksa_dec {

struct Bf16 {};
struct F16 {};

template <typename T> struct Cvt;

template <> struct Cvt<Bf16> {
    // Two bf16 (lo in the low half) to f32: bf16 is the top half of an f32.
    static __device__ __forceinline__ void unpack(uint32_t w, float& lo, float& hi) {
        lo = __uint_as_float(w << 16);
        hi = __uint_as_float(w & 0xffff0000u);
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        uint32_t d;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
        return d;
    }
};

template <> struct Cvt<F16> {
    static __device__ __forceinline__ void unpack(uint32_t w, float& lo, float& hi) {
        asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.f32.f16 %0, l;\ncvt.f32.f16 %1, h;\n}\n"
            : "=f"(lo), "=f"(hi)
            : "r"(w));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        uint32_t d;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
        return d;
    }
};

__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
    uint4 x;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                 : "l"(p));
    return x;
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

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& x, float (&f)[8]) {
    Cvt<T>::unpack(x.x, f[0], f[1]);
    Cvt<T>::unpack(x.y, f[2], f[3]);
    Cvt<T>::unpack(x.z, f[4], f[5]);
    Cvt<T>::unpack(x.w, f[6], f[7]);
}

// G: query heads per CTA (compile-time register budget; the group's real size
// may be smaller, the rest is masked). U: keys in flight per lane group.
template <typename T, int D, int G>
__device__ __forceinline__ void split(const uint16_t* __restrict__ q, float* __restrict__ o_part,
                                      float* __restrict__ lse_part, const uint32_t* __restrict__ work,
                                      const uint64_t* __restrict__ slices, uint32_t n_heads,
                                      uint32_t group, uint32_t head_chunks, float scale_log2) {
    constexpr int L = D / 8;                   // lanes per key row (8 elements each)
    constexpr int NG = KSA_DEC_THREADS / L;    // lane groups per CTA
    constexpr int U = G <= 4 ? 4 : 2;          // keys per group per iteration
    constexpr int BATCH = NG * U;              // keys per CTA iteration

    __shared__ uint32_t s_work[5];
    __shared__ uint64_t s_tab[KSA_DEC_TAB * 6];
    __shared__ __align__(16) uint16_t s_q[G * D];
    // Per-warp softmax state for the final merge. Dim c = 8 * sub + i of head h
    // lives at [h][i * SI + sub]: a warp's writes (fixed i, consecutive sub) and
    // the merge's reads (consecutive c) both hit 32 distinct banks with
    // SI = L + 4 (8 * SI is a multiple of 32, and i * SI mod 32 spreads
    // i = 0..7 over disjoint runs of 4 banks).
    constexpr int WARPS = KSA_DEC_THREADS / 32;
    constexpr int SI = L + 4;
    __shared__ float s_m[WARPS][G], s_l[WARPS][G];
    __shared__ float s_acc[WARPS][G][8 * SI];

    const int tid = threadIdx.x;
    const int grp = tid / L, sub = tid % L;
    const uint32_t kvh = blockIdx.y / head_chunks;
    const uint32_t hc = blockIdx.y % head_chunks;
    const uint32_t h_first = kvh * group + hc * G;
    const uint32_t nh = min(static_cast<uint32_t>(G), group - hc * G);

    if (tid < 5) s_work[tid] = work[static_cast<uint64_t>(blockIdx.x) * 5 + tid];
    __syncthreads();
    const uint32_t seq = s_work[0], k0 = s_work[1], k1 = s_work[2];
    const uint32_t sl0 = s_work[3], sl1 = s_work[4];

    // q of the CTA's heads -> shared (each 16-byte chunk read from global once).
    const uint16_t* qs = q + (static_cast<uint64_t>(seq) * n_heads + h_first) * D;
    for (int i = tid; i < G * L; i += KSA_DEC_THREADS) {
        uint4 x = make_uint4(0, 0, 0, 0);
        if (static_cast<uint32_t>(i / L) < nh) x = ld_nc_v4(qs + i * 8);
        *reinterpret_cast<uint4*>(s_q + i * 8) = x;
    }
    __syncthreads();
    // This lane's 8 dims of every head's q, prescaled so scores come out in log2 units.
    float qf[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
        unpack8<T>(*reinterpret_cast<const uint4*>(s_q + h * D + sub * 8), qf[h]);
#pragma unroll
        for (int i = 0; i < 8; ++i) qf[h][i] *= scale_log2;
    }

    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
    }

    for (uint32_t t0 = sl0; t0 < sl1; t0 += KSA_DEC_TAB) {
        const uint32_t nt = min(sl1 - t0, static_cast<uint32_t>(KSA_DEC_TAB));
        __syncthreads();  // the previous table chunk is no longer read
        for (uint32_t i = tid; i < nt * 6; i += KSA_DEC_THREADS) s_tab[i] = slices[static_cast<uint64_t>(t0) * 6 + i];
        __syncthreads();
        for (uint32_t t = 0; t < nt; ++t) {
            const uint64_t* rec = s_tab + t * 6;
            const uint64_t start = rec[4], rows = rec[5];
            // This CTA's keys inside the slice, as slice-local rows [a, b).
            const uint64_t a = max(static_cast<uint64_t>(k0), start) - start;
            const uint64_t e = min(static_cast<uint64_t>(k1), start + rows);
            if (e <= start + a) continue;
            const uint32_t b = static_cast<uint32_t>(e - start);
            const uint16_t* kb = reinterpret_cast<const uint16_t*>(rec[0]) + kvh * rec[2] + sub * 8;
            const uint16_t* vb = reinterpret_cast<const uint16_t*>(rec[1]) + kvh * rec[3] + sub * 8;
            for (uint32_t base = static_cast<uint32_t>(a); base < b; base += BATCH) {
                uint4 kx[U], vx[U];
                bool ok[U];
                // Issue all 2U loads before any math (memory-level parallelism).
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const uint32_t r = base + u * NG + grp;
                    ok[u] = r < b;
                    kx[u] = vx[u] = make_uint4(0, 0, 0, 0);
                    if (ok[u]) {
                        kx[u] = ld_nc_v4(kb + static_cast<uint64_t>(r) * D);
                        vx[u] = ld_nc_v4(vb + static_cast<uint64_t>(r) * D);
                    }
                }
                float s[U][G];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    float kf[8];
                    unpack8<T>(kx[u], kf);
#pragma unroll
                    for (int h = 0; h < G; ++h) {
                        float x = 0.f;
#pragma unroll
                        for (int i = 0; i < 8; ++i) x = fmaf(qf[h][i], kf[i], x);
                        // Sum over the L lanes of the group (xor < L stays inside it).
#pragma unroll
                        for (int off = 1; off < L; off <<= 1)
                            x += __shfl_xor_sync(0xffffffffu, x, off);
                        s[u][h] = ok[u] ? x : -INFINITY;
                    }
                }
#pragma unroll
                for (int h = 0; h < G; ++h) {
                    float mx = m[h];
#pragma unroll
                    for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][h]);
                    // A group with no key yet keeps m = -inf: avoid (-inf) - (-inf).
                    const float ms = mx == -INFINITY ? 0.f : mx;
                    const float corr = ex2(m[h] - ms);
                    m[h] = mx;
                    l[h] *= corr;
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[h][i] *= corr;
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    float vf[8];
                    unpack8<T>(vx[u], vf);
#pragma unroll
                    for (int h = 0; h < G; ++h) {
                        const float ms = m[h] == -INFINITY ? 0.f : m[h];
                        const float p = ex2(s[u][h] - ms);
                        l[h] += p;
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(p, vf[i], acc[h][i]);
                    }
                }
            }
        }
    }

    // ---- merge the lane groups: first inside each warp with butterflies (every
    // lane ends with its warp's state), then the warps through shared memory.
#pragma unroll
    for (int off = L; off < 32; off <<= 1) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[h], off);
            const float lo = __shfl_xor_sync(0xffffffffu, l[h], off);
            const float mn = fmaxf(m[h], mo);
            const float ms = mn == -INFINITY ? 0.f : mn;
            const float a = ex2(m[h] - ms), b = ex2(mo - ms);
            m[h] = mn;
            l[h] = l[h] * a + lo * b;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float x = __shfl_xor_sync(0xffffffffu, acc[h][i], off);
                acc[h][i] = acc[h][i] * a + x * b;
            }
        }
    }
    const int warp = tid / 32;
    if (tid % 32 < L) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
            if (sub == 0) {
                s_m[warp][h] = m[h];
                s_l[warp][h] = l[h];
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) s_acc[warp][h][i * SI + sub] = acc[h][i];
        }
    }
    __syncthreads();
    const uint64_t w = blockIdx.x;
    for (int i = tid; i < G * D; i += KSA_DEC_THREADS) {
        const int h = i / D, c = i % D;
        if (static_cast<uint32_t>(h) >= nh) continue;
        float mm = -INFINITY;
#pragma unroll
        for (int g = 0; g < WARPS; ++g) mm = fmaxf(mm, s_m[g][h]);
        // The work item is never empty, so mm is finite; a warp without keys
        // has m = -inf and weight 0.
        float lt = 0.f, ot = 0.f;
#pragma unroll
        for (int g = 0; g < WARPS; ++g) {
            const float wg = ex2(s_m[g][h] - mm);
            lt = fmaf(wg, s_l[g][h], lt);
            ot = fmaf(wg, s_acc[g][h][(c % 8) * SI + c / 8], ot);
        }
        const uint64_t row = w * n_heads + h_first + h;
        o_part[row * D + c] = ot / lt;
        if (c == 0) lse_part[row] = mm + lg2(lt);
    }
}

// One warp per (query head, sequence): O = sum_w 2^(lse_w - M) O_w / sum_w 2^(lse_w - M).
template <typename T>
__device__ __forceinline__ void combine(const float* __restrict__ o_part,
                                        const float* __restrict__ lse_part,
                                        const uint32_t* __restrict__ seq_work,
                                        uint16_t* __restrict__ o, float* __restrict__ lse,
                                        uint32_t n_heads, uint32_t d) {
    const uint32_t h = blockIdx.x, seq = blockIdx.y;
    const int lane = threadIdx.x;
    const uint32_t w0 = seq_work[seq], w1 = seq_work[seq + 1];
    // Max and normalizer over the splits, spread over the lanes then reduced.
    float mm = -INFINITY;
    for (uint32_t w = w0 + lane; w < w1; w += 32) mm = fmaxf(mm, lse_part[w * n_heads + h]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, off));
    float lt = 0.f;
    for (uint32_t w = w0 + lane; w < w1; w += 32) lt += ex2(lse_part[w * n_heads + h] - mm);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) lt += __shfl_xor_sync(0xffffffffu, lt, off);
    const float inv = 1.f / lt;
    const uint64_t out = (static_cast<uint64_t>(seq) * n_heads + h) * d;
    for (uint32_t c = lane * 4; c < d; c += 128) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (uint32_t w = w0; w < w1; ++w) {
            const float wt = ex2(lse_part[w * n_heads + h] - mm) * inv;
            const float4 x =
                *reinterpret_cast<const float4*>(o_part + (static_cast<uint64_t>(w) * n_heads + h) * d + c);
            acc.x = fmaf(wt, x.x, acc.x);
            acc.y = fmaf(wt, x.y, acc.y);
            acc.z = fmaf(wt, x.z, acc.z);
            acc.w = fmaf(wt, x.w, acc.w);
        }
        *reinterpret_cast<uint2*>(o + out + c) =
            make_uint2(Cvt<T>::pack(acc.x, acc.y), Cvt<T>::pack(acc.z, acc.w));
    }
    if (lane == 0) lse[static_cast<uint64_t>(seq) * n_heads + h] = (mm + lg2(lt)) * 0.69314718055994531f;
}

}  // namespace ksa_dec

// Argument order (src/cuda/decode.rs, DecodeLaunch, builds exactly this):
//   split:   q [n_seq, n_heads, D], o_part [n_work, n_heads, D] f32, lse_part [n_work, n_heads] f32,
//            work, slices, n_heads, group, head_chunks (u32), scale_log2 (f32)
//   combine: o_part, lse_part, seq_work, o [n_seq, n_heads, d], lse [n_seq, n_heads] f32,
//            n_heads, d (u32)
// At least two CTAs per SM: lets ptxas use up to 255 registers (without the
// minimum it capped the 4-head kernels at 128 and spilled).
#define KSA_DEC_SPLIT(NAME, T, D, G)                                                           \
    extern "C" __global__ void __launch_bounds__(KSA_DEC_THREADS, 2)                           \
        NAME(const uint16_t* __restrict__ q, float* __restrict__ o_part,                       \
             float* __restrict__ lse_part, const uint32_t* __restrict__ work,                  \
             const uint64_t* __restrict__ slices, uint32_t n_heads, uint32_t group,            \
             uint32_t head_chunks, float scale_log2) {                                         \
        ksa_dec::split<T, D, G>(q, o_part, lse_part, work, slices, n_heads, group, head_chunks, \
                                scale_log2);                                                   \
    }

#define KSA_DEC_SPLIT_G(PREFIX, T, D)          \
    KSA_DEC_SPLIT(PREFIX##_g1, T, D, 1)        \
    KSA_DEC_SPLIT(PREFIX##_g2, T, D, 2)        \
    KSA_DEC_SPLIT(PREFIX##_g4, T, D, 4)        \
    KSA_DEC_SPLIT(PREFIX##_g8, T, D, 8)

KSA_DEC_SPLIT_G(ksa_decode_bf16_d64, ksa_dec::Bf16, 64)
KSA_DEC_SPLIT_G(ksa_decode_bf16_d128, ksa_dec::Bf16, 128)
KSA_DEC_SPLIT_G(ksa_decode_f16_d64, ksa_dec::F16, 64)
KSA_DEC_SPLIT_G(ksa_decode_f16_d128, ksa_dec::F16, 128)

#define KSA_DEC_COMBINE(NAME, T)                                                               \
    extern "C" __global__ void __launch_bounds__(32)                                           \
        NAME(const float* __restrict__ o_part, const float* __restrict__ lse_part,             \
             const uint32_t* __restrict__ seq_work, uint16_t* __restrict__ o,                  \
             float* __restrict__ lse, uint32_t n_heads, uint32_t d) {                          \
        ksa_dec::combine<T>(o_part, lse_part, seq_work, o, lse, n_heads, d);                   \
    }

KSA_DEC_COMBINE(ksa_decode_combine_bf16, ksa_dec::Bf16)
KSA_DEC_COMBINE(ksa_decode_combine_f16, ksa_dec::F16)
