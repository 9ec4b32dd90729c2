// test_dist.cpp — tests for dist.h, the host side of multi-GPU training: gradient buckets and ZeRO-1 shards
// over the real parameter layouts (every element once, equal aligned slices, backward order), expert
// parallelism's groups, its ranks' layouts (each expert held once, gathered into the whole model's by name) and
// plans (its moments on one rank of those holding it), and its row exchange (against every rank's own MoE layer, emulated on the CPU), the
// DataLoader's split of a step among ranks (2 ranks read what 1 rank reads with --grad-accum 2), the
// NCCL-id hand-off through a directory between processes, the options hash, and the --gpus launcher's
// handling of a rank that fails.
#include <doctest/doctest.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "dataloader.h"
#include "dist.h"
#include "kernels.cuh"
#include "test_configs.h"

namespace {

std::string scratch_dir(const std::string& name) {
    std::string dir = strfmt("/tmp/dsv3_test_dist_%d_%s", (int)getpid(), name.c_str());
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
    make_dirs(dir);
    return dir;
}

ParamLayout hand_layout(const std::vector<std::pair<std::string, size_t>>& tensors) {
    ParamLayout L;
    for (const auto& [name, numel] : tensors) {
        L.index[name] = L.tensors.size();
        L.tensors.push_back({name, {(int64_t)numel}, L.total, numel, TENSOR_DECAY});
        L.total += numel;
    }
    return L;
}

// The properties every plan must have, for any layout, world, bucket size and expert-parallel group.
void check_plan(const ParamLayout& L, int layers, int world, size_t target, int ep = 1) {
    const ZeroPlan p = zero_plan(L, layers, world, target, ep);
    const size_t unit = ZERO_ALIGN * world;
    CHECK(p.padded % unit == 0);
    CHECK(p.padded >= L.total);
    CHECK(p.padded - L.total < unit);
    if (ep == 1) CHECK(p.shard * world == p.padded);
    // the buckets tile [0, padded), each an even split into aligned slices, no larger than the target allows
    std::vector<GradBucket> by_offset = p.buckets;
    std::sort(by_offset.begin(), by_offset.end(), [](const GradBucket& a, const GradBucket& b) { return a.begin < b.begin; });
    size_t at = 0;
    for (const GradBucket& b : by_offset) {
        CHECK(b.begin == at);
        CHECK(b.len > 0);
        CHECK(b.len % unit == 0);
        CHECK(b.len <= round_up(target, unit));
        at = b.begin + b.len;
    }
    CHECK(at == p.padded);
    // in the order the backward finishes them; each waits for every gradient it holds, and holds gradients
    // finished earlier only within the rounding of a boundary
    size_t state = 0;
    for (size_t k = 0; k < p.buckets.size(); k++) {
        const GradBucket& b = p.buckets[k];
        if (k > 0) CHECK(p.buckets[k - 1].ready <= b.ready);
        CHECK(b.state == state);
        state += b.len / bucket_ranks(p, b);
        size_t early = 0;
        for (const TensorSpec& t : L.tensors) {
            const size_t lo = std::max(t.offset, b.begin), hi = std::min(t.offset + t.numel, b.begin + b.len);
            if (lo >= hi) continue;
            CHECK(b.experts == (ep > 1 && is_routed_expert(t.name)));  // never an expert beside a shared tensor
            const int point = grad_ready_point(t.name, layers);
            CHECK(point <= b.ready);
            if (point < b.ready) early += hi - lo;
        }
        CHECK(early < unit);
    }
    CHECK(state == p.shard);
}

}  // namespace

TEST_CASE("grad_ready_point follows the GPU backward: head and MTP module, layers from the top, embedding") {
    CHECK(grad_ready_point("lm_head.weight", 3) == 0);
    CHECK(grad_ready_point("model.layers.3.eh_proj.weight", 3) == 0);  // the MTP module runs before the final norm's backward
    CHECK(grad_ready_point("model.layers.3.mlp.experts.1.down_proj.weight", 3) == 0);
    CHECK(grad_ready_point("model.norm.weight", 3) == 0);
    CHECK(grad_ready_point("model.layers.2.self_attn.o_proj.weight", 3) == 1);
    CHECK(grad_ready_point("model.layers.0.mlp.experts.5.up_proj.weight", 3) == 3);
    CHECK(grad_ready_point("model.embed_tokens.weight", 3) == 4);
}

TEST_CASE("zero_plan on a hand-made layout: exact buckets, slices and state offsets") {
    // embedding [0, 100), layer 0 [100, 150), head [150, 160); 2 ranks: unit 16, nothing to pad
    const ParamLayout L = hand_layout({{"model.embed_tokens.weight", 100}, {"model.layers.0.w", 50}, {"lm_head.weight", 10}});
    ZeroPlan p = zero_plan(L, 1, 2, 1 << 20);
    CHECK(p.padded == 160);
    CHECK(p.shard == 80);
    // the boundary at 150 rounds up to 160 (nothing above it), so the head waits for the layer; the one at
    // 100 rounds up to 112, so the bucket holding the layer's top starts there
    REQUIRE(p.buckets.size() == 2);
    CHECK(p.buckets[0].begin == 112);
    CHECK(p.buckets[0].len == 48);
    CHECK(p.buckets[0].ready == 1);
    CHECK(p.buckets[0].state == 0);
    CHECK(p.buckets[1].begin == 0);
    CHECK(p.buckets[1].len == 112);
    CHECK(p.buckets[1].ready == 2);
    CHECK(p.buckets[1].state == 24);

    // 3 ranks and 48-element buckets: padded to 168 (unit 24)
    p = zero_plan(L, 1, 3, 48);
    CHECK(p.padded == 168);
    std::vector<std::tuple<size_t, size_t, int, size_t>> got, want = {
        {120, 48, 1, 0},  // cut at round_up(150, 24) = 168 is the end; cut at round_up(100, 24) = 120
        {72, 48, 2, 16}, {24, 48, 2, 32}, {0, 24, 2, 48}};
    for (const GradBucket& b : p.buckets) got.emplace_back(b.begin, b.len, b.ready, b.state);
    CHECK(got == want);
}

TEST_CASE("zero_plan on the presets' layouts, with and without the MTP module: buckets tile the gradient in backward order, aligned") {
    for (const char* preset : {"tiny", "mini", "small"})
        for (int mtp : {0, 1}) {
            Config c = config_preset(preset);
            c.num_nextn_predict_layers = mtp;
            CAPTURE(mtp);
            const ParamLayout L = param_layout(c);
            for (int world : {1, 2, 3, 8})
                for (size_t target : {(size_t)1000, (size_t)65536, ZERO_BUCKET}) {
                    CAPTURE(preset);
                    CAPTURE(world);
                    CAPTURE(target);
                    check_plan(L, c.num_hidden_layers, world, target);
                }
            // with buckets of the default size, every layer of the small model is at least one bucket of its own
            const ZeroPlan p = zero_plan(L, c.num_hidden_layers, 2);
            std::map<int, int> per_point;
            for (const GradBucket& b : p.buckets) per_point[b.ready]++;
            CHECK((int)per_point.size() == c.num_hidden_layers + 2);
        }
}

TEST_CASE("ZeRO-1 shards: every trained element belongs to exactly one rank, its moments at a unique place") {
    const Config c = config_preset("tiny");
    const ParamLayout L = param_layout(c);
    const std::vector<ParamChunk> all = param_chunks(L, 1000);  // small chunks, so that slices cut through them
    for (int world : {1, 2, 3, 4}) {
        CAPTURE(world);
        const ZeroPlan p = zero_plan(L, c.num_hidden_layers, world, 4096);
        std::vector<int> owners(p.padded, 0), decay(p.padded, -1);
        for (const ParamChunk& ch : all)
            for (int j = 0; j < ch.len; j++) decay[ch.begin + j] = ch.decay;
        for (int r = 0; r < world; r++) {
            std::vector<char> state_used(p.shard, 0);
            for (const ParamChunk& ch : zero_rank_chunks(all, p, r)) {
                CHECK(ch.len > 0);
                for (int j = 0; j < ch.len; j++) {
                    const size_t i = ch.begin + j, k = ch.state + j;
                    owners[i]++;
                    CHECK(ch.decay == decay[i]);
                    REQUIRE(k < p.shard);
                    CHECK(!state_used[k]);
                    state_used[k] = 1;
                    // the element lies in rank r's slice of the bucket whose state range holds k
                    bool in_slice = false;
                    for (const GradBucket& b : p.buckets) {
                        const size_t slice = b.len / world, lo = b.begin + r * slice;
                        if (k >= b.state && k < b.state + slice) in_slice = i == lo + (k - b.state);
                    }
                    CHECK(in_slice);
                }
            }
        }
        size_t trained = 0, once = 0;
        for (size_t i = 0; i < p.padded; i++) {
            if (decay[i] >= 0) trained++, once += owners[i] == 1;
            else CHECK(owners[i] == 0);  // buffers (expert biases), alignment gaps and padding: nobody's
        }
        CHECK(once == trained);
        size_t want = 0;
        for (const ParamChunk& ch : all) want += ch.len;
        CHECK(trained == want);
    }
}

TEST_CASE("ep_group: expert-parallel groups of consecutive ranks, each holding an equal share of the experts") {
    const EpGroup g = ep_group(8, 5, 4, 16);  // DP 2 x EP 4: rank 5 is the second of the second group
    CHECK(g.size == 4);
    CHECK(g.index == 1);
    CHECK(g.first_expert == 4);
    CHECK(g.experts == 4);
    CHECK_THROWS_WITH(ep_group(6, 0, 4, 16), doctest::Contains("must be a multiple of it"));
    CHECK_THROWS_WITH(ep_group(6, 0, 3, 16), doctest::Contains("must split evenly"));
}

// Expert parallelism's sharded state: each rank of a group lays out only its experts (param_layout with
// ep_shard), the same offsets on every rank; the experts' gradients are split among the ranks holding the same
// experts, everything else among the whole world.
TEST_CASE("param_layout of an expert shard: the group's layouts share their offsets and hold every expert once") {
    for (const char* preset : {"tiny", "mini", "small"})
        for (int P : {2, 4})
            for (int world : {P, 2 * P, 3 * P}) {
                const Config c = config_preset(preset);
                CAPTURE(preset);
                CAPTURE(P);
                CAPTURE(world);
                const ParamLayout whole = param_layout(c);
                std::map<std::string, int> held;  // each expert tensor: how many ranks of a group hold it
                std::vector<ParamLayout> group;
                for (int i = 0; i < P; i++) {
                    const EpGroup g = ep_group(world, i, P, c.n_routed_experts);
                    group.push_back(param_layout(c, ep_shard(g, world)));
                    // the held experts follow one another at the grouped GEMM's fixed stride
                    const size_t stride = (size_t)3 * c.moe_intermediate_size * c.hidden_size;
                    for (int l = c.first_k_dense_replace; l < c.num_hidden_layers; l++) {
                        auto gate = [&](int e) {
                            return group.back().offset_of(strfmt("model.layers.%d.mlp.experts.%d.gate_proj.weight", l, e));
                        };
                        for (int j = 1; j < g.experts; j++) CHECK(gate(g.first_expert + j) - gate(g.first_expert) == j * stride);
                    }
                }
                size_t expert_numel = 0, shared_numel = 0;
                for (const TensorSpec& t : whole.tensors) (is_routed_expert(t.name) ? expert_numel : shared_numel) += t.numel;
                for (const ParamLayout& L : group) {
                    REQUIRE(L.tensors.size() == group[0].tensors.size());
                    size_t experts = 0;
                    for (size_t k = 0; k < L.tensors.size(); k++) {
                        const TensorSpec &t = L.tensors[k], &t0 = group[0].tensors[k];
                        CHECK(t.offset == t0.offset);
                        CHECK(t.shape == t0.shape);
                        CHECK(t.kind == t0.kind);
                        CHECK(is_routed_expert(t.name) == is_routed_expert(t0.name));
                        REQUIRE(whole.index.count(t.name) == 1);  // the global name, with the global shape
                        CHECK(whole.tensors[whole.index.at(t.name)].shape == t.shape);
                        if (is_routed_expert(t.name)) held[t.name]++, experts += t.numel;
                        else CHECK(t.name == whole.tensors[whole.index.at(t.name)].name);
                    }
                    CHECK(experts * P == expert_numel);
                    CHECK(L.total >= shared_numel + experts);
                }
                size_t expert_tensors = 0;
                for (const TensorSpec& t : whole.tensors) expert_tensors += is_routed_expert(t.name);
                CHECK(held.size() == expert_tensors);
                for (const auto& [name, ranks] : held) CHECK(ranks == 1);
            }
}

TEST_CASE("layout_pieces: a group's sharded parameters gather into the whole model's, and scatter back") {
    const Config c = config_preset("mini");  // 4 routed experts
    const ParamLayout whole = param_layout(c);
    std::vector<float> model(whole.total);
    for (size_t i = 0; i < whole.total; i++) model[i] = rng_uniform(9, i);
    for (int P : {2, 4}) {
        CAPTURE(P);
        const int world = 2 * P;
        std::vector<float> gathered(whole.total, -1.0f);
        std::vector<int> writes(whole.total, 0);
        for (int i = 0; i < P; i++) {
            const ParamLayout local = param_layout(c, ep_shard(ep_group(world, i, P, c.n_routed_experts), world));
            std::vector<float> mine(local.total, 0.0f);
            for (const LayoutPiece& p : layout_pieces(local, whole))  // loading: the rank takes its tensors
                std::copy(model.begin() + p.whole, model.begin() + p.whole + p.numel, mine.begin() + p.local);
            for (const LayoutPiece& p : layout_pieces(local, whole))  // saving: rank 0 gathers them back
                for (size_t j = 0; j < p.numel; j++) {
                    gathered[p.whole + j] = mine[p.local + j];
                    writes[p.whole + j]++;
                }
        }
        for (const TensorSpec& t : whole.tensors) {
            bool exact = true, counted = true;
            for (size_t j = t.offset; j < t.offset + t.numel; j++) {
                exact = exact && gathered[j] == model[j];
                counted = counted && writes[j] == (is_routed_expert(t.name) ? 1 : P);  // an expert from its holder alone
            }
            CAPTURE(t.name);
            CHECK(exact);
            CHECK(counted);
        }
    }
}

TEST_CASE("zero_plan under expert parallelism: experts in buckets of their own, each element's moments on one rank of those sharing it") {
    const Config c = config_preset("tiny");  // 8 routed experts
    for (int P : {2, 4})
        for (int world : {P, 2 * P, 3 * P}) {
            CAPTURE(P);
            CAPTURE(world);
            for (size_t target : {(size_t)1000, (size_t)4096, ZERO_BUCKET})
                for (int i = 0; i < P; i++)
                    check_plan(param_layout(c, ep_shard(ep_group(world, i, P, c.n_routed_experts), world)), c.num_hidden_layers, world,
                               target, P);
            // owners[g][x]: how many ranks at place g of their groups keep the moments of element x of the layout
            // (the same offsets on every rank); an expert element is theirs alone, any other the world's
            const ParamLayout L0 = param_layout(c, ep_shard(ep_group(world, 0, P, c.n_routed_experts), world));
            const ZeroPlan p = zero_plan(L0, c.num_hidden_layers, world, 4096, P);
            std::vector<std::vector<int>> owners(P, std::vector<int>(p.padded, 0));
            for (int r = 0; r < world; r++) {
                const ParamLayout L = param_layout(c, ep_shard(ep_group(world, r, P, c.n_routed_experts), world));
                const ZeroPlan pr = zero_plan(L, c.num_hidden_layers, world, 4096, P);
                REQUIRE(pr.padded == p.padded);
                CHECK(pr.shard == p.shard);
                std::vector<char> state_used(p.shard, 0);
                for (const ParamChunk& ch : zero_rank_chunks(param_chunks(L, 1000), pr, r))
                    for (int j = 0; j < ch.len; j++) {
                        owners[r % P][ch.begin + j]++;
                        REQUIRE(ch.state + j < p.shard);
                        CHECK(!state_used[ch.state + j]);
                        state_used[ch.state + j] = 1;
                    }
            }
            size_t expert_elements = 0;
            for (const TensorSpec& t : L0.tensors) {
                if (t.kind == TENSOR_BUFFER) continue;
                for (size_t x = t.offset; x < t.offset + t.numel; x++) {
                    int total = 0;
                    for (int g = 0; g < P; g++) {
                        if (is_routed_expert(t.name)) CHECK(owners[g][x] == 1);
                        total += owners[g][x];
                    }
                    if (is_routed_expert(t.name)) expert_elements++;
                    else CHECK(total == 1);
                }
            }
            CHECK(expert_elements > 0);
        }
}

// The plan's arithmetic, emulated on the CPU with 4 ranks in 2 expert-parallel groups of 2. Each rank's
// gradient of its own batch is the reference's. Before the reduce-scatter, a rank holds its own gradient of
// the shared tensors, and for its experts the sum of its group's gradients (the all-to-all brings it every
// row its group routes there). Summing each bucket over the ranks sharing it and dividing by the world, as
// for every bucket, must give each rank's slices of what data parallelism averages.
TEST_CASE("expert parallelism's plan, emulated: each rank's slices of the split gradient are data parallelism's average") {
    const Config c = tiny_variant(0, 61);  // 8 routed experts
    const int world = 4, P = 2, B = 2, T = 8, E = c.n_routed_experts;
    StepOptions opt;
    opt.balance_alpha = 0.01f;
    RefModel<double> m;
    ref_init(m, c);
    randomise_weights(m, 7, false);
    const ParamLayout& whole = m.layout;
    std::vector<std::vector<double>> grad(world);
    std::vector<double> mean(whole.total, 0.0);
    for (int r = 0; r < world; r++) {
        std::vector<int> inputs(B * T), targets(B * T);
        for (int i = 0; i < B * T; i++) {
            inputs[i] = (int)(rng_hash(300 + r, i) % c.vocab_size);
            targets[i] = (int)(rng_hash(400 + r, i) % c.vocab_size);
        }
        std::fill(m.grads.begin(), m.grads.end(), 0.0);
        ref_forward(m, inputs.data(), targets.data(), B, T, opt);
        ref_backward(m);
        grad[r] = m.grads;
        for (size_t x = 0; x < whole.total; x++) mean[x] += m.grads[x] / world;
    }
    // rank q's gradient before the reduce-scatter, in its own layout
    std::vector<ParamLayout> layouts;
    std::vector<std::vector<double>> held(world);
    for (int q = 0; q < world; q++) {
        layouts.push_back(param_layout(c, ep_shard(ep_group(world, q, P, E), world)));
        held[q].assign(layouts[q].total, 0.0);
        for (const TensorSpec& t : layouts[q].tensors) {
            const size_t from = whole.offset_of(t.name);
            for (int peer = q / P * P; peer < q / P * P + P; peer++) {
                if (!is_routed_expert(t.name) && peer != q) continue;
                for (size_t j = 0; j < t.numel; j++) held[q][t.offset + j] += grad[peer][from + j];
            }
        }
    }
    double worst = 0, largest = 0;
    size_t checked = 0;
    for (int r = 0; r < world; r++) {
        const ZeroPlan p = zero_plan(layouts[r], c.num_hidden_layers, world, 4096, P);
        for (const GradBucket& b : p.buckets) {
            const size_t slice = b.len / bucket_ranks(p, b), lo = b.begin + bucket_rank(p, b, r) * slice;
            for (const TensorSpec& t : layouts[r].tensors) {
                const size_t s = std::max(lo, t.offset), e = std::min(lo + slice, t.offset + t.numel);
                for (size_t x = s; x < e; x++) {
                    double sum = 0;
                    for (int q = 0; q < world; q++)
                        if (!b.experts || q % P == r % P) sum += held[q][x];
                    const double want = mean[whole.offset_of(t.name) + (x - t.offset)];
                    worst = std::max(worst, std::fabs(sum / world - want));
                    largest = std::max(largest, std::fabs(want));
                    checked++;
                }
            }
        }
    }
    // every element of the model, the buffers (expert biases) included, is in one rank's slice
    size_t elements = 0;
    for (const TensorSpec& t : whole.tensors) elements += t.numel;
    CHECK(checked == elements);
    CHECK(largest > 0);
    CHECK(worst <= 1e-12 * largest);
}

TEST_CASE("ep_exchange on a hand-made table: offsets, counts and the regrouping by expert") {
    // 2 ranks, 4 experts (0 and 1 on rank 0, 2 and 3 on rank 1); rows routed to each expert by each rank
    const std::vector<int> counts = {2, 0, 1, 3,   // rank 0
                                     1, 2, 2, 1};  // rank 1
    using V = std::vector<size_t>;
    const EpExchange a = ep_exchange(ep_group(2, 0, 2, 4), counts, 4), b = ep_exchange(ep_group(2, 1, 2, 4), counts, 4);
    CHECK(a.send_count == V{2, 4});
    CHECK(a.send_offset == V{0, 2});
    CHECK(a.recv_count == V{2, 3});
    CHECK(a.recv_offset == V{0, 2});
    CHECK(a.expert_offsets == V{0, 3, 5});
    CHECK(a.regrouped == V{0, 1, 2, 3, 4});
    CHECK(b.send_count == V{3, 3});
    CHECK(b.send_offset == V{0, 3});
    CHECK(b.recv_count == V{4, 3});
    CHECK(b.recv_offset == V{0, 4});
    CHECK(b.expert_offsets == V{0, 3, 7});
    // arrived: rank 0's row for expert 2, its 3 for expert 3, then rank 1's 2 for expert 2 and 1 for expert 3
    CHECK(b.regrouped == V{0, 3, 4, 5, 1, 2, 6});
}

// Expert parallelism emulated on the CPU: P ranks, each with tokens of its own and the same weights, send their
// expert-sorted rows as ep_exchange says (the all-to-all done by copies); each runs only its own experts, over
// the rows that arrived, grouped by expert. Each slot's expert output and input gradient equal, bit for bit, what
// the rank's own MoE layer computes (a row's FFN does not depend on the rows beside it); each expert's weight
// gradient equals the sum over the ranks of theirs (what data parallelism all-reduces), to rounding.
TEST_CASE("expert parallelism emulated on the CPU: the rows ep_exchange routes through each rank's experts give every rank's own MoE layer") {
    const Config c = tiny_variant(0, 61);  // 8 experts, each token's top 3
    RefModel<double> m;
    ref_init(m, c);
    randomise_weights(m, 5, false);
    const MoeWeights<double>& w = m.w.layers[1].moe;
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, N = 24;
    for (int P : {2, 4}) {
        CAPTURE(P);
        std::vector<double> grad_dp(m.layout.total, 0), grad_ep(m.layout.total, 0);
        const MoeWeights<double> dw_dp = bind_weights(c, m.layout, grad_dp.data()).layers[1].moe;
        const MoeWeights<double> dw_ep = bind_weights(c, m.layout, grad_ep.data()).layers[1].moe;
        // every rank on its own: routing, expert outputs, and the experts' input gradients for an output gradient
        std::vector<std::vector<double>> u(P), dout(P);
        std::vector<MoeActs<double>> acts(P);
        std::vector<std::vector<std::vector<double>>> dx_own(P, std::vector<std::vector<double>>(E));
        std::vector<std::vector<int>> sorted(P);  // a rank's slots sorted by expert, stably (moe_permute's order)
        std::vector<int> counts((size_t)P * E);
        for (int q = 0; q < P; q++) {
            for (size_t i = 0; i < (size_t)N * D; i++) {
                u[q].push_back(4 * rng_uniform(100 + q, i) - 2);
                dout[q].push_back(2 * rng_uniform(200 + q, i) - 1);
            }
            std::vector<double> out((size_t)N * D);
            moe_forward(c, w, out.data(), u[q].data(), N, acts[q]);
            for (int e = 0; e < E; e++) {
                const std::vector<int>& rows = acts[q].rows[e];
                sorted[q].insert(sorted[q].end(), rows.begin(), rows.end());
                counts[(size_t)q * E + e] = (int)rows.size();
                std::vector<double> dy;
                for (int slot : rows)
                    for (int i = 0; i < D; i++) dy.push_back(acts[q].router.gate[slot] * dout[q][(size_t)(slot / K) * D + i]);
                dx_own[q][e].assign(dy.size(), 0);
                if (!rows.empty())
                    ffn_backward(moe_expert(w, e), moe_expert(dw_dp, e), dx_own[q][e].data(), dy.data(), acts[q].x[e].data(), (int)rows.size(),
                                 acts[q].ffn[e], false);
            }
        }
        std::vector<EpExchange> x;
        for (int r = 0; r < P; r++) x.push_back(ep_exchange(ep_group(P, r, P, E), counts, E));
        size_t arrived_all = 0;
        for (int me = 0; me < P; me++) {
            const EpGroup g = ep_group(P, me, P, E);
            for (int q = 0; q < P; q++) CHECK(x[q].send_count[me] == x[me].recv_count[q]);
            // what arrives at rank me, regrouped: each row as (its rank, its slot)
            const size_t arrived = x[me].expert_offsets.back();
            std::vector<std::pair<int, int>> grouped(arrived, {-1, -1});
            for (int q = 0; q < P; q++)
                for (size_t i = 0; i < x[me].recv_count[q]; i++)
                    grouped.at(x[me].regrouped.at(x[me].recv_offset[q] + i)) = {q, sorted[q][x[q].send_offset[me] + i]};
            arrived_all += arrived;
            for (int j = 0; j < g.experts; j++) {
                const int e = g.first_expert + j;
                const size_t r0 = x[me].expert_offsets[j], rows = x[me].expert_offsets[j + 1] - r0;
                std::vector<double> in, dy;
                for (size_t r = r0; r < r0 + rows; r++) {
                    const auto [q, slot] = grouped[r];
                    REQUIRE(q >= 0);
                    CHECK(acts[q].router.expert[slot] == e);
                    for (int i = 0; i < D; i++) {
                        in.push_back(u[q][(size_t)(slot / K) * D + i]);
                        dy.push_back(acts[q].router.gate[slot] * dout[q][(size_t)(slot / K) * D + i]);
                    }
                }
                if (rows == 0) continue;
                std::vector<double> y(rows * D), dx(rows * D, 0);
                FfnActs<double> fa;
                ffn_forward(moe_expert(w, e), y.data(), in.data(), (int)rows, fa);
                ffn_backward(moe_expert(w, e), moe_expert(dw_ep, e), dx.data(), dy.data(), in.data(), (int)rows, fa, false);
                int same_y = 0, same_dx = 0;
                for (size_t r = 0; r < rows; r++) {
                    const auto [q, slot] = grouped[r0 + r];
                    const int own = acts[q].slot[slot].second;  // its row in the rank's own batch for expert e
                    same_y += memcmp(&y[r * D], &acts[q].y[e][(size_t)own * D], D * sizeof(double)) == 0;
                    same_dx += memcmp(&dx[r * D], &dx_own[q][e][(size_t)own * D], D * sizeof(double)) == 0;
                }
                CHECK(same_y == (int)rows);
                CHECK(same_dx == (int)rows);
            }
        }
        CHECK(arrived_all == (size_t)P * N * K);  // every slot of every rank, once
        CHECK(rel_error(grad_ep.data(), grad_dp.data(), grad_dp.size()) < 1e-13);
    }
}

TEST_CASE("DataLoader: 2 ranks read disjoint windows whose union is 1 rank's with --grad-accum 2, in order") {
    const std::string dir = scratch_dir("loader");
    std::vector<int> tokens(1000);
    for (int i = 0; i < 1000; i++) tokens[i] = i;  // every token distinct: windows compare by content
    write_token_file(dir + "/train.bin", tokens, 7);
    const int B = 2, T = 8, steps = 40;  // wraps around the 1000 tokens
    DataLoader one, r0, r1;
    dataloader_open(one, dir + "/train.bin", B, T, -1);
    dataloader_open(r0, dir + "/train.bin", B, T, -1, 0, 2);
    dataloader_open(r1, dir + "/train.bin", B, T, -1, 1, 2);
    std::vector<int> in1, tg1, in2, tg2, a_in, a_tg, b_in, b_tg;
    for (int step = 0; step < steps; step++) {
        dataloader_next(one, in1, tg1);  // micro-step 0
        dataloader_next(one, in2, tg2);  // micro-step 1
        dataloader_next(r0, a_in, a_tg);
        dataloader_next(r1, b_in, b_tg);
        CHECK(a_in == in1);
        CHECK(a_tg == tg1);
        CHECK(b_in == in2);
        CHECK(b_tg == tg2);
        for (int x : a_in) CHECK(std::find(b_in.begin(), b_in.end(), x) == b_in.end());
        // the position is the run's, not the rank's: a checkpoint resumes on any number of ranks
        CHECK(dataloader_position(r0) == dataloader_position(one));
        CHECK(dataloader_position(r1) == dataloader_position(one));
        CHECK(dataloader_position(one) == (uint64_t)(step + 1) * 2 * B * T % 1000);
    }
    // resuming the 2-rank position on 1 rank reads what rank 0 would have read next
    DataLoader resumed;
    dataloader_open(resumed, dir + "/train.bin", B, T, -1);
    dataloader_seek(resumed, dataloader_position(r0));
    dataloader_next(resumed, in1, tg1);
    dataloader_next(r0, a_in, a_tg);
    CHECK(in1 == a_in);
    std::filesystem::remove_all(dir);
}

TEST_CASE("NCCL id hand-off: rank 0 publishes through the directory, another process waits for it") {
    const std::string dir = scratch_dir("id");
    unsigned char id[128];
    for (int i = 0; i < 128; i++) id[i] = (unsigned char)(i * 7 + 3);
    fflush(stdout);
    pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {  // rank 1: waits, then checks every byte
        unsigned char got[128] = {};
        int status = 2;
        try {
            dist_fetch_id(dir, got, sizeof(got), 20);
            status = memcmp(got, id, sizeof(id)) == 0 ? 0 : 1;
        } catch (...) {
        }
        _exit(status);
    }
    usleep(200000);  // the child is polling by now
    dist_publish_id(dir, id, sizeof(id));
    int status = -1;
    REQUIRE(waitpid(child, &status, 0) == child);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    // an id left behind is refused; retracting removes it
    const std::string leftover = dist_id_path(dir);
    CHECK_THROWS_WITH(dist_publish_id(dir, id, sizeof(id)),
                      ("--init-dir " + dir + ": " + leftover +
                       " is left from an earlier run; delete it (or use a fresh directory) and start every rank again").c_str());
    dist_retract_id(dir);
    CHECK(!path_exists(leftover));
    // nobody publishes: a bounded wait and one line
    CHECK_THROWS_WITH(dist_fetch_id(dir, id, sizeof(id), 0.2),
                      ("--init-dir " + dir + ": rank 0 wrote no NCCL id in 0 s (is it running, with the same --init-dir?)").c_str());
    CHECK_THROWS_WITH(dist_publish_id(dir + "/none", id, sizeof(id)),
                      ("--init-dir " + dir + "/none: no such directory (it must be shared by every rank)").c_str());
    std::filesystem::remove_all(dir);
}

TEST_CASE("the options hash ignores only --process-rank") {
    auto hash = [](std::vector<std::string> words) {
        std::vector<char*> argv;
        for (std::string& w : words) argv.push_back(&w[0]);
        return dist_options_hash((int)argv.size(), argv.data());
    };
    const uint64_t base = hash({"./train", "--num-processes", "2", "--process-rank", "0", "--steps", "20"});
    CHECK(hash({"./train", "--num-processes", "2", "--process-rank", "1", "--steps", "20"}) == base);
    CHECK(hash({"./train", "--num-processes", "2", "--process-rank=1", "--steps", "20"}) == base);
    CHECK(hash({"./train", "--num-processes", "2", "--process-rank", "0", "--steps", "21"}) != base);
    CHECK(hash({"./train", "--num-processes", "2", "--process-rank", "0", "--steps", "2", "0"}) != base);  // words, not their concatenation
}

TEST_CASE("--gpus launcher: a rank that fails or dies stops the others at once; all finishing is success") {
    DistGroup g;
    double t0 = now_seconds();
    int status = dist_launch(2, g);
    if (status < 0) {  // a rank: rank 1 fails at once, rank 0 would run for a minute
        if (g.rank == 1) _exit(3);
        sleep(60);
        _exit(0);
    }
    CHECK(status == 3);  // the failed rank's status
    CHECK(now_seconds() - t0 < 20);
    CHECK(!path_exists(g.init_dir));

    DistGroup k;
    t0 = now_seconds();
    status = dist_launch(3, k);
    if (status < 0) {  // rank 2 dies on a signal, which leaves no message of its own
        if (k.rank == 2) raise(SIGKILL);
        sleep(60);
        _exit(0);
    }
    CHECK(status == 1);
    CHECK(now_seconds() - t0 < 20);

    DistGroup h;
    status = dist_launch(3, h);
    if (status < 0) _exit(h.world == 3 && h.rank < 3 && h.local ? 0 : 5);
    CHECK(status == 0);
    signal(SIGINT, SIG_DFL);  // the launcher's parent ignores it; the test runner should not
    signal(SIGTERM, SIG_DFL);
}
