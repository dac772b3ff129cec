// Batched symmetric eigensolver: parallel two-sided Jacobi, one thread block per matrix
// (semantics: lowrank_kernels/ops/symmetric_eig.py; launcher: kernels/cuda/symmetric_eig.py).
//
// Inputs: a (b, n, n) contiguous, only the lower triangle read (like torch.linalg.eigh), already
// scaled by the op so its largest entry is about 1. Outputs: w (b, n) eigenvalues, unsorted (the
// op sorts), and vt (b, n, n) = V^T, row k the eigenvector of w[k].
//
// The matrix is padded to an even order N (one zero row/column when n is odd). Round r of a sweep
// applies the K = N/2 disjoint rotations of the round-robin ("tournament") pairing, all at once:
// pair 0 is (r, N-1), pair k >= 1 is {(r+k) mod (N-1), (r-k) mod (N-1)}; after the N-1 rounds of a
// sweep every index pair has met once. A padded index has a zero row and column, so a rotation
// with it has a_pq = 0 and is the identity: the padding never mixes with the n x n block.
//
// Memory: A (N x N, exactly symmetric, in T) lives in dynamic shared memory with the round's
// rotations, its rows padded to N + 1 entries (no bank conflicts down a column); V^T lives in
// global memory (the output vt itself), where each thread only touches the two entries of its own
// (pair, column) task in a round. Shared bytes (see the launcher):
//     N*(N+1)*sizeof(T) + (3*K + 32)*sizeof(T) + 2*K*sizeof(int)
// 65.9 KiB for float, n = 128; 131.3 KiB for double, n = 128: above 48 KiB the launch raises the
// kernel's max_dynamic_shared_size_bytes. Indices within a matrix are int (n <= 256 fits any
// shared memory); the matrix offset, matrix * n * n, is 64-bit, so batches beyond 2^31 elements
// are addressed correctly.
//
// A round is two phases separated by __syncthreads:
//   1. threads k < K: pair (p, q) of the round, rotation (c, s) from a_pp, a_qq, a_pq (computed in
//      double whatever T: IEEE division and sqrt, K values a round), into shared arrays;
//   2. A <- J^T A J by 2x2 blocks: task (k, l), k <= l, reads the block rows {p_k, q_k} x columns
//      {p_l, q_l} and writes it and its mirror (l, k) (k == l: the pair's exact diagonal update,
//      a_pq = 0). Blocks are disjoint, so no two threads touch the same entry and A stays exactly
//      symmetric. V <- V J: task (l, i) rotates V^T rows p_l, q_l at column i.
// Sweeps stop when off(A) <= tol * ||A||_F (checked before each sweep) or after max_sweeps.
// No CUDA or torch headers: compiles under NVRTC (kernels/cuda/compile.py) and nvcc alike.

#define EIG_MAX_THREADS 512

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    return value;
}

// Sum of `value` over the block, returned to every thread (all threads sum the per-warp partials in
// the same order, so they all get the same bits). Needs blockDim.x a multiple of 32, at most 1024;
// `scratch` holds 32 values. Starts and ends with the block synchronized.
template <typename T>
__device__ T block_sum(T value, T* scratch) {
    value = warp_sum(value);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    T total = T(0);
    const int warps = blockDim.x >> 5;
    for (int i = 0; i < warps; ++i) total += scratch[i];
    __syncthreads();  // scratch may be rewritten right after
    return total;
}

// Round r, pair k of N = m + 1 indices (m odd): (p, q) with p < q.
__device__ __forceinline__ void round_pair(int k, int r, int m, int& p, int& q) {
    if (k == 0) {
        p = r;
        q = m;
    } else {
        const int a = (r + k) % m;
        const int b = (r - k + m) % m;  // 1 <= k < (m + 1) / 2 <= m: non-negative, a != b
        p = a < b ? a : b;
        q = a < b ? b : a;
    }
}

template <typename T>
__device__ __forceinline__ void symmetric_eig(const T* __restrict__ a, T* __restrict__ w,
                                              T* __restrict__ vt, int n, int max_sweeps, T tol) {
    extern __shared__ __align__(16) unsigned char eig_smem[];
    const int N = n + (n & 1);
    const int K = N / 2;
    const int m = N - 1;
    // Row stride of A in shared memory. Phase 2a writes the mirror blocks down columns; with a
    // stride of N, a multiple of 32 for the common Gram sizes (64, 128, ...), every lane of a warp
    // would hit the same bank. N is even, so N + 1 is odd: consecutive rows fall in distinct banks
    // (4-byte words for float; for double an odd stride of 8-byte words is conflict-free too).
    const int LD = N + 1;
    const int tid = threadIdx.x;
    const int threads = blockDim.x;

    const long long matrix = blockIdx.x;
    a += matrix * n * n;
    w += matrix * n;
    vt += matrix * n * n;

    T* A = reinterpret_cast<T*>(eig_smem);  // N x N, row stride LD
    T* rot_c = A + N * LD;                  // K: the round's cosines
    T* rot_s = rot_c + K;                   // K: sines
    T* rot_d = rot_s + K;                   // K: t * a_pq, the diagonal shift
    T* red = rot_d + K;                     // 32: block reductions
    int* pair_p = reinterpret_cast<int*>(red + 32);  // K
    int* pair_q = pair_p + K;                        // K

    // A from its lower triangle, mirrored, zero padded; V^T = I; ||A||_F^2 and off(A)^2.
    T fro_part = T(0);
    T off_part = T(0);
    for (int idx = tid; idx < N * N; idx += threads) {
        const int i = idx / N;
        const int j = idx - i * N;
        T x = T(0);
        if (i < n && j < n) x = i >= j ? a[i * n + j] : a[j * n + i];
        A[i * LD + j] = x;
        fro_part += x * x;
        if (i != j) off_part += x * x;
    }
    for (int idx = tid; idx < n * n; idx += threads) {
        const int i = idx / n;
        vt[idx] = idx == i * n + i ? T(1) : T(0);
    }
    const T fro = block_sum(fro_part, red);  // also orders the writes above before any read below
    T off = block_sum(off_part, red);
    const T threshold = tol * tol * fro;

    for (int sweep = 0; sweep < max_sweeps && off > threshold; ++sweep) {
        for (int r = 0; r < m; ++r) {
            // Phase 1: the round's rotations. [[c, s], [-s, c]] diagonalizes
            // [[app, apq], [apq, aqq]] (Golub & Van Loan's symmetric Schur 2x2). |apq| <= 1e-150 is
            // taken as zero (identity, the entry is then cleared): the op scales A to entries <= 1,
            // so |aqq - app| <= 2n and tau^2 cannot overflow.
            for (int k = tid; k < K; k += threads) {
                int p, q;
                round_pair(k, r, m, p, q);
                const double app = A[p * LD + p];
                const double aqq = A[q * LD + q];
                const double apq = A[p * LD + q];
                double t = 0.0;
                if (fabs(apq) > 1e-150) {
                    const double tau = (aqq - app) / (2.0 * apq);
                    t = 1.0 / (fabs(tau) + sqrt(1.0 + tau * tau));
                    if (tau < 0.0) t = -t;
                }
                const double c = 1.0 / sqrt(1.0 + t * t);
                pair_p[k] = p;
                pair_q[k] = q;
                rot_c[k] = static_cast<T>(c);
                rot_s[k] = static_cast<T>(t * c);
                rot_d[k] = static_cast<T>(t * apq);
            }
            __syncthreads();

            // Phase 2a: A <- J^T A J, one 2x2 block (and its mirror) per task.
            for (int task = tid; task < K * K; task += threads) {
                const int k = task / K;
                const int l = task - k * K;
                if (k > l) continue;  // the mirror of task (l, k)
                const int pk = pair_p[k], qk = pair_q[k];
                if (k == l) {
                    const T d = rot_d[k];
                    A[pk * LD + pk] -= d;
                    A[qk * LD + qk] += d;
                    A[pk * LD + qk] = T(0);
                    A[qk * LD + pk] = T(0);
                    continue;
                }
                const int pl = pair_p[l], ql = pair_q[l];
                const T ck = rot_c[k], sk = rot_s[k];
                const T cl = rot_c[l], sl = rot_s[l];
                const T x = A[pk * LD + pl];
                const T y = A[pk * LD + ql];
                const T z = A[qk * LD + pl];
                const T u = A[qk * LD + ql];
                // columns: col p <- c col p - s col q, col q <- s col p + c col q
                const T x1 = cl * x - sl * y;
                const T y1 = sl * x + cl * y;
                const T z1 = cl * z - sl * u;
                const T u1 = sl * z + cl * u;
                // rows, the same
                const T x2 = ck * x1 - sk * z1;
                const T z2 = sk * x1 + ck * z1;
                const T y2 = ck * y1 - sk * u1;
                const T u2 = sk * y1 + ck * u1;
                A[pk * LD + pl] = x2;
                A[pk * LD + ql] = y2;
                A[qk * LD + pl] = z2;
                A[qk * LD + ql] = u2;
                A[pl * LD + pk] = x2;
                A[ql * LD + pk] = y2;
                A[pl * LD + qk] = z2;
                A[ql * LD + qk] = u2;
            }
            // Phase 2b: V <- V J on the rows of V^T (global memory), one (pair, column) per task.
            for (int task = tid; task < K * n; task += threads) {
                const int l = task / n;
                const int i = task - l * n;
                const int p = pair_p[l], q = pair_q[l];
                if (q >= n) continue;  // pairs with the padding index are the identity
                const T c = rot_c[l], s = rot_s[l];
                const T vp = vt[p * n + i];
                const T vq = vt[q * n + i];
                vt[p * n + i] = c * vp - s * vq;
                vt[q * n + i] = s * vp + c * vq;
            }
            __syncthreads();
        }
        T part = T(0);
        for (int idx = tid; idx < N * N; idx += threads) {
            const int i = idx / N;
            const int j = idx - i * N;
            if (i != j) part += A[i * LD + j] * A[i * LD + j];
        }
        off = block_sum(part, red);
    }

    for (int i = tid; i < n; i += threads) w[i] = A[i * LD + i];
}

#define DEFINE_SYMMETRIC_EIG(SUFFIX, T)                                                         \
    extern "C" __global__ void __launch_bounds__(EIG_MAX_THREADS) symmetric_eig_##SUFFIX(      \
        const T* a, T* w, T* vt, int n, int max_sweeps, T tol) {                                \
        symmetric_eig<T>(a, w, vt, n, max_sweeps, tol);                                         \
    }

DEFINE_SYMMETRIC_EIG(f32, float)
DEFINE_SYMMETRIC_EIG(f64, double)
