// 32x32 tile transpose through shared memory, 32x8 threads per block; the racy variant
// forgets the __syncthreads() between the shared writes and reads.
template <bool SYNC>
__device__ void transpose_tile(const float* __restrict__ in, float* __restrict__ out, int n) {
    __shared__ float tile[32][33];
    int bx = blockIdx.x * 32, by = blockIdx.y * 32;
    for (int j = threadIdx.y; j < 32; j += 8)
        tile[j][threadIdx.x] = in[(by + j) * n + bx + threadIdx.x];
    if (SYNC) __syncthreads();
    for (int j = threadIdx.y; j < 32; j += 8)
        out[(bx + j) * n + by + threadIdx.x] = tile[threadIdx.x][j];
}
extern "C" __global__ void transpose(const float* in, float* out, int n) { transpose_tile<true>(in, out, n); }
extern "C" __global__ void transpose_racy(const float* in, float* out, int n) { transpose_tile<false>(in, out, n); }
