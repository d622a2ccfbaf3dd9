// One warp computes D(16x8, f32) = A(16x16, row-major) * B(16x8) for bf16 and f16,
// with A loaded by ldmatrix.x4, B (stored as Bt: 8 rows of 16 k-values) by ldmatrix.x2,
// and a second B copy stored k-major (16 rows of 8 n-values) loaded by ldmatrix.x2.trans.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <bool BF16>
__device__ void mma_tile(const unsigned short* a, const unsigned short* bt, const unsigned short* bk,
                         float* d, float* d2) {
    __shared__ __align__(16) unsigned short sa[16 * 16];
    __shared__ __align__(16) unsigned short sbt[8 * 16];
    __shared__ __align__(16) unsigned short sbk[16 * 8];
    int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) sa[i] = a[i];
    for (int i = lane; i < 128; i += 32) { sbt[i] = bt[i]; sbk[i] = bk[i]; }
    __syncthreads();
    unsigned a0, a1, a2, a3, b0, b1, c0, c1;
    // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    const unsigned short* pa = sa + (lane % 16) * 16 + (lane / 16) * 8;
    unsigned sa_addr = (unsigned)__cvta_generic_to_shared(pa);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3) : "r"(sa_addr));
    // B stored n-major (Bt[n][k]): matrices (n 0-7, k 0-7), (n 0-7, k 8-15).
    const unsigned short* pb = sbt + (lane % 8) * 16 + ((lane / 8) % 2) * 8;
    unsigned sb_addr = (unsigned)__cvta_generic_to_shared(pb);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(b0), "=r"(b1) : "r"(sb_addr));
    // B stored k-major (B[k][n]), transposed on load: matrices (k 0-7), (k 8-15).
    const unsigned short* pk = sbk + (lane % 16) * 8;
    unsigned sk_addr = (unsigned)__cvta_generic_to_shared(pk);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(c0), "=r"(c1) : "r"(sk_addr));
    float e[4] = {0.f, 0.f, 0.f, 0.f};
    float f[4] = {0.f, 0.f, 0.f, 0.f};
    if (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(e[0]), "+f"(e[1]), "+f"(e[2]), "+f"(e[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(f[0]), "+f"(f[1]), "+f"(f[2]), "+f"(f[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(c0), "r"(c1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(e[0]), "+f"(e[1]), "+f"(e[2]), "+f"(e[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(f[0]), "+f"(f[1]), "+f"(f[2]), "+f"(f[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(c0), "r"(c1));
    }
    // C/D fragment: rows groupID (+8), cols 2*tig (+1).
    int g = lane / 4, t = lane % 4;
    d[g * 8 + 2 * t] = e[0];
    d[g * 8 + 2 * t + 1] = e[1];
    d[(g + 8) * 8 + 2 * t] = e[2];
    d[(g + 8) * 8 + 2 * t + 1] = e[3];
    d2[g * 8 + 2 * t] = f[0];
    d2[g * 8 + 2 * t + 1] = f[1];
    d2[(g + 8) * 8 + 2 * t] = f[2];
    d2[(g + 8) * 8 + 2 * t + 1] = f[3];
}

extern "C" __global__ void mma_bf16(const unsigned short* a, const unsigned short* bt,
                                    const unsigned short* bk, float* d, float* d2) {
    mma_tile<true>(a, bt, bk, d, d2);
}
extern "C" __global__ void mma_f16(const unsigned short* a, const unsigned short* bt,
                                   const unsigned short* bk, float* d, float* d2) {
    mma_tile<false>(a, bt, bk, d, d2);
}
