// Fused weight-decay shrink + rank-K update (semantics: lowrank_kernels/ops/decay_outer.py):
//
//     W <- decay * W + alpha * D^T F        W (m, n), D (K, m), F (K, n), row-major, contiguous
//
// One thread block of 256 threads per 128 x 128 tile of W (a 1-D grid, row bands outermost so
// consecutive blocks reuse the same columns of D from L2). The tile of D^T F is accumulated in
// fp32 registers over K in chunks staged through shared memory (double-buffered: the next chunk
// is fetched into registers while the current one is multiplied); then the W tile is read once
// and written once. Nothing outside the matrices is read or written: out-of-range rows, columns
// and K are zero-filled on load and masked on store, so any m, n, K >= 0 works.
//
//   decay_outer_f32   fp32 FMA on the CUDA cores (IEEE fp32, like torch.addmm_ with TF32 off):
//                     8 x 8 outputs per thread, K chunks of 8.
//   decay_outer_bf16  tensor cores, mma.sync m16n8k16 (bf16 in, fp32 accumulate) with operands
//                     loaded by ldmatrix.trans, K chunks of 32; the W tile goes through shared
//                     memory in the epilogue so that global reads and writes are 16-byte
//                     coalesced. GPUs before sm_80 (no bf16 mma) get the fp32 FMA path instead.
//
// Arguments: k = 0 skips the product (the launcher passes it for alpha = 0, so D and F are not
// read, like BLAS). flags: kVectorized when every row start is 16-byte aligned (m and n multiples
// of 16 bytes, aligned base pointers), kReadW unless decay = 0 (then W is not read, so NaN/Inf in
// W do not propagate, like torch.addmm_ with beta = 0). Launched by
// lowrank_kernels/kernels/cuda/decay_outer.py on PyTorch's current stream.
#include "dtype_convert.cuh"

enum DecayOuterFlags {
    kVectorized = 1,
    kReadW = 2,
};

constexpr int kThreads = 256;
constexpr int kTileM = 128;
constexpr int kTileN = 128;

struct alignas(16) f32x4 { float x, y, z, w; };
struct alignas(16) u32x4 { unsigned int x, y, z, w; };

// ---------------------------------------------------------------------------------------------
// Loads and stores of 4 consecutive elements of a row, zero / skipped outside the matrix.
// ---------------------------------------------------------------------------------------------
template <typename T, bool kVector>
__device__ __forceinline__ void load4(const T* __restrict__ src, long long rows, long long cols,
                                      long long row, long long col, float (&v)[4]) {
    if constexpr (kVector) {  // float only: 4 | cols, so the 4 are all inside or all outside
        if (row < rows && col < cols) {
            const f32x4 x = *reinterpret_cast<const f32x4*>(src + row * cols + col);
            v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
        } else {
            v[0] = v[1] = v[2] = v[3] = 0.0f;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
            v[i] = (row < rows && col + i < cols) ? to_float(src[row * cols + col + i]) : 0.0f;
    }
}

template <typename T, bool kVector>
__device__ __forceinline__ void store4(T* __restrict__ dst, long long rows, long long cols,
                                       long long row, long long col, const float (&v)[4]) {
    if (row >= rows) return;
    if constexpr (kVector) {
        if (col < cols) {
            f32x4 x;
            x.x = v[0]; x.y = v[1]; x.z = v[2]; x.w = v[3];
            *reinterpret_cast<f32x4*>(dst + row * cols + col) = x;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (col + i < cols) dst[row * cols + col + i] = from_float<T>(v[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA-core path: 16 x 16 threads, each owning rows {ty*4 + i, 64 + ty*4 + i} and columns
// {tx*4 + j, 64 + tx*4 + j} of the tile (i, j < 4), so a warp's W accesses cover two rows of
// 256 contiguous bytes (fp32) and its shared-memory reads are broadcasts or contiguous.
// ---------------------------------------------------------------------------------------------
constexpr int kSimtTileK = 8;

struct SimtShared {
    alignas(16) float d[2][kSimtTileK][kTileM];  // D chunk: rows k, columns m (= D^T, k-major)
    alignas(16) float f[2][kSimtTileK][kTileN];
};

__device__ __forceinline__ void store_shared4(float* dst, const float (&v)[4]) {
    f32x4 x;
    x.x = v[0]; x.y = v[1]; x.z = v[2]; x.w = v[3];
    *reinterpret_cast<f32x4*>(dst) = x;
}

template <typename T, bool kVector>
__device__ __forceinline__ void decay_outer_simt(
    T* __restrict__ W, const T* __restrict__ D, const T* __restrict__ F, long long m, long long n,
    long long k, float decay, float alpha, bool read_w, SimtShared& sh) {
    const int tid = threadIdx.x;
    const long long tiles_n = (n + kTileN - 1) / kTileN;
    const long long m0 = static_cast<long long>(blockIdx.x) / tiles_n * kTileM;
    const long long n0 = static_cast<long long>(blockIdx.x) % tiles_n * kTileN;
    const int load_k = tid / 32;          // chunk row this thread fetches
    const int load_x = (tid % 32) * 4;    // first of its 4 columns
    const int tx = tid % 16;
    const int ty = tid / 16;

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    const long long k_chunks = (k + kSimtTileK - 1) / kSimtTileK;
    float d_next[4], f_next[4];
    if (k_chunks > 0) {
        load4<T, kVector>(D, k, m, load_k, m0 + load_x, d_next);
        load4<T, kVector>(F, k, n, load_k, n0 + load_x, f_next);
        store_shared4(&sh.d[0][load_k][load_x], d_next);
        store_shared4(&sh.f[0][load_k][load_x], f_next);
    }
    __syncthreads();

    for (long long chunk = 0; chunk < k_chunks; ++chunk) {
        const int buf = static_cast<int>(chunk & 1);
        const bool has_next = chunk + 1 < k_chunks;
        if (has_next) {
            const long long row = (chunk + 1) * kSimtTileK + load_k;
            load4<T, kVector>(D, k, m, row, m0 + load_x, d_next);
            load4<T, kVector>(F, k, n, row, n0 + load_x, f_next);
        }
#pragma unroll
        for (int kk = 0; kk < kSimtTileK; ++kk) {
            const f32x4 a0 = *reinterpret_cast<const f32x4*>(&sh.d[buf][kk][ty * 4]);
            const f32x4 a1 = *reinterpret_cast<const f32x4*>(&sh.d[buf][kk][64 + ty * 4]);
            const f32x4 b0 = *reinterpret_cast<const f32x4*>(&sh.f[buf][kk][tx * 4]);
            const f32x4 b1 = *reinterpret_cast<const f32x4*>(&sh.f[buf][kk][64 + tx * 4]);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (has_next) {
            // The other buffer was last read in the previous chunk, before its closing barrier.
            store_shared4(&sh.d[buf ^ 1][load_k][load_x], d_next);
            store_shared4(&sh.f[buf ^ 1][load_k][load_x], f_next);
        }
        __syncthreads();
    }

    // Epilogue, by half tiles of 4 rows: all 8 reads of W are issued before the first write, so
    // enough bytes are in flight to keep memory busy.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float w[4][2][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const long long row = m0 + half * 64 + ty * 4 + i;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (read_w) {
                    load4<T, kVector>(W, m, n, row, n0 + h * 64 + tx * 4, w[i][h]);
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j) w[i][h][j] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const long long row = m0 + half * 64 + ty * 4 + i;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float out[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float product = alpha * acc[half * 4 + i][h * 4 + j];
                    out[j] = read_w ? fmaf(decay, w[i][h][j], product) : product;
                }
                store4<T, kVector>(W, m, n, row, n0 + h * 64 + tx * 4, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path (bf16, sm_80+). 8 warps as 2 (m) x 4 (n), each warp owning 64 x 32 outputs:
// 4 x 4 mma tiles of 16 x 8. Both operands sit in shared memory k-major (rows of D and F, as in
// global memory); ldmatrix.trans turns 8 x 8 blocks of them into the row-major A (= D^T) and
// column-major B (= F) fragments that mma.sync m16n8k16 takes. Rows are padded from 128 to 136
// elements (272 bytes) so the 8 rows of one ldmatrix block fall in distinct bank groups.
// ---------------------------------------------------------------------------------------------
constexpr int kMmaTileK = 32;
constexpr int kSmemStride = kTileM + 8;                        // elements per shared-memory row
constexpr int kOperandElems = kMmaTileK * kSmemStride;         // one operand chunk
constexpr int kMmaSmemElems = 4 * kOperandElems;               // 2 stages x (D, F)
static_assert(kMmaSmemElems >= kTileM * kSmemStride, "the W tile reuses the operand buffers");
static_assert(kTileM == kTileN, "one padded row stride serves D, F and W");

struct MmaShared {
    alignas(16) unsigned short e[kMmaSmemElems];
};

__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(p));
    return address;
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

__device__ __forceinline__ void mma_bf16_16x8x16(float (&c)[4], const unsigned (&a)[4],
                                                 unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 8 consecutive bf16 of a row (as 16 raw bytes), zero outside the matrix.
__device__ __forceinline__ u32x4 load8_bf16(const bf16_t* __restrict__ src, long long rows,
                                            long long cols, long long row, long long col,
                                            bool vectorized) {
    u32x4 v;
    v.x = v.y = v.z = v.w = 0u;
    if (row >= rows) return v;
    const bf16_t* p = src + row * cols + col;
    if (vectorized) {  // 8 | cols: all 8 inside or all outside
        if (col < cols) v = *reinterpret_cast<const u32x4*>(p);
    } else {
        unsigned int e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = col + i < cols ? p[i].bits : 0u;
        v.x = e[0] | (e[1] << 16);
        v.y = e[2] | (e[3] << 16);
        v.z = e[4] | (e[5] << 16);
        v.w = e[6] | (e[7] << 16);
    }
    return v;
}

// A 16-byte global store written out in PTX: as a plain C++ store of the 16-byte struct the
// compiler split it into four 32-bit st.global (NVRTC 13.5, sm_80 and sm_90a).
__device__ __forceinline__ void store_global16(void* p, const u32x4& v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :
                 : "l"(__cvta_generic_to_global(p)), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ void store8_bf16(bf16_t* __restrict__ dst, long long rows,
                                            long long cols, long long row, long long col,
                                            u32x4 v, bool vectorized) {
    if (row >= rows) return;
    bf16_t* p = dst + row * cols + col;
    if (vectorized) {
        if (col < cols) store_global16(p, v);
    } else {
        const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (col + i < cols)
                p[i].bits = static_cast<unsigned short>(words[i / 2] >> (16 * (i % 2)));
    }
}

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return static_cast<unsigned>(from_float<bf16_t>(lo).bits)
           | (static_cast<unsigned>(from_float<bf16_t>(hi).bits) << 16);
}

__device__ __forceinline__ void decay_outer_mma_bf16(
    bf16_t* __restrict__ W, const bf16_t* __restrict__ D, const bf16_t* __restrict__ F,
    long long m, long long n, long long k, float decay, float alpha, bool read_w,
    bool vectorized, MmaShared& sh) {
    const int tid = threadIdx.x;
    const int lane = tid % 32;
    const int warp = tid / 32;
    const int warp_m = warp / 4;  // rows warp_m * 64 of the tile
    const int warp_n = warp % 4;  // columns warp_n * 32
    const long long tiles_n = (n + kTileN - 1) / kTileN;
    const long long m0 = static_cast<long long>(blockIdx.x) / tiles_n * kTileM;
    const long long n0 = static_cast<long long>(blockIdx.x) % tiles_n * kTileN;

    // Global -> shared: a chunk of 32 rows x 128 columns is 512 pieces of 8 elements per
    // operand, two per thread; a quarter warp stores one contiguous 128-byte row segment.
    int piece_k[2], piece_x[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
        const int piece = tid + p * kThreads;
        piece_k[p] = piece / 16;
        piece_x[p] = (piece % 16) * 8;
    }

    // ldmatrix.x4: lanes 8q..8q+7 give the row addresses of 8 x 8 block q; block q lands in
    // register q. A blocks (m, k) offsets: (0,0) (8,0) (0,8) (8,8) -> a0a1, a2a3, a4a5, a6a7.
    // B blocks (k, n) offsets: (0,0) (8,0) (0,8) (8,8) -> b0b1, b2b3 of two n8 tiles.
    const int block_q = lane / 8;
    const int block_row = lane % 8;
    const int a_lane = ((block_q / 2) * 8 + block_row) * kSmemStride + (block_q % 2) * 8
                       + warp_m * 64;
    const int b_lane = ((block_q % 2) * 8 + block_row) * kSmemStride + (block_q / 2) * 8
                       + warp_n * 32;
    const unsigned smem_base = shared_address(sh.e);

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    const long long k_chunks = (k + kMmaTileK - 1) / kMmaTileK;
    u32x4 d_next[2], f_next[2];
    if (k_chunks > 0) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            d_next[p] = load8_bf16(D, k, m, piece_k[p], m0 + piece_x[p], vectorized);
            f_next[p] = load8_bf16(F, k, n, piece_k[p], n0 + piece_x[p], vectorized);
            const int at = piece_k[p] * kSmemStride + piece_x[p];
            *reinterpret_cast<u32x4*>(&sh.e[at]) = d_next[p];
            *reinterpret_cast<u32x4*>(&sh.e[kOperandElems + at]) = f_next[p];
        }
    }
    __syncthreads();

    for (long long chunk = 0; chunk < k_chunks; ++chunk) {
        const int stage = static_cast<int>(chunk & 1);
        const bool has_next = chunk + 1 < k_chunks;
        if (has_next) {
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                const long long row = (chunk + 1) * kMmaTileK + piece_k[p];
                d_next[p] = load8_bf16(D, k, m, row, m0 + piece_x[p], vectorized);
                f_next[p] = load8_bf16(F, k, n, row, n0 + piece_x[p], vectorized);
            }
        }
        const unsigned d_chunk = smem_base + 2u * (2 * stage) * kOperandElems;
        const unsigned f_chunk = d_chunk + 2u * kOperandElems;
#pragma unroll
        for (int ks = 0; ks < kMmaTileK; ks += 16) {
            unsigned b[4][2];
#pragma unroll
            for (int pair = 0; pair < 2; ++pair) {
                unsigned r[4];
                ldmatrix_x4_trans(r, f_chunk + 2u * (b_lane + ks * kSmemStride + pair * 16));
                b[2 * pair][0] = r[0];
                b[2 * pair][1] = r[1];
                b[2 * pair + 1][0] = r[2];
                b[2 * pair + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                unsigned a[4];
                ldmatrix_x4_trans(a, d_chunk + 2u * (a_lane + ks * kSmemStride + i * 16));
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16x8x16(acc[i][j], a, b[j][0], b[j][1]);
            }
        }
        if (has_next) {
            // The other stage was last read in the previous chunk, before its closing barrier.
            const int next = 2 * (stage ^ 1) * kOperandElems;
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                const int at = next + piece_k[p] * kSmemStride + piece_x[p];
                *reinterpret_cast<u32x4*>(&sh.e[at]) = d_next[p];
                *reinterpret_cast<u32x4*>(&sh.e[kOperandElems + at]) = f_next[p];
            }
        }
        __syncthreads();
    }

    // Epilogue through shared memory (the operand buffers are free now): coalesced 16-byte reads
    // of the W tile, the update in the mma accumulator layout (thread g = lane / 4,
    // t = lane % 4 holds rows g and g + 8, columns 2t and 2t + 1 of each 16 x 8 tile), then
    // coalesced 16-byte writes. Each element is owned by one thread between the barriers.
    constexpr int kWPieces = kTileM * kTileN / 8 / kThreads;  // 8
    constexpr int kWBatch = 4;  // reads in flight per thread, bounded by the registers left
    if (read_w) {
#pragma unroll
        for (int p0 = 0; p0 < kWPieces; p0 += kWBatch) {
            u32x4 w[kWBatch];
#pragma unroll
            for (int p = 0; p < kWBatch; ++p) {
                const int piece = tid + (p0 + p) * kThreads;
                w[p] = load8_bf16(W, m, n, m0 + piece / 16, n0 + (piece % 16) * 8, vectorized);
            }
#pragma unroll
            for (int p = 0; p < kWBatch; ++p) {
                const int piece = tid + (p0 + p) * kThreads;
                *reinterpret_cast<u32x4*>(&sh.e[(piece / 16) * kSmemStride + (piece % 16) * 8]) =
                    w[p];
            }
        }
        __syncthreads();
    }
    const int g = lane / 4;
    const int t = lane % 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = warp_m * 64 + i * 16 + h * 8 + g;
                const int col = warp_n * 32 + j * 8 + 2 * t;
                unsigned* word = reinterpret_cast<unsigned*>(&sh.e[row * kSmemStride + col]);
                float lo = alpha * acc[i][j][2 * h];
                float hi = alpha * acc[i][j][2 * h + 1];
                if (read_w) {
                    const unsigned old = *word;
                    lo = fmaf(decay, __uint_as_float(old << 16), lo);
                    hi = fmaf(decay, __uint_as_float(old & 0xffff0000u), hi);
                }
                *word = pack_bf16x2(lo, hi);
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < kWPieces; ++p) {
        const int piece = tid + p * kThreads;
        const u32x4 v =
            *reinterpret_cast<const u32x4*>(&sh.e[(piece / 16) * kSmemStride + (piece % 16) * 8]);
        store8_bf16(W, m, n, m0 + piece / 16, n0 + (piece % 16) * 8, v, vectorized);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: grid = ceil(m / 128) * ceil(n / 128) blocks of 256 threads, no dynamic shared
// memory.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(kThreads, 2)
decay_outer_f32(float* W, const float* D, const float* F, long long m, long long n, long long k,
                float decay, float alpha, int flags) {
    __shared__ SimtShared sh;
    const bool read_w = flags & kReadW;
    if (flags & kVectorized)
        decay_outer_simt<float, true>(W, D, F, m, n, k, decay, alpha, read_w, sh);
    else
        decay_outer_simt<float, false>(W, D, F, m, n, k, decay, alpha, read_w, sh);
}

extern "C" __global__ void __launch_bounds__(kThreads, 2)
decay_outer_bf16(bf16_t* W, const bf16_t* D, const bf16_t* F, long long m, long long n,
                 long long k, float decay, float alpha, int flags) {
    const bool read_w = flags & kReadW;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    __shared__ MmaShared sh;
    decay_outer_mma_bf16(W, D, F, m, n, k, decay, alpha, read_w, flags & kVectorized, sh);
#else
    __shared__ SimtShared sh;
    decay_outer_simt<bf16_t, false>(W, D, F, m, n, k, decay, alpha, read_w, sh);
#endif
}
