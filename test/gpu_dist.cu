// gpu_dist.cu — data parallel with ZeRO-1 (model.cu, dist.h) on 2 GPUs, the two ranks as two threads of this
// process with one communicator each (ncclCommInitAll), against one GPU with the same micro-batches
// accumulated: the losses, expert loads, and the weights and AdamW moments that model_sync_host gathers from
// the shards; and two 2-GPU runs bit for bit. Skipped on a machine with fewer than 2 GPUs.
#include <doctest/doctest.h>

#include <thread>

#include <unistd.h>

#include "cuda_common.cuh"
#include "fileutil.h"
#include "model.h"
#include "test_configs.h"

namespace {

int gpu_count() {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}


// what a run leaves: per step loss, balance loss and gradient norm; then the gathered state
struct RunResult {
    std::vector<StepStats> steps;
    std::vector<float> params, adam_m, adam_v;
    std::vector<std::vector<int64_t>> expert_load;
    std::string error;
};

RunResult train(const Config& c, const std::string& data, const TrainOptions& o, int steps, const DistGroup& g) {
    RunResult r;
    try {
        CUDA_CHECK(cudaSetDevice(g.rank));
        Model m;
        model_create(m, c, 21);
        randomise_weights(m.ref, 500, true);
        model_to_gpu(m, o.batch_size, o.seq_len, false, g);
        DataLoader dl;
        dataloader_open(dl, data, o.batch_size, o.seq_len, c.vocab_size, g.rank, g.world);
        for (int step = 0; step < steps; step++) r.steps.push_back(model_train_step(m, dl, o, step));
        model_sync_host(m);
        r.params = m.ref.params;
        r.adam_m = m.adam_m;
        r.adam_v = m.adam_v;
        r.expert_load = m.expert_load;
        model_free_gpu(m);
    } catch (const std::exception& e) {
        r.error = e.what();
    }
    return r;
}

// both ranks of a 2-GPU run, each on its own thread and GPU
std::vector<RunResult> train_on_two(const Config& c, const std::string& data, const TrainOptions& o, int steps) {
    ncclComm_t comms[2];
    int devices[2] = {0, 1};
    NCCL_CHECK(ncclCommInitAll(comms, 2, devices));
    std::vector<RunResult> out(2);
    std::vector<std::thread> ranks;
    for (int r = 0; r < 2; r++) {
        DistGroup g;
        g.rank = r;
        g.world = 2;
        g.comm = comms[r];
        ranks.emplace_back([&, g, r] { out[r] = train(c, data, o, steps, g); });
    }
    for (std::thread& t : ranks) t.join();
    for (ncclComm_t comm : comms) ncclCommDestroy(comm);
    CUDA_CHECK(cudaSetDevice(0));
    return out;
}

}  // namespace

TEST_CASE("ZeRO-1 on 2 GPUs: the steps of 1 GPU with the same micro-batches accumulated; shards gathered; bit-identical reruns") {
    if (gpu_count() < 2) {
        MESSAGE("skipped: needs 2 GPUs, this machine has ", gpu_count());
        return;
    }
    std::string dir = test_dir("gpu_dist", "zero");
    Config c = tiny_variant(0, 96);
    c.moe_intermediate_size = 16;  // 8 experts, top-3 within 2 of 4 groups: sparse routing, loads to reduce
    const std::string data = patterned_token_file(dir, 20000, c.vocab_size, 41);
    TrainOptions o;
    o.batch_size = 3;
    o.seq_len = 24;
    o.dropout = 0.1f;  // rank r's k-th micro-batch draws the masks of one GPU's (2k + r)-th
    o.balance_alpha = 0.01f;
    o.optim.lr = 1e-2f;
    o.optim.warmup_steps = 1;
    o.optim.total_steps = 10;
    const int steps = 4;

    SUBCASE("1 micro-batch per rank, no clipping: the 1-GPU numbers to float rounding") {
        // Each rank's gradient is the 1-GPU micro-batch's times 2 (a power of two: exact), so the average
        // differs from the 1-GPU sum only where a tensor takes several additions in one micro-batch (their
        // order changes), and the norm's partial sums add up in another order, which without clipping does
        // not reach the weights. Step 0 sees the very same weights; later steps, weights that may differ by
        // float rounding, which now and then moves a bf16 copy by one unit.
        o.optim.grad_clip = 0;
        TrainOptions one = o;
        one.grad_accum = 2;
        o.grad_accum = 1;
        const RunResult ref = train(c, data, one, steps, DistGroup());
        REQUIRE(ref.error == "");
        const std::vector<RunResult> two = train_on_two(c, data, o, steps);
        for (const RunResult& r : two) {
            REQUIRE(r.error == "");
            for (int s = 0; s < steps; s++) {
                CAPTURE(s);
                const double tol = s == 0 ? 1e-6 : 1e-4;
                CHECK(std::fabs(r.steps[s].loss - ref.steps[s].loss) <= tol * std::fabs(ref.steps[s].loss));
                CHECK(std::fabs(r.steps[s].balance_loss - ref.steps[s].balance_loss) <= tol * std::fabs(ref.steps[s].balance_loss));
                CHECK(std::fabs(r.steps[s].grad_norm - ref.steps[s].grad_norm) <= 10 * tol * ref.steps[s].grad_norm);
            }
            const double e_p = rel_error(r.params.data(), ref.params.data(), ref.params.size());
            const double e_m = rel_error(r.adam_m.data(), ref.adam_m.data(), ref.adam_m.size());
            const double e_v = rel_error(r.adam_v.data(), ref.adam_v.data(), ref.adam_v.size());
            MESSAGE("2 GPUs vs 1 GPU, grad_accum 2: weights ", e_p, ", m ", e_m, ", v ", e_v, (r.params == ref.params ? " (bit-identical)" : ""));
            CHECK(e_p < 1e-4);
            CHECK(e_m < 1e-3);
            CHECK(e_v < 1e-3);
            // every rank holds the group's counts (one rank's own would be half); a near tie in the routing may
            // go the other way once the weights differ by rounding
            int64_t total = 0, ref_total = 0, moved = 0;
            for (size_t l = 0; l < ref.expert_load.size(); l++)
                for (size_t e = 0; e < ref.expert_load[l].size(); e++) {
                    total += r.expert_load[l][e];
                    ref_total += ref.expert_load[l][e];
                    moved += std::abs(r.expert_load[l][e] - ref.expert_load[l][e]);
                }
            CHECK(total == ref_total);
            CHECK(moved <= ref_total / 100);
        }
        CHECK(two[0].params == two[1].params);  // the gathered shards are the same on every rank
        CHECK(two[0].adam_m == two[1].adam_m);
    }

    SUBCASE("2 micro-batches per rank (the first replayed as a CUDA graph), clipping on: within bf16 tolerance; reruns bit-identical") {
        TrainOptions one = o;
        one.grad_accum = 4;
        o.grad_accum = 2;
        const RunResult ref = train(c, data, one, steps, DistGroup());
        REQUIRE(ref.error == "");
        const std::vector<RunResult> two = train_on_two(c, data, o, steps), again = train_on_two(c, data, o, steps);
        for (int r = 0; r < 2; r++) {
            REQUIRE(two[r].error == "");
            REQUIRE(again[r].error == "");
            for (int s = 0; s < steps; s++) {
                CAPTURE(s);
                CHECK(std::fabs(two[r].steps[s].loss - ref.steps[s].loss) < 2e-2 * std::fabs(ref.steps[s].loss));
                CHECK(two[r].steps[s].loss == again[r].steps[s].loss);
                CHECK(two[r].steps[s].grad_norm == again[r].steps[s].grad_norm);
            }
            const double e_p = rel_error(two[r].params.data(), ref.params.data(), ref.params.size());
            MESSAGE("2 GPUs x grad_accum 2 vs 1 GPU x 4: weights ", e_p);
            CHECK(e_p < 2e-2);
            CHECK(two[r].params == again[r].params);
            CHECK(two[r].adam_v == again[r].adam_v);
        }
    }
    remove_tree(dir);
}
