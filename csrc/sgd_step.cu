// Fused multi-tensor SGD step (semantics: lowrank_kernels/ops/sgd_step.py).
//
// One block per row of the block table (tensor row, first element of its chunk); the tensor
// table holds, per tensor, int64 {param ptr, grad ptr, momentum-buffer ptr, numel, first-step}.
// All arithmetic is fp32 whatever the storage type. Launched by
// lowrank_kernels/kernels/cuda/sgd_step.py on PyTorch's current stream.
#include "dtype_convert.cuh"

enum SgdFlags {
    kHasMomentum = 1,
    kNesterov = 2,
    kMaximize = 4,
    kCoupledWeightDecay = 8,
    kDecoupledWeightDecay = 16,
};

template <typename T>
__device__ __forceinline__ void sgd_step(
    const long long* __restrict__ tensors, const long long* __restrict__ blocks,
    float lr, const float* __restrict__ lr_ptr, const float* __restrict__ grad_scale_ptr,
    const float* __restrict__ found_inf_ptr, float weight_decay, float decay, float momentum,
    float dampening_keep, int flags, long long chunk) {
    // GradScaler found an inf/NaN: the whole step is skipped, decided here without a host sync.
    if (found_inf_ptr != nullptr && *found_inf_ptr != 0.0f) return;

    const long long row = blocks[2 * blockIdx.x];
    const long long start = blocks[2 * blockIdx.x + 1];
    const long long* entry = tensors + 5 * row;
    T* __restrict__ param = reinterpret_cast<T*>(entry[0]);
    const T* __restrict__ grad = reinterpret_cast<const T*>(entry[1]);
    T* __restrict__ buffer = reinterpret_cast<T*>(entry[2]);
    const long long numel = entry[3];
    const bool first_step = entry[4] != 0;
    const long long end = start + chunk < numel ? start + chunk : numel;

    // decay = 1 - lr * wd and dampening_keep = 1 - dampening come from the host in double
    // precision, rounded once, as torch computes its scalar factors; a device lr needs both here.
    if (lr_ptr != nullptr) {
        lr = *lr_ptr;
        decay = 1.0f - lr * weight_decay;
    }
    const float inv_scale = grad_scale_ptr != nullptr ? 1.0f / *grad_scale_ptr : 1.0f;
    const bool has_momentum = flags & kHasMomentum;
    const bool nesterov = flags & kNesterov;
    const bool maximize = flags & kMaximize;
    const bool coupled = flags & kCoupledWeightDecay;
    const bool decoupled = flags & kDecoupledWeightDecay;

    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float p = to_float(param[i]);
        float g = to_float(grad[i]);
        if (grad_scale_ptr != nullptr) g *= inv_scale;
        if (maximize) g = -g;
        if (coupled) g += weight_decay * p;
        if (has_momentum) {
            const float buf = first_step ? g : momentum * to_float(buffer[i]) + dampening_keep * g;
            buffer[i] = from_float<T>(buf);
            g = nesterov ? g + momentum * buf : buf;
        }
        if (decoupled) p *= decay;
        param[i] = from_float<T>(p - lr * g);
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
