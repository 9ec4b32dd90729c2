// decode.cuh — generation on the GPU: the absorbed-MLA decode kernels, flash-decoding attention over the latent cache
// (one head a block, or from 16 rows 16 heads a block on tensor cores), GPU sampling, self-speculative decoding's
// verdict, and the GpuDecoder that strings them into prefill + one-token-per-sequence (or speculative) steps
// (implemented in decode.cu). decode.h is the CPU version of the same math; read its header comment first.
//
// The cache: bf16 [layers][batch][max_len][dc + dr], row t of sequence b holding [RMSNorm(c_t) (dc); roped k_pe_t (dr)]
// of layer l. Per step, for B sequences (one token each, at position pos[b]) and each layer:
//   kv [B, dc+dr] = xn @ W_kv_a^T         -> decode_attention_inputs_gpu: the cache's row pos[b] (RMSNorm, RoPE)
//   q  [B, H, dn+dr]                      -> and qlat [B, H, dc+dr] fp32 = [W_UK_h^T q_nope; rope(q_pe)]
//   flash_decode_gpu: o_lat [B, H, dc] fp32 = softmax(qlat . cache[0..pos]) @ cache[:, :dc]
//   decode_value_up_gpu: o [B, H*dv] bf16 = W_UV_h o_lat
// then o_proj, the FFN/MoE, the head, and sample_gpu picks the next tokens. A step of up to GEMV_MAX_ROWS rows runs
// its Linears on kernels.cuh's gemv_forward_gpu and its MoE layers on moe.cuh's moe_decode_forward_gpu (cuBLASLt's
// GEMMs and the grouped expert GEMM are built for many rows), with the norms folded into the GEMVs that read them
// (decode.cu, decode_fused); larger steps run them as training does. Every kernel
// reads the positions and flags from device memory, so one captured CUDA graph replays every step.
#pragma once

#include <climits>

#include "decode.h"
#include "gpu_model.cuh"

// ----------------------------------------------------------------------------
// A step's rows, from the sequences' positions: row b of B is a token of sequence s = b % seqs at position
// pos[s] + b / seqs + shift (B = seqs: one token per sequence, at pos[s]; self-speculative decoding runs B = 2 seqs,
// rows s and seqs + s being two consecutive positions of sequence s: the main model's at pos[s] and pos[s] + 1, the
// MTP module's two positions before, shift -2). Positions are clamped to the sequence's cache rows 0..max_len-1: a
// speculative sequence can step past its last row and a prompt can fill the cache (the host stops such a sequence,
// but its rows still run), and the MTP module's first row is before position 0 after a one-token prompt.
struct DecodeRows {
    const int* pos;  // [seqs] the sequences' positions (GpuDecoder's pos)
    int seqs, shift, max_len;
};

__device__ inline int row_position(const DecodeRows& r, int b) {
    return max(0, min(r.pos[b % r.seqs] + b / r.seqs + r.shift, r.max_len - 1));
}

// The attention inputs of a step, in one launch (at batch 1 each launch costs more than its work): blocks 0..B-1 write
// the new cache rows, the rest the absorbed queries.
//
// The new cache row of each step row: cache_s[p] = [w * RMSNorm(kv[b, :dc]); rope(kv[b, dc:], p)], s = b % seqs,
// p = row_position(b). kv [B, dc+dr] bf16 (the W_kv_a GEMM), weight [dc], cache [seqs, max_len, dc+dr]. One block
// per row; fp32 math, one rounding, as the training kernels (RMSNorm of the bf16 c, RoPE of the bf16 k_pe).
__device__ inline void decode_cache_write_row(bf16* cache, const bf16* kv, const bf16* weight, const float2* rope_cs, const DecodeRows& rows,
                                              int b, int dc, int dr, float eps) {
    const int width = dc + dr, p = row_position(rows, b);
    const bf16* x = kv + (size_t)b * width;
    bf16* row = cache + ((size_t)(b % rows.seqs) * rows.max_len + p) * width;
    float ss = 0;
    for (int j = threadIdx.x; j < dc; j += blockDim.x) {
        const float v = __bfloat162float(x[j]);
        ss += v * v;
    }
    const float rstd = rsqrtf(kdetail::block_sum_t(ss) / dc + eps);
    for (int j = threadIdx.x; j < dc; j += blockDim.x)
        row[j] = __float2bfloat16(__bfloat162float(weight[j]) * (__bfloat162float(x[j]) * rstd));
    const int half = dr / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float2 r = rope_cs[(size_t)p * half + i];
        const float x0 = __bfloat162float(x[dc + 2 * i]), x1 = __bfloat162float(x[dc + 2 * i + 1]);
        row[dc + 2 * i] = __float2bfloat16(x0 * r.x - x1 * r.y);
        row[dc + 2 * i + 1] = __float2bfloat16(x1 * r.x + x0 * r.y);
    }
}

// Absorbed query: qlat[b, h] = [W_UK_h^T q_nope[b, h] (dc); rope(q_pe[b, h], row_position(b)) (dr)] in fp32, with
// W_UK_h = rows h*(dn+dv) .. h*(dn+dv)+dn-1 of kv_b [H*(dn+dv), dc]. A block per (head h, 64 latent columns `tile`,
// DECODE_SEQS sequences from b0), 256 threads: 64 latent columns (coalesced rows of W_UK_h) by 4 groups that each sum
// every 4th of the dn rows, for DECODE_SEQS sequences at once so W_UK_h is read once per DECODE_SEQS; the 4 partial
// sums are added in group order. Many small blocks: at batch 1 this is a latency-bound product, and one block per head
// would serialise its loads.
constexpr int DECODE_SEQS = 8;

__device__ inline void decode_absorb_query_tile(float* qlat, const bf16* q, const bf16* kv_b, const float2* rope_cs, const DecodeRows& rows,
                                                int h, int tile, int b0, int B, int H, int dn, int dr, int dv, int dc) {
    extern __shared__ float q_nope[];                // [DECODE_SEQS, dn]
    __shared__ float partial[4][DECODE_SEQS][64];
    const int nb = min(DECODE_SEQS, B - b0), dqk = dn + dr, width = dc + dr;
    const int col = threadIdx.x % 64, group = threadIdx.x / 64, j = tile * 64 + col;
    for (int i = threadIdx.x; i < nb * dn; i += blockDim.x)
        q_nope[i] = __bfloat162float(q[((size_t)(b0 + i / dn) * H + h) * dqk + i % dn]);
    __syncthreads();
    const bf16* w_uk = kv_b + (size_t)h * (dn + dv) * dc;
    float acc[DECODE_SEQS] = {};
    if (j < dc) {
#pragma unroll 4
        for (int i = group; i < dn; i += 4) {
            const float w = __bfloat162float(w_uk[(size_t)i * dc + j]);
#pragma unroll
            for (int s = 0; s < DECODE_SEQS; s++) acc[s] += q_nope[(s < nb ? s : 0) * dn + i] * w;
        }
    }
#pragma unroll
    for (int s = 0; s < DECODE_SEQS; s++) partial[group][s][col] = acc[s];
    __syncthreads();
    if (group == 0 && j < dc)
        for (int s = 0; s < nb; s++)
            qlat[((size_t)(b0 + s) * H + h) * width + j] = ((partial[0][s][col] + partial[1][s][col]) + partial[2][s][col]) + partial[3][s][col];
    if (tile > 0) return;
    const int half = dr / 2;
    for (int k = threadIdx.x; k < nb * half; k += blockDim.x) {
        const int s = k / half, i = k % half, b = b0 + s;
        const float2 r = rope_cs[(size_t)row_position(rows, b) * half + i];
        const bf16* pe = q + ((size_t)b * H + h) * dqk + dn;
        const float x0 = __bfloat162float(pe[2 * i]), x1 = __bfloat162float(pe[2 * i + 1]);
        float* out = qlat + ((size_t)b * H + h) * width + dc;
        out[2 * i] = x0 * r.x - x1 * r.y;
        out[2 * i + 1] = x1 * r.x + x0 * r.y;
    }
}

static __global__ void __launch_bounds__(256)
    decode_attention_inputs_kernel(bf16* cache, float* qlat, const bf16* kv, const bf16* kv_a_norm, const bf16* q, const bf16* kv_b,
                                   const float2* rope_cs, DecodeRows rows, int B, int H, int dn, int dr, int dv, int dc, float eps) {
    grid_dependency_wait();  // launched early (launch_programmatic): everything it reads but the weights comes from the kernels ahead
    grid_dependents_launch();
    if ((int)blockIdx.x < B) {
        decode_cache_write_row(cache, kv, kv_a_norm, rope_cs, rows, blockIdx.x, dc, dr, eps);
        return;
    }
    const int i = blockIdx.x - B, tiles = (dc + 63) / 64;
    decode_absorb_query_tile(qlat, q, kv_b, rope_cs, rows, i % H, i / H % tiles, i / (H * tiles) * DECODE_SEQS, B, H, dn, dr, dv, dc);
}

// cache [seqs, max_len, dc+dr] takes the rows of kv [B, dc+dr] (W_kv_a's output; kv_a_norm its norm's weight [dc]) and
// qlat [B, H, dc+dr] fp32 the absorbed queries of q [B, H, dn+dr]; kv_b [H*(dn+dv), dc]
inline void decode_attention_inputs_gpu(bf16* cache, float* qlat, const bf16* kv, const bf16* kv_a_norm, const bf16* q, const bf16* kv_b,
                                        const RopeGpu& rope, const DecodeRows& rows, int B, int H, int dn, int dr, int dv, int dc, float eps,
                                        cudaStream_t stream) {
    const int blocks = B + H * ceil_div(dc, 64) * ceil_div(B, DECODE_SEQS);
    launch_programmatic(decode_attention_inputs_kernel, dim3(blocks), dim3(256), DECODE_SEQS * dn * sizeof(float), stream, cache, qlat, kv,
                        kv_a_norm, q, kv_b, rope.cs, rows, B, H, dn, dr, dv, dc, eps);
}

// ----------------------------------------------------------------------------
// Flash decoding, one head a block: one query per (row, head) over its sequence's cache rows 0..row_position(b). A
// single query is too little work for one block per (b, h) when the batch is small, so the rows are split into `splits`
// contiguous ranges, one block each (grid (splits, H, B)); every block writes a partial (max, sum, unnormalised output)
// in the log2 domain, and the last block of a (b, h) to finish (a counter per (b, h), reset by that block for the next
// step) merges the splits with their log-sum-exp weights in split order, so the result is deterministic and the merge
// needs no launch of its own. Keys are the whole cache row (dc+dr), values its first dc columns: all heads share them
// (the absorbed form).
//
// Inside a block each warp takes every NWARPS-th row, FLASH_DECODE_ROWS of them at a time: the lanes split the rows' dot
// products (warp_sum), then each lane updates its dc/32 output accumulators with the online softmax, once for the
// group. A warp's rows are few (about 3 at batch 1 and 256 cached rows), so their loads in flight together, not one
// row's after another's, are what sets the kernel's time. The warps' states merge in shared memory at the end.
constexpr int FLASH_DECODE_WARPS = 4;
constexpr int FLASH_DECODE_ROWS = 4;

template <int DCL>  // latent columns per lane: dc <= 32 * DCL
static __global__ void __launch_bounds__(FLASH_DECODE_WARPS * 32)
    flash_decode_head_kernel(float* o_lat, float* part_acc, float2* part_ml, int* done, const float* qlat, const bf16* cache,
                             DecodeRows rows, int H, int dc, int dr, float scale_log2) {
    grid_dependency_wait();  // launched early (launch_programmatic): everything it reads but the weights comes from the kernels ahead
    grid_dependents_launch();
    extern __shared__ float smem[];
    const int width = dc + dr, splits = gridDim.x, s = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float* q_s = smem;                          // [width], pre-scaled by scale * log2(e)
    float* acc_s = smem + width;                // [WARPS, dc]
    float2* ml_s = (float2*)(acc_s + FLASH_DECODE_WARPS * dc);  // [WARPS]; in the merge, ml_s[0].x carries the total l
    const int len = row_position(rows, b) + 1, chunk = (len + splits - 1) / splits, t0 = s * chunk, t1 = min(len, t0 + chunk);
    for (int j = threadIdx.x; j < width; j += blockDim.x) q_s[j] = qlat[((size_t)b * H + h) * width + j] * scale_log2;
    __syncthreads();
    float m = -INFINITY, l = 0, acc[DCL] = {};
    const bf16* seq = cache + (size_t)(b % rows.seqs) * rows.max_len * width;
    constexpr int W = FLASH_DECODE_WARPS, G = FLASH_DECODE_ROWS;
    for (int t = t0 + warp; t < t1; t += W * G) {
        // rows t, t + W, ..., t + (G - 1) W of this warp; a row past t1 repeats row t with no weight
        const bf16* row[G];
        float d[G] = {};
#pragma unroll
        for (int g = 0; g < G; g++) row[g] = seq + (size_t)(t + g * W < t1 ? t + g * W : t) * width;
        for (int j = lane; j < width; j += 32) {
            const float qj = q_s[j];
#pragma unroll
            for (int g = 0; g < G; g++) d[g] += qj * __bfloat162float(row[g][j]);
        }
        float m_new = m, p[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            d[g] = warp_sum(d[g]);
            if (t + g * W < t1) m_new = fmaxf(m_new, d[g]);
        }
        const float corr = exp2f(m - m_new);
        l *= corr;
#pragma unroll
        for (int g = 0; g < G; g++) {
            p[g] = t + g * W < t1 ? exp2f(d[g] - m_new) : 0.0f;
            l += p[g];
        }
#pragma unroll
        for (int i = 0; i < DCL; i++) {
            const int j = lane + 32 * i;
            if (j >= dc) continue;
            float a = acc[i] * corr;
#pragma unroll
            for (int g = 0; g < G; g++) a += p[g] * __bfloat162float(row[g][j]);
            acc[i] = a;
        }
        m = m_new;
    }
#pragma unroll
    for (int i = 0; i < DCL; i++)
        if (lane + 32 * i < dc) acc_s[warp * dc + lane + 32 * i] = acc[i];
    if (lane == 0) ml_s[warp] = make_float2(m, l);
    __syncthreads();
    // merge the warps in warp order
    float M = -INFINITY;
    for (int w = 0; w < FLASH_DECODE_WARPS; w++) M = fmaxf(M, ml_s[w].x);
    float L = 0;
    for (int w = 0; w < FLASH_DECODE_WARPS; w++) L += M == -INFINITY ? 0.0f : ml_s[w].y * exp2f(ml_s[w].x - M);
    const size_t bh = (size_t)b * H + h, part = bh * splits + s;
    for (int j = threadIdx.x; j < dc; j += blockDim.x) {
        float o = 0;
        for (int w = 0; w < FLASH_DECODE_WARPS; w++) o += M == -INFINITY ? 0.0f : acc_s[w * dc + j] * exp2f(ml_s[w].x - M);
        part_acc[part * dc + j] = o;
    }
    if (threadIdx.x == 0) part_ml[part] = make_float2(M, L);

    // the last block of (b, h): o_lat = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), splits in order. The fence
    // makes this block's partial visible before its count; the last block reads the others' past L1 (__ldcg).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&done[bh], 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    // acc_s is spent: the splits' (m, l) in its first 2 * splits floats, then their weights
    float2* ml_all = (float2*)acc_s;
    float* weight_s = acc_s + 2 * splits;
    for (int k = threadIdx.x; k < splits; k += blockDim.x) ml_all[k] = __ldcg(&part_ml[bh * splits + k]);
    __syncthreads();
    if (threadIdx.x == 0) {
        float M_all = -INFINITY, L_all = 0;
        for (int k = 0; k < splits; k++) M_all = fmaxf(M_all, ml_all[k].x);
        for (int k = 0; k < splits; k++) {
            weight_s[k] = ml_all[k].x == -INFINITY ? 0.0f : exp2f(ml_all[k].x - M_all);
            L_all += ml_all[k].y * weight_s[k];
        }
        ml_s[0].x = L_all;
        done[bh] = 0;  // ready for the next step
    }
    __syncthreads();
    const float L_all = ml_s[0].x;
    // four columns a thread where they pack into float4s: the splits' loads are the merge's latency, and this puts
    // them all in flight in one pass over the columns instead of four (the same sums, column by column)
    const bool packed = dc % 4 == 0;
    const int cols = packed ? 4 : 1;
    for (int j = cols * threadIdx.x; j < dc; j += cols * blockDim.x) {
        float o[4] = {};
#pragma unroll 8
        for (int k = 0; k < splits; k++) {
            const float* p = &part_acc[(bh * splits + k) * dc + j];
            float v[4] = {};
            if (packed) {
                const float4 q = __ldcg(reinterpret_cast<const float4*>(p));
                v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
            } else {
                v[0] = __ldcg(p);
            }
#pragma unroll
            for (int i = 0; i < 4; i++) o[i] += weight_s[k] == 0.0f ? 0.0f : v[i] * weight_s[k];
        }
        for (int i = 0; i < cols; i++) o_lat[bh * dc + j + i] = o[i] / L_all;
    }
}

// flash_decode_gpu (at the end of this section), one (row, head) a block
inline void flash_decode_head_gpu(float* o_lat, float* part_acc, float2* part_ml, int* done, const float* qlat, const bf16* cache,
                                  const DecodeRows& rows, int B, int H, int dc, int dr, int splits, float scale, cudaStream_t stream) {
    if (dc > 32 * 32) fail("flash_decode: kv_lora_rank %d exceeds the supported 1024", dc);
    if (3 * splits > FLASH_DECODE_WARPS * dc) fail("flash_decode: %d splits exceed the merge's room for %d", splits, FLASH_DECODE_WARPS * dc / 3);
    const int dcl = ceil_div(dc, 32);
    auto kernel = dcl <= 1 ? flash_decode_head_kernel<1> : dcl <= 2 ? flash_decode_head_kernel<2>
                : dcl <= 4 ? flash_decode_head_kernel<4> : dcl <= 8 ? flash_decode_head_kernel<8>
                : dcl <= 16 ? flash_decode_head_kernel<16> : flash_decode_head_kernel<32>;
    const size_t smem = ((size_t)(dc + dr) + FLASH_DECODE_WARPS * dc + 2 * FLASH_DECODE_WARPS) * sizeof(float);
    if (smem > 48 * 1024) fail("flash_decode: %zu bytes of shared memory for kv_lora_rank %d exceed 48 KiB", smem, dc);
    launch_programmatic(kernel, dim3(splits, H, B), dim3(FLASH_DECODE_WARPS * 32), smem, stream, o_lat, part_acc, part_ml, done, qlat, cache, rows,
                        H, dc, dr, scale * 1.4426950408889634f);
}

// ----------------------------------------------------------------------------
// Flash decoding, 16 heads a block: the same queries, split and merge as above, but in the absorbed form every head's
// keys and values are the same cache rows, so a block takes 16 heads at once and reads each cache row once for all of
// them: the heads are the 16 rows of mma.sync m16n8k16 tiles, S = Q K^T and O += P V on tensor cores, as in FlashMLA.
// Grid (splits, head groups, B); a split is at least FLASH_DECODE_MIN_KEYS rows, and the blocks past a sequence's
// length exit. The last block of a (b, head group) merges the group's 16 heads.
//
// The operands are fp32 (the absorbed queries, the probabilities) times bf16 (the cache). Each fp32 operand goes in as
// two bf16 terms, hi = bf16(x) and lo = bf16(x - hi), so the products carry 16 bits of its mantissa and the result is
// as close to the fp32 computation as the fp32 accumulation allows: the tensor cores' speed without bf16's rounding.
//
// A block is 4 warps. Per tile of FLASH_DECODE_KEYS cache rows (cp.async into shared memory, the next tile's loads in
// flight during this one's math; rows padded to 8 more than pad32(dc+dr) so that ldmatrix is conflict free and the
// padding columns are zero): warp w scores keys 8w..8w+7 for the 16 heads; the tile's max per head goes through
// shared memory, so every warp applies the same running max; the probabilities go to shared memory as hi and lo; then
// warp w adds P V into its quarter of the dc output columns.
constexpr int FLASH_DECODE_HEADS = 16;  // the mma's rows
constexpr int FLASH_DECODE_KEYS = 32;   // cache rows a tile: 8 per warp
constexpr int FLASH_DECODE_MIN_KEYS = 64;  // a split's rows at least: the merge reads 16 heads' partials of each split

__host__ __device__ inline int flash_decode_ld(int dc, int dr) { return mla_detail::pad32(dc + dr) + 8; }

// the tiles, the queries, the probabilities and the max and sum of each warp; the merge's weights take their place
inline size_t flash_decode_smem_bytes(int dc, int dr, int splits) {
    const int ld = flash_decode_ld(dc, dr), HEADS = FLASH_DECODE_HEADS, KEYS = FLASH_DECODE_KEYS;
    const size_t tiles = ((size_t)2 * KEYS * ld + 2 * HEADS * ld + 2 * HEADS * (KEYS + 8)) * sizeof(bf16) +
                         2 * FLASH_DECODE_WARPS * HEADS * sizeof(float);
    return std::max(tiles, ((size_t)HEADS * splits + HEADS) * sizeof(float));
}

// x as hi + lo, two bf16 (see above), packed in pairs
__device__ inline void split_bf16_pair(uint32_t& hi, uint32_t& lo, float x0, float x1) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = mla_detail::pack_bf16(x0 - __low2float(h), x1 - __high2float(h));
}

// rows t .. t+KEYS-1 of a sequence's cache (those < t1; columns < width) into k_s [KEYS, ld], zero elsewhere. A thread
// steps through the 16-byte chunks blockDim.x apart by adding, not dividing: the loop runs every tile, and a division
// a chunk was about half of its instructions.
__device__ inline void flash_decode_load_keys(bf16* k_s, int ld, const bf16* seq, int width, int t, int t1, bool vec) {
    const int chunks = (ld - 8) / 8, row_step = blockDim.x / chunks, col_step = blockDim.x % chunks * 8;
    int r = threadIdx.x / chunks, col = threadIdx.x % chunks * 8;
    while (r < FLASH_DECODE_KEYS) {
        bf16* dst = k_s + r * ld + col;
        if (vec) {
            const bool ok = t + r < t1 && col < width;
            cp_async16(smem_u32(dst), ok ? (const void*)(seq + (size_t)(t + r) * width + col) : (const void*)seq, ok ? 16 : 0);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++)
                dst[e] = t + r < t1 && col + e < width ? seq[(size_t)(t + r) * width + col + e] : __float2bfloat16(0.0f);
        }
        r += row_step, col += col_step;
        if (col >= 8 * chunks) r++, col -= 8 * chunks;
    }
}

// the 16 heads' queries, times scale_log2, as hi and lo [HEADS, ld] (zero past H and past width). A thread's loads of
// four float4s go out before their stores: one after another, each waited for the last one's store, and this loop
// was a third of the kernel's time.
__device__ inline void flash_decode_load_queries(bf16* qhi_s, bf16* qlo_s, int ld, const float* qlat, int b, int h0, int H, int width,
                                                 float scale_log2) {
    const int quads = (ld - 8) / 4, n = FLASH_DECODE_HEADS * quads;
    const bool vec = width % 4 == 0;
    for (int base = threadIdx.x; base < n; base += 4 * blockDim.x) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = base + u * blockDim.x, r = i / quads, j = i % quads * 4;
            const float* q = qlat + ((size_t)b * H + h0 + r) * width + j;
            float x[4] = {};
            if (i < n && h0 + r < H) {
                if (vec) {
                    if (j < width) {
                        const float4 w = *reinterpret_cast<const float4*>(q);
                        x[0] = w.x, x[1] = w.y, x[2] = w.z, x[3] = w.w;
                    }
                } else {
#pragma unroll
                    for (int e = 0; e < 4; e++) x[e] = j + e < width ? q[e] : 0.0f;
                }
            }
            v[u] = make_float4(x[0] * scale_log2, x[1] * scale_log2, x[2] * scale_log2, x[3] * scale_log2);
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = base + u * blockDim.x, r = i / quads, j = i % quads * 4;
            if (i >= n) break;
            uint32_t* hi = reinterpret_cast<uint32_t*>(qhi_s + r * ld + j);
            uint32_t* lo = reinterpret_cast<uint32_t*>(qlo_s + r * ld + j);
            split_bf16_pair(hi[0], lo[0], v[u].x, v[u].y);
            split_bf16_pair(hi[1], lo[1], v[u].z, v[u].w);
        }
    }
}

template <int NT>  // n8 tiles of output columns a warp: dc <= FLASH_DECODE_WARPS * 8 * NT
static __global__ void __launch_bounds__(FLASH_DECODE_WARPS * 32)
    flash_decode_group_kernel(float* o_lat, float* part_acc, float2* part_ml, int* done, const float* qlat, const bf16* cache,
                              DecodeRows rows, int H, int dc, int dr, float scale_log2, bool vec) {
    constexpr int HEADS = FLASH_DECODE_HEADS, KEYS = FLASH_DECODE_KEYS, W = FLASH_DECODE_WARPS, LDP = KEYS + 8;
    grid_dependency_wait();  // launched early (launch_programmatic): everything it reads comes from the kernels ahead
    grid_dependents_launch();
    extern __shared__ __align__(16) unsigned char flash_smem[];
    const int width = dc + dr, ld = flash_decode_ld(dc, dr), wp = ld - 8;
    const int splits = gridDim.x, s = blockIdx.x, h0 = blockIdx.y * HEADS, b = blockIdx.z;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t4 = lane % 4;
    bf16* k_s = (bf16*)flash_smem;      // [2][KEYS, ld]: tiles i and i + 1
    bf16* qhi_s = k_s + 2 * KEYS * ld;  // [HEADS, ld], pre-scaled by scale * log2(e)
    bf16* qlo_s = qhi_s + HEADS * ld;
    bf16* phi_s = qlo_s + HEADS * ld;  // [HEADS, LDP]
    bf16* plo_s = phi_s + HEADS * LDP;
    float* max_s = (float*)(plo_s + HEADS * LDP);  // [W, HEADS]
    float* l_s = max_s + W * HEADS;                // [W, HEADS]

    const int len = row_position(rows, b) + 1;
    const int chunk = (max((len + splits - 1) / splits, FLASH_DECODE_MIN_KEYS) + KEYS - 1) / KEYS * KEYS, used = (len + chunk - 1) / chunk;
    if (s >= used) return;
    const int t0 = s * chunk, t1 = min(len, t0 + chunk);
    const bf16* seq = cache + (size_t)(b % rows.seqs) * rows.max_len * width;
    flash_decode_load_keys(k_s, ld, seq, width, t0, t1, vec);
    cp_async_commit();
    if (t0 + KEYS < t1) flash_decode_load_keys(k_s + KEYS * ld, ld, seq, width, t0 + KEYS, t1, vec);
    cp_async_commit();  // (an empty group when there is no second tile: one group is always in flight behind the tile)
    flash_decode_load_queries(qhi_s, qlo_s, ld, qlat, b, h0, H, width, scale_log2);

    // this thread's rows of the tiles: heads g and g + 8; its output columns c0 + 8 nt + 2 t4 (+1)
    float acc[NT][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
    const int c0 = warp * 8 * NT, pairs = max(0, min(NT / 2, (dc - c0 + 15) / 16));
    for (int t = t0; t < t1; t += KEYS) {
        const bf16* tile = k_s + ((t - t0) / KEYS % 2) * KEYS * ld;
        cp_async_wait<1>();
        __syncthreads();  // the tile (and at the first, the queries) in shared memory
        // S [16 heads, keys 8 warp ..] = Q K^T, two 16-wide steps of k per ldmatrix of the keys. hi and lo, and the
        // two steps, in four accumulators: four chains of dependent mma a quarter as long as one
        float part[4][4] = {};
        for (int kk = 0; kk < wp / 16; kk += 2) {
            uint32_t kb[4];
            ldsm_x4(kb, smem_u32(tile + (8 * warp + (lane & 7)) * ld + kk * 16 + (lane >> 3) * 8));
#pragma unroll
            for (int u = 0; u < 2; u++) {
                uint32_t a[4];
                const int off = (lane & 15) * ld + (kk + u) * 16 + (lane >> 4) * 8;
                ldsm_x4(a, smem_u32(qhi_s + off));
                mma16816(part[u], a, kb[2 * u], kb[2 * u + 1]);
                ldsm_x4(a, smem_u32(qlo_s + off));
                mma16816(part[2 + u], a, kb[2 * u], kb[2 * u + 1]);
            }
        }
        float sc[4];
#pragma unroll
        for (int i = 0; i < 4; i++) sc[i] = (part[0][i] + part[1][i]) + (part[2][i] + part[3][i]);
        const int key = t + 8 * warp + 2 * t4;
        if (key >= t1) sc[0] = sc[2] = -INFINITY;
        if (key + 1 >= t1) sc[1] = sc[3] = -INFINITY;
        float mx[2] = {fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3])};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            if (t4 == 0) max_s[warp * HEADS + g + 8 * r] = mx[r];
        }
        __syncthreads();
        float corr[2], p[4];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float m_new = m[r];
#pragma unroll
            for (int w = 0; w < W; w++) m_new = fmaxf(m_new, max_s[w * HEADS + g + 8 * r]);
            corr[r] = exp2f(m[r] - m_new);  // the tile has a valid key: m_new is finite
            p[2 * r] = exp2f(sc[2 * r] - m_new);
            p[2 * r + 1] = exp2f(sc[2 * r + 1] - m_new);
            l[r] = l[r] * corr[r] + p[2 * r] + p[2 * r + 1];
            m[r] = m_new;
            split_bf16_pair(*(uint32_t*)&phi_s[(g + 8 * r) * LDP + 8 * warp + 2 * t4], *(uint32_t*)&plo_s[(g + 8 * r) * LDP + 8 * warp + 2 * t4],
                            p[2 * r], p[2 * r + 1]);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            acc[nt][0] *= corr[0], acc[nt][1] *= corr[0];
            acc[nt][2] *= corr[1], acc[nt][3] *= corr[1];
        }
        __syncthreads();  // the probabilities in shared memory
        // O [16 heads, this warp's columns] += P V, V = the tile's first dc columns
#pragma unroll
        for (int kk = 0; kk < KEYS / 16; kk++) {
            uint32_t a[4];
            const int off = (lane & 15) * LDP + kk * 16 + (lane >> 4) * 8;
            ldsm_x4(a, smem_u32(phi_s + off));
            mla_detail::mma_rows16_trans<NT / 2>(acc, a, tile, ld, kk, c0, pairs, lane);
            ldsm_x4(a, smem_u32(plo_s + off));
            mla_detail::mma_rows16_trans<NT / 2>(acc, a, tile, ld, kk, c0, pairs, lane);
        }
        __syncthreads();  // every warp is done with the tile and the probabilities: the tile after next takes its place
        if (t + 2 * KEYS < t1) flash_decode_load_keys((bf16*)tile, ld, seq, width, t + 2 * KEYS, t1, vec);
        cp_async_commit();
    }

    // the split's partial: l summed over the quad's lanes and the warps (each summed its own keys); every warp holds
    // the same running max, so warp 0's goes to max_s
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (t4 == 0) l_s[warp * HEADS + g + 8 * r] = l[r];
        if (t4 == 0 && warp == 0) max_s[g + 8 * r] = m[r];
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int h = h0 + g + 8 * r;
        if (h >= H) continue;
        float* out = part_acc + (((size_t)b * H + h) * splits + s) * dc;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int col = c0 + 8 * nt + 2 * t4;
            if (col < dc) out[col] = acc[nt][2 * r];
            if (col + 1 < dc) out[col + 1] = acc[nt][2 * r + 1];
        }
    }
    __syncthreads();
    if (threadIdx.x < HEADS && h0 + threadIdx.x < H) {
        float sum = 0;
        for (int w = 0; w < W; w++) sum += l_s[w * HEADS + threadIdx.x];
        part_ml[((size_t)b * H + h0 + threadIdx.x) * splits + s] = make_float2(max_s[threadIdx.x], sum);
    }

    // the last block of (b, head group): o_lat = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), splits in order. The
    // fence makes this block's partial visible before its count; the last block reads the others' past L1 (__ldcg).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    const size_t group = (size_t)b * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) last = atomicAdd(&done[group], 1) == used - 1;
    __syncthreads();
    if (!last) return;
    float* weight_s = (float*)flash_smem;  // [HEADS, used], over the spent tiles (flash_decode_smem_bytes); then L [HEADS]
    float* L_s = weight_s + HEADS * used;
    if (threadIdx.x < HEADS && h0 + threadIdx.x < H) {
        const float2* ml = part_ml + ((size_t)b * H + h0 + threadIdx.x) * splits;
        float M = -INFINITY, L = 0;
        for (int k = 0; k < used; k++) M = fmaxf(M, __ldcg(&ml[k]).x);
        for (int k = 0; k < used; k++) {
            const float2 v = __ldcg(&ml[k]);
            weight_s[threadIdx.x * used + k] = exp2f(v.x - M);
            L += v.y * weight_s[threadIdx.x * used + k];
        }
        L_s[threadIdx.x] = L;
    }
    if (threadIdx.x == 0) done[group] = 0;  // ready for the next step
    __syncthreads();
    // a thread takes four columns (where they pack into float4s) of all the group's heads, and the group's loads of a
    // split in flight together: written as one loop over (head, column), each element's loads waited for the last
    // element's store, and the merge took most of the kernel's time
    const int heads = min(HEADS, H - h0), cols = dc % 4 == 0 ? 4 : 1;
    for (int j = cols * threadIdx.x; j < dc; j += cols * blockDim.x) {
        float o[HEADS][4] = {};
        for (int k = 0; k < used; k++)
#pragma unroll
            for (int r = 0; r < HEADS; r++) {
                if (r >= heads) break;
                const float* part = part_acc + (((size_t)b * H + h0 + r) * splits + k) * dc + j;
                float v[4] = {};
                if (cols == 4) {
                    const float4 q = __ldcg(reinterpret_cast<const float4*>(part));
                    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
                } else {
                    v[0] = __ldcg(part);
                }
                const float w = weight_s[r * used + k];
#pragma unroll
                for (int i = 0; i < 4; i++) o[r][i] += v[i] * w;
            }
        for (int r = 0; r < heads; r++)
            for (int i = 0; i < cols; i++) o_lat[((size_t)b * H + h0 + r) * dc + j + i] = o[r][i] / L_s[r];
    }
}

// flash_decode_gpu (at the end of this section), 16 heads a block
inline void flash_decode_group_gpu(float* o_lat, float* part_acc, float2* part_ml, int* done, const float* qlat, const bf16* cache,
                                   const DecodeRows& rows, int B, int H, int dc, int dr, int splits, float scale, cudaStream_t stream) {
    constexpr int COLS = FLASH_DECODE_WARPS * 8;  // output columns of one n8 tile in every warp
    if (dc > 32 * COLS) fail("flash_decode: kv_lora_rank %d exceeds the supported %d", dc, 32 * COLS);
    const int nt = ceil_div(dc, COLS), which = nt <= 2 ? 0 : nt <= 4 ? 1 : nt <= 8 ? 2 : nt <= 16 ? 3 : 4;
    auto kernel = which == 0 ? flash_decode_group_kernel<2> : which == 1 ? flash_decode_group_kernel<4>
                : which == 2 ? flash_decode_group_kernel<8> : which == 3 ? flash_decode_group_kernel<16>
                : flash_decode_group_kernel<32>;
    // the opt-in past 48 KiB, per kernel and device, raised when a call needs more than the last
    static size_t optin[MAX_DEVICES][5] = {};
    const size_t smem = flash_decode_smem_bytes(dc, dr, splits);
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    if (dev >= MAX_DEVICES || smem > optin[dev][which]) {
        int limit = 0;
        cudaFuncAttributes attr;
        CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
        if (smem + attr.sharedSizeBytes > (size_t)limit)
            fail("flash_decode: %zu bytes of shared memory (kv_lora_rank %d, %d splits) exceed the GPU's %d", smem, dc, splits, limit);
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        if (dev < MAX_DEVICES) optin[dev][which] = smem;
    }
    const bool vec = (dc + dr) % 8 == 0 && (uintptr_t)cache % 16 == 0;
    launch_programmatic(kernel, dim3(splits, ceil_div(H, FLASH_DECODE_HEADS), B), dim3(FLASH_DECODE_WARPS * 32), smem, stream, o_lat, part_acc,
                        part_ml, done, qlat, cache, rows, H, dc, dr, scale * 1.4426950408889634f, vec);
}

// ----------------------------------------------------------------------------
// Which flash decoding a step takes. One head a block reads its sequence's cache once per head, 16 heads a block once per
// 16: the second wins when the cache reads are the step's work (many rows), the first when few blocks would leave the
// GPU idle and each block's fixed latency (queries, tiles, merge) is the step's time (bench/RESULTS.md, session 18).
constexpr int FLASH_DECODE_GROUP_MIN_ROWS = 16;

inline bool flash_decode_by_group(int B) { return B >= FLASH_DECODE_GROUP_MIN_ROWS; }

// splits for the kernel that B rows take: about two blocks per SM, each at least 16 (one head a block) or
// FLASH_DECODE_MIN_KEYS (16 heads a block) rows of a cache of max_len rows
inline int flash_decode_splits(int B, int H, int max_len, int sms) {
    const bool group = flash_decode_by_group(B);
    const int want = ceil_div(2LL * sms, (long long)B * (group ? ceil_div(H, FLASH_DECODE_HEADS) : H));
    return std::max(1, std::min(want, ceil_div(max_len, group ? FLASH_DECODE_MIN_KEYS : 16)));
}

// o_lat [B, H, dc] fp32 from qlat [B, H, dc+dr] fp32 and cache [seqs, max_len, dc+dr] (rows 0..row_position(b) of
// sequence b % seqs); scale = the softmax scale (RopeTable's); part_acc [B, H, splits, dc] and part_ml [B, H, splits]
// are scratch; done [B, H] are the merge's counters, zero before the first call (each call leaves them zero).
inline void flash_decode_gpu(float* o_lat, float* part_acc, float2* part_ml, int* done, const float* qlat, const bf16* cache,
                             const DecodeRows& rows, int B, int H, int dc, int dr, int splits, float scale, cudaStream_t stream) {
    (flash_decode_by_group(B) ? flash_decode_group_gpu : flash_decode_head_gpu)(o_lat, part_acc, part_ml, done, qlat, cache, rows, B, H, dc, dr,
                                                                                splits, scale, stream);
}

// ----------------------------------------------------------------------------
// W_UV after attention: o[b, h*dv + v] = W_UV_h[v] . o_lat[b, h] (bf16 out), with W_UV_h = rows
// h*(dn+dv)+dn .. +dv-1 of kv_b. Grid (H, ceil(dv / 8), ceil(B / DECODE_SEQS)), 8 warps: warp w owns output row
// v = 8 * blockIdx.y + w and reads W_UV_h[v] once for DECODE_SEQS sequences (lanes split the dc columns).
static __global__ void __launch_bounds__(256)
    decode_value_up_kernel(bf16* o, const float* o_lat, const bf16* kv_b, int B, int H, int dn, int dv, int dc) {
    grid_dependency_wait();  // launched early (launch_programmatic): everything it reads but the weights comes from the kernels ahead
    grid_dependents_launch();
    extern __shared__ float lat[];  // [DECODE_SEQS, dc]
    const int h = blockIdx.x, b0 = blockIdx.z * DECODE_SEQS, nb = min(DECODE_SEQS, B - b0);
    for (int i = threadIdx.x; i < nb * dc; i += blockDim.x) lat[i] = o_lat[((size_t)(b0 + i / dc) * H + h) * dc + i % dc];
    __syncthreads();
    const int lane = threadIdx.x % 32, v = blockIdx.y * 8 + threadIdx.x / 32;
    if (v >= dv) return;
    const bf16* w = kv_b + ((size_t)h * (dn + dv) + dn + v) * dc;
    float acc[DECODE_SEQS] = {};
#pragma unroll 4
    for (int j = lane; j < dc; j += 32) {
        const float wj = __bfloat162float(w[j]);
#pragma unroll
        for (int s = 0; s < DECODE_SEQS; s++) acc[s] += wj * lat[(s < nb ? s : 0) * dc + j];
    }
    for (int s = 0; s < nb; s++) {
        const float r = warp_sum(acc[s]);
        if (lane == 0) o[((size_t)(b0 + s) * H + h) * dv + v] = __float2bfloat16(r);
    }
}

inline void decode_value_up_gpu(bf16* o, const float* o_lat, const bf16* kv_b, int B, int H, int dn, int dv, int dc, cudaStream_t stream) {
    dim3 grid(H, ceil_div(dv, 8), ceil_div(B, DECODE_SEQS));
    launch_programmatic(decode_value_up_kernel, grid, dim3(256), DECODE_SEQS * dc * sizeof(float), stream, o, o_lat, kv_b, B, H, dn, dv, dc);
}

// ----------------------------------------------------------------------------
// Prefill: the cache rows of sequences b0.. from the training forward's activations of rows x T tokens: row t
// of sequence b0 + n / T (n = token row) is [c_norm[n] (dc); kv_a[n, dc:] (the roped k_pe)].
static __global__ void prefill_cache_kernel(bf16* cache, const bf16* c_norm, const bf16* kv_a, int N, int T, int b0, int dc, int dr,
                                            int max_len) {
    const int width = dc + dr;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)N * width; i += (long long)gridDim.x * blockDim.x) {
        const int n = (int)(i / width), j = (int)(i % width);
        const bf16 v = j < dc ? c_norm[(size_t)n * dc + j] : kv_a[(size_t)n * width + j];
        cache[((size_t)(b0 + n / T) * max_len + n % T) * width + j] = v;
    }
}

inline void prefill_cache_gpu(bf16* cache, const bf16* c_norm, const bf16* kv_a, int N, int T, int b0, int dc, int dr, int max_len,
                              cudaStream_t stream) {
    const long long total = (long long)N * (dc + dr);
    prefill_cache_kernel<<<(int)std::min<long long>(ceil_div(total, 256), 1 << 16), 256, 0, stream>>>(cache, c_norm, kv_a, N, T, b0, dc, dr,
                                                                                                     max_len);
    CUDA_LAUNCH_CHECK();
}

// pos[b] += active[b]: after a forward step the new token is part of the cache. A full cache keeps pos at its
// last row (the host stops such a sequence), so no step ever writes past a sequence's rows.
static __global__ void decode_advance_kernel(int* pos, const int* active, int B, int max_len) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < B && active[b] && pos[b] < max_len - 1) pos[b]++;
}

// ----------------------------------------------------------------------------
// Sampling, one block per sequence over its logits [V] (bf16, as the head writes them), matching
// sample_token's rules (model.cu):
//   temperature <= 0: the arg-max (lowest id on ties);
//   top-k: the k largest logits (ties at the k-th value: lowest ids first);
//   weights w_i = exp((z_i - z_max) / temperature) of the kept tokens;
//   top-p: of those, the smallest set in descending order whose mass reaches
//          top_p * sum (ties at the threshold value: lowest ids first);
//   then the token at coin * (kept mass) of the running sum in id order, coin =
//   rng_uniform(seed + b, gen[b]) (common.h), so a fixed seed repeats.
// No sort: each threshold is found by a 16-step bisection over the bf16 logit's order-preserving 16-bit key
// (count or mass of keys >= x), and every sum runs in a fixed order (thread ranges in id order, a fixed
// tree), so results repeat bit for bit. Thread t owns ids [t*per, (t+1)*per).
constexpr int SAMPLE_THREADS = 1024;

__device__ inline unsigned sample_key(bf16 z) {
    const unsigned u = __bfloat16_as_ushort(z);
    return (u & 0x8000u) ? (~u & 0xFFFFu) : (u | 0x8000u);  // larger logit, larger key
}

// exclusive prefix sum over the block's threads, in thread order (fixed tree)
template <typename T>
__device__ inline T block_exclusive_scan(T v, T* total) {
    __shared__ T warp_total[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    T x = v;
    for (int off = 1; off < 32; off <<= 1) {
        const T y = __shfl_up_sync(0xffffffffu, x, off);
        if (lane >= off) x += y;
    }
    __syncthreads();
    if (lane == 31) warp_total[warp] = x;
    __syncthreads();
    T before = 0, all = 0;
    for (int w = 0; w < warps; w++) {
        if (w < warp) before += warp_total[w];
        all += warp_total[w];
    }
    *total = all;
    return before + x - v;
}

__device__ inline unsigned long long block_max_u64(unsigned long long v) {
    __shared__ unsigned long long partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int off = 16; off > 0; off >>= 1) {
        const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, off);
        v = o > v ? o : v;
    }
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    unsigned long long r = 0;
    for (int w = 0; w < warps; w++) r = partial[w] > r ? partial[w] : r;
    return r;
}

// The draw both samplers make: the token at coin * (total weight) of the running sum in id order, every thread
// getting it. walk(visit) calls visit(i, w) for each id i of this thread's range, in order, with its weight w >= 0
// (thread ranges in id order); it runs twice. *total receives the total weight.
template <typename Walk>
__device__ inline int block_pick(Walk walk, float coin, float* total) {
    float mine = 0;
    int last = -1;
    walk([&](int i, float w) {
        mine += w;
        if (w > 0) last = i;
    });
    const float before = block_exclusive_scan(mine, total);
    const float goal = coin * *total;
    __shared__ int chosen;
    if (threadIdx.x == 0) chosen = INT_MAX;
    __syncthreads();
    float run = before;
    walk([&](int i, float w) {
        // rounding between thread ranges could let two tokens cross: the lowest wins
        if (w > 0 && goal < run + w && run <= goal) atomicMin(&chosen, i);
        run += w;
    });
    // rounding can leave goal at or past the last running sum: take the last token with weight
    const int last_kept = (int)(block_max_u64(last >= 0 ? (unsigned long long)last + 1 : 0) - 1);
    __syncthreads();
    return chosen != INT_MAX ? chosen : last_kept;
}

// tokens[b] (written for active sequences), gen[b] += 1; kept [B, V] (may be
// null) receives each token's final probability (0 = not kept), for the tests.
static __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(int* tokens, int* gen, float* kept, const bf16* logits, const int* active, int V, float temperature, int top_k,
                  float top_p, unsigned long long seed) {
    const int b = blockIdx.x;
    if (active && !active[b]) return;
    const bf16* z = logits + (size_t)b * V;
    const int per = (V + blockDim.x - 1) / blockDim.x, i0 = min(V, threadIdx.x * per), i1 = min(V, i0 + per);
    // the arg-max: the largest key, then the lowest id
    unsigned long long best = 0;
    for (int i = i0; i < i1; i++) {
        const unsigned long long v = ((unsigned long long)sample_key(z[i]) << 32) | (0xFFFFFFFFu - (unsigned)i);
        best = v > best ? v : best;
    }
    best = block_max_u64(best);
    const int arg = (int)(0xFFFFFFFFu - (unsigned)(best & 0xFFFFFFFFu));
    if (temperature <= 0) {
        if (threadIdx.x == 0) {
            tokens[b] = arg;
            gen[b]++;
        }
        if (kept)
            for (int i = i0; i < i1; i++) kept[(size_t)b * V + i] = i == arg ? 1.0f : 0.0f;
        return;
    }
    const float zmax = __bfloat162float(z[arg]), inv_t = 1.0f / temperature;
    // top-k: kk = the k-th largest key; keys above it are kept, and of the keys equal
    // to it the first k - count(above) in id order
    unsigned kk = 0;
    int k_eq_keep = V;  // how many tokens with key == kk are kept
    const bool use_k = top_k > 0 && top_k < V;
    if (use_k) {
        for (int bit = 15; bit >= 0; bit--) {
            const unsigned cand = kk | (1u << bit);
            int c = 0;
            for (int i = i0; i < i1; i++) c += sample_key(z[i]) >= cand;
            if (kdetail::block_sum_t(c) >= top_k) kk = cand;
        }
        int above = 0;
        for (int i = i0; i < i1; i++) above += sample_key(z[i]) > kk;
        k_eq_keep = top_k - kdetail::block_sum_t(above);
    }
    int eq_before = 0;  // tokens with key == kk before this thread's range
    {
        int c = 0, total;
        if (use_k)
            for (int i = i0; i < i1; i++) c += sample_key(z[i]) == kk;
        eq_before = block_exclusive_scan(c, &total);
    }
    // the top-k weight of token i; `eq` counts this thread's key == kk tokens so far
    auto weight_k = [&](int i, int& eq) -> float {
        const unsigned key = sample_key(z[i]);
        if (use_k) {
            if (key < kk) return 0.0f;
            if (key == kk && eq_before + eq++ >= k_eq_keep) return 0.0f;
        }
        return expf((__bfloat162float(z[i]) - zmax) * inv_t);
    };
    // top-p: kp = the largest key x with mass(key >= x) >= top_p * total
    unsigned kp = 0;
    float target = 0, mass_above = 0, eq_mass_before = 0;
    const bool use_p = top_p < 1.0f;
    if (use_p) {
        float part = 0;
        int eq = 0;
        for (int i = i0; i < i1; i++) part += weight_k(i, eq);
        target = top_p * kdetail::block_sum_t(part);
        for (int bit = 15; bit >= 0; bit--) {
            const unsigned cand = kp | (1u << bit);
            float m = 0;
            eq = 0;
            for (int i = i0; i < i1; i++) {
                const float w = weight_k(i, eq);
                if (sample_key(z[i]) >= cand) m += w;
            }
            if (kdetail::block_sum_t(m) >= target) kp = cand;
        }
        float above = 0, at = 0;
        eq = 0;
        for (int i = i0; i < i1; i++) {
            const float w = weight_k(i, eq);
            const unsigned key = sample_key(z[i]);
            if (key > kp) above += w;
            if (key == kp) at += w;
        }
        mass_above = kdetail::block_sum_t(above);
        float total;
        eq_mass_before = block_exclusive_scan(at, &total);
    }
    // the final weight of token i; eq / eq_mass walk this thread's tied tokens
    auto weight = [&](int i, int& eq, float& eq_mass) -> float {
        float w = weight_k(i, eq);
        if (use_p && w > 0) {
            const unsigned key = sample_key(z[i]);
            if (key < kp) return 0.0f;
            if (key == kp) {
                // kept while the mass before it is still short of the target
                const bool keep = mass_above + eq_mass_before + eq_mass < target;
                eq_mass += w;
                if (!keep) return 0.0f;
            }
        }
        return w;
    };
    // a pass over this thread's tokens with their final weights
    auto walk = [&](auto visit) {
        int eq = 0;
        float eq_mass = 0;
        for (int i = i0; i < i1; i++) visit(i, weight(i, eq, eq_mass));
    };
    float total;
    const int token = block_pick(walk, rng_uniform(seed + b, (uint64_t)gen[b]), &total);
    if (kept) walk([&](int i, float w) { kept[(size_t)b * V + i] = w / total; });
    if (threadIdx.x == 0) {
        tokens[b] = token;
        gen[b]++;
    }
}

// tokens [B] <- a token per active sequence from logits [B, V]; gen [B] counts each sequence's draws (the RNG counter);
// active [B] (null = all); kept [B, V] (null in generation) receives the kept tokens' probabilities.
inline void sample_gpu(int* tokens, int* gen, float* kept, const bf16* logits, const int* active, int B, int V, const SamplingOptions& so,
                       uint64_t seed, cudaStream_t stream) {
    sample_kernel<<<B, SAMPLE_THREADS, 0, stream>>>(tokens, gen, kept, logits, active, V, so.temperature, so.top_k, so.top_p, seed);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// Self-speculative decoding on the GPU (decode.h speculative_step), B sequences, a step of 2B rows. Between steps
// sequence b holds: x = tokens[b], the last token taken, at position L = pos[b] (clamped, as the positions of all
// the step's rows are: DecodeRows), not yet in a cache; the main cache at L positions; the MTP module's two rows for
// the next step, at positions L-2 and L-1 (shift -2) with the main model's normed outputs there (mtp_h) and tokens
// t_{L-1}, t_L (mtp_tokens). The module's row at L-2 repeats the previous step's row at L-1 (the same values,
// written again) unless the last draft was accepted, when it is the row the step skipped; after a one-token prompt
// both rows are at position 0 with the same input. The main model's rows are x's and the draft's, at L and L+1.

// a step's first kernel: x into the main step's first row and the MTP module's second (and first, when both
// rows are at one position); pos [B] the sequences' positions
static __global__ void speculative_inputs_kernel(int* rows_tokens, int* mtp_tokens, const int* tokens, const int* pos, int B, int max_len) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const DecodeRows mtp{pos, B, -2, max_len};
    rows_tokens[b] = tokens[b];
    mtp_tokens[B + b] = tokens[b];
    if (row_position(mtp, b) == row_position(mtp, B + b)) mtp_tokens[b] = tokens[b];
}

// The verdict, one block per active sequence b: the draft d = rows_tokens[B + b], drawn from q [B, V] (the MTP
// module's sampling distribution), is accepted with probability min(1, p[d] / q[d]), p [B, V] the main model's at
// x's position; the step then takes d and next[b] (drawn at d's position, which the main model read d for), or
// else one draw from normalize(max(0, p - q)). out [B, 2] and count [B] say what it took; the state moves on,
// from hn [2B, D], the main model's normed outputs at x's and d's positions, and pos [B] to the next x's position,
// L + 2 or L + 1 (the next step's rows clamp it).
static __global__ void __launch_bounds__(SAMPLE_THREADS)
    speculative_accept_kernel(int* out, int* count, int* tokens, int* pos, const int* rows_tokens, int* mtp_tokens, bf16* mtp_h, int* gen,
                              const float* p, const float* q, const int* next, const bf16* hn, const int* active, int B, int V, int D,
                              int max_len, unsigned long long seed) {
    const int b = blockIdx.x;
    if (!active[b]) return;
    const float *pb = p + (size_t)b * V, *qb = q + (size_t)b * V;
    const int x = rows_tokens[b], d = rows_tokens[B + b];
    const bool accept = rng_uniform(seed + b, (uint64_t)gen[b]) * qb[d] < pb[d];  // q[d] > 0: d was drawn from q
    int taken = d;
    if (!accept) {  // the block agrees on accept, so every thread is here; p(d) < q(d) leaves max(0, p - q) mass
        const int per = (V + blockDim.x - 1) / blockDim.x, i0 = min(V, threadIdx.x * per), i1 = min(V, i0 + per);
        auto walk = [&](auto visit) {
            for (int i = i0; i < i1; i++) visit(i, fmaxf(0.0f, pb[i] - qb[i]));
        };
        float total;
        taken = block_pick(walk, rng_uniform(seed + b, (uint64_t)gen[b] + 1), &total);
    }
    // the MTP module's rows: after an acceptance the outputs at x's and d's positions, else the old second row and x's
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const bf16 first = accept ? hn[(size_t)b * D + j] : mtp_h[(size_t)(B + b) * D + j];
        mtp_h[(size_t)(B + b) * D + j] = accept ? hn[(size_t)(B + b) * D + j] : hn[(size_t)b * D + j];
        mtp_h[(size_t)b * D + j] = first;
    }
    __syncthreads();  // every thread has read gen[b] for its verdict before thread 0 moves it on
    if (threadIdx.x != 0) return;
    out[2 * b] = taken;
    out[2 * b + 1] = next[b];
    count[b] = accept ? 2 : 1;
    tokens[b] = accept ? next[b] : taken;
    pos[b] = row_position(DecodeRows{pos, B, 0, max_len}, b) + (accept ? 2 : 1);  // on from x's row's (clamped) position
    mtp_tokens[b] = accept ? d : x;
    gen[b] += 2;
}

// ----------------------------------------------------------------------------
// The decoder: the cache and the step's buffers for up to `batch` sequences of up to max_len tokens, on the
// model's GPU state (model_to_gpu; decoder_create uploads the model for inference when it is not there yet).
// Its API, host-only, is in decode.h.

struct GpuDecoder {
    Model* m;
    int batch, max_len, splits;
    bool speculative;                   // self-speculative decoding with the MTP module: steps of 2 x batch rows
    int rows;                           // the step's rows: batch, or 2 x batch when speculative
    bf16* cache;                        // [layers (+ the MTP module's when speculative), batch, max_len, dc+dr]
    size_t cache_bytes;                 // its allocation
    int *tokens, *pos, *gen, *active;   // [batch]: next input, its position (DecodeRows), draws, still generating
    int* tokens_host;                   // pinned copy of tokens
    std::vector<int> active_host;       // active as decoder_set_active left it, uploaded by the next sample or step
    bool active_changed = false;
    int* prefill_rows;                  // [3 batch] the rows of a prefill chunk that decoder_prefill gathers
    float* res;                         // [rows, D] the residual stream (fp32, as in gpu_forward)
    bf16 *emb, *xn, *qa, *qa_norm, *q, *kv, *o, *attn_out, *ffn_out, *logits;  // [rows, *]
    float *qlat, *o_lat, *part_acc;
    float2* part_ml;
    int* flash_done;                    // [rows, H] flash_decode_gpu's counters
    FfnActsGpu ffn;                     // the dense FFN's buffers, shared by its layers
    MoeActsGpu moe;                     // the MoE's, shared by its layers
    bf16* moe_hidden;                   // [rows, K*I + SI] moe_decode_forward_gpu's, when rows <= GEMV_MAX_ROWS
    // speculative decoding's state and buffers (decode.cuh's comment above speculative_inputs_kernel)
    int* rows_tokens;                   // [2 batch] the main step's rows: x then the draft, at L and L + 1
    int* mtp_tokens;                    // [2 batch] the MTP module's rows, at L - 2 and L - 1
    bf16* mtp_h;                        // [2 batch, D] their main-model outputs
    bf16* mtp_cat;                      // [2 batch, 2D] eh_proj's input
    float *main_probs, *draft_probs;    // [batch, V] the main model's and the draft's sampling distributions
    int *next, *out, *count;            // [batch], [batch, 2], [batch]: a step's draws and what it took
    int* out_host;                      // pinned copy of out and count
    cudaGraphExec_t graph = nullptr;    // forward + sample, captured on the first graph step
    SamplingOptions graph_sampling;
    uint64_t graph_seed = 0;
    DeviceArena arena;                  // the decoder's own device memory
};
