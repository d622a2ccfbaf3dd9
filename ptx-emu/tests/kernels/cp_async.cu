// Double-buffered copy through shared memory with cp.async: each block of 128 threads moves
// `tiles` tiles of 128 float4 (2 KiB) from src to dst, prefetching tile t+1 while tile t is
// consumed; the last tile's tail is zero-filled with the src-size form and dst gets x*2+1.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, unsigned src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

extern "C" __global__ void cp_async_copy(const float4* __restrict__ src, float4* __restrict__ dst,
                                         int tiles, int valid_last) {
    __shared__ __align__(16) float4 buf[2][128];
    const float4* s = src + (size_t)blockIdx.x * tiles * 128;
    float4* d = dst + (size_t)blockIdx.x * tiles * 128;
    int t = threadIdx.x;
    cp_async16(&buf[0][t], &s[t], (tiles == 1 && t >= valid_last) ? 0u : 16u);
    asm volatile("cp.async.commit_group;\n" ::);
    for (int k = 0; k < tiles; ++k) {
        if (k + 1 < tiles) {
            unsigned bytes = (k + 2 == tiles && t >= valid_last) ? 0u : 16u;
            cp_async16(&buf[(k + 1) & 1][t], &s[(k + 1) * 128 + t], bytes);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
        float4 v = buf[k & 1][(t + 1) % 128];
        d[k * 128 + (t + 1) % 128] = make_float4(v.x * 2.f + 1.f, v.y * 2.f + 1.f, v.z * 2.f + 1.f, v.w * 2.f + 1.f);
        __syncthreads();
    }
}

// Reads a cp.async destination before waiting for its group: the sanitizer must report it.
extern "C" __global__ void cp_async_early_read(const float* __restrict__ src, float* __restrict__ dst) {
    __shared__ __align__(16) float buf[32];
    int t = threadIdx.x;
    cp_async4(&buf[t], &src[t]);
    asm volatile("cp.async.commit_group;\n" ::);
    float early = buf[t];
    asm volatile("cp.async.wait_group 0;\n" ::);
    dst[t] = early + buf[t];
}
