// Backward of the fused block-sparse KSA attention (ksa_fwd.cu), FlashAttention-2
// style. Given q, k, v, o, dO and the forward's log-sum-exp, three kernels
// (launched in this order by src/cuda/backward.rs) produce dq, dk, dv:
//
//  1. ksa_bwd_prep_*: one warp per (row, query head, batch): D = rowsum(dO o O)
//     (f32, [b, hq, N] by slot, like lse), and zeroes that row of the f32 dQ
//     accumulator.
//  2. ksa_bwd_*: one CTA per (key tile of 64 keys, KV head, batch), 4 warps x 16
//     keys. K and V stay in shared memory; the CTA loops over the query heads of
//     its GQA group and, per head, over the query tiles that can see its key tile
//     (the key-major schedule, src/cuda/schedule.rs, inverted from the forward's).
//     Q, dO, lse, D and the query rows' key ranges stream through a two-stage
//     cp.async pipeline. Per query tile each warp recomputes its 16 x BQ slice
//     S^T = K Q^T and dP^T = V dO^T with mma.sync.m16n8k16 + ldmatrix,
//     P^T = exp(scale S^T - lse), dS^T = P^T o (dP^T - D), then dV += P^T dO and
//     dK += dS^T Q in registers (so GQA heads are summed without atomics), and
//     stages dS^T in shared memory; after a barrier the 4 warps compute the
//     tile's dQ = dS K and add it to the f32 accumulator with red.global.add.
//     The element mask runs on edge tiles only (entry flag). dK is scaled once
//     at the end; dQ in kernel 3.
//  3. ksa_bwd_dq_*: dq = scale * accumulator, in the element type.
//
// Query tiles have BQ = 64 rows for d = 64 and 32 for d = 128, which keeps the
// dK/dV accumulators (2 x 16 x d f32 per warp) plus S^T and dP^T in registers
// without spills. Tables (uint4 / uint2, like the forward's):
//   ktiles[i]  = {k_begin, k_end, e_begin, e_end}  (gathered key rows, entry range)
//   entries[e] = {q_begin, q_end | edge << 31}     (gathered query rows)

#include "ksa_common.cuh"

namespace ksa {

__device__ __forceinline__ void red_add(float* p, float x) {
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(x) : "memory");
}

template <typename T, int D>
__device__ __forceinline__ void bwd_prep(const uint16_t* __restrict__ o,
                                         const uint16_t* __restrict__ dout,
                                         float* __restrict__ dsum, float* __restrict__ dq_acc,
                                         uint64_t o_bs, uint64_t o_hs, uint64_t do_bs,
                                         uint64_t do_hs, uint32_t n_slots) {
    constexpr int PAIRS = D / 64;  // bf16/f16 pairs per lane
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint32_t row = blockIdx.x * 4 + warp;
    if (row >= n_slots) return;  // whole warps only: the shuffles below stay converged
    const uint32_t h = blockIdx.y, b = blockIdx.z;
    const uint32_t* orow = reinterpret_cast<const uint32_t*>(o + b * o_bs + h * o_hs +
                                                             static_cast<uint64_t>(row) * D);
    const uint32_t* drow = reinterpret_cast<const uint32_t*>(dout + b * do_bs + h * do_hs +
                                                             static_cast<uint64_t>(row) * D);
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) {
        float o0, o1, d0, d1;
        Ops<T>::unpack(orow[lane * PAIRS + i], o0, o1);
        Ops<T>::unpack(drow[lane * PAIRS + i], d0, d1);
        acc += o0 * d0 + o1 * d1;
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    const uint64_t r = (static_cast<uint64_t>(b) * gridDim.y + h) * n_slots + row;
    if (lane == 0) dsum[r] = acc;
    float* q = dq_acc + r * D + lane * 2 * PAIRS;
#pragma unroll
    for (int i = 0; i < 2 * PAIRS; ++i) q[i] = 0.f;
}

template <typename T, int D, int BQ>
__device__ __forceinline__ void bwd(
    const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
    const uint16_t* __restrict__ v, const uint16_t* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ dsum, float* __restrict__ dq_acc,
    uint16_t* __restrict__ dk, uint16_t* __restrict__ dv, const uint4* __restrict__ ktiles,
    const uint2* __restrict__ entries, uint64_t q_bs, uint64_t q_hs, uint64_t k_bs, uint64_t k_hs,
    uint64_t v_bs, uint64_t v_hs, uint64_t do_bs, uint64_t do_hs, const Geo geo, uint32_t n_heads,
    uint32_t group, float scale_log2, float scale) {
    constexpr int CPR = D / 8;          // 16-byte chunks per row of q/k/v/dO
    constexpr int KT = KSA_BK * CPR;    // chunks per K or V tile
    constexpr int QT = BQ * CPR;        // chunks per Q or dO tile
    constexpr int NQ = BQ / 8;          // n8 tiles of S^T (query columns)
    constexpr int NT = D / 8;           // n8 tiles of dK / dV
    constexpr int KS = D / 16;          // k16 steps over the head dim
    constexpr int SCPR = BQ / 8;        // 16-byte chunks per row of the dS^T tile
    constexpr int RB = BQ / 16;         // 16-row blocks of a query tile
    constexpr int DQN = D * RB / 32;    // n8 tiles of dQ per warp (4 / RB warps per row block)
    // One pipeline stage: Q tile, dO tile, the rows' key ranges (uint4), lse * log2(e), D.
    constexpr uint32_t ST_DO = QT * 16, ST_RR = 2 * QT * 16, ST_L2 = ST_RR + BQ * 16,
                       ST_D = ST_L2 + BQ * 4, STAGE = ST_D + BQ * 4;
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ uint32_t s_flags[KSA_THREADS / 32];  // cta_any's votes
    const uint32_t s_k = smem_u32(smem);
    const uint32_t s_v = s_k + KT * 16;
    const uint32_t s_st = s_v + KT * 16;  // two stages
    const uint32_t s_ds = s_st + 2 * STAGE;
    uint8_t* const st_ptr = smem + 2 * KT * 16;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const uint32_t b = blockIdx.z, hk = blockIdx.y;
    const uint4 td = ktiles[blockIdx.x];
    const uint32_t k0 = td.x, k1 = td.y, e0 = td.z, nv = td.w - td.z;
    const uint32_t iters = nv * group, h0 = hk * group;

    // Swizzled byte offset of (row, chunk) in a q/k/v/dO tile (as in the forward).
    auto sw = [](int row, int c) -> uint32_t {
        return static_cast<uint32_t>((row * CPR + (c ^ (row & 7))) * 16);
    };

    // ---- K, V tile -> shared (group 0)
    const uint16_t* kb = k + b * k_bs + hk * k_hs;
    const uint16_t* vb = v + b * v_bs + hk * v_hs;
#pragma unroll
    for (int i = tid; i < KT; i += KSA_THREADS) {
        const int r = i / CPR, c = i % CPR;
        const uint32_t g = k0 + r;
        if (g < k1) {
            const uint64_t row = static_cast<uint64_t>(geo.slot(g)) * D + c * 8;
            cp_async16(s_k + sw(r, c), kb + row);
            cp_async16(s_v + sw(r, c), vb + row);
        } else {
            st_shared_zero16(s_k + sw(r, c));
            st_shared_zero16(s_v + sw(r, c));
        }
    }
    cp_async_commit();

    // Iteration `it` is query head h0 + it / nv, entry e0 + it % nv.
    auto load_q = [&](int stage, uint32_t it) {
        const uint32_t h = h0 + it / nv;
        const uint2 ent = entries[e0 + it % nv];
        const uint32_t qe = ent.y & 0x7fffffffu;
        const uint32_t st = s_st + stage * STAGE;
        const uint16_t* qh = q + b * q_bs + h * q_hs;
        const uint16_t* dh = dout + b * do_bs + h * do_hs;
#pragma unroll
        for (int i = tid; i < QT; i += KSA_THREADS) {
            const int r = i / CPR, c = i % CPR;
            const uint32_t g = ent.x + r;
            if (g < qe) {
                const uint64_t row = static_cast<uint64_t>(geo.slot(g)) * D + c * 8;
                cp_async16(st + sw(r, c), qh + row);
                cp_async16(st + ST_DO + sw(r, c), dh + row);
            } else {
                st_shared_zero16(st + sw(r, c));
                st_shared_zero16(st + ST_DO + sw(r, c));
            }
        }
        if (tid < BQ) {
            // Rows past the tile: no keys, lse = +inf (P = 0), D = 0.
            const uint32_t g = ent.x + tid;
            uint32_t rr[4];
            float l2 = INFINITY, dd = 0.f;
            geo.ranges(g < qe ? g : geo.n_slots, rr);
            if (g < qe) {
                const uint64_t idx =
                    (static_cast<uint64_t>(b) * n_heads + h) * geo.n_slots + geo.slot(g);
                l2 = lse[idx] * 1.4426950408889634f;
                dd = dsum[idx];
            }
            uint8_t* sp = st_ptr + stage * STAGE;
            reinterpret_cast<uint4*>(sp + ST_RR)[tid] = make_uint4(rr[0], rr[1], rr[2], rr[3]);
            reinterpret_cast<float*>(sp + ST_L2)[tid] = l2;
            reinterpret_cast<float*>(sp + ST_D)[tid] = dd;
        }
    };

    if (iters > 0) load_q(0, 0);
    cp_async_commit();

    // B-operand ldmatrix (non-transposed) of a Q or dO tile, as the forward's K:
    // this lane's row in a 16-row step as a byte offset, and its swizzled column
    // bits.
    const uint32_t b_off = static_cast<uint32_t>(((lane & 7) + (lane >> 4) * 8) * CPR * 16);
    const int b_x = (lane & 7) ^ ((lane >> 3) & 1);
    const int kw = warp * 16;  // this warp's 16 keys in the tile
    // Loop-invariant parts of the other shared addresses (the k-step's part is added
    // at the use). dS^T rows are BQ * 2 bytes (8 or 4 chunks): its XOR
    // (row / (8 / SCPR)) puts 8 consecutive rows of one chunk into 8 distinct
    // 16-byte bank groups, for the stores and for ldmatrix.
    // A operand (non-transposed) of K / V: row kw + (lane & 15), chunk 2ks + (lane >> 4).
    const uint32_t a_row = static_cast<uint32_t>((kw + (lane & 15)) * CPR * 16);
    const int a_x = (lane >> 4) ^ (lane & 7);
    // Transposed B operand of dO / Q / K: row 16ks + (lane & 7) + 8 ((lane >> 3) & 1),
    // chunk 2j + (lane >> 4).
    const uint32_t t_row = static_cast<uint32_t>(((lane & 7) + ((lane >> 3) & 1) * 8) * CPR * 16);
    const int t_x = (lane >> 4) ^ (lane & 7);
    // dS^T stores: rows kw + gid and kw + gid + 8 (same swizzle), byte tig * 4 of a chunk.
    const int ds_r = kw + gid;
    const uint32_t ds_st = static_cast<uint32_t>(ds_r * SCPR * 16 + tig * 4);
    const int ds_x = (ds_r / (8 / SCPR)) & (SCPR - 1);
    // dS^T as the transposed A operand of dQ: row 16ks + (lane & 7) + 8 ((lane >> 4) & 1),
    // chunk 2 rbq + ((lane >> 3) & 1).
    const int rbq = warp % RB, cq = warp / RB;  // dQ: my row block and column part
    const int dsa_hi = ((lane >> 4) & 1) * 8, dsa_c = rbq * 2;
    const int dsa_r = (lane & 7) + dsa_hi;
    const uint32_t ds_a = static_cast<uint32_t>(
        dsa_r * SCPR * 16 +
        (((dsa_c + ((lane >> 3) & 1)) ^ ((dsa_r / (8 / SCPR)) & (SCPR - 1))) << 4));
    const uint32_t kg0 = k0 + kw + gid;  // my key rows kg0 and kg0 + 8

    float dka[NT][4], dva[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int x = 0; x < 4; ++x) dka[j][x] = dva[j][x] = 0.f;
    }

    // A NaN or infinity in the K tile (ksa_common.cuh) becomes 0 once per CTA,
    // so dQ += dS K never multiplies a masked zero by it. Nothing else needs
    // marking: a query that may see such a key read it in the forward, so its
    // lse is NaN and every warp takes the slow dV/dK sums for it below, and its
    // dQ row reads the NaN P. Waits for the K/V group (the first query tile's
    // may still fly).
    cp_async_wait<1>();
    __syncthreads();
    if (cta_any(tile_non_finite<T, KT>(s_k) != 0, s_flags)) zero_non_finite<T, KT>(s_k);
    // (The loop's first barrier orders these stores before any read.)

    for (uint32_t it = 0; it < iters; ++it) {
        const int stage = it & 1;
        if (it + 1 < iters) {
            load_q(stage ^ 1, it + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint32_t h = h0 + it / nv;
        const uint2 ent = entries[e0 + it % nv];
        const uint32_t sq = s_st + stage * STAGE, sdo = sq + ST_DO;
        const uint8_t* sp = st_ptr + stage * STAGE;
        const uint4* s_rr = reinterpret_cast<const uint4*>(sp + ST_RR);
        const float2* s_l2 = reinterpret_cast<const float2*>(sp + ST_L2);
        const float2* s_dd = reinterpret_cast<const float2*>(sp + ST_D);

        // ---- S^T = K Q^T and dP^T = V dO^T (16 keys x BQ queries per warp)
        float s[NQ][4], dp[NQ][4];
#pragma unroll
        for (int j = 0; j < NQ; ++j) {
#pragma unroll
            for (int x = 0; x < 4; ++x) s[j][x] = dp[j][x] = 0.f;
        }
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t ka[4], va[4];
            const uint32_t a_off = a_row + static_cast<uint32_t>(((ks * 2) ^ a_x) << 4);
            ldmatrix_x4(ka, s_k + a_off);
            ldmatrix_x4(va, s_v + a_off);
#pragma unroll
            for (int np = 0; np < BQ / 16; ++np) {
                uint32_t bf[4];
                // == sw(np * 16 + row, ks * 2 + ((lane >> 3) & 1))
                const uint32_t off =
                    b_off + static_cast<uint32_t>((np * 16 * CPR + ((ks * 2) ^ b_x)) * 16);
                ldmatrix_x4(bf, sq + off);
                Ops<T>::mma(s[2 * np], ka, bf[0], bf[1]);
                Ops<T>::mma(s[2 * np + 1], ka, bf[2], bf[3]);
                ldmatrix_x4(bf, sdo + off);
                Ops<T>::mma(dp[2 * np], va, bf[0], bf[1]);
                Ops<T>::mma(dp[2 * np + 1], va, bf[2], bf[3]);
            }
        }

        // Whether query column c of this tile may see my key row kg0 + 8 hh.
        auto visible = [&](uint32_t c, int hh) {
            const uint4 r = s_rr[c];
            const uint32_t key = kg0 + hh * 8;
            return key < k1 && ((key >= r.x && key < r.y) || (key >= r.z && key < r.w));
        };

        // Non-finite inputs (ksa_common.cuh) on an edge tile. With everything
        // finite a masked pair has P = ex2(-inf) = 0 and dS = 0 * finite = 0
        // exactly, so the tensor-core products are exact. A NaN or infinity in a
        // Q, dO or V row shows in this warp's S^T or dP^T (x * 0 is NaN for a
        // non-finite x; K's rows were zeroed above), and a row's lse or D that is
        // not finite (it read one elsewhere) is read here: then this warp sums
        // its dV and dK over the allowed pairs only and stages dS^T with masked
        // entries selected to 0, so the one dQ mma stays exact. No scan, no
        // barrier. (A slow dQ branch, tried first, cost ~45 PTX instructions in
        // every iteration, full tiles included.)
        const bool edge = ent.y >> 31;
        bool bad = false;
        if (edge) {
            float z = 0.f;
            bool lse_ok = true;
#pragma unroll
            for (int j = 0; j < NQ; ++j) {
                const float2 l2 = s_l2[j * 4 + tig], dd = s_dd[j * 4 + tig];
                // Rows past the tile have lse = +inf (P = 0): only NaN and -inf
                // make ex2(-inf - lse) differ from 0.
                lse_ok &= l2.x > -INFINITY && l2.y > -INFINITY;
                z = fmaf(dd.x, 0.f, fmaf(dd.y, 0.f, z));
#pragma unroll
                for (int x = 0; x < 4; ++x) z = fmaf(s[j][x], 0.f, fmaf(dp[j][x], 0.f, z));
            }
            bad = __any_sync(0xffffffffu, !(z == 0.f && lse_ok));
        }

        // ---- element mask on edge tiles: key row kg0 (+8) against query column's ranges
        // (spelled out, not through `visible`: see the forward's mask)
        if (edge) {
#pragma unroll
            for (int j = 0; j < NQ; ++j) {
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    const uint4 r = s_rr[j * 8 + tig * 2 + (x & 1)];
                    const uint32_t key = kg0 + (x >> 1) * 8;
                    const bool ok =
                        key < k1 && ((key >= r.x && key < r.y) || (key >= r.z && key < r.w));
                    if (!ok) s[j][x] = -INFINITY;
                }
            }
        }

        // ---- P^T = exp(scale S^T - lse), dS^T = P^T (dP^T - D)
#pragma unroll
        for (int j = 0; j < NQ; ++j) {
            const float2 l2 = s_l2[j * 4 + tig], dd = s_dd[j * 4 + tig];
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const float p = ex2(s[j][x] * scale_log2 - ((x & 1) ? l2.y : l2.x));
                s[j][x] = p;
                dp[j][x] = p * (dp[j][x] - ((x & 1) ? dd.y : dd.x));
            }
        }
        // Slow path: a 64 x BQ tile of P^T or dS^T in the dS^T region, unswizzled
        // (element (key, query) at byte (key * BQ + query) * 2), rounded to T as
        // the mma would take it.
        auto stage_rows = [&](const float (&x)[NQ][4]) {
#pragma unroll
            for (int j = 0; j < NQ; ++j) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const uint32_t at =
                        static_cast<uint32_t>(((kw + gid + hh * 8) * BQ + j * 8 + tig * 2) * 2);
                    st_shared_u32(s_ds + at, Ops<T>::pack(x[j][2 * hh], x[j][2 * hh + 1]));
                }
            }
            __syncwarp();
        };
        // acc[j] (my key rows) += sum over the tile's queries c that see the key of
        // staged(key, c) * tile(c, my columns): each thread's own fragment, a select
        // per pair, so a masked query's NaN or infinity never enters the sum.
        auto visible_sum = [&](float (&acc)[NT][4], uint32_t tile) {
            for (int c = 0; c < BQ; c += 2) {
                float w[2][2];
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const uint32_t at = static_cast<uint32_t>(((kw + gid + hh * 8) * BQ + c) * 2);
                    Ops<T>::unpack(ld_shared_u32(s_ds + at), w[hh][0], w[hh][1]);
                }
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) {
                    const bool ok0 = visible(c + cc, 0), ok1 = visible(c + cc, 1);
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        float x0, x1;
                        Ops<T>::unpack(ld_shared_u32(tile + sw(c + cc, j) + tig * 4), x0, x1);
                        if (ok0) {
                            acc[j][0] += w[0][cc] * x0;
                            acc[j][1] += w[0][cc] * x1;
                        }
                        if (ok1) {
                            acc[j][2] += w[1][cc] * x0;
                            acc[j][3] += w[1][cc] * x1;
                        }
                    }
                }
            }
            __syncwarp();
        };

        // ---- dV += P^T dO, dK += dS^T Q (k = the tile's queries)
        // dS^T -> shared for the dQ product, in either path: rows kw + gid (+8),
        // chunks 2ks (+1), swizzled.
        auto store_ds = [&](int ks, const uint32_t (&da)[4]) {
            constexpr uint32_t R8 = 8 * SCPR * 16;
            const uint32_t c0 = s_ds + ds_st + static_cast<uint32_t>(((2 * ks) ^ ds_x) << 4);
            const uint32_t c1 = s_ds + ds_st + static_cast<uint32_t>(((2 * ks + 1) ^ ds_x) << 4);
            st_shared_u32(c0, da[0]);
            st_shared_u32(c0 + R8, da[1]);
            st_shared_u32(c1, da[2]);
            st_shared_u32(c1 + R8, da[3]);
        };
        if (bad) {
            stage_rows(s);
            visible_sum(dva, sdo);
            stage_rows(dp);
            visible_sum(dka, sq);
#pragma unroll
            for (int j = 0; j < NQ; ++j) {
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    if (!visible(j * 8 + tig * 2 + (x & 1), x >> 1)) dp[j][x] = 0.f;
                }
            }
#pragma unroll
            for (int ks = 0; ks < BQ / 16; ++ks) {
                const uint32_t da[4] = {Ops<T>::pack(dp[2 * ks][0], dp[2 * ks][1]),
                                        Ops<T>::pack(dp[2 * ks][2], dp[2 * ks][3]),
                                        Ops<T>::pack(dp[2 * ks + 1][0], dp[2 * ks + 1][1]),
                                        Ops<T>::pack(dp[2 * ks + 1][2], dp[2 * ks + 1][3])};
                store_ds(ks, da);
            }
        } else {
#pragma unroll
        for (int ks = 0; ks < BQ / 16; ++ks) {
            uint32_t pa[4], da[4];
            pa[0] = Ops<T>::pack(s[2 * ks][0], s[2 * ks][1]);
            pa[1] = Ops<T>::pack(s[2 * ks][2], s[2 * ks][3]);
            pa[2] = Ops<T>::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]);
            pa[3] = Ops<T>::pack(s[2 * ks + 1][2], s[2 * ks + 1][3]);
            da[0] = Ops<T>::pack(dp[2 * ks][0], dp[2 * ks][1]);
            da[1] = Ops<T>::pack(dp[2 * ks][2], dp[2 * ks][3]);
            da[2] = Ops<T>::pack(dp[2 * ks + 1][0], dp[2 * ks + 1][1]);
            da[3] = Ops<T>::pack(dp[2 * ks + 1][2], dp[2 * ks + 1][3]);
            store_ds(ks, da);
#pragma unroll
            for (int dq = 0; dq < D / 16; ++dq) {
                uint32_t bf[4];
                const uint32_t off = static_cast<uint32_t>(ks * 16 * CPR * 16) + t_row +
                                     static_cast<uint32_t>(((dq * 2) ^ t_x) << 4);
                ldmatrix_x4_trans(bf, sdo + off);
                Ops<T>::mma(dva[2 * dq], pa, bf[0], bf[1]);
                Ops<T>::mma(dva[2 * dq + 1], pa, bf[2], bf[3]);
                ldmatrix_x4_trans(bf, sq + off);
                Ops<T>::mma(dka[2 * dq], da, bf[0], bf[1]);
                Ops<T>::mma(dka[2 * dq + 1], da, bf[2], bf[3]);
            }
        }
        }
        __syncthreads();  // dS^T of all 64 keys is in shared memory

        // ---- dQ (query rows rbq * 16 .., columns cq * DQN * 8 ..) += dS K
        float dqa[DQN][4];
#pragma unroll
        for (int j = 0; j < DQN; ++j) dqa[j][0] = dqa[j][1] = dqa[j][2] = dqa[j][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KSA_BK / 16; ++ks) {
            uint32_t a[4];
            // A = dS (queries x keys) from the stored dS^T (keys x queries): transposed
            // 8x8 blocks; lanes 8-15 take queries 8-15, lanes 16-31 keys 8-15.
            ldmatrix_x4_trans(a, s_ds + static_cast<uint32_t>(ks * 16 * SCPR * 16) + ds_a);
#pragma unroll
            for (int dq = 0; dq < DQN / 2; ++dq) {
                uint32_t bf[4];
                const int c = (cq * DQN / 2 + dq) * 2;
                ldmatrix_x4_trans(bf, s_k + static_cast<uint32_t>(ks * 16 * CPR * 16) + t_row +
                                          static_cast<uint32_t>((c ^ t_x) << 4));
                Ops<T>::mma(dqa[2 * dq], a, bf[0], bf[1]);
                Ops<T>::mma(dqa[2 * dq + 1], a, bf[2], bf[3]);
            }
        }
        const uint32_t qe = ent.y & 0x7fffffffu;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const uint32_t g = ent.x + rbq * 16 + gid + hh * 8;
            if (g < qe) {
                float* dst = dq_acc +
                             ((static_cast<uint64_t>(b) * n_heads + h) * geo.n_slots + geo.slot(g)) *
                                 D +
                             cq * DQN * 8 + tig * 2;
#pragma unroll
                for (int j = 0; j < DQN; ++j) {
                    red_add(dst + j * 8, dqa[j][2 * hh]);
                    red_add(dst + j * 8 + 1, dqa[j][2 * hh + 1]);
                }
            }
        }
        __syncthreads();  // this stage and dS^T are overwritten next iteration
    }
    // With no iterations the K/V copies are still in flight: land them before the
    // epilogue reuses the tiles (a no-op otherwise).
    cp_async_wait<0>();
    __syncthreads();

    // ---- epilogue: stage this warp's 16 dK / dV rows in its own rows of the K / V
    // tiles (every warp is past its last read of them), then 16-byte row stores.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        // == sw(kw + gid + hh * 8, j) + tig * 4 (row & 7 == gid)
        const uint32_t srow_off = static_cast<uint32_t>((kw + gid + hh * 8) * CPR * 16);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const uint32_t off = srow_off + static_cast<uint32_t>(((j ^ gid) << 4) + tig * 4);
            st_shared_u32(s_k + off, Ops<T>::pack(dka[j][2 * hh] * scale, dka[j][2 * hh + 1] * scale));
            st_shared_u32(s_v + off, Ops<T>::pack(dva[j][2 * hh], dva[j][2 * hh + 1]));
        }
    }
    __syncwarp();
    const uint64_t kv_head = (static_cast<uint64_t>(b) * gridDim.y + hk) * geo.n_slots;
#pragma unroll
    for (int i = lane; i < 16 * CPR; i += 32) {
        const int r = i / CPR, c = i % CPR;
        const uint32_t g = k0 + kw + r;
        if (g < k1) {
            const uint64_t at = (kv_head + geo.slot(g)) * D + c * 8;
            // == sw(warp * 16 + r, c)
            const uint32_t row_off = static_cast<uint32_t>((warp * 16 + r) * CPR * 16);
            const uint32_t off = row_off + static_cast<uint32_t>((c ^ (r & 7)) << 4);
            *reinterpret_cast<uint4*>(dk + at) = ld_shared_v4(s_k + off);
            *reinterpret_cast<uint4*>(dv + at) = ld_shared_v4(s_v + off);
        }
    }
}

template <typename T>
__device__ __forceinline__ void bwd_dq(const float4* __restrict__ acc, uint2* __restrict__ dq,
                                       uint64_t quads, float scale) {
    const uint64_t i = static_cast<uint64_t>(blockIdx.x) * KSA_THREADS + threadIdx.x;
    if (i < quads) {
        const float4 a = acc[i];
        dq[i] = make_uint2(Ops<T>::pack(a.x * scale, a.y * scale),
                           Ops<T>::pack(a.z * scale, a.w * scale));
    }
}

}  // namespace ksa

// Argument orders (the Rust launch in src/cuda/backward.rs builds exactly these).
// prep: o, dout, dsum, dq_acc, o_bs, o_hs, do_bs, do_hs (u64, elements), n_slots (u32);
//       grid (ceil(N / 4), hq, b).
#define KSA_BWD_PREP_ENTRY(NAME, T, D)                                                           \
    extern "C" __global__ void __launch_bounds__(KSA_THREADS)                                    \
        NAME(const uint16_t* __restrict__ o, const uint16_t* __restrict__ dout,                  \
             float* __restrict__ dsum, float* __restrict__ dq_acc, uint64_t o_bs, uint64_t o_hs, \
             uint64_t do_bs, uint64_t do_hs, uint32_t n_slots) {                                 \
        ksa::bwd_prep<T, D>(o, dout, dsum, dq_acc, o_bs, o_hs, do_bs, do_hs, n_slots);           \
    }

// main: q, k, v, dout, lse, dsum, dq_acc, dk, dv, ktiles, entries,
//       q_bs, q_hs, k_bs, k_hs, v_bs, v_hs, do_bs, do_hs                 (u64, elements)
//       n_slots, n_sum, chunk, summaries, window, mode, n_heads, group  (u32)
//       scale_log2 = scale * log2(e), scale                              (f32)
//       grid (key tiles, kv heads, b); dk, dv contiguous [b, hkv, N, d].
#define KSA_BWD_ENTRY(NAME, T, D, BQ)                                                            \
    extern "C" __global__ void __launch_bounds__(KSA_THREADS) NAME(                              \
        const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,                           \
        const uint16_t* __restrict__ v, const uint16_t* __restrict__ dout,                        \
        const float* __restrict__ lse, const float* __restrict__ dsum, float* __restrict__ dq_acc, \
        uint16_t* __restrict__ dk, uint16_t* __restrict__ dv, const uint4* __restrict__ ktiles,   \
        const uint2* __restrict__ entries, uint64_t q_bs, uint64_t q_hs, uint64_t k_bs,          \
        uint64_t k_hs, uint64_t v_bs, uint64_t v_hs, uint64_t do_bs, uint64_t do_hs,             \
        uint32_t n_slots, uint32_t n_sum, uint32_t chunk, uint32_t summaries, uint32_t window,   \
        uint32_t mode, uint32_t n_heads, uint32_t group, float scale_log2, float scale) {        \
        const ksa::Geo geo{n_slots, n_sum, chunk, summaries, window, mode};                      \
        ksa::bwd<T, D, BQ>(q, k, v, dout, lse, dsum, dq_acc, dk, dv, ktiles, entries, q_bs, q_hs, \
                           k_bs, k_hs, v_bs, v_hs, do_bs, do_hs, geo, n_heads, group, scale_log2, \
                           scale);                                                               \
    }

// dq: dq_acc (f32), dq (contiguous [b, hq, N, d]), quads = elements / 4 (u64), scale (f32);
//     grid (ceil(quads / 128), 1, 1).
#define KSA_BWD_DQ_ENTRY(NAME, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(KSA_THREADS)                                     \
        NAME(const float4* __restrict__ acc, uint2* __restrict__ dq, uint64_t quads, float scale) { \
        ksa::bwd_dq<T>(acc, dq, quads, scale);                                                    \
    }

KSA_BWD_PREP_ENTRY(ksa_bwd_prep_bf16_d64, ksa::Bf16, 64)
KSA_BWD_PREP_ENTRY(ksa_bwd_prep_bf16_d128, ksa::Bf16, 128)
KSA_BWD_PREP_ENTRY(ksa_bwd_prep_f16_d64, ksa::F16, 64)
KSA_BWD_PREP_ENTRY(ksa_bwd_prep_f16_d128, ksa::F16, 128)
KSA_BWD_ENTRY(ksa_bwd_bf16_d64, ksa::Bf16, 64, 64)
KSA_BWD_ENTRY(ksa_bwd_bf16_d128, ksa::Bf16, 128, 32)
KSA_BWD_ENTRY(ksa_bwd_f16_d64, ksa::F16, 64, 64)
KSA_BWD_ENTRY(ksa_bwd_f16_d128, ksa::F16, 128, 32)
KSA_BWD_DQ_ENTRY(ksa_bwd_dq_bf16, ksa::Bf16)
KSA_BWD_DQ_ENTRY(ksa_bwd_dq_f16, ksa::F16)
