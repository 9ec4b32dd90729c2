// ep_moe.cu — a candidate for issue 11's expert parallelism, checked on one GPU before it goes into moe.cuh and
// model.cu: one MoE layer split over P ranks that each hold E/P of the routed experts (dist.h ep_group), the P ranks
// emulated in one process. Each rank routes its own tokens, permutes its slots by expert and gathers their rows
// (moe.cuh's kernels, as moe_forward_gpu runs them); the group's per-expert counts give each rank its exchange
// (dist.h ep_exchange); the rows move to the ranks holding their experts (here one cudaMemcpyAsync per pair of
// ranks, where the real thing runs grouped ncclSend / ncclRecv); each rank regroups what arrived by expert, runs
// its experts' grouped GEMMs on their slice of the weights, and the outputs go back the same way, to be combined
// as now. The backward sends the output gradients out and the input gradients back likewise, and each rank adds
// its experts' weight gradients.
//
// The design this checks: the weights and gradients keep today's layout on every rank (ZeRO-1 already shards the
// optimizer state over the world; a rank's gradient for another rank's experts stays zero, so the reduce-scatter's
// sum is the data-parallel one), and the arrived rows of a layer are kept for its backward, in buffers sized for
// the worst case of P x S rows. Run on an H200 (session 11): every rank's output and input gradient bit-identical
// for P = 2 and 4, the summed weight gradients within 1e-6. But with every expert on every rank a rank does the
// same GEMM work as under data parallelism and holds the same memory, so the real thing should give each rank only
// its experts' weights, gradients and optimizer state (reduced over the ranks that hold the same experts); the
// exchange and the regrouping checked here are the same either way.
//
//   make dev/ep_moe && ./dev/ep_moe      (on the device machine; exits 1 on a mismatch)
//
// Checks, for P = 2 and 4: each rank's output and input gradient against moe_forward_gpu / moe_backward_gpu on the
// same tokens (bit for bit where the grouped GEMM gives each row the same sums whatever rows sit beside it, which
// this also reports), and the weight gradients summed over the ranks against the plain runs' sum (fp32 sums of
// the same terms in another order).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "dist.h"
#include "moe.cuh"

namespace {

// dst[index[i]] = src[i] (scatter) or dst[i] = src[index[i]] (gather), rows of D
template <bool SCATTER>
__global__ void move_rows_kernel(bf16* dst, const bf16* src, const int* index, int rows, int D) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < (size_t)rows * D; e += (size_t)gridDim.x * blockDim.x) {
        const size_t r = e / D, c = e % D, other = (size_t)index[r] * D + c;
        if (SCATTER) dst[other] = src[e];
        else dst[e] = src[other];
    }
}

template <bool SCATTER>
void move_rows(bf16* dst, const bf16* src, const int* index, int rows, int D) {
    if (rows == 0) return;
    move_rows_kernel<SCATTER><<<kdetail::elementwise_blocks((size_t)rows * D, 256), 256>>>(dst, src, index, rows, D);
    CUDA_LAUNCH_CHECK();
}

template <typename T>
T* alloc(DeviceArena& arena, size_t n) {
    return arena_alloc<T>(arena, std::max<size_t>(n, 1), "ep_moe");
}

// the layer's weights (or their gradients) bound as bind_weights binds a model's: expert e at e * stride, up right
// after gate
template <typename T>
MoeWeights<T> bind_moe(T* router, T* experts, int E, int D, int I) {
    MoeWeights<T> w;
    w.router = {router, E, D};
    w.experts = {{experts, I, D}, {experts + (size_t)I * D, I, D}, {experts + 2 * (size_t)I * D, D, I}};
    w.expert_stride = (size_t)3 * I * D;
    return w;
}

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
    double diff = 0, ref = 0;
    for (size_t i = 0; i < a.size(); i++) diff += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), ref += (double)b[i] * b[i];
    return std::isfinite(diff) ? std::sqrt(diff / std::max(ref, 1e-30)) : INFINITY;
}

// One rank's expert-parallel buffers: what arrives, regrouped by expert, and the experts' activations over it
struct EpRank {
    EpExchange x;
    int* regrouped;                     // [P S] x.regrouped on the device
    int* expert_offsets;                // [experts + 1]
    bf16 *arrived, *grouped, *gu, *hidden, *y_grouped, *y_arrived;  // [P S, D], [P S, D], [P S, 2I], [P S, I], [P S, D], [P S, D]
    bf16 *dy_grouped, *dh, *dgu, *dx_grouped;                        // the backward's
};

bool check(int P, const Config& c, int N, uint64_t seed) {
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size, S = N * K;
    const size_t XS = (size_t)3 * I * D;
    DeviceArena arena;
    auto fill = [&](bf16* p, size_t n, uint64_t key, float scale) {
        std::vector<float> h(n);
        for (size_t i = 0; i < n; i++) h[i] = scale * (2 * rng_uniform(key, i) - 1);
        to_device(p, h.data(), n);
    };
    bf16 *router = alloc<bf16>(arena, (size_t)E * D), *experts = alloc<bf16>(arena, E * XS);
    float* bias = alloc<float>(arena, E);
    CUDA_CHECK(cudaMemset(bias, 0, E * sizeof(float)));
    fill(router, (size_t)E * D, seed, 1.7f / std::sqrt((float)D));
    fill(experts, E * XS, seed + 1, 1.7f / std::sqrt((float)D));
    const MoeWeights<bf16> w = bind_moe(router, experts, E, D, I);
    float *g_plain = alloc<float>(arena, (size_t)E * D + E * XS), *g_ep = alloc<float>(arena, (size_t)E * D + E * XS);
    CUDA_CHECK(cudaMemset(g_plain, 0, ((size_t)E * D + E * XS) * sizeof(float)));
    CUDA_CHECK(cudaMemset(g_ep, 0, ((size_t)E * D + E * XS) * sizeof(float)));
    const MoeWeights<float> dw_plain = bind_moe(g_plain, g_plain + (size_t)E * D, E, D, I);
    const MoeWeights<float> dw_ep = bind_moe(g_ep, g_ep + (size_t)E * D, E, D, I);
    GpuContext ctx;
    matmul_init(ctx.mm);
    ctx.scratch_bytes = 1 << 20;
    ctx.scratch = alloc<char>(arena, ctx.scratch_bytes);

    // every rank's tokens, the plain layer's acts and results, and the expert-parallel run's
    std::vector<bf16*> u(P), dout(P), out_plain(P), du_plain(P), out_ep(P), du_ep(P);
    std::vector<MoeActsGpu> plain(P), ep(P);
    std::vector<EpRank> r(P);
    for (int q = 0; q < P; q++) {
        for (bf16** p : {&u[q], &dout[q], &out_plain[q], &du_plain[q], &out_ep[q], &du_ep[q]}) *p = alloc<bf16>(arena, (size_t)N * D);
        fill(u[q], (size_t)N * D, seed + 10 + q, 2.0f);
        fill(dout[q], (size_t)N * D, seed + 20 + q, 1.0f);
        for (MoeActsGpu* a : {&plain[q], &ep[q]}) {
            FfnActsGpu ffn{};
            ffn.hidden = alloc<bf16>(arena, (size_t)S * I);
            *a = moe_layer_alloc(arena, c, 1, N, moe_shared_alloc(arena, c, N, ffn, true));
        }
        EpRank& e = r[q];
        e.regrouped = alloc<int>(arena, (size_t)P * S);
        e.expert_offsets = alloc<int>(arena, E / P + 1);
        for (bf16** p : {&e.arrived, &e.grouped, &e.y_grouped, &e.y_arrived, &e.dy_grouped, &e.dx_grouped})
            *p = alloc<bf16>(arena, (size_t)P * S * D);
        e.gu = alloc<bf16>(arena, (size_t)P * S * 2 * I);
        e.dgu = alloc<bf16>(arena, (size_t)P * S * 2 * I);
        e.hidden = alloc<bf16>(arena, (size_t)P * S * I);
        e.dh = alloc<bf16>(arena, (size_t)P * S * I);
    }

    // the plain layer on each rank's tokens, every expert local; weight gradients summed over the ranks
    for (int q = 0; q < P; q++) {
        moe_forward_gpu(c, w, bias, out_plain[q], u[q], N, plain[q], nullptr, ctx);
        moe_backward_gpu(c, w, dw_plain, du_plain[q], dout[q], u[q], N, plain[q], nullptr, ctx);
    }

    // expert parallel: route, permute and gather on each rank, as moe_forward_gpu does
    std::vector<int> counts((size_t)P * E);
    for (int q = 0; q < P; q++) {
        MoeActsGpu& a = ep[q];
        matmul(ctx.mm, a.router_logits, u[q], w.router.w, N, E, D, false, true, 0.0f, true, ctx.stream);
        router_forward_gpu(a.scores, a.expert, a.gate, nullptr, a.router_logits, bias, c, N, ctx.stream);
        moe_permute_gpu(a.offsets, a.slot_row, a.row_slot, a.permute_scratch, a.expert, S, E, ctx.stream);
        moe_gather_gpu(a.x_sorted, u[q], a.row_slot, N, K, D, ctx.stream);
        std::vector<int> offsets(E + 1);
        CUDA_CHECK(cudaMemcpyAsync(offsets.data(), a.offsets, (E + 1) * sizeof(int), cudaMemcpyDeviceToHost, ctx.stream));
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
        for (int e = 0; e < E; e++) counts[(size_t)q * E + e] = offsets[e + 1] - offsets[e];
    }
    for (int q = 0; q < P; q++) {
        EpRank& e = r[q];
        e.x = ep_exchange(ep_group(P, q, P, E), counts, E);
        const std::vector<int> regrouped(e.x.regrouped.begin(), e.x.regrouped.end());
        const std::vector<int> offsets(e.x.expert_offsets.begin(), e.x.expert_offsets.end());
        CUDA_CHECK(cudaMemcpy(e.regrouped, regrouped.data(), regrouped.size() * sizeof(int), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(e.expert_offsets, offsets.data(), offsets.size() * sizeof(int), cudaMemcpyHostToDevice));
    }
    // rank q's rows for rank p's experts: src + send_offset[p] of q  <->  rank p's rows from q: dst + recv_offset[q] of p
    auto exchange = [&](std::vector<bf16*> sorted, std::vector<bf16*> arrived, bool back) {
        for (int q = 0; q < P; q++)
            for (int p = 0; p < P; p++) {
                bf16* mine = sorted[q] + r[q].x.send_offset[p] * D;
                bf16* theirs = arrived[p] + r[p].x.recv_offset[q] * D;
                const size_t bytes = r[q].x.send_count[p] * D * sizeof(bf16);
                CUDA_CHECK(cudaMemcpyAsync(back ? mine : theirs, back ? theirs : mine, bytes, cudaMemcpyDeviceToDevice, ctx.stream));
            }
    };
    std::vector<bf16*> x_sorted(P), y_sorted(P), dy_sorted(P), dx_sorted(P), arrived(P), y_arrived(P), dy_arrived(P), dx_arrived(P);
    for (int q = 0; q < P; q++) {
        x_sorted[q] = ep[q].x_sorted, y_sorted[q] = ep[q].y_sorted, dy_sorted[q] = ep[q].dy_sorted, dx_sorted[q] = ep[q].dx_sorted;
        arrived[q] = r[q].arrived, y_arrived[q] = r[q].y_arrived;
        dy_arrived[q] = r[q].arrived, dx_arrived[q] = r[q].y_arrived;  // the forward's staging buffers, free again
    }
    const size_t stride = w.expert_stride;
    exchange(x_sorted, arrived, false);
    for (int p = 0; p < P; p++) {  // each rank's experts over what arrived
        EpRank& e = r[p];
        const int A = (int)e.x.expert_offsets.back(), Ep = E / P, first = p * Ep;
        move_rows<true>(e.grouped, e.arrived, e.regrouped, A, D);
        grouped_gemm_forward_gpu(e.gu, e.grouped, gate_up(w.experts).w + first * stride, stride, e.expert_offsets, A, Ep, D, 2 * I, ctx.stream);
        swiglu_forward_fused_gpu(e.hidden, e.gu, A, I, ctx.stream);
        grouped_gemm_forward_gpu(e.y_grouped, e.hidden, w.experts.down.w + first * stride, stride, e.expert_offsets, A, Ep, I, D, ctx.stream);
        move_rows<false>(e.y_arrived, e.y_grouped, e.regrouped, A, D);
    }
    exchange(y_sorted, y_arrived, true);
    for (int q = 0; q < P; q++) {
        MoeActsGpu& a = ep[q];
        moe_combine_forward_gpu(out_ep[q], a.y_sorted, a.gate, a.slot_row, nullptr, N, K, D, ctx.stream);
        moe_combine_backward_gpu(a.dy_sorted, a.dgate, dout[q], a.y_sorted, a.gate, a.slot_row, N, K, D, ctx.stream);
    }
    exchange(dy_sorted, dy_arrived, false);
    for (int p = 0; p < P; p++) {
        EpRank& e = r[p];
        const int A = (int)e.x.expert_offsets.back(), Ep = E / P, first = p * Ep;
        bf16* hidden = e.hidden;
        move_rows<true>(e.dy_grouped, r[p].arrived, e.regrouped, A, D);
        grouped_gemm_backward_input_gpu(e.dh, e.dy_grouped, w.experts.down.w + first * stride, stride, e.expert_offsets, A, Ep, I, D, ctx.stream);
        swiglu_forward_fused_gpu(hidden, e.gu, A, I, ctx.stream);
        grouped_gemm_backward_weight_gpu(dw_ep.experts.down.w + first * stride, stride, e.dy_grouped, hidden, e.expert_offsets, A, Ep, I, D,
                                         ctx.stream);
        swiglu_backward_fused_gpu(e.dgu, e.dh, e.gu, A, I, ctx.stream);
        grouped_gemm_backward_input_gpu(e.dx_grouped, e.dgu, gate_up(w.experts).w + first * stride, stride, e.expert_offsets, A, Ep, D, 2 * I,
                                        ctx.stream);
        grouped_gemm_backward_weight_gpu(gate_up(dw_ep.experts).w + first * stride, stride, e.dgu, e.grouped, e.expert_offsets, A, Ep, D,
                                         2 * I, ctx.stream);
        move_rows<false>(r[p].y_arrived, e.dx_grouped, e.regrouped, A, D);
    }
    exchange(dx_sorted, dx_arrived, true);
    for (int q = 0; q < P; q++) {
        MoeActsGpu& a = ep[q];
        moe_scatter_backward_gpu(du_ep[q], a.dx_sorted, a.slot_row, N, K, D, false, ctx.stream);
        router_backward_gpu(a.router_dlogits, a.dgate, nullptr, a.scores, a.expert, c, N, ctx.stream);
        float_to_bf16_gpu(a.router_dlogits16, a.router_dlogits, (size_t)N * E, ctx.stream);
        linear_backward_gpu(du_ep[q], dw_ep.router, a.router_dlogits16, u[q], w.router, N, true, ctx);
    }
    CUDA_CHECK(cudaDeviceSynchronize());

    bool ok = true;
    size_t arrived_rows = 0;
    for (int q = 0; q < P; q++) {
        arrived_rows += r[q].x.expert_offsets.back();
        const std::vector<float> o1 = to_host(out_ep[q], (size_t)N * D), o0 = to_host(out_plain[q], (size_t)N * D);
        const std::vector<float> d1 = to_host(du_ep[q], (size_t)N * D), d0 = to_host(du_plain[q], (size_t)N * D);
        const bool same_out = memcmp(o1.data(), o0.data(), o0.size() * 4) == 0, same_du = memcmp(d1.data(), d0.data(), d0.size() * 4) == 0;
        const double e_out = rel_error(o1, o0), e_du = rel_error(d1, d0);
        printf("P %d rank %d: %zu rows arrived; out %s (rel %.2e), du %s (rel %.2e)\n", P, q, r[q].x.expert_offsets.back(),
               same_out ? "bit-identical" : "differs", e_out, same_du ? "bit-identical" : "differs", e_du);
        ok &= e_out < 1e-2 && e_du < 1e-2;
    }
    const size_t G = (size_t)E * D + E * XS;
    const double e_grad = rel_error(to_host(g_ep, G), to_host(g_plain, G));
    printf("P %d: %zu rows arrived over the ranks (want %d); weight gradients summed over the ranks: rel %.2e\n", P, arrived_rows, P * S,
           e_grad);
    ok &= arrived_rows == (size_t)P * S && e_grad < 1e-5;
    matmul_free(ctx.mm);
    arena_free(arena);
    return ok;
}

}  // namespace

int main() {
    Config c = config_preset("mini");
    c.n_routed_experts = 8;
    c.num_experts_per_tok = 2;
    c.n_group = 1;
    c.topk_group = 1;
    c.n_shared_experts = 0;
    config_check(c);
    bool ok = true;
    for (int P : {2, 4}) ok &= check(P, c, 1024, 7);
    printf("%s\n", ok ? "expert parallelism (emulated): all checks passed" : "expert parallelism (emulated): MISMATCH");
    return ok ? 0 : 1;
}
