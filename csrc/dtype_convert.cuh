// Storage types and fp32 conversions for the kernels in csrc/.
//
// No CUDA or torch headers: the kernels compile under NVRTC (kernels/cuda/compile.py, which
// inlines this file into each kernel's source) and plain nvcc alike, on any architecture.
// bf16 and fp16 are carried as 16-bit patterns and converted by hand
// (bf16: round to nearest even, NaN kept quiet) or with the PTX cvt instruction (fp16).
#pragma once

struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(bf16_t x) {
    return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}

__device__ __forceinline__ float to_float(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_float(float x);

template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    unsigned int u = __float_as_uint(x);
    bf16_t out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep sign, force a quiet NaN
        out.bits = static_cast<unsigned short>((u >> 16) | 0x0040u);
        return out;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out.bits = static_cast<unsigned short>(u >> 16);
    return out;
}

template <> __device__ __forceinline__ f16_t from_float<f16_t>(float x) {
    f16_t out;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(x));
    return out;
}
