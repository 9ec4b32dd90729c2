// mla.cuh — the GPU kernels of Multi-head Latent Attention, forward and backward: RoPE on q_pe and the shared
// k_pe (with the YaRN table built on the host), the assembly of per-head K = [k_nope; k_pe] and V from kv_b
// and kv_a, and a flash-style causal attention (tensor cores, online softmax; the forward keeps no T x T matrix in
// device memory, the backward keeps the causal half of dS, in bf16, only up to T 2,048) whose backward is
// deterministic (no atomics).
//
// Shapes follow reference.h (N = B*T token rows, row-major):
//   q     [N, H, dqk]    per head [q_nope (dn); q_pe (dr)], dqk = dn + dr
//   kv_a  [N, dc + dr]   [latent c (dc); k_pe (dr)], k_pe shared by all heads
//   kv_b  [N, H, dn+dv]  per head [k_nope (dn); v (dv)]
//   k     [N, H, dqk]    per head [k_nope; k_pe]      (materialised by mla_assemble_kv_gpu)
//   v     [N, H, dv]
//   out   [N, H, dv]     attention output, lse [B, H, T] (natural log, of the scaled scores)
//
// Design choice: K and V are materialised (2 small copy kernels) rather than read with strides from kv_b/kv_a
// inside the attention kernels. It keeps the attention kernels generic (any q/k/v with the reference layout,
// testable on their own), and the backward's k_pe gradient (a sum over heads) becomes a plain fixed-order sum
// in mla_assemble_kv_backward_gpu instead of a cross-block reduction.
//
// Gradients follow the one rule stated at the top of reference.h.
#pragma once

#include <cmath>
#include <type_traits>

#include "cuda_common.cuh"
#include "kernels.cuh"
#include "reference.h"

// ----------------------------------------------------------------------------
// RoPE. The table is the host RopeTable (YaRN frequencies and attention factor already folded in) converted
// to fp32 (cos, sin) pairs, so the GPU rotates with exactly the reference's angles.

struct RopeGpu {
    float2* cs = nullptr;  // [max_len, dim/2] (cos, sin)
    int dim = 0, max_len = 0;
    float softmax_scale = 1.0f;  // copied from the RopeTable for the attention calls
};

inline RopeGpu rope_table_upload(const RopeTable& r) {
    RopeGpu g{nullptr, r.dim, r.max_len, (float)r.softmax_scale};
    const size_t n = (size_t)r.max_len * (r.dim / 2);
    std::vector<float2> host(n);
    for (size_t i = 0; i < n; i++) host[i] = make_float2((float)r.cos[i], (float)r.sin[i]);
    g.cs = device_alloc<float2>(n, "RoPE table");
    CUDA_CHECK(cudaMemcpy(g.cs, host.data(), n * sizeof(float2), cudaMemcpyHostToDevice));
    return g;
}

inline void rope_table_free(RopeGpu& g) {
    if (g.cs) CUDA_CHECK(cudaFree(g.cs));
    g = RopeGpu{};
}

// One thread per rotated pair: items [0, N*H*half) are q's heads, items [N*H*half, N*(H+1)*half) are kv_a's
// k_pe. backward = 1 applies the transpose (rotation by -angle), which is the gradient of the rotation.
static __global__ void rope_kernel(bf16* q, bf16* kv_a, const float2* __restrict__ cs, int N, int T, int H, int dn, int dr,
                                   int dc, int pos0, int backward) {
    const int half = dr / 2;
    const long long total = (long long)N * (H + 1) * half;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        long long rest = idx / half;
        bf16* x;
        int n;
        if (rest < (long long)N * H) {  // q_pe of token n, head h
            n = (int)(rest / H);
            const int h = (int)(rest % H);
            if (!q) continue;
            x = q + ((size_t)n * H + h) * (dn + dr) + dn;
        } else {  // the shared k_pe of token n
            n = (int)(rest - (long long)N * H);
            if (!kv_a) continue;
            x = kv_a + (size_t)n * (dc + dr) + dc;
        }
        const float2 r = cs[(size_t)(pos0 + n % T) * half + i];
        const float x0 = __bfloat162float(x[2 * i]), x1 = __bfloat162float(x[2 * i + 1]);
        const float s = backward ? -r.y : r.y;
        x[2 * i] = __float2bfloat16(x0 * r.x - x1 * s);
        x[2 * i + 1] = __float2bfloat16(x1 * r.x + x0 * s);
    }
}

// The same rotation where every piece (dn, dr, dc) starts on 8 elements: one thread per 16-byte pack of 4 pairs,
// items (token n, head h of H + 1 with h = H the shared k_pe, pack p). rope_kernel's 2-byte accesses and 64-bit
// index math ran it at a fifth of HBM speed (bench/RESULTS.md, session 13).
template <bool BACKWARD>
static __global__ void rope_pack_kernel(bf16* q, bf16* kv_a, const float2* __restrict__ cs, int N, int T, int H, int dn, int dr, int dc,
                                        int pos0) {
    const int packs = dr / 8, per_token = (H + 1) * packs;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * per_token) return;
    const int n = idx / per_token, h = idx % per_token / packs, p = idx % packs;
    bf16* x = h < H ? (q ? q + ((size_t)n * H + h) * (dn + dr) + dn : nullptr) : (kv_a ? kv_a + (size_t)n * (dc + dr) + dc : nullptr);
    if (!x) return;
    x += p * 8;
    float v[8];
    kdetail::load_bf16<8>(v, x);
    const float2* r = cs + (size_t)(pos0 + n % T) * (dr / 2) + p * 4;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float c = r[k].x, s = BACKWARD ? -r[k].y : r[k].y, x0 = v[2 * k], x1 = v[2 * k + 1];
        v[2 * k] = x0 * c - x1 * s;
        v[2 * k + 1] = x1 * c + x0 * s;
    }
    kdetail::store_bf16<8>(x, v);
}

inline void rope_launch(bf16* q, bf16* kv_a, const RopeGpu& rope, int N, int T, int H, int dn, int dc, int pos0, int backward,
                        cudaStream_t stream) {
    if (N <= 0) return;
    if (!rope.cs || rope.dim <= 0 || rope.dim % 2) fail("RoPE: the table is not uploaded or its dimension is odd");
    if (T <= 0 || pos0 < 0 || pos0 + std::min(T, N) > rope.max_len)
        fail("RoPE: positions up to %d exceed the table's %d (max_position_embeddings)", pos0 + std::min(T, N), rope.max_len);
    const int threads = 256, dr = rope.dim;
    const long long packs = (long long)N * (H + 1) * (dr / 8);
    if (dn % 8 == 0 && dr % 8 == 0 && dc % 8 == 0 && kdetail::aligned16({q, kv_a}) && packs < INT_MAX) {
        auto kernel = backward ? rope_pack_kernel<true> : rope_pack_kernel<false>;
        kernel<<<(int)ceil_div(packs, (long long)threads), threads, 0, stream>>>(q, kv_a, rope.cs, N, T, H, dn, dr, dc, pos0);
    } else {
        const long long total = (long long)N * (H + 1) * (dr / 2);
        const int blocks = (int)std::min<long long>((total + threads - 1) / threads, 1 << 20);
        rope_kernel<<<blocks, threads, 0, stream>>>(q, kv_a, rope.cs, N, T, H, dn, dr, dc, pos0, backward);
    }
    CUDA_LAUNCH_CHECK();
}

// Rotates, in place, q_pe inside q [N, H, dn+dr] (columns dn.. of each head) and k_pe inside kv_a [N, dc+dr]
// (columns dc..). Token n is at position pos0 + n % T (pos0 = 0 in training; the decode step passes its cache
// length). Either pointer may be null to rotate only the other. dr = rope.dim.
inline void rope_forward_gpu(bf16* q, bf16* kv_a, const RopeGpu& rope, int N, int T, int H, int dn, int dc, int pos0,
                             cudaStream_t stream) {
    rope_launch(q, kv_a, rope, N, T, H, dn, dc, pos0, 0, stream);
}

// The transpose, in place, on the gradients: dq [N, H, dn+dr] and dkv_a [N, dc+dr]
// (columns dc.. hold the k_pe gradient summed over heads).
inline void rope_backward_gpu(bf16* dq, bf16* dkv_a, const RopeGpu& rope, int N, int T, int H, int dn, int dc, int pos0,
                              cudaStream_t stream) {
    rope_launch(dq, dkv_a, rope, N, T, H, dn, dc, pos0, 1, stream);
}

// ----------------------------------------------------------------------------
// MLA assembly: k [N, H, dn+dr] = [kv_b[:, h, :dn]; kv_a[:, dc:]] and v [N, H, dv] = kv_b[:, h, dn:]. Pure copies,
// memory-bound: one block per token, VEC elements per thread (16-byte moves when every size is a multiple of 8).

template <int VEC>
static __global__ void mla_assemble_kv_kernel(bf16* __restrict__ k, bf16* __restrict__ v, const bf16* __restrict__ kv_b,
                                              const bf16* __restrict__ kv_a, int H, int dn, int dr, int dv, int dc) {
    const int n = blockIdx.x, dqk = dn + dr, pk = dqk / VEC, pv = dv / VEC;  // pieces per head
    const bf16* kvb = kv_b + (size_t)n * H * (dn + dv);
    const bf16* pe = kv_a + (size_t)n * (dc + dr) + dc;
    for (int idx = threadIdx.x; idx < H * (pk + pv); idx += blockDim.x) {
        float x[VEC];
        if (idx < H * pk) {
            const int h = idx / pk, i = (idx % pk) * VEC;
            kdetail::load_bf16<VEC>(x, i < dn ? kvb + h * (dn + dv) + i : pe + (i - dn));
            kdetail::store_bf16<VEC>(k + ((size_t)n * H + h) * dqk + i, x);
        } else {
            const int h = (idx - H * pk) / pv, i = ((idx - H * pk) % pv) * VEC;
            kdetail::load_bf16<VEC>(x, kvb + h * (dn + dv) + dn + i);
            kdetail::store_bf16<VEC>(v + ((size_t)n * H + h) * dv + i, x);
        }
    }
}

// dkv_b [N, H, dn+dv] = [dk[:, h, :dn]; dv]; dkv_a[:, dc:dc+dr] = sum over h of
// dk[:, h, dn:] (fp32, heads in order 0..H-1, so deterministic). dkv_a's columns
// [0, dc) are not touched (the RMSNorm backward writes them). One block per token.
template <int VEC>
static __global__ void mla_assemble_kv_backward_kernel(bf16* __restrict__ dkv_b, bf16* __restrict__ dkv_a,
                                                       const bf16* __restrict__ dk, const bf16* __restrict__ dv, int H, int dn, int dr,
                                                       int dvd, int dc) {
    const int n = blockIdx.x, dqk = dn + dr, pb = (dn + dvd) / VEC, pr = dr / VEC;
    const bf16* dkn = dk + (size_t)n * H * dqk;
    for (int idx = threadIdx.x; idx < H * pb + pr; idx += blockDim.x) {
        float x[VEC];
        if (idx < H * pb) {
            const int h = idx / pb, i = (idx % pb) * VEC;
            kdetail::load_bf16<VEC>(x, i < dn ? dkn + h * dqk + i : dv + ((size_t)n * H + h) * dvd + (i - dn));
            kdetail::store_bf16<VEC>(dkv_b + ((size_t)n * H + h) * (dn + dvd) + i, x);
        } else {
            const int i = (idx - H * pb) * VEC;
            float sum[VEC] = {};
            for (int h = 0; h < H; h++) {
                kdetail::load_bf16<VEC>(x, dkn + h * dqk + dn + i);
#pragma unroll
                for (int j = 0; j < VEC; j++) sum[j] += x[j];
            }
            kdetail::store_bf16<VEC>(dkv_a + (size_t)n * (dc + dr) + dc + i, sum);
        }
    }
}

// 16-byte moves need every piece (sizes dn, dr, dv, dc) to start on 8 elements
inline bool mla_assemble_vec8(int dn, int dr, int dv, int dc, std::initializer_list<const void*> ptrs) {
    return dn % 8 == 0 && dr % 8 == 0 && dv % 8 == 0 && dc % 8 == 0 && kdetail::aligned16(ptrs);
}

// k [N, H, dn+dr], v [N, H, dv] from kv_b [N, H, dn+dv] and kv_a [N, dc+dr] (k_pe roped)
inline void mla_assemble_kv_gpu(bf16* k, bf16* v, const bf16* kv_b, const bf16* kv_a, int N, int H, int dn, int dr, int dv, int dc,
                                cudaStream_t stream) {
    if (N == 0) return;
    if (mla_assemble_vec8(dn, dr, dv, dc, {k, v, kv_b, kv_a}))
        mla_assemble_kv_kernel<8><<<N, 128, 0, stream>>>(k, v, kv_b, kv_a, H, dn, dr, dv, dc);
    else
        mla_assemble_kv_kernel<1><<<N, 256, 0, stream>>>(k, v, kv_b, kv_a, H, dn, dr, dv, dc);
    CUDA_LAUNCH_CHECK();
}

// dkv_b [N, H, dn+dv] and dkv_a[:, dc:] (of a [N, dc+dr] buffer) from dk [N, H, dn+dr], dv [N, H, dv]
inline void mla_assemble_kv_backward_gpu(bf16* dkv_b, bf16* dkv_a, const bf16* dk, const bf16* dv, int N, int H, int dn, int dr,
                                         int dvd, int dc, cudaStream_t stream) {
    if (N == 0) return;
    if (mla_assemble_vec8(dn, dr, dvd, dc, {dkv_b, dkv_a, dk, dv}))
        mla_assemble_kv_backward_kernel<8><<<N, 128, 0, stream>>>(dkv_b, dkv_a, dk, dv, H, dn, dr, dvd, dc);
    else
        mla_assemble_kv_backward_kernel<1><<<N, 256, 0, stream>>>(dkv_b, dkv_a, dk, dv, H, dn, dr, dvd, dc);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// Flash attention (causal), FlashAttention-2 style on mma.sync m16n8k16 bf16 tensor cores with fp32 accumulation.
//
// Tiles: 64 queries x 64 keys. A (64 x d) tile lives in shared memory with rows padded to d_p + 8 elements (d_p = d
// rounded up to 32, zero-filled), so ldmatrix reads are bank-conflict free and any head size <= 256 works (the padding
// columns contribute zeros). Accumulators are register arrays sized at compile time: by the exact head sizes for the
// presets' (96/64, 192/128; with_head_sizes), otherwise by a bucket (64/128/256) of the head size, with the loops
// past the real size predicated off, so only 3 (forward, dQ) or 9 (dK/dV) generic instantiations exist.
//
// forward: 4 warps, each owns 16 query rows; S = Q K^T and P stay in registers
//   (the S accumulator layout equals the A-operand layout of P V). K and V tiles
//   are fetched with cp.async one stage ahead of their use.
// backward: D = rowsum(dO * O) first; then two kernels, neither with atomics:
//   dkdv: one block per 64-key block, loops over the query blocks at or after it;
//         dV += P^T dO, dK += dS^T Q (scaled), P recomputed from lse.
//   dq:   one block per 64-query block, loops over key blocks up to the diagonal;
//         dQ += dS K (scaled). Up to T = ATTENTION_KEEP_DS_MAX_T, dkdv keeps its dS tiles in the scratch and
//         dq reads them (one matmul a tile); past it, dq recomputes S and dP as dkdv did.
//   Both use 8 warps in two phases: phase 1 computes the 64x64 P and dS tiles
//   (warps tiled 4 x 2 over the tile) into shared memory; phase 2 multiplies them
//   (warps tiled 4 row groups x 2 column halves of the head dim), which keeps the
//   per-thread accumulators at (d/2)/8*4 floats even for d = 256.
// Dropout on the probabilities (reference.h AttentionDropout; a DROPOUT instantiation of each kernel): every kernel
// draws the mask of the (query, key) pairs it touches from the counter RNG, so no mask is stored. The forward's
// row sums l stay undropped and P V takes the dropped P; the backward's dV takes the dropped P and
// dS = P (m dP - D), D = rowsum(dO O) being the same sum with O the dropped output.

namespace mla_detail {

constexpr int TILE = 64;    // queries and keys per tile
constexpr int LDP = 64 + 8;  // row stride of the 64x64 P / dS tiles in shared memory
constexpr float LN2 = 0.6931471805599453f;

__host__ __device__ inline int pad32(int d) { return (d + 31) / 32 * 32; }

// The causal 64 x 64 tiles of one head, query block i >= key block j, in the order (0,0) (1,0) (1,1) (2,0)...: a
// query block's tiles lie together, in the order the dQ kernel reads them.
__host__ __device__ inline long long ds_tiles(int nqb) { return (long long)nqb * (nqb + 1) / 2; }
__host__ __device__ inline long long ds_tile_index(int i, int j) { return (long long)i * (i + 1) / 2 + j; }
// where tile (i, j) of head bh starts in the kept dS, in elements
__host__ __device__ inline long long ds_tile_offset(int bh, int nqb, int i, int j) {
    return ((long long)bh * ds_tiles(nqb) + ds_tile_index(i, j)) * TILE * TILE;
}

// acc[2*NB][4] += A B^T over ksteps steps of 16: A is 16 rows (row stride lda) and B is NB*16 rows (row stride ldb) of
// bf16 in shared memory, both read along the head dimension; the warp's fragments are laid out as mma16816 expects. Two
// steps per iteration give the loads of the second something to overlap with (ksteps is even).
template <int NB>
__device__ inline void mma_rows16(float (&acc)[2 * NB][4], const bf16* A, int lda, const bf16* B, int ldb, int ksteps, int lane) {
    for (int k2 = 0; k2 < ksteps; k2 += 2)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int kk = k2 + u;
            uint32_t a[4];
            ldsm_x4(a, smem_u32(A + (lane & 15) * lda + kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int p = 0; p < NB; p++) {
                uint32_t bb[4];
                ldsm_x4(bb, smem_u32(B + (p * 16 + (lane & 7) + ((lane >> 4) << 3)) * ldb + kk * 16 + ((lane >> 3) & 1) * 8));
                mma16816(acc[2 * p], a, bb[0], bb[1]);
                mma16816(acc[2 * p + 1], a, bb[2], bb[3]);
            }
        }
}

__device__ inline uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Loads rows row0..row0+63 of one head into a [64][ld] shared tile, columns [0, dp): g points at (t = 0) of
// the head, consecutive t are gstride elements apart. Rows >= T and columns >= d are zero. vec: 16-byte
// cp.async (d % 8 == 0, gstride % 8 == 0, g 16-byte aligned); otherwise element loads (odd head sizes).
// The loop counts rounds of NTHREADS chunks, so that with d known at compile time its trip count and the division
// by chunks are constants.
template <int NTHREADS>
__device__ inline void load_tile(bf16* s, int ld, const bf16* __restrict__ g, long long gstride, int row0, int T, int d, int dp,
                                 bool vec) {
    const int chunks = dp / 8, rounds = (TILE * chunks + NTHREADS - 1) / NTHREADS;
#pragma unroll
    for (int i = 0; i < rounds; i++) {
        const int c = i * NTHREADS + threadIdx.x;
        if (c >= TILE * chunks) break;
        const int r = c / chunks, col = (c % chunks) * 8, t = row0 + r;
        bf16* dst = s + r * ld + col;
        if (vec) {
            const bool ok = t < T && col < d;
            cp_async16(smem_u32(dst), ok ? (const void*)(g + (long long)t * gstride + col) : (const void*)g, ok ? 16 : 0);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++)
                dst[e] = (t < T && col + e < d) ? g[(long long)t * gstride + col + e] : __float2bfloat16(0.0f);
        }
    }
}

// 64 floats of a [T] row (lse or D) into shared memory, zero past T
__device__ inline void load_row64(float* s, const float* __restrict__ g, int row0, int T) {
    if (threadIdx.x < TILE) {
        const int t = row0 + threadIdx.x;
        cp_async4(smem_u32(s + threadIdx.x), t < T ? (const void*)(g + t) : (const void*)g, t < T ? 4 : 0);
    }
}

// stores two adjacent fp32 values as bf16 at row[col], row[col+1], within d columns
__device__ inline void store_pair(bf16* row, int col, int d, float x0, float x1, bool vec2) {
    if (col >= d) return;
    if (vec2 && col + 1 < d) {
        *reinterpret_cast<__nv_bfloat162*>(row + col) = __floats2bfloat162_rn(x0, x1);
    } else {
        row[col] = __float2bfloat16(x0);
        if (col + 1 < d) row[col + 1] = __float2bfloat16(x1);
    }
}

// acc[2*NP][4] += a B for one k16 step kk: a is the warp's A fragment (16 rows x 16), B a [k][n] tile in shared memory
// (row stride ldb) read from column c0 on, np (<= NP) pairs of n8 tiles of it; the pairs past np are predicated off
template <int NP>
__device__ __forceinline__ void mma_rows16_trans(float (&acc)[2 * NP][4], const uint32_t (&a)[4], const bf16* B, int ldb, int kk, int c0,
                                                 int np, int lane) {
#pragma unroll
    for (int p = 0; p < NP; p++)
        if (p < np) {
            uint32_t bb[4];
            ldsm_x4_trans(bb, smem_u32(B + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb + c0 + p * 16 + (lane >> 4) * 8));
            mma16816(acc[2 * p], a, bb[0], bb[1]);
            mma16816(acc[2 * p + 1], a, bb[2], bb[3]);
        }
}

// Stores the n8 tiles nt < nt_end of a warp's accumulator as bf16: this thread's rows row_a (times sa) and row_a + 8
// (times sb), those < T, of g (row stride gstride), at columns c0 + nt*8 + 2*t4 and the next, within d columns.
template <int NT>
__device__ __forceinline__ void store_acc(bf16* g, long long gstride, const float (&acc)[NT][4], int row_a, int T, int c0, int nt_end,
                                          int d, float sa, float sb, bool vec, int t4) {
    const int row_b = row_a + 8;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int col = c0 + nt * 8 + 2 * t4;
        if (nt < nt_end) {
            if (row_a < T) store_pair(g + row_a * gstride, col, d, acc[nt][0] * sa, acc[nt][1] * sa, vec);
            if (row_b < T) store_pair(g + row_b * gstride, col, d, acc[nt][2] * sb, acc[nt][3] * sb, vec);
        }
    }
}

inline bool aligned(const void* p, int bytes) { return ((uintptr_t)p % bytes) == 0; }

// f(std::integral_constant<int, B>{}) with B = 64, 128 or 256, the bucket of head size d
template <typename F>
inline void with_bucket(int d, F f) {
    if (d <= 64) f(std::integral_constant<int, 64>{});
    else if (d <= 128) f(std::integral_constant<int, 128>{});
    else f(std::integral_constant<int, 256>{});
}

// f(DQK_MAX, DV_MAX, EXACT) as integral constants. The presets' head sizes (dqk 96 and dv 64 of small, 192 and 128
// of medium and DeepSeek-V3) get kernels compiled for exactly those sizes (EXACT: dqk == DQK_MAX, dv == DV_MAX),
// where every tile loop, index and bound is a constant (with the sizes read at run time, the forward issued 1,164
// instructions per warp per 64-key tile, 80 of them mma; bench/RESULTS.md). Other sizes take the kernels of their
// buckets and read the sizes at run time. A kernel whose registers do not depend on one of the sizes passes false
// for it (USE_QK, USE_V) and gets the one bucket 256 there, which keeps the number of instantiations down.
template <bool USE_QK, bool USE_V, typename F>
inline void with_head_sizes(int dqk, int dv, F f) {
    using std::integral_constant;
    if (dqk == 96 && dv == 64) f(integral_constant<int, 96>{}, integral_constant<int, 64>{}, std::true_type{});
    else if (dqk == 192 && dv == 128) f(integral_constant<int, 192>{}, integral_constant<int, 128>{}, std::true_type{});
    else {
        auto generic = [&](auto qb) {
            if constexpr (USE_V) with_bucket(dv, [&](auto vb) { f(qb, vb, std::false_type{}); });
            else f(qb, integral_constant<int, 256>{}, std::false_type{});
        };
        if constexpr (USE_QK) with_bucket(dqk, generic);
        else generic(integral_constant<int, 256>{});
    }
}

// the dropout mask m of (query, key) in head bh: 0 or scale (1 / (1 - p)), as reference.h attention_dropout_mask
__device__ __forceinline__ float dropout_mask(uint64_t key, float p, float scale, int bh, int T, int query, int k) {
    return rng_uniform(key, ((uint64_t)bh * T + query) * T + k) < p ? 0.0f : scale;
}

// the kernels' dropout arguments: key, probability and 1 / (1 - p)
struct DropoutArgs {
    uint64_t key;
    float p, scale;
};

inline DropoutArgs dropout_args(const AttentionDropout& drop) {
    return DropoutArgs{drop.key, drop.p, drop.p > 0 ? (float)(1.0 / (1.0 - drop.p)) : 1.0f};
}

}  // namespace mla_detail

// out [B, T, H, dv], lse [B, H, T] from q, k [B, T, H, dqk], v [B, T, H, dv]. grid (ceil(T/64), B*H), 128
// threads; query blocks run last-first so the longest (most keys) start first. The register bound keeps the exact
// dv-64 kernel at 4 blocks per SM, as the generic one has: left free, it spends 160 registers on hoisted tile
// addresses and loses a block. (0 sets no minimum: the other kernels keep the registers ptxas picks.)
template <int DQK_MAX, int DV_MAX, bool EXACT, bool DROPOUT>
__global__ void __launch_bounds__(128, EXACT && DV_MAX <= 64 ? 4 : 0)
    attention_forward_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q, const bf16* __restrict__ k,
                             const bf16* __restrict__ v, int T, int H, int dqk, int dv, float scale_log2, bool vec_qk, bool vec_v,
                             bool vec_out, mla_detail::DropoutArgs drop) {
    using namespace mla_detail;
    if constexpr (EXACT) dqk = DQK_MAX, dv = DV_MAX;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int dqp = pad32(dqk), dvp = pad32(dv), ldq = dqp + 8, ldv = dvp + 8;
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sK = sQ + TILE * ldq;
    bf16* sV = sK + TILE * ldq;

    const int nqb = (T + TILE - 1) / TILE, qb = nqb - 1 - blockIdx.x, q0 = qb * TILE;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const long long sqk = (long long)H * dqk, sv = (long long)H * dv;
    const bf16* qg = q + ((long long)b * T * H + h) * dqk;
    const bf16* kg = k + ((long long)b * T * H + h) * dqk;
    const bf16* vg = v + ((long long)b * T * H + h) * dv;

    load_tile<128>(sQ, ldq, qg, sqk, q0, T, dqk, dqp, vec_qk);
    load_tile<128>(sK, ldq, kg, sqk, 0, T, dqk, dqp, vec_qk);
    cp_async_commit();
    load_tile<128>(sV, ldv, vg, sv, 0, T, dv, dvp, vec_v);
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
    const int row_a = q0 + warp * 16 + g, row_b = row_a + 8;  // the two query rows this thread holds
    const int nk = dqp / 16, npair = dvp / 16;

    float o[DV_MAX / 8][4] = {};
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

    for (int j = 0; j <= qb; j++) {
        cp_async_wait<1>();  // K_j (and Q) landed; V_j may be in flight
        __syncthreads();
        float s[8][4] = {};
        mma_rows16<4>(s, sQ + (warp * 16) * ldq, ldq, sK, ldq, nk, lane);
        __syncthreads();  // every warp is done with K_j
        if (j < qb) load_tile<128>(sK, ldq, kg, sqk, (j + 1) * TILE, T, dqk, dqp, vec_qk);
        cp_async_commit();

        // causal mask (the diagonal block only), then online softmax in log2 units:
        // m is the running max of score * scale * log2(e), p = 2^(s * scale_log2 - m)
        if (j == qb) {
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (j * TILE + nt * 8 + 2 * t4 + (e & 1) > (e < 2 ? row_a : row_b)) s[nt][e] = -INFINITY;
        }
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        // key j*64 <= every row of this block, so the new maxima are finite (scale > 0)
        const float mn_a = fmaxf(m_a, mx_a * scale_log2), mn_b = fmaxf(m_b, mx_b * scale_log2);
        const float al_a = ex2(m_a - mn_a), al_b = ex2(m_b - mn_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            s[nt][0] = ex2(fmaf(s[nt][0], scale_log2, -mn_a));
            s[nt][1] = ex2(fmaf(s[nt][1], scale_log2, -mn_a));
            s[nt][2] = ex2(fmaf(s[nt][2], scale_log2, -mn_b));
            s[nt][3] = ex2(fmaf(s[nt][3], scale_log2, -mn_b));
            sum_a += s[nt][0] + s[nt][1];
            sum_b += s[nt][2] + s[nt][3];
        }
        l_a = l_a * al_a + sum_a;  // per-thread partial sums; the quad is summed at the end
        l_b = l_b * al_b + sum_b;
        if constexpr (DROPOUT) {
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int query = e < 2 ? row_a : row_b, key = j * TILE + nt * 8 + 2 * t4 + (e & 1);
                    s[nt][e] *= dropout_mask(drop.key, drop.p, drop.scale, bh, T, query, key);
                }
        }
#pragma unroll
        for (int i = 0; i < DV_MAX / 8; i++) {
            o[i][0] *= al_a;
            o[i][1] *= al_a;
            o[i][2] *= al_b;
            o[i][3] *= al_b;
        }

        cp_async_wait<1>();  // V_j landed (K_{j+1} may be in flight)
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const uint32_t a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                   pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            mma_rows16_trans<DV_MAX / 16>(o, a, sV, ldv, kk, 0, npair, lane);
        }
        __syncthreads();  // every warp is done with V_j
        if (j < qb) load_tile<128>(sV, ldv, vg, sv, (j + 1) * TILE, T, dv, dvp, vec_v);
        cp_async_commit();
    }
    cp_async_wait<0>();

    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
    store_acc(out + ((long long)b * T * H + h) * dv, sv, o, row_a, T, 0, 2 * npair, dv, inv_a, inv_b, vec_out, t4);
    if (t4 == 0) {
        if (row_a < T) lse[(long long)bh * T + row_a] = (m_a + log2f(l_a)) * LN2;
        if (row_b < T) lse[(long long)bh * T + row_b] = (m_b + log2f(l_b)) * LN2;
    }
}

// D [B, H, T] = rowsum(dout * out) in fp32 (one warp per row, fixed-order sum); for any dv
static __global__ void attention_backward_preprocess_kernel(float* __restrict__ D, const bf16* __restrict__ dout,
                                                            const bf16* __restrict__ out, int B, int T, int H, int dv) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // (b, t, h)
    const int lane = threadIdx.x % 32;
    if (row >= (long long)B * T * H) return;
    float s = 0.0f;
    for (int i = lane; i < dv; i += 32) s += __bfloat162float(dout[row * dv + i]) * __bfloat162float(out[row * dv + i]);
    s = warp_sum(s);
    if (lane == 0) {
        const int h = (int)(row % H);
        const long long bt = row / H;
        const int t = (int)(bt % T), b = (int)(bt / T);
        D[((long long)b * H + h) * T + t] = s;
    }
}

// The same for dv a multiple of 8 and 16-byte aligned rows: 8 lanes a row with 16-byte loads, each summing its
// packs, then a fixed shuffle tree over the 8. A warp a row left most lanes idle on two 2-byte loads each (about a
// fifth of HBM speed, bench/RESULTS.md session 13).
static __global__ void attention_backward_preprocess_pack_kernel(float* __restrict__ D, const bf16* __restrict__ dout,
                                                                 const bf16* __restrict__ out, int B, int T, int H, int dv) {
    const long long rows = (long long)B * T * H, row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 8;
    const int lane = threadIdx.x % 8;
    float s = 0.0f;
    if (row < rows)
        for (int i = lane * 8; i < dv; i += 64) {
            float a[8], b[8];
            kdetail::load_bf16<8>(a, dout + row * dv + i);
            kdetail::load_bf16<8>(b, out + row * dv + i);
#pragma unroll
            for (int k = 0; k < 8; k++) s += a[k] * b[k];
        }
    for (int offset = 4; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);  // every lane takes part
    if (lane == 0 && row < rows) {
        const int h = (int)(row % H);
        const long long bt = row / H;
        const int t = (int)(bt % T), b = (int)(bt / T);
        D[((long long)b * H + h) * T + t] = s;
    }
}

// dk [B, T, H, dqk], dv [B, T, H, dv]; grid (ceil(T/64), B*H), 256 threads; block x
// owns keys 64x..64x+63 and visits query blocks x..end (double-buffered Q/dO). ds_out (null: not kept): the dS^T
// tiles, [B*H][causal tile (i, j), ds_tile_index][64 keys][64 queries], for the dQ kernel that reads them.
template <int DQK_MAX, int DV_MAX, bool EXACT, bool DROPOUT>
__global__ void __launch_bounds__(256) attention_backward_dkdv_kernel(bf16* __restrict__ dk, bf16* __restrict__ dvalue,
                                                                      bf16* __restrict__ ds_out,
                                                                      const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                                      const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                                                      const float* __restrict__ lse, const float* __restrict__ D,
                                                                      int T, int H, int dqk, int dv, float scale, float scale_log2,
                                                                      bool vec_qk, bool vec_v, bool vec_out_k, bool vec_out_v,
                                                                      mla_detail::DropoutArgs drop) {
    using namespace mla_detail;
    if constexpr (EXACT) dqk = DQK_MAX, dv = DV_MAX;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int dqp = pad32(dqk), dvp = pad32(dv), ldq = dqp + 8, ldv = dvp + 8;
    bf16* sK = reinterpret_cast<bf16*>(smem_raw);
    bf16* sV = sK + TILE * ldq;
    bf16* sQ = sV + TILE * ldv;   // [2][64][ldq]
    bf16* sdO = sQ + 2 * TILE * ldq;  // [2][64][ldv]
    bf16* sP = sdO + 2 * TILE * ldv;  // [64 keys][LDP] P^T
    bf16* sdS = sP + TILE * LDP;      // [64 keys][LDP] dS^T
    float* sL = reinterpret_cast<float*>(sdS + TILE * LDP);  // [2][64] lse
    float* sD = sL + 2 * TILE;                                // [2][64] D

    const int nqb = (T + TILE - 1) / TILE, kb = blockIdx.x, k0 = kb * TILE;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const long long sqk = (long long)H * dqk, sv = (long long)H * dv;
    const bf16* qg = q + ((long long)b * T * H + h) * dqk;
    const bf16* kg = k + ((long long)b * T * H + h) * dqk;
    const bf16* vg = v + ((long long)b * T * H + h) * dv;
    const bf16* dog = dout + ((long long)b * T * H + h) * dv;
    const float* lg = lse + (long long)bh * T;
    const float* Dg = D + (long long)bh * T;

    load_tile<256>(sK, ldq, kg, sqk, k0, T, dqk, dqp, vec_qk);
    load_tile<256>(sV, ldv, vg, sv, k0, T, dv, dvp, vec_v);
    load_tile<256>(sQ, ldq, qg, sqk, k0, T, dqk, dqp, vec_qk);
    load_tile<256>(sdO, ldv, dog, sv, k0, T, dv, dvp, vec_v);
    load_row64(sL, lg, k0, T);
    load_row64(sD, Dg, k0, T);
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
    const int rg = warp & 3, half = warp >> 2;  // 16-key row group; query half (phase 1) / head-dim half (phase 2)
    const int nkq = dqp / 16, nkv = dvp / 16;
    const int pq = dqp / 32, pv = dvp / 32;  // n-tile pairs per head-dim half
    const int cq0 = half * (dqp / 2), cv0 = half * (dvp / 2);

    float acc_k[DQK_MAX / 16][4] = {}, acc_v[DV_MAX / 16][4] = {};

    for (int i = kb; i < nqb; i++) {
        const int buf = (i - kb) & 1, q0 = i * TILE;
        bf16* cQ = sQ + buf * TILE * ldq;
        bf16* cdO = sdO + buf * TILE * ldv;
        const float* cL = sL + buf * TILE;
        const float* cD = sD + buf * TILE;
        cp_async_wait<0>();
        __syncthreads();  // tiles of block i landed; every warp is done with block i-1
        if (i + 1 < nqb) {
            const int nb = buf ^ 1;
            load_tile<256>(sQ + nb * TILE * ldq, ldq, qg, sqk, q0 + TILE, T, dqk, dqp, vec_qk);
            load_tile<256>(sdO + nb * TILE * ldv, ldv, dog, sv, q0 + TILE, T, dv, dvp, vec_v);
            load_row64(sL + nb * TILE, lg, q0 + TILE, T);
            load_row64(sD + nb * TILE, Dg, q0 + TILE, T);
        }
        cp_async_commit();

        // phase 1: S^T = K Q^T and dP^T = V dO^T for 16 keys x 32 queries per warp
        float st[4][4] = {}, dpt[4][4] = {};
        mma_rows16<2>(st, sK + (rg * 16) * ldq, ldq, cQ + half * 32 * ldq, ldq, nkq, lane);
        mma_rows16<2>(dpt, sV + (rg * 16) * ldv, ldv, cdO + half * 32 * ldv, ldv, nkv, lane);
        // P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - D), masked to key <= query < T
        // (only the diagonal block and the ragged last block need the mask)
        const bool masked = i == kb || i == nqb - 1;
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int hi = 0; hi < 2; hi++) {
                const int kl = rg * 16 + g + hi * 8, key = k0 + kl;
                const int ql = half * 32 + nt * 8 + 2 * t4;
                float pr[2], ds[2];
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int qq = q0 + ql + e;
                    pr[e] = ex2(fmaf(st[nt][2 * hi + e], scale_log2, -cL[ql + e] * LOG2E));
                    if (masked && !(qq < T && key <= qq)) pr[e] = 0.0f;
                    if constexpr (DROPOUT) {
                        const float m = dropout_mask(drop.key, drop.p, drop.scale, bh, T, qq, key);
                        ds[e] = pr[e] * (m * dpt[nt][2 * hi + e] - cD[ql + e]);
                        pr[e] *= m;
                    } else {
                        ds[e] = pr[e] * (dpt[nt][2 * hi + e] - cD[ql + e]);
                    }
                }
                *reinterpret_cast<uint32_t*>(sP + kl * LDP + ql) = pack_bf16(pr[0], pr[1]);
                *reinterpret_cast<uint32_t*>(sdS + kl * LDP + ql) = pack_bf16(ds[0], ds[1]);
            }
        __syncthreads();
        if (ds_out) {  // the 8 KB tile in 16-byte pieces, two a thread; the stores drain while phase 2 runs
            bf16* g = ds_out + ds_tile_offset(bh, nqb, i, kb);
#pragma unroll
            for (int u = 0; u < TILE * TILE / 8 / 256; u++) {
                const int c = u * 256 + threadIdx.x, r = c / (TILE / 8), col = c % (TILE / 8) * 8;
                *reinterpret_cast<uint4*>(g + r * TILE + col) = *reinterpret_cast<const uint4*>(sdS + r * LDP + col);
            }
        }

        // phase 2: dV += P^T dO, dK += dS^T Q over this warp's 16 keys x head-dim half
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t ap[4], ad[4];
            ldsm_x4(ap, smem_u32(sP + (rg * 16 + (lane & 15)) * LDP + kk * 16 + (lane >> 4) * 8));
            ldsm_x4(ad, smem_u32(sdS + (rg * 16 + (lane & 15)) * LDP + kk * 16 + (lane >> 4) * 8));
            mma_rows16_trans<DV_MAX / 32>(acc_v, ap, cdO, ldv, kk, cv0, pv, lane);
            mma_rows16_trans<DQK_MAX / 32>(acc_k, ad, cQ, ldq, kk, cq0, pq, lane);
        }
    }
    cp_async_wait<0>();

    const int key_a = k0 + rg * 16 + g;
    store_acc(dk + ((long long)b * T * H + h) * dqk, sqk, acc_k, key_a, T, cq0, 2 * pq, dqk, scale, scale, vec_out_k, t4);
    store_acc(dvalue + ((long long)b * T * H + h) * dv, sv, acc_v, key_a, T, cv0, 2 * pv, dv, 1.0f, 1.0f, vec_out_v, t4);
}

// dq [B, T, H, dqk]; grid (ceil(T/64), B*H), 256 threads; block x owns query block
// nqb-1-x (longest first) and visits key blocks 0..diagonal (double-buffered K/V).
template <int DQK_MAX, int DV_MAX, bool EXACT, bool DROPOUT>
__global__ void __launch_bounds__(256) attention_backward_dq_kernel(bf16* __restrict__ dq, const bf16* __restrict__ q,
                                                                    const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                                    const bf16* __restrict__ dout, const float* __restrict__ lse,
                                                                    const float* __restrict__ D, int T, int H, int dqk, int dv,
                                                                    float scale, float scale_log2, bool vec_qk, bool vec_v,
                                                                    bool vec_out, mla_detail::DropoutArgs drop) {
    using namespace mla_detail;
    if constexpr (EXACT) dqk = DQK_MAX, dv = DV_MAX;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int dqp = pad32(dqk), dvp = pad32(dv), ldq = dqp + 8, ldv = dvp + 8;
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sdO = sQ + TILE * ldq;
    bf16* sK = sdO + TILE * ldv;      // [2][64][ldq]
    bf16* sV = sK + 2 * TILE * ldq;   // [2][64][ldv]
    bf16* sdS = sV + 2 * TILE * ldv;  // [64 queries][LDP]
    float* sL = reinterpret_cast<float*>(sdS + TILE * LDP);
    float* sD = sL + TILE;

    const int nqb = (T + TILE - 1) / TILE, qb = nqb - 1 - blockIdx.x, q0 = qb * TILE;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const long long sqk = (long long)H * dqk, sv = (long long)H * dv;
    const bf16* qg = q + ((long long)b * T * H + h) * dqk;
    const bf16* kg = k + ((long long)b * T * H + h) * dqk;
    const bf16* vg = v + ((long long)b * T * H + h) * dv;
    const bf16* dog = dout + ((long long)b * T * H + h) * dv;

    load_tile<256>(sQ, ldq, qg, sqk, q0, T, dqk, dqp, vec_qk);
    load_tile<256>(sdO, ldv, dog, sv, q0, T, dv, dvp, vec_v);
    load_row64(sL, lse + (long long)bh * T, q0, T);
    load_row64(sD, D + (long long)bh * T, q0, T);
    load_tile<256>(sK, ldq, kg, sqk, 0, T, dqk, dqp, vec_qk);
    load_tile<256>(sV, ldv, vg, sv, 0, T, dv, dvp, vec_v);
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
    const int rg = warp & 3, half = warp >> 2;  // 16-query row group; key half (phase 1) / head-dim half (phase 2)
    const int nkq = dqp / 16, nkv = dvp / 16, pq = dqp / 32, cq0 = half * (dqp / 2);
    const int row_a = q0 + rg * 16 + g;

    float acc[DQK_MAX / 16][4] = {};
    float lse_a = 0.0f, lse_b = 0.0f, D_a = 0.0f, D_b = 0.0f;

    for (int j = 0; j <= qb; j++) {
        const int buf = j & 1, k0 = j * TILE;
        bf16* cK = sK + buf * TILE * ldq;
        bf16* cV = sV + buf * TILE * ldv;
        cp_async_wait<0>();
        __syncthreads();  // tiles of block j landed; every warp is done with block j-1
        if (j == 0) {
            lse_a = sL[rg * 16 + g] * LOG2E;
            lse_b = sL[rg * 16 + g + 8] * LOG2E;
            D_a = sD[rg * 16 + g];
            D_b = sD[rg * 16 + g + 8];
        }
        if (j < qb) {
            load_tile<256>(sK + (buf ^ 1) * TILE * ldq, ldq, kg, sqk, k0 + TILE, T, dqk, dqp, vec_qk);
            load_tile<256>(sV + (buf ^ 1) * TILE * ldv, ldv, vg, sv, k0 + TILE, T, dv, dvp, vec_v);
        }
        cp_async_commit();

        // phase 1: S = Q K^T, dP = dO V^T for 16 queries x 32 keys per warp
        float s[4][4] = {}, dp[4][4] = {};
        mma_rows16<2>(s, sQ + (rg * 16) * ldq, ldq, cK + half * 32 * ldq, ldq, nkq, lane);
        mma_rows16<2>(dp, sdO + (rg * 16) * ldv, ldv, cV + half * 32 * ldv, ldv, nkv, lane);
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int hi = 0; hi < 2; hi++) {
                const int ql = rg * 16 + g + hi * 8, row = q0 + ql;
                const int kl = half * 32 + nt * 8 + 2 * t4;
                const float lrow = hi ? lse_b : lse_a, Drow = hi ? D_b : D_a;
                float ds[2];
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    // rows >= T are never stored and each dQ row depends only on its own dS row,
                    // so only the causal mask of the diagonal block is needed
                    float pr = ex2(fmaf(s[nt][2 * hi + e], scale_log2, -lrow));
                    if (j == qb && k0 + kl + e > row) pr = 0.0f;
                    float m = 1.0f;
                    if constexpr (DROPOUT) m = dropout_mask(drop.key, drop.p, drop.scale, bh, T, row, k0 + kl + e);
                    ds[e] = pr * (m * dp[nt][2 * hi + e] - Drow);
                }
                *reinterpret_cast<uint32_t*>(sdS + ql * LDP + kl) = pack_bf16(ds[0], ds[1]);
            }
        __syncthreads();

        // phase 2: dQ += dS K over this warp's 16 queries x head-dim half
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[4];
            ldsm_x4(a, smem_u32(sdS + (rg * 16 + (lane & 15)) * LDP + kk * 16 + (lane >> 4) * 8));
            mma_rows16_trans<DQK_MAX / 32>(acc, a, cK, ldq, kk, cq0, pq, lane);
        }
    }
    cp_async_wait<0>();

    store_acc(dq + ((long long)b * T * H + h) * dqk, sqk, acc, row_a, T, cq0, 2 * pq, dqk, scale, scale, vec_out, t4);
}

// dq [B, T, H, dqk] = scale dS K from the dS^T tiles the dK/dV kernel kept (ds: its ds_out), so that S and dP
// are not computed a second time; grid (ceil(T/64), B*H), 256 threads; block x owns query block nqb-1-x and
// reads its tiles and the key blocks 0..diagonal (double-buffered). The 8 warps tile the 64 queries x head dim
// as the recomputing kernel's phase 2 does; dS comes in as the A operand through a transposing ldmatrix.
template <int DQK_MAX, bool EXACT>
__global__ void __launch_bounds__(256) attention_backward_dq_from_ds_kernel(bf16* __restrict__ dq, const bf16* __restrict__ ds,
                                                                            const bf16* __restrict__ k, int T, int H, int dqk,
                                                                            float scale, bool vec_qk, bool vec_out) {
    using namespace mla_detail;
    if constexpr (EXACT) dqk = DQK_MAX;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int dqp = pad32(dqk), ldq = dqp + 8;
    bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // [2][64][ldq]
    bf16* sdS = sK + 2 * TILE * ldq;                // [2][64 keys][LDP]

    const int nqb = (T + TILE - 1) / TILE, qb = nqb - 1 - blockIdx.x, q0 = qb * TILE;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const long long sqk = (long long)H * dqk;
    const bf16* kg = k + ((long long)b * T * H + h) * dqk;
    const bf16* dsg = ds + ds_tile_offset(bh, nqb, qb, 0);  // the tiles (qb, 0..qb)
    auto load_ds = [&](bf16* s, int j) {
#pragma unroll
        for (int u = 0; u < TILE * TILE / 8 / 256; u++) {
            const int c = u * 256 + threadIdx.x, r = c / (TILE / 8), col = c % (TILE / 8) * 8;
            cp_async16(smem_u32(s + r * LDP + col), dsg + (long long)j * TILE * TILE + r * TILE + col, 16);
        }
    };
    load_tile<256>(sK, ldq, kg, sqk, 0, T, dqk, dqp, vec_qk);
    load_ds(sdS, 0);
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
    const int rg = warp & 3, half = warp >> 2;  // 16-query row group; head-dim half
    const int pq = dqp / 32, cq0 = half * (dqp / 2);
    float acc[DQK_MAX / 16][4] = {};

    for (int j = 0; j <= qb; j++) {
        const int buf = j & 1;
        const bf16* cK = sK + buf * TILE * ldq;
        const bf16* cdS = sdS + buf * TILE * LDP;
        cp_async_wait<0>();
        __syncthreads();  // tiles of block j landed; every warp is done with block j-1
        if (j < qb) {
            load_tile<256>(sK + (buf ^ 1) * TILE * ldq, ldq, kg, sqk, (j + 1) * TILE, T, dqk, dqp, vec_qk);
            load_ds(sdS + (buf ^ 1) * TILE * LDP, j + 1);
        }
        cp_async_commit();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[4];  // dS rows rg*16.., keys kk*16.., from the [key][query] tile
            ldsm_x4_trans(a, smem_u32(cdS + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDP + rg * 16 + ((lane >> 3) & 1) * 8));
            mma_rows16_trans<DQK_MAX / 32>(acc, a, cK, ldq, kk, cq0, pq, lane);
        }
    }
    cp_async_wait<0>();

    store_acc(dq + ((long long)b * T * H + h) * dqk, sqk, acc, q0 + rg * 16 + g, T, cq0, 2 * pq, dqk, scale, scale, vec_out, t4);
}

namespace mla_detail {

inline void check_attention_shape(int B, int T, int H, int dqk, int dv) {
    if (B < 0 || T < 0 || H <= 0 || dqk <= 0 || dv <= 0 || dqk > 256 || dv > 256)
        fail("attention: unsupported shape B=%d T=%d H=%d dqk=%d dv=%d (head sizes must be 1..256)", B, T, H, dqk, dv);
    if ((long long)B * H > 65535) fail("attention: B*H = %lld exceeds the grid limit 65535", (long long)B * H);
}

// Opts a kernel into more than 48 KiB of dynamic shared memory, with a clear error. `done` (a static of the
// calling launcher, so one per kernel; the launchers are static like the kernels, so each translation unit
// keeps its own) remembers the size already granted per device: after the first call with a shape, later
// calls make no CUDA API call at all, so a step can be captured into a CUDA graph once it has run eagerly.
template <typename K>
inline void set_smem(K kernel, size_t bytes, size_t (&done)[MAX_DEVICES]) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    if (dev < MAX_DEVICES && bytes <= done[dev]) return;
    int optin = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (bytes > (size_t)optin)
        fail("attention: needs %zu bytes of shared memory per block, the GPU allows %d", bytes, optin);
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    if (dev < MAX_DEVICES) done[dev] = bytes;
}

inline bool vec16(const void* p, int d, int H) { return d % 8 == 0 && aligned(p, 16) && ((long long)H * d) % 8 == 0; }
inline bool vec4(const void* p, int d) { return d % 2 == 0 && aligned(p, 4); }

template <int DQK_MAX, int DV_MAX, bool EXACT, bool DROPOUT>
static void launch_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H, int dqk, int dv,
                    float scale, DropoutArgs drop, cudaStream_t stream) {
    const int ldq = pad32(dqk) + 8, ldv = pad32(dv) + 8;
    const size_t smem = (size_t)(2 * TILE * ldq + TILE * ldv) * sizeof(bf16);
    static size_t done[MAX_DEVICES] = {};
    set_smem(attention_forward_kernel<DQK_MAX, DV_MAX, EXACT, DROPOUT>, smem, done);
    dim3 grid(ceil_div(T, TILE), B * H);
    attention_forward_kernel<DQK_MAX, DV_MAX, EXACT, DROPOUT><<<grid, 128, smem, stream>>>(
        out, lse, q, k, v, T, H, dqk, dv, scale * LOG2E, vec16(q, dqk, H) && vec16(k, dqk, H), vec16(v, dv, H), vec4(out, dv), drop);
    CUDA_LAUNCH_CHECK();
}

template <int DQK_MAX, int DV_MAX, bool EXACT, bool DROPOUT>
static void launch_dkdv(bf16* dk, bf16* dvalue, bf16* ds_out, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                        const float* lse, const float* D, int B, int T, int H, int dqk, int dv, float scale, DropoutArgs drop,
                        cudaStream_t stream) {
    const int ldq = pad32(dqk) + 8, ldv = pad32(dv) + 8;
    const size_t smem = (size_t)(3 * TILE * ldq + 3 * TILE * ldv + 2 * TILE * LDP) * sizeof(bf16) + 4 * TILE * sizeof(float);
    static size_t done[MAX_DEVICES] = {};
    set_smem(attention_backward_dkdv_kernel<DQK_MAX, DV_MAX, EXACT, DROPOUT>, smem, done);
    dim3 grid(ceil_div(T, TILE), B * H);
    attention_backward_dkdv_kernel<DQK_MAX, DV_MAX, EXACT, DROPOUT><<<grid, 256, smem, stream>>>(
        dk, dvalue, ds_out, q, k, v, dout, lse, D, T, H, dqk, dv, scale, scale * LOG2E, vec16(q, dqk, H) && vec16(k, dqk, H),
        vec16(v, dv, H) && vec16(dout, dv, H), vec4(dk, dqk), vec4(dvalue, dv), drop);
    CUDA_LAUNCH_CHECK();
}

template <int DQK_MAX, int DV_MAX, bool EXACT, bool DROPOUT>
static void launch_dq(bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D, int B,
               int T, int H, int dqk, int dv, float scale, DropoutArgs drop, cudaStream_t stream) {
    const int ldq = pad32(dqk) + 8, ldv = pad32(dv) + 8;
    const size_t smem = (size_t)(3 * TILE * ldq + 3 * TILE * ldv + TILE * LDP) * sizeof(bf16) + 2 * TILE * sizeof(float);
    static size_t done[MAX_DEVICES] = {};
    set_smem(attention_backward_dq_kernel<DQK_MAX, DV_MAX, EXACT, DROPOUT>, smem, done);
    dim3 grid(ceil_div(T, TILE), B * H);
    attention_backward_dq_kernel<DQK_MAX, DV_MAX, EXACT, DROPOUT><<<grid, 256, smem, stream>>>(
        dq, q, k, v, dout, lse, D, T, H, dqk, dv, scale, scale * LOG2E, vec16(q, dqk, H) && vec16(k, dqk, H),
        vec16(v, dv, H) && vec16(dout, dv, H), vec4(dq, dqk), drop);
    CUDA_LAUNCH_CHECK();
}

template <int DQK_MAX, bool EXACT>
static void launch_dq_from_ds(bf16* dq, const bf16* ds, const bf16* k, int B, int T, int H, int dqk, float scale, cudaStream_t stream) {
    const int ldq = pad32(dqk) + 8;
    const size_t smem = (size_t)(2 * TILE * ldq + 2 * TILE * LDP) * sizeof(bf16);
    static size_t done[MAX_DEVICES] = {};
    set_smem(attention_backward_dq_from_ds_kernel<DQK_MAX, EXACT>, smem, done);
    dim3 grid(ceil_div(T, TILE), B * H);
    attention_backward_dq_from_ds_kernel<DQK_MAX, EXACT><<<grid, 256, smem, stream>>>(dq, ds, k, T, H, dqk, scale, vec16(k, dqk, H),
                                                                                     vec4(dq, dqk));
    CUDA_LAUNCH_CHECK();
}

// f(std::bool_constant<DROPOUT>{}): each kernel has an instantiation without dropout, which draws nothing
template <typename F>
inline void with_dropout(const DropoutArgs& drop, F f) {
    if (drop.p > 0) f(std::true_type{});
    else f(std::false_type{});
}

// the backward's main kernels, each instantiated for the presets' head sizes and for the buckets of dqk (and of
// dv, for dkdv's dV accumulator). ds_out: where dkdv keeps the dS^T tiles (null: nowhere).
inline void backward_dkdv(bf16* dk, bf16* dvalue, bf16* ds_out, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                          const float* lse, const float* D, int B, int T, int H, int dqk, int dv, float scale, DropoutArgs drop,
                          cudaStream_t stream) {
    with_head_sizes<true, true>(dqk, dv, [&](auto qmax, auto vmax, auto exact) {
        with_dropout(drop, [&](auto on) {
            launch_dkdv<qmax, vmax, exact, on>(dk, dvalue, ds_out, q, k, v, dout, lse, D, B, T, H, dqk, dv, scale, drop, stream);
        });
    });
}

inline void backward_dq_from_ds(bf16* dq, const bf16* ds, const bf16* k, int B, int T, int H, int dqk, int dv, float scale,
                                cudaStream_t stream) {
    with_head_sizes<true, false>(dqk, dv, [&](auto qmax, auto, auto exact) {
        launch_dq_from_ds<qmax, exact>(dq, ds, k, B, T, H, dqk, scale, stream);
    });
}

// Up to this length the backward keeps the dS tiles (B*H*T^2 bytes, about: 0.2 GB for small at 16 x 1024) and
// computes dQ from them; longer sequences recompute S and dP in the dQ kernel, keeping memory linear in T.
constexpr int ATTENTION_KEEP_DS_MAX_T = 2048;
inline bool attention_keeps_ds(int T) { return T <= ATTENTION_KEEP_DS_MAX_T; }

// the scratch floats D takes, rounded up to 16 bytes: the dS tiles follow
inline size_t d_floats(int B, int T, int H) { return ((size_t)B * H * T + 3) / 4 * 4; }

inline void backward_dq(bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D, int B,
                        int T, int H, int dqk, int dv, float scale, DropoutArgs drop, cudaStream_t stream) {
    with_head_sizes<true, false>(dqk, dv, [&](auto qmax, auto vmax, auto exact) {
        with_dropout(drop, [&](auto on) {
            launch_dq<qmax, vmax, exact, on>(dq, q, k, v, dout, lse, D, B, T, H, dqk, dv, scale, drop, stream);
        });
    });
}

}  // namespace mla_detail

// Causal attention forward. out [B, T, H, dv] (bf16), lse [B, H, T] (fp32, logsumexp of the scaled scores,
// kept for backward); q, k [B, T, H, dqk], v [B, T, H, dv]; scale = RopeTable::softmax_scale; drop: dropout on
// the probabilities, as reference.h attention_forward. Head sizes 1..256 (multiples of 8 take the fast 16-byte
// load path). Graph capture: run each head-size combination once outside capture first (the shared-memory
// opt-in happens then).
inline void attention_forward_gpu(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H, int dqk,
                                  int dv, float scale, cudaStream_t stream, AttentionDropout drop = {}) {
    using namespace mla_detail;
    check_attention_shape(B, T, H, dqk, dv);
    if (B == 0 || T == 0) return;
    const DropoutArgs args = dropout_args(drop);
    with_head_sizes<false, true>(dqk, dv, [&](auto qmax, auto vmax, auto exact) {
        with_dropout(args, [&](auto on) {
            launch_forward<qmax, vmax, exact, on>(out, lse, q, k, v, B, T, H, dqk, dv, scale, args, stream);
        });
    });
}

// floats of scratch attention_backward_gpu needs: D = rowsum(dout * out), [B, H, T], then, up to
// ATTENTION_KEEP_DS_MAX_T, the bf16 dS^T tiles (dkdv's ds_out), 16-byte aligned
inline size_t attention_backward_scratch_floats(int B, int T, int H) {
    using namespace mla_detail;
    if (!attention_keeps_ds(T)) return d_floats(B, T, H);
    return d_floats(B, T, H) + (size_t)B * H * ds_tiles(ceil_div(T, TILE)) * TILE * TILE / 2;
}

// Causal attention backward: writes dq, dk [B, T, H, dqk] and dvalue [B, T, H, dv] from dout [B, T, H, dv]
// and the forward's out and lse (and its drop). Deterministic: every output element is written by exactly one
// thread after a fixed-order reduction. scratch: attention_backward_scratch_floats(B, T, H) floats.
inline void attention_backward_gpu(bf16* dq, bf16* dk, bf16* dvalue, const bf16* dout, const bf16* out, const float* lse, const bf16* q,
                                   const bf16* k, const bf16* v, int B, int T, int H, int dqk, int dvd, float scale, float* scratch,
                                   cudaStream_t stream, AttentionDropout drop = {}) {
    using namespace mla_detail;
    check_attention_shape(B, T, H, dqk, dvd);
    if (B == 0 || T == 0) return;
    float* D = scratch;
    const long long rows = (long long)B * T * H;
    if (dvd % 8 == 0 && kdetail::aligned16({dout, out}))
        attention_backward_preprocess_pack_kernel<<<ceil_div(rows * 8, 256), 256, 0, stream>>>(D, dout, out, B, T, H, dvd);
    else
        attention_backward_preprocess_kernel<<<(int)((rows + 7) / 8), 256, 0, stream>>>(D, dout, out, B, T, H, dvd);
    CUDA_LAUNCH_CHECK();
    const DropoutArgs args = dropout_args(drop);
    if (attention_keeps_ds(T)) {
        bf16* ds = reinterpret_cast<bf16*>(scratch + d_floats(B, T, H));
        backward_dkdv(dk, dvalue, ds, q, k, v, dout, lse, D, B, T, H, dqk, dvd, scale, args, stream);
        backward_dq_from_ds(dq, ds, k, B, T, H, dqk, dvd, scale, stream);
    } else {
        backward_dkdv(dk, dvalue, nullptr, q, k, v, dout, lse, D, B, T, H, dqk, dvd, scale, args, stream);
        backward_dq(dq, q, k, v, dout, lse, D, B, T, H, dqk, dvd, scale, args, stream);
    }
}

// ----------------------------------------------------------------------------
// The MLA layer, the GPU twin of reference.h's mla_forward / mla_backward (same arguments in the same order, the
// GpuContext last): the kernels above around cuBLASLt projections, bf16 activations, fp32 RMSNorm statistics and lse.

struct MlaActsGpu {
    // one layer's, kept from forward to backward (N = B*T token rows)
    bf16* q;                 // [N, H*dqk], q_pe roped
    bf16 *qa, *qa_norm;      // [N, qr] (q_lora only)
    bf16 *c, *c_norm;        // [N, dc] the latent, before and after its RMSNorm
    bf16* kv_a;              // [N, dc+dr]: only the roped k_pe columns are written and read
    bf16 *k, *v, *o;         // [N, H*dqk], [N, H*dv], [N, H*dv]
    float *qa_rstd, *c_rstd, *lse;  // [N], [N], [N, H]
    AttentionDropout dropout;       // the forward's, which the backward redraws
    // temporaries, one set shared by every layer
    bf16* kv_b;              // [N, H*(dn+dv)], read only inside the forward
    bf16 *d_o, *dq, *dk, *dvalue, *dkv_b, *dkv_a, *dc_norm, *dc, *dqa_norm, *dqa;  // the backward's, shaped as above
};

// the temporaries every layer shares, for N tokens (backward: its gradients too)
inline MlaActsGpu mla_shared_alloc(DeviceArena& arena, const Config& c, int N, bool backward) {
    const int H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
    auto grads = [&](size_t n) { return backward ? arena_alloc<bf16>(arena, (size_t)N * n, "gradients") : nullptr; };
    MlaActsGpu a{};
    a.kv_b = arena_alloc<bf16>(arena, (size_t)N * H * (dn + dv), "activations");
    a.d_o = grads(H * dv);
    a.dq = grads(H * (dn + dr));
    a.dk = grads(H * (dn + dr));
    a.dvalue = grads(H * dv);
    a.dkv_b = grads(H * (dn + dv));
    a.dkv_a = grads(dc + dr);
    a.dc_norm = grads(dc);
    a.dc = grads(dc);
    if (qr > 0) {
        a.dqa_norm = grads(qr);
        a.dqa = grads(qr);
    }
    return a;
}

// one layer's own tensors for N tokens, beside the shared ones
inline MlaActsGpu mla_layer_alloc(DeviceArena& arena, const Config& c, int N, const MlaActsGpu& shared) {
    const int H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dqk = c.qk_nope_head_dim + c.qk_rope_head_dim, dv = c.v_head_dim;
    auto acts = [&](size_t n) { return arena_alloc<bf16>(arena, (size_t)N * n, "activations"); };
    auto acts32 = [&](size_t n) { return arena_alloc<float>(arena, (size_t)N * n, "activations"); };
    MlaActsGpu a = shared;
    if (qr > 0) {
        a.qa = acts(qr);
        a.qa_norm = acts(qr);
        a.qa_rstd = acts32(1);
    }
    a.q = acts(H * dqk);
    a.c = acts(dc);
    a.c_norm = acts(dc);
    a.c_rstd = acts32(1);
    a.kv_a = acts(dc + c.qk_rope_head_dim);
    a.k = acts(H * dqk);
    a.v = acts(H * dv);
    a.o = acts(H * dv);
    a.lse = acts32(H);
    return a;
}

// out [N, D] = MLA(x [N, D]) over B sequences of T tokens; x_fp8: x's FP8 copy (fp8_copy),
// if the norm that made x wrote one
inline void mla_forward_gpu(const Config& c, const MlaWeights<bf16>& w, const RopeGpu& rope, bf16* out, const bf16* x, int B, int T,
                            MlaActsGpu& a, GpuContext& ctx, AttentionDropout drop = {}, const Fp8Matrix& x_fp8 = {}) {
    const int N = B * T, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
    const float eps = c.rms_norm_eps;
    cudaStream_t st = ctx.stream;
    // both projections of x first, so that the latents' norms may then write their FP8 copies over x's.
    // kv_a is one GEMM (its FP8 blocks span both parts); RMSNorm reads the latent as dense rows
    // of dc, RoPE and the K assembly read k_pe in place in kv_a's last dr columns
    linear_forward_gpu(qr > 0 ? a.qa : a.q, x, qr > 0 ? w.q_a : w.q_proj, N, ctx, x_fp8);
    linear_forward_gpu(a.kv_a, x, w.kv_a, N, ctx, x_fp8);
    if (qr > 0) {
        const Fp8Matrix qa_fp8 = fp8_input_copy(ctx, w.q_b, N);
        rmsnorm_residual_forward_gpu(nullptr, a.qa_norm, a.qa_rstd, a.qa, nullptr, w.q_a_norm, N, qr, eps, st, qa_fp8);
        linear_forward_gpu(a.q, a.qa_norm, w.q_b, N, ctx, qa_fp8);
    }
    CUDA_CHECK(cudaMemcpy2DAsync(a.c, dc * sizeof(bf16), a.kv_a, (dc + dr) * sizeof(bf16), dc * sizeof(bf16), N, cudaMemcpyDeviceToDevice, st));
    const Fp8Matrix c_fp8 = fp8_input_copy(ctx, w.kv_b, N);
    rmsnorm_residual_forward_gpu(nullptr, a.c_norm, a.c_rstd, a.c, nullptr, w.kv_a_norm, N, dc, eps, st, c_fp8);
    linear_forward_gpu(a.kv_b, a.c_norm, w.kv_b, N, ctx, c_fp8);
    rope_forward_gpu(a.q, a.kv_a, rope, N, T, H, dn, dc, 0, st);
    mla_assemble_kv_gpu(a.k, a.v, a.kv_b, a.kv_a, N, H, dn, dr, dv, dc, st);
    a.dropout = drop;
    attention_forward_gpu(a.o, a.lse, a.q, a.k, a.v, B, T, H, dn + dr, dv, rope.softmax_scale, st, drop);
    linear_forward_gpu(out, a.o, w.o_proj, N, ctx);
}

// dx [N, D] (written) from dout [N, D]; weight gradients added into dw. ctx.scratch
// holds attention_backward_scratch_floats and rmsnorm_backward_scratch_bytes.
inline void mla_backward_gpu(const Config& c, const MlaWeights<bf16>& w, const MlaWeights<float>& dw, const RopeGpu& rope, bf16* dx,
                             const bf16* dout, const bf16* x, int B, int T, const MlaActsGpu& a, GpuContext& ctx) {
    const int N = B * T, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
    cudaStream_t st = ctx.stream;
    kdetail::check_scratch(ctx.scratch_bytes, attention_backward_scratch_floats(B, T, H) * sizeof(float), "attention_backward_gpu");
    linear_backward_gpu(a.d_o, dw.o_proj, dout, a.o, w.o_proj, N, false, ctx);
    attention_backward_gpu(a.dq, a.dk, a.dvalue, a.d_o, a.o, a.lse, a.q, a.k, a.v, B, T, H, dn + dr, dv, rope.softmax_scale,
                           (float*)ctx.scratch, st, a.dropout);
    mla_assemble_kv_backward_gpu(a.dkv_b, a.dkv_a, a.dk, a.dvalue, N, H, dn, dr, dv, dc, st);
    rope_backward_gpu(a.dq, a.dkv_a, rope, N, T, H, dn, dc, 0, st);
    linear_backward_gpu(a.dc_norm, dw.kv_b, a.dkv_b, a.c_norm, w.kv_b, N, false, ctx);
    rmsnorm_backward_gpu(a.dc, dw.kv_a_norm, nullptr, a.dc_norm, a.c, w.kv_a_norm, a.c_rstd, N, dc, ctx.scratch, ctx.scratch_bytes, st);
    CUDA_CHECK(cudaMemcpy2DAsync(a.dkv_a, (dc + dr) * sizeof(bf16), a.dc, dc * sizeof(bf16), dc * sizeof(bf16), N, cudaMemcpyDeviceToDevice, st));
    linear_backward_gpu(dx, dw.kv_a, a.dkv_a, x, w.kv_a, N, false, ctx);
    if (qr > 0) {
        linear_backward_gpu(a.dqa_norm, dw.q_b, a.dq, a.qa_norm, w.q_b, N, false, ctx);
        rmsnorm_backward_gpu(a.dqa, dw.q_a_norm, nullptr, a.dqa_norm, a.qa, w.q_a_norm, a.qa_rstd, N, qr, ctx.scratch, ctx.scratch_bytes, st);
        linear_backward_gpu(dx, dw.q_a, a.dqa, x, w.q_a, N, true, ctx);
    } else {
        linear_backward_gpu(dx, dw.q_proj, a.dq, x, w.q_proj, N, true, ctx);
    }
}
