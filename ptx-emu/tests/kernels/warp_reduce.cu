// One sum per warp with __shfl_xor_sync (butterfly), plus a __shfl_down_sync max.
extern "C" __global__ void warp_reduce(const float* __restrict__ x, float* __restrict__ sums,
                                       float* __restrict__ maxs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[i];
    float s = v;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float m = v;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_down_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) {
        sums[i / 32] = s;
        maxs[i / 32] = m;
    }
}
