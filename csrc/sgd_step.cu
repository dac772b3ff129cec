// Fused multi-tensor SGD step (semantics: lowrank_kernels/ops/sgd_step.py).
//
// One block per row of the block table (tensor row, first element of its chunk); the tensor
// table holds, per tensor, int64 {param ptr, grad ptr, momentum-buffer ptr, numel, first-step}.
// All arithmetic is fp32 whatever the storage type. With kAligned (the launcher saw every pointer
// 16-byte aligned; chunk starts are multiples of the chunk, a multiple of 8 elements) a block
// moves 16 bytes per thread access, unrolled 4 deep; the last < 16 bytes of a tensor, and every
// element when some pointer is unaligned, take the scalar path. Both paths call step_element, so
// they round identically. Element indices are 64-bit: a tensor may exceed 2^31 elements. Launched by
// lowrank_kernels/kernels/cuda/sgd_step.py on PyTorch's current stream.
#include "dtype_convert.cuh"

enum SgdFlags {
    kHasMomentum = 1,
    kNesterov = 2,
    kMaximize = 4,
    kCoupledWeightDecay = 8,
    kDecoupledWeightDecay = 16,
    kAligned = 32,  // every param/grad/buffer pointer of the table is 16-byte aligned
};

// Per-step scalars, read once per block.
struct SgdScalars {
    float lr, inv_scale, weight_decay, decay, momentum, dampening_keep;
    bool scaled, has_momentum, nesterov, maximize, coupled, decoupled, first_step;
};

// The update of one element in fp32, shared by the vector and scalar paths so that both round
// identically. `buf` holds the stored momentum buffer on entry (unused on a first step) and the
// new one on return; the new parameter is returned.
__device__ __forceinline__ float step_element(const SgdScalars& s, float p, float g, float& buf) {
    if (s.scaled) g *= s.inv_scale;
    if (s.maximize) g = -g;
    if (s.coupled) g += s.weight_decay * p;
    if (s.has_momentum) {
        buf = s.first_step ? g : s.momentum * buf + s.dampening_keep * g;
        g = s.nesterov ? g + s.momentum * buf : buf;
    }
    if (s.decoupled) p *= s.decay;
    return p - s.lr * g;
}

// 16 bytes of storage <-> kLanes fp32 values, through the same to_float / from_float as the
// scalar path (bf16 round to nearest even, fp16 cvt.rn).
template <typename T>
struct Vector16 {
    static constexpr int kLanes = 16 / sizeof(T);
    static_assert(sizeof(T) == 4 || sizeof(T) == 2, "4- or 2-byte storage types only");

    __device__ __forceinline__ static void unpack(const uint4& v, float (&out)[kLanes]) {
        const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            if constexpr (sizeof(T) == 4) {
                out[w] = __uint_as_float(words[w]);
            } else {
                T lo, hi;
                lo.bits = static_cast<unsigned short>(words[w] & 0xffffu);
                hi.bits = static_cast<unsigned short>(words[w] >> 16);
                out[2 * w] = to_float(lo);
                out[2 * w + 1] = to_float(hi);
            }
        }
    }

    __device__ __forceinline__ static uint4 pack(const float (&in)[kLanes]) {
        unsigned int words[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            if constexpr (sizeof(T) == 4) {
                words[w] = __float_as_uint(in[w]);
            } else {
                words[w] = static_cast<unsigned int>(from_float<T>(in[2 * w]).bits)
                           | (static_cast<unsigned int>(from_float<T>(in[2 * w + 1]).bits) << 16);
            }
        }
        return make_uint4(words[0], words[1], words[2], words[3]);
    }
};

// 16-byte global accesses, written out in PTX: the pointers come from a table, and the compiler's
// address-space inference does not reach every copy of the loops it makes (some came out as
// generic ld.v4 / st.v4), so the vector path says ld.global.v4 / st.global.v4 itself.
__device__ __forceinline__ uint4 load_global16(const void* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(__cvta_generic_to_global(p)));
    return v;
}

__device__ __forceinline__ void store_global16(void* p, const uint4& v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :
                 : "l"(__cvta_generic_to_global(p)), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

template <int N>
__device__ __forceinline__ void zero(float (&x)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = 0.0f;
}

// 16-byte vectors per thread and stream in one iteration of the vector path: 4 x 16 bytes from
// each of param, grad (and buffer) in flight per thread before the first store.
constexpr int kUnroll = 4;

template <typename T>
__device__ __forceinline__ void sgd_step(
    const long long* __restrict__ tensors, const long long* __restrict__ blocks,
    float lr, const float* __restrict__ lr_ptr, const float* __restrict__ grad_scale_ptr,
    const float* __restrict__ found_inf_ptr, float weight_decay, float decay, float momentum,
    float dampening_keep, int flags, long long chunk) {
    // GradScaler found an inf/NaN: the whole step is skipped, decided here without a host sync.
    if (found_inf_ptr != nullptr && *found_inf_ptr != 0.0f) return;

    const long long block = blockIdx.x;
    const long long row = blocks[2 * block];
    const long long start = blocks[2 * block + 1];
    const long long* entry = tensors + 5 * row;
    T* __restrict__ param = reinterpret_cast<T*>(entry[0]);
    const T* __restrict__ grad = reinterpret_cast<const T*>(entry[1]);
    // Without momentum the buffer is never touched; it aliases param then so that it is still a
    // global address for the assumption below.
    T* __restrict__ buffer = reinterpret_cast<T*>((flags & kHasMomentum) ? entry[2] : entry[0]);
    // The table holds device addresses of global memory: saying so lets the compiler emit
    // ld.global / st.global (and their 128-bit forms) instead of generic accesses.
    __builtin_assume(__isGlobal(param));
    __builtin_assume(__isGlobal(grad));
    __builtin_assume(__isGlobal(buffer));
    const long long numel = entry[3];
    const long long end = start + chunk < numel ? start + chunk : numel;

    SgdScalars s;
    // decay = 1 - lr * wd and dampening_keep = 1 - dampening come from the host in double
    // precision, rounded once, as torch computes its scalar factors; a device lr needs both here.
    s.lr = lr;
    s.decay = decay;
    if (lr_ptr != nullptr) {
        s.lr = *lr_ptr;
        s.decay = 1.0f - s.lr * weight_decay;
    }
    s.scaled = grad_scale_ptr != nullptr;
    s.inv_scale = s.scaled ? 1.0f / *grad_scale_ptr : 1.0f;
    s.weight_decay = weight_decay;
    s.momentum = momentum;
    s.dampening_keep = dampening_keep;
    s.has_momentum = flags & kHasMomentum;
    s.nesterov = flags & kNesterov;
    s.maximize = flags & kMaximize;
    s.coupled = flags & kCoupledWeightDecay;
    s.decoupled = flags & kDecoupledWeightDecay;
    s.first_step = entry[4] != 0;
    // The buffer is read only when momentum is on and this is not its first step.
    const bool read_buffer = s.has_momentum && !s.first_step;

    long long scalar_from = start;
    if (flags & kAligned) {
        // Every pointer is 16-byte aligned and start is a multiple of the vector width (the
        // launcher's contract), so vector v of this chunk is 16 aligned bytes at start + v * kLanes.
        using V = Vector16<T>;
        constexpr int kLanes = V::kLanes;
        const long long vectors = (end - start) / kLanes;
        const uint4* p_vec = reinterpret_cast<const uint4*>(param + start);
        const uint4* g_vec = reinterpret_cast<const uint4*>(grad + start);
        const uint4* b_vec = reinterpret_cast<const uint4*>(buffer + start);
        uint4* p_out = reinterpret_cast<uint4*>(param + start);
        uint4* b_out = reinterpret_cast<uint4*>(buffer + start);
        const long long stride = blockDim.x;
        long long v = threadIdx.x;
        // Unrolled: vectors v, v + stride, ..., v + (kUnroll - 1) * stride, each one coalesced
        // across the warp; all loads are issued before the first store.
        for (; v + (kUnroll - 1) * stride < vectors; v += kUnroll * stride) {
            uint4 p_raw[kUnroll], g_raw[kUnroll], b_raw[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                p_raw[u] = load_global16(p_vec + v + u * stride);
                g_raw[u] = load_global16(g_vec + v + u * stride);
                if (read_buffer) b_raw[u] = load_global16(b_vec + v + u * stride);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                float p[kLanes], g[kLanes], b[kLanes];
                V::unpack(p_raw[u], p);
                V::unpack(g_raw[u], g);
                if (read_buffer) V::unpack(b_raw[u], b);
                else zero(b);
#pragma unroll
                for (int j = 0; j < kLanes; ++j) p[j] = step_element(s, p[j], g[j], b[j]);
                store_global16(p_out + v + u * stride, V::pack(p));
                if (s.has_momentum) store_global16(b_out + v + u * stride, V::pack(b));
            }
        }
        for (; v < vectors; v += stride) {  // the vectors left over from the unrolled tiles
            float p[kLanes], g[kLanes], b[kLanes];
            V::unpack(load_global16(p_vec + v), p);
            V::unpack(load_global16(g_vec + v), g);
            if (read_buffer) V::unpack(load_global16(b_vec + v), b);
            else zero(b);
#pragma unroll
            for (int j = 0; j < kLanes; ++j) p[j] = step_element(s, p[j], g[j], b[j]);
            store_global16(p_out + v, V::pack(p));
            if (s.has_momentum) store_global16(b_out + v, V::pack(b));
        }
        scalar_from = start + vectors * kLanes;
    }

    // Scalar path: the whole chunk when a pointer is not 16-byte aligned, else the tail of fewer
    // than one vector's elements at the end of a tensor.
    for (long long i = scalar_from + threadIdx.x; i < end; i += blockDim.x) {
        float b = read_buffer ? to_float(buffer[i]) : 0.0f;
        const float p = step_element(s, to_float(param[i]), to_float(grad[i]), b);
        if (s.has_momentum) buffer[i] = from_float<T>(b);
        param[i] = from_float<T>(p);
    }
}

#define DEFINE_SGD_STEP(SUFFIX, T)                                                              \
    extern "C" __global__ void sgd_step_##SUFFIX(                                               \
        const long long* tensors, const long long* blocks, float lr, const float* lr_ptr,      \
        const float* grad_scale_ptr, const float* found_inf_ptr, float weight_decay, float decay, \
        float momentum, float dampening_keep, int flags, long long chunk) {                    \
        sgd_step<T>(tensors, blocks, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, weight_decay,   \
                    decay, momentum, dampening_keep, flags, chunk);                             \
    }

DEFINE_SGD_STEP(f32, float)
DEFINE_SGD_STEP(bf16, bf16_t)
DEFINE_SGD_STEP(f16, f16_t)
