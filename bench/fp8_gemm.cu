// fp8_gemm.cu — where FP8 pays: each Linear that --fp8 quantizes, at a preset's shapes
// and N tokens, timed on the device in bf16 (cuBLASLt) and in FP8 (fp8.cuh): the
// Fprop, Dgrad and Wgrad GEMMs of each, the FP8 path's quantization kernels, and the
// whole linear_forward_gpu + linear_backward_gpu of each (FP8 with Wgrad in bf16, and
// with --fp8-wgrad's). Medians over --runs, timed with CUDA events; one line per
// Linear, in microseconds. Then the routed experts' forward GEMMs (gate_up and down),
// the two ways the FP8 issue names: our grouped kernel (moe.cuh, bf16) against one
// cuBLASLt call per expert, in bf16 and block-scaled FP8, at N x top-k rows split
// evenly over the experts (the per-expert calls' best case: one shape, known on the host).
//
//   bench/fp8_gemm [--preset small] [--tokens 16384] [--runs 20]
#include <algorithm>
#include <cstdio>
#include <functional>

#include "cli.h"
#include "kernels.cuh"
#include "moe.cuh"

static const char* USAGE =
    "usage: bench/fp8_gemm [--preset NAME] [--tokens N] [--runs R]\n"
    "\n"
    "Times each FP8 Linear of the preset at N tokens in bf16 and in FP8 (GEMMs, the\n"
    "quantization kernels, and the whole Linear forward + backward), medians of R runs.\n"
    "  defaults: --preset small --tokens 16384 --runs 20\n";

// median microseconds of fn over runs (cuda_common.cuh gpu_median_ms)
static double time_us(cudaStream_t st, int runs, const std::function<void()>& fn) { return 1000.0 * gpu_median_ms(fn, runs, st); }

static Fp8Matrix fp8_alloc(int rows, int cols, int tile_rows) {
    return {device_alloc<uint8_t>((size_t)rows * cols, "bench"), device_alloc<float>(fp8_scale_count(rows, cols, tile_rows), "bench"), rows, cols,
            tile_rows};
}

static void fp8_free(const Fp8Matrix& m) {
    CUDA_CHECK(cudaFree(m.codes));
    CUDA_CHECK(cudaFree(m.scales));
}

// the routed experts' forward GEMM out [S, OC] = x [S, C] @ W_e^T, S = N x top-k rows in E equal groups: our grouped
// kernel, and E cuBLASLt calls in bf16 and in FP8 (x quantized per expert beforehand, its pass timed apart)
static void time_experts(const char* name, int S, int E, int C, int OC, int runs, GpuContext& ctx) {
    cudaStream_t st = ctx.stream;
    const int rows = S / E / 4 * 4;  // FP8's GEMM takes rows in fours
    S = rows * E;
    bf16 *x = device_alloc<bf16>((size_t)S * C, "bench"), *w = device_alloc<bf16>((size_t)E * OC * C, "bench");
    bf16* y = device_alloc<bf16>((size_t)S * OC, "bench");
    std::vector<float> h((size_t)std::max(S, E * OC) * C);
    for (size_t i = 0; i < h.size(); i++) h[i] = 2 * rng_uniform(2, i) - 1;
    to_device(x, h.data(), (size_t)S * C);
    to_device(w, h.data(), (size_t)E * OC * C);
    std::vector<int> offsets(E + 1);
    for (int e = 0; e <= E; e++) offsets[e] = e * rows;
    int* d_offsets = device_alloc<int>(E + 1, "bench");
    to_device(d_offsets, offsets.data(), E + 1);
    std::vector<Fp8Matrix> xq(E);
    std::vector<Fp8WeightJob> jobs;
    for (int e = 0; e < E; e++) {
        xq[e] = fp8_alloc(rows, C, 1);
        jobs.push_back({{fp8_alloc(OC, C, 128), fp8_alloc(C, OC, 128)}, w + (size_t)e * OC * C, 0});
    }
    int blocks = 0;
    Fp8WeightJob* d_jobs = fp8_weight_jobs_upload(jobs, &blocks);
    fp8_quantize_weights_gpu(d_jobs, E, blocks, st);
    auto t = [&](const std::function<void()>& fn) { return time_us(st, runs, fn); };
    const double ours = t([&] { grouped_gemm_forward_gpu(y, x, w, (size_t)OC * C, d_offsets, S, E, C, OC, st); });
    const double bf16_each = t([&] {
        for (int e = 0; e < E; e++)
            matmul(ctx.mm, y + (size_t)e * rows * OC, x + (size_t)e * rows * C, w + (size_t)e * OC * C, rows, OC, C, false, true, 0.0f, false, st);
    });
    const double quant = t([&] {
        for (int e = 0; e < E; e++) fp8_quantize_gpu(xq[e], x + (size_t)e * rows * C, C, st);
    });
    const double fp8_each = t([&] {
        for (int e = 0; e < E; e++) fp8_matmul(ctx.mm, y + (size_t)e * rows * OC, false, xq[e], jobs[e].q.w, false, st);
    });
    const double tflop = 2.0 * S * C * OC / 1e12;
    printf("%-15s %5d %5d %6d x %2d | %7.0f (%4.0f) | %7.0f (%4.0f) | %7.0f (%4.0f) + %5.0f\n", name, C, OC, rows, E, ours, tflop / ours * 1e6,
           bf16_each, tflop / bf16_each * 1e6, fp8_each, tflop / fp8_each * 1e6, quant);
    for (void* p : {(void*)x, (void*)w, (void*)y, (void*)d_offsets, (void*)d_jobs}) CUDA_CHECK(cudaFree(p));
    for (int e = 0; e < E; e++)
        for (const Fp8Matrix& m : {xq[e], jobs[e].q.w, jobs[e].q.wt}) fp8_free(m);
}

static int run(int argc, char** argv) {
    std::string preset = "small";
    int N = 16384, runs = 20;
    CliParser cli{argc, argv};
    while (cli_next(cli)) {
        if (cli.name == "--help") return cli_help(cli, USAGE);
        else if (cli.name == "--preset") preset = cli_value(cli);
        else if (cli.name == "--tokens") N = (int)cli_int(cli, 16, 1 << 20) / 16 * 16;
        else if (cli.name == "--runs") runs = (int)cli_int(cli, 1, 1000);
        else cli_unknown(cli);
    }
    const Config c = config_preset(preset);
    const int D = c.hidden_size, H = c.num_attention_heads, SI = c.n_shared_experts * c.moe_intermediate_size;
    struct Shape {
        const char* name;
        int out, in;
    };
    std::vector<Shape> shapes = {{"q_a", c.q_lora_rank, D},
                                 {"q_b", H * c.qk_head_dim(), c.q_lora_rank},
                                 {"kv_a", c.kv_lora_rank + c.qk_rope_head_dim, D},
                                 {"kv_b", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank},
                                 {"o_proj", D, H * c.v_head_dim},
                                 {"dense gate_up", 2 * c.intermediate_size, D},
                                 {"dense down", D, c.intermediate_size},
                                 {"shared gate_up", 2 * SI, D},
                                 {"shared down", D, SI}};
    GpuContext ctx;
    CUDA_CHECK(cudaStreamCreate(&ctx.stream));
    matmul_init(ctx.mm);
    cudaStream_t st = ctx.stream;
    printf("%s, N = %d tokens, microseconds (median of %d): GEMMs Fprop/Dgrad/Wgrad; FP8 quantization of x, of dout, of W (W and W^T),\n"
           "and --fp8-wgrad's passes (dout both ways, x^T); the whole Linear forward + backward: bf16, FP8 (Wgrad in bf16), FP8 Wgrad too\n",
           preset.c_str(), N, runs);
    printf("%-15s %5s %5s | %-20s | %-20s | %-23s | %9s %9s %6s %9s %6s\n", "linear", "in", "out", "bf16 F / D / W", "fp8 F / D / W",
           "quant x / dout / W / T", "bf16 all", "fp8 all", "ratio", "fp8w all", "ratio");
    for (const Shape& s : shapes) {
        const int K = s.in, OC = s.out;
        bf16 *x = device_alloc<bf16>((size_t)N * K, "bench"), *w = device_alloc<bf16>((size_t)OC * K, "bench");
        bf16 *dout = device_alloc<bf16>((size_t)N * OC, "bench"), *y = device_alloc<bf16>((size_t)N * OC, "bench");
        bf16* dx = device_alloc<bf16>((size_t)N * K, "bench");
        float* dw = device_alloc<float>((size_t)OC * K, "bench");
        std::vector<float> h((size_t)N * std::max(K, OC));
        for (size_t i = 0; i < h.size(); i++) h[i] = 2 * rng_uniform(1, i) - 1;
        to_device(x, h.data(), (size_t)N * K);
        to_device(dout, h.data(), (size_t)N * OC);
        to_device(w, h.data(), (size_t)OC * K);
        const Fp8Weight q{fp8_alloc(OC, K, 128), fp8_alloc(K, OC, 128)};
        const Fp8Matrix xq = fp8_alloc(N, K, 1), dq = fp8_alloc(N, OC, 1), dt = fp8_alloc(OC, N, 1), xt = fp8_alloc(K, N, 1);
        int blocks = 0;
        Fp8WeightJob* job = fp8_weight_jobs_upload({{q, w, 0}}, &blocks);
        fp8_quantize_weights_gpu(job, 1, blocks, st);
        fp8_quantize_gpu(xq, x, K, st);
        fp8_quantize_gpu(dq, dout, OC, st);
        fp8_quantize_both_gpu(dq, dt, dout, OC, st);
        fp8_quantize_both_gpu(Fp8Matrix{}, xt, x, K, st);
        ctx.scratch_bytes = fp8_linear_scratch_bytes(N, K, OC, true, false);
        ctx.scratch = device_alloc<char>(ctx.scratch_bytes, "bench");
        Fp8Weight qw8 = q;
        qw8.wgrad = true;
        const Linear<bf16> plain{w, OC, K}, fp8{w, OC, K, &q}, fp8w{w, OC, K, &qw8};
        const Linear<float> grad{dw, OC, K};
        auto t = [&](const std::function<void()>& fn) { return time_us(st, runs, fn); };
        const double bf = t([&] { matmul(ctx.mm, y, x, w, N, OC, K, false, true, 0.0f, false, st); });
        const double bd = t([&] { matmul(ctx.mm, dx, dout, w, N, K, OC, false, false, 0.0f, false, st); });
        const double bw = t([&] { matmul(ctx.mm, dw, dout, x, OC, K, N, true, false, 1.0f, true, st); });
        const double ff = t([&] { fp8_matmul(ctx.mm, y, false, xq, q.w, false, st); });
        const double fd = t([&] { fp8_matmul(ctx.mm, dx, false, dq, q.wt, false, st); });
        const double fw = t([&] { fp8_matmul(ctx.mm, dw, true, dt, xt, true, st); });
        const double qx = t([&] { fp8_quantize_gpu(xq, x, K, st); });
        const double qd = t([&] { fp8_quantize_gpu(dq, dout, OC, st); });
        const double qw = t([&] { fp8_quantize_weights_gpu(job, 1, blocks, st); });
        const double qt = t([&] {
            fp8_quantize_both_gpu(dq, dt, dout, OC, st);
            fp8_quantize_both_gpu(Fp8Matrix{}, xt, x, K, st);
        });
        const double all16 = t([&] {
            linear_forward_gpu(y, x, plain, N, ctx);
            linear_backward_gpu(dx, grad, dout, x, plain, N, false, ctx);
        });
        const double all8 = t([&] {
            linear_forward_gpu(y, x, fp8, N, ctx);
            linear_backward_gpu(dx, grad, dout, x, fp8, N, false, ctx);
        });
        const double all8w = t([&] {
            linear_forward_gpu(y, x, fp8w, N, ctx);
            linear_backward_gpu(dx, grad, dout, x, fp8w, N, false, ctx);
        });
        printf("%-15s %5d %5d | %6.0f %6.0f %6.0f | %6.0f %6.0f %6.0f | %5.0f %5.0f %5.0f %5.0f | %9.0f %9.0f %6.3f %9.0f %6.3f\n", s.name, K, OC,
               bf, bd, bw, ff, fd, fw, qx, qd, qw, qt, all16, all8, all16 / all8, all8w, all16 / all8w);
        for (void* p : {(void*)x, (void*)w, (void*)dout, (void*)y, (void*)dx, (void*)dw, ctx.scratch, (void*)job}) CUDA_CHECK(cudaFree(p));
        for (const Fp8Matrix& m : {q.w, q.wt, xq, dq, dt, xt}) fp8_free(m);
    }
    if (c.n_routed_experts > 0) {
        const int S = N * c.num_experts_per_tok, E = c.n_routed_experts, MI = c.moe_intermediate_size;
        printf("\nrouted experts, forward, microseconds (TFLOP/s): our grouped kernel (bf16) | cuBLASLt per expert, bf16 | cuBLASLt per "
               "expert, FP8 + quantizing x\n");
        printf("%-15s %5s %5s %11s | %-14s | %-14s | %s\n", "GEMM", "in", "out", "rows x E", "grouped bf16", "per-expert bf16", "per-expert FP8");
        time_experts("expert gate_up", S, E, D, 2 * MI, runs, ctx);
        time_experts("expert down", S, E, MI, D, runs, ctx);
    }
    matmul_free(ctx.mm);
    return 0;
}

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
