// dev/persistent_gemv_bench.cu — what a persistent decoding kernel could save at batch 1 (issue 12: 0.4 ms a token).
// A `small` decoding step is about 114 dependent launches of a few microseconds each, while the bytes it reads take
// under 0.1 ms of HBM time: its launches are its time (bench/RESULTS.md, sessions 13-18). Before writing a step as
// one kernel, this measures the cost it would trade for them: a chain of dependent GEMVs (one token, each GEMV's
// output the next one's input) run four ways, microseconds a GEMV:
//   launches:            kernels.cuh's gemv_forward_gpu, one launch a GEMV (programmatic dependent launch, as the
//                        decoder), replayed as a CUDA graph;
//   launches, same math: this file's GEMV, one launch a GEMV, in a graph (the persistent kernels' arithmetic);
//   one kernel, cg sync: the whole chain in one cooperative launch, cooperative_groups' grid.sync() between GEMVs;
//   one kernel, flag:    the same with a barrier of one atomic counter and a generation flag.
// (The two single kernels are launched as they are, once a chain, so their times include one launch's overhead
// spread over the chain.)
// The last three give the same bits (checked: exits 1 if not). Two shapes: 768 x 768 (small's o_proj) and the
// dense FFN's 768 -> 3072 -> 768. Predicted, before any run: about 4 us a GEMV launched (the decoder's GEMVs took
// 262 us for 50 at batch 1, profiled), 1.5-2 with cg sync and 1-1.5 with the flag; below 2, a step of about 100
// phases in one kernel would take about 0.2 ms plus its HBM time, under the issue's 0.4 ms.
// Measured (H200, 2026-12-04, bench/RESULTS.md): 1.79 / 2.11 / 2.78 / 3.57 us a GEMV at 768 x 768, so launches with
// programmatic dependent launch beat both barriers and a persistent step would not pay.
//
//   make dev/persistent_gemv_bench && ./dev/persistent_gemv_bench      (on the device machine)
#include <algorithm>
#include <cooperative_groups.h>
#include <cstdio>
#include <vector>

#include "cuda_common.cuh"
#include "kernels.cuh"

namespace cg = cooperative_groups;

namespace {

// out [OUT] = W [OUT, IN] @ x [IN], one warp a column (columns warp-strided over the whole grid), 8 bf16 a load
__device__ inline void gemv_phase(bf16* out, const bf16* x, const bf16* w, int IN, int OUT) {
    const int warps = gridDim.x * blockDim.x / 32, lane = threadIdx.x % 32;
    for (int c = (blockIdx.x * blockDim.x + threadIdx.x) / 32; c < OUT; c += warps) {
        float acc = 0;
        for (int i = lane * 8; i < IN; i += 32 * 8) {
            float wv[8], xv[8];
            kdetail::load_bf16<8>(wv, w + (size_t)c * IN + i);
            kdetail::load_bf16<8>(xv, x + i);
#pragma unroll
            for (int k = 0; k < 8; k++) acc += wv[k] * xv[k];
        }
        acc = warp_sum(acc);
        if (lane == 0) out[c] = __float2bfloat16(acc);
    }
}

// One GEMV of the chain: x[g + 1] = W_g @ x[g]
struct Chain {
    std::vector<int> dims;  // dims[g] -> dims[g + 1]
    std::vector<bf16*> w, x;
};

__global__ void gemv_phase_kernel(bf16* out, const bf16* x, const bf16* w, int IN, int OUT) { gemv_phase(out, x, w, IN, OUT); }

// the chain's pointers and sizes as kernel arguments (GEMVs up to MAX_PHASES)
constexpr int MAX_PHASES = 64;
struct ChainArgs {
    const bf16* w[MAX_PHASES];
    bf16* x[MAX_PHASES + 1];
    int dims[MAX_PHASES + 1];
    int phases;
};

__global__ void chain_cg_kernel(ChainArgs a) {
    cg::grid_group grid = cg::this_grid();
    for (int g = 0; g < a.phases; g++) {
        gemv_phase(a.x[g + 1], a.x[g], a.w[g], a.dims[g], a.dims[g + 1]);
        grid.sync();
    }
}

// every block's thread 0 counts in; the last one resets the count and bumps the generation the others spin on. The
// fences make each block's writes visible before its count, and the others' before it reads on.
__device__ inline void grid_barrier(unsigned* count, volatile unsigned* generation) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned seen = *generation;
        __threadfence();
        if (atomicAdd(count, 1) == gridDim.x - 1) {
            *count = 0;
            __threadfence();
            atomicAdd((unsigned*)generation, 1);
        } else {
            while (*generation == seen) {
            }
        }
        __threadfence();
    }
    __syncthreads();
}

__global__ void chain_flag_kernel(ChainArgs a, unsigned* count, unsigned* generation) {
    for (int g = 0; g < a.phases; g++) {
        gemv_phase(a.x[g + 1], a.x[g], a.w[g], a.dims[g], a.dims[g + 1]);
        grid_barrier(count, generation);
    }
}

// microseconds a GEMV, the median of 20 runs of `enqueue` (the whole chain of `gemvs`), replayed as a CUDA graph
// where it is several launches (a cooperative launch runs as it is: one launch a chain)
template <typename F>
double us_per_gemv(F enqueue, int gemvs, bool graph_it, cudaStream_t st) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    if (graph_it) {
        CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        enqueue();
        CUDA_CHECK(cudaStreamEndCapture(st, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    }
    cudaEvent_t t0, t1;
    CUDA_CHECK(cudaEventCreate(&t0));
    CUDA_CHECK(cudaEventCreate(&t1));
    std::vector<double> us;
    for (int r = 0; r < 23; r++) {
        CUDA_CHECK(cudaEventRecord(t0, st));
        if (graph_it) CUDA_CHECK(cudaGraphLaunch(exec, st));
        else enqueue();
        CUDA_CHECK(cudaEventRecord(t1, st));
        CUDA_CHECK(cudaEventSynchronize(t1));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
        if (r >= 3) us.push_back(1000.0 * ms / gemvs);  // the first replays warm up
    }
    std::sort(us.begin(), us.end());
    if (graph_it) {
        CUDA_CHECK(cudaGraphExecDestroy(exec));
        CUDA_CHECK(cudaGraphDestroy(graph));
    }
    CUDA_CHECK(cudaEventDestroy(t0));
    CUDA_CHECK(cudaEventDestroy(t1));
    return us[us.size() / 2];
}

std::vector<bf16> to_host(const bf16* p, size_t n) {
    std::vector<bf16> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(bf16), cudaMemcpyDeviceToHost));
    return h;
}

bool same_bits(const std::vector<bf16>& a, const std::vector<bf16>& b) {
    for (size_t i = 0; i < a.size(); i++)
        if (__bfloat16_as_ushort(a[i]) != __bfloat16_as_ushort(b[i])) return false;
    return true;
}

}  // namespace

int main() {
    cudaStream_t st;
    CUDA_CHECK(cudaStreamCreate(&st));
    int device = 0, sms = 0, per_sm_cg = 0, per_sm_flag = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_cg, chain_cg_kernel, 256, 0));
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_flag, chain_flag_kernel, 256, 0));
    const int blocks = sms * std::min(per_sm_cg, per_sm_flag);
    unsigned* barrier = device_alloc<unsigned>(2, "bench");
    CUDA_CHECK(cudaMemset(barrier, 0, 2 * sizeof(unsigned)));
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    printf("%s, %d SMs, persistent grid %d blocks of 256\n", prop.name, sms, blocks);
    printf("%-28s %10s %12s %12s %12s   (us a GEMV)\n", "chain", "launches", "same math", "cg sync", "flag");

    bool ok = true;
    const std::pair<const char*, std::vector<int>> shapes[] = {{"768 x 768, 24 GEMVs", std::vector<int>(25, 768)},
                                                               {"768 -> 3072 -> 768, 24 GEMVs", {}}};
    for (const auto& shape : shapes) {
        const char* name = shape.first;
        std::vector<int> dims = shape.second;
        if (dims.empty())
            for (int g = 0; g <= 24; g++) dims.push_back(g % 2 ? 3072 : 768);
        const int phases = (int)dims.size() - 1;
        ChainArgs a = {};
        a.phases = phases;
        for (int g = 0; g <= phases; g++) {
            a.dims[g] = dims[g];
            a.x[g] = device_alloc<bf16>(dims[g], "bench");
        }
        for (int g = 0; g < phases; g++) {  // weights ~ 1/sqrt(IN), so that the chain's values stay near 1
            std::vector<bf16> w((size_t)dims[g + 1] * dims[g]);
            for (size_t i = 0; i < w.size(); i++) w[i] = __float2bfloat16((rng_uniform(7 + g, i) * 2 - 1) * 1.7f / sqrtf((float)dims[g]));
            bf16* d = device_alloc<bf16>(w.size(), "bench");
            CUDA_CHECK(cudaMemcpy(d, w.data(), w.size() * sizeof(bf16), cudaMemcpyHostToDevice));
            a.w[g] = d;
        }
        std::vector<bf16> x0(dims[0]);
        for (int i = 0; i < dims[0]; i++) x0[i] = __float2bfloat16(rng_uniform(3, i) * 2 - 1);
        CUDA_CHECK(cudaMemcpy(a.x[0], x0.data(), x0.size() * sizeof(bf16), cudaMemcpyHostToDevice));
        const size_t last = dims[phases];

        const double launches = us_per_gemv([&] {
            for (int g = 0; g < phases; g++) gemv_forward_gpu(a.x[g + 1], (const bf16*)a.x[g], a.w[g], 1, dims[g], dims[g + 1], st);
        }, phases, true, st);
        const double same_math = us_per_gemv([&] {
            for (int g = 0; g < phases; g++) {
                gemv_phase_kernel<<<ceil_div(dims[g + 1] * 32, 256), 256, 0, st>>>(a.x[g + 1], a.x[g], a.w[g], dims[g], dims[g + 1]);
                CUDA_LAUNCH_CHECK();
            }
        }, phases, true, st);
        const std::vector<bf16> reference = to_host(a.x[phases], last);
        void* cg_args[] = {&a};
        const double cg_sync = us_per_gemv([&] {
            CUDA_CHECK(cudaLaunchCooperativeKernel((void*)chain_cg_kernel, blocks, 256, cg_args, 0, st));
        }, phases, false, st);
        ok &= same_bits(to_host(a.x[phases], last), reference);
        unsigned* count = barrier;
        unsigned* generation = barrier + 1;
        void* flag_args[] = {&a, &count, &generation};
        const double flag = us_per_gemv([&] {
            CUDA_CHECK(cudaLaunchCooperativeKernel((void*)chain_flag_kernel, blocks, 256, flag_args, 0, st));
        }, phases, false, st);
        ok &= same_bits(to_host(a.x[phases], last), reference);
        printf("%-28s %10.2f %12.2f %12.2f %12.2f\n", name, launches, same_math, cg_sync, flag);
        for (int g = 0; g < phases; g++) cudaFree((void*)a.w[g]);
        for (int g = 0; g <= phases; g++) cudaFree(a.x[g]);
    }
    if (!ok) {
        fprintf(stderr, "persistent_gemv_bench: the persistent kernels' output differs from the launches'\n");
        return 1;
    }
    return 0;
}
