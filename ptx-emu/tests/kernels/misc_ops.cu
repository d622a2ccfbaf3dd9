// A mix of what CUDA C++ code typically compiles to: libdevice math (expf, logf, tanhf,
// rsqrtf), fast intrinsics, f16/bf16 conversions and packed arithmetic, integer division,
// bit intrinsics, a dynamically indexed local array, float/int atomics, shuffles and votes,
// and a __constant__ table.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

constexpr int NOUT = 24;
__constant__ float ctab[4] = {0.5f, 1.5f, 2.5f, 3.5f};

extern "C" __global__ void misc_ops(const float* __restrict__ xs, const float* __restrict__ ys,
                                    float* __restrict__ out, unsigned* __restrict__ counters,
                                    float* __restrict__ fsum, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = xs[i], y = ys[i];
    float* o = out + (size_t)i * NOUT;
    o[0] = expf(x);
    o[1] = x / y;
    o[2] = sqrtf(fabsf(x));
    o[3] = rsqrtf(fabsf(x) + 1.f);
    o[4] = __bfloat162float(__float2bfloat16(x));
    o[5] = __half2float(__float2half(x));
    __half2 h = __hfma2(__floats2half2_rn(x, y), __floats2half2_rn(y, x), __floats2half2_rn(1.f, 1.f));
    o[6] = __low2float(h);
    o[7] = __high2float(h);
    __nv_bfloat162 b = __hmul2(__floats2bfloat162_rn(x, y), __floats2bfloat162_rn(y, 2.f));
    o[8] = __low2float(b);
    o[9] = __high2float(b);
    int k = i * 31 - 200;
    o[10] = (float)(k / (i % 5 + 1));
    o[11] = (float)(k % 7);
    float arr[8];
#pragma unroll 1
    for (int j = 0; j < 8; ++j) arr[j] = x * j + y;
    o[12] = arr[(i * 3 + (int)(y > 0.f)) & 7];
    o[13] = tanhf(x);
    o[14] = __expf(x);
    o[15] = logf(fabsf(x) + 0.5f);
    o[16] = (float)__float2int_rn(x * 3.f) + truncf(y * 3.f) * 100.f;
    unsigned u = (unsigned)i * 2654435761u;
    o[17] = (float)(__popc(u) + 100 * __clz(u | 1));
    o[18] = __uint_as_float((__brev(u) & 0x007fffffu) | 0x3f800000u);
    o[19] = __uint_as_float((__byte_perm(u, ~u, 0x5410) & 0x007fffffu) | 0x3f800000u);
    o[20] = __shfl_sync(0xffffffffu, x, (threadIdx.x + 5) & 31);
    unsigned ballot = __ballot_sync(0xffffffffu, x > 0.f);
    o[21] = (float)__popc(ballot) + (__any_sync(0xffffffffu, y > 0.9f) ? 1000.f : 0.f);
    o[22] = fminf(x, __int_as_float(0x7fc00000)) + fmaxf(y, x);
    o[23] = (float)atomicAdd(&counters[0], 1u) * 0.f + (float)(atomicMax((int*)&counters[1], i) * 0) + ctab[i & 3];
    atomicAdd(fsum, 1.0f);
}
