// Fused block-sparse KSA prefill (forward) kernel, FlashAttention-2 style.
//
// One CTA = (query tile, query-head group, batch): 4 warps x 16 query rows; the
// CTA serves 1, 2 or 4 query heads that share one KV head (GQA), 64, 32 or 16
// query rows each, so each K/V tile load feeds all of them. Q tile -> shared memory (cp.async) -> registers (ldmatrix); K/V tiles of
// up to 64 keys streamed through a two-stage cp.async pipeline; S = Q K^T and
// O += P V with mma.sync.m16n8k16 (f32 accumulators); online softmax in
// registers with exp2 and a log2(e)-prescaled scale. Writes O (input dtype) and
// the per-row log-sum-exp (f32, natural log of the scaled scores).
//
// Rows are addressed in *gathered* coordinates, computed arithmetically from the
// layout (no gather kernel, no extra buffer):
//   KSA  (mode 0): g <  n_sum : summary s = g   (chunk-major, s = chunk*S + j)
//                  g >= n_sum : text    t = g - n_sum
//   causal (mode 1): g is the slot.
// so that every query's keys are two dense ranges of g (a summary run and a
// text run). Which key tiles a query tile visits, and which of them need the
// element mask (edge tiles), comes from the Rust schedule (src/cuda/schedule.rs):
//   tiles[i]   = {q_begin, q_end, e_begin, e_end}  (uint4, gathered query rows,
//                                                   entry range)
//   entries[e] = {k_begin, k_end | edge << 31}    (uint2, gathered key rows)
// The per-row key ranges used by the edge mask are computed here in closed form
// (mirroring Layout::key_ranges); the Rust tests check both against each other.
//
// Where a gathered row sits in the buffers is `Rows`' business alone: the full
// forward holds every row in slot order; a cache step (a query offset) holds
// only its own query rows (Q, O, log-sum-exp) and only the held keys (K, V, in
// gathered order: every summary, then the text from token `k_first`). The
// schedule and the mask stay in absolute gathered coordinates either way.
//
// Shared memory rows are XOR-swizzled in 16-byte chunks (chunk ^ (row & 7)), so
// cp.async stores and ldmatrix loads are bank-conflict free.

#include "ksa_common.cuh"

#define KSA_BQ 64

namespace ksa {

// Buffer rows of gathered rows g. Full forward: q_slot0 = q_row0 = k_first =
// k_gathered = 0, lse_rows = n_slots.
struct Rows {
    // Q/O row of query g: its slot less the slot of the launch's first query
    // row (q_slot0), plus that row's place in the buffer (q_row0).
    uint32_t q_slot0, q_row0;
    // Rows per (batch, head) of the log-sum-exp buffer.
    uint32_t lse_rows;
    // K/V: k_gathered == 0: slot order; else gathered order without the text
    // before token k_first (the schedule never visits it).
    uint32_t k_first, k_gathered;

    __device__ __forceinline__ uint32_t q(const Geo& geo, uint32_t g) const {
        return geo.slot(g) - q_slot0 + q_row0;
    }
    __device__ __forceinline__ uint32_t k(const Geo& geo, uint32_t g) const {
        if (k_gathered == 0) return geo.slot(g);
        return g < geo.n_sum ? g : g - k_first;
    }
};

template <typename T, int D>
__device__ __forceinline__ void fwd(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                                    const uint16_t* __restrict__ v, uint16_t* __restrict__ o,
                                    float* __restrict__ lse, const uint4* __restrict__ tiles,
                                    const uint2* __restrict__ entries, uint64_t q_bs, uint64_t q_hs,
                                    uint64_t k_bs, uint64_t k_hs, uint64_t v_bs, uint64_t v_hs,
                                    uint64_t o_bs, uint64_t o_hs, const Geo geo, const Rows rows,
                                    uint32_t n_heads,
                                    uint32_t group, uint32_t lg_hp, float scale_log2) {
    constexpr int CPR = D / 8;             // 16-byte chunks per row
    constexpr int TILE = KSA_BK * CPR;     // chunks per K or V tile (== Q tile)
    constexpr int NT = D / 8;              // n8 tiles of the output
    constexpr int KS = D / 16;             // k16 steps of Q K^T
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ uint32_t s_flags[KSA_THREADS / 32];  // cta_any's votes
    const uint32_t s_q = smem_u32(smem);
    const uint32_t s_k = s_q + TILE * 16;  // two stages
    const uint32_t s_v = s_k + 2 * TILE * 16;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // GQA packing: the CTA serves 2^lg_hp query heads of one KV group, R = 64 >> lg_hp
    // query rows each; warp w computes head h0 + w / (4 >> lg_hp), rows
    // (w % (4 >> lg_hp)) * 16 .. +16 of the tile. K/V tiles are loaded once for all.
    const uint32_t b = blockIdx.z;
    const uint32_t h0 = blockIdx.y << lg_hp;
    const uint32_t hk = h0 / group;
    const uint32_t row_shift = 6 - lg_hp;  // log2(R)
    const uint32_t hw = h0 + (static_cast<uint32_t>(warp) >> (2 - lg_hp));
    const uint32_t rb = static_cast<uint32_t>(warp) & ((4u >> lg_hp) - 1);
    const uint4 td = tiles[blockIdx.x];
    const uint32_t q0 = td.x, q1 = td.y, e0 = td.z, e1 = td.w;

    const uint16_t* qb = q + b * q_bs;
    const uint16_t* kb = k + b * k_bs + hk * k_hs;
    const uint16_t* vb = v + b * v_bs + hk * v_hs;
    uint16_t* ob = o + b * o_bs + hw * o_hs;

    // Swizzled byte offset of (row, chunk) inside a tile.
    auto sw = [](int row, int c) -> uint32_t {
        return static_cast<uint32_t>((row * CPR + (c ^ (row & 7))) * 16);
    };

    // K ldmatrix: this lane's row inside a 16-key step, (lane & 7) + 8 * (lane >> 4),
    // as a byte offset, and its swizzled column bits.
    const uint32_t k_off = static_cast<uint32_t>(((lane & 7) + (lane >> 4) * 8) * CPR * 16);
    const int k_x = (lane & 7) ^ ((lane >> 3) & 1);

    // ---- Q tile -> shared (group 0)
#pragma unroll
    for (int i = tid; i < TILE; i += KSA_THREADS) {
        const int r = i / CPR, c = i % CPR;
        const uint32_t g = q0 + (static_cast<uint32_t>(r) & ((1u << row_shift) - 1));
        const uint32_t hr = h0 + (static_cast<uint32_t>(r) >> row_shift);
        if (g < q1) {
            cp_async16(s_q + sw(r, c),
                       qb + hr * q_hs + static_cast<uint64_t>(rows.q(geo, g)) * D + c * 8);
        } else {
            st_shared_zero16(s_q + sw(r, c));
        }
    }
    cp_async_commit();

    auto load_kv = [&](int stage, uint2 ent) {
        const uint32_t kbeg = ent.x, kend = ent.y & 0x7fffffffu;
#pragma unroll
        for (int i = tid; i < TILE; i += KSA_THREADS) {
            const int r = i / CPR, c = i % CPR;
            const uint32_t g = kbeg + r;
            const uint32_t off = stage * TILE * 16 + sw(r, c);
            if (g < kend) {
                const uint64_t row = static_cast<uint64_t>(rows.k(geo, g)) * D + c * 8;
                cp_async16(s_k + off, kb + row);
                cp_async16(s_v + off, vb + row);
            } else {
                st_shared_zero16(s_k + off);
                st_shared_zero16(s_v + off);
            }
        }
    };

    if (e0 < e1) load_kv(0, entries[e0]);
    cp_async_commit();

    // My two rows: g0 = q0 + warp*16 + lane/4 and g0 + 8.
    const int gid = lane >> 2, tig = lane & 3;
    uint32_t rr[2][4];
    uint32_t grow[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        grow[hh] = q0 + rb * 16 + gid + hh * 8;
        if (grow[hh] < q1) {
            geo.ranges(grow[hh], rr[hh]);
        } else {
            rr[hh][0] = rr[hh][1] = rr[hh][2] = rr[hh][3] = 0;
        }
    }

    // Q fragments (A operand, row-major 16x16 per k-step) in registers.
    cp_async_wait<1>();
    __syncthreads();
    uint32_t qf[KS][4];
    const int q_warp_row = warp * 16;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const int row = q_warp_row + (lane & 15);
        const int c = ks * 2 + (lane >> 4);
        ldmatrix_x4(qf[ks], s_q + sw(row, c));
    }

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.f, 0.f};
    bool poisoned[2] = {false, false};  // the row read a non-finite value of V

    for (uint32_t e = e0; e < e1; ++e) {
        const int stage = (e - e0) & 1;
        const uint2 ent = entries[e];
        if (e + 1 < e1) {
            load_kv(stage ^ 1, entries[e + 1]);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const uint32_t sk = s_k + stage * TILE * 16;
        const uint32_t sv = s_v + stage * TILE * 16;

        // ---- S = Q K^T (16 x 64 per warp)
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t bf[4];
                // == sw(np * 16 + row, ks * 2 + ((lane >> 3) & 1))
                ldmatrix_x4(bf, sk + k_off +
                                    static_cast<uint32_t>((np * 16 * CPR + ((ks * 2) ^ k_x)) * 16));
                Ops<T>::mma(s[2 * np], qf[ks], bf[0], bf[1]);
                Ops<T>::mma(s[2 * np + 1], qf[ks], bf[2], bf[3]);
            }
        }

        // Whether my row hh may see key `col` of this tile (its end is kend).
        const uint32_t kend = ent.y & 0x7fffffffu;
        auto visible = [&](int hh, uint32_t col) {
            const uint32_t* r = rr[hh];
            return col < kend && ((col >= r[0] && col < r[1]) || (col >= r[2] && col < r[3]));
        };

        // ---- element mask on edge tiles (spelled out: through `visible`, nvcc
        // materializes each verdict as a 16-bit value, ~130 PTX moves a tile)
        const bool edge = ent.y >> 31;
        if (edge) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    const uint32_t col = ent.x + j * 8 + tig * 2 + (x & 1);
                    const uint32_t* r = rr[x >> 1];
                    const bool ok = col < kend && ((col >= r[0] && col < r[1]) ||
                                                   (col >= r[2] && col < r[3]));
                    if (!ok) s[j][x] = -INFINITY;
                }
            }
        }
        // An edge tile's V with a NaN or infinity takes the rare path before
        // O += P V (see ksa_common.cuh). S needs nothing: a masked score is
        // replaced, whatever K held. The scan and cta_any's barrier are all a
        // finite edge tile pays; the previous call's reads are behind the loop's
        // closing barrier.
        const bool v_bad = edge && cta_any(tile_non_finite<T, TILE>(sv) != 0, s_flags);

        // ---- online softmax (rows gid and gid + 8 of this warp)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hh], s[j][2 * hh + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[hh], mx);
            const float ms = m_new == -INFINITY ? 0.f : m_new * scale_log2;
            const float corr = ex2(m[hh] * scale_log2 - ms);
            m[hh] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float p0 = ex2(s[j][2 * hh] * scale_log2 - ms);
                const float p1 = ex2(s[j][2 * hh + 1] * scale_log2 - ms);
                s[j][2 * hh] = p0;
                s[j][2 * hh + 1] = p1;
                sum += p0 + p1;
            }
            l[hh] = l[hh] * corr + sum;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                acc[j][2 * hh] *= corr;
                acc[j][2 * hh + 1] *= corr;
            }
        }

        if (v_bad) {
            // Rare path. A row of mine that may see a key whose V row is not
            // finite reads it: its output is unspecified, and the epilogue makes
            // it NaN (the lanes of a quad split the keys, then share the
            // verdict); its log-sum-exp does not read V and stays exact.
            // Then every non-finite element of the tile becomes 0, so the
            // unchanged mma below multiplies masked zeros by finite values only.
            // (An earlier version summed allowed pairs in a branch instead of
            // the mma: the merge of the two accumulator versions cost ~48 PTX
            // moves per tile visit in the common case.)
            bool sees[2] = {false, false};
            for (int c = tig; c < KSA_BK; c += 4) {
                const bool ok0 = visible(0, ent.x + c), ok1 = visible(1, ent.x + c);
                if (ok0 || ok1) {
                    uint32_t acc_nf = 0;
#pragma unroll
                    for (int cc = 0; cc < CPR; ++cc) {
                        const uint4 x = ld_shared_v4(sv + sw(c, cc));
                        acc_nf = Ops<T>::fma_zero(x.x, Ops<T>::fma_zero(x.y, acc_nf));
                        acc_nf = Ops<T>::fma_zero(x.z, Ops<T>::fma_zero(x.w, acc_nf));
                    }
                    if (acc_nf & 0x7fff7fffu) {
                        sees[0] |= ok0;
                        sees[1] |= ok1;
                    }
                }
            }
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                uint32_t f = sees[hh];
                f |= __shfl_xor_sync(0xffffffffu, f, 1);
                f |= __shfl_xor_sync(0xffffffffu, f, 2);
                poisoned[hh] |= f != 0;
            }
            __syncthreads();  // every row checked before the tile is rewritten
            zero_non_finite<T, TILE>(sv);
            __syncthreads();
        }

        // ---- O += P V
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            uint32_t a[4];
            a[0] = Ops<T>::pack(s[2 * ks][0], s[2 * ks][1]);
            a[1] = Ops<T>::pack(s[2 * ks][2], s[2 * ks][3]);
            a[2] = Ops<T>::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]);
            a[3] = Ops<T>::pack(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t bf[4];
                const int row = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int c = dp * 2 + (lane >> 4);
                ldmatrix_x4_trans(bf, sv + sw(row, c));
                Ops<T>::mma(acc[2 * dp], a, bf[0], bf[1]);
                Ops<T>::mma(acc[2 * dp + 1], a, bf[2], bf[3]);
            }
        }
        __syncthreads();  // this stage is overwritten by the load two iterations on
    }

    // ---- epilogue: normalize; stage this warp's 16 output rows in its own rows of
    // the Q tile (only this warp ever read them), then write them to global memory
    // as 16-byte row chunks; write the log-sum-exp.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float lt = l[hh];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const uint32_t g = grow[hh];
        const float inv = g < q1 ? (poisoned[hh] ? NAN : 1.f / lt) : 0.f;
        // == sw(warp * 16 + gid + hh * 8, j) + tig * 4 (row & 7 == gid).
        const uint32_t srow_off = static_cast<uint32_t>((warp * 16 + gid + hh * 8) * CPR * 16);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            st_shared_u32(s_q + srow_off + static_cast<uint32_t>(((j ^ gid) << 4) + tig * 4),
                          Ops<T>::pack(acc[j][2 * hh] * inv, acc[j][2 * hh + 1] * inv));
        }
        if (g < q1 && tig == 0) {
            lse[(static_cast<uint64_t>(b) * n_heads + hw) * rows.lse_rows + rows.q(geo, g)] =
                (m[hh] * scale_log2 + lg2(lt)) * 0.69314718055994531f;
        }
    }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * CPR; i += 32) {
        const int r = i / CPR, c = i % CPR;
        const uint32_t g = q0 + rb * 16 + r;
        if (g < q1) {
            const uint4 x = ld_shared_v4(s_q + sw(warp * 16 + r, c));
            *reinterpret_cast<uint4*>(ob + static_cast<uint64_t>(rows.q(geo, g)) * D + c * 8) = x;
        }
    }
}

}  // namespace ksa

// Argument order (the Rust launch in src/cuda/launch.rs builds exactly this):
//   q, k, v, o, lse, tiles, entries,
//   q_batch_stride, q_head_stride, k_batch_stride, k_head_stride,
//   v_batch_stride, v_head_stride, o_batch_stride, o_head_stride   (u64, elements)
//   n_slots, n_sum, chunk, summaries, window, mode,
//   q_slot0, q_row0, lse_rows, k_first, k_gathered (Rows), n_heads, group,
//   lg_hp (log2 of query heads per CTA: 0, 1, 2; divides group)      (u32)
//   scale_log2 = softmax scale * log2(e)                              (f32)
#define KSA_FWD_ENTRY(NAME, T, D)                                                                \
    extern "C" __global__ void __launch_bounds__(KSA_THREADS) NAME(                              \
        const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,                           \
        const uint16_t* __restrict__ v, uint16_t* __restrict__ o, float* __restrict__ lse,        \
        const uint4* __restrict__ tiles, const uint2* __restrict__ entries, uint64_t q_bs,        \
        uint64_t q_hs, uint64_t k_bs, uint64_t k_hs, uint64_t v_bs, uint64_t v_hs, uint64_t o_bs, \
        uint64_t o_hs, uint32_t n_slots, uint32_t n_sum, uint32_t chunk, uint32_t summaries,      \
        uint32_t window, uint32_t mode, uint32_t q_slot0, uint32_t q_row0, uint32_t lse_rows,     \
        uint32_t k_first, uint32_t k_gathered, uint32_t n_heads, uint32_t group, uint32_t lg_hp,  \
        float scale_log2) {                                                                      \
        const ksa::Geo geo{n_slots, n_sum, chunk, summaries, window, mode};                      \
        const ksa::Rows rows{q_slot0, q_row0, lse_rows, k_first, k_gathered};                    \
        ksa::fwd<T, D>(q, k, v, o, lse, tiles, entries, q_bs, q_hs, k_bs, k_hs, v_bs, v_hs, o_bs, \
                       o_hs, geo, rows, n_heads, group, lg_hp, scale_log2);                      \
    }

KSA_FWD_ENTRY(ksa_fwd_bf16_d64, ksa::Bf16, 64)
KSA_FWD_ENTRY(ksa_fwd_bf16_d128, ksa::Bf16, 128)
KSA_FWD_ENTRY(ksa_fwd_f16_d64, ksa::F16, 64)
KSA_FWD_ENTRY(ksa_fwd_f16_d128, ksa::F16, 128)
